"""Placing top-k choices: the capacity of a group, the order in which choices claim it, and the
`RouterOutput` of the choices (plan, losses, metrics). Shared by every family that picks experts
per token: token choice, Sinkhorn, BASE layers, hash layers, and families registered by users.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from moe_jax.routing import losses
from moe_jax.routing.capacity import expert_capacity
from moe_jax.routing.metrics import routing_metrics
from moe_jax.routing.plan import Balance, DroplessPlan, RouterOutput, scatter_to_slots

Priority = Literal['choice', 'token', 'batch']


def slot_positions(expert_index: jax.Array, num_experts: int, priority: Priority,
                   priority_score: jax.Array | None = None) -> jax.Array:
  """Position of each assignment in its expert's buffer, in priority order.

  Args:
    expert_index: [T, k] chosen experts.
    priority: 'choice' fills all first choices, then all second choices, ... (GShard);
      'token' fills token 0's choices, then token 1's, ... (causal: no token is displaced by a
      later one); 'batch' is 'choice' with tokens sorted by `priority_score`, highest first
      (batch-prioritized routing, Riquelme et al. 2021).
    priority_score: [T] used by 'batch'.

  Returns:
    [T, k] int32 positions; >= capacity means dropped.
  """
  t, k = expert_index.shape
  if priority == 'batch':
    order = jnp.argsort(-priority_score, stable=True)
  elif priority in ('choice', 'token'):
    order = jnp.arange(t)
  else:
    raise ValueError(f"priority must be 'choice', 'token' or 'batch', got {priority!r}.")
  onehot = jax.nn.one_hot(expert_index[order], num_experts, dtype=jnp.int32)  # [T, k, E]
  if priority == 'token':
    flat = onehot.reshape(t * k, num_experts)
  else:
    flat = onehot.transpose(1, 0, 2).reshape(k * t, num_experts)
  position = jnp.cumsum(flat, axis=0) - 1
  position = jnp.sum(position * flat, axis=-1)
  position = position.reshape(t, k) if priority == 'token' else position.reshape(k, t).T
  return jnp.zeros_like(position).at[order].set(position)


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: float | None,
                 k: int) -> int | None:
  """Slots per expert of a group (`expert_capacity`), or None when dropless."""
  if capacity_factor is None:
    return None
  return expert_capacity(num_tokens, num_experts, capacity_factor, k)


def place(expert_index: jax.Array, weight: jax.Array, probs: jax.Array, logits: jax.Array | None,
          *, capacity: int | None, priority: Priority = 'token',
          priority_score: jax.Array | None = None) -> RouterOutput:
  """The RouterOutput of top-k choices: their plan, losses and metrics (every top-k family).

  Args:
    expert_index: [T, k] chosen experts, distinct within a row.
    weight: [T, k] combine weights.
    probs: [T, E] router probabilities (rows sum to 1), for the balance loss and the entropy.
    logits: [T, E] router logits for the z-loss, or None (no learned router: z = 0).
    capacity: slots per expert, claimed in `priority` order (`slot_positions`); None: dropless.
    priority_score: [T] the order of priority='batch' (default: the top probability).

  Returns:
    RouterOutput with a SlotPlan (DroplessPlan when dropless), losses 'load_balancing' (Switch) and
    'z', metrics, and the per-token `Balance` terms.
  """
  t, k = expert_index.shape
  num_experts = probs.shape[-1]
  if capacity is None:
    plan = DroplessPlan(expert_index=expert_index, weight=weight, num_experts=num_experts)
  else:
    if priority_score is None:
      priority_score = jnp.max(probs, axis=-1)
    position = slot_positions(expert_index, num_experts, priority, priority_score)
    plan = scatter_to_slots(expert_index, position, weight, num_experts, capacity)
  balance = Balance(probs=probs, choices=jax.nn.one_hot(expert_index, num_experts).mean(axis=1))
  z = jnp.zeros((), jnp.float32) if logits is None else losses.z_loss(logits)
  return RouterOutput(
      plan=plan,
      losses={'load_balancing': balance.loss(), 'z': z},
      metrics=routing_metrics(plan, probs, num_assignments=k),
      balance=balance)
