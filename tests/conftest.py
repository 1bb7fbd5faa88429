"""Fixtures shared by the test files."""
import pytest

from moe_jax.data import images as image_data, text


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data_dir with tiny_shakespeare prepared once (nothing written to the home dir)."""
  path = tmp_path_factory.mktemp('tfds')
  text.load_text_splits('tiny_shakespeare', data_dir=path)
  return str(path)


@pytest.fixture(scope='session')
def image_data_dir(tmp_path_factory):
  """A TFDS data_dir with the 8x8 digits prepared once."""
  path = tmp_path_factory.mktemp('tfds_images')
  image_data.load_image_splits('digits', data_dir=path)
  return str(path)
