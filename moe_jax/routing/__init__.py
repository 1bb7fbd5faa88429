"""Router families: pure functions from float32 router logits to a `RouterOutput`.

`routing/` imports nothing from models, training or parallel code: it is plain array math.
"""
from moe_jax.routing.aux_free import update_bias
from moe_jax.routing.capacity import expert_capacity
from moe_jax.routing.expert_choice import expert_choice
from moe_jax.routing.losses import load_balancing_loss, z_loss
from moe_jax.routing.metrics import load_imbalance, routing_metrics
from moe_jax.routing.plan import DroplessPlan, Plan, RouterOutput, SlotPlan, SoftPlan
from moe_jax.routing.soft import soft_routing
from moe_jax.routing.token_choice import slot_positions, token_choice

__all__ = [
    'DroplessPlan', 'Plan', 'RouterOutput', 'SlotPlan', 'SoftPlan', 'expert_capacity',
    'expert_choice', 'load_balancing_loss', 'load_imbalance', 'routing_metrics', 'slot_positions', 'soft_routing',
    'token_choice', 'update_bias', 'z_loss',
]
