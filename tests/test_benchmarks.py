"""benchmarks/moe_layer.py --small: the CPU smoke run of the MoE layer benchmark."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import moe_layer  # noqa: E402  pylint: disable=g-import-not-at-top


def test_benchmark_small_runs(tmp_path):
  out = tmp_path / 'bench.json'
  assert moe_layer.main(['--small', '--families', 'top_k', '--impls', 'blocked', '--no-verify',
                         '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  row, = result['cases'][0]['rows']
  assert row['impl'] == 'blocked' and row['fwdbwd_ms'] > 0
  assert 'router_fwd_ms' in result['cases'][0]['overheads']
