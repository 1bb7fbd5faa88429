"""Image classification data through TFDS, offline and without TensorFlow.

Two TFDS builders of the project's own (`IMAGE_BUILDERS`), each prepared as `array_record` from
local files and read back with `as_data_source()`, like `moe_jax.data.text_builders` does for text:

- `digits` (`Digits8x8`): the 1,797 real 8x8 handwritten digits that scikit-learn ships inside its
  package (`sklearn/datasets/data/digits.csv.gz`: the UCI "optdigits" test set, 16 grey levels,
  10 classes). It reads that file (scikit-learn is never imported), splits it once with a fixed
  permutation into train (1,437) and test (360).
- `fashion_mnist` (`FashionMnistManual`): Fashion-MNIST's four stock IDX gz files (the ones TFDS
  downloads; `read_idx`/`parse_idx` read the IDX format), 28x28 grey images of 10 kinds of
  clothing, train (60,000) and test (10,000) as in the files, with the stock class names.

`find_manual_dir(name)` looks for the files in `manual_dir`, else `$MOE_JAX_DATA_DIR/<name>/`, else
`../shared/data/<name>/` (then, for digits, scikit-learn's copy); when none of the default places
holds them, fashion_mnist falls back to stock TFDS, which needs the network.
`load_image_splits(name)` returns {split: (images [N, h, w, c] float32 in [0, 1], labels [N]
int32)}; `train_batch` draws a batch as a function of (seed, step) only, so training resumes
exactly.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import math
import os
import pathlib
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data import text

DATA_DIR_ENV = text.DATA_DIR_ENV
log = logging.getLogger(__name__)


def _sklearn_data_dir() -> pathlib.Path | None:
  """sklearn/datasets/data/ of an installed scikit-learn (found without importing it)."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'datasets' / 'data'


class Digits8x8(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as a TFDS data set with train/test splits."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_FILES = ('digits.csv.gz',)
  IMAGE_SHAPE = (8, 8, 1)
  NUM_CLASSES = 10
  MAX_VALUE = 16  # grey levels are 0..16
  NUM_TEST = 360
  SPLIT_SEED = 0
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'pip install scikit-learn (it ships {MANUAL_FILES[0]}), or put {MANUAL_FILES[0]} (64 pixel '
      'columns and a label column per row) in the manual dir.')

  @staticmethod
  def fallback_dir() -> pathlib.Path | None:
    """scikit-learn's data folder, looked in after the default places (None without it)."""
    return _sklearn_data_dir()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='UCI optdigits test set as shipped by scikit-learn: 1,797 8x8 images of '
                    'handwritten digits, grey levels 0..16.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    table = read_digits_csv(pathlib.Path(dl_manager.manual_dir) / self.MANUAL_FILES[0])
    images = table[:, :-1].reshape(-1, *self.IMAGE_SHAPE).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    order = np.random.default_rng(self.SPLIT_SEED).permutation(len(labels))
    test, train = order[:self.NUM_TEST], order[self.NUM_TEST:]
    return {'train': self._generate_examples(images, labels, np.sort(train)),
            'test': self._generate_examples(images, labels, np.sort(test))}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}


def read_digits_csv(path: pathlib.Path) -> np.ndarray:
  """[N, 65] int array of `digits.csv.gz`: 64 pixel values then the label, per row."""
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != 65:
    raise ValueError(f'{path} holds a {table.shape} table; expected 65 columns (8x8 pixels and a '
                     'label), as scikit-learn ships it.')
  return table


# IDX type codes (third byte of the magic number) and the big-endian dtypes they stand for.
IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def parse_idx(raw: bytes, source: str = '<bytes>') -> np.ndarray:
  """The array held by IDX bytes `raw` (the MNIST file format), in native byte order.

  Layout: magic number 00 00 <type code> <ndim>, then ndim big-endian uint32 dimension sizes,
  then the values, big-endian, row-major. Raises ValueError naming `source` when the magic number,
  type code or data length is wrong.
  """
  if len(raw) < 4 or raw[:2] != b'\0\0':
    raise ValueError(f'{source} is not an IDX file: it starts with {raw[:4].hex(" ")}, not the '
                     'magic number 00 00 <type> <ndim>.')
  code, ndim = raw[2], raw[3]
  if code not in IDX_DTYPES:
    raise ValueError(f'{source}: unknown IDX type code 0x{code:02x} in the magic number; expected '
                     f'one of {", ".join(f"0x{c:02x}" for c in IDX_DTYPES)}.')
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f'{source}: IDX header of {ndim} dimensions needs {header} bytes, the file '
                     f'has {len(raw)}.')
  dims = struct.unpack(f'>{ndim}I', raw[4:header])
  dtype = np.dtype(IDX_DTYPES[code])
  size = math.prod(dims) * dtype.itemsize
  if len(raw) - header != size:
    raise ValueError(f'{source}: the IDX header says {"x".join(map(str, dims))} values of {dtype} '
                     f'({size} bytes), but {len(raw) - header} bytes follow it.')
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder('='))


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The array in IDX file `path`, gzip'd (as distributed, `*-ubyte.gz`) or not; see `parse_idx`."""
  path = pathlib.Path(path)
  raw = path.read_bytes()
  if raw[:2] == b'\x1f\x8b':  # gzip magic
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f'{path}: broken gzip file ({e}).') from e
  return parse_idx(raw, str(path))


