"""Hash layers (Roller et al. 2021): a fixed token-id -> expert map, no learned router
(`routing.hash_routing`; logits='none': the family gets the group's token ids, LM only). A token's
expert depends on its own id: with a capacity, causal as top-1 token choice."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers.family import Family, Group, Spec, check_k_is_one, one_slot_each


def route(spec: Spec, group: Group) -> routing.RouterOutput:
  return routing.hash_routing(group.token_ids, spec.num_experts,
                              capacity_factor=spec.capacity_factor, priority=spec.priority,
                              seed=spec.hash_seed)


NAME = 'hash'  # config.moe.router
FAMILY = Family(
    route=route, slots=one_slot_each, per_token=lambda spec: 1, couples_group=False,
    logits='none', dropless=True, check=check_k_is_one,
    options=('capacity_factor', 'priority', 'hash_seed'), cite='Hash layers, Roller et al. 2021')
