"""Tables and plots from run directories.

A run directory holds `summary.json` and `metrics.jsonl` (see moe_jax/run/train.py). `write_report`
turns every run under a sweep directory into `results.md`, `results.csv`, `eval_loss.png`
(eval loss against step, one line per run), `expert_load.png` (heat map of each MoE layer's final
share of tokens per expert over the fair share, on a diverging scale: white at the fair share) and
`dropped.png` (fraction of tokens dropped against step; the runs that never drop share one entry).
Each run keeps one colour, line style and marker in every plot (`run_styles`: distinct colours for
up to 20 runs), and the legends sit outside the axes. The table's train loss is the mean over the
last evaluation interval, and no eval loss is bold unless its lead is larger than the seed noise
(`best_runs`).
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
import textwrap
from typing import Any

import numpy as np

# flops_active / flops_executed: forward FLOPs per token by each convention of moe_jax/moe/flops.py
# (active: k experts per token, the papers'; executed: capacity padding counts).
# eval_loss: nats per token of the run's tokenizer; bits_per_byte: the same held-out text's total
# nats / (ln 2 x its UTF-8 bytes), comparable across tokenizers.
COLUMNS = ('run', 'ffn', 'eval_loss', 'bits_per_byte', 'train_loss', 'flops_active',
           'flops_executed',
           'params_total', 'params_active', 'dropped', 'max_over_mean_load', 'tokens_per_s')


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  """metrics.jsonl of a run directory: a dict per logged step ([] before the first)."""
  path = run_dir / 'metrics.jsonl'
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(line) for line in lines if line.strip()]


def read_run(run_dir: pathlib.Path) -> dict:
  """{'name', 'summary': dict, 'metrics': [dict per logged step], 'config': dict ({} if no
  config.json)} of one finished run directory."""
  config = run_dir / 'config.json'
  return {'name': run_dir.name, 'summary': json.loads((run_dir / 'summary.json').read_text()),
          'metrics': read_metrics(run_dir),
          'config': json.loads(config.read_text()) if config.exists() else {}}


def find_runs(workdir: pathlib.Path) -> list[dict]:
  """Every finished run under `workdir` (a run directory itself, or a sweep of them)."""
  workdir = pathlib.Path(workdir)
  dirs = [workdir] if (workdir / 'summary.json').exists() else sorted(
      p.parent for pattern in ('*/summary.json', '*/seed_*/summary.json')
      for p in workdir.glob(pattern))
  members = _sweep_members(workdir)
  order = {name: i for i, name in enumerate(members)}
  member = lambda d: d.parent.name if d.name.startswith('seed_') and d != workdir else d.name
  dirs.sort(key=lambda d: (order.get(member(d), len(order)), member(d)))
  if not dirs:
    raise FileNotFoundError(f'no finished runs (summary.json) under {workdir}; train or sweep '
                            'into it first.')
  runs = []
  for d in dirs:  # a sweep with seeds: each run is <member>/seed_<s>
    run = read_run(d)
    run['name'] = f'{member(d)}/{d.name}' if member(d) != d.name else d.name
    # the sweep's short description of each member's FFN, where there is one
    run['ffn'] = members.get(member(d), {}).get('description', run['summary'].get('router', ''))
    runs.append(run)
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


def last_interval_train_loss(metrics: list[dict]) -> float | None:
  """Mean logged train loss over the last evaluation interval (the steps after the evaluation
  before the last one), not the last batch alone."""
  evals = [m['step'] for m in metrics if 'eval_loss' in m]
  after = evals[-2] if len(evals) > 1 else 0
  losses = [m['train_loss'] for m in metrics if m['step'] > after]
  return float(np.mean(losses)) if losses else None


def bits_per_byte(run: dict) -> float | None:
  """The run's held-out bits per byte: summary.json's eval_bits_per_byte, else (a run from
  before it was logged) eval_loss / ln 2 for a byte-level run."""
  s = run['summary']
  if s.get('eval_bits_per_byte') is not None:
    return s['eval_bits_per_byte']
  tokenizer = run['config'].get('data', {}).get('tokenizer', 'bytes')
  if s.get('eval_loss') is not None and tokenizer == 'bytes' and 'eval_accuracy' not in s:  # text
    return s['eval_loss'] / math.log(2)
  return None


def table_rows(runs: list[dict]) -> list[dict]:
  rows = []
  for run in runs:
    s = run['summary']
    rows.append({
        'run': run['name'], 'ffn': run['ffn'], 'eval_loss': s.get('eval_loss'),
        'bits_per_byte': bits_per_byte(run),
        'train_loss': last_interval_train_loss(run['metrics']),
        'flops_active': s.get('flops_active'), 'flops_executed': s.get('flops_executed'),
        'params_total': s.get('params_total'), 'params_active': s.get('params_active'),
        'dropped': _last_mean(run['metrics'], 'fraction_dropped'),
        'max_over_mean_load': _last_mean(run['metrics'], 'max_over_mean_load'),
        'tokens_per_s': s.get('tokens_per_s'),
    })
  return rows


def _fmt(column: str, value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '–'
  if column in ('eval_loss', 'train_loss', 'bits_per_byte'):
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


def markdown_table(rows: list[dict], bold: set[str] = frozenset()) -> str:
  """The results table; the eval_loss of the runs named in `bold` is bold (see `best_runs`)."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for row in rows:
    cells = [_fmt(c, row[c]) for c in COLUMNS]
    if row['run'] in bold:
      cells[COLUMNS.index('eval_loss')] = f'**{cells[COLUMNS.index("eval_loss")]}**'
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _member(run: dict) -> str:
  """A run's config without its seed (and device mesh): the runs of one member share it."""
  config = {k: v for k, v in run['config'].items() if k not in ('seed', 'mesh')}
  return json.dumps(config, sort_keys=True) if config else run['name']


