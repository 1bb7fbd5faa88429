"""CPU smoke runs (--small) of the MoE layer and the expert-parallel scaling benchmarks."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import moe_layer  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import parallel_scaling  # noqa: E402  pylint: disable=g-import-not-at-top


def test_benchmark_small_runs(tmp_path):
  out = tmp_path / 'bench.json'
  assert moe_layer.main(['--small', '--families', 'top_k', '--impls', 'blocked', '--no-verify',
                         '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  row, = result['cases'][0]['rows']
  assert row['impl'] == 'blocked' and row['fwdbwd_ms'] > 0
  assert 'router_fwd_ms' in result['cases'][0]['overheads']


def test_parallel_scaling_small_runs(tmp_path):
  """What a one-GPU run does: the dropless layer on one device and through the chunked exchange
  on a one-device mesh, and the train step (tests/test_ep_dropless.py covers more devices)."""
  out = tmp_path / 'scaling.json'
  assert parallel_scaling.main(['--small', '--max-devices', '1', '--families', 'mixtral',
                                '--routings', 'dropless', '--chunks', '2', '--out', str(out)]) == 0
  rows = json.loads(out.read_text())['weak_scaling']
  assert [(r['bench'], r['path'], r['chunks']) for r in rows] == [
      ('layer', 'one-device', 1), ('layer', 'sharded', 2), ('train', 'one-device', 1)]
  assert all(r['ms'] > 0 for r in rows)
