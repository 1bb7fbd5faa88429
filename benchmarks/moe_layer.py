"""MoE layer speed: every dispatch implementation and router family against the dense ceiling.

For each case (T tokens in groups of `seq` tokens, d, f, E, k) and router family, times the MoE
layer (router projection, routing, dispatch, SwiGLU experts, combine) forward and forward+backward
(gradients of the input and all parameters), and a dense SwiGLU FFN of width k * f on the same
tokens: equal *useful* active FLOPs (T * k * 6 * d * f forward). ratio = dense time / MoE time, so
1.0 means the MoE layer runs its useful expert FLOPs as fast as the dense FFN runs its own.
Router and permutation costs are timed alone too. Every implementation is first checked against
the one-hot 'einsum' reference at a small size (output and gradients).

Peers, in the same process: what a user would pick instead of 'blocked' for the dropless family,
the same layer with the expert products on `jax.lax.ragged_dot` ('ragged') or on
`tokamax.ragged_dot` ('tokamax', an optional dependency: skipped when it is not installed; its
default implementation choice and configs, or its own autotuner with --tokamax-autotune).
'blocked_unfused' / 'blocked_fused' (dropless) are 'blocked' with gate and up as two grouped
matmuls / always fused (`fast_dispatch.FUSE_GATE_UP`; 'blocked' fuses by the expert width f),
for the A/B of the fused gate+up kernels.

  python benchmarks/moe_layer.py --out moe_layer.json     # GPU: mixtral, fine64, switch64, small
  python benchmarks/moe_layer.py --small                  # CPU smoke run, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_jax.moe import dispatch as dispatch_lib  # noqa: E402
from moe_jax.moe import families as router_families  # noqa: E402
from moe_jax.moe import fast_dispatch, layer  # noqa: E402
from moe_jax.moe.experts import FeedForward  # noqa: E402
from moe_jax.moe.kernels import grouped_matmul as gm  # noqa: E402
from moe_jax.moe.spec import MoESpec  # noqa: E402
from moe_jax.routers.projection import RouterProjection  # noqa: E402
from moe_jax.routing.plan import DroplessPlan  # noqa: E402

FAST = 'blocked'
TOKAMAX_AUTOTUNE = False  # --tokamax-autotune
OVERHEADS = True  # --no-overheads: skip the router / permutation timings
UNFUSED = 'blocked_unfused'  # FAST with gate and up as two grouped matmuls
FUSED = 'blocked_fused'  # FAST with gate and up always fused (the default fuses by shape)
PEERS = ('ragged', 'tokamax')  # dropless only: jax.lax.ragged_dot, tokamax.ragged_dot
LABELS = {'ragged': 'jax.lax.ragged_dot', 'tokamax': 'tokamax.ragged_dot'}
_START = time.perf_counter()


def elapsed() -> float:
  """Seconds since this module was imported (the benchmark's start)."""
  return time.perf_counter() - _START


def log(msg: str) -> None:
  print(f'{elapsed():7.1f}s {msg}', flush=True)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  tokens: int
  d: int
  f: int
  experts: int
  k: int
  seq: int = 2048  # tokens per routing group (one sequence)

  @property
  def useful_flops(self) -> float:
    """Forward expert FLOPs the routing asks for: T * k * 6 * d * f (SwiGLU)."""
    return self.tokens * self.k * 6.0 * self.d * self.f


CASES = {
    'small': Case('small', 4096, 512, 1024, 8, 2, seq=512),
    'mixtral': Case('mixtral', 8192, 4096, 14336, 8, 2),
    'fine64': Case('fine64', 16384, 2048, 1408, 64, 6),
    'switch64': Case('switch64', 16384, 2048, 8192, 64, 1),
}
SMOKE = Case('smoke', 256, 64, 128, 4, 2, seq=64)
VERIFY = Case('verify', 512, 128, 256, 4, 2, seq=128)
FAMILIES = ('top_k', 'dropless', 'expert_choice', 'soft')


def family_spec(case: Case, family: str, impl: str) -> MoESpec:
  """The router family at equal useful FLOPs (expert choice: capacity k, soft: k * n / E slots)."""
  base = dict(num_experts=case.experts, d_ff=case.f, group_by='sequence')
  if family == 'top_k':
    return MoESpec(k=case.k, capacity_factor=1.25, dispatch=impl, **base)
  if family == 'dropless':
    return MoESpec(k=case.k, capacity_factor=None, dispatch=impl, **base)
  if family == 'expert_choice':
    return MoESpec(router='expert_choice', capacity_factor=float(case.k), dispatch=impl, **base)
  slots = max(1, case.k * case.seq // case.experts)
  return MoESpec(router='soft', slots_per_expert=slots, dispatch='einsum', **base)


def _tokamax_version() -> str | None:
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
    return tokamax.__version__
  except ImportError:
    return None


def tokamax_available() -> bool:
  try:
    import tokamax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def family_impls(case: Case, family: str, verify: bool) -> list[str]:
  if family == 'soft':
    return ['einsum', FAST]
  if family == 'dropless':  # einsum / gather run dropless through capacity = group size: small only
    # FAST before the peers: XLA's ragged_dot can take minutes to compile, or run out of memory.
    peers = (['tokamax'] if tokamax_available() else []) + ['ragged']
    return (['einsum', 'gather'] if verify or case.name in ('small', 'smoke') else []) + [
        FAST, UNFUSED, FUSED] + peers
  return ['einsum', 'gather', FAST]


class TokamaxRagged(dispatch_lib.Ragged):
  """'ragged' with its grouped products on `tokamax.ragged_dot` (tokamax picks the kernel)."""

  def matmul(self, rows, w):
    import tokamax  # pylint: disable=g-import-not-at-top
    # In the rows' dtype: tokamax's VJP needs the cotangent in the operands' dtype.
    return tokamax.ragged_dot(rows, w, self._sorted[1])


@contextlib.contextmanager
def _tokamax_dispatch():
  """Traces 'ragged' layers with `TokamaxRagged` (the dispatcher table is read at trace time)."""
  table = dispatch_lib.DISPATCHERS[DroplessPlan]
  saved, table['ragged'] = table['ragged'], TokamaxRagged
  try:
    yield
  finally:
    table['ragged'] = saved


@contextlib.contextmanager
def _fuse(value):
  """Traces 'blocked' with fast_dispatch.FUSE_GATE_UP = value."""
  saved, fast_dispatch.FUSE_GATE_UP = fast_dispatch.FUSE_GATE_UP, value
  try:
    yield
  finally:
    fast_dispatch.FUSE_GATE_UP = saved


# impl -> (MoESpec.dispatch, context the layer is traced in)
IMPLS = {UNFUSED: (FAST, functools.partial(_fuse, False)),
         FUSED: (FAST, functools.partial(_fuse, True)),
         'tokamax': ('ragged', _tokamax_dispatch)}


def make_layer(case: Case, family: str, impl: str, dtype, block_rows: int):
  """(init(key, x) -> params, apply(params, x) -> y): the MoELayer (default blocks: block_rows is
  the kernels' and `overheads`' only). Benchmark-only impls (`IMPLS`) run a library dispatch traced
  in their context (the forward pass picks the kernels; the backward follows the forward's)."""
  del block_rows
  dispatch, context = IMPLS.get(impl, (impl, contextlib.nullcontext))
  spec = family_spec(case, family, dispatch)
  module = layer.MoELayer(spec.replace(dispatch=dispatch), dtype=dtype)

  def apply(params, x):
    with context():
      return module.apply(params, x)[0]
  return module.init, apply


def cast_params(params, dtype):
  """Expert / FFN weights in the compute dtype (no per-step casts); router stays float32."""
  def cast(path, leaf):
    keys = [getattr(k, 'key', '') for k in path]
    return leaf if 'router' in keys else leaf.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)


def fwd_and_grad(apply):
  """jit'd forward, and forward+backward (gradients of params and input for a fixed cotangent)."""
  fwd = jax.jit(apply)

  def loss(params, x, ct):
    return jnp.vdot(apply(params, x).astype(jnp.float32), ct)

  return fwd, jax.jit(jax.grad(loss, argnums=(0, 1)))


def time_ms(fn, *args, iters: int, warmup: int = 2) -> float:
  """Median wall time of fn(*args) in ms, each call synchronized."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def device_ms(fn, *args, iters: int) -> float:
  """Median summed GPU kernel time of fn(*args) in ms, from CUPTI (no launch or host gaps)."""
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  _, times = profiler.measure(fn, iterations=iters)(*args)
  return statistics.median(times)


def kernel_ms(fn, *args, iters: int) -> float:
  """Device time on a GPU (`device_ms`), else wall time (`time_ms`)."""
  if jax.devices()[0].platform == 'gpu':
    return device_ms(fn, *args, iters=iters)
  return time_ms(fn, *args, iters=iters)


def inputs(case: Case, dtype, seed=0):
  kx, kc = jax.random.split(jax.random.key(seed))
  shape = (case.tokens // case.seq, case.seq, case.d)
  return jax.random.normal(kx, shape, dtype), jax.random.normal(kc, shape, jnp.float32)


@jax.jit
def _rel_err(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)


def rel_err(a, b) -> float:
  """||a - b|| / ||b||, computed on the device in float32 (the arrays can be GBs)."""
  return float(_rel_err(a, b))


def verify(case: Case, dtype, block_rows: int, families, tol: float,
           impls_filter=()) -> list[dict]:
  """Each family x implementation (those in impls_filter, if given) against 'einsum': output and
  gradients (params, input)."""
  x, ct = inputs(case, dtype, seed=1)
  records = []
  for family in families:
    init, ref_apply = make_layer(case, family, 'einsum', dtype, block_rows)
    params = cast_params(init(jax.random.key(2), x), dtype)
    ref_fwd, ref_grad = fwd_and_grad(ref_apply)
    ref = (ref_fwd(params, x), ref_grad(params, x, ct))
    for impl in family_impls(case, family, verify=True):
      if impl == 'einsum' or (impls_filter and impl not in impls_filter):
        continue
      rec = dict(case=case.name, family=family, impl=impl)
      try:
        _, apply = make_layer(case, family, impl, dtype, block_rows)
        fwd, grad = fwd_and_grad(apply)
        out = (fwd(params, x), grad(params, x, ct))
        errs = [rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))]
        rec.update(max_rel_err=max(errs), ok=max(errs) < tol)
      except Exception as e:  # pylint: disable=broad-except
        rec.update(error=_short(e), ok=False)
      records.append(rec)
      log(f"verify {family:13s} {impl:8s} {rec.get('max_rel_err', rec.get('error'))}")
  return records


def _short(e: Exception) -> str:
  lines = [l for l in str(e).splitlines() if l.strip()]
  return f'{type(e).__name__}: {lines[0][:300] if lines else ""}'


def dense_times(case: Case, dtype, iters: int) -> tuple[float, float]:
  x, ct = inputs(case, dtype)
  module = FeedForward(case.k * case.f, dtype=dtype)
  params = cast_params(module.init(jax.random.key(0), x), dtype)
  fwd, grad = fwd_and_grad(module.apply)
  return time_ms(fwd, params, x, iters=iters), time_ms(grad, params, x, ct, iters=iters)


def overheads(case: Case, dtype, block_rows: int, iters: int) -> dict:
  """Router alone; dispatch+combine alone (identity experts) for 'gather' and the fast path."""
  x, ct = inputs(case, dtype)
  spec = family_spec(case, 'top_k', 'gather')
  router = RouterProjection(case.experts)
  rparams = router.init(jax.random.key(0), x)

  def plan_of(rp, xs):
    return jax.vmap(lambda lg: router_families.route(spec, router_families.Group(lg)))(
        router.apply(rp, xs)).plan

  def route_only(rp, xs):
    return plan_of(rp, xs).slot_weight.sum()

  def permute(rp, xs, impl):
    options = dict(block_rows=block_rows) if impl == FAST else {}
    return dispatch_lib.moe_apply(plan_of(rp, xs), xs, lambda rows, matmul: rows, impl, **options)

  out = {}
  out['router_fwd_ms'] = time_ms(jax.jit(route_only), rparams, x, iters=iters)
  out['router_fwdbwd_ms'] = time_ms(jax.jit(jax.grad(route_only)), rparams, x, iters=iters)
  for impl in ('gather', FAST):
    f = lambda rp, xs, c, impl=impl: jnp.vdot(permute(rp, xs, impl).astype(jnp.float32), c)
    try:
      fwd = jax.jit(lambda rp, xs, impl=impl: permute(rp, xs, impl))
      out[f'permute_{impl}_fwd_ms'] = time_ms(fwd, rparams, x, iters=iters)
      out[f'permute_{impl}_fwdbwd_ms'] = time_ms(jax.jit(jax.grad(f, argnums=(0, 1))), rparams, x,
                                                 ct, iters=iters)
    except Exception as e:  # pylint: disable=broad-except
      out[f'permute_{impl}_error'] = _short(e)
  return out


def bench_case(case: Case, dtype, block_rows: int, iters: int, families, impls_filter) -> dict:
  dense_fwd, dense_fb = dense_times(case, dtype, iters)
  log(f'[{case.name}] dense ceiling fwd {dense_fwd:.3f} ms  fwd+bwd {dense_fb:.3f} ms')
  x, ct = inputs(case, dtype)
  rows = []
  for family in families:
    init = None
    for impl in family_impls(case, family, verify=False):
      if impls_filter and impl not in impls_filter:
        continue
      rec = dict(case=case.name, family=family, impl=impl, dense_fwd_ms=dense_fwd,
                 dense_fwdbwd_ms=dense_fb)
      try:
        init_fn, apply = make_layer(case, family, impl, dtype, block_rows)
        if init is None:
          init = cast_params(init_fn(jax.random.key(0), x), dtype)
        fwd, grad = fwd_and_grad(apply)
        tuned = contextlib.nullcontext()
        if impl == 'tokamax' and TOKAMAX_AUTOTUNE:  # tokamax's own autotuner, on the fwd+bwd ops
          import tokamax  # pylint: disable=g-import-not-at-top
          start = elapsed()
          tuned = tokamax.autotune(grad.lower(init, x, ct))
          rec['tokamax_autotune_s'] = elapsed() - start
          fwd, grad = fwd_and_grad(apply)  # traced afresh, inside `tuned`
        with tuned:
          rec['fwd_ms'] = time_ms(fwd, init, x, iters=iters)
          rec['fwdbwd_ms'] = time_ms(grad, init, x, ct, iters=iters)
        rec['ratio_fwd'] = dense_fwd / rec['fwd_ms']
        rec['ratio_fwdbwd'] = dense_fb / rec['fwdbwd_ms']
        rec['useful_tflops_fwdbwd'] = 3 * case.useful_flops / rec['fwdbwd_ms'] / 1e9
      except Exception as e:  # pylint: disable=broad-except
        rec['error'] = _short(e)
        if os.environ.get('BENCH_TRACEBACK'):
          traceback.print_exc()
      rows.append(rec)
      log(f"[{case.name}] {family:13s} {impl:8s} "
          + (f"fwd {rec['fwd_ms']:.3f} ms ({rec['ratio_fwd']:.2f})  "
             f"fwd+bwd {rec['fwdbwd_ms']:.3f} ms ({rec['ratio_fwdbwd']:.2f})"
             if 'error' not in rec else rec['error']))
  over = overheads(case, dtype, block_rows, iters) if OVERHEADS else {}
  log(f'[{case.name}] overheads ' + ', '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}'
                                             for k, v in over.items()))
  return dict(case=dataclasses.asdict(case), dense_fwd_ms=dense_fwd, dense_fwdbwd_ms=dense_fb,
              rows=rows, overheads=over)


def even_layout(experts: int, blocks_per_expert: int, block_rows: int,
                idle_blocks: int = 0) -> gm.BlockLayout:
  """The block layout of `experts` experts of `blocks_per_expert` blocks each, then idle blocks."""
  counts = jnp.full((experts,), blocks_per_expert * block_rows, jnp.int32)
  total = (experts * blocks_per_expert + idle_blocks) * block_rows
  return fast_dispatch._layout(counts, total, block_rows)[0]  # pylint: disable=protected-access


def tune_kernels(case: Case, dtype, iters: int, block_rows: int | None = None,
                 max_candidates: int = 4) -> list[dict]:
  """Times the grouped matmul kernels of the case's six shapes (forward d->f and f->d, their
  transposed-weight backward, and the weight gradients) and the three fused SwiGLU gate/up
  kernels (`gate_up`, `gate_up_t`, `tgmm_gate_up`) on T * k rows split evenly over the experts,
  for the first `max_candidates` fitting tilings; stores each winner in `grouped_matmul.TUNED` and
  reports TFLOP/s next to the dense matmul of equal FLOPs (XLA / cuBLAS), both in GPU kernel time
  (CUPTI; wall time off GPU). A tiling whose result differs from the first (default) tiling's by
  more than 1e-2 relative is rejected as wrong."""
  rows = case.tokens * case.k
  block_rows = block_rows or fast_dispatch.default_block_rows(rows, case.experts)
  per = -(-rows // case.experts // block_rows)  # blocks per expert
  layout = even_layout(case.experts, per, block_rows, idle_blocks=1)
  m, used = layout.num_rows, per * block_rows * case.experts
  keys = iter(jax.random.split(jax.random.key(0), 16))
  rand = lambda *shape: jax.random.normal(next(keys), shape, dtype)
  be = gm.default_backend()
  out = []
  for k, n in ((case.d, case.f), (case.f, case.d)):
    lhs, w, g = rand(m, k), rand(case.experts, k, n), rand(m, n)
    flops = 2.0 * used * k * n
    # kind: (kernel(tiling, *args), args, dense twin of equal FLOPs, its args, FLOPs, candidates,
    # TUNED key). Arrays go in as arguments: closed over, jit would embed them as constants.
    shapes = {
        'gmm': (lambda t, a, w: gm.gmm(a, w, layout, backend=be, tiling=t), (lhs, w),
                lambda a, w: a @ w, (lhs[:used], w[0]), flops,
                gm.fitting(gm.GMM_TILINGS, block_rows, n, k), ('gmm', block_rows, k, n)),
        'gmm_t': (lambda t, b, w: gm.gmm(b, w, layout, transpose_rhs=True, backend=be, tiling=t),
                  (g, w), lambda b, w: b @ w.T, (g[:used], w[0]), flops,
                  gm.fitting(gm.GMM_TILINGS, block_rows, k, n), ('gmm_t', block_rows, n, k)),
        'tgmm': (lambda t, a, b: gm.tgmm(a, b, layout, backend=be, tiling=t), (lhs, g),
                 lambda a, b: a.T @ b, (lhs[:used], g[:used]), flops,
                 [t for t in gm.fitting(gm.TGMM_TILINGS, k, n) if block_rows % t.tile_k == 0],
                 ('tgmm', block_rows, k, n)),
    }
    if (k, n) == (case.d, case.f) and be != 'xla':  # the fused gate/up kernels, twice the FLOPs
      gu, w2 = jnp.concatenate([g, g], axis=1), jnp.concatenate([w[0], w[0]], axis=1)
      fused = {
          'gate_up': (lambda t, a, w: gm.gate_up(a, w, w, layout, backend=be, tiling=t,
                                                 with_gu=True)[0], (lhs, w),
                      lambda a, w2: a @ w2, (lhs[:used], w2),
                      gm.gate_up_fitting('gate_up', block_rows, n, k)),
          'gate_up_t': (lambda t, gu, w: gm.gate_up_t(gu, w, w, layout, backend=be, tiling=t),
                        (gu, w), lambda gu, w2: gu @ w2.T, (gu[:used], w2),
                        gm.gate_up_fitting('gate_up_t', block_rows, k, n)),
          'tgmm_gate_up': (lambda t, a, gu: gm.tgmm_gate_up(a, gu, layout, backend=be,
                                                            tiling=t)[0], (lhs, gu),
                           lambda a, gu: a.T @ gu, (lhs[:used], gu[:used]),
                           [t for t in gm.gate_up_fitting('tgmm_gate_up', k, n)
                            if block_rows % t.tile_k == 0]),
      }
      keys_of = {'gate_up': (k, n), 'gate_up_t': (n, k), 'tgmm_gate_up': (k, n)}
      for kind, (kernel, args, dense, dense_args, candidates) in fused.items():
        shapes[kind] = (kernel, args, dense, dense_args, 2 * flops, candidates,
                        (kind, block_rows, *keys_of[kind]))
    for kind, (kernel, args, dense, dense_args, kind_flops, candidates, key) in shapes.items():
      rec = dict(case=case.name, kernel=kind, k=k, n=n, block_rows=block_rows, backend=be,
                 dense_tflops=kind_flops / kernel_ms(jax.jit(dense), *dense_args,
                                                     iters=iters) / 1e9,
                 tilings={})
      candidates = candidates[:max_candidates] if be != 'xla' else [None]
      reference = None
      for t in candidates:
        try:
          run = jax.jit(functools.partial(kernel, t))
          result = run(*args)
          if not kind.startswith('tgmm'):  # rows of idle blocks are never written: compare used
            result = result[:used]
          if reference is None:
            reference = result
          elif (err := rel_err(result, reference)) > 1e-2:
            raise AssertionError(f'relative error {err:.1e} against {candidates[0]}')
          del result
          rec['tilings'][str(t)] = kind_flops / kernel_ms(run, *args, iters=iters) / 1e9
        except Exception as e:  # pylint: disable=broad-except
          rec['tilings'][str(t)] = _short(e)
      del reference
      timed = {t: rec['tilings'][str(t)] for t in candidates
               if isinstance(rec['tilings'][str(t)], float)}
      if timed:
        best = max(timed, key=timed.get)
        rec.update(best=str(best), tflops=timed[best])
        if best is not None:
          gm.TUNED[key] = best
      log(f"[{case.name}] {kind:12s} K={k} N={n}: {rec.get('tflops', 0):.0f} TFLOP/s "
          f"(dense {rec['dense_tflops']:.0f}) {rec.get('best')}")
      out.append(rec)
  return out


def table(results: list[dict]) -> str:
  lines = ['| case | router | dispatch | fwd ms | fwd / dense | fwd+bwd ms | fwd+bwd / dense |',
           '| --- | --- | --- | ---: | ---: | ---: | ---: |']
  for res in results:
    c = res['case']
    name = f"{c['name']} T={c['tokens']} d={c['d']} f={c['f']} E={c['experts']} k={c['k']}"
    lines.append(f"| {name} | dense SwiGLU d_ff={c['k'] * c['f']} | - | "
                 f"{res['dense_fwd_ms']:.3f} | 1.00 | {res['dense_fwdbwd_ms']:.3f} | 1.00 |")
    for r in res['rows']:
      if 'error' in r:
        lines.append(f"| {c['name']} | {r['family']} | {r['impl']} | {r['error'][:80]} | | | |")
      else:
        lines.append(f"| {c['name']} | {r['family']} | {r['impl']} | {r['fwd_ms']:.3f} | "
                     f"{r['ratio_fwd']:.2f} | {r['fwdbwd_ms']:.3f} | {r['ratio_fwdbwd']:.2f} |")
  lines += ['', '| case | router fwd ms | router fwd+bwd ms | permute gather fwd / fwd+bwd ms | '
            f'permute {FAST} fwd / fwd+bwd ms |', '| --- | ---: | ---: | ---: | ---: |']
  for res in results:
    o = res['overheads']
    get = lambda key: f'{o[key]:.3f}' if key in o else o.get(key.rsplit('_', 2)[0] + '_error', '-')
    lines.append(f"| {res['case']['name']} | {get('router_fwd_ms')} | {get('router_fwdbwd_ms')} | "
                 f"{get('permute_gather_fwd_ms')} / {get('permute_gather_fwdbwd_ms')} | "
                 f"{get(f'permute_{FAST}_fwd_ms')} / {get(f'permute_{FAST}_fwdbwd_ms')} |")
  return '\n'.join(lines)


def peer_table(results: list[dict]) -> str:
  """The peer view: fwd+bwd ratio to the dense FFN of each dispatch and peer, per case."""
  cols = [('dropless', FAST), ('top_k', FAST), ('dropless', UNFUSED), ('dropless', FUSED),
          ('dropless', 'ragged'), ('dropless', 'tokamax')]
  names = {'dropless': 'dropless', 'top_k': 'cf 1.25'}
  lines = ['| case | dense fwd+bwd ms | ' + ' | '.join(
      f'{LABELS.get(impl, impl)} {names[fam]}' for fam, impl in cols) + ' |',
           '| --- | ---: |' + ' ---: |' * len(cols)]
  for res in results:
    c = res['case']
    by = {(r['family'], r['impl']): r for r in res['rows']}
    cells = []
    for key in cols:
      r = by.get(key)
      cells.append('-' if r is None else 'error' if 'error' in r else
                   f"{r['ratio_fwdbwd']:.2f} ({r['fwdbwd_ms']:.2f} ms)")
    lines.append(f"| {c['name']} T={c['tokens']} d={c['d']} f={c['f']} E={c['experts']} "
                 f"k={c['k']} | {res['dense_fwdbwd_ms']:.2f} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true', help='tiny CPU smoke run (float32)')
  parser.add_argument('--cases', default='small,mixtral,fine64,switch64')
  parser.add_argument('--families', default=','.join(FAMILIES))
  parser.add_argument('--impls', default='', help='comma list; empty = all')
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--block-rows', type=int, default=0,
                      help='fast path row block; 0: its default. Used until MoELayer runs it.')
  parser.add_argument('--no-verify', action='store_true')
  parser.add_argument('--tune', action='store_true',
                      help='time the grouped matmul kernels per case and use the fastest tilings')
  parser.add_argument('--row-order', default=gm.ROW_ORDER, choices=('expert_bands', 'snake'),
                      help="gmm's tile visiting order (grouped_matmul.ROW_ORDER)")
  parser.add_argument('--candidates', type=int, default=4,
                      help='--tune times the first N fitting tilings of each kernel shape')
  parser.add_argument('--no-overheads', action='store_true',
                      help='skip the router and permutation timings')
  parser.add_argument('--tokamax-autotune', action='store_true',
                      help="run tokamax's autotuner on the 'tokamax' layer before timing it")
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  global TOKAMAX_AUTOTUNE, OVERHEADS
  TOKAMAX_AUTOTUNE, OVERHEADS = args.tokamax_autotune, not args.no_overheads

  gm.ROW_ORDER = args.row_order
  dtype = jnp.float32 if args.small else jnp.bfloat16
  cases = [SMOKE] if args.small else [CASES[c] for c in args.cases.split(',') if c]
  iters = 2 if args.small else args.iters
  block_rows = 16 if args.small else (args.block_rows or None)
  device = jax.devices()[0]
  meta = dict(jax=jax.__version__, device=str(getattr(device, 'device_kind', device.platform)),
              platform=device.platform, grouped_matmul_backend=gm.default_backend(),
              dtype=jnp.dtype(dtype).name, block_rows=block_rows, iters=iters,
              row_order=gm.ROW_ORDER, fuse_gate_up=fast_dispatch.FUSE_GATE_UP,
              tokamax=_tokamax_version(), command=' '.join(sys.argv))
  print(json.dumps(meta), flush=True)
  results = dict(meta=meta, verify=[], cases=[])
  families = [f for f in args.families.split(',') if f]
  impls = [i for i in args.impls.split(',') if i]
  if not args.no_verify:
    vcase = SMOKE if args.small else VERIFY
    results['verify'] = verify(vcase, dtype, block_rows, families,
                               tol=1e-4 if args.small else 3e-2, impls_filter=impls)
  results['kernels'] = []
  for case in cases:
    if args.tune:
      results['kernels'] += tune_kernels(case, dtype, iters, block_rows, args.candidates)
    results['cases'].append(bench_case(case, dtype, block_rows, iters, families, impls))
    if args.out:  # keep partial results if a later case dies
      results['peer_table'] = peer_table(results['cases'])
      _write(args.out, results)
  text = table(results['cases'])
  results['table'] = text
  results['peer_table'] = peer_table(results['cases'])
  print(text)
  print()
  print(results['peer_table'])
  if args.out:
    _write(args.out, results)
  bad = [v for v in results['verify'] if not v['ok']]
  return 1 if bad else 0


def _write(path, results):
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  sys.exit(main())
