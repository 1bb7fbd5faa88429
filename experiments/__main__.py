"""`python -m experiments run --scale cpu|gpu [--claims a,b] [--seeds N] --workdir DIR`

Runs the chosen claims (all by default) into DIR/<key>_<claim>/<member>/seed_<s>/ and writes the
claims table DIR/claims.md: one row per claim with its verdict and numbers, then a section per
claim with each member's mean ± 95% interval over seeds. Finished runs are reused, so rerunning
the command after a crash, or with more claims, trains only what is missing.
`--data_dir` sets the TFDS data dir of every run (default: TFDS's own).
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import time

from experiments import CLAIMS, common


def claims_markdown(outcomes: dict, scale: str, command: str, wall_s: float) -> str:
  """claims.md: the summary table, then one section per claim."""
  lines = [f'# Paper claims at `{scale}` scale', '',
           f'Command: `{command}` ({wall_s / 60:.1f} min wall for this call; finished runs are '
           'reused, not retrained).', '',
           'Intervals are 95% Student-t intervals over seeds (mean ± half-width); differences are '
           'paired by seed. A claim counts as reproduced only if the whole interval of the '
           'difference lies on the claimed side.', '',
           '| claim | statement | verdict | numbers |', '|---|---|---|---|']
  for key, (module, verdict) in outcomes.items():
    lines.append(f'| ({key}) {module.__name__.split(".")[-1]} | {module.STATEMENT} | '
                 f'**{verdict.label}** | {verdict.summary} |')
  for key, (module, verdict) in outcomes.items():
    lines += ['', f'## ({key}) {module.STATEMENT}', '', f'Source: {module.SOURCE}. '
              f'Config: `experiments/{module.__name__.split(".")[-1]}.py`.', '',
              f'Verdict: **{verdict.label}**: {verdict.summary}.', '']
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
  args = parser.parse_args(argv)
  keys = [key.strip() for key in args.claims.split(',') if key.strip()]
  unknown = [key for key in keys if key not in CLAIMS]
  if unknown:
    parser.error(f'--claims: unknown key(s) {unknown}; choose from {sorted(CLAIMS)}')

  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  start = time.perf_counter()
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
                      f'--workdir {args.workdir}'])
  text = claims_markdown(outcomes, args.scale, command, time.perf_counter() - start)
  (args.workdir / 'claims.md').write_text(text)
  print(f'\nwritten: {args.workdir / "claims.md"}')


if __name__ == '__main__':
  main()
