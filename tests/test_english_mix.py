"""The `english_mix` text builder on the real files (slices of them), offline, no TensorFlow.

The pure block split is checked on the full real `fortunes` text (the smallest file); the TFDS
builder on the first ~1 MB of each of the three real files (about 120 blocks of 8 KiB each, so each
file holds out one validation and one test block), prepared twice into fresh data dirs.
"""
import gzip
import pathlib
import socket

import pytest

from moe_jax.data import text, text_builders

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
ENGLISH_MIX = SHARED_DATA / 'english_mix'
if not SHARED_DATA.is_dir():
  pytest.skip(f'offline data {SHARED_DATA} is absent (CI has it as ../shared beside the clone)',
              allow_module_level=True)

FILES = text_builders.EnglishMix.MANUAL_FILES
SLICE_BYTES = 1_000_000  # > 100 blocks of 8 KiB: blocks 98 and 99 of each file exist


def _no_network(*args, **kwargs):
  raise AssertionError('network access attempted')


@pytest.fixture(scope='module')
def fortunes() -> bytes:
  return gzip.open(ENGLISH_MIX / 'fortunes.txt.gz').read()


@pytest.fixture(scope='module')
def slices(tmp_path_factory) -> tuple[pathlib.Path, dict[str, bytes]]:
  """(manual dir, {file: bytes}): the first ~1 MB of each real file, cut after a newline, gzip'd."""
  manual_dir = tmp_path_factory.mktemp('manual') / 'english_mix'
  manual_dir.mkdir()
  texts = {}
  for name in FILES:
    with gzip.open(ENGLISH_MIX / name) as f:
      head = f.read(SLICE_BYTES)
    head = head[:head.rindex(b'\n') + 1]
    (manual_dir / name).write_bytes(gzip.compress(head, compresslevel=1))
    texts[name] = head
  return manual_dir, texts


def _prepare(data_dir: pathlib.Path, manual_dir: pathlib.Path):
  """(load_text_splits' {split: text}, {split: [example text, ...]}) with the network blocked."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'getaddrinfo', _no_network)
    mp.delenv(text.DATA_DIR_ENV, raising=False)
    splits = text.load_text_splits('english_mix', data_dir=data_dir, manual_dir=manual_dir)
  sources = text_builders.EnglishMix(data_dir=data_dir, file_format='array_record').as_data_source()
  examples = {split: [ex['text'].decode('utf-8') for ex in source]
              for split, source in sources.items()}
  return splits, examples


@pytest.fixture(scope='module')
def prepared(slices, tmp_path_factory):
  return _prepare(tmp_path_factory.mktemp('tfds'), slices[0])


def test_block_split_rule():
  assert [text_builders.block_split(i) for i in (0, 97, 98, 99, 100, 198, 199, 1098, 12399)] == [
      'train', 'train', 'validation', 'test', 'train', 'validation', 'test', 'validation', 'test']


@pytest.mark.parametrize('as_text', [False, True], ids=['bytes', 'str'])
def test_blocks_rejoin_exactly_and_are_cut_at_newlines(fortunes, as_text):
  text = fortunes.decode('utf-8') if as_text else fortunes
  newline = '\n' if as_text else b'\n'
  blocks = text_builders.text_blocks(text)
  assert newline.join(blocks) == text  # consecutive, nothing lost or repeated
  start = 0
  for block in blocks[:-1]:
    start += len(block)
    assert text[start:start + 1] == newline  # each block is cut at a newline...
    start += 1
    # ... the first one at least BLOCK_SIZE from the block's start.
    assert len(block) >= text_builders.BLOCK_SIZE - 1
    assert newline not in block[text_builders.BLOCK_SIZE - 1:]
  assert len(blocks[-1]) < text_builders.BLOCK_SIZE + 500


def test_text_blocks_edge_cases():
  assert text_builders.text_blocks('') == ['']
  assert text_builders.text_blocks('no newline at all', 4) == ['no newline at all']
  assert text_builders.text_blocks('ab\ncd\n\nefg\nh', 1) == ['ab', 'cd', '', 'efg', 'h']
  assert text_builders.text_blocks(b'ab\ncd\nef\n', 4) == [b'ab\ncd', b'ef\n']
  with pytest.raises(ValueError, match='block_size'):
    text_builders.text_blocks('x', 0)


def test_held_out_share_is_one_percent_at_full_size(fortunes):
  splits = text_builders.split_blocks(fortunes)
  assert [i for i, _ in splits['validation']] == [98, 198, 298]
  assert [i for i, _ in splits['test']] == [99, 199, 299]
  assert len(splits['train']) == 296
  for split in ('validation', 'test'):
    share = sum(len(block) for _, block in splits[split]) / len(fortunes)
    assert 0.009 < share < 0.011, (split, share)
  # Pure: the same text gives the same split.
  assert text_builders.split_blocks(fortunes) == splits


def test_prepared_splits_are_the_block_split_of_each_file(slices, prepared):
  _, texts = slices
  splits, examples = prepared
  expected = {'train': [], 'validation': [], 'test': []}
  for name in FILES:
    for split, blocks in text_builders.split_blocks(texts[name]).items():  # bytes, as the builder
      expected[split] += [block.decode('utf-8', errors='replace') for _, block in blocks]
  assert examples == expected  # one example per block, in file order
  assert {split: len(blocks) for split, blocks in expected.items() if split != 'train'} == {
      'validation': 3, 'test': 3}  # one of each per file
  assert splits == {split: '\n'.join(blocks) for split, blocks in expected.items()}


def test_prepared_splits_are_disjoint_and_cover_the_text(slices, prepared):
  _, texts = slices
  _, examples = prepared
  held_out = set(examples['validation']) | set(examples['test'])
  assert not set(examples['validation']) & set(examples['test'])
  assert not set(examples['train']) & held_out
  # Putting each file's blocks back at their indices restores the file.
  by_split = {split: iter(blocks) for split, blocks in examples.items()}
  for name in FILES:
    blocks = text_builders.text_blocks(texts[name])
    rebuilt = [next(by_split[text_builders.block_split(i)]) for i in range(len(blocks))]
    assert '\n'.join(rebuilt) == texts[name].decode('utf-8', errors='replace')
  assert all(next(it, None) is None for it in by_split.values())  # nothing left over


def test_preparation_is_deterministic(slices, prepared, tmp_path):
  assert _prepare(tmp_path / 'again', slices[0]) == prepared


def test_found_in_shared_data(monkeypatch):
  monkeypatch.delenv(text.DATA_DIR_ENV, raising=False)
  assert text.find_manual_dir('english_mix') == ENGLISH_MIX.resolve()
  assert text.find_manual_dir('english_mix', SHARED_DATA) == ENGLISH_MIX.resolve()


def test_missing_file_is_a_clear_error(slices, tmp_path, monkeypatch):
  partial = tmp_path / 'english_mix'
  partial.mkdir()
  for name in FILES[:2]:
    (partial / name).write_bytes((slices[0] / name).read_bytes())
  monkeypatch.setenv(text.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError) as info:
    text.load_text_splits('english_mix', data_dir=tmp_path / 'tfds')
  message = str(info.value)
  assert f'{partial} (lacks fortunes.txt.gz)' in message
  for part in ['english_mix/gcide.txt.gz', '--config.data.manual_dir', text.DATA_DIR_ENV,
               'no download']:
    assert part in message
