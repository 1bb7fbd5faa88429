"""Auxiliary router losses. Each returns an unweighted float32 scalar; coefficients live in config."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
  """Switch Transformer balance loss, E * sum_e f_e * P_e (1 when perfectly balanced).

  Args:
    probs: [T, E] router probabilities (rows sum to 1).
    expert_index: [T, k] experts chosen per token; f_e counts all k choices, normalized by T * k.
  """
  num_experts = probs.shape[-1]
  fraction = jax.nn.one_hot(expert_index, num_experts).mean(axis=(0, 1))  # [E]
  mean_prob = probs.mean(axis=0)  # [E]
  return num_experts * jnp.sum(fraction * mean_prob)


def z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [T, ...] (flattened)."""
  logits = logits.reshape(logits.shape[0], -1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
