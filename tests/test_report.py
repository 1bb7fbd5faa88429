"""Readable results (`moe-jax report`) on hand-written run directories: no training needed."""
import csv
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from moe_jax import cli
from moe_jax.run import report


def write_run(sweep, name, *, eval_loss, seed=0, moe=True, width=64, dropped=0.1,
              load=(10, 30, 20, 40)):
  """A finished run: config.json, summary.json, metrics.jsonl logged every 10 steps to step 40,
  evaluated at 20 and 40; train losses 3.0, 2.0, 1.0, 0.5; with moe, `load` tokens per expert
  and a fraction `dropped`."""
  run = sweep / name
  run.mkdir(parents=True)
  (run / 'config.json').write_text(json.dumps({'seed': seed, 'model': {'d_ff': width}}))
  (run / 'summary.json').write_text(json.dumps({'eval_loss': eval_loss, 'train_loss': 0.5}))
  records = []
  for step, train_loss in zip((10, 20, 30, 40), (3.0, 2.0, 1.0, 0.5)):
    record = {'step': step, 'train_loss': train_loss}
    if step in (20, 40):
      record['eval_loss'] = eval_loss
    if moe:
      record.update({'moe/block_1/tokens_per_expert': list(load),
                     'moe/block_1/fraction_dropped': dropped})
    records.append(record)
  (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def test_train_loss_is_the_mean_over_the_last_evaluation_interval(tmp_path):
  write_run(tmp_path, 'dense', eval_loss=2.0)
  [row] = report.table_rows(report.find_runs(tmp_path / 'dense'))
  assert row['train_loss'] == pytest.approx((1.0 + 0.5) / 2)  # steps 30 and 40, after eval 20
  assert report.TRAIN_LOSS_NOTE in report.write_report(tmp_path / 'dense')


def test_one_seed_per_member_bolds_nothing_and_says_why(tmp_path):
  write_run(tmp_path, 'dense', eval_loss=2.0, moe=False)
  write_run(tmp_path, 'switch', eval_loss=1.5, width=32)
  table = report.write_report(tmp_path)
  assert '**' not in table and 'one seed per member the seed noise is unknown' in table
  assert 'seed noise is unknown' in (tmp_path / 'results.md').read_text()


@pytest.mark.parametrize('gap, bold', [(0.5, True), (0.01, False)])
def test_bold_only_when_the_gap_exceeds_the_seed_noise(tmp_path, gap, bold):
  for seed, noise in enumerate((-0.02, 0.0, 0.02)):  # three seeds per member
    write_run(tmp_path, f'a_{seed}', eval_loss=2.0 + noise, seed=seed, width=32)
    write_run(tmp_path, f'b_{seed}', eval_loss=2.0 + gap + noise, seed=seed, width=64)
  runs = report.find_runs(tmp_path)
  names, note = report.best_runs(runs, report.table_rows(runs))
  assert names == ({'a_0', 'a_1', 'a_2'} if bold else set())
  assert ('exceeds twice its standard error' if bold else 'within twice') in note
  assert report.write_report(tmp_path).count('**') == (6 if bold else 0)


def test_csv_has_empty_cells_not_nan(tmp_path):
  write_run(tmp_path, 'dense', eval_loss=2.0, moe=False)
  write_run(tmp_path, 'switch', eval_loss=1.5, width=32)
  report.write_report(tmp_path)
  text = (tmp_path / 'results.csv').read_text()
  assert 'nan' not in text
  dense = next(csv.DictReader(text.splitlines()))
  assert dense['run'] == 'dense' and dense['dropped'] == '' and dense['max_over_mean_load'] == ''


def test_each_run_keeps_one_colour_and_expert_load_is_labelled(tmp_path, monkeypatch):
  write_run(tmp_path, 'dense', eval_loss=2.0, moe=False)  # in eval_loss.png only
  write_run(tmp_path, 'switch', eval_loss=1.5, width=32)
  write_run(tmp_path, 'gshard', eval_loss=1.6, width=16)
  figures = []
  monkeypatch.setattr(plt, 'close', figures.append)  # report closes each figure once saved
  report.write_report(tmp_path)
  eval_loss, dropped, expert_load = figures
  colours = {line.get_label(): line.get_color() for line in eval_loss.axes[0].get_lines()}
  assert len(set(map(str, colours.values()))) == 3
  for line in dropped.axes[0].get_lines():
    assert line.get_color() == colours[line.get_label()]
  heat_map, colour_bar = expert_load.axes
  for label in heat_map.get_yticklabels():
    assert label.get_color() == colours[label.get_text().split(' / ')[0]]
  assert heat_map.get_xlabel() == 'expert index' and heat_map.get_ylabel() == 'run / MoE layer'
  assert colour_bar.get_ylabel() == 'share of tokens / fair share'
  monkeypatch.undo()
  for figure in figures:
    plt.close(figure)


def test_report_command_says_where_it_wrote(tmp_path, capsys):
  write_run(tmp_path, 'switch', eval_loss=1.5)
  assert cli.main(['moe-jax', 'report', '--workdir', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert (f'wrote results.md, results.csv, eval_loss.png, dropped.png, expert_load.png in '
          f'{tmp_path.resolve()}') in out


def report_figures(sweep, monkeypatch):
  """The figures of eval_loss.png, dropped.png and expert_load.png (if any) of `sweep`, drawn."""
  figures = []
  monkeypatch.setattr(plt, 'close', figures.append)  # report closes each figure once saved
  report.write_report(sweep)
  monkeypatch.undo()
  for figure in figures:
    figure.canvas.draw()
  return figures


def test_expert_load_is_diverging_around_the_fair_share(tmp_path, monkeypatch):
  """A balanced layer is white, an idle expert dark blue, an overloaded one red: not a linear
  0-8 scale on which the fair share looked nearly as dark as an idle expert."""
  write_run(tmp_path, 'balanced', eval_loss=1.5, load=(25, 25, 25, 25))
  write_run(tmp_path, 'skewed', eval_loss=1.6, load=(0, 10, 30, 60))
  *_, expert_load = report_figures(tmp_path, monkeypatch)
  heat_map, colour_bar = expert_load.axes
  image = heat_map.get_images()[0]
  assert image.norm.vcenter == 1.0 and image.norm.vmin == 0.0 and image.norm.vmax >= 2.0
  white, idle, hot = (np.asarray(image.cmap(image.norm(v))[:3]) for v in (1.0, 0.0, 2.4))
  assert white.min() > 0.9  # the fair share
  assert idle[2] > 0.3 and idle[:2].max() < 0.2  # dark blue
  assert hot[0] > 0.3 and hot[1:].max() < 0.2  # dark red
  assert colour_bar.get_ylabel() == 'share of tokens / fair share'
  assert 1.0 in colour_bar.get_yticks()
  plt.close(expert_load)


def test_fourteen_runs_are_told_apart_and_legends_hide_no_curve(tmp_path, monkeypatch):
  """Each of 14 runs (a router zoo) gets its own colour and marker, the same in every plot (tab20
  gave neighbours a colour and its paler twin), and the legends sit right of the axes."""
  names = [f'run{i:02d}' for i in range(14)]
  for i, name in enumerate(names):
    write_run(tmp_path, name, eval_loss=2.0 + i / 100, dropped=0.1 + i / 100)
  eval_loss, dropped, expert_load = report_figures(tmp_path, monkeypatch)
  styles = {line.get_label(): (line.get_color(), line.get_linestyle(), line.get_marker())
            for line in eval_loss.axes[0].get_lines()}
  assert sorted(styles) == names
  assert len({colour for colour, _, _ in styles.values()}) == 14
  assert len({marker for _, _, marker in styles.values()}) == 14
  assert styles == {name: (style['color'], style['linestyle'], style['marker']) for name, style
                    in report.run_styles([{'name': name} for name in names]).items()}
  for line in dropped.axes[0].get_lines():
    assert (line.get_color(), line.get_linestyle(), line.get_marker()) == styles[line.get_label()]
  for figure in (eval_loss, dropped):
    ax = figure.axes[0]
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= box.x1, (legend, box)
  for figure in (eval_loss, dropped, expert_load):
    plt.close(figure)


def test_runs_that_never_drop_share_one_legend_entry(tmp_path, monkeypatch):
  """Seven 0% lines drawn on top of each other showed as one, unnamed: they are one entry."""
  write_run(tmp_path, 'dense', eval_loss=2.0, moe=False)
  write_run(tmp_path, 'switch', eval_loss=1.5)
  for name in ('dropless', 'soft'):
    write_run(tmp_path, name, eval_loss=1.6, dropped=0.0)
  _, dropped, expert_load = report_figures(tmp_path, monkeypatch)
  labels = [text.get_text() for text in dropped.axes[0].get_legend().get_texts()]
  assert labels[0] == 'switch'
  assert ' '.join(labels[1].split()) == 'never drop (0% at every step): dropless, soft'
  assert labels[2] == 'no router: dense'
  assert [line.get_label() for line in dropped.axes[0].get_lines()][0] == 'switch'
  plt.close(dropped)
  plt.close(expert_load)
