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


@pytest.fixture(scope='session')
def sp_model(data_dir, tmp_path_factory):
  """A SentencePiece vocabulary of 512 pieces trained on Tiny Shakespeare's training split by
  `moe-jax tokenizer` (a few seconds): the path of its tokenizer.model."""
  out = tmp_path_factory.mktemp('tokenizer')
  assert cli_main(['moe-jax', 'tokenizer', '--data=tiny_shakespeare', '--vocab_size=512',
                   f'--out={out}', f'--data_dir={data_dir}']) == 0
  return str(out / 'tokenizer.model')


def cli_main(argv) -> int:
  """`moe_jax.cli.main(argv)`, leaving the 'moe_jax' logger as it found it (main gives it a
  stderr handler and stops its propagation, which later tests' caplog would miss)."""
  import logging  # pylint: disable=g-import-not-at-top

  from moe_jax import cli  # pylint: disable=g-import-not-at-top

  logger = logging.getLogger('moe_jax')
  saved = list(logger.handlers), logger.level, logger.propagate
  try:
    return cli.main(argv)
  finally:
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
