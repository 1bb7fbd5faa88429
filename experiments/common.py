"""Shared machinery of the claim reproductions: their sweeps, running seeds, statistics, verdicts.

A claim module (`experiments/<claim>.py`) defines `STATEMENT`, `SOURCE`, `get_config(scale)` (a
sweep config: `base`, `members`, `size_experts`, `flops_tolerance`, plus `task` ('lm' or 'vit')
and `seeds`; its base is a config of configs/ at the claim's scale, e.g.
`configs/lm_tiny.py:scale=gpu`) and `verdict(results) -> Verdict`. `run_claim` trains every member
with every seed into `workdir/<member>/seed_<s>/` (finished runs are skipped, so a crashed table
resumes) and hands the verdict the per-run numbers of `run_numbers`.

Statistics: every member runs with the same seeds (same data order and initialization key), so
members are compared by paired differences; an interval is the mean +- the two-sided 95%
Student-t half-width of n seeds (t * sd / sqrt(n)), wide by design when n is small.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np
from scipy import stats

from configs import lm_tiny, vit_digits
from configs.common import SCALES  # noqa: F401 (the scales of every claim; --scale)
from moe_jax import reproducibility
from moe_jax.run import run_dir

REPO = pathlib.Path(__file__).resolve().parent.parent
BASES = {'lm': lm_tiny, 'vit': vit_digits}  # each task's base config (`at_scale` presets)


def sweep_config(task: str, scale: str, members: dict, *, flops_match: str,
                 size_experts: bool = True, flops_tolerance: float = 0.02,
                 seeds: Sequence[int] | None = None,
                 base_changes: Callable | None = None) -> ml_collections.ConfigDict:
  """A claim's sweep: the task's base config at `scale` (`BASES`; changed by
  `base_changes(base)`), `members` sized and checked at equal FLOPs by the paper's convention
  `flops_match` ('active' or 'executed', see moe_jax/moe/flops.py), 3 seeds at cpu scale and 5 at gpu
  scale unless `seeds`."""
  config = ml_collections.ConfigDict()
  config.task = task
  config.scale = scale
  config.base = BASES[task].get_config(f'scale={scale}')
  if base_changes is not None:
    base_changes(config.base)
  config.size_experts = size_experts
  config.flops_tolerance = flops_tolerance
  config.flops_match = flops_match
  config.seeds = list(seeds if seeds is not None else (range(3) if scale == 'cpu' else range(5)))
  config.members = ml_collections.ConfigDict(members, sort_keys=False)
  return config


# --- Running -----------------------------------------------------------------------------------


def run_claim(module, scale: str, workdir: pathlib.Path, *, seeds: int | None = None,
              data_dir: str | None = None, log: Callable = print) -> 'Verdict':
  """Trains every member x seed of `module.get_config(scale)` into `workdir` and returns the
  verdict. seeds: use only the first `seeds` seeds; data_dir: the TFDS data dir of every run."""
  claim = module.get_config(scale)
  chosen = list(claim.seeds)[:seeds] if seeds else list(claim.seeds)
  if len(chosen) < 2:
    raise ValueError(f'--seeds={seeds} is too few: an interval needs at least 2 seeds.')
  if data_dir is not None:
    claim.base.data.data_dir = data_dir
  reproducibility.configure_from(claim.base)  # before building members starts JAX's backends
  from moe_jax.run import sweep, train  # heavy imports only when a claim runs
  members = sweep.build_members(claim)  # validates and checks equal FLOPs before any training
  workdir.mkdir(parents=True, exist_ok=True)
  results = {}
  for name, config in members.items():
    results[name] = []
    for seed in chosen:
      directory = workdir / name / f'seed_{seed}'
      config = ml_collections.ConfigDict(config.to_dict())
      config.seed = seed
      if run_dir.finished_summary(directory, config.train.steps) is not None:
        log(f'  {name} seed {seed}: finished earlier, reused')
      else:
        start = time.perf_counter()
        train.train(config, directory)
        log(f'  {name} seed {seed}: trained in {time.perf_counter() - start:.0f} s')
      results[name].append(run_numbers(directory))
    results[name] = {'description': sweep.describe(config), 'runs': results[name]}
  train_s = sum(run.get('wall_s') or 0.0 for result in results.values() for run in result['runs'])
  return dataclasses.replace(check_not_overfit(module.verdict(results), results), train_s=train_s)


# A run whose final held-out loss is more than this far (relative) above its best evaluation has
# overfit: comparing final losses would then compare how fast members memorize.
OVERFIT_TOLERANCE = 0.01


def check_not_overfit(verdict: 'Verdict', results: dict) -> 'Verdict':
  """`verdict`, or, if any run's held-out loss rose above its best by > OVERFIT_TOLERANCE, the
  same verdict marked not reproduced and INVALID, naming the worst run of each member."""
  worst = {name: max(run['overfit'] for run in result['runs']) for name, result in results.items()}
  over = {name: rise for name, rise in worst.items() if rise > OVERFIT_TOLERANCE}
  note = ('held-out loss at the end vs its best evaluation, worst seed: ' + ', '.join(
      f'{name} {rise:+.1%}' for name, rise in worst.items()) + f' (tolerance {OVERFIT_TOLERANCE:.0%})')
  if not over:
    return dataclasses.replace(verdict, notes=verdict.notes + (note,))
  return dataclasses.replace(
      verdict, reproduced=False, notes=verdict.notes + (note,),
      summary=verdict.summary + f'; INVALID comparison: the runs overfit (held-out loss rose '
      f'{max(over.values()):.1%} above its best in {", ".join(over)}); train for fewer steps')


def spike_count(losses: Sequence[float], window: int = 10, threshold: float = 0.1) -> int:
  """Loss spikes: logged steps t >= window whose loss exceeds the median of the `window`
  previous logged losses by more than `threshold` (relative), loss_t > (1 + threshold) * median."""
  losses = np.asarray(losses, float)
  return int(sum(losses[t] > (1 + threshold) * np.median(losses[t - window:t])
                 for t in range(window, len(losses))))


def run_numbers(directory: pathlib.Path) -> dict:
  """The numbers a verdict reads from one finished run directory: its summary (eval_loss, ...),
  'dropped' (final fraction of tokens dropped, mean over MoE layers; 0 for dense), 'spikes'
  (`spike_count` of the logged training losses), 'max_jump' (the largest relative rise of the
  training loss over the median of the 10 previous logged losses) and 'overfit' (the final
  held-out loss relative to the lowest of the run's evaluations, minus 1; 0 when the last is best)."""
  from moe_jax.run import report
  run = report.read_run(directory)
  losses = [m['train_loss'] for m in run['metrics']]
  dropped = [values[-1] for values in report.moe_series(run['metrics'], 'fraction_dropped').values()]
  jumps = [losses[t] / np.median(losses[t - 10:t]) - 1 for t in range(10, len(losses))]
  evals = [m['eval_loss'] for m in run['metrics'] if m.get('eval_loss') is not None]
  return {**run['summary'], 'dropped': float(np.mean(dropped)) if dropped else 0.0,
          'spikes': spike_count(losses), 'max_jump': max(jumps, default=math.nan),
          'overfit': evals[-1] / min(evals) - 1 if evals else 0.0}


# --- Statistics and verdicts -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean and 95% Student-t half-width of n values."""
  mean: float
  half_width: float
  n: int

  @classmethod
  def of(cls, values: Sequence[float]) -> 'Interval':
    values = np.asarray(values, float)
    n = len(values)
    half = (stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return cls(float(values.mean()), float(half), n)

  @property
  def low(self) -> float:
    return self.mean - self.half_width

  @property
  def high(self) -> float:
    return self.mean + self.half_width

  def format(self, digits: int = 4) -> str:
    return f'{self.mean:.{digits}f} ± {self.half_width:.{digits}f}'


def values(results: dict, member: str, metric: str) -> list[float]:
  return [float(run[metric]) for run in results[member]['runs']]


def paired(results: dict, member: str, baseline: str, metric: str) -> Interval:
  """Interval of the per-seed differences member - baseline of `metric`."""
  return Interval.of(np.subtract(values(results, member, metric),
                                 values(results, baseline, metric)))


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A claim's outcome: 'reproduced' or 'not reproduced', the key numbers in one line, and the
  rows of its table ({member: {column: text}})."""
  reproduced: bool
  summary: str
  rows: dict
  notes: tuple[str, ...] = ()
  train_s: float = 0.0  # the runs' summed wall time (set by `run_claim`)

  @property
  def label(self) -> str:
    return 'reproduced' if self.reproduced else 'not reproduced'


def member_rows(results: dict, metrics: Sequence[tuple[str, str, int]]) -> dict:
  """{member: {column: text}}: the description, forward FLOPs/token by both conventions (active:
  k experts per token; executed: capacity padding counts), total and active params and, for each
  (metric, column title, digits), mean ± 95% half-width over seeds."""
  rows = {}
  for name, result in results.items():
    first = result['runs'][0]
    row = {'ffn': result['description'],
           'FLOPs active': f"{first['flops_active'] / 1e6:.3f}M",
           'FLOPs executed': f"{first['flops_executed'] / 1e6:.3f}M",
           'params': f"{first['params_total'] / 1e6:.3f}M",
           'params active': f"{first['params_active'] / 1e6:.3f}M"}
    for metric, title, digits in metrics:
      row[title] = Interval.of(values(results, name, metric)).format(digits)
    rows[name] = row
  return rows


def lower_is_reproduced(results: dict, member: str, baseline: str, metric: str, *,
                        margin: float = 0.0, what: str = 'eval loss') -> tuple[bool, str]:
  """Whether `member` has a lower `metric` than `baseline` (margin 0: 'beats'; margin m > 0:
  'matches or beats', i.e. worse by less than m): the whole 95% interval of the paired
  difference lies below `margin`. Returns (reproduced, one line of numbers)."""
  diff = paired(results, member, baseline, metric)
  ok = diff.high < margin
  if ok:
    why = ''
  elif diff.mean < margin:
    why = ' (in the claimed direction, but the interval reaches the margin: not significant)'
  else:
    why = ' (the opposite direction)'
  bound = f' < {margin:g}' if margin else ' < 0'
  line = (f'{what} {member} − {baseline} = {diff.format()} (95% CI [{diff.low:.4f}, '
          f'{diff.high:.4f}], n={diff.n}); needs the CI{bound}{why}')
  return ok, line