def best_runs(runs: list[dict], rows: list[dict]) -> tuple[set[str], str]:
  """(runs whose eval_loss to bold, a note saying why or why none).

  Runs whose configs differ only in the seed are one member. The member with the lowest mean
  eval_loss is bold only when its lead over the runner-up exceeds twice the standard error of
  that difference, from the pooled spread over seeds; with one seed per member the noise is
  unknown, so nothing is bold.
  """
  members: dict[str, list] = {}
  for run, row in zip(runs, rows):
    if row['eval_loss'] is not None:
      members.setdefault(_member(run), []).append((run['name'], row['eval_loss']))
  if len(members) < 2:
    return set(), ''
  if all(len(m) == 1 for m in members.values()):
    return set(), ('No eval_loss is bold: with one seed per member the seed noise is unknown, so '
                   'no gap between members can be told from it. Train each member with several '
                   'seeds (config.seed) to rank them.')
  deviations = [loss - np.mean([x for _, x in m]) for m in members.values() for _, loss in m]
  dof = sum(len(m) - 1 for m in members.values())
  noise = math.sqrt(sum(d * d for d in deviations) / dof)
  (best_mean, best), (second_mean, second) = sorted(
      (np.mean([x for _, x in m]), key) for key, m in members.items())[:2]
  gap = second_mean - best_mean
  threshold = 2 * noise * math.sqrt(1 / len(members[best]) + 1 / len(members[second]))
  if gap > threshold:
    return {name for name, _ in members[best]}, (
        f'Bold: the lowest mean eval_loss over seeds; its lead over the runner-up, {gap:.4f}, '
        f'exceeds twice its standard error from the spread over seeds ({threshold:.4f}).')
  return set(), (f'No eval_loss is bold: the gap between the best two members, {gap:.4f}, is '
                 f'within twice its standard error from the spread over seeds ({threshold:.4f}).')


TRAIN_LOSS_NOTE = ('train_loss: the mean of the train losses logged over the last evaluation '
                   'interval, not one batch.')


# tab10, then ten more colours picked to differ most from it and from each other (tab20 pairs a
# colour with a paler twin: neighbouring runs looked alike). Runs past the tenth are dashed as well.
PALETTE = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
           '#bcbd22', '#17becf', '#000000', '#000075', '#f032e6', '#a6761d', '#1b9e77', '#800000',
           '#911eb4', '#2b3d26', '#e7298a', '#b3446c')
LINESTYLES = ('-', '--', '-.', ':')
MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', '<', '>', 'h', 'p', 'd', '8', 'H')


