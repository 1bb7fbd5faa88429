"""Transformer LM with MoE FFNs: decoder-only (the default) or encoder-decoder (T5, Switch).

tokens [B, L] -> embed (V = vocab_size: 256 bytes by default) -> num_layers pre-norm blocks ->
RMSNorm -> unembed -> logits [B, L, V]. A block is x += attn(norm(x)); x += ffn(norm(x)), with
causal self-attention using rotary position embeddings (RoPE). Block i holds an MoE FFN
(`MoELayer`) when `flops.is_moe_block(i, moe_every, first_dense_layers)`, else a dense
`FeedForward` of width d_ff; moe_every=0 is a dense model.

Attention: multi-head (num_kv_heads=0); grouped-query (0 < num_kv_heads < num_heads, e.g.
Mixtral's 8 KV heads), K and V heads shared by num_heads / num_kv_heads query heads; or multi-head
latent attention (kv_lora_rank > 0: DeepSeek-V2/V3's MLA), keys and values up-projected from a
rank-kv_lora_rank latent (queries from a rank-q_lora_rank one when q_lora_rank > 0), RoPE on
rope_head_dim extra query/key dims whose key part all heads share. head_dim (0: d_model /
num_heads) is the size of a head's query/key and value.

Encoder-decoder (encoder_layers > 0, `Transformer.input_len` > 0): tokens [B, input_len + L];
the first input_len pass through encoder_layers bidirectional blocks and an RMSNorm, the last L
through num_layers decoder blocks that attend to the encoder output (cross-attention, after
self-attention); the logits are the decoder's [B, L, V]. T5's relative position bias is replaced
by RoPE in self-attention; cross-attention has no position encoding, as in T5.

The unembedding is a separate [d, V] matrix, or the embedding's transpose with tie_embeddings
(T5 v1.0, GLaM).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import reproducibility
from moe_jax.data import tokenizers
from moe_jax.data.text import VOCAB_SIZE
from moe_jax.models import REMATS, Stack, ffn, run_blocks
from moe_jax.moe import causality, experts, flops
from moe_jax.moe.experts import ACTIVATIONS
from moe_jax.moe.spec import MoESpec
from moe_jax.validate import Section, section_values

DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')
MODEL = Section('model')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The LM's shape (`config.model`); the MoE FFN is described separately by a `MoESpec`."""
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 512
  moe_every: int = 2
  activation: str = 'swiglu'
  dtype: str = 'float32'
  rope_base: float = 10_000.0
  attention: str = 'auto'  # 'auto': cuDNN's fused kernel on GPU in bf16/fp16, else 'xla'
  allow_future_leak: bool = False  # True lets routing that sees later tokens build (to study it)
  vocab_size: int = VOCAB_SIZE  # bytes; a paper config sets its tokenizer's size
  tie_embeddings: bool = False  # unembedding = embedding transpose
  first_dense_layers: int = 0  # blocks before the first MoE one are dense (DeepSeekMoE)
  num_kv_heads: int = 0  # 0: num_heads (multi-head); fewer: grouped-query attention
  head_dim: int = 0  # 0: d_model // num_heads
  q_lora_rank: int = 0  # MLA: rank of the query latent (0: full-rank queries)
  kv_lora_rank: int = 0  # > 0: multi-head latent attention with a latent of this rank
  rope_head_dim: int = 0  # MLA: RoPE dims per head, beside head_dim
  encoder_layers: int = 0  # > 0: an encoder-decoder with this many encoder blocks
  remat: str = 'none'  # per block: 'none', 'full' or a jax.checkpoint_policies name (REMATS)

  def __post_init__(self):
    check_block_stack(self, ('d_model', 'num_layers', 'num_heads', 'd_ff', 'vocab_size'))
    for name in ('first_dense_layers', 'num_kv_heads', 'head_dim', 'q_lora_rank', 'kv_lora_rank',
                 'rope_head_dim', 'encoder_layers'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        MODEL.fail(name, value, 'use 0 (off / the default) or a positive integer')
    if self.num_heads % self.kv_heads:
      MODEL.fail('num_kv_heads', self.num_kv_heads, f'it must divide num_heads={self.num_heads}')
    if self.latent:
      if not self.rope_head_dim or self.rope_head_dim % 2 or self.num_kv_heads:
        MODEL.fail('rope_head_dim', self.rope_head_dim, 'latent attention (kv_lora_rank > 0) '
                   'needs an even rope_head_dim > 0 and num_kv_heads=0')
    else:
      for name in ('q_lora_rank', 'rope_head_dim'):
        if getattr(self, name):
          MODEL.fail(name, getattr(self, name), 'it belongs to latent attention: set '
                     'kv_lora_rank > 0 too, or leave it 0')
      if self.head_size % 2:
        MODEL.fail('num_heads', self.num_heads, f'RoPE needs an even head size, and it is '
                   f'{self.head_size}; pick num_heads (or head_dim) so that it is even')
    if self.rope_base <= 0:
      MODEL.fail('rope_base', self.rope_base, 'use a positive base (10000 is standard)')
    MODEL.one_of('attention', self.attention, ATTENTION_IMPLEMENTATIONS)

  @property
  def head_size(self) -> int:
    """Query/key (without MLA's RoPE dims) and value size of a head."""
    return self.head_dim or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def latent(self) -> bool:
    """Multi-head latent attention (MLA)."""
    return self.kv_lora_rank > 0

  def is_moe(self, block: int) -> bool:
    """Block `block` of a stack (decoder or encoder) holds an MoE FFN."""
    return flops.is_moe_block(block, self.moe_every, self.first_dense_layers)

  def num_tokens(self, input_shape) -> int:
    """Tokens per example: a sequence of shape [L] is L tokens (encoder and decoder together)."""
    return input_shape[0]

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'TransformerConfig':
    """From `config.model` (dict or ConfigDict), rejecting unknown fields."""
    return cls(**section_values(cls, 'model', config))


def check_block_stack(cfg, positive: tuple[str, ...]) -> None:
  """The checks every model config (LM, ViT) shares, naming the bad `config.model` field: the
    `positive` fields are positive ints, num_heads divides d_model, moe_every is 0 or leaves at
    least one MoE block past first_dense_layers, and activation, dtype and remat are known."""
  for name in positive:
    MODEL.positive(name, getattr(cfg, name))
  if cfg.d_model % cfg.num_heads:
    MODEL.fail('num_heads', cfg.num_heads, f'it must divide d_model={cfg.d_model}')
  if not isinstance(cfg.moe_every, int) or cfg.moe_every < 0:
    MODEL.fail('moe_every', cfg.moe_every, 'use 0 (dense) or a positive integer')
  if cfg.moe_every and not flops.moe_blocks(cfg.num_layers, cfg.moe_every,
                                            cfg.first_dense_layers):
    MODEL.fail('moe_every', cfg.moe_every, f'with num_layers={cfg.num_layers} and '
               f'first_dense_layers={cfg.first_dense_layers} no block would be MoE; use '
               'moe_every <= num_layers - first_dense_layers, or 0 for a dense model')
  MODEL.one_of('activation', cfg.activation, ACTIVATIONS)
  MODEL.one_of('dtype', cfg.dtype, DTYPES)
  MODEL.one_of('remat', cfg.remat, REMATS)


def model_and_spec(model_cls, config):
  """(model_cls.from_config(config.model), MoESpec of config.moe, or None for a dense model)."""
  model = model_cls.from_config(config.model)
  spec = MoESpec.from_config(config.moe) if 'moe' in config else None
  if model.moe_every and spec is None:
    raise ValueError(f'config.model.moe_every={model.moe_every} needs a config.moe section; add '
                     'one or set moe_every=0 for a dense model.')
  return model, spec if model.moe_every else None


def from_config(config) -> tuple[TransformerConfig, MoESpec | None]:
  """(model config, MoE spec or None for a dense model) from a full experiment config. The
  vocabulary follows the tokenizer (`config.data.tokenizer`) unless config.model sets one, which
  must then hold every id (`tokenizers.check_vocab`)."""
  model, spec = model_and_spec(TransformerConfig, config)
  if 'data' in config and config.data.get('tokenizer', tokenizers.BYTES) != tokenizers.BYTES:
    vocab = tokenizers.check_vocab(config, model.vocab_size, 'vocab_size' in config.model)
    model = dataclasses.replace(model, vocab_size=vocab)
  return model, spec


def input_len(config) -> int:
  """Encoder tokens per example, `config.data.input_len` (0, or absent: a decoder-only LM)."""
  return config.data.get('input_len', 0) or 0


def logical(names: tuple[str | None, ...], init=nn.initializers.lecun_normal()):
  """`init` (flax's Dense default) with its dims named logically (`moe_jax.parallel.rules`)."""
  return experts.logical(init, names)


def rms_norm(dtype, name: str) -> nn.RMSNorm:
  """An RMSNorm whose scale is named ('norm',): replicated."""
  return nn.RMSNorm(dtype=dtype, scale_init=logical(('norm',), nn.initializers.ones), name=name)


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (rotate-half form). x: [B, L, H, D] -> [B, L, H, D]."""
  length, dim = x.shape[1], x.shape[-1]
  freqs = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [D/2]
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs  # [L, D/2]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_implementation(requested: str, dtype, head_dim: int) -> str:
  """'xla' or 'cudnn' for `requested` ('auto' | 'xla' | 'cudnn'). 'auto' picks cuDNN's fused
  flash kernel where it applies (GPU, bf16/fp16, head size a multiple of 8 up to 128): it never
  materializes the [L, L] scores and skips the masked half. Elsewhere, and under XLA's
  deterministic ops (config.deterministic: with them cuDNN's kernel fails to compile in jax 0.11.2),
  XLA's softmax attention."""
  if requested != 'auto':
    return requested
  fused_ok = (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim % 8 == 0 and head_dim <= 128
              and not reproducibility.deterministic_flag_set())
  return 'cudnn' if fused_ok else 'xla'


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = 'xla',
           causal: bool = True) -> jax.Array:
  """Softmax attention, scale 1/sqrt(Dq), causal or not. q [B, Lq, H, Dq], k [B, Lk, H, Dq],
  v [B, Lk, H, Dv] -> [B, Lq, H, Dv].

  implementation: 'xla' (softmax in float32 over the [B, H, Lq, Lk] scores, masked when causal)
  or 'cudnn' (fused flash attention; GPU, bf16/fp16 only).
  """
  if implementation == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='cudnn')
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  if causal:
    mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


