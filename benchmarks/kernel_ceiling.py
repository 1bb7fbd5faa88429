"""Device-time bounds of the MoE layer: our kernels against cuBLAS and jax's Mosaic GPU matmul.

Answers "is the gap to the dense ceiling in our grouped kernels, in Mosaic GPU, or in the expert
shapes themselves?". Everything is timed with CUPTI (`mosaic.gpu.profiler.measure`: summed GPU
kernel time, no launch or host gaps), median of --iters calls.

1. Expert FFNs (--ffn cases of moe_layer.py), SwiGLU fwd+bwd without any routing, every expert
   holding exactly T * k / E rows: the dense FFN of width k * f (the ceiling); cuBLAS batched
   per-expert GEMMs (what a capacity buffer with capacity factor 1.0 runs: the best case of the
   `einsum` / `gather` paths); our grouped kernels on the same rows (no padding).
2. Dense matmuls [M, K] x [K, N] (--shapes): cuBLAS (`a @ b` through XLA); jax's reference Hopper
   kernel (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) under a few configs; our
   `grouped_matmul.gmm` with one expert owning every row block, under each fitting tiling.

Needs a Hopper GPU (off one, the bounds run with wall time and the XLA reference matmul):
  PYTHONPATH=. python3 benchmarks/kernel_ceiling.py --out kernel_ceiling.json
  python benchmarks/kernel_ceiling.py --small      # CPU smoke run
"""
import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_layer  # noqa: E402
from moe_layer import CASES, device_ms, gm, log, rel_err  # noqa: E402
from moe_jax.moe.experts import feed_forward  # noqa: E402

SHAPES = {  # name: (M, K, N); the dense twins of the benchmark cases' expert matmuls
    'mixtral_up': (16384, 4096, 14336),
    'mixtral_down': (16384, 14336, 4096),
    'switch_up': (16384, 2048, 8192),
}
BLOCK_ROWS = 128


