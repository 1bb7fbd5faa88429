"""What the paper configs share: `lm` and `vit` build a whole experiment config (one that
`moe-jax train` and `moe-jax plan` accept) from a paper's numbers, and the model families that
more than one config uses: T5 v1.0 (`t5`: T5-Base/Large and Switch-Base/Large) and GLaM's
8B/64E (`glam_8b_64e`: GShard top-2 and expert choice).

Every `config.model` and `config.moe` field is present (at its default unless the paper sets
it), so any can be overridden from the command line. Long-run cadence: a log line every 100
steps, evaluation and a checkpoint every 5,000.
"""
from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from configs import common
from moe_jax.models.transformer import TransformerConfig
from moe_jax.models.vit import ViTConfig
from moe_jax.moe.spec import moe_config
from moe_jax.validate import Section


def every_field(cls, section: str, **overrides) -> ml_collections.ConfigDict:
  """`config.<section>` holding every field of dataclass `cls`: its default, or `overrides`."""
  values = {f.name: f.default for f in dataclasses.fields(cls)}
  Section(section).known(overrides, values)
  return ml_collections.ConfigDict({**values, **overrides})


def _config(task: str, data: dict, model, moe: dict | None, train: dict):
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.deterministic = False
  config.data = ml_collections.ConfigDict(data)
  config.data.manual_dir = config_dict.placeholder(str)
  config.data.data_dir = config_dict.placeholder(str)
  config.model = model
  if moe is not None:
    config.moe = moe_config(**moe)
  config.mesh = common.mesh()
  config.train = common.train(log_every=100, eval_every=5000, eval_batches=8,
                              checkpoint_every=5000, **train)
  return config


def lm(*, data: dict, model: dict, moe: dict | None = None, train: dict,
       arg: str | None = None) -> ml_collections.ConfigDict:
  """An LM config: data = {name, seq_len, batch_size[, input_len]} (an encoder-decoder's
  seq_len counts decoder tokens, input_len encoder tokens), model = `TransformerConfig` fields,
  moe = `MoESpec` fields (None: a dense model), train = `TrainConfig` fields. `arg` (the config
  file's get_config argument) takes no presets."""
  common.parse_arg(arg)
  return _config('lm', data, every_field(TransformerConfig, 'model', **model), moe, train)


def vit(*, data: dict, model: dict, moe: dict | None = None, train: dict,
        arg: str | None = None) -> ml_collections.ConfigDict:
  """A ViT config, as `lm` with `ViTConfig` fields."""
  common.parse_arg(arg)
  return _config('vit', data, every_field(ViTConfig, 'model', **model), moe, train)


# T5 v1.0 (Raffel et al. 2020, section 3.7; the released checkpoints): ReLU FFNs of width 4 d
# (here GELU: the same parameter and FLOP counts; the project has no ReLU FFN), d_kv = 64,
# embeddings tied, SentencePiece vocabulary of 32,128 ids. Switch-Base/Large are built on it.
T5_SIZES = {
    'base': dict(d_model=768, num_layers=12, encoder_layers=12, num_heads=12, d_ff=3072),
    'large': dict(d_model=1024, num_layers=24, encoder_layers=24, num_heads=16, d_ff=4096),
}


def t5(size: str, moe: dict | None = None, arg: str | None = None) -> ml_collections.ConfigDict:
  """T5 v1.0 `size` ('base' | 'large') pre-trained as in the Switch paper: C4, 512 input and 114
  target tokens per sequence (span corruption; here the 114 bytes that follow 512), and the
  protocol it states, 2^20 tokens per batch (2,048 sequences of 512) for 550k steps. With `moe`
  (MoESpec fields) every other FFN of encoder and decoder is an MoE layer (Switch: top-1 of 128
  experts)."""
  return lm(
      data=dict(name='c4/en', input_len=512, seq_len=114, batch_size=2048),
      model=dict(T5_SIZES[size], moe_every=2 if moe else 0, activation='gelu',
                 vocab_size=32128, tie_embeddings=True, dtype='bfloat16'),
      moe=moe,
      # The paper trains with Adafactor (lr 0.01 for 10k steps, then 1 / sqrt(step)), which the
      # project does not have: AdamW here, at a rate that is ours, not the paper's.
      train=dict(steps=550_000, warmup_steps=10_000, learning_rate=1e-3, weight_decay=0.0,
                 clip_norm=1.0),
      arg=arg)


# Switch routing (Fedus et al. 2022, section 2): top-1 token choice in float32, capacity factor
# 1.25 in training, load-balancing loss coefficient 0.01, multiplicative router-input jitter of
# 1e-2, no z-loss (ST-MoE added it later). Tokens claim slots in sequence order, so the decoder
# stays causal (moe_jax/moe/causality.py).
SWITCH_MOE = dict(router='token_choice', num_experts=128, k=1, capacity_factor=1.25,
                  jitter=0.01, load_balancing_coef=0.01, z_loss_coef=0.0, priority='token',
                  activation='gelu')


def switch(size: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Switch-`size`: T5 v1.0 `size` with 128 Switch experts of the dense FFN's width in every
  other FFN."""
  return t5(size, dict(SWITCH_MOE, d_ff=T5_SIZES[size]['d_ff']), arg)


# GLaM 8B/64E (Du et al. 2022, Table 2), the model Zhou et al. 2022 route by expert choice and
# by GShard's top-2 (Table 1): 32 blocks of d 4096, 32 heads of 128, FFNs of width 16,384 (two
# matrices), an MoE FFN of 64 experts in every other block, embeddings tied over a 256K
# SentencePiece vocabulary; sequences of 1,024 tokens, ~1M tokens per batch (1,024 sequences).
GLAM_8B = dict(d_model=4096, num_layers=32, num_heads=32, d_ff=16384, moe_every=2,
               activation='gelu', vocab_size=256_000, tie_embeddings=True, dtype='bfloat16')


def glam_8b_64e(moe: dict, arg: str | None = None) -> ml_collections.ConfigDict:
  """GLaM 8B/64E with `moe`'s routing (64 experts of width 16,384). GLaM's data (1.6T tokens of
  web pages, books, Wikipedia, ...) is not public: C4 stands in. GLaM trains with Adafactor
  (lr 0.01 for 10k steps, then 1 / sqrt(step)), not in the project: AdamW here at our rate.
  Steps: ours (~250B tokens), not the paper's."""
  return lm(data=dict(name='c4/en', seq_len=1024, batch_size=1024), model=GLAM_8B,
            moe=dict(num_experts=64, d_ff=16384, activation='gelu', **moe),
            train=dict(steps=250_000, warmup_steps=10_000, learning_rate=3e-4,
                       weight_decay=0.0, clip_norm=1.0),
            arg=arg)
