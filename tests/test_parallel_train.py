"""Training on a mesh of 8 simulated CPU devices (config.mesh): sharded == one device.

(a) Three train steps of the LM on the 2x4 and 8x1 (data x expert) meshes equal the one-device
steps (losses, metrics, params, optimizer state, router bias) for token choice by sequence, for
an aux-free router, whose bias is identical on every shard, and for hash routing (by token id); (b) a checkpoint written on 2x4 resumes
on 4x2 and the run continues as the uninterrupted one; (c) a bad mesh config fails before any work;
(d) `moe-jax train` trains the ViT (each image routed alone) on 2x4 as on one device.
"""
import functools
import logging
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import vit_digits
from moe_jax import cli
from moe_jax.data import text
from moe_jax.parallel import sharding
from moe_jax.run import train
from tests.test_train import read_metrics, tiny_config

ROUTERS = {
    'token_choice': {'moe.group_by': 'sequence'},
    'aux_free': {'moe.k': 2, 'moe.score': 'sigmoid', 'moe.bias_update_rate': 0.05},
    'hash': {'moe.router': 'hash', 'moe.capacity_factor': None},  # routes by the token ids
}
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Parameters after AdamW steps: Adam divides each gradient by its own running scale, so a gradient
# near zero, summed in another order on another mesh, can move its weight by a visible fraction of
# the learning rate. Seen: one element of 16,384 in an expert's w_gate, 2.5e-5 apart after three
# aux-free steps (on one CPU host; the CI host stayed under 1e-5). Weights are ~0.4 in scale.
STATE_TOLERANCE = dict(rtol=1e-5, atol=1e-4)


def config(mesh, router='token_choice', data_dir=None, **overrides):
  """test_train's tiny LM with 8 experts and 16-token sequences on `mesh` = (data, expert)."""
  return tiny_config(data_dir, **{'data.seq_len': 16, 'moe.num_experts': 8, 'mesh.data': mesh[0],
                                  'mesh.expert': mesh[1], **ROUTERS[router], **overrides})


def run_steps(config, num_steps=3):
  """(state, [metrics]) after `num_steps` train steps on random batches, on config.mesh."""
  task, cfg, model, mesh = train.check_config(config)
  state = train.init_state(model, cfg, jax.random.key(0), task.input_spec(config), mesh)
  batch_size, seq_len = config.data.batch_size, config.data.seq_len
  batches = jax.random.randint(jax.random.key(1), (num_steps, batch_size, seq_len + 1), 0, 256)
  metrics = []
  for i, batch in enumerate(batches):
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, step_metrics = train.train_step(state, batch, jax.random.key(i), task=task,
                                           model=model, cfg=cfg, mesh=mesh)
    metrics.append(step_metrics)
  return state, metrics


@functools.cache
def one_device(router):
  return jax.device_get(run_steps(config((1, 1), router)))


# Every router on a 2x4 mesh (data and expert axes both split); data parallelism alone (8x1) once.
SHARDED = [((2, 4), router) for router in ROUTERS] + [((8, 1), 'token_choice')]


@pytest.mark.parametrize('shape, router', SHARDED,
                         ids=[f'{d}x{e}-{router}' for (d, e), router in SHARDED])
def test_sharded_steps_match_one_device(shape, router):
  state, metrics = run_steps(config(shape, router))
  mesh = sharding.make_mesh(*shape)
  laid_out = jax.tree.map(lambda leaf, want: leaf.sharding.is_equivalent_to(want, leaf.ndim),
                          state, sharding.param_shardings(state, mesh))
  assert all(jax.tree.leaves(laid_out))  # experts over 'expert', the rest replicated
  w_in = state['params']['block_1']['moe']['experts']['w_in']
  assert w_in.addressable_shards[0].data.shape[0] == 8 // shape[1]

  want_state, want_metrics = one_device(router)
  jax.tree.map(functools.partial(np.testing.assert_allclose, **STATE_TOLERANCE),
               jax.device_get(state), want_state)
  jax.tree.map(functools.partial(np.testing.assert_allclose, **TOLERANCE),
               jax.device_get(metrics), want_metrics)
  if router == 'aux_free':  # the bias moved, by the same sign update on every shard
    bias = state['model_state']['router_bias']['block_1']['moe']['bias']
    copies = [np.asarray(shard.data) for shard in bias.addressable_shards]
    assert len(copies) == 8 and all(np.array_equal(copy, copies[0]) for copy in copies)
    assert np.abs(copies[0]).max() > 0
    np.testing.assert_array_equal(copies[0], one_device(router)[0]['model_state']['router_bias']
                                  ['block_1']['moe']['bias'])


