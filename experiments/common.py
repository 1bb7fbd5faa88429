"""Shared machinery of the claim reproductions: their sweeps, running seeds, statistics, verdicts.

A claim module (`experiments/<claim>.py`) defines `STATEMENT`, `SOURCE`, `get_config(arg)` (a
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
from typing import Callable, Sequence

import ml_collections
import numpy as np
from scipy import stats

from configs import lm_tiny, vit_digits
from configs.common import check_scale, parse_arg

REPO = pathlib.Path(__file__).resolve().parent.parent
BASES = {'lm': lm_tiny, 'vit': vit_digits}  # each task's base config (`at_scale` presets)


def scale_of(arg: str | None) -> str:
  """The scale a claim's `get_config(arg)` runs at: 'scale=cpu' or 'scale=gpu' (default cpu),
  parsed like every config's presets (`configs.common.parse_arg`)."""
  return check_scale(parse_arg(arg, scale='cpu').scale)


def sweep_config(task: str, scale: str, members: dict, *, flops_match: str,
                 size_experts: bool = True, flops_tolerance: float = 0.02,
                 seeds: Sequence[int] | None = None,
                 base_changes: Callable | None = None) -> ml_collections.ConfigDict:
  """A claim's sweep: the task's base config at `scale` (`BASES`; changed by
  `base_changes(base)`), `members` sized and checked at equal FLOPs by the paper's convention
  `flops_match` ('active' or 'executed', see moe_jax/moe/flops.py), 3 seeds at cpu scale and 5 at gpu
  scale (experiments/PROTOCOL.md) unless `seeds`."""
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


# --- Running ---------------------------------------------------------------------------------


def run_claim(module, scale: str, workdir: pathlib.Path, *, seeds: Sequence[int] | None = None,
              data_dir: str | None = None, jobs: int = 1, log: Callable = print) -> 'Verdict':
  """Trains every member x seed of `module.get_config(scale)` into `workdir` (the claims' root;
  runs go to `workdir/<key>_<claim>/`, see `experiments.runs`) and returns the verdict.
  seeds: the seeds to run (default: the claim's own)."""
  from experiments import runs as runs_lib
  key = runs_lib.key_of(module)
  chosen = list(seeds if seeds is not None else runs_lib.claim_config(key, scale).seeds)
  if len(chosen) < 2:
    raise ValueError(f'seeds={chosen} are too few: an interval needs at least 2 seeds.')
  runs = runs_lib.claim_runs(key, scale, chosen, workdir, data_dir)
  workdir.mkdir(parents=True, exist_ok=True)
  runs_lib.train_all(runs, scale=scale, workdir=workdir, jobs=jobs, data_dir=data_dir, log=log)
  return verdict_of(module, runs)


def collect(runs) -> dict:
  """{member: {'description', 'runs': [run_numbers of each seed, in seed order]}} of `runs`."""
  from moe_jax.run import sweep
  results = {}
  for run in runs:
    entry = results.setdefault(run.member, {'description': sweep.describe(run.config), 'runs': []})
    entry['runs'].append({**run_numbers(run.directory), 'seed': run.seed})
  return results


def verdict_of(module, runs) -> 'Verdict':
  """The claim's verdict over its finished `runs`, checked against overfitting."""
  results = collect(runs)
  train_s = sum(run.get('wall_s') or 0.0 for result in results.values() for run in result['runs'])
  metric = getattr(module, 'METRIC', 'eval_loss')
  per_seed = {name: {run['seed']: run[metric] for run in result['runs']}
              for name, result in results.items()}
  return dataclasses.replace(check_not_overfit(module.verdict(results), results), train_s=train_s,
                             metric=metric, per_seed=per_seed)


# A run whose final held-out loss is more than this far (relative) above its best evaluation has
# overfit: comparing final losses would then compare how fast members memorize.
OVERFIT_TOLERANCE = 0.01


