"""Bitwise-repeatable GPU training with config.deterministic (moe_jax/reproducibility.py).

Needs a GPU: run on the device machine with `JAX_PLATFORMS=cuda python -m pytest -q -s
tests/test_determinism_gpu.py` (English mix in $MOE_JAX_DATA_DIR or ../shared/data). Four processes
train the same claim member from the same seed, two with the switch on and two with it off, all at
once on the one GPU; the two 'on' runs must write identical metrics (every logged loss, gradient
norm and routing metric, bit for bit), and the spread of the 'off' runs is printed for
docs/performance.md. On CPU every run is deterministic and this test skips; the memory the runs
and the test process share the GPU by is checked on CPU too.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from moe_jax.data import text

needs_gpu = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(__file__).with_name('determinism_worker.py')
STEPS = 300
TIMING = ('tokens_per_s',)  # wall-clock fields: never bitwise equal
RUNS = 4
MEMORY_FRACTION = 0.2  # of the GPU, for each run: 4 x 0.2, and the rest for this test process


def worker_env(environ) -> dict:
  """A run's environment: it takes MEMORY_FRACTION of the GPU's memory up front (not JAX's default
  75%) and XLA's default flags (not the CPU tests'). This process, which may have run other GPU
  tests first, keeps what it allocated: conftest.py stops it preallocating on a GPU."""
  env = dict(environ, XLA_PYTHON_CLIENT_MEM_FRACTION=str(MEMORY_FRACTION),
             XLA_PYTHON_CLIENT_PREALLOCATE='true')
  env.pop('XLA_FLAGS', None)
  return env


def test_the_runs_and_this_process_share_the_gpu():
  """Checked without a GPU: under JAX_PLATFORMS=cuda conftest.py keeps the test process from
  taking 75% of the GPU (the runs then failed for memory after tests/test_kernels_gpu.py in the same
  pytest command), and the runs take 0.2 each, leaving a fifth of the GPU to it."""
  environ = {k: v for k, v in os.environ.items() if k != 'XLA_PYTHON_CLIENT_PREALLOCATE'}
  probe = subprocess.run(
      [sys.executable, '-c', 'import os, conftest; '
       'print(os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))'],
      cwd=ROOT, env=dict(environ, JAX_PLATFORMS='cuda'), capture_output=True, text=True,
      check=True)
  assert probe.stdout.split()[-1] == 'false'
  env = worker_env({**environ, 'JAX_PLATFORMS': 'cuda', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false',
                    'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert env['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'true' and 'XLA_FLAGS' not in env
  assert RUNS * float(env['XLA_PYTHON_CLIENT_MEM_FRACTION']) <= 0.8


def _metrics(workdir: pathlib.Path) -> list[dict]:
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _spread(a: list[dict], b: list[dict], key: str) -> float:
  return max(abs(x[key] - y[key]) for x, y in zip(a, b) if x.get(key) is not None)


@needs_gpu
def test_same_seed_twice_is_bitwise_identical_with_the_switch_on(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  text.load_text_splits('english_mix', data_dir=data_dir)  # prepared once, before the runs
  env = worker_env(os.environ)
  runs = {f'{mode}{i}': tmp_path / f'{mode}{i}' for mode in ('on', 'off') for i in (1, 2)}
  assert len(runs) == RUNS
  procs = {name: subprocess.Popen([sys.executable, str(WORKER), str(workdir), data_dir,
                                   str(STEPS), name[:-1]], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
           for name, workdir in runs.items()}
  for name, proc in procs.items():
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, f'{name} failed:\n{out[-3000:]}'
  metrics = {name: _metrics(workdir) for name, workdir in runs.items()}
  summaries = {name: json.loads((w / 'summary.json').read_text()) for name, w in runs.items()}
  assert summaries['on1']['environment']['xla_gpu_deterministic_ops']
  assert not summaries['off1']['environment']['xla_gpu_deterministic_ops']
  assert len(metrics['on1']) == STEPS // 10
  assert metrics['on1'] == metrics['on2']  # bit for bit, every logged step
  spread = {key: _spread(metrics['off1'], metrics['off2'], key)
            for key in ('train_loss', 'grad_norm')}
  spread['eval_loss'] = abs(summaries['off1']['eval_loss'] - summaries['off2']['eval_loss'])
  shift = abs(summaries['on1']['eval_loss'] - summaries['off1']['eval_loss'])
  print(f'\nswitch off, two runs, largest difference: {spread}; eval loss on - off: {shift:.2e}; '
        f"eval loss on: {summaries['on1']['eval_loss']:.6f}")
  assert shift < 0.02  # the deterministic ops compute the same model, only in a fixed order