causal_attention = attend  # causal by default: the decoder's self-attention


class Attention(nn.Module):
  """Multi-head or grouped-query attention. x: [B, L, d] -> [B, L, d].

  Self-attention with RoPE on queries and keys (causal unless `causal=False`), or, given
  `memory` [B, M, d], cross-attention to it with no position encoding.
  """
  config: TransformerConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x, memory=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    heads, kv_heads, size = cfg.num_heads, cfg.kv_heads, cfg.head_size
    dense = lambda shape, name, y, names: nn.DenseGeneral(
        shape, use_bias=False, dtype=dtype, kernel_init=logical(names), name=name)(y)
    source = x if memory is None else memory
    q = dense((heads, size), 'query', x, ('embed', 'heads', 'kv'))  # [B, L, H, D]
    k, v = (dense((kv_heads, size), name, source, ('embed', 'kv_heads', 'kv'))
            for name in ('key', 'value'))
    k, v = (jnp.repeat(y, heads // kv_heads, axis=2) for y in (k, v))  # shared by query groups
    if memory is None:
      q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
    implementation = attention_implementation(cfg.attention, dtype, size)
    q, k, v = (nn.with_logical_constraint(y, ('batch', 'length', 'heads', 'kv'))
               for y in (q, k, v))
    out = attend(q, k, v, implementation, causal=self.causal and memory is None)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=dtype,
                           kernel_init=logical(('heads', 'kv', 'embed')), name='out')(out)


class LatentAttention(nn.Module):
  """Multi-head latent attention (DeepSeek-V2/V3), causal. x: [B, L, d] -> [B, L, d].

  Keys and values come up from a latent c_kv = norm(x W_kv_down[:, :r]) of rank r =
  kv_lora_rank; queries from norm(x W_q_down) of rank q_lora_rank (or x W_query when it is 0).
  Each head's query and key have head_dim dims without position encoding and rope_head_dim with
  RoPE; the RoPE key part x W_kv_down[:, r:] is one for all heads. Run as plain attention (keys
  and values materialized, not absorbed into the queries): training's form.
  """
  config: TransformerConfig
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    heads, size, rope_size, rank = (cfg.num_heads, cfg.head_size, cfg.rope_head_dim,
                                    cfg.kv_lora_rank)
    dense = lambda shape, name, y, names: nn.DenseGeneral(
        shape, use_bias=False, dtype=dtype, kernel_init=logical(names), name=name)(y)
    norm = lambda name, y: rms_norm(dtype, name)(y)
    if cfg.q_lora_rank:
      q = dense((heads, size + rope_size), 'q_up',
                norm('q_norm', dense(cfg.q_lora_rank, 'q_down', x, ('embed', 'latent'))),
                ('latent', 'heads', 'kv'))
    else:
      q = dense((heads, size + rope_size), 'query', x, ('embed', 'heads', 'kv'))  # [B, L, H, D + R]
    kv = dense(rank + rope_size, 'kv_down', x, ('embed', 'latent'))  # [B, L, r + R]
    k_rope = rope(kv[..., None, rank:], cfg.rope_base)  # [B, L, 1, R]
    k_v = dense((heads, 2 * size), 'kv_up', norm('kv_norm', kv[..., :rank]),
                ('latent', 'heads', 'kv'))
    k, v = jnp.split(k_v, 2, axis=-1)  # [B, L, H, D] each
    q = jnp.concatenate([q[..., :size], rope(q[..., size:], cfg.rope_base)], axis=-1)
    k = jnp.concatenate([k, jnp.broadcast_to(k_rope, (*k.shape[:-1], rope_size))], axis=-1)
    implementation = 'xla' if cfg.attention == 'auto' else cfg.attention  # Dq != Dv
    out = attend(q, k, v, implementation, causal=self.causal)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=dtype,
                           kernel_init=logical(('heads', 'kv', 'embed')), name='out')(out)


