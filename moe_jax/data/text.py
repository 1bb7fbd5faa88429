"""Data pipeline: text splits through TFDS (offline, no TensorFlow), bytes as tokens, batches.

`tiny_shakespeare` (1.1 MB) and `english_mix` (51.4 MB: GCIDE, WordNet glosses, fortunes; 1% each
of validation and test held out by contiguous blocks) are prepared by the project's own builders
(`moe_jax.data.text_builders.LOCAL_BUILDERS`) from local files (found by `find_manual_dir`, by default in
`../shared/data/<name>/`) into `array_record` files and read back with `as_data_source()`. Any
other name goes to stock TFDS, which needs the network. Tokens are UTF-8 bytes
(`VOCAB_SIZE = 256`). Batches are `[batch_size, seq_len + 1]` int32 windows: inputs
`batch[:, :-1]`, targets `batch[:, 1:]`.
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
# Stock TFDS text corpora that paper configs name (configs/papers/) and that are too large to read
# into memory: C4 (~800 GB of English).
STREAMING_ONLY = ('c4',)
DATA_DIR_ENV = 'MOE_JAX_DATA_DIR'
log = logging.getLogger(__name__)
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED_DATA = pathlib.Path(__file__).resolve().parents[1] / 'shipped_data'  # Tiny Shakespeare's text


def _local_builders() -> dict:
  """The project's own TFDS builders (imported on use: the model and training step need no TFDS)."""
  from moe_jax.data.text_builders import LOCAL_BUILDERS  # pylint: disable=g-import-not-at-top
  return LOCAL_BUILDERS


