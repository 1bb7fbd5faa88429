"""One process of the two-process test in tests/test_multihost.py (not collected by pytest).

Usage: python tests/multihost_worker.py WORKDIR DATA_DIR, with $JAX_COORDINATOR_ADDRESS,
$JAX_NUM_PROCESSES and $JAX_PROCESS_ID set. Each process holds 4 simulated CPU devices; the run
is the test's tiny LM on a (data 2, expert 4) mesh spanning both processes, started through
`moe_jax.parallel.multihost.initialize_from_env` exactly as `moe-jax train` starts it.
"""
import sys

import worker_start  # noqa: F401  (first: the devices and jax.distributed)

import jax  # noqa: E402

from moe_jax.run import train  # noqa: E402
from tests.test_multihost import multihost_config  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
summary = train.train(multihost_config(sys.argv[2]), sys.argv[1])
print('summary', jax.process_index(), summary['steps'], summary['train_loss'], flush=True)