class Block(nn.Module):
  """Pre-norm block: x += attn(norm(x)); [x += cross_attn(norm(x), memory);] x += ffn(norm(x)).
  x: [B, L, d] -> ([B, L, d], aux).

  aux is the MoE layer's aux dict, or None for a dense FFN. causal=False: an encoder block.
  memory [B, M, d] (the encoder output): a decoder block of an encoder-decoder.
  """
  config: TransformerConfig
  spec: MoESpec | None = None
  causal: bool = True

  @nn.compact
  def __call__(self, x, memory=None, *, train: bool = False, token_ids=None):
    """x: [B, L, d]; memory: [B, M, d] encoder output to cross-attend, or None; token_ids: [B, L]
    the tokens of x (hash routing)."""
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    norm = lambda name, y: rms_norm(dtype, name)(y)
    attention = LatentAttention if cfg.latent else Attention
    x = x + attention(cfg, self.causal, name='attention')(norm('attention_norm', x))
    if memory is not None:
      x = x + Attention(cfg, name='cross_attention')(norm('cross_norm', x), memory)
    y, aux = ffn(self, norm('ffn_norm', x), train=train, token_ids=token_ids)
    return x + y, aux


class Transformer(nn.Module):
  """The LM. tokens [B, L] int (an encoder-decoder's: [B, input_len + L]) -> (logits [B, L, V]
  float32, aux).

  aux: as `models.run_blocks` (an encoder-decoder's layers are named 'encoder_block_i' and
  'block_i'). Training with a router that has jitter or noise needs the 'router' RNG stream;
  aux-loss-free balancing needs `mutable=['router_bias']` (see `MoELayer`). Weights name their
  dims logically (embed, heads, kv, mlp, vocab, exp); on a mesh (`sharding.shard_module`) the
  rules of `moe_jax.parallel.rules` shard them and the MoE layers run under `jax.shard_map`.

  Building one whose routing can see later tokens raises ValueError naming the `config.moe`
  field (`causality.require_causal`) unless `config.allow_future_leak`.
  """
  config: TransformerConfig
  spec: MoESpec | None = None
  input_len: int = 0  # encoder tokens at the start of each example (encoder-decoder)

  def __post_init__(self):
    if self.config.moe_every:  # refuse routing that sees later tokens, before any tracing
      causality.require_causal(self.spec, self.config.allow_future_leak)
    if bool(self.config.encoder_layers) != bool(self.input_len):
      raise ValueError(f'config.data.input_len={self.input_len} does not fit '
                       f'config.model.encoder_layers={self.config.encoder_layers}: an '
                       'encoder-decoder needs both > 0, a decoder-only LM both 0.')
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    if cfg.moe_every and self.spec is None:
      raise ValueError(f'moe_every={cfg.moe_every} needs a MoESpec; pass spec=, or moe_every=0.')
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, name='embed', embedding_init=logical(
        ('vocab', 'embed'), nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)))
    x = nn.with_logical_constraint(embed(tokens).astype(dtype), ('batch', 'length', None))
    memory, encoder_aux = None, None
    if cfg.encoder_layers:
      memory, encoder_aux = run_blocks(self, functools.partial(Block, causal=False),
                                       x[:, :self.input_len], train=train,
                                       num_layers=cfg.encoder_layers, prefix='encoder_block',
                                       token_ids=tokens[:, :self.input_len])
      memory = rms_norm(dtype, 'encoder_norm')(memory)
      x = x[:, self.input_len:]
    x, aux = run_blocks(self, Block, x, train=train, memory=memory,
                        token_ids=tokens[:, self.input_len:])
    if encoder_aux is not None:
      aux = {'loss': encoder_aux['loss'] + aux['loss'],
             'layers': {**encoder_aux['layers'], **aux['layers']}}
    x = rms_norm(dtype, 'final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, name='unembed',
                        kernel_init=logical(('embed', 'vocab')))(x)
    return logits.astype(jnp.float32), aux


