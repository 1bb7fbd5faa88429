"""FSDP and tensor parallelism on 8 simulated CPU devices: sharded == one device.

The tiny LM (block 0 dense, block 1 MoE with 8 experts; d_model 32, 2 heads, batch 8 x 16 tokens,
group_by='sequence', so a shard's routing equals the whole batch's) trains 3 steps on a mesh laid
out by the logical rules (`moe_jax/parallel/rules.py`) and on one device. Losses and metrics at
every step, and the whole state (params, AdamW moments, router bias) after steps 1 and 3, agree to
float32 tolerance. After step 1 Adam's first moment is (1 - b1) * the clipped gradient, so that
comparison is one of the gradients of every parameter. Meshes (data, fsdp, expert, tensor):
fsdp=8 (ZeRO-3 alone), data=2 x fsdp=2 x expert=2, fsdp=2 x expert=2 x tensor=2 (Megatron heads
and FFN width); capacity routing and dropless ('blocked'). The layout itself is checked too: with
fsdp=8 every large parameter and its optimizer moments are sharded over 'fsdp'; with tensor=2
attention heads and the dense FFN width are sharded over 'tensor'; and a state saved on one mesh
restores onto another.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax.parallel import sharding
from moe_jax.run import train
from tests.test_parallel_train import STATE_TOLERANCE, TOLERANCE
from tests.test_train import tiny_config

ROUTING = {
    'capacity': {'moe.capacity_factor': 1.25, 'moe.group_by': 'sequence'},
    'dropless': {'moe.capacity_factor': None, 'moe.dispatch': 'blocked',
                 'moe.group_by': 'sequence'},
}
CASES = [
    ({'fsdp': 8}, 'capacity'),
    ({'data': 2, 'fsdp': 2, 'expert': 2}, 'dropless'),
    ({'fsdp': 2, 'expert': 2, 'tensor': 2}, 'capacity'),
    ({'fsdp': 2, 'expert': 2, 'tensor': 2}, 'dropless'),
]
BIG = 1024  # elements: every parameter at least this large must be sharded under fsdp=8
B1 = 0.9  # AdamW's b1 (optax's default, `train.make_optimizer`)


def config(mesh: dict, routing: str):
  return tiny_config(None, **{'data.seq_len': 16, 'moe.num_experts': 8, **ROUTING[routing],
                              **{f'mesh.{axis}': mesh.get(axis, 1) for axis in sharding.AXES}})


def run_steps(config, num_steps=3):
  """(setup, [state after each step], [metrics]) of `num_steps` train steps on random batches."""
  setup = train.check_config(config)
  task, cfg, model, mesh = setup
  state = train.init_state(model, cfg, jax.random.key(0), task.input_spec(config), mesh)
  batches = jax.random.randint(jax.random.key(1), (num_steps, config.data.batch_size,
                                                   config.data.seq_len + 1), 0, 256)
  states, metrics = [], []
  for i, batch in enumerate(batches):
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, step_metrics = train.train_step(state, batch, jax.random.key(i), task=task,
                                           model=model, cfg=cfg, mesh=mesh)
    states.append(jax.tree.map(jnp.copy, state))  # the next step donates `state`
    metrics.append(step_metrics)
  return setup, states, metrics


@functools.cache
def one_device(routing):
  _, states, metrics = run_steps(config({}, routing))
  return jax.device_get(states), jax.device_get(metrics)


def first_moment(state):
  """Adam's mu of `state` (`train.make_optimizer`: clip, then adamw's scale_by_adam first)."""
  return state['opt_state'][1][0].mu


def specs(tree):
  return jax.tree.map(lambda leaf: leaf.sharding.spec, tree)


@pytest.mark.parametrize('mesh, routing', CASES, ids=[
    '_'.join(f'{axis}{size}' for axis, size in mesh.items()) + f'-{routing}'
    for mesh, routing in CASES])
def test_fsdp_tensor_steps_match_one_device(mesh, routing, tmp_path):
  (task, cfg, model, devices), states, metrics = run_steps(config(mesh, routing))
  assert dict(devices.shape) == {axis: mesh.get(axis, 1) for axis in sharding.AXES}
  want_states, want_metrics = one_device(routing)
  jax.tree.map(functools.partial(np.testing.assert_allclose, **TOLERANCE),
               jax.device_get(metrics), want_metrics)
  for step in (0, 2):  # after steps 1 and 3
    jax.tree.map(functools.partial(np.testing.assert_allclose, **STATE_TOLERANCE),
                 jax.device_get(states[step]), want_states[step])
  # The gradients of step 1 (clipped alike: grad_norm agrees above).
  jax.tree.map(lambda got, want: np.testing.assert_allclose(
      np.asarray(got) / (1 - B1), want / (1 - B1), rtol=1e-4, atol=1e-5),
      first_moment(states[0]), first_moment(want_states[0]))

  state = states[-1]
  params, mu = state['params'], first_moment(state)
  assert specs(mu) == specs(params) == specs(state['opt_state'][1][0].nu)  # moments follow params
  if mesh.get('fsdp') == 8:  # ZeRO-3: every large weight (and its moments) over 'fsdp'
    big = {jax.tree_util.keystr(path): leaf.sharding.spec for path, leaf in
           jax.tree_util.tree_leaves_with_path(params) if leaf.size >= BIG}
    assert len(big) >= 8 and all('fsdp' in str(spec) for spec in big.values()), big
    w_in = params['block_1']['moe']['experts']['w_in']  # [E, d, f]: d over fsdp
    assert w_in.addressable_shards[0].data.shape == (8, 32 // 8, 64)
  if mesh.get('tensor') == 2:  # Megatron: heads and FFN width over 'tensor'
    attention, ffn = params['block_0']['attention'], params['block_0']['ffn']
    assert attention['query']['kernel'].sharding.spec == P('fsdp', 'tensor')  # [d, H, D]
    assert attention['out']['kernel'].sharding.spec == P('tensor', None, 'fsdp')  # [H, D, d]
    assert ffn['w_in'].sharding.spec == P('fsdp', 'tensor')  # column-parallel
    assert ffn['w_out'].sharding.spec == P('tensor', 'fsdp')  # row-parallel
    experts = params['block_1']['moe']['experts']['w_in']
    assert experts.sharding.spec == P('expert', 'fsdp', 'tensor')
    assert experts.addressable_shards[0].data.shape == (4, 16, 32)

    # Saved on this mesh, restored onto fsdp=8 (orbax reads into the target's layout).
    with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
      manager.save(3, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
      other = config({'fsdp': 8}, routing)
      task8, cfg8, model8, mesh8 = train.check_config(other)
      target = train.abstract_state(model8, cfg8, task8.input_spec(other), mesh8)
      restored = manager.restore(3, args=ocp.args.StandardRestore(target))
    w_in = restored['params']['block_1']['moe']['experts']['w_in']
    assert dict(w_in.sharding.mesh.shape)['fsdp'] == 8 and w_in.sharding.spec == P(None, 'fsdp')
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