class FashionMnistManual(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from the four stock IDX gz files in a manual dir; features as stock TFDS.

  Splits as in the files: train (60,000 from `train-*`) and test (10,000 from `t10k-*`), each in
  file order (shuffling disabled, key = index in the file). Preparing the full data set takes about
  10 s on this project's 2-core CPU machine (TFDS serializes 70,000 examples into 45 MB of
  array_record); `load_image_splits` reads it back in 4-5 s (0.7 GB peak memory).
  """

  VERSION = tfds.core.Version('1.0.0')
  SPLIT_FILES = {
      'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
      'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
  }
  MANUAL_FILES = tuple(f for files in SPLIT_FILES.values() for f in files)
  IMAGE_SHAPE = (28, 28, 1)
  CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                 'Sneaker', 'Bag', 'Ankle boot')
  NUM_CLASSES = len(CLASS_NAMES)
  MAX_VALUE = 255
  STOCK_NAME = 'fashion_mnist'  # stock TFDS name, tried (with the network) when no files are found
  URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Put the four IDX gz files ({", ".join(MANUAL_FILES)}) of Fashion-MNIST, as stock TFDS '
      f'downloads them from {URL}, in the manual dir; offline copies lie in '
      '../shared/data/fashion_mnist/ beside the repo.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Zalando Research): 28x28 grey images of 10 kinds of clothing, '
                    '60,000 train and 10,000 test, grey levels 0..255.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=self.CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    folder = pathlib.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(folder, split) for split in self.SPLIT_FILES}

  def _generate_examples(self, folder, split):
    images, labels = read_fashion_mnist(folder, split)
    for i in range(len(labels)):
      yield i, {'image': images[i], 'label': int(labels[i])}


def read_fashion_mnist(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, 28, 28, 1] uint8, labels [N] int64) of `split` ('train' or 'test') read from the
  IDX gz files in `folder`; a ValueError naming the file if they are not Fashion-MNIST shaped."""
  image_file, label_file = (pathlib.Path(folder) / f
                            for f in FashionMnistManual.SPLIT_FILES[split])
  images, labels = read_idx(image_file), read_idx(label_file)
  height, width, _ = FashionMnistManual.IMAGE_SHAPE
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (height, width):
    raise ValueError(f'{image_file} holds {images.dtype} {images.shape}; expected uint8 '
                     f'[N, {height}, {width}] images.')
  if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise ValueError(f'{label_file} holds {labels.dtype} {labels.shape}; expected uint8 '
                     f'[{len(images)}] labels, one per image of {image_file.name}.')
  if labels.size and labels.max() >= FashionMnistManual.NUM_CLASSES:
    raise ValueError(f'{label_file} holds label {labels.max()}; expected labels 0..'
                     f'{FashionMnistManual.NUM_CLASSES - 1}.')
  return images[..., None], labels.astype(np.int64)


# Image data set names served by a local builder, and the builder for each.
IMAGE_BUILDERS = {'digits': Digits8x8, 'fashion_mnist': FashionMnistManual}

# Stock TFDS image data sets that paper configs name (configs/papers/), too large for this
# module's in-memory loading: (image shape the model sees after the standard resize and crop,
# classes). Their configs validate and `moe-jax plan` sizes them; training them needs a streaming
# input pipeline, which the project does not have yet.
STOCK_IMAGES = {'imagenet2012': ((224, 224, 3), 1000)}


def builder_class(name: str):
  """The builder of image data set `name`; a ValueError naming `config.data.name` otherwise."""
  if name in STOCK_IMAGES:
    raise ValueError(f'config.data.name={name!r} is too large for the in-memory image loader: '
                     '`moe-jax plan` sizes its runs, but training on it needs a streaming input '
                     f'pipeline, not in the project yet. Offline sets: {sorted(IMAGE_BUILDERS)}.')
  if name not in IMAGE_BUILDERS:
    raise ValueError(f'config.data.name={name!r} is not an image data set available offline; '
                     f'choose one of {sorted(IMAGE_BUILDERS)}.')
  return IMAGE_BUILDERS[name]