def build(config) -> Transformer:
  """The LM described by a full experiment config (`config.model`, `config.moe`, and
  `config.data.input_len` for an encoder-decoder)."""
  return Transformer(*from_config(config), input_len=input_len(config))


def input_spec(config) -> jax.ShapeDtypeStruct:
  """A batch of the LM's inputs: [batch_size, input_len + seq_len] token ids (`config.data`)."""
  return jax.ShapeDtypeStruct(
      (config.data.batch_size, input_len(config) + config.data.seq_len), jnp.int32)


# ---------------------------------------------------------------------------------------------
# FLOPs and parameters of the whole LM (flops.py counts the FFN layers).
#
# Per token, forward, as executed: 2 x the attention projection weights (Q, K, V, O; MLA's down-
# and up-projections); scores and values 2 * K * H * (Dq + Dv) for K keys (the full score
# matrix, causal mask included); the FFN of each block by `flops.layer_flops`; the unembedding
# 2 * d * V. An encoder-decoder's figure is per token of the whole example, input_len + L: the
# encoder blocks run on the input_len encoder tokens, and so do the K/V projections of every
# decoder block's cross-attention; the decoder blocks (self-attention, cross-attention's Q/O and
# scores over the input_len keys, FFN) and the unembedding on the L decoder tokens. The embedding
# lookup, norms, RoPE and softmaxes are O(d) per token and not counted. Parameters: embedding
# V * d and unembedding V * d (none when tied); per block the attention weights, norm scales
# (d each, and MLA's latent norms) and FFN (`flops.moe_params`); d per final / encoder norm.
# ---------------------------------------------------------------------------------------------


