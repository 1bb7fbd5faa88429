"""Router families: what the layer, FLOP counts, causality check and config checks need to know of
each `config.moe.router`, in one table (`FAMILIES`).

A family routes one group of T tokens (`Family.route`, a pure function of the group's router
logits), says how many expert slots it runs (`slots`), how many experts a token uses by the papers'
convention (`per_token`), whether its decisions couple the tokens of a group (`couples_group`:
then only `group_by='position'` is causal) and checks its own options (`check`).

`spec` arguments are `moe_jax.moe.spec.MoESpec`s; that module imports this one, not the reverse.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax import routing
from moe_jax.routing.balanced import balanced_capacity
from moe_jax.routing.token_choice import capacity_for
from moe_jax.validate import Section

MOE = Section('moe')


@dataclasses.dataclass(frozen=True)
class Group:
  """What a family routes: one group's router logits ([T, E], [T, E, S] for Soft MoE, None for
  hash routing), the selection bias [E] (aux-free), the noise key, the mode, and the token ids [T]
  (hash routing)."""
  logits: jax.Array | None
  bias: jax.Array | None = None
  rng: jax.Array | None = None
  train: bool = False
  token_ids: jax.Array | None = None

  @property
  def num_tokens(self) -> int:
    return (self.logits if self.logits is not None else self.token_ids).shape[0]


@dataclasses.dataclass(frozen=True)
class Family:
  """One router family.

  Attributes:
    route: (spec, Group) -> RouterOutput.
    slots: (spec, T) -> expert slots per expert for a group of T tokens, None when dropless.
    per_token: spec -> experts a token uses by the 'active' convention (k), or None when its
      capacity sets them (expert choice, Soft MoE: active = executed).
    couples_group: a token's routing depends on the other tokens of its group (besides competing
      for capacity): causal in a decoder LM only with group_by='position'.
    logits: 'experts' ([T, E]), 'slots' ([T, E, S], Soft MoE) or 'none' (no learned router).
    dropless: may run without a capacity (capacity_factor=None).
    check: spec -> None, raising a ValueError that names the `config.moe` field.
    options: the `config.moe` fields it reads besides num_experts, d_ff and group_by.
    cite: the paper or codebase it follows.
  """
  route: Callable
  slots: Callable
  per_token: Callable
  couples_group: bool
  cite: str
  options: tuple[str, ...] = ()
  logits: str = 'experts'
  dropless: bool = False
  check: Callable = lambda spec: None


def _top_k_slots(spec, n: int) -> int | None:
  return capacity_for(n, spec.num_experts, spec.capacity_factor, spec.k)


def _one_slot_each(spec, n: int) -> int | None:
  return capacity_for(n, spec.num_experts, spec.capacity_factor, 1)


def _check_k(spec) -> None:
  if not 1 <= spec.k <= spec.num_experts:
    MOE.fail('k', spec.k, f'choose 1 <= k <= num_experts={spec.num_experts}')


def _check_k_is_one(spec) -> None:
  if spec.k != 1:
    MOE.fail('k', spec.k, f'{spec.router} routing sends each token to one expert: set k=1')


def _check_base(spec) -> None:
  _check_k_is_one(spec)
  if spec.capacity_factor != 1.0:
    MOE.fail('capacity_factor', spec.capacity_factor, 'BASE layers give every expert ceil(T / E) '
             'tokens of a group by construction: set capacity_factor=1.0')


def _route_token_choice(spec, group: Group) -> routing.RouterOutput:
  return routing.token_choice(
      group.logits, k=spec.k, capacity_factor=spec.capacity_factor, score=spec.score,
      renormalize=spec.renormalize, priority=spec.priority, selection_bias=group.bias,
      noise_std=spec.noise_std if group.rng is not None else 0.0, rng=group.rng,
      num_groups=spec.num_expert_groups, groups_per_token=spec.groups_per_token)


FAMILIES: dict[str, Family] = {
    'token_choice': Family(
        route=_route_token_choice, slots=_top_k_slots, per_token=lambda spec: spec.k,
        couples_group=False, dropless=True, check=_check_k,
        options=('k', 'capacity_factor', 'priority', 'score', 'renormalize', 'bias_update_rate',
                 'noise_std', 'num_expert_groups', 'groups_per_token'),
        cite='Switch (k=1), GShard / Mixtral (k=2), DeepSeek-V3 (score=sigmoid, aux-free bias, '
             'group-limited)'),
    'expert_choice': Family(
        route=lambda spec, g: routing.expert_choice(g.logits, capacity_factor=spec.capacity_factor),
        slots=_one_slot_each, per_token=lambda spec: None, couples_group=True,
        options=('capacity_factor',), cite='Zhou et al. 2022'),
    'soft': Family(
        route=lambda spec, g: routing.soft_routing(g.logits),
        slots=lambda spec, n: spec.slots_per_expert, per_token=lambda spec: None,
        couples_group=True, logits='slots', options=('slots_per_expert',),
        cite='Soft MoE, Puigcerver et al. 2023'),
    'sinkhorn': Family(
        route=lambda spec, g: routing.sinkhorn_routing(
            g.logits, k=spec.k, capacity_factor=spec.capacity_factor, priority=spec.priority,
            train=g.train),
        slots=_top_k_slots, per_token=lambda spec: spec.k, couples_group=True, dropless=True,
        check=_check_k, options=('k', 'capacity_factor', 'priority'),
        cite="Megatron-LM's sinkhorn router; Clark et al. 2022"),
    'base': Family(
        route=lambda spec, g: routing.base_routing(g.logits, train=g.train),
        slots=lambda spec, n: balanced_capacity(n, spec.num_experts), per_token=lambda spec: 1,
        couples_group=True, check=_check_base, options=(),
        cite='BASE layers, Lewis et al. 2021 (capacity_factor=1.0)'),
    'hash': Family(
        route=lambda spec, g: routing.hash_routing(
            g.token_ids, spec.num_experts, capacity_factor=spec.capacity_factor,
            priority=spec.priority, seed=spec.hash_seed),
        slots=_one_slot_each, per_token=lambda spec: 1, couples_group=False, logits='none',
        dropless=True, check=_check_k_is_one, options=('capacity_factor', 'priority', 'hash_seed'),
        cite='Hash layers, Roller et al. 2021'),
}


def family(spec) -> Family:
  """The `Family` of `spec.router`."""
  return FAMILIES[spec.router]


def route(spec, group: Group) -> routing.RouterOutput:
  """Routes one group of tokens by `spec`'s family."""
  return family(spec).route(spec, group)


def route_shapes(spec, num_tokens: int) -> routing.RouterOutput:
  """The shapes of routing one group of `num_tokens` tokens, traced without running (raises the
  router's ValueError when the group cannot be routed, e.g. a capacity that rounds to 0)."""
  kind, n, e = family(spec).logits, num_tokens, spec.num_experts
  logits = {'experts': (n, e), 'slots': (n, e, spec.slots_per_expert), 'none': None}[kind]
  logits = None if logits is None else jax.ShapeDtypeStruct(logits, jnp.float32)
  ids = jax.ShapeDtypeStruct((n,), jnp.int32) if kind == 'none' else None
  return jax.eval_shape(lambda lg, tid: route(spec, Group(lg, token_ids=tid)), logits, ids)
