"""The claims table and its pilot.

  python -m experiments run --scale cpu|gpu [--claims a,b] [--seeds N] [--jobs J] --workdir DIR
  python -m experiments pilot --scale cpu|gpu [--claims a,b] [--seeds 1000,1001,1002] [--jobs J] --workdir DIR

`run` trains the chosen claims (all by default) with their protocol's seeds into
DIR/<key>_<claim>/<member>/seed_<s>/ (`experiments.runs`) and writes the claims table
DIR/claims.md: one row per claim with its outcome (reproduced, refuted, inconclusive with its
minimum detectable effect, invalid, not tested) and numbers, then a section per claim with each
member's mean ± 95% interval and its value for every seed. Finished runs are reused, so rerunning
the command after a crash, or with more claims, trains only what is missing.

`pilot` trains the same members with the pilot's own seeds (never used by `run`) and writes
DIR/pilot.md and DIR/pilot.json: per comparison, the per-seed paired differences, their standard
deviation, and the minimum detectable effect that n final seeds would give at that deviation. The
protocol (experiments/PROTOCOL.md) fixes each claim's seeds from it before any final run.

`--data_dir` sets the TFDS data dir of every run (default: TFDS's own). `--jobs J` trains up to J
runs at once, each in its own process (log: the run's directory + '.log'); claim-sized models
leave most of a GPU idle, so this shortens the wall time. Each process gets 0.9/J of the GPU's
memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from experiments import CLAIMS, common, runs as runs_lib
from configs.common import SCALES

PILOT_SEEDS = (1000, 1001, 1002)  # the pilot's seeds; final runs use 0, 1, ... (PROTOCOL.md)
PILOT_SIZES = (3, 4, 5, 6, 8, 10, 12, 16, 20)  # final seed counts the pilot reports an MDE for


def environment_line(workdir: pathlib.Path) -> str:
  """What the runs under `workdir` ran on: jax/jaxlib, devices, deterministic ops (from every
  run's summary.json; several values are all listed)."""
  seen = {}
  for path in sorted(workdir.glob('*/*/seed_*/summary.json')):
    env = json.loads(path.read_text()).get('environment', {})
    for key in ('jax', 'jaxlib', 'device_kind', 'device_count', 'xla_gpu_deterministic_ops'):
      seen.setdefault(key, set()).add(str(env.get(key)))
  value = lambda key: ' / '.join(sorted(seen.get(key, {'?'})))
  return (f"Ran with jax {value('jax')}, jaxlib {value('jaxlib')} on {value('device_count')} x "
          f"{value('device_kind')}; XLA:GPU deterministic ops: {value('xla_gpu_deterministic_ops')} "
          '(config.deterministic; moe_jax/reproducibility.py).')


def claims_markdown(outcomes: dict, scale: str, command: str, wall_s: float,
                    environment: str = '') -> str:
  """claims.md: the summary table, then one section per claim with every seed's value."""
  lines = [f'# Paper claims at `{scale}` scale', '',
           f'Command: `{command}` ({wall_s / 60:.1f} min wall for this call; finished runs are '
           'reused, not retrained).', '', environment, '',
           'Intervals are 95% Student-t intervals over seeds (mean ± half-width); differences are '
           'paired by seed. A claim is **reproduced** when the whole interval of the difference '
           'lies on the claimed side of its margin, **refuted** when it lies wholly on the other '
           'side, and **inconclusive** otherwise, with the minimum detectable effect (80% power) '
           'of its seeds. Designs: experiments/PROTOCOL.md.', '',
           'The train column sums the wall time of the runs of a claim (compiles included), as '
           'recorded when they were trained.', '',
           '| claim | statement | outcome | numbers | seeds | train |', '|---|---|---|---|---|---|']
  for key, (module, verdict) in outcomes.items():
    lines.append(f'| ({key}) {module.__name__.split(".")[-1]} | {module.STATEMENT} | '
                 f'**{verdict.label}** | {verdict.summary} | {seeds_ran(verdict)} | '
                 f'{verdict.train_s / 60:.1f} min |')
  for key, (module, verdict) in outcomes.items():
    lines += ['', f'## ({key}) {module.STATEMENT}', '', f'Source: {module.SOURCE}. '
              f'Config: `experiments/{module.__name__.split(".")[-1]}.py`.', '',
              f'Outcome: **{verdict.label}**: {verdict.summary}.', '',
              f'FLOPs matched: {runs_lib.claim_config(runs_lib.key_of(module), scale).flops_match} '
              '(active: k expert FFNs '
              'per token, capacity padding not counted; executed: padding counts). Seeds: '
              f'{seeds_ran(verdict)}.', '']
    lines += [f'- {note}' for note in verdict.notes] + ([''] if verdict.notes else [])
    columns = list(next(iter(verdict.rows.values())))
    lines += ['| member | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    lines += [f'| {name} | ' + ' | '.join(row[c] for c in columns) + ' |'
              for name, row in verdict.rows.items()]
    seeds = sorted({seed for values in verdict.per_seed.values() for seed in values})
    lines += ['', f'{verdict.metric} per seed:', '',
              '| member | ' + ' | '.join(f'seed {s}' for s in seeds) + ' |',
              '|---' * (len(seeds) + 1) + '|']
    lines += [f'| {name} | ' + ' | '.join(f'{values[s]:.4f}' if s in values else '–'
                                          for s in seeds) + ' |'
              for name, values in verdict.per_seed.items()]
  return '\n'.join(lines) + '\n'


def seeds_ran(verdict: common.Verdict) -> int:
  """The number of seeds every member of `verdict` ran."""
  return min(len(values) for values in verdict.per_seed.values())


def prepare_data(keys: list[str], scale: str, data_dir: str | None, pilot: bool = False) -> None:
  """Prepares (TFDS download_and_prepare, offline) every data set the claims `keys` read (their
  pilot sweeps' if `pilot`), once, before child processes would race to prepare one data dir."""
  from moe_jax.data import images as image_data, text
  loaders = {'lm': text.load_text_splits, 'vit': image_data.load_image_splits}
  seen = set()
  for key in keys:
    sweep = runs_lib.claim_config(key, scale, pilot)
    if (sweep.task, sweep.base.data.name) not in seen:
      seen.add((sweep.task, sweep.base.data.name))
      loaders[sweep.task](sweep.base.data.name, data_dir=data_dir or sweep.base.data.data_dir,
                          manual_dir=sweep.base.data.get('manual_dir'))


def train_claims(keys: list[str], args, seeds_of, pilot: bool = False) -> dict:
  """Trains every run of the claims `keys` (seeds_of(module) each; their pilot members if
  `pilot`), all claims' runs in one pool of `args.jobs` processes; returns {key: its runs}."""
  claim_runs = {key: runs_lib.claim_runs(key, args.scale, seeds_of(runs_lib.claim_module(key)),
                                         args.workdir, args.data_dir, pilot) for key in keys}
  args.workdir.mkdir(parents=True, exist_ok=True)
  if args.jobs > 1:
    prepare_data(keys, args.scale, args.data_dir, pilot)
  if args.report_only:
    return claim_runs
  # Seed-major order: every member of the first seed before the second seed's, so that paired
  # differences exist early in a long table.
  every = sorted((run for runs in claim_runs.values() for run in runs), key=lambda run: run.seed)
  runs_lib.train_all(every, scale=args.scale, workdir=args.workdir, jobs=args.jobs,
                     data_dir=args.data_dir, pilot=pilot, log=lambda line: print(line, flush=True))
  return claim_runs


def run(keys: list[str], args) -> None:
  """`run`: the claims table with each claim's protocol seeds (or the first --seeds of them)."""
  def seeds_of(module):
    seeds = list(runs_lib.claim_config(runs_lib.key_of(module), args.scale).seeds)
    return seeds[:args.seeds] if args.seeds else seeds
  start = time.perf_counter()
  claim_runs = train_claims(keys, args, seeds_of)
  outcomes = {}
  for key, runs in claim_runs.items():
    module = runs_lib.claim_module(key)
    unfinished = [f'{r.member}/seed_{r.seed}' for r in runs if not runs_lib.is_finished(r)]
    if unfinished:
      raise SystemExit(f'({key}): runs {unfinished} did not finish (see their .log); rerun the '
                       'same command to train what is missing.')
    verdict = common.verdict_of(module, runs)
    print(f'({key}) {CLAIMS[key]} -> {verdict.label}: {verdict.summary}', flush=True)
    outcomes[key] = (module, verdict)
  command = ' '.join(['python -m experiments run', f'--scale {args.scale}',
                      *([f'--claims {args.claims}'] if args.claims != ','.join(CLAIMS) else []),
                      *([f'--seeds {args.seeds}'] if args.seeds else []),
                      *([f'--jobs {args.jobs}'] if args.jobs > 1 else []),
                      f'--workdir {args.workdir}'])
  text = claims_markdown(outcomes, args.scale, command, time.perf_counter() - start,
                         environment_line(args.workdir))
  (args.workdir / 'claims.md').write_text(text)
  print(f'\nwritten: {args.workdir / "claims.md"}')


def pilot(keys: list[str], args) -> None:
  """`pilot`: every comparison's paired differences over the pilot seeds, their sd, and the
  minimum detectable effect of n final seeds at that sd (finished runs only; unfinished ones
  are listed)."""
  seeds = [int(s) for s in args.seeds.split(',')] if args.seeds else list(PILOT_SEEDS)
  claim_runs = train_claims(keys, args, lambda module: seeds, pilot=True)
  report, lines = {}, [f'# Pilot at `{args.scale}` scale, seeds {seeds}', '',
                       environment_line(args.workdir), '',
                       'sd: standard deviation of the per-seed paired difference; MDE(n): the '
                       'minimum detectable effect of n final seeds at that sd (95% two-sided '
                       f'paired t-interval, {common.POWER:.0%} power).', '']
  for key, runs in claim_runs.items():
    module = runs_lib.claim_module(key)
    finished = [r for r in runs if runs_lib.is_finished(r)]
    results = common.collect(finished)
    metric = getattr(module, 'METRIC', 'eval_loss')
    lines += [f'## ({key}) {metric} of each pilot run', '',
              '| member | ' + ' | '.join(f'seed {s}' for s in seeds) + ' |',
              '|---' * (len(seeds) + 1) + '|']
    for name, result in results.items():
      by_seed = {r['seed']: r[metric] for r in result['runs']}
      lines.append(f'| {name} | ' + ' | '.join(f'{by_seed[s]:.4f}' if s in by_seed else '–'
                                               for s in seeds) + ' |')
    lines.append('')
    for member, baseline, metric in module.COMPARISONS:
      if member not in results or baseline not in results:
        continue
      pairs = sorted(set(r['seed'] for r in results.get(member, {}).get('runs', [])) &
                     set(r['seed'] for r in results.get(baseline, {}).get('runs', [])))
      value = lambda name, seed: next(r[metric] for r in results[name]['runs'] if r['seed'] == seed)
      diffs = [value(member, s) - value(baseline, s) for s in pairs]
      sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float('nan')
      entry = {'metric': metric, 'seeds': pairs, 'differences': diffs, 'sd': sd,
               'mean': float(np.mean(diffs)) if diffs else float('nan'),
               'member': {s: value(member, s) for s in pairs},
               'baseline': {s: value(baseline, s) for s in pairs},
               'mde': {n: common.minimum_detectable_effect(sd, n) for n in PILOT_SIZES}}
      report[f'{key}: {member} - {baseline}'] = entry
      lines += [f'## ({key}) {member} − {baseline}, {metric}', '',
                f'- {member}: ' + ', '.join(f'{v:.4f}' for v in entry['member'].values()),
                f'- {baseline}: ' + ', '.join(f'{v:.4f}' for v in entry['baseline'].values()),
                '- differences: ' + ', '.join(f'{d:+.4f}' for d in diffs) +
                f' (mean {entry["mean"]:+.4f}, sd {sd:.4f}, n={len(diffs)})',
                '- MDE(n): ' + ', '.join(f'{n}: {m:.4f}' for n, m in entry['mde'].items()), '']
    missing = [f'{r.member}/seed_{r.seed}' for r in runs if r not in finished]
    if missing:
      lines += [f'({key}) unfinished: {", ".join(missing)}', '']
  (args.workdir / 'pilot.json').write_text(json.dumps(report, indent=2))
  (args.workdir / 'pilot.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


def train_one(args) -> None:
  """`train-one` (what `--jobs` runs in each child): one run of one claim."""
  runs = runs_lib.claim_runs(args.claim, args.scale, [args.seed], args.workdir, args.data_dir,
                             args.pilot)
  run, = [r for r in runs if r.member == args.member]
  runs_lib.train_one(run)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m experiments', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('command', choices=['run', 'pilot', 'train-one'])
  parser.add_argument('--scale', choices=SCALES, default='cpu')
  parser.add_argument('--claims', default=','.join(CLAIMS),
                      help=f'comma-separated keys of {sorted(CLAIMS)} (default: all)')
  parser.add_argument('--seeds', default=None,
                      help="run: use only the first N of each claim's seeds (at least 2); "
                      f"pilot: the comma-separated pilot seeds (default {PILOT_SEEDS})")
  parser.add_argument('--workdir', required=True, type=pathlib.Path)
  parser.add_argument('--data_dir', default=None, help='TFDS data dir of every run')
  parser.add_argument('--jobs', type=int, default=1,
                      help='train up to this many runs at once, one process each (default 1)')
  parser.add_argument('--report_only', action='store_true',
                      help='train nothing: write the table or pilot from the finished runs')
  parser.add_argument('--claim', help=argparse.SUPPRESS)  # train-one's
  parser.add_argument('--member', help=argparse.SUPPRESS)
  parser.add_argument('--seed', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--pilot', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  keys = [key.strip() for key in args.claims.split(',') if key.strip()]
  unknown = [key for key in keys if key not in CLAIMS]
  if unknown:
    parser.error(f'--claims: unknown key(s) {unknown}; choose from {sorted(CLAIMS)}')
  if args.jobs < 1:
    parser.error(f'--jobs={args.jobs}: use 1 or more')
  if args.command == 'run' and args.seeds is not None:
    if not args.seeds.isdigit() or int(args.seeds) < 2:
      parser.error(f'--seeds={args.seeds}: run takes a count of at least 2 seeds')
    args.seeds = int(args.seeds)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  {'run': lambda: run(keys, args), 'pilot': lambda: pilot(keys, args),
   'train-one': lambda: train_one(args)}[args.command]()


if __name__ == '__main__':
  main()