def attention_params(cfg: TransformerConfig, latent: bool | None = None) -> int:
  """Weights of one attention layer (norms not included); latent=False: the multi-head or
  grouped-query form (cross-attention's) whatever cfg.latent says."""
  d, heads, size = cfg.d_model, cfg.num_heads, cfg.head_size
  if not (cfg.latent if latent is None else latent):
    return 2 * d * heads * size + 2 * d * cfg.kv_heads * size  # Q, O; K, V
  qk_size, q_rank, kv_rank = size + cfg.rope_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
  query = d * q_rank + q_rank * heads * qk_size if q_rank else d * heads * qk_size
  return (query + d * (kv_rank + cfg.rope_head_dim) + kv_rank * heads * 2 * size
          + heads * size * d)


def _score_flops(cfg: TransformerConfig, keys: int) -> float:
  """Scores and values of one query token over `keys` keys, every head."""
  return 2.0 * keys * cfg.num_heads * (2 * cfg.head_size + cfg.rope_head_dim)


def _ffn_counts(spec: MoESpec | None, cfg: TransformerConfig, num_layers: int,
                shape: flops.Shape, convention: str) -> tuple[float, int, float]:
  """(FLOPs per token, total params, active params) of the FFNs of a stack of num_layers blocks
  run on `shape`'s token groups."""
  num_moe = flops.moe_blocks(num_layers, cfg.moe_every, cfg.first_dense_layers)
  num_dense = num_layers - num_moe
  total = num_dense * flops.ffn_matrices(cfg.activation) * cfg.d_model * cfg.d_ff
  flop = num_dense * flops.ffn_flops(cfg.d_model, cfg.d_ff, cfg.activation)
  if not num_moe:
    return flop, total, float(total)
  moe_total, moe_active = flops.moe_params(spec, cfg.d_model, shape)
  flop += num_moe * flops.moe_flops(spec, cfg.d_model, shape, convention)
  return flop, total + num_moe * moe_total, total + num_moe * moe_active


