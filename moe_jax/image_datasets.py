"""Image classification data through TFDS, offline and without TensorFlow.

`Digits8x8` is a TFDS builder of the project's own for the 1,797 real 8x8 handwritten digits that
scikit-learn ships inside its package (`sklearn/datasets/data/digits.csv.gz`: the UCI "optdigits"
test set, 16 grey levels, 10 classes). It reads that file (scikit-learn is never imported), splits
it once with a fixed permutation into train (1,437) and test (360), and is prepared as
`array_record` and read back with `as_data_source()`, like `moe_jax.datasets` does for text.

`load_image_splits(name)` returns {split: (images [N, H, W, C] float32 in [0, 1], labels [N]
int32)}; `train_batch` draws a batch as a function of (seed, step) only, so training resumes
exactly.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

DATA_DIR_ENV = 'MOE_JAX_DATA_DIR'


def _sklearn_data_dir() -> pathlib.Path | None:
  """sklearn/datasets/data/ of an installed scikit-learn (found without importing it)."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'datasets' / 'data'


class Digits8x8(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as a TFDS data set with train/test splits."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_FILE = 'digits.csv.gz'
  IMAGE_SHAPE = (8, 8, 1)
  NUM_CLASSES = 10
  MAX_VALUE = 16  # grey levels are 0..16
  NUM_TEST = 360
  SPLIT_SEED = 0
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'pip install scikit-learn (it ships {MANUAL_FILE}), or put {MANUAL_FILE} (64 pixel columns '
      'and a label column per row) in the manual dir.')

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
    table = read_digits_csv(pathlib.Path(dl_manager.manual_dir) / self.MANUAL_FILE)
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


# Image data set names served by a local builder, and the builder for each.
IMAGE_BUILDERS = {'digits': Digits8x8}


def builder_class(name: str):
  """The builder of image data set `name`; a ValueError naming `config.data.name` otherwise."""
  if name not in IMAGE_BUILDERS:
    raise ValueError(f'config.data.name={name!r} is not an image data set available offline; '
                     f'choose one of {sorted(IMAGE_BUILDERS)}.')
  return IMAGE_BUILDERS[name]


def find_manual_dir(name: str, manual_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder holding `name`'s file: `manual_dir` (or its `<name>/`), else
  `$MOE_JAX_DATA_DIR/<name>/`, else the installed scikit-learn's data folder.

  Raises FileNotFoundError naming the places looked in and the fix.
  """
  builder = builder_class(name)
  if manual_dir is not None:
    candidates = [pathlib.Path(manual_dir), pathlib.Path(manual_dir) / name]
  elif os.environ.get(DATA_DIR_ENV):
    candidates = [pathlib.Path(os.environ[DATA_DIR_ENV]) / name]
  else:
    candidates = [folder for folder in [_sklearn_data_dir()] if folder is not None]
  for folder in candidates:
    if (folder / builder.MANUAL_FILE).is_file():
      return folder.resolve()
  raise FileNotFoundError(
      f'Image data set {name!r} not found: no {builder.MANUAL_FILE} in any of\n'
      + ''.join(f'  {folder}\n' for folder in candidates)
      + ('  (scikit-learn is not installed)\n' if not candidates else '')
      + f'Fix: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS} Pass the dir as --config.data.manual_dir=DIR '
      f'or set {DATA_DIR_ENV}=DIR (with DIR/{name}/{builder.MANUAL_FILE}).')


def load_image_splits(
    name: str = 'digits',
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (images [N, H, W, C] float32 in [0, 1], labels [N] int32)}, in the prepared (fixed) order.

  The data set is prepared into `data_dir` (TFDS default if None) as array_record once, from
  `find_manual_dir(name, manual_dir)`; later calls reuse the prepared files.
  """
  cls = builder_class(name)
  builder = cls(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(manual_dir=str(find_manual_dir(name, manual_dir)))
    builder.download_and_prepare(download_config=config)
  splits = {}
  for split, source in builder.as_data_source().items():
    examples = [source[i] for i in range(len(source))]
    images = np.stack([ex['image'] for ex in examples]).astype(np.float32) / cls.MAX_VALUE
    splits[split] = (images, np.asarray([ex['label'] for ex in examples], np.int32))
  return splits


def image_info(name: str) -> tuple[tuple[int, int, int], int]:
  """(image shape (H, W, C), number of classes) of data set `name`, without preparing it."""
  cls = builder_class(name)
  return tuple(cls.IMAGE_SHAPE), cls.NUM_CLASSES


def train_batch(images: np.ndarray, labels: np.ndarray, step: int, batch_size: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(images [batch_size, H, W, C], labels [batch_size]) drawn with replacement, a function of
  (seed, step) only."""
  index = np.random.default_rng([seed, step]).integers(0, len(labels), batch_size)
  return images[index], labels[index]
