"""Fashion-MNIST offline: the IDX parser and the TFDS builder on the real IDX files (cut short).

The builder is prepared from the first 300 train and 200 test images and labels of the real files,
written back as IDX gz with the header counts rewritten (by hand here, not by the parser).
"""
import gzip
import os
import pathlib
import re
import socket
import struct

import numpy as np
import pytest

from moe_jax.data import images as image_data, text
from moe_jax.data.images import FashionMnistManual

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
FASHION = SHARED_DATA / 'fashion_mnist'
if not SHARED_DATA.is_dir():
  pytest.skip(f'offline data {SHARED_DATA} is absent (CI has it as ../shared beside the clone)',
              allow_module_level=True)

COUNTS = {'train': 300, 'test': 200}


def _no_network(*args, **kwargs):
  raise AssertionError('network access attempted')


def _head(name: str, count: int) -> bytes:
  """The real IDX file `name` cut to its first `count` items, header count rewritten."""
  header_size = 16 if 'images' in name else 8
  with gzip.open(FASHION / name) as f:
    header = f.read(header_size)
    magic, total = struct.unpack('>II', header[:8])
    item = 28 * 28 if 'images' in name else 1
    assert magic == (0x0803 if 'images' in name else 0x0801) and total in (60000, 10000)
    body = f.read(count * item)
  return header[:4] + struct.pack('>I', count) + header[8:] + body


