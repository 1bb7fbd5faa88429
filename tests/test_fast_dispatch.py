"""The 'blocked' fast path against the one-hot 'einsum' reference: outputs and gradients."""
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe_jax import routing
from moe_jax.moe import dispatch, fast_dispatch
from moe_jax.moe.experts import feed_forward
from moe_jax.moe.kernels import grouped_matmul as gm

G, N, D, F, E, K = 2, 16, 8, 12, 4, 2


def scatter_combine(router):
  """`router` with its plan's max_per_token dropped: the blocked combine then scatter-adds."""
  def routed(logits):
    out = router(logits)
    return out.replace(plan=out.plan.replace(max_per_token=None))
  return routed


ROUTERS = {
    'top_k': functools.partial(routing.token_choice, k=K, capacity_factor=1.0),
    'top_k_scatter_combine': scatter_combine(
        functools.partial(routing.token_choice, k=K, capacity_factor=1.0)),
    'dropless': functools.partial(routing.token_choice, k=K, capacity_factor=None),
    'expert_choice': functools.partial(routing.expert_choice, capacity_factor=2.0),
    'soft': routing.soft_routing,
}


def problem(seed, soft=False):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (G, N, D))
  logits = 2 * jax.random.normal(ks[1], (G, N, E, 2) if soft else (G, N, E))
  weights = (jax.random.normal(ks[2], (E, D, F)) / D**0.5,
             jax.random.normal(ks[3], (E, F, D)) / F**0.5,
             jax.random.normal(ks[4], (E, D, F)) / D**0.5)
  return logits, x, weights, jax.random.normal(ks[5], (G, N, D))


def layer(router, logits, x, weights, executor, **options):
  plan = jax.vmap(router)(logits).plan
  experts = lambda rows, matmul: feed_forward(matmul, rows, *weights)
  return dispatch.moe_apply(plan, x, experts, executor, **options)


def einsum_layer(router, logits, x, weights):
  return layer(router, logits, x, weights, 'einsum')


def blocked_layer(router, logits, x, weights):
  return layer(router, logits, x, weights, 'blocked', block_rows=8, backend='xla')


def value_and_grads(layer, logits, x, weights, ct):
  loss = lambda *args: jnp.vdot(layer(*args), ct)
  return layer(logits, x, weights), jax.grad(loss, argnums=(0, 1, 2))(logits, x, weights)


@pytest.mark.parametrize('name', list(ROUTERS))
def test_blocked_matches_einsum(name):
  router = ROUTERS[name]
  logits, x, weights, ct = problem(0, soft=name == 'soft')
  ref = jax.jit(functools.partial(value_and_grads, functools.partial(einsum_layer, router)))(
      logits, x, weights, ct)
  fast = jax.jit(functools.partial(value_and_grads, functools.partial(blocked_layer, router)))(
      logits, x, weights, ct)
  for got, want in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(fast[1][0]).max()) > 0  # the router gets a gradient


def test_row_plan_layout():
  logits, _, _, _ = problem(1)
  plan = jax.vmap(ROUTERS['top_k'])(logits).plan
  rows = fast_dispatch.slot_rows(plan, block_rows=8)
  layout = rows.layout
  group = np.asarray(layout.block_group)
  used = group[group >= 0]
  assert np.all(np.diff(used) >= 0) and np.all(group[len(used):] == -1)  # sorted, idle trailing
  for e in range(E):
    start, blocks = int(layout.group_start[e]), int(layout.group_blocks[e])
    assert np.all(group[start:start + blocks] == e) and (group == e).sum() == blocks
  # Each kept slot is one row, padding rows are empty; dest and row_token describe the same map.
  occupied = np.asarray(plan.slot_token < plan.num_tokens)
  token, dest = np.asarray(rows.row_token), np.asarray(rows.dest)
  assert (token < G * N).sum() == occupied.sum() and len(used) <= fast_dispatch.num_rows(
      G * N * K, E, 8) // 8
  for t in range(G * N):
    for r in dest[t][dest[t] < layout.num_rows]:
      assert token[r] == t


def test_grouped_matmul_xla_matches_per_expert_loop():
  layout = gm.BlockLayout(block_group=jnp.array([0, 0, 2, -1], jnp.int32),
                          group_start=jnp.array([0, 2, 2], jnp.int32),
                          group_blocks=jnp.array([2, 0, 1], jnp.int32), block_rows=4)
  ks = jax.random.split(jax.random.key(2), 3)
  lhs, rhs = jax.random.normal(ks[0], (16, 5)), jax.random.normal(ks[1], (3, 5, 6))
  ct = jax.random.normal(ks[2], (16, 6))
  expert = np.repeat(np.asarray(layout.block_group), 4)
  want = np.stack([lhs[r] @ rhs[e] if e >= 0 else np.zeros(6) for r, e in enumerate(expert)])
  np.testing.assert_allclose(gm.grouped_matmul(lhs, rhs, layout, 'xla'), want, rtol=1e-5,
                             atol=1e-5)
  loss = lambda l, r, fn: jnp.vdot(fn(l, r), ct)
  per_row = lambda l, r: jnp.where(jnp.asarray(expert)[:, None] >= 0,
                                   jnp.einsum('rk,rkn->rn', l, r[jnp.maximum(expert, 0)]), 0)
  blocked = lambda l, r: gm.grouped_matmul(l, r, layout, 'xla')
  got = jax.grad(loss, argnums=(0, 1))(lhs, rhs, blocked)
  ref = jax.grad(loss, argnums=(0, 1))(lhs, rhs, per_row)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


