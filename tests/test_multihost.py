"""A real two-process run: `jax.distributed` over localhost, 2 processes x 4 CPU devices.

The tiny LM trains on a (data 2, expert 4) mesh that spans both processes (expert-parallel
all_to_all across them), and its run directory must equal that of the same run in one process
on 8 devices: the same losses and metrics at every step, one metrics.jsonl line per logged step
(only process 0 writes the run's files), the same summary, a checkpoint both can resume from.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from moe_jax.run import train
from tests.test_train import read_metrics, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def multihost_config(data_dir):
  """The tiny LM with 8 experts on mesh (data 2, expert 4), 4 steps, logged at every step."""
  return tiny_config(data_dir, **{'data.seq_len': 16, 'moe.num_experts': 8, 'moe.group_by':
                                  'sequence', 'mesh.data': 2, 'mesh.expert': 4, 'train.steps': 4,
                                  'train.eval_every': 2, 'train.checkpoint_every': 2})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, data_dir):
  workdir = tmp_path / 'two_processes'
  env = {**os.environ, 'JAX_COORDINATOR_ADDRESS': f'localhost:{_free_port()}',
         'JAX_NUM_PROCESSES': '2', 'PYTHONPATH': ROOT}
  workers = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'multihost_worker.py'), str(workdir),
       str(data_dir)], env={**env, 'JAX_PROCESS_ID': str(i)}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=600)[0] for w in workers]
  for i, (worker, out) in enumerate(zip(workers, outputs)):
    assert worker.returncode == 0, f'process {i}:\n{out[-4000:]}'
    assert f'summary {i} 4 ' in out

  reference = tmp_path / 'one_process'
  train.train(multihost_config(data_dir), reference)  # this pytest process: 8 devices

  got, want = read_metrics(workdir), read_metrics(reference)
  assert [r['step'] for r in got] == [1, 2, 3, 4]  # one line per step: process 0 alone writes
  for a, b in zip(got, want):
    for key in ('train_loss', 'aux_loss', 'grad_norm', 'eval_loss'):
      np.testing.assert_allclose(a.get(key, 0.0), b.get(key, 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a['moe/block_1/tokens_per_expert'],
                               b['moe/block_1/tokens_per_expert'])
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 4 and summary['train_loss'] == got[-1]['train_loss']
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == \
      ['2', '4']