def test_checkpoint_resumes_on_another_mesh(data_dir, tmp_path, caplog):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  train.train(config((2, 4), 'aux_free', data_dir), straight)  # checkpoints at steps 4 and 8
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '8')  # as if killed after the 2x4 checkpoint at step 4
  (resumed / 'summary.json').unlink()

  resumed_config = config((4, 2), 'aux_free', data_dir)
  with caplog.at_level(logging.INFO, logger=train.__name__):
    summary = train.train(resumed_config, resumed)
  assert summary['resumed_from_step'] == 4
  assert ('resuming on mesh (data, fsdp, expert, tensor) = (4, 1, 2, 1) a run started on '
          '(2, 1, 4, 1)') in caplog.text
  assert (resumed / 'config.json').read_text() == (straight / 'config.json').read_text()
  expected, got = read_metrics(straight), read_metrics(resumed)
  assert [r['step'] for r in got] == list(range(1, 9))
  for mine, theirs in zip(got, expected):
    assert set(mine) == set(theirs)
    for key in set(mine) - {'tokens_per_s'}:
      np.testing.assert_allclose(mine[key], theirs[key], **TOLERANCE, err_msg=key)

  # The 2x4 checkpoint laid out on 4x2: 4 experts per device.
  task, cfg, model, mesh = train.check_config(resumed_config)
  target = train.abstract_state(model, cfg, task.input_spec(resumed_config), mesh)
  with ocp.CheckpointManager(straight / 'checkpoints') as manager:
    state = manager.restore(4, args=ocp.args.StandardRestore(target))
  w_in = state['params']['block_1']['moe']['experts']['w_in']
  assert w_in.sharding.mesh.shape == {'data': 4, 'fsdp': 1, 'expert': 2, 'tensor': 1}
  assert w_in.addressable_shards[0].data.shape == (4, 32, 64)


@pytest.mark.parametrize('overrides, error', [
    ({'mesh.data': 3, 'mesh.expert': 2},
     r'config\.mesh\.data=3 \* config\.mesh\.expert=2 = 6 does not match the 8 devices'),
    ({'moe.num_experts': 6},
     r'config\.mesh\.expert=4 does not divide config\.moe\.num_experts=6'),
    ({'data.batch_size': 12}, r'batch_size=12 is not divisible by config\.mesh\.data=2 \* '
                              r'config\.mesh\.expert=4 = 8'),
    ({'mesh.model': 2}, r"config\.mesh has unknown field\(s\) \['model'\]"),
    ({'moe.router': 'expert_choice', 'moe.group_by': 'position', 'moe.capacity_factor': 1.0},
     r"config\.mesh\.data=2, config\.mesh\.expert=4 each device routes group_by='position' "
     r'groups of 1 tokens'),
], ids=['device_count', 'num_experts', 'batch_size', 'unknown_field', 'capacity'])
def test_bad_mesh_config_fails_before_any_work(tmp_path, monkeypatch, overrides, error):
  def no_work(*args, **kwargs):
    raise AssertionError('train() went past its config checks')

  monkeypatch.setattr(text, 'load_text_splits', no_work)
  with pytest.raises(ValueError, match=error):
    train.train(config((2, 4), **overrides), tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_absent_mesh_section_is_one_device():
  cfg = config((2, 4))
  del cfg['mesh']
  assert train.check_config(cfg).mesh.devices.shape == (1, 1, 1, 1)


VIT = ['--config.data.batch_size=32', '--config.model.d_model=32', '--config.model.num_layers=2',
       '--config.model.num_heads=2', '--config.model.d_ff=64', '--config.moe.num_experts=4',
       '--config.moe.d_ff=64', '--config.moe.slots_per_expert=4', '--config.train.steps=4',
       '--config.train.warmup_steps=1', '--config.train.log_every=1',
       '--config.train.eval_every=2', '--config.train.checkpoint_every=2',
       '--config.train.progress=False']  # test_vit's tiny Soft MoE ViT, 4 steps


def test_vit_trains_on_a_mesh_as_on_one_device(image_data_dir, tmp_path):
  args = ['--config', vit_digits.__file__, f'--config.data.data_dir={image_data_dir}', *VIT]
  mesh = ['--config.mesh.data=2', '--config.mesh.expert=4']
  assert cli.main(['moe-jax', 'train', '--workdir', str(tmp_path / '2x4'), *args, *mesh]) == 0
  assert cli.main(['moe-jax', 'train', '--workdir', str(tmp_path / '1x1'), *args]) == 0
  expected, got = read_metrics(tmp_path / '1x1'), read_metrics(tmp_path / '2x4')
  assert [r['step'] for r in got] == [1, 2, 3, 4] and 'eval_accuracy' in got[-1]
  for mine, theirs in zip(got, expected):
    assert set(mine) == set(theirs)
    for key in set(mine) - {'tokens_per_s'}:
      np.testing.assert_allclose(mine[key], theirs[key], **TOLERANCE, err_msg=key)
  restore = lambda run: ocp.StandardCheckpointer().restore(tmp_path / run / 'checkpoints/4/default')
  jax.tree.map(functools.partial(np.testing.assert_allclose, **TOLERANCE), restore('2x4'),
               restore('1x1'))
