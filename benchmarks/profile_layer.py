"""Where an MoE layer's time goes: GPU kernel times of one layer fwd+bwd next to its dense ceiling.

Traces `--iters` forward+backward calls of one case x family x dispatch of `moe_layer.py` (and of
the dense SwiGLU ceiling) with `jax.profiler`, reads the trace back (`jax.profiler.ProfileData`)
and prints, per call, the summed device time of each kernel and of each kind of kernel
(grouped matmul, cuBLAS GEMM, XLA fusion, sort, copy, ...), largest first.

  python benchmarks/profile_layer.py --case mixtral --family top_k --impl blocked   # GPU
  python benchmarks/profile_layer.py --small                                         # CPU smoke
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_layer  # noqa: E402  (its cases, layers and dense ceiling)

KINDS = (  # (kind, pattern on the kernel name), first match wins
    ('grouped matmul (Pallas)', r'gmm|tgmm|mosaic|pallas|grouped'),
    ('GEMM (cuBLAS/XLA)', r'gemm|nvjet|cutlass|sm90_xmma|cublas|matmul|dot'),
    ('sort / top-k', r'sort|topk|top_k'),
    ('scatter / gather', r'scatter|gather'),
    ('reduction', r'reduce'),
    ('copy / transpose', r'copy|transpose|memcpy|memset'),
    ('XLA fusion (element-wise)', r'fusion|loop|input'),
)


def kind_of(name: str) -> str:
  lowered = name.lower()
  return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), 'other')


def kernel_events(trace_dir: str) -> list[tuple[int, str, str, int]]:
  """(start ns, kernel name, HLO instruction, ns) of every GPU kernel of the trace in `trace_dir`
  (on CPU, the XLA ops of the host threads stand in for kernels). The HLO instruction is the
  event's `hlo_op` ('' where the trace names none, e.g. a memcpy)."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no *.xplane.pb under {trace_dir}')
  data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  device_planes = [p for p in data.planes if p.name.startswith('/device:GPU')]
  events = []
  for plane in device_planes:
    for line in plane.lines:
      if 'stream' not in line.name.lower():  # kernel lines are per stream
        continue
      events += [_event(e) for e in line.events]
  if not device_planes:  # CPU: XLA ops on the host threads
    for plane in data.planes:
      if plane.name.startswith('/host:CPU'):
        for line in plane.lines:
          if 'xla' in line.name.lower() or 'pjrt' in line.name.lower():
            events += [event for event in map(_event, line.events) if event[2]]
  return events


def _event(event) -> tuple[int, str, str, int]:
  """(start ns, name, HLO instruction or '', ns) of a trace event."""
  return event.start_ns, event.name, dict(event.stats).get('hlo_op', ''), event.duration_ns


def device_kernel_times(trace_dir: str, sequence: list | None = None) -> dict[str, float]:
  """{kernel name: summed device ns} over the kernels of the trace in `trace_dir`
  (`kernel_events`). Appends (start ns, name, ns) of every kernel to `sequence` if given."""
  times = collections.Counter()
  for start, name, _, ns in kernel_events(trace_dir):
    times[name] += ns
    if sequence is not None:
      sequence.append((start, name, ns))
  return dict(times)


