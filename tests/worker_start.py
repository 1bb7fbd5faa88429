"""The start of each process of tests/test_multihost.py's two-process tests (imported first by the
workers, before JAX): 4 simulated CPU devices with the test process's other XLA flags
(conftest.py's compile settings: the one-process reference each test compares with was compiled
with them), the repository on sys.path, and `jax.distributed` from $JAX_COORDINATOR_ADDRESS,
$JAX_NUM_PROCESSES and $JAX_PROCESS_ID, exactly as `moe-jax train` starts it."""
import os
import sys

os.environ['XLA_FLAGS'] = ' '.join(
    [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    + ['--xla_force_host_platform_device_count=4'])
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax.parallel import multihost  # noqa: E402  pylint: disable=g-import-not-at-top

assert multihost.initialize_from_env()
