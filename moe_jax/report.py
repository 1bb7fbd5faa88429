"""Tables and plots from run directories.

A run directory holds `summary.json` and `metrics.jsonl` (see moe_jax/train.py). `write_report`
turns every run under a sweep directory into `results.md`, `results.csv`, `eval_loss.png`
(eval loss against step, one line per run), `expert_load.png` (heat map of each MoE layer's final
share of tokens per expert) and `dropped.png` (fraction of tokens dropped against step).
"""
from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np

# flops_active / flops_executed: forward FLOPs per token by each convention of moe_jax/flops.py
# (active: k experts per token, the papers'; executed: capacity padding counts).
COLUMNS = ('run', 'ffn', 'eval_loss', 'train_loss', 'flops_active', 'flops_executed',
           'params_total', 'params_active', 'dropped', 'max_over_mean_load', 'tokens_per_s')


def read_run(run_dir: pathlib.Path) -> dict:
  """{'name', 'summary': dict, 'metrics': [dict per logged step], 'config': dict ({} if no
  config.json)} of one run directory."""
  lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
  config = run_dir / 'config.json'
  return {'name': run_dir.name, 'summary': json.loads((run_dir / 'summary.json').read_text()),
          'metrics': [json.loads(line) for line in lines if line.strip()],
          'config': json.loads(config.read_text()) if config.exists() else {}}


def find_runs(workdir: pathlib.Path) -> list[dict]:
  """Every finished run under `workdir` (a run directory itself, or a sweep of them)."""
  workdir = pathlib.Path(workdir)
  dirs = [workdir] if (workdir / 'summary.json').exists() else sorted(
      p.parent for p in workdir.glob('*/summary.json'))
  members = _sweep_members(workdir)
  order = {name: i for i, name in enumerate(members)}
  dirs.sort(key=lambda d: order.get(d.name, len(order)))
  if not dirs:
    raise FileNotFoundError(f'no finished runs (summary.json) under {workdir}; train or sweep '
                            'into it first.')
  runs = [read_run(d) for d in dirs]
  for run in runs:  # the sweep's short description of each member's FFN, where there is one
    run['ffn'] = members.get(run['name'], {}).get('description', run['summary'].get('router', ''))
  return runs


def _sweep_members(workdir: pathlib.Path) -> dict[str, dict]:
  """sweep.json's {member: {'description', 'config'}} in sweep order ({} outside a sweep)."""
  sweep = workdir / 'sweep.json'
  return json.loads(sweep.read_text()) if sweep.exists() else {}


def moe_series(metrics: list[dict], metric: str) -> dict[str, list]:
  """{layer: [value per logged step that has it]} for keys 'moe/<layer>/<metric>'."""
  series: dict[str, list] = {}
  for row in metrics:
    for key, value in row.items():
      parts = key.split('/')
      if len(parts) == 3 and parts[0] == 'moe' and parts[2] == metric:
        series.setdefault(parts[1], []).append(value)
  return series


def _last_mean(metrics: list[dict], metric: str) -> float:
  series = moe_series(metrics, metric)
  return float(np.mean([values[-1] for values in series.values()])) if series else math.nan


def table_rows(runs: list[dict]) -> list[dict]:
  rows = []
  for run in runs:
    s = run['summary']
    rows.append({
        'run': run['name'], 'ffn': run['ffn'], 'eval_loss': s.get('eval_loss'),
        'train_loss': s.get('train_loss'), 'flops_active': s.get('flops_active'),
        'flops_executed': s.get('flops_executed'),
        'params_total': s.get('params_total'), 'params_active': s.get('params_active'),
        'dropped': _last_mean(run['metrics'], 'fraction_dropped'),
        'max_over_mean_load': _last_mean(run['metrics'], 'max_over_mean_load'),
        'tokens_per_s': s.get('tokens_per_s'),
    })
  return rows


