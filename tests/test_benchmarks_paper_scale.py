"""benchmarks/paper_scale.py on CPU: a paper config's cpu preset trains through the console
script's code in its own process, and its row holds the plan, the run's throughput and losses (the
measured peak is the GPU's, None on CPU)."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_paper_scale_small(tmp_path):
  out = tmp_path / 'paper_scale.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'paper_scale.py'), '--scale', 'cpu',
       '--configs', 'switch_base', '--steps', '2', '--data', 'tiny_shakespeare',
       '--data-dir', str(tmp_path / 'tfds'), '--workdir', str(tmp_path / 'runs'),
       '--set', 'model.num_layers=3', '--set', 'model.encoder_layers=3', '--out', str(out)],
      capture_output=True, text=True, timeout=600, cwd=tmp_path,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  (row,) = results['rows']
  assert row['config'] == 'switch_base' and row['error'] is None, row
  assert row['plan_gib'] > 0 and row['params_total'] > 0
  assert row['measured_gib'] is None and row['measured_over_plan'] is None  # no peak on CPU
  assert row['xla_step_gib'] > 0  # XLA's analysis of the compiled step, on every backend
  memory = row['step_memory_bytes']
  assert row['xla_step_gib'] * 2 ** 30 == memory['total'] >= memory['argument'] > 0, memory
  assert row['tokens_per_s'] > 0 and 0 < row['mfu_active'] < 1
  assert math.isfinite(row['loss_first']) and math.isfinite(row['loss_last'])
  summary = json.loads((tmp_path / 'runs' / 'switch_base_cpu' / 'summary.json').read_text())
  assert summary['steps'] == 2 and 'peak_memory_bytes' in summary
  peak = results['args']['peak_tflops'] * 1e12  # active MFU: the papers' FLOPs per token
  assert row['mfu_active'] == pytest.approx(3 * summary['flops_active'] * row['tokens_per_s'] / peak)
  config = json.loads((tmp_path / 'runs' / 'switch_base_cpu' / 'config.json').read_text())
  assert config['model']['num_layers'] == config['model']['encoder_layers'] == 3  # --set, run
  sys.path.insert(0, str(ROOT))
  from configs.papers import switch_base  # pylint: disable=g-import-not-at-top
  from moe_jax.run import memory_plan  # pylint: disable=g-import-not-at-top
  planned = switch_base.get_config('scale=cpu')
  planned.model.update(num_layers=3, encoder_layers=3)
  assert row['params_total'] == memory_plan.make_plan(planned).params_total  # --set, planned
  assert '| switch_base |' in (out.with_suffix('.md')).read_text()


def test_a_failed_run_is_a_row_naming_its_error(tmp_path):
  """A run that fails (here: no such data set) is a row with its error line and the end of its
  stderr, not a crash of the benchmark."""
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import paper_scale
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
  summary = paper_scale.train('switch_base', 'cpu', {'data.name': 'no_such_corpus'},
                              tmp_path / 'run', env)
  assert 'no_such_corpus' in summary['error'] and summary['stderr_tail'], summary
  assert summary['memory_lines'] == [], summary  # it failed before compiling anything


def test_memory_lines_are_the_trainers_analysis_and_the_allocators_summary():
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import paper_scale
  kept = ['moe_jax.run.train: train step compiled; XLA memory per device, GiB: argument 15.18',
          'Limit:                     77309411328', 'InUse:                     59862188032',
          'MaxInUse:                  61013467136']
  dropped = ['  File "/work/main/moe_jax/run/train.py", line 427, in _check_finite',
             'jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to al']
  assert [line for line in kept + dropped if paper_scale.MEMORY_LINE.search(line)] == kept


def test_a_bad_set_is_a_short_error_before_any_run(tmp_path, capsys):
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import paper_scale
  for bad, says in (['--set', 'model.num_layers'], 'give PATH=VALUE'), (
      ['--set', 'model.no_such_field=3'], 'no_such_field'):
    with pytest.raises(SystemExit) as exit_:
      paper_scale.main(['--scale', 'cpu', '--configs', 'switch_base', '--workdir',
                        str(tmp_path), *bad])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err
  assert not list(tmp_path.iterdir())  # nothing written
