"""Tokenizers: UTF-8 bytes (the default) or a SentencePiece model trained on a training split.

`config.data.tokenizer` is `'bytes'` (`Bytes`: 256 ids, one per byte) or the path of a
SentencePiece `.model` (`SentencePiece`). `get(name)` returns one; every tokenizer has
`vocab_size`, `eos_id` (None for bytes), `encode(str) -> int32 ids`, `decode(ids) -> str` and
`piece_bytes`, the UTF-8 bytes of the text each id stands for (an `[vocab_size]` int array), from
which held-out bits per byte are counted.

`train_sentencepiece` (`moe-jax tokenizer`) trains a vocabulary on a data set's TRAINING split
only, lossless (identity normalization, no dummy prefix, whitespace kept, byte fallback: no text
is unknown and decode(encode(text)) == text), so that the bytes of the scored text are exactly the
sum of `piece_bytes` over its ids.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

BYTES = 'bytes'
SP_SPACE = '\u2581'  # SentencePiece's visible space
# Text whose round trip shows whether a SentencePiece model is lossless: double and leading
# spaces, a tab, a ligature NFKC would split, non-Latin letters.
_PROBE = '  Lead,\ttabs  and \ufb01ligatures\n\u00e9t\u00e9 \u4e2d\u6587 end '


class Bytes:
  """UTF-8 bytes as tokens: ids 0-255, no end-of-document id."""
  name = BYTES
  fingerprint = BYTES
  vocab_size = 256
  eos_id = None
  lossless = True
  piece_bytes = np.ones(256, np.int64)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return np.asarray(ids, np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePiece:
  """A SentencePiece model file as a tokenizer; documents end with its `</s>` (eos_id)."""

  def __init__(self, path: str | os.PathLike):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self.name = str(path)
    self.processor = spm.SentencePieceProcessor(model_file=str(path))
    # What the pieces are, wherever the file lies: a saved reader state names it.
    self.fingerprint = 'sha256:' + hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    self.vocab_size = int(self.processor.get_piece_size())
    eos = int(self.processor.eos_id())
    self.eos_id = eos if eos >= 0 else None
    self.piece_bytes = np.asarray([_piece_bytes(self.processor, i)
                                   for i in range(self.vocab_size)], np.int64)
    self.lossless = self.decode(self.encode(_PROBE)) == _PROBE

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.processor.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self.processor.decode([int(i) for i in np.asarray(ids).ravel()])


def _piece_bytes(processor, i: int) -> int:
  """UTF-8 bytes of the text that piece i stands for: 1 for a byte piece <0xAB>, 0 for control
  and unknown pieces, else its text with SP_SPACE as one space."""
  if processor.is_byte(i):
    return 1
  if processor.is_control(i) or processor.is_unknown(i):
    return 0
  return len(processor.id_to_piece(i).replace(SP_SPACE, ' ').encode('utf-8'))


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> SentencePiece:
  del mtime_ns  # in the key only: a retrained model file is loaded again
  return SentencePiece(path)


def get(name: str | None):
  """The tokenizer `config.data.tokenizer` names: 'bytes' (or None), else a SentencePiece model
  file. A missing or unreadable file is a one-line ValueError naming the field."""
  if name in (None, '', BYTES):
    return Bytes()
  path = pathlib.Path(name).expanduser()
  if path.is_dir() and (path / 'tokenizer.model').is_file():
    path = path / 'tokenizer.model'
  if not path.is_file():
    raise ValueError(f'config.data.tokenizer={name!r} is neither {BYTES!r} nor a SentencePiece '
                     'model file: train one with `moe-jax tokenizer --data NAME --out DIR` and '
                     'pass DIR/tokenizer.model.')
  try:
    return _load(str(path.resolve()), path.stat().st_mtime_ns)
  except (RuntimeError, OSError) as e:
    raise ValueError(f'config.data.tokenizer={name!r} could not be read as a SentencePiece '
                     f'model: {e}') from None


def of(config):
  """The tokenizer of an experiment config (`config.data.tokenizer`, absent: bytes)."""
  return get(config.data.get('tokenizer', BYTES))


def check_vocab(config, vocab_size: int, explicit: bool) -> int:
  """The model's vocabulary size for `config`'s tokenizer: the tokenizer's when config.model does
  not set one (`explicit` False), else the config's, which must hold every id (rows past the
  tokenizer's are allowed: padded vocabularies, unused); a one-line ValueError otherwise."""
  tokenizer = of(config)
  if not explicit:
    return tokenizer.vocab_size
  if vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f'config.model.vocab_size={vocab_size} is smaller than the tokenizer\'s '
        f'{tokenizer.vocab_size} ids (config.data.tokenizer={tokenizer.name!r}): set it to '
        f'{tokenizer.vocab_size} or more.')
  return vocab_size


