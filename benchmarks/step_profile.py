"""Where a training step's device time goes, by part of the model: attention, router + top-k,
permutation, routed experts, shared experts, norms, embedding + logits + loss, optimizer update,
collectives, the rest; forward and backward apart.

Each kernel of a `jax.profiler` trace names the HLO instruction that launched it (`hlo_op`); the
compiled HLO gives that instruction's opcode and source scope (`op_name`: the flax module path
and the named scopes 'route', 'permute', 'unpermute', 'loss', 'optimizer' that the layer and the
trainer open). `train_step.py --profile N` prints the table for its cases.

On GPU, XLA's command buffers (CUDA graphs) hide which instruction launched a kernel:
`disable_command_buffers()` (before JAX starts its backend) turns them off for a profile.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import tempfile

import jax
import jax.numpy as jnp

import moe_layer
import profile_layer

# (part, scope names), the first part with a scope on the op_name path wins (a scope may sit in a
# transformation's parentheses: jvp(loss)/...); collectives go by opcode first.
PARTS = (
    ('optimizer update', r'optimizer'),
    ('router + top-k', r'route'),
    ('permutation', r'(un)?permute'),
    ('shared experts', r'shared_experts'),
    ('routed experts', r'experts'),
    ('attention', r'(cross_)?attention'),
    ('norms', r'\w*_norm'),
    ('embedding, logits, loss', r'embed|unembed|loss'),
    ('MoE layer, rest (aux losses, metrics)', r'moe'),
)
COLLECTIVES = ('all-reduce', 'all-gather', 'all-to-all', 'reduce-scatter', 'collective-permute',
               'ragged-all-to-all')
COLLECTIVE = 'collectives'
REST = 'rest (residuals, casts, copies)'
UNNAMED = 'kernels without an HLO instruction (memcpy, memset)'
ORDER = [part for part, _ in PARTS] + [COLLECTIVE, REST, UNNAMED]

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_OPCODE = re.compile(r'(?<![\w\-.%])([a-z][a-z0-9\-]*)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')


@dataclasses.dataclass(frozen=True)
class Instruction:
  opcode: str
  op_name: str  # '' where the HLO carries no metadata


def instructions(hlo_text: str) -> dict[str, Instruction]:
  """{HLO instruction name: Instruction} of every computation of a compiled module's text. An
  instruction without an op_name (a fusion, often) takes its called computation's: the root's, or
  else the last one found there."""
  found, calls, scopes = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and '=' not in line.split('{')[0]:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rest = match.groups()
    opcode = _OPCODE.search(rest.split(', metadata=')[0])
    op_name = _OP_NAME.search(rest)
    found[name] = Instruction(opcode.group(1) if opcode else '', op_name.group(1) if op_name else '')
    called = _CALLS.search(rest)
    if called:
      calls[name] = called.group(1)
    if op_name and computation and (computation not in scopes or line.lstrip().startswith('ROOT')
                                    or not scopes[computation][1]):
      scopes[computation] = (op_name.group(1), line.lstrip().startswith('ROOT'))
  for name, computation in calls.items():
    if not found[name].op_name and computation in scopes:
      found[name] = dataclasses.replace(found[name], op_name=scopes[computation][0])
  return found


def part_of(instruction: Instruction | None) -> str:
  """The part of the step an HLO instruction belongs to (`PARTS`, collectives, or the rest)."""
  if instruction is None:
    return UNNAMED
  base = instruction.opcode.removesuffix('-start').removesuffix('-done')
  if base in COLLECTIVES:
    return COLLECTIVE
  return next((part for part, names in PARTS
               if re.search(rf'[/(]({names})([/)]|$)', instruction.op_name)), REST)


def direction_of(instruction: Instruction | None) -> str:
  """'backward' for the transposed (gradient) computation, else 'forward' (the optimizer update,
  outside both, counts as forward)."""
  return 'backward' if instruction and 'transpose(' in instruction.op_name else 'forward'


def attribute(events, table: dict[str, Instruction], iters: int) -> dict:
  """{part: {'forward': ms, 'backward': ms, 'launches': n, 'kernels': {kernel: ms}}} per step,
  of `events` ((start ns, kernel, hlo_op, ns), `profile_layer.kernel_events`) over `iters`
  steps."""
  parts = {part: {'forward': 0.0, 'backward': 0.0, 'launches': 0.0,
                  'kernels': collections.Counter()} for part in ORDER}
  for _, kernel, hlo_op, ns in events:
    instruction = table.get(hlo_op) if hlo_op else None
    part = parts[part_of(instruction)]
    ms = ns / 1e6 / iters
    part[direction_of(instruction)] += ms
    part['launches'] += 1 / iters
    part['kernels'][kernel] += ms
  return {name: {**p, 'kernels': dict(p['kernels'].most_common(5))} for name, p in parts.items()}


def profile_step(compiled, state, batch, iters: int):
  """Traces `iters` calls of compiled(state, batch) -> (state, metrics) (the state donated).
  Returns (parts as `attribute`, the final state)."""
  table = instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(iters):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    events = profile_layer.kernel_events(trace_dir)
  return attribute(events, table, iters), state


def markdown(label: str, parts: dict, step_ms: float | None = None,
             optimizer_floor: float | None = None, perfect: PerfectStep | None = None) -> str:
  """The table of one step's parts: forward, backward and total ms, and the share of kernel time;
  with `optimizer_floor` (ms, `optimizer_floor_ms`), a line on how far the update is from it;
  with `perfect` (`perfect_step`), a line on the step's bound."""
  total = sum(p['forward'] + p['backward'] for p in parts.values())
  lines = [f'### {label}: {total:.2f} ms of kernels per step'
           + (f' (step {step_ms:.2f} ms wall)' if step_ms else ''), '']
  if optimizer_floor is not None:
    update = parts['optimizer update']
    lines += [f"The optimizer update's floor at HBM bandwidth ({OPTIMIZER_BYTES_PER_PARAM} bytes "
              f"per parameter): {optimizer_floor:.2f} ms; measured "
              f"{update['forward'] + update['backward']:.2f} ms.", '']
  if perfect is not None:
    lines += [f'A perfect step: every useful FLOP at the dense matmul rate measured here '
              f'({perfect.dense_tflops:.3g} TFLOP/s), the update at its floor (or as measured '
              f'where the floor is unknown), every other part as measured: {perfect.ms:.2f} ms, '
              f'{perfect.useful_tflops:.3g} useful TFLOP/s'
              + ('' if perfect.mfu_useful is None else f', {perfect.mfu_useful:.1%} useful MFU')
              + '.', '']
  lines += ['| part | forward ms | backward ms | total ms | share | largest kernel |',
            '| --- | ---: | ---: | ---: | ---: | --- |']
  for name, p in sorted(parts.items(), key=lambda kv: -(kv[1]['forward'] + kv[1]['backward'])):
    both = p['forward'] + p['backward']
    if both == 0:
      continue
    top = next(iter(p['kernels']), '')
    lines.append(f"| {name} | {p['forward']:.3f} | {p['backward']:.3f} | {both:.3f} "
                 f"| {both / total:.1%} | `{top[:60]}` |")
  return '\n'.join(lines)


