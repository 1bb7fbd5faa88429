"""Sinkhorn routing (Megatron-LM's `sinkhorn` router; Clark et al. 2022): top-k of the
Sinkhorn-balanced logits in training (`routing.sinkhorn_routing`). The balancing couples a group's
tokens: causal in a decoder LM only with group_by='position'."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers.family import Family, Group, Spec, check_k


def route(spec: Spec, group: Group) -> routing.RouterOutput:
  return routing.sinkhorn_routing(group.logits, k=spec.k, capacity_factor=spec.capacity_factor,
                                  priority=spec.priority, train=group.train)


NAME = 'sinkhorn'  # config.moe.router
FAMILY = Family(
    route=route, couples_group=True, dropless=True, check=check_k,
    options=('k', 'capacity_factor', 'priority', 'balance_over'),
    cite="Megatron-LM's sinkhorn router; Clark et al. 2022")
