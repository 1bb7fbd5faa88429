"""Soft MoE (Puigcerver et al. 2023): slots are convex mixes of a group's tokens
(`routing.soft_routing`). Logits [T, E, S] from an L2-normalized projection with a learned scale;
the dispatch and combine products cost as much as the logits each. Causal in a decoder LM only
with group_by='position'."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers.family import Family, Group, Spec
from moe_jax.routers.projection import RouterProjection


def route(spec: Spec, group: Group) -> routing.RouterOutput:
  del spec
  return routing.soft_routing(group.logits)


def _outputs(spec: Spec) -> int:
  return spec.num_experts * spec.slots_per_expert


NAME = 'soft'  # config.moe.router
FAMILY = Family(
    route=route, slots=lambda spec, n: spec.slots_per_expert, per_token=lambda spec: None,
    couples_group=True, logits='slots', options=('slots_per_expert',),
    projection=lambda spec: RouterProjection(_outputs(spec), normalize=True, name='router'),
    router_matrices=lambda spec, d: ((d, _outputs(spec)),),
    router_scalars=lambda spec: 1,  # the normalized projection's scale
    extra_router_flops=lambda spec, d: 2 * (2.0 * d * _outputs(spec)),  # dispatch, combine
    cite='Soft MoE, Puigcerver et al. 2023')
