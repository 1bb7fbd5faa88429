"""Analytic FLOPs and parameter counts, and equal-FLOPs sizing of router comparisons.

Forward FLOPs per token, a multiply-add counts 2. Routed experts count by one of two conventions
(`CONVENTIONS`), which differ only for token choice with a capacity:

* 'active' (the papers' convention: Switch, GShard, expert choice, DeepSeekMoE): k expert FFNs per
  token for token choice, whatever the capacity; E * C / n for expert choice (its capacity factor)
  and E * S / n for Soft MoE, which run exactly that many.
* 'executed' (hardware cost): a capacity-bounded layer runs E * C slots per group of n tokens
  whether they are full or not, so capacity padding counts (k * capacity_factor per token).

Counted: router logits (linear, or cosine's two projections; hash routing has none), Soft MoE's
dispatch/combine products, expert and
shared-expert FFNs. Not counted (O(d) per token, equal across routers): softmax/top-k, the combine
weighting, norms and residuals. The one-hot 'einsum' dispatch reference does extra work that is an
implementation choice, not part of the model, and is not counted either.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from moe_jax.moe import families
from moe_jax.moe.spec import MoESpec


@dataclasses.dataclass(frozen=True)
class Shape:
  """The token layout FLOPs depend on: a batch of `batch_size` sequences of `seq_len` tokens."""
  batch_size: int
  seq_len: int

  def group_size(self, group_by: str) -> int:
    """Tokens routed together (see `MoESpec.group_by`)."""
    return {'sequence': self.seq_len, 'position': self.batch_size,
            'batch': self.batch_size * self.seq_len}[group_by]


def ffn_matrices(activation: str) -> int:
  """Weight matrices of an FFN: 3 for SwiGLU (in, gate, out), 2 for GELU."""
  return 3 if activation == 'swiglu' else 2


def ffn_flops(d_model: int, d_ff: int, activation: str = 'swiglu') -> float:
  """Forward FLOPs per token of a dense FFN."""
  return 2.0 * d_model * d_ff * ffn_matrices(activation)


CONVENTIONS = ('active', 'executed')


def check_convention(convention: str, field: str = 'config.flops_match') -> str:
  """`convention` if it is one of CONVENTIONS, else a ValueError naming `field`."""
  if convention not in CONVENTIONS:
    raise ValueError(f'{field}={convention!r} is invalid: choose one of {CONVENTIONS} (active: '
                     "the papers' k experts per token; executed: capacity padding counts).")
  return convention


def expert_slots_per_token(spec: MoESpec, shape: Shape, convention: str = 'executed') -> float:
  """Routed-expert FFN evaluations per token by `convention` (see the module docstring): k (the
  family's `per_token`) when dropless or by the 'active' convention, else E * C / n for groups of
  n tokens with C slots per expert (`Family.slots`)."""
  family = families.family(spec)
  k = family.per_token(spec)
  n = shape.group_size(spec.group_by)
  slots = family.slots(spec, n)
  if slots is None or (k is not None and convention == 'active'):
    return float(k)
  return spec.num_experts * slots / n


def router_flops(spec: MoESpec, d_model: int) -> float:
  """Router logits, plus Soft MoE's dispatch and combine products, per token (`Family.router_flops`:
  [d, E] linear, [d, dim] and [dim, E] cosine, [d, E * S] Soft MoE, none for hash routing)."""
  return families.family(spec).router_flops(spec, d_model)


def moe_flops(spec: MoESpec, d_model: int, shape: Shape, convention: str = 'executed') -> float:
  """Forward FLOPs per token of an MoE layer by `convention`."""
  per_expert = ffn_flops(d_model, spec.d_ff, spec.activation)
  return (router_flops(spec, d_model) + spec.num_shared_experts * per_expert
          + expert_slots_per_token(spec, shape, convention) * per_expert)


def layer_flops(spec: MoESpec | None, d_model: int, d_ff: int, shape: Shape,
                activation: str = 'swiglu', convention: str = 'executed') -> float:
  """FFN-layer FLOPs per token: the MoE layer, or a dense FFN of width d_ff when spec is None."""
  if spec is None:
    return ffn_flops(d_model, d_ff, activation)
  return moe_flops(spec, d_model, shape, convention)


def moe_params(spec: MoESpec, d_model: int, shape: Shape) -> tuple[int, float]:
  """(total, active per token) parameters of an MoE layer; active counts the routed experts of the
  'active' convention (k for token choice: the papers' activated parameters)."""
  per_expert = ffn_matrices(spec.activation) * d_model * spec.d_ff
  router = families.family(spec).router_params(spec, d_model)
  shared = spec.num_shared_experts * per_expert
  total = router + shared + expert_params(spec, d_model)
  routed = min(expert_slots_per_token(spec, shape, 'active'), spec.num_experts)
  active = router + shared + routed * per_expert
  return total, active


def size_to_budget(spec: MoESpec, d_model: int, shape: Shape, budget: float,
                   convention: str = 'executed') -> MoESpec:
  """Returns `spec` with the expert width d_ff that brings its FLOPs (by `convention`) closest to
  `budget`. FLOPs are affine in d_ff, so the width is solved for directly and rounded."""
  at_one = moe_flops(spec.replace(d_ff=1), d_model, shape, convention)
  per_unit = moe_flops(spec.replace(d_ff=2), d_model, shape, convention) - at_one
  d_ff = round((budget - at_one) / per_unit) + 1
  if d_ff < 1:
    raise ValueError(
        f'a FLOP budget of {budget:.4g}/token cannot fit this MoE layer: its router alone costs '
        f'{at_one - per_unit:.4g}. Raise the budget (a wider dense d_ff) or use fewer experts/slots.')
  return spec.replace(d_ff=d_ff)


def check_equal_flops(flops: Mapping[str, float], budget: float, tolerance: float,
                      convention: str = 'executed') -> None:
  """Raises ValueError naming every member whose FLOPs/token (by `convention`) miss `budget` by
  more than tolerance."""
  misses = {name: value / budget - 1 for name, value in flops.items()
            if abs(value / budget - 1) > tolerance}
  if misses:
    lines = [f'  {name}: {flops[name]:.4g} FLOPs/token ({miss:+.1%})' for name, miss in misses.items()]
    raise ValueError(
        f'unequal {convention} FLOPs: these members miss the budget of {budget:.4g} FLOPs/token '
        f'by more than {tolerance:.1%}:\n' + '\n'.join(lines) + '\nLet the sweep size them (size_to_budget, '
        'config.size_experts=True) or change their d_ff / k / capacity_factor.')


def is_moe_block(block: int, moe_every: int, first_dense_layers: int = 0) -> bool:
  """Whether block `block` (from 0) holds an MoE FFN: every `moe_every`-th block, (block + 1) %
  moe_every == 0, past the first `first_dense_layers` dense ones (DeepSeekMoE's first layers);
  moe_every=0 is a dense model."""
  return moe_every > 0 and block >= first_dense_layers and (block + 1) % moe_every == 0


def moe_blocks(num_layers: int, moe_every: int, first_dense_layers: int = 0) -> int:
  """How many of `num_layers` blocks hold an MoE FFN (`is_moe_block`)."""
  return sum(is_moe_block(i, moe_every, first_dense_layers) for i in range(num_layers))


def expert_params(spec: MoESpec, d_model: int) -> int:
  """Parameters of one MoE layer's routed experts (the stacked weights that `parallel` shards over
  the expert axis)."""
  return spec.num_experts * ffn_matrices(spec.activation) * d_model * spec.d_ff
