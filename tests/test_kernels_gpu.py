"""Every candidate tiling of the Mosaic GPU grouped-matmul kernels against `jax.lax.ragged_dot`.

Needs a Hopper GPU: run on the device machine (`pytest tests/test_kernels_gpu.py`). On CPU the
same kernels are tested through Pallas' GPU interpreter (tests/test_fast_dispatch.py), which cannot
run the cluster (multicast) tilings.
"""
import numpy as np
import pytest

from moe_jax.kernels import grouped_matmul as gm
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
