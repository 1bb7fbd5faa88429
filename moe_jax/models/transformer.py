"""Decoder-only byte-level transformer LM with MoE FFNs in every `moe_every`-th block.

tokens [B, L] -> embed (V=256) -> num_layers pre-norm blocks -> RMSNorm -> unembed -> logits.
A block is x += attn(norm(x)); x += ffn(norm(x)), with causal multi-head self-attention using
rotary position embeddings (RoPE). Block i holds an MoE FFN (`MoELayer`) when
(i + 1) % moe_every == 0, else a dense `FeedForward` of width d_ff; moe_every=0 is a dense model.
The output projection is a separate (untied) [d, V] matrix: with a 256-byte vocabulary it costs
little and keeps the input embedding free of the output's scale.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import causality, flops, reproducibility
from moe_jax.data import VOCAB_SIZE
from moe_jax.experts import ACTIVATIONS
from moe_jax.models import ffn, run_blocks
from moe_jax.spec import MoESpec
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
  vocab_size: ClassVar[int] = VOCAB_SIZE  # bytes

  def __post_init__(self):
    check_block_stack(self, ('d_model', 'num_layers', 'num_heads', 'd_ff'))
    if self.head_dim % 2:
      MODEL.fail('num_heads', self.num_heads, 'RoPE needs an even head size, and d_model / '
                 f'num_heads = {self.head_dim}; pick num_heads so that d_model / num_heads is even')
    if self.rope_base <= 0:
      MODEL.fail('rope_base', self.rope_base, 'use a positive base (10000 is standard)')
    MODEL.one_of('attention', self.attention, ATTENTION_IMPLEMENTATIONS)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def is_moe(self, block: int) -> bool:
    return self.moe_every > 0 and (block + 1) % self.moe_every == 0

  def num_tokens(self, input_shape) -> int:
    """Tokens per example: a sequence of shape [L] is L tokens."""
    return input_shape[0]

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'TransformerConfig':
    """From `config.model` (dict or ConfigDict), rejecting unknown fields."""
    return cls(**section_values(cls, 'model', config))


def check_block_stack(cfg, positive: tuple[str, ...]) -> None:
  """The checks every model config (LM, ViT) shares, naming the bad `config.model` field: the
    `positive` fields are positive ints, num_heads divides d_model, moe_every is 0 or at most
    num_layers, and activation and dtype are known."""
  for name in positive:
    MODEL.positive(name, getattr(cfg, name))
  if cfg.d_model % cfg.num_heads:
    MODEL.fail('num_heads', cfg.num_heads, f'it must divide d_model={cfg.d_model}')
  if not isinstance(cfg.moe_every, int) or cfg.moe_every < 0:
    MODEL.fail('moe_every', cfg.moe_every, 'use 0 (dense) or a positive integer')
  if cfg.moe_every > cfg.num_layers:
    MODEL.fail('moe_every', cfg.moe_every, f'with num_layers={cfg.num_layers} no block would '
               'be MoE; use moe_every <= num_layers, or 0 for a dense model')
  MODEL.one_of('activation', cfg.activation, ACTIVATIONS)
  MODEL.one_of('dtype', cfg.dtype, DTYPES)


def model_and_spec(model_cls, config):
  """(model_cls.from_config(config.model), MoESpec of config.moe, or None for a dense model)."""
  model = model_cls.from_config(config.model)
  spec = MoESpec.from_config(config.moe) if 'moe' in config else None
  if model.moe_every and spec is None:
    raise ValueError(f'config.model.moe_every={model.moe_every} needs a config.moe section; add '
                     'one or set moe_every=0 for a dense model.')
  return model, spec if model.moe_every else None


def from_config(config) -> tuple[TransformerConfig, MoESpec | None]:
  """(model config, MoE spec or None for a dense model) from a full experiment config."""
  return model_and_spec(TransformerConfig, config)


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


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     implementation: str = 'xla') -> jax.Array:
  """Causal softmax attention, scale 1/sqrt(D). q, k, v: [B, L, H, D] -> [B, L, H, D].

  implementation: 'xla' (softmax in float32 over the masked [B, H, L, L] scores) or 'cudnn'
  (fused flash attention; GPU, bf16/fp16 only).
  """
  if implementation == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
  length = q.shape[1]
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  mask = jnp.tril(jnp.ones((length, length), bool))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


class Attention(nn.Module):
  """Causal multi-head self-attention with RoPE. x: [B, L, d] -> [B, L, d]."""
  num_heads: int
  rope_base: float = 10_000.0
  dtype: Any = jnp.float32
  implementation: str = 'auto'  # see `attention_implementation`

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    heads = (self.num_heads, d // self.num_heads)
    project = lambda name: nn.DenseGeneral(heads, use_bias=False, dtype=self.dtype, name=name)(x)
    q, k, v = project('query'), project('key'), project('value')  # [B, L, H, D]
    implementation = attention_implementation(self.implementation, self.dtype, heads[1])
    out = causal_attention(rope(q, self.rope_base), rope(k, self.rope_base), v, implementation)
    return nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype, name='out')(out)


class Block(nn.Module):
  """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)). x: [B, L, d] -> ([B, L, d], aux).

  aux is the MoE layer's aux dict, or None for a dense FFN. expert_axis, batch_axes: as `MoELayer`.
  """
  config: TransformerConfig
  spec: MoESpec | None = None
  expert_axis: str | None = None
  batch_axes: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x, *, train: bool = False, token_ids=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    x = x + Attention(cfg.num_heads, cfg.rope_base, dtype, cfg.attention, name='attention')(
        nn.RMSNorm(dtype=dtype, name='attention_norm')(x))
    y, aux = ffn(self, nn.RMSNorm(dtype=dtype, name='ffn_norm')(x), train=train,
                 token_ids=token_ids)
    return x + y, aux


class Transformer(nn.Module):
  """Byte LM. tokens [B, L] int -> (logits [B, L, V] float32, aux).

  aux: as `models.run_blocks`. Training with a router that has jitter or noise needs the 'router'
  RNG stream; aux-loss-free balancing needs `mutable=['router_bias']` (see `MoELayer`).
  expert_axis / batch_axes set (by `parallel.expert_parallel`), the MoE layers run expert-parallel
  inside `jax.shard_map`; the rest is data-parallel on the local batch (`parallel.shard_module`).

  Building one whose routing can see later tokens raises ValueError naming the `config.moe`
  field (`causality.require_causal`) unless `config.allow_future_leak`.
  """
  config: TransformerConfig
  spec: MoESpec | None = None
  expert_axis: str | None = None
  batch_axes: tuple[str, ...] = ()

  def __post_init__(self):
    if self.config.moe_every:  # refuse routing that sees later tokens, before any tracing
      causality.require_causal(self.spec, self.config.allow_future_leak)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    if cfg.moe_every and self.spec is None:
      raise ValueError(f'moe_every={cfg.moe_every} needs a MoESpec; pass spec=, or moe_every=0.')
    x = nn.Embed(cfg.vocab_size, cfg.d_model, name='embed')(tokens).astype(dtype)
    x, aux = run_blocks(self, Block, x, train=train, token_ids=tokens)
    x = nn.RMSNorm(dtype=dtype, name='final_norm')(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, name='unembed')(x)
    return logits.astype(jnp.float32), aux


def build(config) -> Transformer:
  """The LM described by a full experiment config (`config.model`, `config.moe`)."""
  return Transformer(*from_config(config))


def input_spec(config) -> jax.ShapeDtypeStruct:
  """A batch of the LM's inputs: [batch_size, seq_len] byte ids (`config.data`)."""
  return jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)


