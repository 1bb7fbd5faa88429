"""Fixtures shared by the test files."""
import pytest

from moe_jax import data


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data_dir with tiny_shakespeare prepared once (nothing written to the home dir)."""
  path = tmp_path_factory.mktemp('tfds')
  data.load_text_splits('tiny_shakespeare', data_dir=path)
  return str(path)
