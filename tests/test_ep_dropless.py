"""Dropless expert parallelism on 8 simulated CPU devices: ragged exchange + grouped matmuls.

(a) The ragged all-to-all stand-in ('padded', what XLA:CPU runs) against a NumPy model of
`jax.lax.ragged_all_to_all`'s documented semantics; the real op at least lowers in the layer.
(b) Every token-choice family, dropless with dispatch='blocked' (top-1, top-2, sigmoid aux-free,
fine-grained + shared), on the 1x8, 2x4 and 8x1 meshes equals one device: output, aux, gradients
w.r.t. params and inputs, the aux-free bias after an update.
(c) A training step on 2x4 with the exchange in chunks (num_chunks=2) equals the unchunked step on
one device. (d) Bad sizes are refused with the config field.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import routing
from moe_jax.moe import dispatch, ragged_exchange
from moe_jax.moe.layer import MoELayer
from moe_jax.moe.spec import MoESpec
from moe_jax.parallel import sharding
from tests.test_parallel import evaluate
from tests.test_parallel_train import TOLERANCE, config, run_steps

BATCH, SEQ, D_MODEL = 8, 8, 8
DROPLESS = dict(capacity_factor=None, dispatch='blocked', d_ff=16)
FAMILIES = {
    'top1': MoESpec(k=1, num_experts=8, **DROPLESS),
    'top2': MoESpec(k=2, num_experts=8, **DROPLESS),
    'aux_free': MoESpec(k=2, num_experts=8, score='sigmoid', bias_update_rate=0.01, **DROPLESS),
    'fine_shared': MoESpec(k=4, num_experts=16, num_shared_experts=1, activation='gelu',
                           **DROPLESS),
}
MESHES = [(2, 4), (1, 8), (8, 1)]


# --- (a) the exchange ---------------------------------------------------------------------------


def ragged_problem(seed: int, m: int, per_peer: int = 2, rows: int = 6, out_rows: int = 40):
  """Random valid arguments of a ragged all-to-all over m shards, stacked over shards [m, ...]:
  (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes). Slices may overlap
  in the operand; they land in random order, with gaps, on their receiver."""
  rng = np.random.default_rng(seed)
  slices = m * per_peer
  send = rng.integers(0, 3, (m, slices))
  input_offsets = rng.integers(0, rows - send + 1)
  output_offsets, recv = np.zeros_like(send), np.zeros_like(send)
  for d in range(m):
    incoming = [(j, d * per_peer + s) for j in range(m) for s in range(per_peer)]
    free = out_rows - sum(send[j, i] for j, i in incoming)
    gaps = np.diff(np.sort(rng.integers(0, free + 1, len(incoming) + 1)), prepend=0)
    at = 0
    for gap, (j, i) in zip(gaps, [incoming[n] for n in rng.permutation(len(incoming))]):
      output_offsets[j, i], at = at + gap, at + gap + send[j, i]
      recv[d, j * per_peer + i % per_peer] = send[j, i]
  operand = rng.normal(size=(m, rows, 3)).astype(np.float32)
  output = rng.normal(size=(m, out_rows, 3)).astype(np.float32)
  ints = lambda a: a.astype(np.int32)
  return operand, output, *map(ints, (input_offsets, send, output_offsets, recv))


def reference_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes):
  """NumPy, all shards at once ([m, ...] each), as `jax.lax.ragged_all_to_all` documents it:
  shard j's slice i goes to shard i // (S / m) at that shard's output_offsets[i]."""
  m, slices = send_sizes.shape
  result = output.copy()
  for j in range(m):
    for i in range(slices):
      d, s = divmod(i, slices // m)
      rows = operand[j, input_offsets[j, i]:input_offsets[j, i] + send_sizes[j, i]]
      assert len(rows) == recv_sizes[d, j * (slices // m) + s]
      result[d, output_offsets[j, i]:output_offsets[j, i] + len(rows)] = rows
  return result


def run_exchange(args, impl: str, **kwargs):
  """`ragged_exchange.ragged_all_to_all` by `impl` on stacked args, one shard per device."""
  m = args[0].shape[0]
  mesh = jax.make_mesh((m,), ('x',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:m])
  body = lambda *a: ragged_exchange.ragged_all_to_all(*(v[0] for v in a), axis_name='x',
                                                      impl=impl, **kwargs)[None]
  return np.asarray(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('x'),
                                          out_specs=P('x')))(*args))


def test_stand_in_matches_the_ops_semantics():
  args = ragged_problem(0, m=8)
  np.testing.assert_array_equal(run_exchange(args, 'padded'), reference_ragged_all_to_all(*args))
  assert ragged_exchange.default_impl() == 'padded'  # XLA:CPU cannot run the collective
  with ragged_exchange.force('ragged'):
    assert ragged_exchange.default_impl() == 'ragged'


# --- (b) the layer ------------------------------------------------------------------------------


def inputs(spec):
  x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, D_MODEL))
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  variables = MoELayer(spec).init(jax.random.key(0), x)
  if spec.bias_update_rate:  # a non-zero bias, so that it steers the selection
    variables['router_bias']['bias'] = 0.1 * jax.random.normal(jax.random.key(3),
                                                               (spec.num_experts,))
  return variables, x, cotangent


def sharded(spec, mesh):
  """jit(evaluate) of the layer (train=True, the bias mutable) on `mesh` (None: one device)."""
  mutable = ['router_bias'] if spec.bias_update_rate else False
  if mesh is None:
    layer = MoELayer(spec)
    apply = lambda v, x: layer.apply(v, x, train=True, mutable=mutable)
  else:
    apply = sharding.shard_moe_layer(MoELayer(spec), mesh, train=True, mutable=mutable)
  return jax.jit(functools.partial(evaluate, apply, mutable=mutable))


@functools.cache
def one_device(name):
  spec = FAMILIES[name]
  return sharded(spec, None)(*inputs(spec))


CASES = [(shape, name) for name in FAMILIES for shape in MESHES]


@pytest.mark.parametrize('shape,name', CASES, ids=[f'{d}x{e}-{n}' for (d, e), n in CASES])
def test_dropless_expert_parallel_matches_one_device(shape, name):
  spec = FAMILIES[name]
  got = sharded(spec, sharding.make_mesh(*shape))(*inputs(spec))
  for what, g, w in zip(('output', 'aux', 'grads', 'state'), got, one_device(name)):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5,
                                   err_msg=f'{name} on {shape}: {what}'), g, w)
  if spec.bias_update_rate:  # the update moved the bias, identically
    assert not np.allclose(got[3]['router_bias']['bias'], inputs(spec)[0]['router_bias']['bias'])


def test_dropless_rows_travel_by_ragged_all_to_all():
  """The real collective lowers in the sharded layer (XLA:CPU cannot compile it), forward and
  backward; by default the CPU runs the stand-in."""
  spec, mesh = FAMILIES['top2'], sharding.make_mesh(2, 4)
  hlo = lambda: sharded(spec, mesh).lower(*inputs(spec)).as_text()  # traced anew
  assert 'ragged_all_to_all' not in hlo()
  with ragged_exchange.force('ragged'):
    assert hlo().count('ragged_all_to_all') >= 4  # there and back, forward and backward


def test_one_shard_expert_axis_exchanges_nothing():
  """On an 8x1 mesh every device holds every expert: the layer runs its one-device dispatcher,
  with no exchange in its program (and equals one device: the test above, 8x1)."""
  spec, mesh = FAMILIES['top2'], sharding.make_mesh(8, 1)
  with ragged_exchange.force('ragged'):
    hlo = sharded(spec, mesh).lower(*inputs(spec)).as_text()
  assert 'all_to_all' not in hlo  # neither ragged_all_to_all nor the stand-in's all_to_all


# --- (c) training -------------------------------------------------------------------------------


def test_dropless_train_step_matches_one_device():
  """test_parallel_train's LM cut to its one (MoE) block, dropless, aux-free: a step on 2x4 in 2
  chunks (each shard's 16 tokens in two exchanges) equals the unchunked step on one device."""
  def step(mesh, chunks):
    cfg = config(mesh, 'aux_free', **{'moe.capacity_factor': None, 'moe.dispatch': 'blocked',
                                      'moe.num_chunks': chunks, 'model.num_layers': 1,
                                      'model.moe_every': 1})
    return jax.device_get(run_steps(cfg, num_steps=1))
  got, want = step((2, 4), chunks=2), step((1, 1), chunks=1)
  jax.tree.map(functools.partial(np.testing.assert_allclose, **TOLERANCE), got, want)
  assert np.abs(got[0]['model_state']['router_bias']['block_0']['moe']['bias']).max() > 0


# --- (d) sizes ----------------------------------------------------------------------------------


def test_experts_must_divide_over_the_expert_axis():
  spec = FAMILIES['top2'].replace(num_experts=6)
  x, mesh = jnp.zeros((BATCH, SEQ, D_MODEL)), sharding.make_mesh(2, 4)
  error = r'config\.mesh\.expert=4 .*does not divide config\.moe\.num_experts=6'
  with pytest.raises(ValueError, match=error):  # checked before anything runs
    sharding.shard_moe_layer(MoELayer(spec), mesh)({}, x)

  def body(x):  # the dispatcher on its own
    plan = routing.token_choice(jnp.zeros((SEQ, 6)), k=2, capacity_factor=None).plan
    d = dispatch.dispatcher(jax.tree.map(lambda a: a[None], plan), 'blocked', expert_axis='expert')
    return d.dispatch(x)
  with pytest.raises(ValueError, match=error):
    jax.jit(jax.shard_map(body, mesh=mesh, in_specs=sharding.BATCH, out_specs=sharding.BATCH))(x)


@pytest.mark.parametrize('changes, error', [
    (dict(num_chunks=2, capacity_factor=1.0), r'config\.moe\.num_chunks=2 is invalid: chunks '
                                              r'split dropless routing only'),
    (dict(num_chunks=0), r'config\.moe\.num_chunks=0 is invalid'),
])
def test_bad_num_chunks(changes, error):
  with pytest.raises(ValueError, match=error):
    FAMILIES['top2'].replace(**changes)
