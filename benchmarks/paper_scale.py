"""Paper configs at `:scale=gpu` on one GPU: `moe-jax plan`'s memory per device against the
measured peak, and a short training run's throughput, MFU and loss.

Each config of configs/papers/ trains in a process of its own (`moe-jax train`, so that the peak
is its own) for --steps steps into a fresh folder under --workdir, on --data (read by
--tokenizer); its plan (`moe_jax.run.memory_plan`, no device) is made here from the same config
and overrides. A row: plan GiB (the GPU count), measured peak GiB (summary.json's
peak_memory_bytes), measured / plan, XLA step GiB (XLA's memory analysis of the compiled train
step: arguments + outputs + temporaries, summary.json's step_memory_bytes), tokens/s, active MFU
(3 x flops_active per token x tokens/s / --peak-tflops: the papers' FLOPs, k expert slots per
token and the full [L, L] attention scores; benchmarks/train_step.py's 'useful' MFU counts only
their causal half), train loss at the first and the last step. A failed run's row keeps its
error, the end of its stderr and its memory lines (the trainer's XLA analysis, the allocator's
summary after an out-of-memory error). --out is rewritten after each config.

  python benchmarks/paper_scale.py --configs deepseek_moe_2b,switch_base --steps 5 --out plan.json
  python benchmarks/paper_scale.py --configs deepseek_moe_2b --steps 300 --tokenizer DIR/tokenizer.model
  python benchmarks/paper_scale.py --configs deepseek_moe_2b --set model.num_layers=7   # a smaller member
  python benchmarks/paper_scale.py --scale cpu --configs switch_base --steps 2   # CPU smoke run
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from moe_jax.run import memory_plan  # noqa: E402

sys.path.insert(0, str(ROOT / 'benchmarks'))
from train_step import PEAK_TFLOPS  # noqa: E402  (H100 / H200 SXM dense bf16)

GiB = 2 ** 30


def overrides(args) -> dict[str, object]:
  """{config path: value} of a short run: steps, logging every step (every 10th past 100 steps),
  no evaluation before the end, one checkpoint at the end, the data and tokenizer asked for, and
  the fields of --set."""
  steps = args.steps
  values = {'train.steps': steps, 'train.warmup_steps': max(1, steps // 20),
            'train.log_every': 1 if steps <= 100 else 10, 'train.eval_every': 0,
            'train.eval_batches': 2, 'train.checkpoint_every': 0, 'train.progress': False}
  if args.data:
    values['data.name'] = args.data
  if args.tokenizer:
    values['data.tokenizer'] = str(pathlib.Path(args.tokenizer).resolve())
  if args.data_dir:
    values['data.data_dir'] = str(pathlib.Path(args.data_dir).resolve())
  values.update(args.set)
  return values


def field_value(item: str) -> tuple[str, object]:
  """--set's PATH=VALUE as (path, value): VALUE a Python literal, else a string."""
  path, equals, text = item.partition('=')
  if not equals:
    raise argparse.ArgumentTypeError(f'{item}: give PATH=VALUE, e.g. --set model.num_layers=7')
  try:
    return path, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return path, text


def paper_config(name: str, scale: str, values: dict):
  """configs/papers/<name>.py at `scale=...`, with `values` set (as --config.<path>=<value>)."""
  config = importlib.import_module(f'configs.papers.{name}').get_config(f'scale={scale}')
  config.update_from_flattened_dict(values)
  return config


# stderr lines worth keeping from a failed run: the trainer's line with XLA's memory analysis of
# its step, and the GPU allocator's summary after an out-of-memory error.
MEMORY_LINE = re.compile(r'XLA memory per device|^\s*(Limit|InUse|MaxInUse|NumAllocs|MaxAllocSize'
                         r'|Reserved|PeakReserved|LargestFreeBlock):')


def train(name: str, scale: str, values: dict, workdir: pathlib.Path, env: dict) -> dict:
  """Trains the config in a process of its own; returns its summary.json and train losses. The
  run's checkpoint is deleted (a short run keeps its metrics, not tens of GB of state)."""
  command = [sys.executable, '-m', 'moe_jax.cli', 'train', '--config',
             f'{ROOT}/configs/papers/{name}.py:scale={scale}', '--workdir', str(workdir)]
  command += [f'--config.{path}={value}' for path, value in values.items()]
  print(' '.join(command), flush=True)
  result = subprocess.run(command, env=env, cwd=ROOT, text=True, capture_output=True)
  if result.returncode:
    lines = result.stderr.strip().splitlines() or ['?']
    error = next((line for line in reversed(lines) if 'Error' in line), lines[-1])
    return {'error': error[:300], 'stderr_tail': lines[-40:],
            'memory_lines': [line for line in lines if MEMORY_LINE.search(line)]}
  summary = json.loads((workdir / 'summary.json').read_text())
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  summary['train_losses'] = [r['train_loss'] for r in records if 'train_loss' in r]
  shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)  # tens of GB at paper scale
  return summary


