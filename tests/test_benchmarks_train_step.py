"""benchmarks/train_step.py --small: the MFU benchmark runs end to end on CPU and reports sane numbers,
and its profile (--profile) names the part of the model behind nearly all of the step's time."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'benchmarks'))
import step_profile  # noqa: E402  pylint: disable=g-import-not-at-top


def test_train_step_benchmark_small(tmp_path):
  out = tmp_path / 'train_step.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'train_step.py'), '--small', '--profile', '2',
       '--out', str(out)],
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
    parts = row['parts']
    assert list(parts) == step_profile.ORDER, row['name']
    ms = {name: part['forward'] + part['backward'] for name, part in parts.items()}
    for name in ('attention', 'router + top-k', 'permutation', 'routed experts', 'norms',
                 'embedding, logits, loss', 'optimizer update'):
      assert ms[name] > 0, (row['name'], name, ms)
    assert parts['routed experts']['backward'] > 0 and parts['optimizer update']['backward'] == 0
    assert ms[step_profile.REST] < 0.25 * sum(ms.values()), (row['name'], ms)  # scopes name most
  assert '| routed experts |' in result.stdout


def test_profile_reads_scopes_inside_transformations():
  """A scope inside a transformation's parentheses (`jvp(loss)`) names its part; the gradient's
  instructions (`transpose(...)`) count as backward; collectives go by opcode."""
  hlo = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %exp.1 = f32[4]{0} exponential(%param_0), metadata={op_name="jit(step)/jvp(loss)/exp"}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %fusion = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation
  %dot.2 = f32[4]{0} multiply(%fusion, %p), metadata={op_name="jit(step)/transpose(jvp(Transformer))/block_0/moe/experts/mul"}
  ROOT %all-reduce-start = f32[4]{0} all-reduce-start(%dot.2), replica_groups={}, metadata={op_name="jit(step)/optimizer/psum"}
}
"""
  table = step_profile.instructions(hlo)
  assert step_profile.part_of(table['fusion']) == 'embedding, logits, loss'
  assert step_profile.direction_of(table['fusion']) == 'forward'
  assert step_profile.part_of(table['dot.2']) == 'routed experts'
  assert step_profile.direction_of(table['dot.2']) == 'backward'
  assert step_profile.part_of(table['all-reduce-start']) == step_profile.COLLECTIVE
  assert step_profile.part_of(None) == step_profile.UNNAMED


def test_optimizer_floor_is_its_bytes_at_the_hbm_bandwidth():
  """2.352B parameters (the DeepSeek-like shape) x 38 bytes at an H100's 3.35 TB/s: 26.7 ms."""
  floor = step_profile.optimizer_floor_ms(2_352_000_000, 'NVIDIA H100 80GB HBM3')
  assert abs(floor - 2.352e9 * 38 / 3.35e12 * 1e3) < 1e-9 and 26 < floor < 27
  assert step_profile.optimizer_floor_ms(10, 'cpu') is None
  parts = {name: {'forward': 1.0, 'backward': 0.0, 'kernels': {}} for name in step_profile.ORDER}
  assert 'floor at HBM bandwidth (38 bytes per parameter): 2.00 ms; measured 1.00 ms' in (
      step_profile.markdown('x', parts, 5.0, 2.0))
