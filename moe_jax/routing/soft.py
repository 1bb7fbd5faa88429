"""Soft MoE routing (Puigcerver et al. 2023): slots are convex mixes of tokens.

Fully differentiable, never drops a token, balanced by construction. Each slot mixes every token of
its group, so it is not causal; language models use groups of one position across the batch
(see `moe_jax.moe.layer`), which keeps causality at the price of coupling the batch's sequences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses
from moe_jax.routing.metrics import routing_metrics
from moe_jax.routing.plan import RouterOutput, SoftPlan


def soft_routing(logits: jax.Array) -> RouterOutput:
  """Soft MoE dispatch and combine weights.

  Args:
    logits: [T, E, S] float32 token-slot affinities (E experts, S slots each).

  Returns:
    RouterOutput with a SoftPlan: dispatch = softmax over tokens (axis 0), combine = softmax over
    all E * S slots; loss 'z' on the combine logits, 'load_balancing' = 0.
  """
  logits = logits.astype(jnp.float32)
  t, num_experts, slots = logits.shape
  dispatch = jax.nn.softmax(logits, axis=0)
  combine = jax.nn.softmax(logits.reshape(t, -1), axis=-1).reshape(t, num_experts, slots)
  plan = SoftPlan(dispatch=dispatch, combine=combine)
  probs = combine.sum(axis=-1)  # [T, E] combine mass per expert
  return RouterOutput(
      plan=plan,
      losses={'load_balancing': jnp.zeros((), jnp.float32), 'z': losses.z_loss(logits)},
      metrics=routing_metrics(plan, probs, num_assignments=1))
