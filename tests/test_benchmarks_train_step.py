"""benchmarks/train_step.py --small: the MFU benchmark runs end to end on CPU and reports sane numbers."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_train_step_benchmark_small(tmp_path):
  out = tmp_path / 'train_step.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'train_step.py'), '--small', '--out', str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert '| small-gather' in result.stdout and '| small-blocked' in result.stdout  # the table
  for row in report['results']:
    assert 'error' not in row, row
    assert row['step_ms'] > 0 and row['tflops_executed'] >= row['tflops_useful'] > 0, row
    # 'kept' subtracts exactly the dropped assignments' routed-expert FLOPs from 'useful'
    assert 0 <= row['assignments_dropped'] <= 1, row
    case = row['config']
    routed = 3 * case['num_layers'] * case['k'] * 6 * case['d_model'] * case['d_ff'] * row[
        'tokens_per_step']
    assert abs(row['step_flops_useful'] - row['step_flops_kept']
               - routed * row['assignments_dropped']) <= 1e-6 * row['step_flops_useful'], row
