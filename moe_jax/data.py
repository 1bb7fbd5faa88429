"""Data pipeline: text splits through TFDS (offline, no TensorFlow), bytes as tokens, batches.

`tiny_shakespeare` is prepared by the project's own builder (`moe_jax.datasets`) from a local
`input.txt` into `array_record` files and read back with `as_data_source()`. Any other name goes to
stock TFDS, which needs the network. Tokens are UTF-8 bytes (`VOCAB_SIZE = 256`). Batches are
`[batch_size, seq_len + 1]` int32 windows: inputs `batch[:, :-1]`, targets `batch[:, 1:]`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import sys

import numpy as np

VOCAB_SIZE = 256
DATA_DIR_ENV = 'MOE_JAX_DATA_DIR'
log = logging.getLogger(__name__)
_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED_DATA = pathlib.Path(__file__).resolve().parent / 'shipped_data'  # Tiny Shakespeare's text


def _local_builders() -> dict:
  """The project's own TFDS builders (imported on use: the model and training step need no TFDS)."""
  from moe_jax.datasets import LOCAL_BUILDERS  # pylint: disable=g-import-not-at-top
  return LOCAL_BUILDERS


@contextlib.contextmanager
def quiet_tfds():
  """Silences TFDS while it prepares one of the project's local builders: no 'Downloading and
  preparing dataset' lines (TFDS prints them to stdout), no absl warnings about the data dir it is
  about to fill, and no progress bars when stderr is not a terminal (they would leave ANSI
  debris in logs)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


def find_manual_dir(name: str, manual_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the local folder holding data set `name`'s files (e.g. `tiny_shakespeare/input.txt`).

  Looks only in the first of these that is given: `manual_dir` (the folder itself, or its
  `<name>/` subfolder); `$MOE_JAX_DATA_DIR/<name>/`; `../shared/data/<name>/` relative to the repo
  root and to the current directory, then the copy shipped in the package (`SHIPPED_DATA`, Tiny
  Shakespeare only). Raises FileNotFoundError, naming the places and the fix.
  """
  if manual_dir is not None:
    candidates = [pathlib.Path(manual_dir), pathlib.Path(manual_dir) / name]
  elif os.environ.get(DATA_DIR_ENV):
    candidates = [pathlib.Path(os.environ[DATA_DIR_ENV]) / name]
  else:
    roots = [_REPO_ROOT / '..' / 'shared' / 'data', pathlib.Path.cwd() / '..' / 'shared' / 'data',
             SHIPPED_DATA]
    candidates = list(dict.fromkeys((root / name).resolve() for root in roots))
  for folder in candidates:
    if _holds_data(name, folder):
      return folder.resolve()
  builder = _local_builders().get(name)
  wanted = f'{name}/{builder.MANUAL_FILE}' if builder else f'{name}/'
  hint = (
      f'download {builder.URL} (the file stock TFDS {name!r} fetches) to DIR/{wanted}'
      if builder
      else f'load_text_splits({name!r}) uses stock TFDS'
  )
  raise FileNotFoundError(
      f'Data set {name!r} not found: no {wanted} in any of\n'
      + ''.join(f'  {folder}\n' for folder in candidates)
      + f'Fix: pass --config.data.manual_dir=DIR or set {DATA_DIR_ENV}=DIR, with DIR holding '
      f'{wanted}; or, with the network, {hint}.'
  )


def _holds_data(name: str, folder: pathlib.Path) -> bool:
  builders = _local_builders()
  if name in builders:
    return (folder / builders[name].MANUAL_FILE).is_file()
  return folder.is_dir() and any(folder.iterdir())


def load_text_splits(
    name: str = 'tiny_shakespeare',
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> dict[str, str]:
  """Returns {split: text} for data set `name`, e.g. {'train', 'validation', 'test'}.

  Names in `moe_jax.datasets.LOCAL_BUILDERS` are prepared offline from `find_manual_dir(name,
  manual_dir)` into `data_dir` (TFDS default if None) as array_record, once: later calls reuse the
  prepared files. Other names load through stock `tfds.data_source`, which needs the network
  (offline it fails with RuntimeError after TFDS's download retries, minutes); their examples are
  joined with newlines, so this suits small corpora only.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builders = _local_builders()
  if name in builders:
    with quiet_tfds():
      builder = builders[name](data_dir=data_dir, file_format='array_record')
      if not builder.is_prepared():
        source = find_manual_dir(name, manual_dir)
        log.info('preparing %s from %s into %s (once)', name, source, builder.data_dir)
        config = tfds.download.DownloadConfig(manual_dir=str(source))
        builder.download_and_prepare(download_config=config)
      sources = builder.as_data_source()
  else:
    try:
      sources = tfds.data_source(
          name, data_dir=data_dir, builder_kwargs={'file_format': 'array_record'}
      )
    except Exception as e:
      raise RuntimeError(
          f'Could not load stock TFDS data set {name!r} into data_dir={data_dir!r}: stock TFDS '
          'needs the network (and some builders TensorFlow). Offline, only '
          f'{sorted(builders)} are available.'
      ) from e
  return {
      split: '\n'.join(ex['text'].decode('utf-8') for ex in source)
      for split, source in sources.items()
  }


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as a [len] uint8 array."""
  return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).copy()


def decode(ids) -> str:
  """Inverse of `encode` for ids in [0, 256); invalid UTF-8 becomes U+FFFD."""
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f'token ids must lie in [0, {VOCAB_SIZE})')
  return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


def train_batch(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> np.ndarray:
  """[batch_size, seq_len + 1] int32 random windows of `tokens`, a function of (seed, step) only."""
  if len(tokens) <= seq_len:
    raise ValueError(f'need more than seq_len={seq_len} tokens, got {len(tokens)}')
  starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, batch_size)
  return np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int
) -> np.ndarray:
  """[num_batches, batch_size, seq_len + 1] int32 fixed windows from the start of `tokens`.

  Window k is tokens[k * seq_len : (k + 1) * seq_len + 1], so inputs (and targets) of different
  windows do not overlap: each of the first num_batches * batch_size * seq_len targets is scored
  exactly once.
  """
  count = num_batches * batch_size
  if len(tokens) < count * seq_len + 1:
    raise ValueError(
        f'{num_batches} batches of {batch_size} x {seq_len} need {count * seq_len + 1} tokens, '
        f'got {len(tokens)}'
    )
  windows = np.asarray(tokens)[np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)]
  return windows.reshape(num_batches, batch_size, seq_len + 1).astype(np.int32)
