"""MFU of a full MoE LM training step (~1B total parameters) on one GPU.

The model is `moe_jax.models.transformer.Transformer` with an MoE FFN in every block (token choice,
E=8, k=2, capacity factor 1.25), bf16 compute, float32 parameters, and the training step of
`moe_jax.run.train` (next-byte cross-entropy + MoE aux loss, global-norm clipping, AdamW), jit'd with
the state donated. Tokens are random ints (vocab 256): this measures throughput, not learning.

MFU = model FLOPs per step / step time / peak. Model FLOPs per step = 3 x forward FLOPs (fwd + bwd)
x tokens, forward FLOPs per token from `transformer.transformer_flops`:
  * 'executed': experts count as executed by capacity buffers (E * C slots per group, capacity
    padding included; attention scores over the full [L, L] matrix), the repo's convention;
  * 'useful': only the k * T routed expert slots count (the same function with dropless routing),
    and only the causal half of the attention scores (what a kernel that skips masked blocks runs);
  * 'kept': useful less the routed expert FLOPs of the assignments capacity dropped (measured each
    step from the layers' `assignments_dropped`). With capacity the 'blocked' kernels run only the
    kept assignments, so 'useful' overstates the work done when tokens drop; 'kept' does not.
    Dropless (`--capacity-factor none`) drops nothing: kept = useful.
Peak: H100 / H200 SXM dense bf16, 989 TFLOP/s (the datasheet figure without sparsity; the H200 has
the H100's matrix units). `--shapes` adds a Mixtral-like and a DeepSeek-like model, and
deepseek_moe_2b's gpu preset (`SHAPES`).

  python benchmarks/train_step.py --out train_step.json    # GPU: ~1B model, gather and blocked
  python benchmarks/train_step.py --shapes mixtral,deepseek --dispatch blocked --big-batch 0
  python benchmarks/train_step.py --shapes mixtral --capacity-factor none,1.25 --dispatch blocked
  python benchmarks/train_step.py --shapes deepseek,mixtral --capacity-factor none \
      --dispatch blocked --big-batch 0 --profile 3  # and where each step's device time goes
  python benchmarks/train_step.py --small                  # CPU smoke run, seconds
  python benchmarks/train_step.py --deterministic ...      # the same with XLA's deterministic ops
  python benchmarks/train_step.py --shapes deepseek,mixtral --capacity-factor none \
      --dispatch blocked --big-batch 0 --peer torch  # and the same model and step in PyTorch

`--peer torch` adds a column: the same model and training step in PyTorch (`torch_peer.py`, its
experts by `torch._grouped_mm`, always dropless), timed in this process on the same GPU before JAX
takes its memory, its useful MFU counted with our useful FLOPs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_jax import reproducibility  # noqa: E402
from moe_jax.models import transformer  # noqa: E402
from moe_jax.models.transformer import Transformer, TransformerConfig  # noqa: E402
from moe_jax.moe import flops  # noqa: E402
from moe_jax.moe.spec import MoESpec  # noqa: E402
from moe_jax.run import tasks, train  # noqa: E402
from moe_jax.run.train import TrainConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_profile  # noqa: E402
from moe_layer import elapsed, log  # noqa: E402

# `--peer` choices: name -> (the package it needs, its module here, the module's run function,
# (case, warmup, steps, hyper, compile_model) -> {'step_ms', 'params', 'compiled', ...}). The
# module's `release()` frees the GPU for JAX.
PEERS = {'torch': ('torch', 'torch_peer', 'run_torch_case')}

PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (no sparsity)
PEAK_NAME = 'H100/H200 SXM dense bf16 989 TFLOP/s'

# Model shapes (`--shapes`). 'base': the ~1B model of docs/performance.md (its width, depth, expert
# width follow --d-ff / --layers). 'mixtral': Mixtral-8x7B's block (d 4096, 32 heads, 8 experts of
# f 14336, top-2) at 2 blocks, so that float32 parameters and AdamW state (~46 GB) fit one GPU.
# 'deepseek': DeepSeekMoE-16B's block (d 2048, 16 heads, 64 experts of f 1408, top-6, 2 shared
# experts) at 4 blocks (2.3B parameters). Both route with capacity factor 1.25 like 'base'.
SHAPES = {
    'base': dict(d_model=2048, num_heads=16),
    'mixtral': dict(d_model=4096, num_heads=32, num_layers=2, d_ff=14336, num_experts=8, k=2),
    'deepseek': dict(d_model=2048, num_heads=16, num_layers=4, d_ff=1408, num_experts=64, k=6,
                     num_shared_experts=2),
    # configs/papers/deepseek_moe_2b.py at scale=gpu (its blocks, widths and routing; vocabulary
    # 256 here): the shape of benchmarks/paper_scale.py's run of that preset.
    'deepseek_moe_2b': dict(d_model=1280, num_heads=10, num_layers=9, d_ff=880, num_experts=63,
                            k=7, num_shared_experts=1),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int  # each expert's hidden width
  batch_size: int
  seq_len: int
  dispatch: str
  num_experts: int = 8
  k: int = 2
  capacity_factor: float | None = 1.25  # None: dropless
  attention: str = 'auto'  # TransformerConfig.attention: 'auto' is cuDNN's fused kernel on GPU
  num_shared_experts: int = 0  # DeepSeekMoE's always-on experts (one dense FFN of n * d_ff)
  microbatches: int = 1  # gradient accumulation: one optimizer update per this many batches

  def model(self) -> Transformer:
    cfg = TransformerConfig(d_model=self.d_model, num_layers=self.num_layers,
                            num_heads=self.num_heads, d_ff=self.d_ff, moe_every=1,
                            dtype='bfloat16', attention=self.attention)
    return Transformer(cfg, self.spec())

  def spec(self, **changes) -> MoESpec:
    return MoESpec(router='token_choice', num_experts=self.num_experts, d_ff=self.d_ff, k=self.k,
                   capacity_factor=self.capacity_factor, group_by='sequence', priority='token',
                   num_shared_experts=self.num_shared_experts,
                   dispatch=self.dispatch).replace(**changes)

  @property
  def tokens(self) -> int:
    """Tokens per optimizer update: microbatches x batch_size x seq_len."""
    return self.microbatches * self.batch_size * self.seq_len

  def train_config(self) -> TrainConfig:
    return TrainConfig(microbatches=self.microbatches)

  def _count(self, fn, spec):
    return fn(spec, self.model().config, flops.Shape(self.batch_size, self.seq_len))

  def forward_flops_per_token(self, useful: bool = False) -> float:
    """As executed (capacity padding and the full [L, L] score matrix counted), or useful: exactly
    k expert slots per token and only the causal half of the scores (L(L+1)/2 of L^2 entries)."""
    if not useful:
      return self._count(transformer.transformer_flops, self.spec())
    full = self._count(transformer.transformer_flops,
                       self.spec(capacity_factor=None, dispatch='gather'))
    masked = 4.0 * self.d_model * self.seq_len * (1 - (self.seq_len + 1) / (2 * self.seq_len))
    return full - self.num_layers * masked

  def step_flops(self, useful: bool = False) -> float:
    """Model FLOPs of a training step: 3 x forward (fwd + bwd) x tokens."""
    return 3.0 * self.forward_flops_per_token(useful) * self.tokens

  def routed_flops_per_token(self) -> float:
    """Forward FLOPs of the k routed expert FFNs of one token, over all blocks (SwiGLU: three
    d x f matrices)."""
    return self.num_layers * self.k * 2.0 * 3 * self.d_model * self.d_ff

  def params(self) -> tuple[int, float]:
    """(total, active per token); active counts k experts (the routing's, not the padding)."""
    total, _ = self._count(transformer.transformer_params, self.spec())
    _, active = self._count(transformer.transformer_params,
                            self.spec(capacity_factor=None, dispatch='gather'))
    return total, active


def make_step(model: Transformer, cfg: TrainConfig):
  """`moe_jax.run.train.train_step` of the LM task on one device, jit'd with the state donated:
  (state, batch [B, L + 1]) -> (state, (loss, the layers' mean share of assignments dropped))."""

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    state, metrics = train.train_step(state, batch, jax.random.key(2), task=tasks.LM,
                                      model=model, cfg=cfg)
    layers = metrics['layers'].values()
    return state, (metrics['train_loss'],
                   jnp.mean(jnp.stack([m['assignments_dropped'] for m in layers])))

  return step


def run_case(case: Case, warmup: int, steps: int, peak: float | None,
             profile_steps: int = 0) -> dict:
  """Compiles and times `case`'s step; with profile_steps > 0, then traces that many steps and
  adds their device time by part of the model ('parts', `step_profile.attribute`)."""
  model, cfg = case.model(), case.train_config()
  # Parameters do not depend on the batch shape or the dispatch implementation.
  init_model = Transformer(model.config, case.spec(dispatch='gather'))
  state = jax.jit(lambda rng: train.init_state(init_model, cfg, rng, jax.ShapeDtypeStruct(
      (1, min(case.seq_len, 128)), jnp.int32)))(jax.random.key(0))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state['params']))
  total, active = case.params()
  assert n_params == total, (n_params, total)  # the analytic count matches the model
  batch = jax.random.randint(jax.random.key(1),
                             (case.microbatches * case.batch_size, case.seq_len + 1), 0,
                             TransformerConfig.vocab_size, jnp.int32)
  step = make_step(model, cfg)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = {}
  try:
    analysis = compiled.memory_analysis()
    mem = {'temp_gb': analysis.temp_size_in_bytes / 1e9,
           'argument_gb': analysis.argument_size_in_bytes / 1e9}
  except Exception:  # not every backend reports it
    pass
  log(f'{case.name}: compiled in {compile_s:.1f}s {mem}')

  times, losses, drops = [], [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, (loss, dropped) = compiled(state, batch)
    jax.block_until_ready((state, loss, dropped))
    dt = time.perf_counter() - t0
    if i >= warmup:
      times.append(dt)
      drops.append(float(dropped))
    losses.append(float(loss))
  step_s = statistics.median(times)
  executed, useful = case.step_flops(), case.step_flops(useful=True)
  dropped = statistics.mean(drops)  # of the timed steps
  kept = useful - 3.0 * case.routed_flops_per_token() * case.tokens * dropped
  result = {
      'name': case.name, 'config': dataclasses.asdict(case),
      'params_total': total, 'params_active': active, 'tokens_per_step': case.tokens,
      'step_ms': 1e3 * step_s, 'step_ms_all': [1e3 * t for t in times],
      'tokens_per_s': case.tokens / step_s,
      'step_flops_executed': executed, 'step_flops_useful': useful,
      'assignments_dropped': dropped, 'step_flops_kept': kept,
      'tflops_executed': executed / step_s / 1e12, 'tflops_useful': useful / step_s / 1e12,
      'tflops_kept': kept / step_s / 1e12,
      'mfu_executed': None if peak is None else executed / step_s / 1e12 / peak,
      'mfu_useful': None if peak is None else useful / step_s / 1e12 / peak,
      'mfu_kept': None if peak is None else kept / step_s / 1e12 / peak,
      'compile_s': compile_s, 'losses': losses, **mem,
  }
  if profile_steps:
    result['parts'], state = step_profile.profile_step(compiled, state, batch, profile_steps)
    result['optimizer_floor_ms'] = step_profile.optimizer_floor_ms(
        total, jax.devices()[0].device_kind)
  log(f'{case.name}: step {result["step_ms"]:.1f} ms (all {[round(t, 1) for t in result["step_ms_all"]]}), '
      f'{result["tflops_executed"]:.0f} / {result["tflops_useful"]:.0f} / {result["tflops_kept"]:.0f} '
      f'TFLOP/s executed / useful / kept, {100 * dropped:.1f}% assignments dropped, '
      f'loss {losses[0]:.3f} -> {losses[-1]:.3f}')
  del state, compiled  # the memory the dense matmul below needs
  if profile_steps:
    dense = step_profile.dense_matmul_tflops(8192 if jax.default_backend() == 'gpu' else 256)
    perfect = step_profile.perfect_step(result['parts'], useful, dense,
                                        result['optimizer_floor_ms'], peak)
    result['perfect_step'] = dataclasses.asdict(perfect)
    print(step_profile.markdown(case.name, result['parts'], result['step_ms'],
                                result['optimizer_floor_ms'], perfect), flush=True)
  return result


def load_peer(name: str):
  """The `--peer` module (`PEERS`), imported; exits with status 2 and one line when the package it
  needs is not installed."""
  package, module, _ = PEERS[name]
  if importlib.util.find_spec(package) is None:
    print(f'train_step.py: --peer {name} needs {package}, which is not installed', file=sys.stderr)
    sys.exit(2)
  return importlib.import_module(module)


def peer_hyper(case: Case) -> dict:
  """Our step's optimizer and aux-loss hyper-parameters, for a peer to copy."""
  cfg, spec = case.train_config(), case.spec()
  return dict(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
              clip_norm=cfg.clip_norm, load_balancing_coef=spec.load_balancing_coef,
              z_loss_coef=spec.z_loss_coef)


def peer_case(case: Case) -> Case | None:
  """The case as a peer runs it: dropless, whatever our dispatch and attention; None with
  gradient accumulation (a peer times one batch per update)."""
  if case.microbatches > 1:
    return None
  return dataclasses.replace(case, name='peer', dispatch='gather', attention='auto',
                             capacity_factor=None)


def run_peers(name: str, cases: list[Case], warmup: int, steps: int, budget_s: float,
              compile_model: bool = True) -> dict:
  """{peer_case: the peer's result} for `cases`, each distinct peer case run once: its step time,
  useful TFLOP/s (our useful FLOPs), or {'error'}. Runs before JAX starts its backends."""
  module = load_peer(name)
  run = getattr(module, PEERS[name][2])
  todo = {}
  for case in cases:
    if (peer := peer_case(case)) is not None:
      todo.setdefault(peer, case.name)
  results = {}
  for case, label in todo.items():
    if elapsed() > budget_s:
      log(f'{name} peer of {label}: skipped, past --budget-s={budget_s}')
      continue
    try:
      result = run(case, warmup, steps, peer_hyper(case), compile_model)
      total, _ = case.params()
      assert result['params'] == total, (result['params'], total)  # the same model
      result['tflops_useful'] = case.step_flops(useful=True) / result['step_ms'] * 1e3 / 1e12
      results[case] = result
      log(f'{name} peer of {label}: step {result["step_ms"]:.1f} ms (compiled '
          f'{result["compiled"]}, {result["grouped_mm"]}), {result["tflops_useful"]:.0f} TFLOP/s '
          f'useful, loss {result["losses"][0]:.3f} -> {result["losses"][-1]:.3f}')
    except Exception as e:  # e.g. out of memory: report it and go on
      traceback.print_exc()
      results[case] = {'error': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'}
  module.release()
  return results


def check_attention(batch: int = 2, length: int = 2048, heads: int = 16, head_dim: int = 128,
                    tolerance: float = 2e-2) -> dict:
  """cuDNN's fused causal attention against the XLA reference (`causal_attention`), bf16, output
  and the gradients of q, k, v (of a random cotangent): the worst relative error (max |diff| /
  max |reference|). Raises AssertionError above `tolerance`."""
  from moe_jax.models.transformer import causal_attention
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16)
                for key in keys)
  errors = {}
  outputs = {}
  for impl in ('xla', 'cudnn'):
    fn = functools.partial(causal_attention, implementation=impl)
    out, vjp = jax.vjp(fn, q, k, v)
    outputs[impl] = (out, *vjp(g))
  for name, ref, got in zip(('out', 'dq', 'dk', 'dv'), outputs['xla'], outputs['cudnn']):
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    errors[name] = float(np.abs(ref - got).max() / np.abs(ref).max())
  log(f'attention check, cudnn vs xla (bf16, [{batch}, {length}, {heads}, {head_dim}]): '
      + ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
  assert max(errors.values()) < tolerance, errors
  return errors


def _parse_cf(text: str) -> float | None:
  return None if text.lower() == 'none' else float(text)


def _cf_name(cf: float | None) -> str:
  return 'dropless' if cf is None else f'cf{cf:g}'


def _count(n: float) -> str:
  return f'{n / 1e9:.3f}B' if n >= 1e8 else f'{n / 1e6:.3f}M'


def _pct(x):
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def _peer_cell(peer: dict) -> str:
  """'step ms / useful MFU', noting an eager run or a grouped matmul other than the fused one."""
  if 'error' in peer:
    return f'failed: {peer["error"][:60]}'
  notes = ('' if peer['compiled'] else ', eager') + (
      '' if peer['grouped_mm'] == 'grouped_mm' else f", {peer['grouped_mm']}")
  return f"{peer['step_ms']:.1f} / {_pct(peer['mfu_useful'])}{notes}"


def table(results: list[dict], peak_name: str, peer: str | None = None) -> str:
  """The results as a markdown table; with a peer, a column of its step ms and useful MFU."""
  peer = peer if any('peer' in r for r in results) else None

  lines = [
      f'MFU against {peak_name}; TFLOP/s and MFU as executed (capacity padding and full [L, L] '
      'scores counted) / useful (k·T expert slots, causal half of the scores) / kept (useful less '
      'the dropped assignments); fwd+bwd = 3 x forward FLOPs.', '',
      '| config | params total / active | tokens/step | step ms | dropped | TFLOP/s exec / useful '
      '/ kept | MFU exec / useful / kept |' + (f' {peer} step ms / useful MFU |' if peer else ''),
      '| --- ' * (8 if peer else 7) + '|']
  for r in results:
    c = r['config']
    shared = f"+{c['num_shared_experts']} shared" if c.get('num_shared_experts') else ''
    m = c.get('microbatches', 1)
    accumulated = f' x {m} microbatches' if m > 1 else ''
    cfg = (f"{r['name']}: d={c['d_model']}, L={c['num_layers']}, H={c['num_heads']}, "
           f"E={c['num_experts']}{shared}, k={c['k']}, f={c['d_ff']}, cf={c['capacity_factor']}, "
           f"B={c['batch_size']}x{c['seq_len']}{accumulated}, {c['dispatch']}, "
           f"attention {c['attention']}")
    peer_cell = (f" {_peer_cell(r['peer']) if 'peer' in r else ''} |" if peer else '')
    if 'error' in r:
      lines.append(f'| {cfg} | | | failed: {r["error"][:80]} | | | |{peer_cell}')
      continue
    lines.append(
        f"| {cfg} | {_count(r['params_total'])} / {_count(r['params_active'])} "
        f"| {r['tokens_per_step']} | {r['step_ms']:.1f} | {_pct(r['assignments_dropped'])} "
        f"| {r['tflops_executed']:.3g} / {r['tflops_useful']:.3g} / {r['tflops_kept']:.3g} "
        f"| {_pct(r['mfu_executed'])} / {_pct(r['mfu_useful'])} / {_pct(r['mfu_kept'])} |"
        + peer_cell)
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--small', action='store_true', help='tiny model, CPU smoke run')
  parser.add_argument('--out', default=None, help='JSON results path')
  parser.add_argument('--dispatch', default='gather,blocked', help='comma-separated dispatches')
  parser.add_argument('--attention', default='auto',
                      help="comma-separated attention implementations: auto (cuDNN's fused kernel "
                           "on GPU), xla (materialized float32 scores), cudnn")
  parser.add_argument('--shapes', default='base',
                      help=f'comma-separated model shapes: {", ".join(SHAPES)} (see SHAPES)')
  parser.add_argument('--batch', type=int, default=8, help='sequences per step (seq_len 2048)')
  parser.add_argument('--microbatches', default='1',
                      help='comma-separated counts of batches of --batch sequences accumulated per '
                           'optimizer update (config.train.microbatches)')
  parser.add_argument('--big-batch', type=int, default=16,
                      help='after the others, rerun the fastest dispatch at this batch (0: skip)')
  parser.add_argument('--capacity-factor', default='1.25',
                      help="comma-separated capacity factors; 'none': dropless")
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--d-ff', type=int, default=2304, help='expert hidden width')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--check-only', action='store_true',
                      help='on GPU: only check cuDNN attention against the XLA reference')
  parser.add_argument('--budget-s', type=float, default=330.0,
                      help='start no new case after this many seconds')
  parser.add_argument('--profile', type=int, default=0, metavar='N',
                      help='after timing, trace N steps of each case and print their device time '
                           'by part of the model (attention, router, permutation, experts, '
                           'optimizer, ...); turns XLA:GPU command buffers off for the whole run')
  parser.add_argument('--peer', choices=sorted(PEERS), default=None,
                      help='first time the same model and step in this framework (torch_peer.py) '
                           'and add its step time and useful MFU to each row')
  parser.add_argument('--peer-eager', action='store_true',
                      help='run the peer eagerly (default: torch.compile, eager if that fails)')
  parser.add_argument('--deterministic', action='store_true',
                      help='XLA:GPU deterministic ops (config.deterministic): run once with and '
                           'once without to measure its cost')
  args = parser.parse_args()
  if args.peer:
    load_peer(args.peer)  # fails fast when its package is missing
  reproducibility.configure(args.deterministic)  # before JAX starts its backends
  if args.profile:
    step_profile.disable_command_buffers()

  dispatches = [d.strip() for d in args.dispatch.split(',') if d.strip()]
  attentions = [a.strip() for a in args.attention.split(',') if a.strip()]
  factors = [_parse_cf(c.strip()) for c in args.capacity_factor.split(',') if c.strip()]
  microbatches = [int(m) for m in args.microbatches.split(',') if m.strip()]
  if args.small:
    base = dict(d_model=64, num_layers=1, num_heads=4, d_ff=128, seq_len=64)
    cases = [Case(f'small-{d}-{_cf_name(cf)}' + (f'-x{m}' if m > 1 else ''), batch_size=2,
                  dispatch=d, capacity_factor=cf, microbatches=m, **base)
             for m in microbatches for cf in factors for d in dispatches]
    big = None
    args.warmup, args.steps = 1, 3
  else:
    cases = []
    for shape in [s.strip() for s in args.shapes.split(',') if s.strip()]:
      base = {**dict(num_layers=args.layers, d_ff=args.d_ff, seq_len=2048), **SHAPES[shape]}
      prefix = '' if shape == 'base' else f'{shape}-'
      cases += [Case(f'{prefix}{d}-{a}-{_cf_name(cf)}-b{args.batch}' + (f'x{m}' if m > 1 else ''),
                     batch_size=args.batch, dispatch=d, attention=a, capacity_factor=cf,
                     microbatches=m, **base)
                for m in microbatches for cf in factors for a in attentions for d in dispatches]
    big = args.big_batch or None
  # A peer runs first: JAX takes most of the GPU's memory when it starts its backends.
  peers = (run_peers(args.peer, cases, args.warmup, args.steps, args.budget_s,
                     not args.peer_eager) if args.peer and not args.check_only else {})

  device = jax.devices()[0]
  on_gpu = device.platform == 'gpu'
  peak = PEAK_TFLOPS if on_gpu else None
  peak_name = PEAK_NAME if on_gpu else 'no peak (CPU run)'
  log(f'jax {jax.__version__}, {device.platform}: {device.device_kind}')
  attention_check = check_attention() if on_gpu else None  # before any timing
  if args.check_only:
    return
  results = []

  def save():
    out = {'jax': jax.__version__, 'device': device.device_kind, 'platform': device.platform,
           'xla_gpu_deterministic_ops': reproducibility.deterministic_flag_set(),
           'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'attention_check': attention_check,
           'peak_tflops': peak, 'peak': peak_name, 'peer': args.peer, 'results': results}
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(out, f, indent=2)

  def attempt(case):
    if elapsed() > args.budget_s:
      log(f'{case.name}: skipped, past --budget-s={args.budget_s}')
      return
    try:
      results.append(run_case(case, args.warmup, args.steps, peak, args.profile))
    except Exception as e:  # e.g. out of memory: report it and go on
      traceback.print_exc()
      results.append({'name': case.name, 'config': dataclasses.asdict(case),
                      'error': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'})
    peer = peers.get(peer_case(case))
    if peer is not None:
      results[-1]['peer'] = peer if 'error' in peer else {
          **peer, 'mfu_useful': None if peak is None else peer['tflops_useful'] / peak}
    save()

  for case in cases:
    attempt(case)
  ok = [r for r in results if 'error' not in r and not r['name'].startswith(
      tuple(f'{shape}-' for shape in SHAPES))]  # the base shape's rows
  if big and ok:
    best = min(ok, key=lambda r: r['step_ms'])
    config = best['config']
    attempt(dataclasses.replace(Case(**config), batch_size=big,
                                name=f"{config['dispatch']}-{config['attention']}-b{big}"))
  save()
  text = table(results, peak_name, args.peer)
  print()
  print(text)
  if args.out:
    with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
      f.write(f'jax {jax.__version__}, {device.device_kind}\n\n{text}\n')


if __name__ == '__main__':
  main()
