"""What the paper configs share: `lm` and `vit` build a whole experiment config (one that
`moe-jax train` and `moe-jax plan` accept) from a paper's numbers, and the model families that
more than one config uses: T5 v1.0 (`t5`: T5-Base/Large and Switch-Base/Large) and GLaM's
8B/64E (`glam_8b_64e`: GShard top-2 and expert choice).

Every `config.model` and `config.moe` field is present (at its default unless the paper sets
it), so any can be overridden from the command line. Long-run cadence: a log line every 100
steps, evaluation and a checkpoint every 5,000.
"""
from __future__ import annotations

import copy
import dataclasses
import math

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
  seq_len counts decoder tokens, input_len encoder tokens; the tokenizer is bytes unless data
  names one), model = `TransformerConfig` fields, moe = `MoESpec` fields (None: a dense model),
  train = `TrainConfig` fields. `arg` (the config file's get_config argument): the presets
  `scale=cpu` and `scale=gpu` (`with_scale`)."""
  return with_scale(_config('lm', {'tokenizer': 'bytes', **data},
                            every_field(TransformerConfig, 'model', **model), moe, train), arg)


def vit(*, data: dict, model: dict, moe: dict | None = None, train: dict,
        arg: str | None = None) -> ml_collections.ConfigDict:
  """A ViT config, as `lm` with `ViTConfig` fields."""
  return with_scale(_config('vit', data, every_field(ViTConfig, 'model', **model), moe, train),
                    arg)


def with_scale(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`config` with the preset `arg` names: '' none, 'scale=cpu' `cpu_scale`, 'scale=gpu'
  `gpu_scale`; anything else a one-line ValueError naming the choices."""
  scale = common.parse_arg(arg, scale='').scale
  if scale:
    {'cpu': cpu_scale, 'gpu': gpu_scale}[common.check_scale(scale)](config)
  return config


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


# --- Presets: `--config configs/papers/<name>.py:scale=cpu` or `:scale=gpu` ---------------------

CPU_WIDTH = dict(d_model=64, num_heads=2, d_ff=128)  # the dense FFN: 2 d
CPU_LATENT = dict(head_dim=16, rope_head_dim=8, q_lora_rank=32, kv_lora_rank=16)  # MLA, when set
CPU_EXPERTS = 8
GPU_TOKENS = 32_768  # tokens per device and step the gpu preset starts from
GPU_BATCH_CAP = {'lm': 16, 'vit': 128}
# The share of an H100's 80 GB a gpu preset may plan for: 1.2x below the 90% that `moe-jax train`
# lets JAX take. The plan is an estimate: on an H100 the peaks of four paper members (two of them
# presets) came out at 0.94x to 1.01x of it, but XLA's activations came out at 1.3x and 0.9x of its
# estimate in two of them, and activations are most of some presets.
GPU_PRESET_SHARE = 0.75
GPU_VOCAB = 32_768  # the vocabulary a gpu preset falls back to when the paper's does not fit
GPU_MIN_SEQ_LEN = 512


def _shallowest(model) -> int:
  """Blocks of the shallowest member: the dense first blocks (at most one) and one period of the
  MoE pattern (`moe_every` blocks, the last an MoE block), at least 2."""
  return max(2, min(model.first_dense_layers, 1) + model.moe_every)


def _fit_groups(moe, num_experts: int) -> None:
  """moe at `num_experts`, its expert groups dividing them and k reachable: num_expert_groups
  divides num_experts (halved, and groups_per_token with it, until it does), k at most the
  experts a token's groups hold."""
  groups, per_token = moe.num_expert_groups, moe.groups_per_token
  while groups > 1 and num_experts % groups:
    groups, per_token = groups // 2, max(1, per_token // 2)
  moe.update(num_experts=num_experts, num_expert_groups=groups, groups_per_token=per_token)
  moe.k = min(moe.k, per_token * num_experts // groups)


def cpu_scale(config: ml_collections.ConfigDict) -> None:
  """The paper config's family at a test's size, in place: the same router, k, capacity factor or
  dropless dispatch, shared experts, expert groups, bias, attention kind, encoder-decoder or not,
  dense first blocks, tied embeddings and activation; d 64, 2 heads (grouped-query: 1 K/V head;
  latent attention: small ranks), dense FFN 128, experts of the paper's expert-to-dense width
  ratio (16 to 128 wide), at most CPU_EXPERTS experts (k and the expert groups follow:
  `_fit_groups`), the shallowest member (`_shallowest`), float32; Tiny Shakespeare bytes (batch 8
  of 32 tokens, 32 encoder tokens; routed by position across the batch, 8 x as many sequences as
  one slot per expert needs, so that each of 8 devices' groups has one) or the 8x8 digits (batch 8,
  patches of 2); 3 steps, 1 of warm-up, one evaluation batch and one checkpoint at the end."""
  model, data, lm = config.model, config.data, config.task == 'lm'
  ratio = config.moe.d_ff / model.d_ff if 'moe' in config else 1.0
  grouped_query = lm and 0 < model.num_kv_heads < model.num_heads
  model.first_dense_layers = min(model.first_dense_layers, 1)
  model.num_layers = _shallowest(model)
  model.update(dtype='float32', **CPU_WIDTH)
  if lm:
    model.encoder_layers = model.num_layers if model.encoder_layers else 0
    model.num_kv_heads = 1 if grouped_query else 0
    if model.kv_lora_rank:
      model.update(CPU_LATENT)
    model.vocab_size = 256
    data.update(name='tiny_shakespeare', seq_len=32, batch_size=8)
    if data.get('input_len'):
      data.input_len = 32
  else:
    model.patch_size = 2
    data.update(name='digits', batch_size=8)
  if 'moe' in config:
    config.moe.d_ff = int(min(128, max(16, round(CPU_WIDTH['d_ff'] * ratio / 8) * 8)))
    _fit_groups(config.moe, min(config.moe.num_experts, CPU_EXPERTS))
    moe = config.moe
    if moe.group_by == 'position' and moe.capacity_factor:  # a group: one position per device
      per_token = moe.capacity_factor * (1 if moe.router == 'expert_choice' else moe.k)
      data.batch_size = 8 * math.ceil(moe.num_experts / per_token)
  config.train.update(steps=3, warmup_steps=1, log_every=1, eval_every=0, eval_batches=1,
                      checkpoint_every=0, progress=False)


def _plan(config):
  from moe_jax.run import memory_plan  # noqa: PLC0415 (not at import: configs load cheaply)
  return memory_plan.make_plan(config)


def gpu_fits(config) -> tuple[bool, float]:
  """(the config needs at most GPU_PRESET_SHARE of an H100 by `moe-jax plan`'s count, its GPU
  bytes per device)."""
  plan = _plan(config)
  return plan.fits(GPU_PRESET_SHARE)['H100'], plan.total('gpu')


def gpu_scale(config: ml_collections.ConfigDict) -> list[str]:
  """The largest member of the paper config's family that trains on one 80 GB GPU, in place, by
  `moe-jax plan`'s count (`moe_jax.run.memory_plan`, nothing allocated): bf16 compute, widths,
  experts and routing kept, one device (config.mesh 1 x 1), a batch of GPU_TOKENS tokens (at most
  16 sequences or 128 images); then, until the plan needs at most GPU_PRESET_SHARE of an H100, in
  this order: fewer blocks (decoder and encoder alike, the MoE pattern kept, down to one MoE block
  past the dense first blocks, then fewer of those, down to one), fewer experts (halved, down to
  twice the experts a token takes: k, or expert choice's capacity factor; k and the expert groups
  kept), a smaller batch (halved, down to 1), a vocabulary of GPU_VOCAB (the bytes tokenizer uses
  256 ids; a SentencePiece model of up to that many fits it), shorter sequences (halved, down to
  GPU_MIN_SEQ_LEN). The data name stays the paper's. Returns what was reduced, in words ('field
  before -> after'); a ValueError if nothing fits."""
  model, data, lm = config.model, config.data, config.task == 'lm'
  model.dtype = 'bfloat16'
  config.mesh.update(data=1, expert=1)
  tokens = (data.seq_len + data.get('input_len', 0)) if lm else _vit_tokens(config)
  full = dict(num_layers=model.num_layers, first_dense_layers=model.first_dense_layers,
              encoder_layers=model.get('encoder_layers', 0),
              num_experts=config.moe.num_experts if 'moe' in config else 0,
              batch_size=data.batch_size, vocab_size=model.get('vocab_size', 0),
              seq_len=data.get('seq_len', 0))
  data.batch_size = max(1, min(GPU_BATCH_CAP[config.task],
                               2 ** int(math.log2(max(1, GPU_TOKENS // tokens)))))
  done = []

  def fits():
    return gpu_fits(config)[0]

  # Depth: the largest number of blocks that fits (memory grows with depth): fewer MoE periods,
  # then fewer dense first blocks (down to one).
  low, period = model.first_dense_layers, max(1, model.moe_every)
  depths = [(depth, low) for depth in range(model.num_layers, low + period - 1, -period)]
  depths += [(dense + period, dense) for dense in range(low - 1, 0, -1)]
  for depth, dense in depths:
    model.first_dense_layers = dense
    _set_depth(model, depth, full)
    if fits():
      break
  while 'moe' in config and not fits():
    trial = copy.deepcopy(config.moe)
    _fit_groups(trial, trial.num_experts // 2)
    per_token = trial.capacity_factor if trial.router == 'expert_choice' else trial.k
    if trial.num_experts < 2 * max(1, per_token) or trial.k < config.moe.k:
      break  # k kept, and twice as many experts (a choice left to route), the groups kept
    _fit_groups(config.moe, trial.num_experts)
  while not fits() and data.batch_size > 1:
    data.batch_size //= 2
  if lm and not fits() and model.vocab_size > GPU_VOCAB:
    model.vocab_size = GPU_VOCAB
  while lm and not fits() and data.seq_len > GPU_MIN_SEQ_LEN:
    data.seq_len //= 2
  if not fits():
    raise ValueError('scale=gpu: no member of this family fits one 80 GB GPU')
  for name, before in full.items():
    section = data if name in ('batch_size', 'seq_len') else (
        config.get('moe') or {} if name == 'num_experts' else model)
    after = section.get(name, 0)
    if after != before:
      done.append(f'{name} {before:,} -> {after:,}')
  return done


def _set_depth(model, depth: int, full: dict) -> None:
  model.num_layers = depth
  if full['encoder_layers']:
    model.encoder_layers = max(1, round(full['encoder_layers'] * depth / full['num_layers']))


def _vit_tokens(config) -> int:
  """Patches per image of the paper's ViT data (224 x 224 for imagenet2012; the images of the
  data set are not read)."""
  side = 224 // config.model.patch_size
  return side * side + 1