def jax_mgpu_configs():
  """A few configs of jax's reference kernel: 128x256 / 256x128 CTAs, 3-4 stages, clusters."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as ref  # pylint: disable=g-import-not-at-top
  dim = ref.MatmulDimension
  out = []
  for wg, stages, cluster, width in ((dim.N, 3, None, 8), (dim.N, 4, None, 8), (dim.M, 3, None, 8),
                                     (dim.M, 4, None, 8), (dim.N, 4, None, 16),
                                     (dim.M, 4, dim.N, 8), (dim.N, 4, dim.M, 8),
                                     (dim.N, 3, dim.N, 8)):
    out.append(ref.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=stages,
                                epi_tile_m=64, epi_tile_n=64, grid_minor_dim=dim.M,
                                grid_tile_width=width, wg_dimension=wg, cluster_dimension=cluster))
  return ref, out


def bench_shape(name, m, k, n, iters, tilings) -> dict:
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (m, k), jnp.bfloat16)
  b = jax.random.normal(kb, (k, n), jnp.bfloat16)
  flops = 2.0 * m * k * n
  tflops = lambda ms: flops / ms / 1e9
  rec = dict(shape=name, m=m, k=k, n=n, results={})
  want = jax.jit(jnp.matmul)(a, b)
  rec['results']['cublas'] = tflops(device_ms(jax.jit(jnp.matmul), a, b, iters=iters))
  log(f'[{name}] cublas {rec["results"]["cublas"]:.0f} TFLOP/s')

  def record(label, fn, *args):
    try:
      err = rel_err(fn(*args), want)
      if err > 1e-2:
        raise AssertionError(f'relative error {err:.1e}')
      rec['results'][label] = tflops(device_ms(fn, *args, iters=iters))
      log(f'[{name}] {label} {rec["results"][label]:.0f} TFLOP/s')
    except Exception as e:  # pylint: disable=broad-except
      rec['results'][label] = f'{type(e).__name__}: {str(e)[:200]}'
      log(f'[{name}] {label} failed: {rec["results"][label]}')

  ref, configs = jax_mgpu_configs()
  for c in configs:
    label = (f'jax_mgpu wg={c.wg_dimension.name} stages={c.max_concurrent_steps} '
             f'cluster={getattr(c.cluster_dimension, "name", None)} width={c.grid_tile_width}')
    record(label, jax.jit(lambda x, y, c=c: ref.matmul(x, y, None, c)), a, b)
  layout = moe_layer.even_layout(1, m // BLOCK_ROWS, BLOCK_ROWS)
  for t in gm.fitting(tilings, BLOCK_ROWS, n, k):
    fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)
              if getattr(t, f.name) != getattr(gm.Tiling(), f.name)}
    record(f'grouped {fields}',
           jax.jit(lambda x, y, t=t: gm.gmm(x, y[None], layout, backend='mosaic', tiling=t)), a, b)
  return rec


def ffn_bounds(case, iters: int, tune: bool) -> dict:
  """Device ms of SwiGLU expert FFNs fwd+bwd without routing, every expert holding T * k / E rows:
  the dense FFN of width k * f (the ceiling), cuBLAS batched per-expert GEMMs ([E, rows, d]: what a
  capacity buffer with capacity factor 1.0 would run), and our grouped kernels on the same rows."""
  dtype = jnp.bfloat16
  rows = case.tokens * case.k // case.experts
  keys = iter(jax.random.split(jax.random.key(1), 16))
  rand = lambda *shape: jax.random.normal(next(keys), shape, dtype) * 0.02
  e, d, f = case.experts, case.d, case.f

  def ffn(matmul, x, w):
    return feed_forward(matmul, x, w['in'], w['out'], w['gate'])

  def grad_of(matmul):  # (w, x, ct) -> (d w, d x)
    return moe_layer.fwd_and_grad(lambda w, x: ffn(matmul, x, w))[1]

  kernels = moe_layer.tune_kernels(case, dtype, iters, BLOCK_ROWS, 4) if tune else []
  out = {}
  x = rand(case.tokens, d)
  dense_w = {'in': rand(d, case.k * f), 'gate': rand(d, case.k * f), 'out': rand(case.k * f, d)}
  out['dense'] = grad_of(jnp.matmul)
  xb = rand(e, rows, d)
  w = {'in': rand(e, d, f), 'gate': rand(e, d, f), 'out': rand(e, f, d)}
  out['cublas_batched'] = grad_of(lambda a, b: jnp.einsum('erd,edf->erf', a, b))
  layout = moe_layer.even_layout(e, rows // BLOCK_ROWS, BLOCK_ROWS)
  out['grouped'] = grad_of(lambda a, b: gm.grouped_matmul(a, b, layout))
  xg = xb.reshape(e * rows, d)
  ones = jnp.ones_like  # cotangent: an FFN's output has its input's shape
  args = {'dense': (dense_w, x, ones(x)), 'cublas_batched': (w, xb, ones(xb)),
          'grouped': (w, xg, ones(xg))}
  got, want = out['grouped'](*args['grouped']), out['cublas_batched'](*args['cublas_batched'])
  err = max(rel_err(got[1].reshape(want[1].shape), want[1]),
            *(rel_err(got[0][name], want[0][name]) for name in w))
  if err > 2e-2:
    raise AssertionError(f'grouped and batched expert FFN gradients differ: {err:.1e}')
  times = {name: moe_layer.kernel_ms(fn, *args[name], iters=iters) for name, fn in out.items()}
  flops = 3 * case.useful_flops
  rec = dict(case=case.name, rows_per_expert=rows, ms=times, kernels=kernels,
             tflops={k: flops / v / 1e9 for k, v in times.items()},
             ratio={k: times['dense'] / v for k, v in times.items()})
  rec['clock'] = 'device' if jax.devices()[0].platform == 'gpu' else 'wall'
  log(f'[{case.name}] ffn fwd+bwd {rec["clock"]} ms {times}, ratio to dense {rec["ratio"]}')
  return rec


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', default=','.join(SHAPES))
  parser.add_argument('--ffn', default='mixtral,fine64,switch64',
                      help='cases of benchmarks/moe_layer.py for the FFN-level bounds')
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--tune', action='store_true',
                      help='tune the grouped kernels first (moe_layer.tune_kernels, device time)')
  parser.add_argument('--small', action='store_true',
                      help='CPU smoke run: the bounds of a tiny case (wall time, XLA reference)')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  if args.small:
    args.ffn, args.shapes, args.iters = 'smoke', '', 2
  elif args.shapes and gm.default_backend() != 'mosaic':
    sys.exit('kernel_ceiling.py --shapes needs a Hopper GPU (the Mosaic GPU kernels).')
  meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind)
  print(json.dumps(meta), flush=True)
  out = dict(meta=meta, shapes=[], ffn=[])
  def save():
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)

  for name in filter(None, args.ffn.split(',')):
    case = moe_layer.SMOKE if name == 'smoke' else CASES[name]
    out['ffn'].append(ffn_bounds(case, args.iters, args.tune))
    save()
  for name in filter(None, args.shapes.split(',')):
    out['shapes'].append(bench_shape(name, *SHAPES[name], args.iters, gm.GMM_TILINGS))
    save()
  for rec in out['ffn']:
    print(f"\n{rec['case']} expert FFN fwd+bwd, {rec['rows_per_expert']} rows per expert, "
          f"{rec['clock']} time")
    for name in rec['ms']:
      print(f"  {rec['ms'][name]:8.3f} ms  {rec['tflops'][name]:5.0f} TFLOP/s  "
            f"ratio {rec['ratio'][name]:.2f}  {name}")
  for rec in out['shapes']:
    print(f"\n{rec['shape']} [{rec['m']}, {rec['k']}] x [{rec['k']}, {rec['n']}], TFLOP/s device time")
    for label, v in rec['results'].items():
      print(f'  {v:7.0f}  {label}' if isinstance(v, float) else f'  failed  {label}: {v}')


if __name__ == '__main__':
  main()