def find_manual_dir(name: str, manual_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder holding all of `name`'s `MANUAL_FILES`.

  Looks in `moe_jax.data.text.candidate_dirs(name, manual_dir)`, as for text: only the first of these
  that is given counts: `manual_dir` (or its `<name>/`); else `$MOE_JAX_DATA_DIR/<name>/`; else
  `../shared/data/<name>/` relative to the repo root and to the current directory, and then, for
  digits, the installed scikit-learn's data folder. Raises FileNotFoundError naming the places
  looked in, what each lacks, and the fix.
  """
  builder = builder_class(name)
  candidates = text.candidate_dirs(name, manual_dir)
  default_places = manual_dir is None and not os.environ.get(DATA_DIR_ENV)
  fallback = getattr(builder, 'fallback_dir', None)
  no_sklearn = False
  if default_places and fallback is not None:
    folder = fallback()
    no_sklearn = folder is None
    candidates += [folder] if folder is not None else []
  for folder in candidates:
    if not text.missing_files(folder, builder.MANUAL_FILES):
      return pathlib.Path(folder).resolve()
  raise FileNotFoundError(
      f'Image data set {name!r} not found: no {", ".join(builder.MANUAL_FILES)} in any of\n'
      + text.describe_candidates(candidates, builder.MANUAL_FILES)
      + ('  (scikit-learn is not installed)\n' if no_sklearn else '')
      + f'Fix: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS} Pass the dir as --config.data.manual_dir=DIR '
      f'or set {DATA_DIR_ENV}=DIR (with the files in DIR/{name}/).')


def load_image_splits(
    name: str = 'digits',
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (images [N, h, w, c] float32 in [0, 1], labels [N] int32)}, in the prepared (fixed) order.

  The data set is prepared into `data_dir` (TFDS default if None) as array_record once, from
  `find_manual_dir(name, manual_dir)`; later calls reuse the prepared files. When the files are
  in none of the default places (no `manual_dir` and no `$MOE_JAX_DATA_DIR` given) and the builder
  has a `STOCK_NAME` (fashion_mnist), stock `tfds.data_source(STOCK_NAME)` is tried instead, with
  a warning: it needs the network (offline it fails only after TFDS's download retries: 205 s on
  this project's CPU machine), and its failure is raised as FileNotFoundError naming the places
  looked in and the fix.
  """
  cls = builder_class(name)
  builder = cls(data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    sources = builder.as_data_source()
  else:
    try:
      folder = find_manual_dir(name, manual_dir)
    except FileNotFoundError as missing:
      stock = getattr(cls, 'STOCK_NAME', None)
      if stock is None or manual_dir is not None or os.environ.get(DATA_DIR_ENV):
        raise
      sources = _stock_sources(stock, data_dir, missing)
    else:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))
      sources = builder.as_data_source()
  splits = {}
  for split, source in sources.items():
    examples = source.__getitems__(list(range(len(source))))
    images = np.stack([ex['image'] for ex in examples]).astype(np.float32) / cls.MAX_VALUE
    splits[split] = (images, np.asarray([ex['label'] for ex in examples], np.int32))
  return splits


def _stock_sources(stock: str, data_dir, missing: FileNotFoundError):
  """Stock TFDS data sources of `stock`; a FileNotFoundError extending `missing` if that fails."""
  log.warning('%s\nTrying stock TFDS %r instead: it needs the network (offline it fails after '
              'its download retries, minutes).', missing, stock)
  try:
    return tfds.data_source(stock, data_dir=data_dir,
                            builder_kwargs={'file_format': 'array_record'})
  except Exception as e:  # pylint: disable=broad-exception-caught
    reason = (str(e).strip().splitlines() or [''])[0][:200]
    raise FileNotFoundError(
        f'{missing}\nStock TFDS {stock!r} was tried too and failed (it needs the network): '
        f'{type(e).__name__}: {reason}') from e


def image_info(name: str) -> tuple[tuple[int, int, int], int]:
  """(image shape (h, w, c), number of classes) of data set `name`, without preparing it."""
  if name in STOCK_IMAGES:
    return STOCK_IMAGES[name]
  cls = builder_class(name)
  return tuple(cls.IMAGE_SHAPE), cls.NUM_CLASSES


def train_batch(images: np.ndarray, labels: np.ndarray, step: int, batch_size: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(images [B, h, w, c], labels [B]) drawn with replacement, a function of
  (seed, step) only."""
  index = np.random.default_rng([seed, step]).integers(0, len(labels), batch_size)
  return images[index], labels[index]
