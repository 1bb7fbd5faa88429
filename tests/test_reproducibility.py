"""config.deterministic: XLA's flags set before JAX starts, refused once it runs on a GPU in the
other mode, recorded in every run; cuDNN attention avoided under deterministic ops. (Bitwise
repeatability itself needs a GPU: tests/test_determinism_gpu.py.)"""
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from moe_jax import reproducibility
from moe_jax.models import transformer

FLAG = reproducibility.DETERMINISTIC_FLAG


def test_configure_sets_the_flag_before_jax_starts():
  code = ('from moe_jax import reproducibility as r; import os; r.configure(True); '
          'f1 = os.environ["XLA_FLAGS"]; r.configure(False); '
          'print(f1, "|", os.environ["XLA_FLAGS"]); import jax; print(jax.devices()[0].platform)')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  on, off = out.splitlines()[0].split(' | ')
  assert on.split() == ['--xla_force_host_platform_device_count=2', FLAG]
  assert off.split() == ['--xla_force_host_platform_device_count=2']  # other flags kept


def test_after_jax_started_off_gpu_it_is_a_no_op(monkeypatch):
  jax.devices()  # backends started (CPU)
  monkeypatch.setenv('XLA_FLAGS', '')
  reproducibility.configure(True)  # CPU runs are deterministic anyway
  assert os.environ['XLA_FLAGS'] == ''


def test_after_jax_started_on_gpu_a_mismatch_is_an_error(monkeypatch):
  jax.devices()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setenv('XLA_FLAGS', '')
  with pytest.raises(ValueError, match=r'config.deterministic=True cannot take effect.*'
                                       r'new process'):
    reproducibility.configure(True)


def test_configure_from_checks_the_field():
  with pytest.raises(ValueError, match=r"config.deterministic='yes' is invalid"):
    reproducibility.configure_from(ml_collections.ConfigDict({'deterministic': 'yes'}))
  reproducibility.configure_from(ml_collections.ConfigDict({}))  # absent: False, fine on CPU


def test_environment_names_versions_and_devices():
  env = reproducibility.environment()
  assert env['jax'] == jax.__version__ and env['backend'] == 'cpu'
  assert env['device_count'] == jax.device_count() and env['device_kind']
  assert set(env) >= {'jaxlib', 'process_count', 'xla_gpu_deterministic_ops'}


def test_auto_attention_avoids_cudnn_under_deterministic_ops(monkeypatch):
  import jax.numpy as jnp
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setenv('XLA_FLAGS', '')
  assert transformer.attention_implementation('auto', jnp.bfloat16, 64) == 'cudnn'
  monkeypatch.setenv('XLA_FLAGS', FLAG)
  assert transformer.attention_implementation('auto', jnp.bfloat16, 64) == 'xla'
  assert transformer.attention_implementation('cudnn', jnp.bfloat16, 64) == 'cudnn'  # as asked
