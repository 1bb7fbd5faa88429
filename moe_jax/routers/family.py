"""`Family`: everything the rest of the code needs to know of one router family, in one object.

A family routes one group of T tokens (`route`, a pure function of the group's router logits,
usually written with `moe_jax.routing`), and says: which `config.moe` fields it reads (`options`)
and how it checks them (`check`); what router logits it needs (`logits`, `projection`) and what
they cost (`router_flops`, `router_params`); how many expert slots it runs (`slots`) and how many
experts a token uses (`per_token`); whether it couples the tokens of a group (`couples_group`, for
the causality check); its label in sweep tables (`describe`) and its source (`cite`).

The layer, FLOP counts, memory plan, causality check, config validation, `moe-jax config` and
sweep labels read a family through `moe_jax.moe.families.family(spec)`; none of them knows a family's
name. Families never import `moe_jax.spec`: `spec` below is an `MoESpec`, read by its fields.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax

from moe_jax import routing
from moe_jax.routers.projection import CosineProjection, RouterProjection
from moe_jax.validate import Section

Spec = Any  # an `moe_jax.spec.MoESpec`; families read its fields and never import it
MOE = Section('moe')
LOGITS = ('experts', 'slots', 'none')


@dataclasses.dataclass(frozen=True)
class Group:
  """What a family routes: one group's router logits ([T, E]; [T, E, S] for logits='slots'; None
  for logits='none'), the selection bias [E] (when config.moe.bias_update_rate > 0), the noise key
  (training with config.moe.noise_std > 0), the mode, and the token ids [T] (logits='none')."""
  logits: jax.Array | None
  bias: jax.Array | None = None
  rng: jax.Array | None = None
  train: bool = False
  token_ids: jax.Array | None = None

  @property
  def num_tokens(self) -> int:
    return (self.logits if self.logits is not None else self.token_ids).shape[0]


def top_k_slots(spec: Spec, n: int) -> int | None:
  """Slots per expert of top-k routing: round(k * n * capacity_factor / E), None when dropless."""
  return routing.capacity_for(n, spec.num_experts, spec.capacity_factor, spec.k)


def one_slot_each(spec: Spec, n: int) -> int | None:
  """Slots per expert when every token takes one slot (k = 1), None when dropless."""
  return routing.capacity_for(n, spec.num_experts, spec.capacity_factor, 1)


def k_per_token(spec: Spec) -> int:
  return spec.k


def check_k(spec: Spec) -> None:
  """config.moe.k in [1, num_experts]."""
  if not 1 <= spec.k <= spec.num_experts:
    MOE.fail('k', spec.k, f'choose 1 <= k <= num_experts={spec.num_experts}')


def check_k_is_one(spec: Spec) -> None:
  """config.moe.k == 1, for families that send each token to one expert."""
  if spec.k != 1:
    MOE.fail('k', spec.k, f'{spec.router} routing sends each token to one expert: set k=1')


def no_check(spec: Spec) -> None:
  del spec


@dataclasses.dataclass(frozen=True)
class Family:
  """One router family (module docstring). Required: route, couples_group, cite.

  Attributes:
    route: (spec, Group) -> routing.RouterOutput, for one group of T tokens. Traced under
      jax.vmap over the groups and jit: use only jax.numpy on the group's arrays.
    couples_group: a token's routing depends on the other tokens of its group beyond competing
      for capacity in `routing.place`'s priority order: then a decoder LM is causal only with
      group_by='position' (`moe_jax.causality`). False: the capacity rules of top-k routing apply
      (dropless, or priority='token', or k=1 with priority='choice').
    cite: the paper or codebase it follows (`moe-jax config` prints it).
    options: the `config.moe` fields it reads besides num_experts, d_ff, group_by and the layer's
      own (jitter, the loss coefficients, dispatch, ...). Some fields are refused unless a family
      lists them: num_expert_groups/groups_per_token (group-limited routing: `route` must apply
      it), bias_update_rate (`route` gets `Group.bias`), balance_over other than 'group' (`route`
      returns `RouterOutput.balance`).
    logits: 'experts' ([T, E]: config.moe.router_logits picks a linear or cosine projection),
      'slots' ([T, E, S], S = slots_per_expert) or 'none' (no learned router: `route` gets the
      group's token ids, LM only).
    dropless: may run without a capacity (capacity_factor=None).
    slots: (spec, T) -> expert slots per expert for a group of T tokens, None when dropless.
      FLOP counts of the 'executed' convention and memory plans use it.
    per_token: spec -> experts a token uses by the 'active' convention (k), or None when its
      capacity sets them (expert choice, Soft MoE: active = executed).
    check: spec -> None, raising a ValueError that names the `config.moe` field (`MOE.fail`).
    label: spec -> the family's part of a sweep label, e.g. 'k=2 cf=1.25' (`describe`). Default:
      k (if an option), S= (if slots_per_expert is) or the capacity.
    projection: spec -> the Flax module (named 'router') that makes the logits from x [..., d],
      returning [..., prod(logits shape)]. Default: by `logits` and config.moe.router_logits.
      A family with its own projection also gives `router_matrices` and `router_scalars`.
    router_matrices: (spec, d_model) -> the (in, out) weight matrices of `projection`, for FLOPs
      (2 * in * out per token each) and parameters.
    router_scalars: spec -> learned scalars of `projection` (a temperature, a scale).
    extra_router_flops: (spec, d_model) -> router FLOPs per token besides the projection (Soft
      MoE's dispatch and combine products).
  """
  route: Callable[[Spec, Group], routing.RouterOutput]
  couples_group: bool
  cite: str
  options: tuple[str, ...] = ()
  logits: str = 'experts'
  dropless: bool = False
  slots: Callable[[Spec, int], int | None] = top_k_slots
  per_token: Callable[[Spec], int | None] = k_per_token
  check: Callable[[Spec], None] = no_check
  label: Callable[[Spec], str] | None = None
  projection: Callable[[Spec], nn.Module | None] | None = None
  router_matrices: Callable[[Spec, int], tuple[tuple[int, int], ...]] | None = None
  router_scalars: Callable[[Spec], int] | None = None
  extra_router_flops: Callable[[Spec, int], float] | None = None

  def __post_init__(self):
    if self.logits not in LOGITS:
      raise ValueError(f'Family.logits={self.logits!r} is invalid: choose one of {LOGITS}.')
    if isinstance(self.options, str):
      raise ValueError(f'Family.options={self.options!r} must be a tuple of config.moe fields.')

  def logits_shape(self, spec: Spec) -> tuple[int, ...] | None:
    """A token's router logits: (E,), (E, S) for logits='slots', None for 'none'."""
    return {'experts': (spec.num_experts,), 'slots': (spec.num_experts, spec.slots_per_expert),
            'none': None}[self.logits]

  def make_projection(self, spec: Spec) -> nn.Module | None:
    """The module (named 'router') that makes a token's logits, None when the family has none."""
    if self.projection is not None:
      return self.projection(spec)
    shape = self.logits_shape(spec)
    if shape is None:
      return None
    if spec.router_logits == 'cosine':
      return CosineProjection(math.prod(shape), spec.cosine_dim, name='router')
    return RouterProjection(math.prod(shape), name='router')

  def matrices(self, spec: Spec, d_model: int) -> tuple[tuple[int, int], ...]:
    """The (in, out) weight matrices that make a token's logits: [d, E] (linear), [d, dim] and
    [dim, E] (cosine), [d, E * S] (logits='slots'), none (logits='none')."""
    if self.router_matrices is not None:
      return tuple(self.router_matrices(spec, d_model))
    shape = self.logits_shape(spec)
    if shape is None:
      return ()
    if spec.router_logits == 'cosine':
      return ((d_model, spec.cosine_dim), (spec.cosine_dim, math.prod(shape)))
    return ((d_model, math.prod(shape)),)

  def router_flops(self, spec: Spec, d_model: int) -> float:
    """Forward FLOPs per token of the router: its logits, plus `extra_router_flops`."""
    logits = sum(2.0 * a * b for a, b in self.matrices(spec, d_model))
    if self.extra_router_flops is None:
      return logits
    return logits + self.extra_router_flops(spec, d_model)

  def router_params(self, spec: Spec, d_model: int) -> int:
    """Parameters of the router: its matrices and learned scalars (cosine's temperature)."""
    if self.router_scalars is not None:
      scalars = self.router_scalars(spec)
    else:
      scalars = int(self.projection is None and self.logits != 'none'
                    and spec.router_logits == 'cosine')
    return sum(a * b for a, b in self.matrices(spec, d_model)) + scalars

  def describe(self, spec: Spec) -> str:
    """The family's part of a sweep label, e.g. 'k=2 cf=1.25' (`label`, or from the options)."""
    if self.label is not None:
      return self.label(spec)
    parts = [f'k={spec.k}'] if 'k' in self.options else []
    if 'slots_per_expert' in self.options:
      parts.append(f'S={spec.slots_per_expert}')
    else:
      parts.append('dropless' if spec.capacity_factor is None else f'cf={spec.capacity_factor:g}')
    return ' '.join(parts)
