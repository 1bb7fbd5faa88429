"""Tokenized text: the SentencePiece tokenizer (`moe-jax tokenizer`), the vocabulary that follows
it, Grain's packed rows over the array_record files, their exact resume, and held-out bits per
byte. All on Tiny Shakespeare with a 512-piece vocabulary (the `sp_model` fixture, conftest.py).
The two-process shards are in tests/test_multihost.py."""
import json
import math
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.data import pipeline, text, tokenizers
from moe_jax.models import transformer
from moe_jax.run import tasks, train
from tests.conftest import cli_main
from tests.test_train import read_metrics, tiny_config


@pytest.fixture(scope='module')
def tokenizer(sp_model):
  return tokenizers.get(sp_model)


@pytest.fixture(scope='module')
def sources(data_dir):
  return text.text_sources('tiny_shakespeare', data_dir=data_dir)


def test_tokenizer_command_writes_model_vocab_and_record(sp_model, data_dir):
  folder = pathlib.Path(sp_model).parent
  record = json.loads((folder / 'tokenizer.json').read_text())
  assert (record['data'], record['split'], record['vocab_size']) == ('tiny_shakespeare', 'train',
                                                                       512)
  splits = text.load_text_splits('tiny_shakespeare', data_dir=data_dir)
  assert record['train_characters'] == len(splits['train'])  # learnt from the training split only
  assert record['command'].startswith('moe-jax tokenizer --data=tiny_shakespeare')
  assert record['options']['byte_fallback'] and record['options']['input_sentence_size']
  assert len((folder / 'tokenizer.vocab').read_text().splitlines()) == 512


def test_sentencepiece_is_lossless_and_counts_bytes(tokenizer, data_dir):
  held_out = text.load_text_splits('tiny_shakespeare', data_dir=data_dir)['validation']
  ids = tokenizer.encode(held_out)
  assert tokenizer.vocab_size == 512 and tokenizer.lossless
  assert tokenizer.decode(ids) == held_out  # nothing normalized, nothing unknown
  assert int(tokenizer.piece_bytes[ids].sum()) == len(held_out.encode('utf-8'))
  assert len(ids) < 0.7 * len(held_out)  # pieces longer than a byte on average
  assert tokenizer.eos_id is not None and tokenizer.eos_id not in ids
  assert tokenizer.piece_bytes[tokenizer.eos_id] == 0
  accented = 'Café — naïve 中文\n'  # not in Shakespeare: byte fallback, still exact
  assert tokenizer.decode(tokenizer.encode(accented)) == accented
  assert int(tokenizer.piece_bytes[tokenizer.encode(accented)].sum()) == len(accented.encode())


def test_tokenizer_command_errors_name_its_flags(tmp_path, capsys):
  assert cli_main(['moe-jax', 'tokenizer', '--data=no_such_set', f'--out={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert err.startswith('moe-jax tokenizer: --data=') and len(err.splitlines()) == 1
  assert cli_main(['moe-jax', 'tokenizer', '--data=tiny_shakespeare', '--vocab_size=100',
                   f'--out={tmp_path}']) == 2
  assert '--vocab_size=100 is too small' in capsys.readouterr().err


def test_vocab_size_follows_the_tokenizer(sp_model, data_dir):
  config = tiny_config(data_dir)
  assert transformer.from_config(config)[0].vocab_size == 256
  config.data.tokenizer = sp_model
  assert transformer.from_config(config)[0].vocab_size == 512
  config.model.unlock()
  config.model.vocab_size = 300  # a config that sets one must hold every id
  with pytest.raises(ValueError, match=r'config.model.vocab_size=300 is smaller than the '
                     r"tokenizer's 512 ids") as error:
    transformer.from_config(config)
  assert '\n' not in str(error.value)
  config.model.vocab_size = 640  # padded: allowed
  assert transformer.from_config(config)[0].vocab_size == 640
  config.data.tokenizer = str(pathlib.Path(sp_model).parent / 'missing.model')
  with pytest.raises(ValueError, match='config.data.tokenizer=.*moe-jax tokenizer'):
    transformer.from_config(config)


def test_rows_pack_whole_documents_from_disjoint_examples(tokenizer, sources):
  train_split = sources['train']
  rows = pipeline.PackedRows(train_split, tokenizer, rows=range(4), num_rows=4, length=257,
                             seed=0)
  assert [rows.ranges[g] for g in range(4)] == [pipeline.row_range(g, 4, len(train_split))
                                                for g in range(4)]
  covered = [i for g in range(4) for i in range(*rows.ranges[g])]
  assert covered == list(range(len(train_split)))  # disjoint, and every example has a row
  batches = np.stack([next(rows) for _ in range(40)])  # [40, 4, 257]
  assert batches.dtype == np.int32 and batches.shape == (40, 4, 257)
  for g in range(4):
    stream = batches[:, g].reshape(-1)
    documents = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id) + 1)[:-1]
    assert len(documents) >= 2
    start, stop = rows.ranges[g]
    examples = {tuple(pipeline._tokenize(tokenizer, train_split[i])['tokens']): i
                for i in range(start, stop)}
    read = [examples[tuple(doc)] for doc in documents]  # each a whole example of its range
    assert len(set(read)) == len(read)  # shuffled, without repeats within an epoch
  assert read != list(range(start, start + len(read)))  # shuffled, not in file order


def _sharding(devices=8):
  return NamedSharding(Mesh(np.array(jax.devices()[:devices]), ('data',)), P('data'))


def _make_rows(tokenizer, source, length=65, seed=0, num_rows=8):
  return lambda rows: pipeline.PackedRows(source, tokenizer, rows=rows, num_rows=num_rows,
                                          length=length, seed=seed)