# HBM bandwidth (vendor figures, bytes/s) by the start of `Device.device_kind`.
HBM_BANDWIDTH = {'NVIDIA H100': 3.35e12, 'NVIDIA H200': 4.8e12}
# Bytes the `optimizer` scope moves per float32 parameter at the least: AdamW reads parameter,
# gradient and two moments and writes parameter and moments (7 x 4). Clipping's global norm and
# the bf16 weight cast fuse into the kernels that produce the gradients and consume the weights
# (on an H100 the scope measured 22.2 ms for 2.352B parameters: 89% of this floor's bandwidth).
OPTIMIZER_BYTES_PER_PARAM = 7 * 4


def optimizer_floor_ms(params: int, device_kind: str) -> float | None:
  """The least time AdamW's update can take per step on a GPU of `device_kind`: its bytes
  (OPTIMIZER_BYTES_PER_PARAM) at the HBM bandwidth. None for a device not in HBM_BANDWIDTH."""
  bandwidth = next((bw for kind, bw in HBM_BANDWIDTH.items() if device_kind.startswith(kind)),
                   None)
  return None if bandwidth is None else 1e3 * params * OPTIMIZER_BYTES_PER_PARAM / bandwidth


# Parts whose time is matmuls (attention's projections and flash kernels included): a perfect step
# runs their useful FLOPs at the dense matmul rate. The other parts are memory-bound.
MATMUL_PARTS = ('attention', 'routed experts', 'shared experts', 'embedding, logits, loss')


@dataclasses.dataclass(frozen=True)
class PerfectStep:
  """`perfect_step`'s bound: its ms, the useful TFLOP/s and MFU (None without a peak) it would
  give, and the dense rate it assumes."""
  ms: float
  useful_tflops: float
  mfu_useful: float | None
  dense_tflops: float


def perfect_step(parts: dict, useful_flops: float, dense_tflops: float,
                 optimizer_floor: float | None, peak_tflops: float | None) -> PerfectStep:
  """The bound of a step of `parts` (`attribute`'s, per step) on its GPU: `useful_flops` (the
  step's, forward and backward) all at `dense_tflops`, the optimizer update at `optimizer_floor`
  ms (as measured where None), every other part (norms, permutation, router, the rest) as
  measured. No step with these parts can beat it without making those parts faster."""
  measured = {name: p['forward'] + p['backward'] for name, p in parts.items()}
  update = measured['optimizer update'] if optimizer_floor is None else optimizer_floor
  other = sum(ms for name, ms in measured.items()
              if name not in MATMUL_PARTS and name != 'optimizer update')
  ms = 1e3 * useful_flops / (dense_tflops * 1e12) + update + other
  tflops = useful_flops / ms / 1e9
  return PerfectStep(ms, tflops, None if peak_tflops is None else tflops / peak_tflops,
                     dense_tflops)


def dense_matmul_tflops(n: int, iters: int = 10) -> float:
  """The rate of one [n, n] x [n, n] bfloat16 matmul on the default device, TFLOP/s (median wall
  time of `iters` synchronized calls, `moe_layer.time_ms`): the rate `perfect_step` holds every
  matmul to (8192 on an H100: ~798)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  return 2 * n ** 3 / moe_layer.time_ms(jax.jit(jnp.matmul), a, a, iters=iters) / 1e9


def disable_command_buffers() -> None:
  """Turns XLA:GPU's command buffers off (appends to XLA_FLAGS), so that every kernel of a trace
  names its HLO instruction. Call before JAX starts its backend; a no-op on CPU."""
  flag = '--xla_gpu_enable_command_buffer='
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