def check_not_overfit(verdict: 'Verdict', results: dict) -> 'Verdict':
  """`verdict`, or, if any run's held-out loss rose above its best by > OVERFIT_TOLERANCE, the
  same verdict marked invalid, naming the worst run of each member."""
  worst = {name: max(run['overfit'] for run in result['runs']) for name, result in results.items()}
  over = {name: rise for name, rise in worst.items() if rise > OVERFIT_TOLERANCE}
  note = ('held-out loss at the end vs its best evaluation, worst seed: ' + ', '.join(
      f'{name} {rise:+.1%}' for name, rise in worst.items()) + f' (tolerance {OVERFIT_TOLERANCE:.0%})')
  if not over:
    return dataclasses.replace(verdict, notes=verdict.notes + (note,))
  return dataclasses.replace(
      verdict, outcome='invalid', notes=verdict.notes + (note,),
      summary=verdict.summary + f'; INVALID comparison: the runs overfit (held-out loss rose '
      f'{max(over.values()):.1%} above its best in {", ".join(over)}); train for fewer steps')


def spike_count(losses: Sequence[float], window: int = 10, threshold: float = 0.1) -> int:
  """Loss spikes: logged steps t >= window whose loss exceeds the median of the `window`
  previous logged losses by more than `threshold` (relative), loss_t > (1 + threshold) * median."""
  losses = np.asarray(losses, float)
  return int(sum(losses[t] > (1 + threshold) * np.median(losses[t - window:t])
                 for t in range(window, len(losses))))


def lasting_jumps(losses: Sequence[float], window: int = 20, threshold: float = 0.1) -> int:
  """Loss jumps that last, not single-step noise: logged steps t where the median of the next
  `window` logged losses exceeds (1 + threshold) x the median of the previous `window`; one jump
  counts once (the search resumes `window` steps after it)."""
  losses, count, t = np.asarray(losses, float), 0, window
  while t + window <= len(losses):
    if np.median(losses[t:t + window]) > (1 + threshold) * np.median(losses[t - window:t]):
      count, t = count + 1, t + window
    else:
      t += 1
  return count


def run_numbers(directory: pathlib.Path) -> dict:
  """The numbers a verdict reads from one run directory, finished or diverged: its summary
  (eval_loss, ...; NaN where a diverged run has none), 'dropped' (final fraction of tokens dropped,
  mean over MoE layers; 0 for dense), 'spikes' (`spike_count` of the logged training losses),
  'max_jump' (the largest relative rise of the training loss over the median of the 10 previous
  logged losses), 'diverged' (the loss went non-finite: `moe_jax.run.sweep.DIVERGED`),
  'divergences' (1 if diverged or any `lasting_jumps`, else 0) and 'overfit' (the final held-out
  loss relative to the lowest of the run's evaluations, minus 1; 0 when the last is best)."""
  from moe_jax.run import report, sweep
  diverged = (directory / sweep.DIVERGED).exists()
  metrics = report.read_metrics(directory)
  summary = {'eval_loss': math.nan} if diverged else report.read_run(directory)['summary']
  losses = [m['train_loss'] for m in metrics]
  dropped = [values[-1] for values in report.moe_series(metrics, 'fraction_dropped').values()]
  jumps = [losses[t] / np.median(losses[t - 10:t]) - 1 for t in range(10, len(losses))]
  evals = [m['eval_loss'] for m in metrics if m.get('eval_loss') is not None]
  return {**summary, 'dropped': float(np.mean(dropped)) if dropped else 0.0,
          'spikes': spike_count(losses), 'max_jump': max(jumps, default=math.nan),
          'diverged': diverged, 'divergences': int(diverged or lasting_jumps(losses) > 0),
          'overfit': 0.0 if diverged or not evals else evals[-1] / min(evals) - 1}


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


# The outcomes of a claim. reproduced: the 95% interval of the paired difference lies wholly on
# the claimed side of the margin; refuted: wholly on the other side; inconclusive: it straddles the
# margin, and the minimum detectable effect (`minimum_detectable_effect`) says how large an
# effect these seeds could have found. invalid: the comparison itself failed a check (overfit
# runs, unequal parameters). not tested: the claim's regime is out of this table's reach.
OUTCOMES = ('reproduced', 'refuted', 'inconclusive', 'invalid', 'not tested')
POWER = 0.8