def test_resumed_reader_gives_the_uninterrupted_batches(tokenizer, sources, tmp_path):
  make = _make_rows(tokenizer, sources['train'])
  straight = pipeline.StreamFeed(make, _sharding(), 8, 65)
  want = [np.asarray(straight.batch(i)) for i in range(12)]
  assert not np.array_equal(want[0], want[1])

  first = pipeline.StreamFeed(make, _sharding(), 8, 65)
  for i in range(6):  # a Ctrl-C during step 6 checkpoints step 5
    np.testing.assert_array_equal(np.asarray(first.batch(i)), want[i])
  first.save(tmp_path, 5)
  assert (tmp_path / 'data_state' / '5' / 'process_0-of-1.json').is_file()
  resumed = pipeline.StreamFeed(make, _sharding(), 8, 65)
  resumed.restore(tmp_path, 5)
  for i in range(5, 12):
    np.testing.assert_array_equal(np.asarray(resumed.batch(i)), want[i])  # bit for bit

  # Saved by two hosts (rows 0-3 and 4-7, a file each), resumed by one: the rows' states merge.
  halves = [pipeline.PackedRows(sources['train'], tokenizer, rows=rows, num_rows=8, length=65,
                                seed=0) for rows in (range(4), range(4, 8))]
  for _ in range(3):
    for half in halves:
      next(half)
  folder = tmp_path / 'data_state' / '3'
  folder.mkdir(parents=True)
  for p, half in enumerate(halves):
    (folder / f'process_{p}-of-2.json').write_text(json.dumps(half.get_state()))
  elastic = pipeline.StreamFeed(make, _sharding(4), 8, 65)  # one process, another device count
  elastic.restore(tmp_path, 3)
  for i in range(3, 6):
    np.testing.assert_array_equal(np.asarray(elastic.batch(i)), want[i])

  with pytest.raises(FileNotFoundError, match='no input pipeline state for the checkpoint of '
                     'step 7'):
    pipeline.StreamFeed(make, _sharding(), 8, 65).restore(tmp_path, 7)
  state = json.loads((folder / 'process_0-of-2.json').read_text())
  (folder / 'process_0-of-2.json').write_text(json.dumps({**state, 'tokenizer': 'sha256:0'}))
  with pytest.raises(ValueError, match='tokenizer sha256:0, this run.s is sha256:'):
    pipeline.StreamFeed(make, _sharding(4), 8, 65).restore(tmp_path, 3)
  with pytest.raises(ValueError, match='batches of 8 rows, this run.s of 16'):
    pipeline.StreamFeed(_make_rows(tokenizer, sources['train'], num_rows=16), _sharding(), 16,
                        65).restore(tmp_path, 5)


def test_interrupted_and_resumed_training_equals_one_run(sp_model, data_dir, tmp_path,
                                                         monkeypatch):
  """Two segments of a tokenized run (Ctrl-C during step 6, then the same command) see exactly
  the batches of one uninterrupted run and log the same losses; held-out bits per byte are the
  eval loss over ln 2 times the scored text's bytes per token."""
  config = tiny_config(data_dir, **{'data.seq_len': 16, 'train.steps': 8})
  config.data.tokenizer = sp_model
  seen, interrupt = [], [None]
  real_batch = pipeline.StreamFeed.batch

  def batch(self, step):
    placed = real_batch(self, step)
    seen.append((step, np.asarray(placed)))
    if step == interrupt[0]:
      raise KeyboardInterrupt
    return placed

  monkeypatch.setattr(pipeline.StreamFeed, 'batch', batch)
  summary = train.train(config, tmp_path / 'straight')
  want = dict(seen)
  assert sorted(want) == list(range(8))
  expected = read_metrics(tmp_path / 'straight')

  seen[:], interrupt[0] = [], 5
  with pytest.raises(train.Interrupted, match='interrupted at step 5'):
    train.train(config, tmp_path / 'resumed')
  assert sorted((tmp_path / 'resumed' / 'data_state').iterdir())[-1].name == '5'
  interrupt[0] = None
  resumed = train.train(config, tmp_path / 'resumed')
  assert resumed['resumed_from_step'] == 5
  assert [step for step, _ in seen] == [0, 1, 2, 3, 4, 5, 5, 6, 7]  # batch 5 read again
  for step, got in seen:
    np.testing.assert_array_equal(got, want[step])
  got = read_metrics(tmp_path / 'resumed')
  assert [r['step'] for r in got] == list(range(1, 9))
  final = [ocp.StandardCheckpointer().restore(tmp_path / run / 'checkpoints/8/default')
           for run in ('straight', 'resumed')]
  for a, b in zip(*(jax.tree.leaves(state) for state in final)):
    np.testing.assert_array_equal(a, b)  # the same model, bit for bit
  for mine, theirs in zip(got, expected):
    for key in set(mine) - {'tokens_per_s'}:
      np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-6, err_msg=key)

  # Bits per byte, from the held-out targets' bytes counted here by decoding them.
  data = tasks.LM.load(config)
  tokenizer = tokenizers.get(sp_model)
  targets = np.stack(data.eval_batches)[..., 1:]
  text_bytes = sum(len(tokenizer.decode(row).encode()) for row in targets.reshape(-1, 16))
  nats = summary['eval_loss'] * targets.size
  assert summary['eval_bits_per_byte'] == pytest.approx(nats / (math.log(2) * text_bytes),
                                                        rel=1e-6)
  assert 'eval_bits_per_byte' in expected[-1] and resumed['eval_bits_per_byte'] == pytest.approx(
      summary['eval_bits_per_byte'], rel=1e-6)
  assert summary['eval_bits_per_byte'] < summary['eval_loss'] / math.log(2)  # > 1 byte a token
