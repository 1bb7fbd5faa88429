"""Routing metrics computed from any plan (all float32 scalars, except the [E] load)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.plan import Plan


def entropy(probs: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the router distribution. probs: [T, E] rows summing to 1."""
  return -jnp.mean(jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-9)), axis=-1))


def load_imbalance(load: jax.Array) -> jax.Array:
  """max / mean of the per-expert load [E] (1 = perfectly balanced)."""
  return jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9)


def routing_metrics(plan: Plan, probs: jax.Array, num_assignments: int) -> dict[str, jax.Array]:
  """Per-layer metrics of one routing decision.

  Args:
    plan: the routing plan.
    probs: [T, E] router probabilities (for the entropy).
    num_assignments: assignments each token asks for before capacity (k; 1 for Soft MoE).

  Returns:
    tokens_per_expert [E]; fraction_dropped (tokens in no slot); assignments_dropped (fraction of
    the T * k wanted assignments without a slot); max_load / mean_load; router_entropy.
  """
  load = plan.expert_load()
  kept = plan.slots_per_token()
  t = kept.shape[0]
  return {
      'tokens_per_expert': load,
      'fraction_dropped': jnp.mean((kept <= 0).astype(jnp.float32)),
      'assignments_dropped': 1.0 - jnp.sum(jnp.minimum(kept, num_assignments)) / (t * num_assignments),
      'max_over_mean_load': load_imbalance(load),
      'router_entropy': entropy(probs),
  }
