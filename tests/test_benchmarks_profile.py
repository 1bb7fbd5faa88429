"""CPU smoke runs of the kernel-time tools: profile_layer.py and kernel_ceiling.py (--small)."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_profile_layer_small(tmp_path):
  out = tmp_path / 'profile.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'profile_layer.py'), '--small', '--impl', 'gather',
       '--iters', '2', '--out', str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  for part in ('moe', 'dense'):
    kinds, kernels = report[part]['kinds'], report[part]['kernels']
    assert report[part]['total_ms'] > 0 and kernels
    assert abs(sum(kinds.values()) - sum(kernels.values())) < 1e-6  # every kernel has one kind
    assert kinds.get('GEMM (cuBLAS/XLA)', 0) > 0  # the matmuls are found
  assert '| kind | ms | share |' in result.stdout


def test_kernel_ceiling_small(tmp_path):
  """The FFN bounds run on CPU; the grouped and batched expert FFNs must agree (checked inside)."""
  out = tmp_path / 'ceiling.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'kernel_ceiling.py'), '--small', '--out', str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  (rec,) = json.loads(out.read_text())['ffn']
  assert rec['clock'] == 'wall' and rec['rows_per_expert'] == 128
  assert set(rec['ms']) == {'dense', 'cublas_batched', 'grouped'}
  assert all(ms > 0 for ms in rec['ms'].values()) and rec['ratio']['dense'] == 1.0
  assert 'expert FFN fwd+bwd' in result.stdout
