"""One process of the two-process input pipeline test in tests/test_multihost.py (not collected).

Usage: python tests/pipeline_worker.py OUT DATA_DIR SP_MODEL, with $JAX_COORDINATOR_ADDRESS,
$JAX_NUM_PROCESSES and $JAX_PROCESS_ID set. Each process holds 4 simulated CPU devices of the
test's (data 2, expert 4) mesh, builds the tokenized LM's training feed as `moe-jax train` does,
reads 3 global batches and writes OUT/process_<i>.npz: its rows, the training examples it read,
its local rows of each batch and each whole global batch (gathered from both processes).
"""
import os
import sys

import worker_start  # noqa: F401  (first: the devices and jax.distributed)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from moe_jax.data import text  # noqa: E402
from moe_jax.parallel import sharding  # noqa: E402
from moe_jax.run import tasks  # noqa: E402
from tests.test_multihost import pipeline_config  # noqa: E402

out, data_dir, sp_model = sys.argv[1:4]
read = set()
real_sources = text.text_sources


class Recorded:
  """The training split, noting which examples this process reads."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    read.add(int(index))
    return self.source[index]


def text_sources(*args, **kwargs):
  sources = real_sources(*args, **kwargs)
  return {**sources, 'train': Recorded(sources['train'])}


text.text_sources = text_sources
config = pipeline_config(data_dir, sp_model)
mesh = sharding.mesh_from_config(config)
feed = tasks.LM.load(config).feed(sharding.batch_sharding(mesh))
local, whole = [], []
for i in range(3):
  batch = feed.batch(i)
  rows = {}
  for shard in batch.addressable_shards:
    for j, row in zip(range(*shard.index[0].indices(batch.shape[0])), np.asarray(shard.data)):
      rows[j] = row
  local.append(np.stack([rows[j] for j in sorted(rows)]))
  whole.append(multihost_utils.process_allgather(batch, tiled=True))
assert jax.process_count() == 2 and sorted(rows) == feed.rows.rows
np.savez(os.path.join(out, f'process_{jax.process_index()}.npz'), rows=np.asarray(feed.rows.rows),
         read=np.asarray(sorted(read)), local=np.stack(local), whole=np.stack(whole))
print('done', jax.process_index(), flush=True)
