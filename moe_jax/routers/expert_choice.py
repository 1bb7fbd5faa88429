"""Expert choice (Zhou et al. 2022): each expert takes its top-C tokens (`routing.expert_choice`).
The choice looks at the whole group: causal in a decoder LM only with group_by='position'."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers.family import Family, Group, Spec, one_slot_each


def route(spec: Spec, group: Group) -> routing.RouterOutput:
  return routing.expert_choice(group.logits, capacity_factor=spec.capacity_factor)


NAME = 'expert_choice'  # config.moe.router
FAMILY = Family(
    route=route, slots=one_slot_each, per_token=lambda spec: None, couples_group=True,
    options=('capacity_factor',), cite='Zhou et al. 2022')