def row(name: str, plan: memory_plan.Plan, summary: dict, peak_tflops: float) -> dict:
  planned = plan.total('gpu')
  measured = summary.get('peak_memory_bytes')
  xla = (summary.get('step_memory_bytes') or {}).get('total')
  tokens_per_s = summary.get('tokens_per_s')
  flops = summary.get('flops_active')
  losses = summary.get('train_losses') or [None]
  return {
      'config': name, 'plan_gib': planned / GiB,
      'measured_gib': None if measured is None else measured / GiB,
      'measured_over_plan': None if measured is None else measured / planned,
      'xla_step_gib': None if xla is None else xla / GiB,  # XLA's analysis of the step
      'step_memory_bytes': summary.get('step_memory_bytes'),
      'tokens_per_s': tokens_per_s,
      'mfu_active': (None if not tokens_per_s or not flops
                     else 3 * flops * tokens_per_s / (peak_tflops * 1e12)),
      'loss_first': losses[0], 'loss_last': losses[-1],
      'params_total': plan.params_total, 'error': summary.get('error'),
      'stderr_tail': summary.get('stderr_tail'), 'memory_lines': summary.get('memory_lines'),
  }


def table(rows: list[dict]) -> str:
  def num(value, form):
    return 'n/a' if value is None else format(value, form)

  lines = ['| config | params | plan GiB | measured peak GiB | measured / plan | XLA step GiB '
           '| tokens/s | active MFU | train loss first -> last |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
  for r in rows:
    if r['error']:
      lines.append(f"| {r['config']} | | {r['plan_gib']:.1f} | failed: {r['error'][:80]} "
                   '| | | | | |')
      continue
    lines.append(f"| {r['config']} | {r['params_total'] / 1e9:.2f}B | {r['plan_gib']:.1f} "
                 f"| {num(r['measured_gib'], '.1f')} | {num(r['measured_over_plan'], '.2f')} "
                 f"| {num(r['xla_step_gib'], '.1f')} "
                 f"| {num(r['tokens_per_s'], ',.0f')} | {num(r['mfu_active'], '.1%')} "
                 f"| {num(r['loss_first'], '.3f')} -> {num(r['loss_last'], '.3f')} |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--configs', default='deepseek_moe_2b,switch_base',
                      help='comma-separated names of configs/papers/*.py')
  parser.add_argument('--scale', default='gpu', choices=('cpu', 'gpu'))
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--data', default='english_mix', help="config.data.name ('' keeps the "
                      "config's)")
  parser.add_argument('--tokenizer', default='', help="a SentencePiece .model ('' keeps the "
                      "config's: bytes)")
  parser.add_argument('--data-dir', default='', help="config.data.data_dir: where TFDS keeps the "
                      "prepared data ('' keeps the config's)")
  parser.add_argument('--set', action='append', default=[], type=field_value,
                      metavar='PATH=VALUE',
                      help="a config field for every config, as moe-jax train's "
                      '--config.PATH=VALUE (repeatable), e.g. model.num_layers=7')
  parser.add_argument('--workdir', default='paper_scale_runs', help='one fresh folder per config')
  parser.add_argument('--peak-tflops', type=float, default=PEAK_TFLOPS)
  parser.add_argument('--out', default='', help='JSON results path (and .md beside it)')
  args = parser.parse_args(argv)

  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT),
                                                                    os.environ.get('PYTHONPATH')]))}
  rows, values = [], overrides(args)
  for name in [n.strip() for n in args.configs.split(',') if n.strip()]:
    try:  # a --set field the config lacks, or a value it rejects: before anything runs
      plan = memory_plan.make_plan(paper_config(name, args.scale, values), name)
    except (KeyError, ValueError) as e:
      parser.error(f'{name}: {e}')
    workdir = pathlib.Path(args.workdir).resolve() / f'{name}_{args.scale}'
    if workdir.exists():
      raise SystemExit(f'{workdir} exists: give another --workdir (a short run starts fresh)')
    rows.append(row(name, plan, train(name, args.scale, values, workdir, env), args.peak_tflops))
    print(table(rows[-1:]), flush=True)
    if args.out:  # after each config: a run cut short keeps the rows before it
      pathlib.Path(args.out).write_text(json.dumps({'args': vars(args), 'rows': rows}, indent=2))
      pathlib.Path(args.out).with_suffix('.md').write_text(table(rows) + '\n')
  print(f"\nactive MFU (the papers' FLOPs, full attention scores) against {args.peak_tflops:g} "
        'TFLOP/s; plan: moe-jax plan, GPU count; '
        "XLA step: XLA's memory analysis of the compiled train step (arguments + outputs + "
        'temporaries)\n')
  print(table(rows))


if __name__ == '__main__':
  main()
