"""Routing math: pure functions from float32 router logits to a `RouterOutput`.

`routing/` imports nothing from models, training or parallel code: it is plain array math. What the
rest of the code needs to know of each `config.moe.router` (its options, checks, FLOPs, causality)
lives one level up, in the router families (`moe_jax/routers/`, registered in `moe_jax.moe.families`).
"""
from moe_jax.routing.aux_free import update_bias
from moe_jax.routing.balanced import balanced_assignment, base_routing
from moe_jax.routing.capacity import expert_capacity
from moe_jax.routing.expert_choice import expert_choice
from moe_jax.routing.hashing import hash_expert, hash_routing
from moe_jax.routing.losses import balance_loss, load_balancing_loss, z_loss
from moe_jax.routing.metrics import load_imbalance, routing_metrics
from moe_jax.routing.placement import Priority, capacity_for, place, slot_positions
from moe_jax.routing.plan import Balance, DroplessPlan, Plan, RouterOutput, SlotPlan, SoftPlan
from moe_jax.routing.sinkhorn import sinkhorn, sinkhorn_routing
from moe_jax.routing.soft import soft_routing
from moe_jax.routing.token_choice import limit_to_groups, token_choice

__all__ = [
    'Balance', 'DroplessPlan', 'Plan', 'Priority', 'RouterOutput', 'SlotPlan', 'SoftPlan',
    'balance_loss', 'balanced_assignment', 'base_routing', 'capacity_for', 'expert_capacity',
    'expert_choice', 'hash_expert', 'hash_routing', 'limit_to_groups', 'load_balancing_loss',
    'load_imbalance', 'place', 'routing_metrics', 'sinkhorn', 'sinkhorn_routing', 'slot_positions',
    'soft_routing', 'token_choice', 'update_bias', 'z_loss',
]
