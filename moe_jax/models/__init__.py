"""Models built from MoE layers: the decoder-only transformer LM and the ViT classifier.

Both are a stack of pre-norm blocks whose FFN is dense or MoE (`run_blocks`, `ffn`); a block or
model module has fields config (num_layers, d_ff, activation, dtype, is_moe(block)), spec (a
`MoESpec`, or None for a dense FFN). Weights and activations name their dims logically; on a mesh
(`moe_jax.parallel.rules.use`) the rules shard them and each MoE layer runs under its own
`jax.shard_map`. config.remat (`REMATS`) rematerializes each block in the backward pass
(`remat_block`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.moe import families
from moe_jax.moe.experts import FeedForward
from moe_jax.moe.layer import MoELayer
from moe_jax.moe.spec import MoESpec


@dataclasses.dataclass(frozen=True)
class Stack:
  """A stack of blocks as an example passes it: `layers` blocks (`moe_layers` of them MoE), each
  run on `tokens` tokens that attend to `keys` keys (cross-attention's included). A decoder-only
  LM is one stack; an encoder-decoder two; for memory plans (`moe_jax.run.memory_plan`)."""
  layers: int
  moe_layers: int
  tokens: int
  keys: int


# config.model.remat: 'none' keeps every block's activations for the backward pass; 'full' keeps
# only each block's input and recomputes the rest of the block (`jax.checkpoint`); a
# `jax.checkpoint_policies` name keeps what that policy saves (e.g. the matmul outputs) and
# recomputes the rest.
REMAT_POLICIES = tuple(name for name in (
    'dots_saveable', 'dots_with_no_batch_dims_saveable', 'checkpoint_dots',
    'checkpoint_dots_with_no_batch_dims', 'nothing_saveable', 'everything_saveable')
                       if hasattr(jax.checkpoint_policies, name))
REMATS = ('none', 'full') + REMAT_POLICIES


def remat_block(block, remat: str, train: bool, **block_inputs):
  """block(x, train=train, **block_inputs) as a function of x, rematerialized by `remat` (one of
  `REMATS`) inside its parent's compact __call__: flax's `nn.remat` of the call, with `train` a
  Python constant and block_inputs (arrays or None) traced."""
  call = lambda module, x, inputs: module(x, train=train, **inputs)
  if remat != 'none':
    policy = None if remat == 'full' else getattr(jax.checkpoint_policies, remat)
    call = nn.remat(call, policy=policy)
  return lambda x: call(block, x, block_inputs)


def describe_ffn(model, spec: MoESpec | None, *, short: bool = False) -> str:
  """One line naming a model's FFN layers; `model`: a model config with num_layers, d_ff and
  is_moe(block).

  short=False (the trainer's log and summary): the router and every option set or central, and
  the MoE blocks, e.g. 'token_choice (num_experts=8, k=2, ...) in blocks [1, 3] of 4' (an
  encoder-decoder's: and its encoder blocks). short=True (a sweep member's label,
  `sweep.describe`): the router, its family's label (`Family.describe`), E, f and the options set,
  e.g. 'token_choice k=2 cf=1.25 E=8 f=204'; 'dense f=64' for a dense model.
  """
  if spec is None:
    return f'dense f={model.d_ff}' if short else (
        f'dense (d_ff={model.d_ff}) in all {model.num_layers} blocks')
  if short:
    return _label(spec)
  default = type(spec)()
  fields = [f.name for f in dataclasses.fields(spec) if f.name != 'router' and (
      f.name in ('num_experts', 'd_ff', 'capacity_factor', 'group_by')
      or getattr(spec, f.name) != getattr(default, f.name))]
  options = ', '.join(f'{name}={getattr(spec, name)}' for name in fields)
  blocks = lambda n: [i for i in range(n) if model.is_moe(i)]
  text = f'{spec.router} ({options}) in blocks {blocks(model.num_layers)} of {model.num_layers}'
  encoder = getattr(model, 'encoder_layers', 0)
  return text + (f', encoder blocks {blocks(encoder)} of {encoder}' if encoder else '')


def _label(spec: MoESpec) -> str:
  parts = [spec.router, families.family(spec).describe(spec), f'E={spec.num_experts}',
           f'f={spec.d_ff}']
  if spec.num_shared_experts:
    parts.append(f'shared={spec.num_shared_experts}')
  if spec.num_expert_groups > 1:
    parts.append(f'groups={spec.groups_per_token}/{spec.num_expert_groups}')
  if spec.router_logits != 'linear':
    parts.append(f'{spec.router_logits} d={spec.cosine_dim}')
  if spec.bias_update_rate:
    parts.append(f'aux-free u={spec.bias_update_rate:g}')
  if spec.balance_over != 'group':
    parts.append(f'balance over {spec.balance_over}')
  return ' '.join(parts)


def ffn(block, h, *, train: bool, token_ids=None):
  """The FFN of `block` on h [B, N, d], inside its compact __call__: (y, None) from a dense
  `FeedForward` of width config.d_ff when block.spec is None, else (y, aux) from the `MoELayer`
  (token_ids [B, N]: the LM's input ids, for hash routing)."""
  cfg, dtype = block.config, jnp.dtype(block.config.dtype)
  if block.spec is None:
    return FeedForward(cfg.d_ff, cfg.activation, dtype, name='ffn')(h), None
  return MoELayer(block.spec, dtype, name='moe')(
      h, train=train, token_ids=token_ids)


def run_blocks(model, block_cls, x, *, train: bool, num_layers: int | None = None,
               prefix: str = 'block', **block_inputs):
  """x through `model`'s blocks `block_cls` named {prefix}_i, i < num_layers (default
  config.num_layers), the MoE ones (config.is_moe(i)) with model.spec, inside its compact
  __call__; block_inputs go to every block's call (the LM's token_ids, the encoder output `memory`);
  each block rematerialized by config.remat (`remat_block`). Returns (x, aux):

  aux = {'loss': sum of the MoE layers' weighted aux losses (0.0 for a dense model),
         'layers': {block_name: the MoE layer's metrics plus its unweighted
                    'load_balancing_loss' and 'z_loss'}}.
  """
  cfg = model.config
  aux = {'loss': jnp.zeros((), jnp.float32), 'layers': {}}
  for i in range(cfg.num_layers if num_layers is None else num_layers):
    name = f'{prefix}_{i}'
    spec = model.spec if cfg.is_moe(i) else None
    block = block_cls(cfg, spec, name=name)
    x, layer_aux = remat_block(block, getattr(cfg, 'remat', 'none'), train, **block_inputs)(x)
    x = nn.with_logical_constraint(x, ('batch', 'length', None))
    if layer_aux is not None:
      aux['loss'] = aux['loss'] + layer_aux['loss']
      aux['layers'][name] = {**layer_aux['metrics'],
                             **{f'{k}_loss': v for k, v in layer_aux['losses'].items()}}
  return x, aux
