"""Shared pytest set-up: 8 simulated CPU devices for mesh tests, float32 matmul precision, and
XLA:CPU's cheaper compile: almost every test compiles a model once and runs it a few steps, so
compilation is most of the suite's time. Backend optimization level 0 without LLVM's expensive
passes compiles a narrow LM in ~55% of the time (tests/test_causality.py: 8.7 -> 4.9 s) and runs
it ~1.5x slower; what a test checks (causality, equalities between two runs, losses falling) does
not depend on how XLA optimizes. Users' runs keep XLA's defaults. On a GPU (JAX_PLATFORMS=cuda)
the test process allocates GPU memory as it needs it, not 75% at once."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if os.environ['JAX_PLATFORMS'] != 'cpu':
  # On a GPU, JAX would take 75% of its memory up front in this process, leaving too little for the
  # training processes tests/test_determinism_gpu.py starts when it runs after other GPU tests.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _fresh_jax_caches():
  """Drops JAX's compiled executables after each test file: the one pytest process of the suite
  (CI: 2 cores) otherwise accumulates hundreds of compiled models, and XLA:CPU once crashed
  (segmentation fault in compilation) late in a run of the whole suite."""
  yield
  jax.clear_caches()