def minimum_detectable_effect(sd: float, n: int, power: float = POWER) -> float:
  """The smallest true mean difference that a two-sided 95% paired t-interval over n seeds
  excludes from the far side with probability `power`, given the sd of the paired differences:
  (t(0.975, n-1) + t(power, n-1)) * sd / sqrt(n)."""
  if n < 2:
    return math.inf
  return float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One tested difference `member - baseline` of `metric`, claimed below `margin`."""
  outcome: str
  line: str
  diff: Interval
  mde: float


def compare_lower(results: dict, member: str, baseline: str, metric: str, *,
                  margin: float = 0.0, what: str = 'eval loss') -> Comparison:
  """Whether `member` has a lower `metric` than `baseline` by the paired 95% interval: below
  `margin` wholly (reproduced; margin 0: 'beats', m > 0: 'worse by less than m'), above it wholly
  (refuted), or neither (inconclusive, with the minimum detectable effect at POWER)."""
  diffs = np.subtract(values(results, member, metric), values(results, baseline, metric))
  diff = Interval.of(diffs)
  mde = minimum_detectable_effect(float(np.std(diffs, ddof=1)), len(diffs)) if len(diffs) > 1 \
      else math.inf
  if diff.high < margin:
    outcome, why = 'reproduced', ''
  elif diff.low > margin:
    outcome, why = 'refuted', ''
  else:
    outcome, why = 'inconclusive', f'; minimum detectable effect {mde:.4f} at {POWER:.0%} power'
  per_seed = ', '.join(f'{d:+.4f}' for d in diffs)
  line = (f'{what} {member} − {baseline} = {diff.format()} (95% CI [{diff.low:.4f}, '
          f'{diff.high:.4f}], n={diff.n}; per seed {per_seed}); claimed < {margin:g}: '
          f'{outcome}{why}')
  return Comparison(outcome, line, diff, mde)


def combined(outcomes: Sequence[str]) -> str:
  """All claimed parts must hold: reproduced if every part is, refuted if any part is, else
  inconclusive."""
  if all(o == 'reproduced' for o in outcomes):
    return 'reproduced'
  return 'refuted' if 'refuted' in outcomes else 'inconclusive'


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A claim's outcome (one of OUTCOMES), the key numbers in one line, and the rows of its table
  ({member: {column: text}})."""
  outcome: str
  summary: str
  rows: dict
  notes: tuple[str, ...] = ()
  train_s: float = 0.0  # the runs' summed wall time (set by `verdict_of`)
  metric: str = 'eval_loss'  # the claim's metric and its value per member and seed (`verdict_of`)
  per_seed: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.outcome not in OUTCOMES:
      raise ValueError(f'verdict outcome {self.outcome!r} is not one of {OUTCOMES}')

  @property
  def label(self) -> str:
    return self.outcome


def member_rows(results: dict, metrics: Sequence[tuple[str, str, int]]) -> dict:
  """{member: {column: text}}: the description, forward FLOPs/token by both conventions (active:
  k experts per token; executed: capacity padding counts), total and active params and, for each
  (metric, column title, digits), mean ± 95% half-width over seeds."""
  rows = {}
  for name, result in results.items():
    first = next((run for run in result['runs'] if 'flops_active' in run), None)
    if first is None:  # every seed diverged before its summary: nothing to count from
      first = dict.fromkeys(('flops_active', 'flops_executed', 'params_total', 'params_active'),
                            math.nan)
    row = {'ffn': result['description'],
           'FLOPs active': f"{first['flops_active'] / 1e6:.3f}M",
           'FLOPs executed': f"{first['flops_executed'] / 1e6:.3f}M",
           'params': f"{first['params_total'] / 1e6:.3f}M",
           'params active': f"{first['params_active'] / 1e6:.3f}M"}
    for metric, title, digits in metrics:
      row[title] = Interval.of(values(results, name, metric)).format(digits)
    rows[name] = row
  return rows
