"""Sparse upcycling: an MoE run started from a dense run's checkpoint computes the dense model's
function before training moves it; bad sources are refused naming `config.upcycle.<field>`."""
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import upcycle
from moe_jax import cli
from moe_jax.run import train, upcycling
from tests.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = {'data.seq_len': 32, 'data.batch_size': 8, 'model.d_model': 32, 'model.num_layers': 2,
        'model.num_heads': 2, 'model.d_ff': 64, 'train.steps': 4, 'train.warmup_steps': 1,
        'train.log_every': 1, 'train.eval_every': 4, 'train.eval_batches': 1,
        'train.progress': False}


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory, data_dir):
  """A dense tiny LM trained 4 steps (so its weights are not the initial ones)."""
  workdir = tmp_path_factory.mktemp('dense')
  train.train(tiny_config(data_dir, **{**TINY, 'model.moe_every': 0}), workdir)
  return workdir


def upcycled_config(data_dir, dense_workdir, **overrides):
  config = upcycle.get_config()
  config.data.data_dir = data_dir
  for key, value in {**TINY, 'moe.d_ff': 64, 'moe.num_experts': 4,
                     'upcycle.from_workdir': str(dense_workdir), **overrides}.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def logits(config, params, model_state, tokens):
  _, _, model, _ = train.check_config(config)
  return model.apply({'params': params, **model_state}, tokens)[0]


@pytest.mark.parametrize('k', [1, 2])
def test_upcycled_model_starts_as_the_dense_model(dense_run, data_dir, k):
  config = upcycled_config(data_dir, dense_run, **{'moe.k': k})
  task, cfg, model, mesh = train.check_config(config)
  tokens = task.load(config).eval_batches[0][:, :-1]  # real held-out text
  dense = upcycling.dense_params(dense_run)
  state = train.init_state(model, cfg, jax.random.key(0), task.input_spec(config), mesh)
  params = upcycling.upcycle_params(state['params'], dense, jax.random.key(1))
  experts = params['block_1']['moe']['experts']
  for name, weight in experts.items():  # every expert a copy of the block's dense FFN
    for e in range(4):
      np.testing.assert_array_equal(weight[e], dense['block_1']['ffn'][name])
  np.testing.assert_array_equal(params['embed']['embedding'], dense['embed']['embedding'])
  dense_config = tiny_config(data_dir, **{**TINY, 'model.moe_every': 0})
  want = logits(dense_config, dense, {}, tokens)
  got = logits(config, params, state['model_state'], tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  fresh = logits(config, state['params'], state['model_state'], tokens)  # not upcycled: differs
  assert np.abs(np.asarray(fresh) - np.asarray(want)).max() > 1e-2


def test_noise_makes_the_experts_differ(dense_run):
  dense = upcycling.dense_params(dense_run)
  shapes = {'block_1': {'moe': {'experts': {n: np.zeros((4, *w.shape), np.float32)
                                            for n, w in dense['block_1']['ffn'].items()},
                                'router': {'kernel': np.zeros((32, 4), np.float32)}}}}
  noisy = upcycling.upcycle_params(shapes, dense, jax.random.key(0), noise_std=0.01)
  w_in = np.asarray(noisy['block_1']['moe']['experts']['w_in'])
  spread = np.abs(w_in[0] - w_in[1]).max()
  assert 0 < spread < 0.1 * np.abs(dense['block_1']['ffn']['w_in']).max()


def test_upcycled_run_trains_from_the_dense_weights(dense_run, data_dir, tmp_path):
  args = ['moe-jax', 'train', '--config', str(ROOT / 'configs' / 'upcycle.py'),
          '--workdir', str(tmp_path / 'up'), '--config.data.data_dir', data_dir,
          '--config.upcycle.from_workdir', str(dense_run)]
  args += [f'--config.{key}={value}' for key, value in {**TINY, 'moe.d_ff': 64,
                                                        'moe.num_experts': 4}.items()]
  assert cli.main(args) == 0
  manager = ocp.CheckpointManager(tmp_path / 'up' / 'checkpoints')
  params = manager.restore(4, args=ocp.args.StandardRestore())['params']
  w_in = np.asarray(params['block_1']['moe']['experts']['w_in'])
  assert np.abs(w_in[0] - w_in[1]).max() > 0  # routing gave the copies different tokens


def test_bad_sources_are_refused_before_anything_is_written(dense_run, data_dir, tmp_path,
                                                            capsys):
  def fails(message, **overrides):
    workdir = tmp_path / 'refused'
    args = ['moe-jax', 'train', '--config', str(ROOT / 'configs' / 'upcycle.py'), '--workdir',
            str(workdir), '--config.data.data_dir', data_dir]
    args += [f'--config.{key}={value}' for key, value in {**TINY, 'moe.d_ff': 64,
                                                          **overrides}.items()]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (workdir / 'config.json').exists()

  fails('config.upcycle.from_workdir', **{'upcycle.from_workdir': str(tmp_path / 'nowhere')})
  fails('config.moe.d_ff=32 differs from the dense run',
        **{'upcycle.from_workdir': str(dense_run), 'moe.d_ff': 32})
  fails("config.model.d_model=64 differs from the dense run's 32",
        **{'upcycle.from_workdir': str(dense_run), 'model.d_model': 64})
