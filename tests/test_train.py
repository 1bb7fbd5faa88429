"""The transformer LM and its training loop on the real Tiny Shakespeare file.

Covers: loss falls; kill-and-resume reproduces an uninterrupted run (router_bias and router RNG
included); a workdir refuses a different config; FLOP/parameter counts by hand; the CLI's config
overrides.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lm_tiny
from moe_jax import cli
from moe_jax.data import text
from moe_jax.models import transformer
from moe_jax.run import train


def tiny_config(data_dir, **overrides):
  """lm_tiny shrunk: d_model 32, 2 layers (block 1 MoE, 4 experts), batch 8 x 32 tokens.

  overrides: {'section.field': value}.
  """
  config = lm_tiny.get_config()
  config.data.data_dir = data_dir
  config.data.seq_len, config.data.batch_size = 32, 8
  config.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_every=2)
  config.moe.update(num_experts=4, d_ff=64)
  config.train.update(steps=8, warmup_steps=2, log_every=1, eval_every=4, eval_batches=2,
                      checkpoint_every=4, progress=False)
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


SHORT_RUN = {'train.steps': 150, 'train.warmup_steps': 8, 'train.learning_rate': 1e-2,
             'train.log_every': 10, 'train.eval_every': 75, 'train.checkpoint_every': 75}


@pytest.fixture(scope='module')
def short_run(data_dir, tmp_path_factory):
  """(config, workdir, summary) of 150 steps of the tiny MoE LM."""
  config = tiny_config(data_dir, **SHORT_RUN)
  workdir = tmp_path_factory.mktemp('run')
  return config, workdir, train.train(config, workdir)


def test_training_lowers_loss_on_real_text(short_run):
  _, workdir, summary = short_run
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == sorted([*range(10, 151, 10), 75])  # eval steps log too
  first, last = records[0]['train_loss'], records[-1]['train_loss']
  assert last < first - 1.0, (first, last)
  assert summary['eval_loss'] < 3.0  # unigram entropy of these bytes is ~3.3 nats
  assert np.isfinite([r['grad_norm'] for r in records]).all()


def test_run_directory_format(short_run):
  config, workdir, summary = short_run
  names = {p.name for p in workdir.iterdir()}
  events = [name for name in names if name.startswith('events.out.tfevents.')]
  assert len(events) == 1  # TensorBoard's copy of metrics.jsonl
  assert names - set(events) == {'config.json', 'metrics.jsonl', 'checkpoints', 'timing.json',
                                 'summary.json', 'run.lock'}
  assert json.loads((workdir / 'config.json').read_text()) == config.to_dict()
  assert json.loads((workdir / 'summary.json').read_text()) == summary
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [75, 150]
  assert summary['steps'] == 150 and summary['resumed_from_step'] == 0
  assert (summary['params_total'], summary['params_active']) == transformer.param_counts(config)
  assert summary['flops_executed'] == transformer.model_flops_per_token(config, 'executed')
  assert summary['flops_active'] == transformer.model_flops_per_token(config, 'active')
  assert summary['flops_active'] < summary['flops_executed']  # capacity 1.25 pads
  # Bytes: held-out bits per byte are nats per token / ln 2.
  assert summary['eval_bits_per_byte'] == pytest.approx(summary['eval_loss'] / math.log(2))
  env = summary['environment']
  assert env['backend'] == 'cpu' and env['jax'] == jax.__version__ and env['device_count'] >= 1
  assert summary['router'].startswith('token_choice (num_experts=4, d_ff=64')
  record = read_metrics(workdir)[-1]
  for key in ('train_loss', 'eval_loss', 'lr', 'tokens_per_s', 'moe/block_1/fraction_dropped',
              'moe/block_1/router_entropy', 'moe/block_1/max_over_mean_load'):
    assert isinstance(record[key], float), key
  assert len(record['moe/block_1/tokens_per_expert']) == 4
  assert not any(key.startswith('moe/block_0') for key in record)  # block 0 is dense


def test_refuses_a_different_config(short_run):
  config, workdir, _ = short_run
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  changed = tiny_config(config.data.data_dir, **{**SHORT_RUN, 'train.learning_rate': 1e-3})
  with pytest.raises(ValueError, match=r'different config(.|\n)*train\.learning_rate'):
    train.train(changed, workdir)
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before


def test_rerun_of_a_finished_run_changes_nothing(short_run):
  config, workdir, summary = short_run
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  assert train.train(config, workdir) == summary
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before


class Killed(Exception):
  pass


@pytest.mark.parametrize('moe', [
    {'score': 'sigmoid', 'bias_update_rate': 0.05},  # router_bias collection in the state
    {'jitter': 0.2, 'noise_std': 0.5},  # the 'router' RNG stream
], ids=['aux_free_bias', 'jitter_noise'])
def test_kill_and_resume_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch, moe):
  config = tiny_config(data_dir, **{f'moe.{k}': v for k, v in moe.items()})
  train.train(config, tmp_path / 'straight')
  expected = read_metrics(tmp_path / 'straight')

  batch_steps = []
  real_train_batch = text.train_batch

  def train_batch(tokens, step, *args, **kwargs):
    batch_steps.append(step)
    if step == 6 and kill:  # steps 1-6 are logged, the last checkpoint is at step 4
      raise Killed
    return real_train_batch(tokens, step, *args, **kwargs)

  monkeypatch.setattr(text, 'train_batch', train_batch)
  kill = True
  with pytest.raises(Killed):
    train.train(config, tmp_path / 'resumed')
  assert [r['step'] for r in read_metrics(tmp_path / 'resumed')] == [1, 2, 3, 4, 5, 6]
  kill, batch_steps[:] = False, []
  summary = train.train(config, tmp_path / 'resumed')
  assert summary['resumed_from_step'] == 4
  assert batch_steps == [4, 5, 6, 7]  # steps 0-3 came from the checkpoint

  got = read_metrics(tmp_path / 'resumed')
  assert [r['step'] for r in got] == list(range(1, 9))
  assert [set(r) for r in got] == [set(r) for r in expected]
  for mine, theirs in zip(got, expected):
    for key in set(mine) - {'tokens_per_s'}:
      np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, err_msg=key)
  if 'bias_update_rate' in moe:  # the bias had moved by the checkpoint, so restoring it mattered
    state = ocp.StandardCheckpointer().restore(tmp_path / 'resumed/checkpoints/4/default')
    biases = jax.tree.leaves(state['model_state'])
    assert biases and all(np.abs(b).max() > 0 for b in biases)


def test_flops_and_params_by_hand():
  config = lm_tiny.get_config()
  config.data.update(seq_len=16, batch_size=2)
  config.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_every=2)
  config.moe.update(num_experts=4, d_ff=48, k=1, capacity_factor=1.25, group_by='sequence')
  # Per token: attention 8 d^2 + 4 L d per block; dense SwiGLU 6 d f; unembedding 2 d V.
  attention = 8 * 32**2 + 4 * 16 * 32
  dense = 6 * 32 * 64
  # MoE: router 2 d E; capacity round(16 * 1.25 / 4) = 5 slots x 4 experts per 16 tokens.
  moe = 2 * 32 * 4 + (5 * 4 / 16) * 6 * 32 * 48
  assert transformer.model_flops_per_token(config) == 2 * attention + dense + moe + 2 * 32 * 256
  # Active (the papers' convention): k = 1 expert per token, capacity padding not counted.
  active = 2 * 32 * 4 + 1 * 6 * 32 * 48
  assert transformer.model_flops_per_token(config, 'active') == (
      2 * attention + dense + active + 2 * 32 * 256)
  # Params: embeddings 2 V d, per block 4 d^2 + 2 d (norms), final norm d.
  shared = 2 * 256 * 32 + 2 * (4 * 32**2 + 2 * 32) + 32 + 3 * 32 * 64
  router, expert = 32 * 4, 3 * 32 * 48
  total, active = transformer.param_counts(config)
  assert (total, active) == (shared + router + 4 * expert, shared + router + 1 * expert)
  model = transformer.build(config)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32)))
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == total

  config.model.moe_every = 0
  assert transformer.param_counts(config) == (shared + 3 * 32 * 64,) * 2
  assert transformer.model_flops_per_token(config) == 2 * attention + 2 * dense + 2 * 32 * 256


def test_model_config_errors_name_the_field():
  config = lm_tiny.get_config()
  config.model.num_heads = 3
  with pytest.raises(ValueError, match=r'config\.model\.num_heads=3 .*divide d_model=128'):
    transformer.build(config)
  config = lm_tiny.get_config()
  config.model.moe_every = 5
  with pytest.raises(ValueError, match=r'config\.model\.moe_every=5'):
    transformer.build(config)
  config = lm_tiny.get_config()
  config.model.attention = 'flash'
  with pytest.raises(ValueError, match=r"config\.model\.attention='flash' .*'auto', 'xla', 'cudnn'"):
    transformer.build(config)


def test_attention_matches_jax_reference_and_auto_picks_xla_off_gpu():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 12, 4, 8), jnp.float32)
  ours = transformer.causal_attention(q, k, v, 'xla')
  reference = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
  # Row i of the output is a convex combination of v[:i + 1]: the first row is v[0] itself.
  np.testing.assert_allclose(ours[:, 0], v[:, 0], rtol=1e-6)
  assert jax.default_backend() == 'cpu'
  for dtype in (jnp.float32, jnp.bfloat16):
    assert transformer.attention_implementation('auto', dtype, 64) == 'xla'
  assert transformer.attention_implementation('cudnn', jnp.float32, 64) == 'cudnn'


def test_cli_parses_overrides(monkeypatch, tmp_path):
  seen = {}
  monkeypatch.setattr(train, 'train', lambda config, workdir: seen.update(
      config=config, workdir=workdir) or {})
  status = cli.main(['moe-jax', 'train', '--config', f'{lm_tiny.__file__}:dropless', '--workdir',
                     str(tmp_path), '--config.model.d_model=64', '--config.moe.k=2',
                     '--config.data.data_dir=/x/y'])
  assert status == 0 and seen['workdir'] == str(tmp_path)
  config = seen['config']
  assert (config.model.d_model, config.moe.k, config.moe.capacity_factor,
          config.data.data_dir) == (64, 2, None, '/x/y')
  assert cli.main(['moe-jax', 'nope']) == 2
