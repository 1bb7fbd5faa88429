"""The LM's variants that paper configs need: grouped-query and latent attention, dense first
blocks, tied embeddings, the encoder-decoder. Each is causal where it must be, and the
encoder-decoder reads its batches and takes its loss as documented. (Their parameter counts are
checked against the built models in tests/test_paper_configs.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_tiny
from moe_jax.run import tasks

VARIANTS = {  # dense: routing's causality is tests/test_causality.py's
    'latent': dict(model=dict(kv_lora_rank=16, q_lora_rank=24, rope_head_dim=8, head_dim=16)),
    'encoder_decoder': dict(model=dict(encoder_layers=1, num_heads=4, num_kv_heads=2,
                                       tie_embeddings=True, vocab_size=300),
                            data=dict(input_len=12)),  # grouped-query self- and cross-attention
}


def tiny(name: str):
  config = lm_tiny.get_config()
  config.data.update(seq_len=16, batch_size=2)
  config.model.update(d_model=32, num_layers=1, num_heads=2, d_ff=64, moe_every=0)
  for section, values in VARIANTS[name].items():
    config[section].update(values)
  return config


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_no_logit_moves_when_later_tokens_change(name):
  """Tokens from a decoder position t on replaced: the logits before t stay, those after move (an
  encoder-decoder's encoder input is all 'earlier'). Each sequence is routed alone, so the
  original and the changed rows go through the model as one batch."""
  config = tiny(name)
  task = tasks.of(config)
  model, inputs = task.build(config), task.input_spec(config)
  tokens = jax.random.randint(jax.random.key(0), inputs.shape, 0, 256)
  changed = tokens.at[:, -6:].set((tokens[:, -6:] + 1) % 256)

  @jax.jit
  def logits(key, both):
    return model.apply(model.init(key, both), both)[0]

  before, after = jnp.split(logits(jax.random.key(1), jnp.concatenate([tokens, changed])), 2)
  np.testing.assert_array_equal(before[:, :-6], after[:, :-6])
  assert not np.allclose(before[:, -6:], after[:, -6:])


def test_encoder_decoder_batches_and_loss(data_dir):
  """An encoder-decoder's batches are windows of input_len + seq_len + 1 bytes, its inputs all
  but the last, its loss over the seq_len decoder positions (the bytes after the encoder's)."""
  config = tiny('encoder_decoder')
  config.data.update(data_dir=data_dir, input_len=12, seq_len=16)
  task = tasks.of(config)
  data = task.load(config)
  batch = data.train_batch(0)
  assert batch.shape == (2, 12 + 16 + 1) and data.eval_batches[0].shape == batch.shape
  assert task.inputs(batch).shape == task.input_spec(config).shape
  targets = jax.nn.one_hot(batch[:, 13:], 300) * 1e4  # logits that predict the decoder bytes
  loss, _ = task.loss(targets, batch)
  assert float(loss) < 1e-3


def test_encoder_decoder_needs_its_input_length():
  config = tiny('encoder_decoder')
  config.data.input_len = 0
  with pytest.raises(ValueError, match=r'config\.data\.input_len=0'):
    tasks.of(config).build(config)