# ---------------------------------------------------------------------------------------------
# FLOPs and parameters of the whole LM (flops.py counts the FFN layers).
#
# Per token, forward: attention QKVO projections 4 * 2 * d^2; scores and values 2 * 2 * L * d as
# executed (the full [L, L] score matrix, causal mask included); the FFN of each block by
# `layer_flops`; the unembedding 2 * d * V. The embedding lookup, norms, RoPE and softmaxes are
# O(d) per token and not counted. Parameters: embedding and unembedding V * d each (untied),
# 4 * d^2 attention and 2 * d norm scales per block, d for the final norm, FFNs by
# `flops.moe_params`.
# ---------------------------------------------------------------------------------------------


def transformer_flops(spec: MoESpec | None, *, d_model: int, num_layers: int, d_ff: int,
                      moe_every: int, vocab_size: int, shape: flops.Shape,
                      activation: str = 'swiglu', convention: str = 'executed') -> float:
  """Forward FLOPs per token of the transformer LM by `convention` (dense FFNs of width d_ff)."""
  d = d_model
  num_moe = flops.moe_blocks(num_layers, moe_every)
  attention = 8.0 * d * d + 4.0 * shape.seq_len * d
  dense = flops.layer_flops(None, d, d_ff, shape, activation)
  moe = flops.layer_flops(spec, d, d_ff, shape, activation, convention) if num_moe else 0.0
  return (num_layers * attention + (num_layers - num_moe) * dense + num_moe * moe
          + 2.0 * d * vocab_size)


def transformer_params(spec: MoESpec | None, *, d_model: int, num_layers: int, d_ff: int,
                       moe_every: int, vocab_size: int, shape: flops.Shape,
                       activation: str = 'swiglu') -> tuple[int, float]:
  """(total, active per token) parameters of the transformer LM (untied embeddings)."""
  d = d_model
  num_moe = flops.moe_blocks(num_layers, moe_every)
  shared = 2 * vocab_size * d + num_layers * (4 * d * d + 2 * d) + d
  shared += (num_layers - num_moe) * flops.ffn_matrices(activation) * d * d_ff
  moe_total, moe_active = flops.moe_params(spec, d, shape) if num_moe else (0, 0.0)
  return shared + num_moe * moe_total, shared + num_moe * moe_active


def _counts(config, count, **kwargs):
  model, spec = from_config(config)
  return count(spec, d_model=model.d_model, num_layers=model.num_layers, d_ff=model.d_ff,
               moe_every=model.moe_every, vocab_size=model.vocab_size,
               shape=flops.Shape(config.data.batch_size, config.data.seq_len),
               activation=model.activation, **kwargs)


def model_flops_per_token(config, convention: str = 'executed') -> float:
  """Forward FLOPs per token by `convention` (see `transformer_flops`); training is ~3x."""
  return _counts(config, transformer_flops, convention=convention)


def param_counts(config) -> tuple[int, float]:
  """(total, active per token) parameters (see `transformer_params`)."""
  return _counts(config, transformer_params)