def run_styles(runs: list[dict]) -> dict[str, dict[str, Any]]:
  """{run: {'color', 'linestyle', 'marker'}}, the same in every plot: a colour of PALETTE each (up
  to 20 runs), a line style per ten runs, and a marker each."""
  return {run['name']: {'color': PALETTE[i % len(PALETTE)],
                        'linestyle': LINESTYLES[(i // 10) % len(LINESTYLES)],
                        'marker': MARKERS[i % len(MARKERS)]}
          for i, run in enumerate(runs)}


def _legend_outside(ax, notes: tuple[str, ...] = ()) -> None:
  """The legend right of the axes, where it hides no curve (saved with bbox_inches='tight'), with
  `notes` as entries of their own, without a line."""
  from matplotlib.lines import Line2D
  handles, labels = ax.get_legend_handles_labels()
  handles += [Line2D([], [], linestyle='none') for _ in notes]
  ax.legend(handles, labels + list(notes), fontsize=8, loc='upper left',
            bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _csv_rows(rows: list[dict]) -> list[dict]:
  """Rows with NaN as None, an empty CSV cell."""
  return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
          for row in rows]


def plot_eval_loss(runs: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  styles = run_styles(runs)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for run in runs:
    points = [(m['step'], m['eval_loss']) for m in run['metrics'] if 'eval_loss' in m]
    if points:
      ax.plot(*zip(*points), markersize=4, label=run['name'], **styles[run['name']])
  ax.set(xlabel='step', ylabel='eval loss (nats / byte)', title='Held-out loss at equal FLOPs')
  ax.grid(alpha=0.3)
  _legend_outside(ax)
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)


def plot_dropped(runs: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  styles = run_styles(runs)
  fig, ax = plt.subplots(figsize=(7, 4))
  never, no_router = [], []
  for run in runs:
    steps = [m['step'] for m in run['metrics'] if any(k.endswith('/fraction_dropped') for k in m)]
    series = moe_series(run['metrics'], 'fraction_dropped')
    if not series:
      no_router.append(run['name'])
      continue
    dropped = 100 * np.mean(list(series.values()), axis=0)
    if not dropped.any():  # drawn once for all of them below: overlapping lines hide each other
      never.append(run['name'])
      continue
    ax.plot(steps, dropped, label=run['name'], markersize=4,
            markevery=max(1, len(steps) // 10), **styles[run['name']])
  if never:
    ax.axhline(0.0, color='0.55', linewidth=3, alpha=0.6,
               label=textwrap.fill('never drop (0% at every step): ' + ', '.join(never), 34))
  ax.set(xlabel='step', ylabel='tokens dropped (%, mean over MoE layers)',
         title='Dropped tokens (they pass through the residual)')
  ax.grid(alpha=0.3)
  _legend_outside(ax, (textwrap.fill('no router: ' + ', '.join(no_router), 34),) if no_router
                  else ())
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)


def plot_expert_load(runs: list[dict], path: pathlib.Path) -> bool:
  """Heat map: one row per (run, MoE layer), share of tokens per expert at the last log step over
  the fair share (1/E), on a diverging scale centred on 1 (white): blue below, red above, so that a
  balanced router is white and an idle expert dark blue. Grey cells: the layer has fewer experts.

  Row labels take their run's colour in the other plots."""
  rows, labels = [], []
  for run in runs:
    for layer, values in moe_series(run['metrics'], 'tokens_per_expert').items():
      load = np.asarray(values[-1], float)
      rows.append(load / max(load.sum(), 1e-9) * len(load))  # 1 = fair share
      labels.append((run['name'], layer))
  if not rows:
    return False
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.colors import TwoSlopeNorm
  styles = run_styles(runs)
  width = max(len(r) for r in rows)
  grid = np.full((len(rows), width), np.nan)
  for i, r in enumerate(rows):
    grid[i, :len(r)] = r
  top = max(2.0, float(np.nanmax(grid)))
  fig, ax = plt.subplots(figsize=(max(6, 0.25 * width + 3), 0.4 * len(rows) + 1.5))
  cmap = matplotlib.colormaps['RdBu_r'].with_extremes(bad='0.8')  # grey: no such expert
  image = ax.imshow(grid, aspect='auto', cmap=cmap,
                    norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
  ax.set_yticks(range(len(labels)), [f'{name} / {layer}' for name, layer in labels], fontsize=7)
  for tick, (name, _) in zip(ax.get_yticklabels(), labels):
    tick.set_color(styles[name]['color'])
  ax.set_xticks(range(0, width, max(1, width // 16)))
  ax.set(xlabel='expert index', ylabel='run / MoE layer',
         title='Expert load at the end of training (white = fair share, blue = under, red = over)')
  bar = fig.colorbar(image, ax=ax, fraction=0.03, label='share of tokens / fair share')
  bar.set_ticks([0.0, 0.5, 1.0, *np.arange(2.0, top + 1e-9, max(1.0, np.ceil(top / 4) - 1.0))])
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
      'executed: capacity padding counts; moe_jax/moe/flops.py); both are in the table.',
      f"deterministic={first.get('deterministic')}; jax {env.get('jax')}, jaxlib "
      f"{env.get('jaxlib')} on {env.get('device_count')} x {env.get('device_kind')}.",
  ]
  if len(seeds) == 1:
    lines.append('With one seed, gaps between members of a few hundredths of a nat are within '
                 'seed noise (experiments/README.md measures it): no ranking is implied.')
  return '\n'.join(f'- {line}' for line in lines + [DROPPED])


def write_report(workdir: str | pathlib.Path) -> str:
  """Writes results.md/.csv and the plots into `workdir`; returns the markdown table and its
  notes."""
  workdir = pathlib.Path(workdir)
  runs = find_runs(workdir)
  rows = table_rows(runs)
  bold, best_note = best_runs(runs, rows)
  table = '\n\n'.join(filter(None, [markdown_table(rows, bold), TRAIN_LOSS_NOTE, best_note]))
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
    writer.writerows(_csv_rows(rows))
  return table


OUTPUTS = ('results.md', 'results.csv', 'eval_loss.png', 'dropped.png', 'expert_load.png')


def written(workdir: str | pathlib.Path) -> str:
  """A line naming where `write_report` put its files."""
  workdir = pathlib.Path(workdir).resolve()
  return f'wrote {", ".join(n for n in OUTPUTS if (workdir / n).exists())} in {workdir}'
