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
  return balance_loss(probs, jax.nn.one_hot(expert_index, probs.shape[-1]).mean(axis=1))


def balance_loss(probs: jax.Array, choices: jax.Array) -> jax.Array:
  """The same loss over any set of tokens: E * sum_e mean(choices[..., e]) * mean(probs[..., e]).

  Args:
    probs: [..., E] router probabilities.
    choices: [..., E] each token's share of its k choices per expert (rows sum to 1).
  """
  num_experts = probs.shape[-1]
  fraction = choices.reshape(-1, num_experts).mean(axis=0)
  mean_prob = probs.reshape(-1, num_experts).mean(axis=0)
  return num_experts * jnp.sum(fraction * mean_prob)


def z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [T, ...] (flattened)."""
  logits = logits.reshape(logits.shape[0], -1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
