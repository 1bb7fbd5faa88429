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
from moe_jax.routing.plan import Balance, DroplessPlan, RouterOutput, scatter_to_slots

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


def limit_to_groups(choose_by: jax.Array, num_groups: int, groups_per_token: int) -> jax.Array:
  """Group-limited (node-limited) routing, DeepSeek-V3 style: experts are split into `num_groups`
  equal groups; each token keeps its `groups_per_token` best groups, scored by the sum of the group's
  top-2 affinities (top-1 for groups of one expert), and the other experts get -inf.

  Args:
    choose_by: [T, E] selection scores (bias included).

  Returns:
    [T, E] choose_by with the experts outside each token's kept groups at -inf.
  """
  if num_groups == 1:
    return choose_by
  t, num_experts = choose_by.shape
  grouped = choose_by.reshape(t, num_groups, num_experts // num_groups)
  best, _ = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))
  _, kept = jax.lax.top_k(best.sum(-1), groups_per_token)  # [T, groups_per_token]
  mask = jax.nn.one_hot(kept, num_groups, dtype=jnp.bool_).any(axis=1)  # [T, groups]
  return jnp.where(mask[:, :, None], grouped, -jnp.inf).reshape(t, num_experts)


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
    num_groups: int = 1,
    groups_per_token: int = 1,
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
    num_groups, groups_per_token: group-limited routing (`limit_to_groups`); 1, 1 = off.

  Returns:
    RouterOutput with a SlotPlan (or a DroplessPlan when capacity_factor is None); losses
    'load_balancing' and 'z'.
  """
  logits = logits.astype(jnp.float32)
  num_experts = logits.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'k must be in [1, num_experts={num_experts}], got k={k}.')
  if noise_std > 0:
    if rng is None:
      raise ValueError('noise_std > 0 needs an rng key.')
    logits = logits + noise_std * jax.random.normal(rng, logits.shape)
  scores = router_scores(logits, score)
  choose_by = scores if selection_bias is None else scores + selection_bias
  choose_by = limit_to_groups(choose_by, num_groups, groups_per_token)
  _, expert_index = jax.lax.top_k(choose_by, k)  # [T, k]
  weight = jnp.take_along_axis(scores, expert_index, axis=-1)
  if renormalize is None:
    renormalize = k > 1 or score == 'sigmoid'
  if renormalize:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  return place(expert_index, weight, probs, logits, priority=priority,
               capacity=capacity_for(logits.shape[0], num_experts, capacity_factor, k),
               priority_score=jnp.max(scores, axis=-1))


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
