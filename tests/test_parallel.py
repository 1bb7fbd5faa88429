"""Expert + data parallelism on 8 simulated CPU devices: sharded == unsharded.

Every router family runs on the 2x4 (data, expert) mesh (hash routing, which needs token ids, in
tests/test_parallel_train.py); switch, dropless, aux-free and the global-batch balance loss also on 1x8
(one expert per device), top-2, expert choice and dropless also on 8x1 (pure data parallelism). Each case
checks the forward output, aux losses and metrics, and gradients w.r.t. params and inputs, against
the single-device layer: on the whole batch for group_by='sequence', and on each device's sub-batch
(outputs concatenated, aux averaged, load summed) for 'position' / 'batch' / dropless (see the
`moe_jax.parallel.sharding` docstring). Aux-free: the bias after one update equals the unsharded one.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import routing
from moe_jax.moe.layer import MoELayer
from moe_jax.moe.spec import MoESpec
from moe_jax.parallel import multihost, sharding

BATCH, SEQ, D_MODEL = 16, 8, 16
BASE = dict(num_experts=8, d_ff=32)
CASES = {  # name: (spec, compared against the whole batch?)
    'switch': (MoESpec(k=1, capacity_factor=1.25, **BASE), True),
    'top2': (MoESpec(k=2, capacity_factor=1.0, dispatch='einsum', group_by='batch',
                     priority='batch', **BASE), False),
    'dropless': (MoESpec(k=2, capacity_factor=None, dispatch='ragged', **BASE), False),
    'expert_choice': (MoESpec(router='expert_choice', capacity_factor=2.0, group_by='position',
                              **BASE), False),
    'soft': (MoESpec(router='soft', capacity_factor=1.0, slots_per_expert=2, **BASE), True),
    'shared': (MoESpec(k=2, capacity_factor=1.5, num_experts=8, d_ff=16, num_shared_experts=1,
                       activation='gelu'), True),
    'aux_free': (MoESpec(k=2, capacity_factor=1.25, score='sigmoid', bias_update_rate=0.01,
                         **BASE), True),
    'sinkhorn': (MoESpec(router='sinkhorn', k=2, capacity_factor=1.5, group_by='position',
                         **BASE), False),
    'base': (MoESpec(router='base', capacity_factor=1.0, group_by='position', **BASE), False),
    # the load-balancing loss over the global batch equals the one-device loss over all of it
    'global_balance': (MoESpec(k=2, capacity_factor=1.25, balance_over='global',
                               load_balancing_coef=1.0, **BASE), True),
    'cosine_group_limited': (MoESpec(k=2, capacity_factor=1.25, router_logits='cosine',
                                     num_expert_groups=4, groups_per_token=2, score='sigmoid',
                                     bias_update_rate=0.01, **BASE), True),
}
MESHES = [((2, 4), name) for name in CASES] + [
    ((1, 8), 'switch'), ((1, 8), 'dropless'), ((1, 8), 'aux_free'), ((1, 8), 'global_balance'),
    ((8, 1), 'top2'), ((8, 1), 'expert_choice'), ((8, 1), 'dropless')]


def inputs(name):
  spec, _ = CASES[name]
  x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, D_MODEL))
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  variables = MoELayer(spec).init(jax.random.key(0), x)
  if spec.bias_update_rate:  # a non-zero bias, so that it steers the selection
    variables['router_bias']['bias'] = 0.1 * jax.random.normal(jax.random.key(3), (8,))
  return variables, x, cotangent


def per_shard(apply, num_shards):
  """The unsharded equivalent of 'position' / 'batch' grouping: `apply` on each sub-batch."""
  def run(variables, x):
    ys, aux = jax.lax.map(lambda xs: apply(variables, xs),
                          x.reshape(num_shards, -1, *x.shape[1:]))
    load = aux['metrics']['tokens_per_expert'].sum(0)
    aux = jax.tree.map(lambda a: a.mean(0), aux)
    aux['metrics']['tokens_per_expert'] = load
    aux['metrics']['max_over_mean_load'] = routing.load_imbalance(load)
    return ys.reshape(x.shape), aux
  return run


def evaluate(apply, variables, x, cotangent, mutable):
  """Output, aux, gradients w.r.t. (params, x) of sum(y * cotangent) + aux loss [, new state]."""
  def loss(params, x):
    out = apply({**variables, 'params': params}, x)
    (y, aux), state = out if mutable else (out, {})
    return jnp.sum(y * cotangent) + aux['loss'], (y, aux, state)
  grads, (y, aux, state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
  return y, aux, grads, state


@functools.cache
def reference(name):
  """Single-device results (compiled once per router, shared by all meshes)."""
  spec, whole_batch = CASES[name]
  mutable = ['router_bias'] if spec.bias_update_rate else False
  layer = MoELayer(spec)
  apply = lambda v, x: layer.apply(v, x, train=True, mutable=mutable)
  if not whole_batch:
    apply = per_shard(apply, jax.device_count())
  return jax.jit(functools.partial(evaluate, apply, mutable=mutable))(*inputs(name))


@pytest.mark.parametrize('shape,name', MESHES, ids=[f'{d}x{e}-{n}' for (d, e), n in MESHES])
def test_sharded_layer_matches_single_device(shape, name):
  spec, _ = CASES[name]
  mutable = ['router_bias'] if spec.bias_update_rate else False
  mesh = sharding.make_mesh(*shape)
  apply = sharding.shard_moe_layer(MoELayer(spec), mesh, train=True, mutable=mutable)
  got = jax.jit(functools.partial(evaluate, apply, mutable=mutable))(*inputs(name))
  want = reference(name)
  assert got[0].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 3)
  names = ('output', 'aux', 'grads', 'state')
  for what, g, w in zip(names, got, want):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5,
                                   err_msg=f'{name} on {shape}: {what}'), g, w)
  if spec.bias_update_rate:  # the update moved the bias, identically
    assert not np.allclose(got[3]['router_bias']['bias'], inputs(name)[0]['router_bias']['bias'])


def test_param_specs_and_placement():
  spec = CASES['shared'][0].replace(bias_update_rate=0.01, score='sigmoid')
  x = jnp.zeros((BATCH, SEQ, D_MODEL))
  mesh = sharding.make_mesh(2, 4)
  variables = sharding.init_variables(MoELayer(spec), mesh, jax.random.key(0), x)
  specs = sharding.param_specs(variables)
  assert specs['params']['experts'] == {k: P('expert') for k in ('w_in', 'w_out')}
  assert specs['params']['shared_experts'] == {k: P() for k in ('w_in', 'w_out')}
  assert specs['params']['router'] == {'kernel': P()}
  assert specs['router_bias'] == {'bias': P()}
  w_in = variables['params']['experts']['w_in']
  assert w_in.sharding.spec == P('expert') and w_in.addressable_shards[0].data.shape == (2, 16, 16)
  np.testing.assert_array_equal(w_in, MoELayer(spec).init(jax.random.key(0), x)['params']
                                ['experts']['w_in'])


def test_mesh_size_must_match_device_count():
  with pytest.raises(ValueError, match=r'config\.mesh\.data=3 \* config\.mesh\.expert=2 = 6 does '
                     r'not match the 8 devices.*data=4, expert=2'):
    sharding.make_mesh(3, 2)
  with pytest.raises(ValueError, match=r'config\.mesh\.expert=0'):
    sharding.make_mesh(8, 0)


def test_experts_must_divide_over_expert_axis():
  mesh = sharding.make_mesh(1, 3, devices=jax.devices()[:3])
  with pytest.raises(ValueError, match=r'config\.mesh\.expert=3 does not divide '
                     r'config\.moe\.num_experts=8'):
    sharding.check_mesh(MoESpec(num_experts=8), mesh, batch_size=3)


def test_batch_must_divide_over_devices():
  with pytest.raises(ValueError, match=r'config\.data\.batch_size=12 is not divisible by '
                     r'config\.mesh\.data=2 \* config\.mesh\.expert=4 = 8'):
    sharding.check_mesh(MoESpec(num_experts=8), sharding.make_mesh(2, 4), batch_size=12)


def test_local_groups_too_small_for_capacity():
  spec = MoESpec(router='expert_choice', capacity_factor=1.0, num_experts=8, group_by='position')
  with pytest.raises(ValueError, match=r"config\.mesh\.data=2, config\.mesh\.expert=4 each "
                     r"device routes group_by='position' groups of 2 tokens.*capacity_factor"):
    sharding.check_mesh(spec, sharding.make_mesh(2, 4), batch_size=16, seq_len=8)
  sharding.check_mesh(spec, sharding.make_mesh(2, 4), batch_size=64, seq_len=8)  # 8 tokens: fine


class FakeInitialize:
  def __init__(self):
    self.calls = []

  def __call__(self, **kwargs):
    self.calls.append(kwargs)


@pytest.mark.parametrize('environ,enable,expected', [
    ({}, None, None),  # one process: no-op
    ({'SLURM_STEP_NUM_TASKS': '1', 'SLURM_PROCID': '0'}, None, None),
    ({'SLURM_STEP_NUM_TASKS': '4', 'SLURM_PROCID': '2'}, None,
     {'num_processes': None, 'process_id': None}),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, None, {'num_processes': None, 'process_id': None}),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1'}, None, {'num_processes': None, 'process_id': None}),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1', 'MOE_JAX_DISTRIBUTED': '0'}, None, None),
    ({}, True, {'num_processes': None, 'process_id': None}),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '2',
      'JAX_PROCESS_ID': '1'}, None,
     {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}),
])
def test_initialize_from_env(environ, enable, expected):
  fake = FakeInitialize()
  started = multihost.initialize_from_env(enable=enable, environ=environ, initialize=fake)
  assert started == (expected is not None)
  assert fake.calls == ([] if expected is None else [expected])


def test_initialize_explicit_coordinator_needs_process_fields():
  fake = FakeInitialize()
  with pytest.raises(ValueError, match=r'process_id is not: pass --process_id or set '
                     r'\$JAX_PROCESS_ID'):
    multihost.initialize_from_env('10.0.0.1:1234', num_processes=2, environ={}, initialize=fake)
  multihost.initialize_from_env('10.0.0.1:1234', 2, 0, environ={}, initialize=fake)
  assert fake.calls == [{'coordinator_address': '10.0.0.1:1234', 'num_processes': 2,
                         'process_id': 0}]
