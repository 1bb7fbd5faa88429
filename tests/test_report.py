"""Readable results (`moe-jax report`) on hand-written run directories: no training needed."""
import csv
import json

import matplotlib.pyplot as plt
import pytest

from moe_jax import cli
from moe_jax.run import report


def write_run(sweep, name, *, eval_loss, seed=0, moe=True, width=64):
  """A finished run: config.json, summary.json, metrics.jsonl logged every 10 steps to step 40,
  evaluated at 20 and 40; train losses 3.0, 2.0, 1.0, 0.5."""
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
      record.update({'moe/block_1/tokens_per_expert': [10, 30, 20, 40],
                     'moe/block_1/fraction_dropped': 0.1})
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
