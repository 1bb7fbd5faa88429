"""TFDS text builders of the project's own, which read local files and need no TensorFlow.

Each is prepared offline as `array_record` from a manual dir holding its `MANUAL_FILES` and read
back with `builder.as_data_source()`; `moe_jax.data.text.load_text_splits(name)` does both for the
names in `LOCAL_BUILDERS`:

- `tiny_shakespeare` (`TinyShakespeareManual`): the stock builder downloads `input.txt` and reads
  it with `tf.io.gfile`; this one reads the same file from a manual dir and yields the same
  features and 90/5/5 splits.
- `english_mix` (`EnglishMix`): a local corpus of 51.4 MB (GCIDE, WordNet glosses, fortunes),
  about 46x Tiny Shakespeare, with no stock TFDS counterpart. Validation and test are fixed 1%
  shares of contiguous blocks of each file (`text_blocks`, `block_split`, `split_blocks`: pure
  functions), never random bytes.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import AnyStr

import tensorflow_datasets as tfds


class TinyShakespeareManual(tfds.core.GeneratorBasedBuilder):
  """Tiny Shakespeare from `<manual_dir>/input.txt`; the stock splits and features.

  Each split is written as consecutive blocks of ~8 KiB cut at newlines (`text_blocks`; 1.0.0
  wrote one example per split), in order, so that `load_text_splits`' '\n' join gives the stock
  split text exactly and a streaming reader (`moe_jax.data.pipeline`) can shard the split over
  rows and hosts by example.
  """

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': 'Splits as ~8 KiB blocks cut at newlines (same text when joined).'}
  MANUAL_FILES = ('input.txt',)
  URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'With the network, download {URL} (1,115,394 bytes: the file stock TFDS fetches) into '
      'that folder.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='40,000 lines of Shakespeare (karpathy/char-rnn), read from a manual dir.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        supervised_keys=None,
        disable_shuffling=True,
        homepage='https://github.com/karpathy/char-rnn/blob/master/data/tinyshakespeare/input.txt',
    )

  def _split_generators(self, dl_manager):
    text = (pathlib.Path(dl_manager.manual_dir) / self.MANUAL_FILES[0]).read_bytes().decode('utf-8')
    # The stock builder's 90/5/5 split, in characters.
    i = int(len(text) * 0.9)
    train, rest = text[:i], text[i:]
    i = int(len(rest) * 0.5)
    splits = {'train': train, 'validation': rest[:i], 'test': rest[i:]}
    return {name: self._generate_examples(name, split) for name, split in splits.items()}

  def _generate_examples(self, split_key, split_text):
    del split_key
    for index, block in enumerate(text_blocks(split_text, BLOCK_SIZE)):
      yield index, {'text': block}


BLOCK_SIZE = 8192
HELD_OUT = {98: 'validation', 99: 'test'}  # block index % 100 -> held-out split


def block_split(index: int) -> str:
  """The split of block `index` of a file: 'validation' when index % 100 == 98, 'test' when 99,
  else 'train' (1% each held out, spread evenly over the file)."""
  return HELD_OUT.get(index % 100, 'train')


def text_blocks(text: AnyStr, block_size: int = BLOCK_SIZE) -> list[AnyStr]:
  r"""`text` (str or bytes) cut at newlines into consecutive blocks of about `block_size`.

  Each block ends where the first newline at least `block_size` characters (bytes for bytes) from
  its start begins; that newline is the cut and belongs to neither block, so
  `'\n'.join(blocks) == text` exactly, and a block with its newline spans `block_size` characters
  plus the rest of the line it reached. The last block is what remains (shorter, possibly empty,
  not followed by a newline). A pure function: the same (text, block_size) gives the same blocks.
  """
  if block_size < 1:
    raise ValueError(f'block_size must be positive, got {block_size}')
  newline = '\n' if isinstance(text, str) else b'\n'
  blocks, start = [], 0
  while True:
    cut = text.find(newline, start + block_size - 1)
    if cut < 0:
      blocks.append(text[start:])
      return blocks
    blocks.append(text[start:cut])
    start = cut + 1


def split_blocks(
    text: AnyStr, block_size: int = BLOCK_SIZE
) -> dict[str, list[tuple[int, AnyStr]]]:
  """{'train'|'validation'|'test': [(block index, block), ...]} of `text_blocks(text, block_size)`,
  each block sent to `block_split(index)`; blocks keep file order within a split."""
  splits = {'train': [], 'validation': [], 'test': []}
  for index, block in enumerate(text_blocks(text, block_size)):
    splits[block_split(index)].append((index, block))
  return splits


class EnglishMix(tfds.core.GeneratorBasedBuilder):
  r"""51.4 MB of English (GCIDE dictionary, WordNet glosses, fortunes) split by contiguous blocks.

  Reads `MANUAL_FILES` (gzip'd text) from the manual dir. Each file is cut by `text_blocks` into
  consecutive 8 KiB blocks ending at a newline, and block i goes to `block_split(i)`: validation
  when i % 100 == 98, test when 99, train otherwise. So 1% of each file is held out for each of
  validation and test, as 8 KiB pieces spread over the whole file (GCIDE is alphabetical: a tail
  block would be all 'Z' words). Blocks are 8 KiB rather than 64 KiB so that the smallest file,
  fortunes (2.5 MB, 302 blocks), still holds out 3 + 3 blocks (0.99%); at 64 KiB it would have 37
  blocks and none held out. Blocks: GCIDE 4,863, WordNet 1,088, fortunes 302; held out 48, 10, 3
  of each file for each of validation and test. `load_text_splits('english_mix')` gives train
  50,391,046, validation 501,553 and test 501,280 characters (0.98% each).

  One example per block (feature `text`, as tiny_shakespeare), written in file order (shuffling
  disabled, int keys file * 10**6 + block), so `load_text_splits`' '\n' join gives each file with
  the other splits' blocks cut out. GCIDE has 3 stray non-UTF-8 bytes; they become U+FFFD.
  Preparing the full corpus takes about 3 s on this project's 2-core CPU machine (TFDS writes
  21 MB of array_record); loading the prepared splits back, 0.7 s.
  """

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_FILES = ('gcide.txt.gz', 'wordnet_glosses.txt.gz', 'fortunes.txt.gz')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "A local corpus, no download: the files come from Debian's dict-gcide, wordnet-base and "
      'fortunes packages (see shared/data/README.md); offline copies lie in '
      '../shared/data/english_mix/ beside the repo.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'English mix: GCIDE (Webster 1913 + additions), WordNet 3.0 glosses and the fortunes '
            'collection, 51.4 MB of mostly ASCII text, held out by contiguous 8 KiB blocks (1% '
            'each for validation and test).'),
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        supervised_keys=None,
        disable_shuffling=True,
        homepage='https://www.gnu.org/software/gcide/',
    )

  def _split_generators(self, dl_manager):
    folder = pathlib.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(folder, split)
            for split in ('train', 'validation', 'test')}

  def _generate_examples(self, folder, split):
    for file_index, name in enumerate(self.MANUAL_FILES):
      with gzip.open(folder / name, 'rb') as f:
        text = f.read()
      for block_index, block in split_blocks(text, BLOCK_SIZE)[split]:
        # A newline never occurs inside a multi-byte UTF-8 sequence, so cuts keep blocks whole.
        yield file_index * 10**6 + block_index, {'text': block.decode('utf-8', errors='replace')}


# Data set names served by a local builder, and the builder for each.
LOCAL_BUILDERS = {'tiny_shakespeare': TinyShakespeareManual, 'english_mix': EnglishMix}