# --- Training a SentencePiece vocabulary (`moe-jax tokenizer`) ---------------------------------

# Sentences (lines) the trainer samples: about a minute for 8k pieces on one CPU core.
INPUT_SENTENCE_SIZE = 300_000
RECORD = 'tokenizer.json'


def train_sentencepiece(data: str, vocab_size: int, out: str | os.PathLike, *,
                        data_dir=None, manual_dir=None, model_type: str = 'unigram',
                        input_sentence_size: int = INPUT_SENTENCE_SIZE, seed: int = 0,
                        command: str | None = None) -> dict:
  """Trains a SentencePiece vocabulary of `vocab_size` pieces on data set `data`'s TRAINING
  split (never validation or test) and writes out/tokenizer.model, out/tokenizer.vocab and
  out/tokenizer.json (data set, split, vocab size, trainer options, command, sha256 of the
  model). Lines are sampled up to `input_sentence_size` (seeded) so that it runs in about a
  minute. Lossless: identity normalization, whitespace and newlines kept as pieces, byte
  fallback (nothing unknown). Returns the JSON record."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  from moe_jax.data import text  # pylint: disable=g-import-not-at-top

  if not isinstance(vocab_size, int) or vocab_size < 260:
    raise ValueError(f'--vocab_size={vocab_size} is too small: byte fallback alone takes 256 '
                     'ids and the control pieces 3; use 260 or more (8192 is usual).')
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f'--out {out} is a file: name a folder.')
  start = time.perf_counter()
  splits = text.load_text_splits(data, data_dir=data_dir, manual_dir=manual_dir)
  train_text = splits['train']
  out.mkdir(parents=True, exist_ok=True)
  options = dict(model_type=model_type, vocab_size=vocab_size, byte_fallback=True,
                 normalization_rule_name='identity', add_dummy_prefix=False,
                 remove_extra_whitespaces=False, split_digits=True,
                 allow_whitespace_only_pieces=True, character_coverage=0.9995,
                 input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                 max_sentence_length=16384, num_threads=2,
                 hard_vocab_limit=True)
  spm.set_random_generator_seed(seed)  # the line sample
  with tempfile.TemporaryDirectory() as tmp:
    corpus = pathlib.Path(tmp) / 'train.txt'
    corpus.write_text(train_text, encoding='utf-8')
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / 'tokenizer'),
                                   minloglevel=2, **options)
  model = out / 'tokenizer.model'
  record = {
      'data': data, 'split': 'train', 'train_characters': len(train_text),
      'vocab_size': vocab_size, 'seed': seed, 'trainer': 'sentencepiece ' + spm.__version__,
      'options': options,
      'command': command or ' '.join(['moe-jax', *sys.argv[1:]]),
      'model_sha256': hashlib.sha256(model.read_bytes()).hexdigest(),
      'seconds': round(time.perf_counter() - start, 1),
  }
  (out / RECORD).write_text(json.dumps(record, indent=2) + '\n')
  return record
