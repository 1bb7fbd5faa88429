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


def run_two_processes(worker: str, *args) -> list[str]:
  """Runs tests/<worker> as processes 0 and 1 of one `jax.distributed` job on localhost; returns
  their outputs, asserting both succeeded."""
  env = {**os.environ, 'JAX_COORDINATOR_ADDRESS': f'localhost:{_free_port()}',
         'JAX_NUM_PROCESSES': '2', 'PYTHONPATH': ROOT}
  workers = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', worker), *map(str, args)],
      env={**env, 'JAX_PROCESS_ID': str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outputs = [w.communicate(timeout=600)[0] for w in workers]
  for i, (process, out) in enumerate(zip(workers, outputs)):
    assert process.returncode == 0, f'process {i}:\n{out[-4000:]}'
  return outputs


def test_two_processes_match_one_process(tmp_path, data_dir):
  workdir = tmp_path / 'two_processes'
  outputs = run_two_processes('multihost_worker.py', workdir, data_dir)
  for i, out in enumerate(outputs):
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


def pipeline_config(data_dir, sp_model):
  """multihost_config's layout with a SentencePiece tokenizer: batches streamed through Grain."""
  config = multihost_config(data_dir)
  config.data.tokenizer = sp_model
  return config


def test_two_processes_read_disjoint_shards_of_the_one_process_batch(tmp_path, data_dir,
                                                                     sp_model):
  """Tokenized text on 2 processes x 4 devices: each process reads only the examples of the rows
  its devices hold, the two shards are disjoint, and the global batch assembled from the two
  local parts equals the batch that one process with all 8 devices reads."""
  run_two_processes('pipeline_worker.py', tmp_path, data_dir, sp_model)

  from moe_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from moe_jax.run import tasks  # pylint: disable=g-import-not-at-top

  config = pipeline_config(data_dir, sp_model)
  feed = tasks.LM.load(config).feed(sharding.batch_sharding(sharding.mesh_from_config(config)))
  want = np.stack([np.asarray(feed.batch(i)) for i in range(3)])  # one process, 8 devices
  got = [np.load(tmp_path / f'process_{i}.npz') for i in range(2)]
  rows = [set(g['rows'].tolist()) for g in got]
  read = [set(g['read'].tolist()) for g in got]
  assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(8))
  assert read[0] and read[1] and read[0].isdisjoint(read[1])  # each reads its own shard
  for g in got:
    for i in g['read']:  # only examples of its own rows' ranges
      assert any(feed.rows.ranges[r][0] <= i < feed.rows.ranges[r][1] for r in g['rows'])
    np.testing.assert_array_equal(g['local'], want[:, g['rows']])
    np.testing.assert_array_equal(g['whole'], want)