def profile(fn, args, iters: int, sequence: list | None = None) -> dict[str, float]:
  """{kernel: ms per call} of `iters` traced calls of fn(*args), after a warm-up call. `sequence`
  receives (start ns, name, ns) of each kernel of the traced calls (GPU only)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(iters):
        jax.block_until_ready(fn(*args))
    times = device_kernel_times(trace_dir, sequence)
  return {name: ns / 1e6 / iters for name, ns in times.items()}


def print_sequence(sequence: list, iters: int, min_ms: float) -> list:
  """Prints the kernels of one call in launch order (those of at least min_ms), and returns them."""
  sequence = sorted(sequence)
  one_call = sequence[:len(sequence) // iters] if iters else sequence
  rows = [(name, ns / 1e6) for _, name, ns in one_call if ns / 1e6 >= min_ms]
  print(f'\n| # | kernel (one call, launch order, >= {min_ms} ms) | ms |\n| ---: | --- | ---: |')
  for i, (name, ms) in enumerate(rows):
    print(f'| {i} | `{name[:70]}` | {ms:.3f} |')
  return rows


def summarize(label: str, per_call: dict[str, float], top: int) -> dict:
  total = sum(per_call.values())
  kinds = collections.Counter()
  for name, ms in per_call.items():
    kinds[kind_of(name)] += ms
  print(f'\n## {label}: {total:.3f} ms of kernels per call\n')
  print('| kind | ms | share |\n| --- | ---: | ---: |')
  for kind, ms in kinds.most_common():
    print(f'| {kind} | {ms:.3f} | {ms / total:.1%} |')
  print(f'\n| kernel (top {top}) | kind | ms | share |\n| --- | --- | ---: | ---: |')
  for name, ms in sorted(per_call.items(), key=lambda kv: -kv[1])[:top]:
    print(f'| `{name[:90]}` | {kind_of(name)} | {ms:.3f} | {ms / total:.1%} |')
  return {'label': label, 'total_ms': total, 'kinds': dict(kinds), 'kernels': per_call}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--case', default='mixtral', choices=sorted(moe_layer.CASES))
  parser.add_argument('--family', default='top_k', choices=moe_layer.FAMILIES)
  parser.add_argument('--impl', default=moe_layer.FAST)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--small', action='store_true', help='CPU smoke run (float32, tiny case)')
  parser.add_argument('--tune', action='store_true',
                      help="first pick the grouped-matmul tilings as moe_layer.py --tune does")
  parser.add_argument('--sequence', type=float, default=0.0,
                      help='also list one call\'s kernels of at least this many ms, in launch order')
  parser.add_argument('--row-order', default=moe_layer.gm.ROW_ORDER,
                      choices=('expert_bands', 'snake'), help="gmm's tile order")
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)

  moe_layer.gm.ROW_ORDER = args.row_order
  case = moe_layer.SMOKE if args.small else moe_layer.CASES[args.case]
  dtype = jnp.float32 if args.small else jnp.bfloat16
  block_rows = 0 if args.small else moe_layer.fast_dispatch.default_block_rows(
      case.tokens * case.k, case.experts)
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}; {case}, {args.family}, '
        f'{args.impl}, block_rows {block_rows}')
  if args.tune:
    moe_layer.tune_kernels(case, dtype, iters=5)
  x, ct = moe_layer.inputs(case, dtype)
  init, apply = moe_layer.make_layer(case, args.family, args.impl, dtype, block_rows)
  params = moe_layer.cast_params(init(jax.random.key(2), x), dtype)
  _, grad = moe_layer.fwd_and_grad(apply)
  sequence = []
  moe = summarize(f'{case.name} {args.family} {args.impl} fwd+bwd',
                  profile(grad, (params, x, ct), args.iters, sequence), args.top)
  if args.sequence:
    moe['sequence'] = print_sequence(sequence, args.iters, args.sequence)

  dense = moe_layer.FeedForward(case.k * case.f, 'swiglu', dtype)
  dense_params = moe_layer.cast_params(dense.init(jax.random.key(3), x), dtype)
  _, dense_grad = moe_layer.fwd_and_grad(lambda p, v: dense.apply(p, v))
  ceiling = summarize(f'{case.name} dense SwiGLU d_ff={case.k * case.f} fwd+bwd (the ceiling)',
                      profile(dense_grad, (dense_params, x, ct), args.iters), args.top)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
                 'case': case.name, 'family': args.family, 'impl': args.impl,
                 'moe': moe, 'dense': ceiling}, f, indent=2)


if __name__ == '__main__':
  main()