_band_order = jax.jit(gm.expert_band_order, static_argnums=(1, 2))  # one compile per example


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=8), st.integers(0, 3), st.integers(1, 5),
       st.integers(1, 4))
def test_expert_band_order_visits_every_tile_once_in_bands_within_experts(blocks, idle, n_iters,
                                                                           band):
  """Every (row, column) tile once; active tiles first, each expert's as one stretch, and each
  band of at most `band` rows of one expert sweeps all columns before the next band starts."""
  groups = np.concatenate([np.repeat(np.arange(len(blocks)), blocks), -np.ones(idle, int)])
  order = np.asarray(_band_order(jnp.asarray(groups, jnp.int32), n_iters, band))
  assert sorted(order.tolist()) == list(range(groups.size * n_iters))
  rows = order // n_iters
  visited = groups[rows]
  active = int((groups >= 0).sum()) * n_iters
  assert (visited[:active] >= 0).all() and (visited[active:] < 0).all()
  start = 0
  for expert, count in enumerate(blocks):  # experts in order, each one contiguous stretch
    stretch = rows[start:start + count * n_iters]
    assert (groups[stretch] == expert).all()
    for b in range(0, count, band):  # band b: rows first+b .. first+b+band-1, all columns
      size = min(band, count - b)
      part = stretch[b * n_iters:(b + size) * n_iters]
      assert len(set(part.tolist())) == size and part.min() == stretch.min() + b
    start += count * n_iters


INTERPRET_LAYOUT = dict(block_group=[0, 2, -1], group_start=[0, 1, 1], group_blocks=[1, 0, 1])


def block_problem(layout: dict, block_rows: int, k: int, n: int, seed: int):
  """(layout, lhs [M, k], rhs [E, k, n], g [M, n], active rows) in bf16; layout: BlockLayout's
  arrays as lists. Shared with tests/test_kernels_gpu.py."""
  layout = gm.BlockLayout(**{key: jnp.array(v, jnp.int32) for key, v in layout.items()},
                          block_rows=block_rows)
  m, experts = layout.num_rows, layout.group_start.shape[0]
  ks = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
  rhs = jax.random.normal(ks[1], (experts, k, n), jnp.bfloat16)
  g = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
  return layout, lhs, rhs, g, np.asarray(layout.row_active())


def _interpret_problem(n=256):
  return block_problem(INTERPRET_LAYOUT, 128, 128, n, seed=3)


def rel_err(got, want, rows=None) -> float:
  """|got - want| / |want| (Frobenius) in float32, over `rows` if given."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if rows is not None:
    got, want = got[rows], want[rows]
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _close(got, want, rows=None):
  assert rel_err(got, want, rows) <= 1e-2


def test_gmm_kernel_interpret():
  """The Mosaic GPU forward kernel, run by Pallas' GPU interpreter on CPU."""
  layout, lhs, rhs, _, rows = _interpret_problem()
  tiling = gm.Tiling(64, 128, stages=2, split='m')
  _close(gm.gmm(lhs, rhs, layout, backend='interpret', tiling=tiling), gm.gmm(lhs, rhs, layout),
         rows)


@pytest.mark.skipif(tuple(map(int, jax.__version__.split('.')[:2])) < (0, 11),
                    reason="this jax's GPU interpreter lacks transposed SMEM refs")
def test_backward_kernels_interpret():
  layout, lhs, rhs, g, rows = _interpret_problem(n=128)
  _close(gm.gmm(g, rhs, layout, transpose_rhs=True, backend='interpret'),
         gm.gmm(g, rhs, layout, transpose_rhs=True), rows)
  _close(gm.tgmm(lhs, g, layout, backend='interpret'), gm.tgmm(lhs, g, layout))


# Fused SwiGLU gate / up.

def _gate_up_problem(f=128):
  layout, x, w_gate, _, rows = block_problem(INTERPRET_LAYOUT, 128, 128, f, seed=4)
  ks = jax.random.split(jax.random.key(5), 2)
  w_up = jax.random.normal(ks[0], w_gate.shape, jnp.bfloat16)
  dh = jax.random.normal(ks[1], (x.shape[0], f), jnp.bfloat16)
  return layout, x, w_gate, w_up, dh, rows


