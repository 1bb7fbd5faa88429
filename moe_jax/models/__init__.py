"""Models built from MoE layers: the decoder-only transformer LM and the ViT classifier."""
from __future__ import annotations

import dataclasses

from moe_jax.spec import MoESpec


def describe_ffn(model, spec: MoESpec | None) -> str:
  """One line naming a model's FFN layers, e.g. 'token_choice (num_experts=8, k=2, ...) in blocks
  [1, 3] of 4'. `model`: a model config with num_layers, d_ff and is_moe(block)."""
  if spec is None:
    return f'dense (d_ff={model.d_ff}) in all {model.num_layers} blocks'
  default = type(spec)()
  fields = [f.name for f in dataclasses.fields(spec) if f.name != 'router' and (
      f.name in ('num_experts', 'd_ff', 'capacity_factor', 'group_by')
      or getattr(spec, f.name) != getattr(default, f.name))]
  options = ', '.join(f'{name}={getattr(spec, name)}' for name in fields)
  blocks = [i for i in range(model.num_layers) if model.is_moe(i)]
  return f'{spec.router} ({options}) in blocks {blocks} of {model.num_layers}'
