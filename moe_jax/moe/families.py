"""Router families by name: the registry every `config.moe.router` is looked up in.

A family (`Family`, moe_jax/routers/family.py) is everything the rest of the code needs to know of
one router: its route function, options and checks, router logits and their FLOPs, slots, experts
per token, causality class, sweep label and source. The built-in ones live one module each in
moe_jax/routers/; a researcher adds one from their own module with

  from moe_jax.moe import families
  families.register('my_router', families.Family(route=..., couples_group=False, cite=...))

and then `config.moe.router='my_router'` trains, counts FLOPs, checks causality and labels sweeps
like a built-in family (README, "Adding a router"; tests/test_register_router.py).

Dependencies run one way: routing (array math) < routers (families) < this registry < spec,
layers, flops, causality, plan, sweep.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import routing
from moe_jax.routers import base_layers, expert_choice, hash_layers, sinkhorn, soft, token_choice
from moe_jax.routers.family import (MOE, Family, Group, Spec, check_k, check_k_is_one,
                                    one_slot_each, top_k_slots)

__all__ = ['FAMILIES', 'Family', 'Group', 'MOE', 'check_k', 'check_k_is_one', 'family', 'names',
           'one_slot_each', 'register', 'route', 'route_shapes', 'top_k_slots', 'unregister']

FAMILIES: dict[str, Family] = {}  # config.moe.router -> its family; add to it with `register`


def register(name: str, family: Family, *, replace: bool = False) -> Family:
  """Makes `family` the router of `config.moe.router=name`; returns it.

  Raises:
    ValueError: `name` is taken (pass replace=True to redefine it) or not an identifier.
    TypeError: `family` is not a `Family`.
  """
  if not isinstance(family, Family):
    raise TypeError(f'register({name!r}, ...) needs a moe_jax.moe.families.Family, got '
                    f'{type(family).__name__}.')
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f'router family name {name!r} is invalid: use an identifier.')
  if name in FAMILIES and not replace and FAMILIES[name] is not family:
    raise ValueError(f'router family {name!r} is already registered; pass replace=True to '
                     'redefine it.')
  FAMILIES[name] = family
  return family


def unregister(name: str) -> Family:
  """Removes family `name` from the registry (e.g. at the end of a test); returns it."""
  return FAMILIES.pop(name)


def names() -> tuple[str, ...]:
  """Every registered `config.moe.router`, built-in ones first."""
  return tuple(FAMILIES)


def family(spec: Spec) -> Family:
  """The `Family` of `spec.router`."""
  try:
    return FAMILIES[spec.router]
  except KeyError:
    MOE.one_of('router', spec.router, names())
    raise


def route(spec: Spec, group: Group) -> routing.RouterOutput:
  """Routes one group of tokens by `spec`'s family."""
  return family(spec).route(spec, group)


def route_shapes(spec: Spec, num_tokens: int) -> routing.RouterOutput:
  """The shapes of routing one group of `num_tokens` tokens, traced without running (raises the
  router's ValueError when the group cannot be routed, e.g. a capacity that rounds to 0)."""
  shape = family(spec).logits_shape(spec)
  logits = None if shape is None else jax.ShapeDtypeStruct((num_tokens, *shape), jnp.float32)
  ids = jax.ShapeDtypeStruct((num_tokens,), jnp.int32) if shape is None else None
  return jax.eval_shape(lambda lg, tid: route(spec, Group(lg, token_ids=tid)), logits, ids)


for _module in (token_choice, expert_choice, soft, sinkhorn, base_layers, hash_layers):
  register(_module.NAME, _module.FAMILY)
BUILT_IN = names()