def test_swiglu_grad_matches_autodiff():
  """The fused backward's element-wise part against jax.vjp of up * silu(gate)."""
  ks = jax.random.split(jax.random.key(6), 3)
  gate, up, dh = (jax.random.normal(k, (8, 16)) for k in ks)
  active = jnp.arange(8) < 6
  _, vjp = jax.vjp(lambda g, u: u * jax.nn.silu(g), gate, up)
  want = jnp.where(active[:, None], jnp.concatenate(vjp(dh), axis=1), 0)
  got = gm.swiglu_grad(jnp.concatenate([gate, up], axis=1), dh, active)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gate_up_kernel_interpret():
  """The fused gate/up kernel (SwiGLU epilogue, and gu for the backward) in the GPU interpreter."""
  layout, x, w_gate, w_up, _, rows = _gate_up_problem()
  h, gu = gm.gate_up(x, w_gate, w_up, layout, backend='interpret', tiling=gm.Tiling(64, 64, stages=2),
                     with_gu=True)
  gate = gm.gmm(x, w_gate, layout).astype(jnp.float32)
  up = gm.gmm(x, w_up, layout).astype(jnp.float32)
  _close(gu, jnp.concatenate([gate, up], axis=1), rows)
  _close(h, up * jax.nn.silu(gate), rows)


@pytest.mark.skipif(tuple(map(int, jax.__version__.split('.')[:2])) < (0, 11),
                    reason="this jax's GPU interpreter lacks transposed SMEM refs")
def test_gate_up_backward_interpret():
  """swiglu's custom VJP on the fused kernels (interpreter) against the unfused XLA path: output
  and the gradients of x and both weights, whose kernels are `gate_up_t` and `tgmm_gate_up`."""
  layout, x, w_gate, w_up, dh, rows = _gate_up_problem()
  tilings = (gm.Tiling(64, 64, stages=2), gm.Tiling(64, 64, tile_k=32, stages=2),
             gm.Tiling(64, 64, stages=2))

  def run(backend, fuse):
    f = lambda *a: gm.swiglu(*a, layout, backend, tilings=tilings, fuse=fuse)
    out, vjp = jax.vjp(f, x, w_gate, w_up)
    return (out, *vjp(dh))
  got, want = run('interpret', True), run('xla', False)
  _close(got[0], want[0], rows)
  _close(got[1], want[1], rows)
  _close(got[2], want[2])
  _close(got[3], want[3])
  assert float(jnp.abs(got[2][1]).max()) == 0  # expert 1 holds no rows: zero gradient


def test_fuse_gate_up_policy(monkeypatch):
  """'auto' fuses where it measured faster: f not a multiple of 256 (fine64's 1408)."""
  assert fast_dispatch.fuse_gate_up(1408) and not fast_dispatch.fuse_gate_up(14336)
  monkeypatch.setattr(fast_dispatch, 'FUSE_GATE_UP', True)
  assert fast_dispatch.fuse_gate_up(14336)
  monkeypatch.setattr(fast_dispatch, 'FUSE_GATE_UP', False)
  assert not fast_dispatch.fuse_gate_up(1408)


def _layout(block_rows=128):
  zeros = jnp.zeros((2,), jnp.int32)
  return gm.BlockLayout(block_group=zeros, group_start=zeros, group_blocks=zeros,
                        block_rows=block_rows)


def test_expert_width_no_kernel_tiles_is_padded_to_one_that_does():
  """DeepSeekMoE 2B's f = 880 (13.75 x 64) fits no kernel tiling: the kernels run 896; widths
  that fit, and the XLA backend, keep theirs."""
  mosaic = fast_dispatch.GroupedMatmul(_layout(), 'mosaic', (None,) * 3)
  assert gm.kernel_tilings((128, 1280), (1, 1280, 880), 128) is None
  assert mosaic.hidden_width(1280, 880) == 896
  assert gm.kernel_tilings((128, 1280), (1, 1280, 896), 128) is not None
  assert mosaic.hidden_width(2048, 1408) == 1408 and mosaic.hidden_width(4096, 14336) == 14336
  assert fast_dispatch.GroupedMatmul(_layout(), 'xla', (None,) * 3).hidden_width(1280, 880) == 880


class _PerExpertMatmul:
  """rows [E, n, K] @ w [E, K, N] per expert; `hidden_width` pads f by `extra` when given."""

  def __init__(self, extra=None):
    if extra is not None:
      self.hidden_width = lambda d, f: f + extra

  def __call__(self, rows, w):
    return jnp.einsum('enk,ekm->enm', rows, w)


@pytest.mark.parametrize('activation', ['swiglu', 'gelu'])
def test_padded_expert_width_gives_the_same_output_and_gradients(activation):
  """`experts.Experts` zero-pads the weights to a matmul's `hidden_width`: the output and the
  gradients of every real weight are those of the unpadded experts."""
  from moe_jax.moe.experts import Experts
  module = Experts(num_experts=3, d_model=16, d_ff=20, activation=activation)
  rows = jax.random.normal(jax.random.key(0), (3, 5, 16))
  params = module.init(jax.random.key(1), rows, _PerExpertMatmul())['params']
  ct = jax.random.normal(jax.random.key(2), (3, 5, 16))

  def loss(params, matmul):
    return jnp.sum(module.apply({'params': params}, rows, matmul) * ct)

  want, want_grads = jax.value_and_grad(loss)(params, _PerExpertMatmul())
  got, got_grads = jax.value_and_grad(loss)(params, _PerExpertMatmul(extra=12))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for name in want_grads:
    assert got_grads[name].shape == params[name].shape
    np.testing.assert_allclose(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
