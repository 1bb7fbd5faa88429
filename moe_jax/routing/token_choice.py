"""Token-choice routing: each token picks its top-k experts.

k=1 is Switch (Fedus et al. 2021), k=2 GShard / Mixtral. With `score='sigmoid'` and a
`selection_bias` this is DeepSeek-V3's auxiliary-loss-free routing (see `aux_free.py`).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from moe_jax.routing import losses
from moe_jax.routing.capacity import expert_capacity
from moe_jax.routing.metrics import routing_metrics
from moe_jax.routing.plan import DroplessPlan, RouterOutput, scatter_to_slots

Priority = Literal['choice', 'token', 'batch']


def router_scores(logits: jax.Array, score: str) -> jax.Array:
  """[T, E] float32 affinities: softmax over experts, or independent sigmoids (DeepSeek-V3)."""
  if score == 'softmax':
    return jax.nn.softmax(logits, axis=-1)
  if score == 'sigmoid':
    return jax.nn.sigmoid(logits)
  raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}.")


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


def token_choice(
    logits: jax.Array,
    *,
    k: int,
    capacity_factor: float | None,
    score: str = 'softmax',
    renormalize: bool | None = None,
    priority: Priority = 'choice',
    selection_bias: jax.Array | None = None,
    noise_std: float = 0.0,
    rng: jax.Array | None = None,
) -> RouterOutput:
  """Routes each token to its top-k experts.

  Args:
    logits: [T, E] float32 router logits.
    k: experts per token.
    capacity_factor: slots per expert = round(k * T * capacity_factor / E); assignments past
      capacity are dropped (their tokens pass through the residual). None: dropless.
    score: 'softmax' or 'sigmoid' affinities.
    renormalize: rescale the k kept weights to sum to 1. Default: True for k > 1 or sigmoid
      (GShard, Mixtral, DeepSeek-V3), False for k = 1 (Switch).
    priority: order in which assignments claim capacity (see `slot_positions`).
    selection_bias: [E] added to scores for choosing experts only, never to the weights
      (auxiliary-loss-free balancing).
    noise_std: Gaussian noise added to the logits (noisy top-k, Shazeer et al. 2017); needs rng.
    rng: PRNG key for the noise.

  Returns:
    RouterOutput with a SlotPlan (or a DroplessPlan when capacity_factor is None); losses
    'load_balancing' and 'z'.
  """
  logits = logits.astype(jnp.float32)
  t, num_experts = logits.shape
  if not 1 <= k <= num_experts:
    raise ValueError(f'k must be in [1, num_experts={num_experts}], got k={k}.')
  if noise_std > 0:
    if rng is None:
      raise ValueError('noise_std > 0 needs an rng key.')
    logits = logits + noise_std * jax.random.normal(rng, logits.shape)
  scores = router_scores(logits, score)
  choose_by = scores if selection_bias is None else scores + selection_bias
  _, expert_index = jax.lax.top_k(choose_by, k)  # [T, k]
  weight = jnp.take_along_axis(scores, expert_index, axis=-1)
  if renormalize is None:
    renormalize = k > 1 or score == 'sigmoid'
  if renormalize:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)

  if capacity_factor is None:
    plan = DroplessPlan(expert_index=expert_index, weight=weight, num_experts=num_experts)
  else:
    capacity = expert_capacity(t, num_experts, capacity_factor, k)
    position = slot_positions(expert_index, num_experts, priority, priority_score=jnp.max(scores, axis=-1))
    plan = scatter_to_slots(expert_index, position, weight, num_experts, capacity)

  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return RouterOutput(
      plan=plan,
      losses={'load_balancing': losses.load_balancing_loss(probs, expert_index),
              'z': losses.z_loss(logits)},
      metrics=routing_metrics(plan, probs, num_assignments=k))
