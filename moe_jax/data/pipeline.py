"""Tokenized text at scale: Grain over the array_record files, per-host shards, packed windows,
iterator state saved beside each checkpoint.

`PackedRows` gives training batches of `[rows, length]` int32 windows (length = seq_len + 1,
inputs `[:, :-1]`, targets `[:, 1:]`) as follows. Each of the global batch's G rows is its own
Grain pipeline over its own contiguous range of the split's examples (row g: examples
[g N / G, (g + 1) N / G) of N; `grain.MapDataset` slicing, as `ShardOptions` shards by index):
shuffled (a new order each epoch, seeded by (seed, g)), repeated, tokenized with an end-of-document
id appended (`tokenizers`), and concatenated then cut into windows
(`grain.experimental.ConcatThenSplitIterDataset`). Plain concatenation, no segment ids: a window
may hold the end of one document, `</s>` and the start of the next, and attention may look back
across `</s>` (as GPT-2 and T5's LM tasks do); the model is unchanged and stays causal.

So rows never share an example, and a row's neighbour in the batch reads different text (never
its continuation, which `group_by='position'` routing would see through the batch). A process
builds only the rows its devices hold (`local_rows` of the batch sharding) and reads only their
examples: the hosts' shards are disjoint, and the global batch assembled from every host's part
(`jax.make_array_from_process_local_data`, as MaxText's multihost_dataloading) equals the batch
of one process holding all G rows.

The state (`get_state`: each row's Grain iterator state, keyed by global row) after step s is
saved as workdir/data_state/<s>/process_<p>-of-<n>.json next to orbax's checkpoint of step s
(`StreamFeed.save`), and `restore` merges every process's file, so a resumed run reads exactly
the batches of an uninterrupted one, on any number of hosts with the same batch size.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

STATE_DIR = 'data_state'
# Held-out tokens read at most (64 MB of int32): all of a validation split but a C4-sized one's.
EVAL_TOKENS = 2**24


def row_seed(seed: int, row: int) -> int:
  """The shuffle seed of global row `row`: a 32-bit hash of (seed, row)."""
  return int(np.random.SeedSequence([seed, row]).generate_state(1)[0])


def row_range(row: int, rows: int, num_examples: int) -> tuple[int, int]:
  """[start, stop) of the examples row `row` of `rows` reads."""
  return row * num_examples // rows, (row + 1) * num_examples // rows


def _tokenize(tokenizer, example) -> dict:
  text = example['text']
  text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)
  ids = tokenizer.encode(text)
  if tokenizer.eos_id is not None:
    ids = np.append(ids, np.int32(tokenizer.eos_id))
  return {'tokens': ids.astype(np.int32)}


def _row_dataset(source, tokenizer, row: int, rows: int, length: int, seed: int):
  import grain  # pylint: disable=g-import-not-at-top
  from grain import experimental as grain_experimental  # pylint: disable=g-import-not-at-top

  start, stop = row_range(row, rows, len(source))
  records = (grain.MapDataset.source(source)[start:stop].shuffle(seed=row_seed(seed, row))
             .repeat().map(lambda example: _tokenize(tokenizer, example)))
  # Read in this thread: a training step runs asynchronously on the devices meanwhile.
  stream = records.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return grain_experimental.ConcatThenSplitIterDataset(stream, length_struct={'tokens': length})


def _tuples(value):
  """JSON turned the tuples of a Grain state into lists: back to tuples (its slices compare
  with tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


class PackedRows:
  """The rows `rows` (global indices) of every training batch: next() -> [len(rows), length]
  int32. See the module docstring. source: a random-access data source of {'text'} examples
  (the training split); num_rows: G, the global batch size."""

  def __init__(self, source, tokenizer, *, rows: Sequence[int], num_rows: int, length: int,
               seed: int):
    if len(source) < num_rows:
      raise ValueError(f'the training split has {len(source)} examples, fewer than the '
                       f'{num_rows} rows of a batch (config.data.batch_size), each of which '
                       'reads its own examples: lower the batch size.')
    self.rows = list(rows)
    self.num_rows = num_rows
    self.tokenizer = tokenizer.fingerprint
    self.ranges = {g: row_range(g, num_rows, len(source)) for g in self.rows}
    self._iters = [iter(_row_dataset(source, tokenizer, g, num_rows, length, seed))
                   for g in self.rows]

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    return np.stack([next(it)['tokens'] for it in self._iters])

  def get_state(self) -> dict:
    """{'num_rows': G, 'tokenizer': its fingerprint, 'rows': {str(global row): its Grain
    iterator's state}}."""
    return {'num_rows': self.num_rows, 'tokenizer': self.tokenizer,
            'rows': {str(g): it.get_state() for g, it in zip(self.rows, self._iters)}}

  def set_state(self, state: dict) -> None:
    """Restores `get_state`'s value (of any set of rows that includes these)."""
    if state['num_rows'] != self.num_rows:
      raise ValueError(f'the saved input pipeline state is of batches of {state["num_rows"]} '
                       f'rows, this run\'s of {self.num_rows}: config.data.batch_size changed.')
    if state.get('tokenizer') != self.tokenizer:
      raise ValueError(f'the saved input pipeline state was read with tokenizer '
                       f'{state.get("tokenizer")}, this run\'s is {self.tokenizer}: the file '
                       'config.data.tokenizer names changed since the checkpoint; restore it or '
                       'start a new --workdir.')
    for g, it in zip(self.rows, self._iters):
      it.set_state(_tuples(state['rows'][str(g)]))


def local_rows(sharding: jax.sharding.Sharding, num_rows: int) -> list[int]:
  """The global batch rows that this process's devices hold under `sharding` (sorted): the rows
  it must supply to `jax.make_array_from_process_local_data`."""
  indices = sharding.addressable_devices_indices_map((num_rows, 1)).values()
  return sorted({r for index in indices for r in range(*index[0].indices(num_rows))})


class IndexedFeed:
  """Batches that are a function of the step (the byte-level path): batch(i) =
  `train_batch(i)` placed by `sharding`; no state to save."""

  def __init__(self, train_batch: Callable[[int], Any], sharding):
    self.train_batch, self.sharding = train_batch, sharding

  def batch(self, step: int):
    return jax.device_put(self.train_batch(step), self.sharding)

  def save(self, workdir, step: int, kept_steps: Sequence[int] = ()) -> None:
    del workdir, step, kept_steps

  def restore(self, workdir, step: int) -> None:
    del workdir, step


class StreamFeed:
  """Batches read in order from a stateful `PackedRows` of this process's rows, assembled into
  the global batch on `sharding`; its state saved and restored beside the checkpoints."""

  KEEP = 4  # states kept of the latest batches (a Ctrl-C checkpoints the step before the last)

  def __init__(self, make_rows: Callable[[Sequence[int]], PackedRows], sharding, num_rows: int,
               length: int):
    self.sharding = sharding
    self.shape = (num_rows, length)
    self.rows = make_rows(local_rows(sharding, num_rows))
    self.next = 0
    self._states = {0: self.rows.get_state()}  # step -> state before batch `step`

  def batch(self, step: int) -> jax.Array:
    if step != self.next:
      raise RuntimeError(f'the input pipeline reads batches in order: asked for batch {step}, '
                         f'next is {self.next}')
    local = next(self.rows)
    self.next += 1
    self._states[self.next] = self.rows.get_state()
    for old in [s for s in self._states if s < self.next - self.KEEP]:
      del self._states[old]
    return jax.make_array_from_process_local_data(self.sharding, local, self.shape)

  @staticmethod
  def folder(workdir, step: int) -> pathlib.Path:
    return pathlib.Path(workdir) / STATE_DIR / str(step)

  def save(self, workdir, step: int, kept_steps: Sequence[int] = ()) -> None:
    """Writes this process's state after `step` batches (before orbax saves that step, so that
    every checkpoint has one), and drops the states of checkpoints older than all of
    `kept_steps` (orbax's, which deletes the oldest first)."""
    folder = self.folder(workdir, step)
    folder.mkdir(parents=True, exist_ok=True)
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    tmp = folder / (name + '.tmp')
    tmp.write_text(json.dumps(self._states[step]))
    tmp.replace(folder / name)
    if kept_steps and jax.process_index() == 0:
      oldest = min(kept_steps)
      for path in (pathlib.Path(workdir) / STATE_DIR).iterdir():
        if path.name.isdigit() and int(path.name) < oldest:
          for f in path.iterdir():
            f.unlink()
          path.rmdir()

  def restore(self, workdir, step: int) -> None:
    """Sets the pipeline to read batch `step` next, from the states every process saved at
    `step` (merged: the rows may lie on other processes now)."""
    folder = self.folder(workdir, step)
    files = sorted(folder.glob('process_*.json')) if folder.is_dir() else []
    if not files:
      raise FileNotFoundError(
          f'no input pipeline state for the checkpoint of step {step} in {folder}: this '
          'tokenized run cannot resume exactly without it.')
    states = [json.loads(f.read_text()) for f in files]
    merged = {**states[0], 'rows': {g: s for state in states for g, s in state['rows'].items()}}
    self.rows.set_state(merged)
    self.next = step
    self._states = {step: self.rows.get_state()}


def eval_tokens(source, tokenizer, wanted: int) -> np.ndarray:
  """The held-out split's examples in order, tokenized (each followed by the end-of-document
  id), concatenated: all of them, or the first ones holding at least `wanted` tokens."""
  parts, total = [], 0
  for i in range(len(source)):
    ids = _tokenize(tokenizer, source[i])['tokens']
    parts.append(ids)
    total += len(ids)
    if total >= wanted:
      break
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def bits_per_byte(nats_per_token: float, bytes_per_token: float) -> float:
  """Bits per UTF-8 byte of the scored text: total nats / (ln 2 x total bytes)."""
  return nats_per_token / (math.log(2) * bytes_per_token)
