"""Every candidate tiling of the Mosaic GPU grouped-matmul kernels against `jax.lax.ragged_dot`.

Needs a Hopper GPU: run on the device machine (`pytest tests/test_kernels_gpu.py`). On CPU the
same kernels are tested through Pallas' GPU interpreter (tests/test_fast_dispatch.py), which cannot
run the cluster (multicast) tilings.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe.kernels import grouped_matmul as gm
from tests.test_fast_dispatch import block_problem, rel_err

pytestmark = pytest.mark.skipif(gm.default_backend() != 'mosaic',
                                reason='the Mosaic GPU kernels need a Hopper GPU')

BLOCK_ROWS, SIZE = 256, 512  # fit every candidate tiling, clusters included


def _problem():
  """Expert 0: two blocks, expert 1: none, expert 2: one block, then one idle block."""
  layout = dict(block_group=[0, 0, 2, -1], group_start=[0, 2, 2], group_blocks=[2, 0, 1])
  return block_problem(layout, BLOCK_ROWS, SIZE, SIZE, seed=0)


def _check_all(tilings, errors_of):
  """Runs every tiling; fails listing each one that raised or is off by more than 1e-2."""
  bad = {}
  for tiling in tilings:
    try:
      errors = errors_of(tiling)
      if max(errors) > 1e-2:
        bad[str(tiling)] = errors
    except Exception as e:  # pylint: disable=broad-except
      bad[str(tiling)] = f'{type(e).__name__}: {str(e)[:300]}'
  assert len(tilings) > 1 and not bad, bad


def test_gmm_tilings():
  layout, lhs, rhs, g, rows = _problem()
  want = gm.gmm(lhs, rhs, layout)
  want_t = gm.gmm(g, rhs, layout, transpose_rhs=True)
  _check_all(gm.fitting(gm.GMM_TILINGS, BLOCK_ROWS, SIZE, SIZE), lambda t: (
      rel_err(gm.gmm(lhs, rhs, layout, backend='mosaic', tiling=t), want, rows),
      rel_err(gm.gmm(g, rhs, layout, transpose_rhs=True, backend='mosaic', tiling=t), want_t,
               rows)))


def test_tgmm_tilings():
  layout, lhs, _, g, _ = _problem()
  want = gm.tgmm(lhs, g, layout)

  def errors(t):
    got = gm.tgmm(lhs, g, layout, backend='mosaic', tiling=t)
    empty = float(np.abs(np.asarray(got[1], np.float32)).max())  # the empty expert: zeros
    return rel_err(got, want), empty
  _check_all(gm.fitting(gm.TGMM_TILINGS, SIZE, SIZE), errors)


def _gate_up_problem():
  layout, x, w_gate, g, rows = _problem()
  w_up = (w_gate[:, ::-1] * 0.5 + 0.25).astype(w_gate.dtype)  # another weight, not a multiple
  gu = jnp.concatenate([g, g[::-1]], axis=1)
  return layout, x, w_gate, w_up, gu, rows


def test_gate_up_tilings():
  """Every fused gate/up tiling: h (SwiGLU epilogue) and gu = [gate | up] against two gmms."""
  layout, x, w_gate, w_up, _, rows = _gate_up_problem()
  gate = gm.gmm(x, w_gate, layout).astype(jnp.float32)
  up = gm.gmm(x, w_up, layout).astype(jnp.float32)
  want_h, want_gu = up * jax.nn.silu(gate), jnp.concatenate([gate, up], axis=1)

  def errors(t):
    h, gu = gm.gate_up(x, w_gate, w_up, layout, backend='mosaic', tiling=t, with_gu=True)
    return rel_err(h, want_h, rows), rel_err(gu, want_gu, rows)
  _check_all(gm.gate_up_fitting('gate_up', BLOCK_ROWS, SIZE, SIZE), errors)


def test_gate_up_t_tilings():
  layout, _, w_gate, w_up, gu, rows = _gate_up_problem()
  want = (gm.gmm(gu[:, :SIZE], w_gate, layout, transpose_rhs=True).astype(jnp.float32)
          + gm.gmm(gu[:, SIZE:], w_up, layout, transpose_rhs=True).astype(jnp.float32))
  _check_all(gm.gate_up_fitting('gate_up_t', BLOCK_ROWS, SIZE, SIZE),
             lambda t: (rel_err(gm.gate_up_t(gu, w_gate, w_up, layout, backend='mosaic',
                                             tiling=t), want, rows),))


def test_tgmm_gate_up_tilings():
  layout, x, _, _, gu, _ = _gate_up_problem()
  want = gm.tgmm(x, gu[:, :SIZE], layout), gm.tgmm(x, gu[:, SIZE:], layout)

  def errors(t):
    got = gm.tgmm_gate_up(x, gu, layout, backend='mosaic', tiling=t)
    empty = max(float(np.abs(np.asarray(g[1], np.float32)).max()) for g in got)
    return rel_err(got[0], want[0]), rel_err(got[1], want[1]), empty
  _check_all(gm.gate_up_fitting('tgmm_gate_up', SIZE, SIZE), errors)


def test_swiglu_default_tilings_grads():
  """The default fused path end to end (custom VJP) against the unfused XLA reference."""
  layout, x, w_gate, w_up, gu, rows = _gate_up_problem()
  dh = gu[:, :SIZE]

  def run(backend, fuse):
    out, vjp = jax.vjp(lambda *a: gm.swiglu(*a, layout, backend, fuse=fuse), x, w_gate, w_up)
    return (out, *vjp(dh))
  got, want = run('mosaic', True), run('xla', False)
  errors = [rel_err(got[0], want[0], rows), rel_err(got[1], want[1], rows),
            rel_err(got[2], want[2]), rel_err(got[3], want[3])]
  assert max(errors) < 1e-2, errors
