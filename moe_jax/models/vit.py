"""A small Vision Transformer classifier with MoE FFNs in every `moe_every`-th block.

images [B, h, w, c] -> non-overlapping p x p patches -> linear patch embedding + learned position
embeddings (+ a class token when pool='cls') -> num_layers pre-norm blocks -> LayerNorm -> mean
over tokens (pool='mean') or the class token (pool='cls') -> linear head -> logits [B, classes].

A block is x += attn(norm(x)); x += ffn(norm(x)) with bidirectional multi-head self-attention.
Block i holds an MoE FFN (`MoELayer`, any router of `MoESpec`) when (i + 1) % moe_every == 0 and
i >= first_dense_layers (`flops.is_moe_block`), else a dense `FeedForward` of width d_ff;
moe_every=0 is a dense ViT. With `group_by='sequence'`
each image's tokens are routed together, as in Soft MoE's ViTs (Puigcerver et al. 2023).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.data import images as image_data
from moe_jax.models import Stack, ffn, run_blocks
from moe_jax.models.transformer import MODEL, check_block_stack, logical, model_and_spec
from moe_jax.moe import flops
from moe_jax.moe.spec import MoESpec
from moe_jax.validate import section_values

POOLS = ('mean', 'cls')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The ViT's shape (`config.model`); image shape and classes come from the data set."""
  patch_size: int = 2
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 4
  d_ff: int = 128
  moe_every: int = 2
  activation: str = 'gelu'
  pool: str = 'mean'
  dtype: str = 'float32'
  first_dense_layers: int = 0  # blocks before the first MoE one are dense (Soft MoE: last half)
  remat: str = 'none'  # per block: 'none', 'full' or a jax.checkpoint_policies name (REMATS)

  def __post_init__(self):
    if not isinstance(self.first_dense_layers, int) or self.first_dense_layers < 0:
      MODEL.fail('first_dense_layers', self.first_dense_layers, 'use 0 or a positive integer')
    check_block_stack(self, ('patch_size', 'd_model', 'num_layers', 'num_heads', 'd_ff'))
    MODEL.one_of('pool', self.pool, POOLS)

  def is_moe(self, block: int) -> bool:
    return flops.is_moe_block(block, self.moe_every, self.first_dense_layers)

  def num_tokens(self, image_shape) -> int:
    """Tokens per image: patches (+1 class token). Raises if patch_size does not tile the image."""
    h, w = image_shape[:2]
    if h % self.patch_size or w % self.patch_size:
      MODEL.fail('patch_size', self.patch_size, f'it must divide the image size {h}x{w}')
    return (h // self.patch_size) * (w // self.patch_size) + int(self.pool == 'cls')

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'ViTConfig':
    """From `config.model` (dict or ConfigDict), rejecting unknown fields."""
    return cls(**section_values(cls, 'model', config))


def from_config(config) -> tuple[ViTConfig, MoESpec | None]:
  """(model config, MoE spec or None for a dense ViT) from a full experiment config."""
  return model_and_spec(ViTConfig, config)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, h, w, c] -> [B, (h / p) * (w / p), p * p * c], patches in row-major order."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class Block(nn.Module):
  """Pre-norm encoder block. x: [B, L, d] -> ([B, L, d], aux or None for a dense FFN)."""
  config: ViTConfig
  spec: MoESpec | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    h = nn.LayerNorm(dtype=dtype, name='attention_norm')(x)
    x = x + nn.MultiHeadDotProductAttention(
        cfg.num_heads, dtype=dtype, use_bias=False, name='attention',
        kernel_init=logical(('embed', 'heads', 'kv')),
        out_kernel_init=logical(('heads', 'kv', 'embed')))(h, h)
    y, aux = ffn(self, nn.LayerNorm(dtype=dtype, name='ffn_norm')(x), train=train)
    return x + y, aux


class ViT(nn.Module):
  """Image classifier. images [B, h, w, c] float -> (logits [B, num_classes] float32, aux).

  aux: as `models.run_blocks`. On a mesh (`sharding.shard_module`) the MoE layers run
  expert-parallel under `jax.shard_map`; with `group_by='sequence'` (each image routed alone)
  that equals one device.
  """
  config: ViTConfig
  num_classes: int
  spec: MoESpec | None = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    if cfg.moe_every and self.spec is None:
      raise ValueError(f'moe_every={cfg.moe_every} needs a MoESpec; pass spec=, or moe_every=0.')
    cfg.num_tokens(images.shape[1:])  # checks the patch size
    x = nn.Dense(cfg.d_model, dtype=dtype, name='patch_embed',
                 kernel_init=logical(('patch', 'embed')))(patchify(images, cfg.patch_size))
    if cfg.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, cfg.d_model))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.d_model)).astype(x.dtype), x],
                          axis=1)
    x = x + self.param('position', nn.initializers.normal(0.02), x.shape[1:]).astype(dtype)
    x, aux = run_blocks(self, Block, x, train=train)
    x = nn.LayerNorm(dtype=dtype, name='final_norm')(x)
    pooled = x[:, 0] if cfg.pool == 'cls' else x.mean(axis=1)
    logits = nn.Dense(self.num_classes, dtype=dtype, name='head',
                      kernel_init=logical(('embed', 'classes')))(pooled)
    return logits.astype(jnp.float32), aux