def _fmt(column: str, value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '–'
  if column in ('eval_loss', 'train_loss'):
    return f'{value:.4f}'
  if column == 'dropped':
    return f'{100 * value:.1f}%'
  if column == 'max_over_mean_load':
    return f'{value:.2f}'
  if column in ('flops_active', 'flops_executed'):
    return f'{value / 1e6:.3f}M'
  if column in ('params_total', 'params_active'):
    return f'{value / 1e6:.2f}M'
  if column == 'tokens_per_s':
    return f'{value:,.0f}'
  return str(value)


def markdown_table(rows: list[dict]) -> str:
  best = min((r['eval_loss'] for r in rows if r['eval_loss'] is not None), default=None)
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for row in rows:
    cells = [_fmt(c, row[c]) for c in COLUMNS]
    if best is not None and row['eval_loss'] == best:
      cells[2] = f'**{cells[2]}**'
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot_eval_loss(runs: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for run in runs:
    points = [(m['step'], m['eval_loss']) for m in run['metrics'] if 'eval_loss' in m]
    if points:
      ax.plot(*zip(*points), marker='o', markersize=3, label=run['name'])
  ax.set(xlabel='step', ylabel='eval loss (nats / byte)', title='Held-out loss at equal FLOPs')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_dropped(runs: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for run in runs:
    steps = [m['step'] for m in run['metrics'] if any(k.endswith('/fraction_dropped') for k in m)]
    series = moe_series(run['metrics'], 'fraction_dropped')
    if series:
      ax.plot(steps, 100 * np.mean(list(series.values()), axis=0), label=run['name'])
  ax.set(xlabel='step', ylabel='tokens dropped (%, mean over MoE layers)',
         title='Dropped tokens (they pass through the residual)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_expert_load(runs: list[dict], path: pathlib.Path) -> bool:
  """Heat map: one row per (run, MoE layer), share of tokens per expert at the last log step."""
  rows, labels = [], []
  for run in runs:
    for layer, values in moe_series(run['metrics'], 'tokens_per_expert').items():
      load = np.asarray(values[-1], float)
      rows.append(load / max(load.sum(), 1e-9) * len(load))  # 1 = fair share
      labels.append(f'{run["name"]} / {layer}')
  if not rows:
    return False
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  width = max(len(r) for r in rows)
  grid = np.full((len(rows), width), np.nan)
  for i, r in enumerate(rows):
    grid[i, :len(r)] = r
  fig, ax = plt.subplots(figsize=(max(6, 0.25 * width + 3), 0.4 * len(rows) + 1.5))
  image = ax.imshow(grid, aspect='auto', cmap='magma', vmin=0)
  ax.set_yticks(range(len(labels)), labels, fontsize=7)
  ax.set(xlabel='expert', title='Expert load at the end of training (1 = fair share)')
  fig.colorbar(image, ax=ax, fraction=0.03)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


DROPPED = ("'dropped' is the share of tokens that got no expert at the end of training (they pass "
           'through the residual): token choice with a capacity drops a token when all its k '
           'choices found their experts full; expert choice when no expert picked it; dropless '
           'and Soft MoE never drop (0.0%); dense has no router (–).')


def context(runs: list[dict], workdir: pathlib.Path) -> str:
  """The conditions behind a results table: steps, tokens seen, seeds, FLOPs convention,
  determinism and software, the noise caveat and what 'dropped' means."""
  configs = [run['config'] for run in runs if run['config']]
  if not configs:
    return DROPPED
  first, env = configs[0], runs[0]['summary'].get('environment', {})
  data, train = first.get('data', {}), first.get('train', {})
  tokens = train.get('steps', 0) * data.get('batch_size', 0) * data.get('seq_len', 0)
  seeds = sorted({c.get('seed') for c in configs}, key=str)
  match = {m.get('flops_match') for m in _sweep_members(workdir).values()} - {None}
  lines = [
      f"Each run: {train.get('steps')} steps of {data.get('batch_size')} x {data.get('seq_len')} "
      f"tokens of `{data.get('name')}` = {tokens:,} training tokens; seed(s) {seeds}.",
      (f"Members are sized to equal *{match.pop()}* FLOPs per token" if len(match) == 1 else
       'FLOPs per token') + ' (active: k expert FFNs per token, the papers\' convention; '
      'executed: capacity padding counts; moe_jax/flops.py); both are in the table.',
      f"deterministic={first.get('deterministic')}; jax {env.get('jax')}, jaxlib "
      f"{env.get('jaxlib')} on {env.get('device_count')} x {env.get('device_kind')}.",
  ]
  if len(seeds) == 1:
    lines.append('With one seed, gaps between members of a few hundredths of a nat are within '
                 'seed noise (experiments/README.md measures it): no ranking is implied.')
  return '\n'.join(f'- {line}' for line in lines + [DROPPED])


def write_report(workdir: str | pathlib.Path) -> str:
  """Writes results.md/.csv and the plots into `workdir`; returns the markdown table."""
  workdir = pathlib.Path(workdir)
  runs = find_runs(workdir)
  rows = table_rows(runs)
  table = markdown_table(rows)
  plots = ['eval_loss.png', 'dropped.png']
  plot_eval_loss(runs, workdir / 'eval_loss.png')
  plot_dropped(runs, workdir / 'dropped.png')
  if plot_expert_load(runs, workdir / 'expert_load.png'):
    plots.append('expert_load.png')
  (workdir / 'results.md').write_text(
      f'# Results: {workdir.name}\n\n{table}\n\n{context(runs, workdir)}\n\n' + ''.join(f'![{p}]({p})\n' for p in plots))
  with open(workdir / 'results.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return table