@pytest.fixture(scope='module')
def manual_dir(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp('manual') / 'fashion_mnist'
  folder.mkdir()
  for split, files in FashionMnistManual.SPLIT_FILES.items():
    for name in files:
      (folder / name).write_bytes(gzip.compress(_head(name, COUNTS[split]), compresslevel=1))
  return folder


@pytest.fixture(scope='module')
def prepared(manual_dir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'getaddrinfo', _no_network)
    mp.delenv(text.DATA_DIR_ENV, raising=False)
    splits = image_data.load_image_splits('fashion_mnist', data_dir=data_dir,
                                              manual_dir=manual_dir)
  return data_dir, splits


def test_parse_idx_header_and_big_endian_values():
  values = np.array([[1, -2, 300], [-40000 // 2, 5, 32767]], np.int16)
  raw = bytes([0, 0, 0x0B, 2]) + struct.pack('>II', 2, 3) + values.astype('>i2').tobytes()
  parsed = image_data.parse_idx(raw)
  np.testing.assert_array_equal(parsed, values)
  assert parsed.dtype == np.int16 and parsed.dtype.isnative
  floats = bytes([0, 0, 0x0D, 1]) + struct.pack('>I', 2) + struct.pack('>ff', 0.5, -3.0)
  np.testing.assert_array_equal(image_data.parse_idx(floats), [0.5, -3.0])


def test_read_idx_on_the_real_test_files():
  labels = image_data.read_idx(FASHION / 't10k-labels-idx1-ubyte.gz')
  assert labels.shape == (10000,) and labels.dtype == np.uint8
  assert np.bincount(labels).tolist() == [1000] * 10
  images = image_data.read_idx(FASHION / 't10k-images-idx3-ubyte.gz')
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  raw = gzip.open(FASHION / 't10k-images-idx3-ubyte.gz').read()
  np.testing.assert_array_equal(images[123].ravel(),
                                np.frombuffer(raw, np.uint8, 784, offset=16 + 123 * 784))
  # Not gzip'd works too.
  head = _head('t10k-labels-idx1-ubyte.gz', 50)
  np.testing.assert_array_equal(image_data.parse_idx(head), labels[:50])


@pytest.mark.parametrize('corrupt, message', [
    (lambda raw: b'\x08\x00' + raw[2:], r'is not an IDX file: it starts with 08 00 08 01'),
    (lambda raw: raw[:2] + b'\x07' + raw[3:], r'unknown IDX type code 0x07'),
    (lambda raw: raw[:-1], r'header says 50 values of uint8 \(50 bytes\), but 49 bytes follow'),
    (lambda raw: raw + b'\x00', r'but 51 bytes follow'),
    (lambda raw: raw[:2] + b'\x08\x05' + raw[4:10], r'header of 5 dimensions needs 24 bytes'),
])
def test_bad_idx_file_is_a_clear_error_naming_it(corrupt, message, tmp_path):
  path = tmp_path / 'labels-idx1-ubyte.gz'
  path.write_bytes(gzip.compress(corrupt(_head('t10k-labels-idx1-ubyte.gz', 50))))
  with pytest.raises(ValueError, match=f'{re.escape(str(path))}.*{message}'):
    image_data.read_idx(path)


def test_broken_gzip_and_mismatched_files_are_clear_errors(manual_dir, tmp_path):
  broken = tmp_path / 'broken.gz'
  broken.write_bytes((manual_dir / 't10k-labels-idx1-ubyte.gz').read_bytes()[:40])
  with pytest.raises(ValueError, match=f'{re.escape(str(broken))}: broken gzip file'):
    image_data.read_idx(broken)
  # Labels for 200 images beside images of 300: the label file is named.
  for name in FashionMnistManual.SPLIT_FILES['test']:
    (tmp_path / name).write_bytes((manual_dir / name).read_bytes())
  (tmp_path / 't10k-images-idx3-ubyte.gz').write_bytes(
      (manual_dir / 'train-images-idx3-ubyte.gz').read_bytes())
  with pytest.raises(ValueError, match=r't10k-labels-idx1-ubyte\.gz holds uint8 \(200,\); '
                                       r'expected uint8 \[300\] labels'):
    image_data.read_fashion_mnist(tmp_path, 'test')
  # A labels file where images belong.
  (tmp_path / 't10k-images-idx3-ubyte.gz').write_bytes(
      (manual_dir / 't10k-labels-idx1-ubyte.gz').read_bytes())
  with pytest.raises(ValueError, match=r't10k-images-idx3-ubyte\.gz holds uint8 \(200,\); '
                                       r'expected uint8 \[N, 28, 28\] images'):
    image_data.read_fashion_mnist(tmp_path, 'test')


def test_prepared_splits_are_the_idx_images_and_labels(manual_dir, prepared):
  _, splits = prepared
  assert set(splits) == {'train', 'test'}
  for split, (images, labels) in splits.items():
    real_images, real_labels = image_data.read_fashion_mnist(manual_dir, split)
    assert images.shape == (COUNTS[split], 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (COUNTS[split],) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0  # MAX_VALUE 255 scales to [0, 1]
    # Same images and labels, in file order.
    np.testing.assert_array_equal(np.round(images * 255).astype(np.uint8), real_images)
    np.testing.assert_array_equal(labels, real_labels)
  # The first train labels of Fashion-MNIST: ankle boot, T-shirt/top, T-shirt/top, dress.
  assert splits['train'][1][:4].tolist() == [9, 0, 0, 3]


def test_features_and_class_names(prepared):
  data_dir, _ = prepared
  info = FashionMnistManual(data_dir=data_dir, file_format='array_record').info
  assert info.features['label'].names == [
      'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
      'Ankle boot']
  assert info.features['image'].shape == (28, 28, 1) and info.features['image'].np_dtype == np.uint8
  assert {name: split.num_examples for name, split in info.splits.items()} == COUNTS
  assert image_data.image_info('fashion_mnist') == ((28, 28, 1), 10)
  assert FashionMnistManual.MAX_VALUE == 255


def test_find_manual_dir_order(manual_dir, monkeypatch, tmp_path):
  monkeypatch.delenv(text.DATA_DIR_ENV, raising=False)
  assert image_data.find_manual_dir('fashion_mnist') == FASHION.resolve()
  # Relative to the current directory too, when not beside the repo.
  monkeypatch.setattr(text, '_REPO_ROOT', tmp_path / 'elsewhere')
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])  # the clone, beside ../shared
  assert image_data.find_manual_dir('fashion_mnist') == FASHION.resolve()
  # digits keeps scikit-learn's copy as the last resort.
  assert (image_data.find_manual_dir('digits') / 'digits.csv.gz').is_file()
  monkeypatch.setenv(text.DATA_DIR_ENV, str(manual_dir.parent))
  assert image_data.find_manual_dir('fashion_mnist') == manual_dir.resolve()
  assert image_data.find_manual_dir('fashion_mnist', FASHION) == FASHION.resolve()


def _stock_must_not_run(*args, **kwargs):
  raise AssertionError('stock TFDS tried')


def test_missing_files_are_a_clear_error(manual_dir, monkeypatch, tmp_path):
  monkeypatch.setattr(image_data.tfds, 'data_source', _stock_must_not_run)
  (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(
      (manual_dir / 'train-images-idx3-ubyte.gz').read_bytes())
  with pytest.raises(FileNotFoundError) as info:
    image_data.load_image_splits('fashion_mnist', data_dir=tmp_path / 'tfds',
                                     manual_dir=tmp_path)
  message = str(info.value)
  assert (f'{tmp_path} (lacks train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
          't10k-labels-idx1-ubyte.gz)') in message
  assert f'{tmp_path / "fashion_mnist"} (no such folder)' in message
  for part in ['--config.data.manual_dir=DIR', text.DATA_DIR_ENV, 'shared/data/fashion_mnist']:
    assert part in message


def _found_nowhere(monkeypatch, tmp_path):
  monkeypatch.delenv(text.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(text, '_REPO_ROOT', tmp_path / 'repo')
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')


def test_found_nowhere_tries_stock_tfds_then_names_the_places(monkeypatch, tmp_path, caplog):
  _found_nowhere(monkeypatch, tmp_path)
  calls = []

  def offline(name, **kwargs):
    calls.append(name)
    raise RuntimeError('Failed to resolve fashion-mnist.s3-website.eu-central-1.amazonaws.com\n'
                       'after 5 retries')

  monkeypatch.setattr(image_data.tfds, 'data_source', offline)
  with pytest.raises(FileNotFoundError) as info:
    image_data.load_image_splits('fashion_mnist', data_dir=tmp_path / 'tfds')
  assert calls == ['fashion_mnist']
  assert "Trying stock TFDS 'fashion_mnist' instead: it needs the network" in caplog.text
  message = str(info.value)
  for part in [str(tmp_path / 'shared' / 'data' / 'fashion_mnist'), 'Fix:',
               "Stock TFDS 'fashion_mnist' was tried too and failed (it needs the network): "
               'RuntimeError: Failed to resolve fashion-mnist']:
    assert part in message
  assert 'after 5 retries' not in message  # short: the first line of the cause only


def test_found_nowhere_uses_stock_tfds_when_it_works(prepared, monkeypatch, tmp_path):
  data_dir, splits = prepared
  _found_nowhere(monkeypatch, tmp_path)
  stock = FashionMnistManual(data_dir=data_dir, file_format='array_record').as_data_source()
  monkeypatch.setattr(image_data.tfds, 'data_source', lambda name, **kwargs: stock)
  loaded = image_data.load_image_splits('fashion_mnist', data_dir=tmp_path / 'tfds')
  for split in splits:
    for got, want in zip(loaded[split], splits[split]):
      np.testing.assert_array_equal(got, want)
  assert not os.path.exists(tmp_path / 'tfds' / 'fashion_mnist_manual')