def candidate_dirs(name: str, manual_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The folders that may hold data set `name`'s files, in the order they are tried.

  Only the first of these that is given counts: `manual_dir` (the folder itself, then its
  `<name>/` subfolder); else `$MOE_JAX_DATA_DIR/<name>/`; else `../shared/data/<name>/` relative
  to the repo root and to the current directory (the offline copies, see shared/data/README.md),
  then the copy shipped in the package (`SHIPPED_DATA`: Tiny Shakespeare only).
  """
  if manual_dir is not None:
    return [pathlib.Path(manual_dir), pathlib.Path(manual_dir) / name]
  if os.environ.get(DATA_DIR_ENV):
    return [pathlib.Path(os.environ[DATA_DIR_ENV]) / name]
  roots = [_REPO_ROOT / '..' / 'shared' / 'data', pathlib.Path.cwd() / '..' / 'shared' / 'data',
           SHIPPED_DATA]
  return list(dict.fromkeys((root / name).resolve() for root in roots))


def missing_files(folder: pathlib.Path, files) -> list[str]:
  """The names in `files` that are not regular files in `folder`."""
  return [f for f in files if not (pathlib.Path(folder) / f).is_file()]


def describe_candidates(folders, files) -> str:
  """One indented line per folder, saying which of `files` it lacks (for not-found errors)."""
  lines = []
  for folder in folders:
    if not pathlib.Path(folder).is_dir():
      note = 'no such folder'
    else:
      note = 'lacks ' + ', '.join(missing_files(folder, files))
    lines.append(f'  {folder} ({note})\n')
  return ''.join(lines)


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

  Looks in `candidate_dirs(name, manual_dir)`; a folder counts when it holds all of the builder's
  `MANUAL_FILES`. Raises FileNotFoundError, naming the places, what each lacks, and the fix.
  """
  builder = _local_builders().get(name)
  candidates = candidate_dirs(name, manual_dir)
  for folder in candidates:
    if _holds_data(name, folder):
      return folder.resolve()
  if builder:
    wanted = ', '.join(f'{name}/{f}' for f in builder.MANUAL_FILES)
    listing = describe_candidates(candidates, builder.MANUAL_FILES)
    hint = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  else:
    wanted = f'{name}/'
    listing = ''.join(f'  {folder}\n' for folder in candidates)
    hint = f'Or, with the network, load_text_splits({name!r}) uses stock TFDS.'
  raise FileNotFoundError(
      f'Data set {name!r} not found: no {wanted} in any of\n'
      + listing
      + f'Fix: pass --config.data.manual_dir=DIR or set {DATA_DIR_ENV}=DIR, with DIR holding '
      f'{wanted}. {hint}'
  )


def _holds_data(name: str, folder: pathlib.Path) -> bool:
  builders = _local_builders()
  if name in builders:
    return not missing_files(folder, builders[name].MANUAL_FILES)
  return folder.is_dir() and any(folder.iterdir())


def load_text_splits(
    name: str = 'tiny_shakespeare',
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> dict[str, str]:
  """Returns {split: text} for data set `name`, e.g. {'train', 'validation', 'test'}.

  Names in `moe_jax.data.text_builders.LOCAL_BUILDERS` are prepared offline from `find_manual_dir(name,
  manual_dir)` into `data_dir` (TFDS default if None) as array_record, once: later calls reuse the
  prepared files. Other names load through stock `tfds.data_source`, which needs the network
  (offline it fails with FileNotFoundError after TFDS's download retries, minutes); their examples
  are joined with newlines, so this suits small corpora only. A name TFDS does not know (and finds
  no prepared files of in `data_dir`) is a ValueError at once, listing the offline data sets.
  """
  if name.split('/')[0] in STREAMING_ONLY:
    raise ValueError(f'config.data.name={name!r} is too large to load into memory as this '
                     'loader does (the byte-level path, config.data.tokenizer=\'bytes\'): '
                     'train it with a SentencePiece tokenizer, whose batches stream through '
                     'Grain (moe_jax/data/pipeline.py).')
  sources = text_sources(name, data_dir=data_dir, manual_dir=manual_dir)
  return {
      split: '\n'.join(ex['text'].decode('utf-8') for ex in source)
      for split, source in sources.items()
  }


def text_sources(
    name: str = 'tiny_shakespeare',
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> dict:
  """{split: random-access TFDS data source of {'text': bytes} examples} of data set `name`,
  read from its array_record files (prepared first, as `load_text_splits` says); nothing is read
  into memory. Unlike `load_text_splits`, streaming-only sets (`STREAMING_ONLY`) are allowed."""
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
    _check_stock_name(name, data_dir)
    try:
      sources = tfds.data_source(
          name, data_dir=data_dir, builder_kwargs={'file_format': 'array_record'}
      )
    except Exception as e:
      reason = (str(e).strip().splitlines() or [''])[0][:200]
      raise FileNotFoundError(
          f'Could not load stock TFDS data set {name!r} into config.data.data_dir={data_dir!r} '
          f'({type(e).__name__}: {reason}): stock TFDS needs the network (and some builders '
          f'TensorFlow). Offline, {_offline_names()} are available.'
      ) from e
  return dict(sources)


def _offline_names() -> str:
  """The text data sets of the project's local builders, in words."""
  return f'the text data sets {sorted(_local_builders())}'


def _check_stock_name(name: str, data_dir) -> None:
  """Raises a ValueError at once, without the network, when `name` is neither a stock TFDS data
  set (a builder TFDS registers) nor prepared in `data_dir` (files TFDS reads without its
  builder)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f'config.data.name={name!r} is not a data set available offline ({_offline_names()}: '
        'the project\'s local builders) nor a stock TFDS data set: choose one of those; a stock '
        'TFDS set needs the network, or its prepared files in config.data.data_dir.') from None
  except Exception:  # pylint: disable=broad-exception-caught
    pass  # e.g. a community data set whose package is missing: tfds.data_source says so


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as a [len] uint8 array."""
  return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).copy()


def decode(ids) -> str:
  """Inverse of `encode` for ids in [0, 256); invalid UTF-8 becomes U+FFFD."""
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f'token ids must lie in [0, {VOCAB_SIZE})')
  return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


# Rows of one batch start at least this many windows apart, so that no row is another's
# continuation: routing that couples a batch's rows (group_by='position') then never mixes a
# sequence with its own nearby text.
MIN_ROW_GAP_WINDOWS = 4


def train_window_starts(num_tokens: int, step: int, batch_size: int, seq_len: int,
                        seed: int) -> np.ndarray:
  """[batch_size] start offsets of step `step`'s windows, a function of (seed, step) only.

  One random offset per step; row i starts (offset + i * stride) mod the number of starts, with
  stride = that number // batch_size. Any two rows start >= stride >= MIN_ROW_GAP_WINDOWS windows
  apart in the text (the wrap joins the text's end to its start, which are not neighbours).
  """
  num_starts = num_tokens - seq_len
  if num_starts < 1:
    raise ValueError(f'need more than seq_len={seq_len} tokens, got {num_tokens}')
  stride = num_starts // batch_size
  if stride < MIN_ROW_GAP_WINDOWS * seq_len:
    raise ValueError(
        f'{num_tokens} training tokens are too few for {batch_size} rows of seq_len={seq_len} '
        f'that start >= {MIN_ROW_GAP_WINDOWS} windows apart; lower config.data.batch_size or '
        'seq_len, or use more text.')
  offset = np.random.default_rng([seed, step]).integers(0, num_starts)
  return (offset + stride * np.arange(batch_size)) % num_starts


def train_batch(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> np.ndarray:
  """[batch_size, seq_len + 1] int32 windows at `train_window_starts`."""
  starts = train_window_starts(len(tokens), step, batch_size, seq_len, seed)
  return np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_window_starts(num_tokens: int, batch_size: int, seq_len: int,
                       num_batches: int) -> np.ndarray:
  """[num_batches, batch_size] start offsets of the evaluation windows.

  The text is cut into windows k = tokens[k * seq_len : (k + 1) * seq_len + 1] (inputs and targets
  of different windows never overlap, so every target is scored once) and the windows into
  batch_size equal stretches: row i of batch j is window j of stretch i. The rows of one batch
  are a whole stretch apart, never each other's continuation.
  """
  stride = (num_tokens - 1) // seq_len // batch_size  # windows per stretch
  if stride < max(num_batches, MIN_ROW_GAP_WINDOWS):
    raise ValueError(
        f'{num_tokens} held-out tokens are too few for {num_batches} evaluation batches of '
        f'{batch_size} x {seq_len} whose rows lie >= {MIN_ROW_GAP_WINDOWS} windows apart: they '
        f'need {max(num_batches, MIN_ROW_GAP_WINDOWS) * batch_size * seq_len + 1}. Lower '
        'config.train.eval_batches, config.data.batch_size or seq_len.')
  index = np.arange(num_batches)[:, None] + stride * np.arange(batch_size)[None, :]
  return index * seq_len


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int
) -> np.ndarray:
  """[num_batches, batch_size, seq_len + 1] int32 windows at `eval_window_starts`."""
  starts = eval_window_starts(len(tokens), batch_size, seq_len, num_batches)
  return np.asarray(tokens)[starts[..., None] + np.arange(seq_len + 1)].astype(np.int32)