def build(config) -> ViT:
  """The ViT described by a full experiment config (`config.model`, `config.moe`) for the images
  and classes of `config.data.name`; the patch size must tile the image."""
  model, spec = from_config(config)
  image_shape, num_classes = image_data.image_info(config.data.name)
  model.num_tokens(image_shape)
  return ViT(model, num_classes, spec)


def input_spec(config) -> jax.ShapeDtypeStruct:
  """A batch of the ViT's inputs: [batch_size, H, W, C] images of `config.data.name`."""
  image_shape, _ = image_data.image_info(config.data.name)
  return jax.ShapeDtypeStruct((config.data.batch_size, *image_shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# FLOPs and parameters, per token (patch or class token), forward, as `transformer_flops`:
# patch embedding 2 * p^2 c * d; attention QKVO 4 * 2 * d^2 and scores + values 2 * 2 * L * d;
# FFNs by `flops.layer_flops`; the head 2 * d * classes once per image (/ L per token). Norms,
# pooling, softmaxes and biases are O(d) and not counted. Parameters: patch embedding (+ bias),
# position embeddings, class token, 4 d^2 attention and two LayerNorms (2 d each) per block, the
# final LayerNorm, FFNs by `flops.moe_params`, the head (+ bias).
# ---------------------------------------------------------------------------------------------


def vit_flops(spec: MoESpec | None, model: ViTConfig, image_shape, num_classes: int,
              batch_size: int, convention: str = 'executed') -> float:
  """Forward FLOPs per token of the ViT by `convention` (dense FFNs of width model.d_ff)."""
  d, n = model.d_model, model.num_tokens(image_shape)
  shape = flops.Shape(batch_size, n)
  patch_dim = model.patch_size ** 2 * image_shape[2]
  num_moe = flops.moe_blocks(model.num_layers, model.moe_every, model.first_dense_layers)
  attention = 8.0 * d * d + 4.0 * n * d
  dense = flops.layer_flops(None, d, model.d_ff, shape, model.activation)
  moe = (flops.layer_flops(spec, d, model.d_ff, shape, model.activation, convention)
         if num_moe else 0.0)
  patches = n - int(model.pool == 'cls')
  return (2.0 * patch_dim * d * patches / n + model.num_layers * attention
          + (model.num_layers - num_moe) * dense + num_moe * moe + 2.0 * d * num_classes / n)


def vit_params(spec: MoESpec | None, model: ViTConfig, image_shape, num_classes: int,
               batch_size: int) -> tuple[int, float]:
  """(total, active per token) parameters of the ViT."""
  d, n = model.d_model, model.num_tokens(image_shape)
  patch_dim = model.patch_size ** 2 * image_shape[2]
  num_moe = flops.moe_blocks(model.num_layers, model.moe_every, model.first_dense_layers)
  shared = (patch_dim + 1) * d + n * d + d * int(model.pool == 'cls')
  shared += model.num_layers * (4 * d * d + 4 * d) + 2 * d + (d + 1) * num_classes
  shared += (model.num_layers - num_moe) * flops.ffn_matrices(model.activation) * d * model.d_ff
  moe_total, moe_active = (flops.moe_params(spec, d, flops.Shape(batch_size, n)) if num_moe
                           else (0, 0.0))
  return shared + num_moe * moe_total, shared + num_moe * moe_active


def _counts(config, count, **kwargs):
  model, spec = from_config(config)
  image_shape, num_classes = image_data.image_info(config.data.name)
  return count(spec, model, image_shape, num_classes, config.data.batch_size, **kwargs)


def model_flops_per_token(config, convention: str = 'executed') -> float:
  """Forward FLOPs per token (patch) by `convention` (see `vit_flops`)."""
  return _counts(config, vit_flops, convention=convention)


def param_counts(config) -> tuple[int, float]:
  """(total, active per token) parameters (see `vit_params`)."""
  return _counts(config, vit_params)


def stacks(config) -> list[Stack]:
  """The ViT's blocks: one stack on the tokens of an image, which attend to each other."""
  model, spec = from_config(config)
  image_shape, _ = image_data.image_info(config.data.name)
  n = model.num_tokens(image_shape)
  moe = flops.moe_blocks(model.num_layers, model.moe_every, model.first_dense_layers) if spec else 0
  return [Stack(model.num_layers, moe, n, n)]
