"""Shared pytest set-up: 8 simulated CPU devices for mesh tests, float32 matmul precision."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _fresh_jax_caches():
  """Drops JAX's compiled executables after each test file: the one pytest process of the suite
  (CI: 2 cores) otherwise accumulates hundreds of compiled models, and XLA:CPU once crashed
  (segmentation fault in compilation) late in a session-5 CI run."""
  yield
  jax.clear_caches()
