"""Dropless expert parallelism on GPUs: the real `jax.lax.ragged_all_to_all` against the stand-in.

Needs a GPU: `JAX_PLATFORMS=cuda python -m pytest -q tests/test_ep_dropless_gpu.py`. The exchange
runs over an expert axis of size 1 (one GPU: every slice stays on the device) and of all the GPUs
when there are several. Both implementations must agree with the NumPy model of the op's
semantics, and the sharded layer must give the same output and gradients with either, and as on
one device.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import fast_dispatch, ragged_exchange
from moe_jax.moe.layer import MoELayer
from moe_jax.parallel import sharding
from tests.test_ep_dropless import (BATCH, FAMILIES, inputs, ragged_problem,
                                    reference_ragged_all_to_all, run_exchange)
from tests.test_parallel import evaluate

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')

AXIS_SIZES = sorted({1} | ({jax.device_count()} if BATCH % jax.device_count() == 0 else set()))


@pytest.mark.parametrize('m', AXIS_SIZES)
def test_collective_matches_stand_in(m):
  args = ragged_problem(0, m=m)
  want = reference_ragged_all_to_all(*args)
  np.testing.assert_array_equal(run_exchange(args, 'ragged'), want)
  np.testing.assert_array_equal(run_exchange(args, 'padded'), want)


@pytest.mark.parametrize('m', AXIS_SIZES)
@pytest.mark.parametrize('chunks', [1, 3])
def test_layer_with_collective_matches_stand_in(m, chunks):
  spec = FAMILIES['fine_shared'].replace(num_chunks=chunks)
  mesh = sharding.make_mesh(1, m, devices=jax.devices()[:m])
  results = {}
  with jax.default_matmul_precision('highest'):
    for impl in ('ragged', 'padded'):
      with ragged_exchange.force(impl):
        apply = sharding.shard_module(MoELayer(spec), mesh, train=True, always_shard=True)
        fn = functools.partial(evaluate, apply, mutable=False)
        results[impl] = jax.jit(fn)(*inputs(spec))
    layer = MoELayer(spec)
    one = functools.partial(evaluate, lambda v, x: layer.apply(v, x, train=True), mutable=False)
    results['one device'] = jax.jit(one)(*inputs(spec))
  for name in ('padded', 'one device'):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5,
                                   err_msg=f'ragged vs {name}'), results['ragged'], results[name])


@pytest.mark.parametrize('m', AXIS_SIZES)
@pytest.mark.parametrize('fuse', [False, True])
def test_kernels_behind_the_collective(m, fuse, monkeypatch):
  """bf16 at a size where the Mosaic grouped-matmul kernels run (Hopper), SwiGLU's gate and up as
  two kernels or fused into one: the collective and the stand-in move the same rows, so the results
  agree to bf16 rounding."""
  monkeypatch.setattr(fast_dispatch, 'FUSE_GATE_UP', fuse)
  spec = FAMILIES['top2'].replace(d_ff=256)
  mesh = sharding.make_mesh(1, m, devices=jax.devices()[:m])
  x = jax.random.normal(jax.random.key(1), (BATCH, 128, 256), jnp.bfloat16)
  layer = MoELayer(spec, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x)
  results = {}
  for impl in ('ragged', 'padded'):
    with ragged_exchange.force(impl):
      apply = sharding.shard_module(layer, mesh, always_shard=True)
      loss = lambda v, x: jnp.sum(apply(v, x)[0].astype(jnp.float32) ** 2)
      results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
  for got, want in zip(jax.tree.leaves(results['ragged']), jax.tree.leaves(results['padded'])):
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2 * scale)
