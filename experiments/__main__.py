"""`python -m experiments run --scale cpu|gpu [--claims a,b] [--seeds N] [--jobs J] --workdir DIR`

Runs the chosen claims (all by default) into DIR/<key>_<claim>/<member>/seed_<s>/ and writes the
claims table DIR/claims.md: one row per claim with its verdict and numbers, then a section per
claim with each member's mean ± 95% interval over seeds. Finished runs are reused, so rerunning
the command after a crash, or with more claims, trains only what is missing.
`--data_dir` sets the TFDS data dir of every run (default: TFDS's own).
`--jobs J` trains up to J claims at once, each in its own process (log: DIR/<key>_<claim>.log);
the claim-sized models leave most of a GPU idle, so this shortens the table's wall time. Each
process gets 0.9/J of the GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

from experiments import CLAIMS, common


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
          '(config.deterministic; bitwise-repeatable runs, moe_jax/reproducibility.py).')


def claims_markdown(outcomes: dict, scale: str, command: str, wall_s: float,
                    environment: str = '') -> str:
  """claims.md: the summary table, then one section per claim."""
  lines = [f'# Paper claims at `{scale}` scale', '',
           f'Command: `{command}` ({wall_s / 60:.1f} min wall for this call; finished runs are '
           'reused, not retrained).', '', environment, '',
           'Intervals are 95% Student-t intervals over seeds (mean ± half-width); differences are '
           'paired by seed. A claim counts as reproduced only if the whole interval of the '
           'difference lies on the claimed side.', '',
           'The train column sums the wall time of the runs of a claim (compiles included), as '
           'recorded when they were trained.', '',
           '| claim | statement | verdict | numbers | train |', '|---|---|---|---|---|']
  for key, (module, verdict) in outcomes.items():
    lines.append(f'| ({key}) {module.__name__.split(".")[-1]} | {module.STATEMENT} | '
                 f'**{verdict.label}** | {verdict.summary} | {verdict.train_s / 60:.1f} min |')
  for key, (module, verdict) in outcomes.items():
    lines += ['', f'## ({key}) {module.STATEMENT}', '', f'Source: {module.SOURCE}. '
              f'Config: `experiments/{module.__name__.split(".")[-1]}.py`.', '',
              f'Verdict: **{verdict.label}**: {verdict.summary}.', '',
              f'FLOPs matched: {module.get_config(scale).flops_match} (active: k expert FFNs '
              'per token, capacity padding not counted; executed: padding counts). Seeds: '
              f'{len(module.get_config(scale).seeds)}.', '']
    lines += [f'- {note}' for note in verdict.notes] + ([''] if verdict.notes else [])
    columns = list(next(iter(verdict.rows.values())))
    lines += ['| member | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    lines += [f'| {name} | ' + ' | '.join(row[c] for c in columns) + ' |'
              for name, row in verdict.rows.items()]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m experiments', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('command', choices=['run'])
  parser.add_argument('--scale', choices=common.SCALES, default='cpu')
  parser.add_argument('--claims', default=','.join(CLAIMS),
                      help=f'comma-separated keys of {sorted(CLAIMS)} (default: all)')
  parser.add_argument('--seeds', type=int, default=None,
                      help="use only the first N of each claim's seeds (at least 2)")
  parser.add_argument('--workdir', required=True, type=pathlib.Path)
  parser.add_argument('--data_dir', default=None, help='TFDS data dir of every run')
  parser.add_argument('--jobs', type=int, default=1,
                      help='train up to this many claims at once, one process each (default 1)')
  args = parser.parse_args(argv)
  keys = [key.strip() for key in args.claims.split(',') if key.strip()]
  unknown = [key for key in keys if key not in CLAIMS]
  if unknown:
    parser.error(f'--claims: unknown key(s) {unknown}; choose from {sorted(CLAIMS)}')
  if args.jobs < 1:
    parser.error(f'--jobs={args.jobs}: use 1 or more')
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  start = time.perf_counter()
  if args.jobs > 1 and len(keys) > 1:
    train_in_parallel(keys, args)
  outcomes = {}
  for key in keys:
    module = importlib.import_module(f'experiments.{CLAIMS[key]}')
    print(f'({key}) {CLAIMS[key]}: {module.STATEMENT}', flush=True)
    verdict = common.run_claim(module, args.scale, args.workdir / f'{key}_{CLAIMS[key]}',
                               seeds=args.seeds, data_dir=args.data_dir,
                               log=lambda line: print(line, flush=True))
    print(f'  -> {verdict.label}: {verdict.summary}', flush=True)
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


def prepare_data(keys: list[str], args) -> None:
  """Prepares (TFDS download_and_prepare, offline) every data set the claims `keys` read."""
  from moe_jax.data import images as image_data, text
  loaders = {'lm': text.load_text_splits, 'vit': image_data.load_image_splits}
  seen = set()
  for key in keys:
    sweep = importlib.import_module(f'experiments.{CLAIMS[key]}').get_config(args.scale)
    data_config = sweep.base.data
    if (sweep.task, data_config.name) not in seen:
      seen.add((sweep.task, data_config.name))
      loaders[sweep.task](data_config.name, data_dir=args.data_dir or data_config.data_dir,
                          manual_dir=data_config.get('manual_dir'))


def train_in_parallel(keys: list[str], args) -> None:
  """Trains each claim of `keys` in a child `python -m experiments run --claims <key>`, at most
  `args.jobs` at a time. A child that fails is reported; the caller's own pass then retries
  whatever that child left unfinished (finished runs are reused) and writes the table."""
  args.workdir.mkdir(parents=True, exist_ok=True)
  prepare_data(keys, args)  # once, here: concurrent TFDS preparations of one data dir would race
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / args.jobs:.3f}')
  pending, running = list(keys), {}
  start = time.perf_counter()
  while pending or running:
    while pending and len(running) < args.jobs:
      key = pending.pop(0)
      command = [sys.executable, '-m', 'experiments', 'run', '--scale', args.scale, '--claims', key,
                 '--workdir', str(args.workdir.resolve())]
      command += ['--seeds', str(args.seeds)] if args.seeds else []
      command += ['--data_dir', str(pathlib.Path(args.data_dir).resolve())] if args.data_dir else []
      log_path = args.workdir / f'{key}_{CLAIMS[key]}.log'
      with log_path.open('w') as log_file:
        running[key] = (subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                         env=env, cwd=common.REPO), log_path)
      print(f'({key}) {CLAIMS[key]}: started, log {log_path}', flush=True)
    time.sleep(1.0)
    for key, (process, log_path) in list(running.items()):
      if process.poll() is not None:
        del running[key]
        status = 'finished' if process.returncode == 0 else (
            f'FAILED (exit {process.returncode}); see {log_path}')
        print(f'({key}) {CLAIMS[key]}: {status} at {time.perf_counter() - start:.0f} s',
              flush=True)


if __name__ == '__main__':
  main()
