"""BASE layers (Lewis et al. 2021): a balanced assignment of a group's tokens to experts in
training, every expert ceil(T / E) tokens (`routing.base_routing`). The assignment couples a
group's tokens: causal in a decoder LM only with group_by='position'."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers.family import MOE, Family, Group, Spec, check_k_is_one
from moe_jax.routing.balanced import balanced_capacity


def route(spec: Spec, group: Group) -> routing.RouterOutput:
  del spec
  return routing.base_routing(group.logits, train=group.train)


def check(spec: Spec) -> None:
  check_k_is_one(spec)
  if spec.capacity_factor != 1.0:
    MOE.fail('capacity_factor', spec.capacity_factor, 'BASE layers give every expert ceil(T / E) '
             'tokens of a group by construction: set capacity_factor=1.0')


NAME = 'base'  # config.moe.router
FAMILY = Family(
    route=route, slots=lambda spec, n: balanced_capacity(n, spec.num_experts),
    per_token=lambda spec: 1, couples_group=True, check=check, options=('balance_over',),
    cite='BASE layers, Lewis et al. 2021 (capacity_factor=1.0)')