def transformer_flops(spec: MoESpec | None, cfg: TransformerConfig, shape: flops.Shape,
                      input_len: int = 0, convention: str = 'executed') -> float:
  """Forward FLOPs per token of the LM by `convention`: shape = (batch, decoder tokens L),
  input_len = encoder tokens (encoder-decoder)."""
  length, d = shape.seq_len, cfg.d_model
  decoder = (cfg.num_layers * (2.0 * attention_params(cfg) + _score_flops(cfg, length))
             + _ffn_counts(spec, cfg, cfg.num_layers, shape, convention)[0]
             + 2.0 * d * cfg.vocab_size)
  if not cfg.encoder_layers:
    return decoder
  inputs = flops.Shape(shape.batch_size, input_len)
  q_o = 2 * d * cfg.num_heads * cfg.head_size  # cross-attention's Q and O weights
  decoder += cfg.num_layers * (2.0 * q_o + _score_flops(cfg, input_len))
  encoder = (cfg.encoder_layers * (2.0 * attention_params(cfg) + _score_flops(cfg, input_len))
             + _ffn_counts(spec, cfg, cfg.encoder_layers, inputs, convention)[0]
             + cfg.num_layers * 2.0 * (attention_params(cfg, latent=False) - q_o))  # cross K, V
  return (input_len * encoder + length * decoder) / (input_len + length)


def transformer_params(spec: MoESpec | None, cfg: TransformerConfig, shape: flops.Shape,
                       input_len: int = 0) -> tuple[int, float]:
  """(total, active per token) parameters of the LM (active: the 'active' convention's routed
  experts, see `flops.moe_params`)."""
  d = cfg.d_model
  latent_norms = cfg.q_lora_rank + cfg.kv_lora_rank if cfg.latent else 0
  block = attention_params(cfg) + 2 * d + latent_norms
  _, total, active = _ffn_counts(spec, cfg, cfg.num_layers, shape, 'active')
  shared = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * block + d
  if cfg.encoder_layers:
    _, encoder_total, encoder_active = _ffn_counts(
        spec, cfg, cfg.encoder_layers, flops.Shape(shape.batch_size, input_len), 'active')
    cross = attention_params(cfg, latent=False) + d  # and its norm
    shared += cfg.encoder_layers * block + d + cfg.num_layers * cross
    total, active = total + encoder_total, active + encoder_active
  return shared + total, shared + active


def stacks(config) -> list[Stack]:
  """The decoder's blocks (on seq_len tokens, attending to them and to the input_len encoder
  tokens), and an encoder-decoder's encoder blocks (on input_len tokens)."""
  model, spec = from_config(config)
  length, inputs = config.data.seq_len, input_len(config)
  moe = lambda n: flops.moe_blocks(n, model.moe_every, model.first_dense_layers) if spec else 0
  decoder = Stack(model.num_layers, moe(model.num_layers), length, length + inputs)
  encoder = Stack(model.encoder_layers, moe(model.encoder_layers), inputs, inputs)
  return [decoder] + ([encoder] if model.encoder_layers else [])


def _counts(config, count, **kwargs):
  model, spec = from_config(config)
  return count(spec, model, flops.Shape(config.data.batch_size, config.data.seq_len),
               input_len=input_len(config), **kwargs)


def model_flops_per_token(config, convention: str = 'executed') -> float:
  """Forward FLOPs per token by `convention` (see `transformer_flops`); training is ~3x."""
  return _counts(config, transformer_flops, convention=convention)


def param_counts(config) -> tuple[int, float]:
  """(total, active per token) parameters (see `transformer_params`)."""
  return _counts(config, transformer_params)
