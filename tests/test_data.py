"""Data pipeline tests on the real Tiny Shakespeare file, offline and without TensorFlow."""

import hashlib
import importlib.util
import logging
import pathlib
import re
import shutil
import socket
import sys

import numpy as np
import pytest

from moe_jax.data import text
from moe_jax.data.text_builders import TinyShakespeareManual

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
INPUT_TXT = SHARED_DATA / 'tiny_shakespeare' / 'input.txt'
TEXT = INPUT_TXT.read_bytes().decode('utf-8')


def _no_network(*args, **kwargs):
  raise AssertionError('network access attempted')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(data_dir, splits): tiny_shakespeare prepared into a fresh data_dir, network blocked."""
  data_dir = tmp_path_factory.mktemp('tfds')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'getaddrinfo', _no_network)
    mp.delenv(text.DATA_DIR_ENV, raising=False)
    splits = text.load_text_splits('tiny_shakespeare', data_dir=data_dir)
  return data_dir, splits


def test_splits_follow_stock_rule(prepared):
  data_dir, splits = prepared
  assert set(splits) == {'train', 'validation', 'test'}
  i = int(len(TEXT) * 0.9)
  j = i + int((len(TEXT) - i) * 0.5)
  assert (len(splits['train']), len(splits['validation']), len(splits['test'])) == (
      i, j - i, len(TEXT) - j)
  assert (i, j, len(TEXT)) == (1003854, 1059624, 1115394)
  assert splits['train'] + splits['validation'] + splits['test'] == TEXT


def test_prepared_as_array_record_without_tensorflow(prepared):
  if importlib.util.find_spec('tensorflow'):
    pytest.skip('TensorFlow is installed here, so its absence cannot be checked')
  assert 'tensorflow' not in sys.modules
  files = prepared[0].glob('tiny_shakespeare_manual/1.1.0/*.array_record*')
  assert sorted(p.name for p in files) == [
      f'tiny_shakespeare_manual-{split}.array_record-00000-of-00001'
      for split in ('test', 'train', 'validation')]


def test_second_load_reuses_prepared_files(prepared, monkeypatch, tmp_path):
  data_dir, splits = prepared
  files = {p: p.stat().st_mtime_ns for p in data_dir.rglob('*') if p.is_file()}

  def fail(*args, **kwargs):
    raise AssertionError('data set prepared again')

  monkeypatch.setattr(TinyShakespeareManual, '_split_generators', fail)
  # The source file is not even needed once prepared.
  assert text.load_text_splits(data_dir=data_dir, manual_dir=tmp_path) == splits
  assert {p: p.stat().st_mtime_ns for p in data_dir.rglob('*') if p.is_file()} == files


def test_find_manual_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(text.DATA_DIR_ENV, raising=False)
  assert text.find_manual_dir('tiny_shakespeare') == INPUT_TXT.parent.resolve()
  (tmp_path / 'tiny_shakespeare').mkdir()
  shutil.copy(INPUT_TXT, tmp_path / 'tiny_shakespeare')
  monkeypatch.setenv(text.DATA_DIR_ENV, str(tmp_path))
  assert text.find_manual_dir('tiny_shakespeare') == tmp_path / 'tiny_shakespeare'
  # An explicit manual dir wins; it may hold the file or a <name>/ folder with it.
  assert text.find_manual_dir('tiny_shakespeare', SHARED_DATA) == INPUT_TXT.parent.resolve()
  assert text.find_manual_dir('tiny_shakespeare', INPUT_TXT.parent) == INPUT_TXT.parent.resolve()


@pytest.mark.parametrize('via', ['argument', 'env'])
def test_missing_data_set_names_it_and_the_fix(via, monkeypatch, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  monkeypatch.setenv(text.DATA_DIR_ENV, str(empty))
  manual_dir = empty if via == 'argument' else None
  with pytest.raises(FileNotFoundError) as info:
    text.load_text_splits(data_dir=tmp_path / 'tfds', manual_dir=manual_dir)
  message = str(info.value)
  for part in ['tiny_shakespeare', str(empty), '--config.data.manual_dir', text.DATA_DIR_ENV]:
    assert part in message


def test_encode_decode_round_trip():
  ids = text.encode(TEXT)
  assert ids.dtype == np.uint8 and ids.shape == (len(TEXT.encode('utf-8')),)
  assert text.VOCAB_SIZE == 256
  assert text.decode(ids) == TEXT
  assert text.decode(text.encode('Roméo — ')) == 'Roméo — '
  with pytest.raises(ValueError):
    text.decode([256])


def _min_row_gap(starts: np.ndarray) -> int:
  """Smallest distance in the text between the starts of two rows of one batch."""
  gaps = np.abs(starts[..., :, None] - starts[..., None, :])
  return int(gaps[..., ~np.eye(starts.shape[-1], dtype=bool)].min())


def test_train_batch(prepared):
  train = prepared[1]['train']
  tokens = text.encode(train)
  batch = text.train_batch(tokens, step=7, batch_size=4, seq_len=32, seed=0)
  assert batch.shape == (4, 33) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, text.train_batch(tokens, 7, 4, 32, seed=0))
  assert not np.array_equal(batch, text.train_batch(tokens, 8, 4, 32, seed=0))
  assert not np.array_equal(batch, text.train_batch(tokens, 7, 4, 32, seed=1))
  for row in batch:
    # Each row is a contiguous slice of the split, so targets row[1:] follow inputs row[:-1].
    assert text.decode(row) in train


def test_rows_of_a_training_batch_are_never_neighbouring_text(prepared):
  """Routing that couples a batch's rows must not see a row's own continuation in another row."""
  tokens = text.encode(prepared[1]['train'])
  starts = np.stack([text.train_window_starts(len(tokens), step, 8, 128, seed=3)
                     for step in range(200)])
  assert _min_row_gap(starts) >= text.MIN_ROW_GAP_WINDOWS * 128
  assert starts.min() >= 0 and starts.max() <= len(tokens) - 129
  assert len(np.unique(starts[:, 0])) > 190  # still random windows, step by step
  with pytest.raises(ValueError, match='config.data.batch_size'):
    text.train_batch(tokens[:4000], 0, batch_size=8, seq_len=128, seed=0)


def test_eval_batches(prepared):
  tokens = text.encode(prepared[1]['validation'])
  batches = text.eval_batches(tokens, batch_size=3, seq_len=16, num_batches=2)
  assert batches.shape == (2, 3, 17) and batches.dtype == np.int32
  np.testing.assert_array_equal(batches, text.eval_batches(tokens, 3, 16, 2))
  starts = text.eval_window_starts(len(tokens), 3, 16, 2)
  for batch, row_starts in zip(batches, starts):
    for row, start in zip(batch, row_starts):
      np.testing.assert_array_equal(row, tokens[start:start + 17])  # a contiguous window
  # Whole windows: no two windows share an input or a target, so each target is scored once.
  assert np.all(starts % 16 == 0) and len(np.unique(starts)) == starts.size
  with pytest.raises(ValueError, match='config.train.eval_batches'):
    text.eval_batches(tokens[:150], 3, 16, 2)


def test_rows_of_an_eval_batch_are_never_each_others_continuation(prepared):
  """Before: row j + 1 of a batch was row j's continuation, which group_by='position' saw."""
  tokens = text.encode(prepared[1]['validation'])
  starts = text.eval_window_starts(len(tokens), batch_size=8, seq_len=128, num_batches=8)
  assert _min_row_gap(starts) >= text.MIN_ROW_GAP_WINDOWS * 128
  # ... and each batch's rows are as far apart as the held-out text allows.
  assert _min_row_gap(starts) == (len(tokens) - 1) // 128 // 8 * 128


def test_shipped_copy_is_the_last_fallback(monkeypatch, tmp_path):
  """With no manual dir, no $MOE_JAX_DATA_DIR and no ../shared, the package's own copy is used."""
  monkeypatch.delenv(text.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(text, '_REPO_ROOT', tmp_path / 'clone')
  monkeypatch.chdir(tmp_path)
  found = text.find_manual_dir('tiny_shakespeare')
  assert found == text.SHIPPED_DATA / 'tiny_shakespeare'
  listed = re.search(r'tiny_shakespeare/input.txt \|[^|]*\| ([0-9a-f]{64}) \|',
                     (SHARED_DATA / 'README.md').read_text()).group(1)
  assert hashlib.sha256((found / 'input.txt').read_bytes()).hexdigest() == listed


def test_preparing_a_local_builder_is_quiet(tmp_path, capfd, caplog):
  """No "Downloading and preparing" line, no progress-bar debris off a terminal, no absl warning."""
  text.load_text_splits('tiny_shakespeare', data_dir=tmp_path)
  out, err = capfd.readouterr()
  assert out == '' and '\x1b[' not in err and '\r' not in err, (out, err)
  assert not [r for r in caplog.records if r.name == 'absl' and r.levelno >= logging.WARNING]
