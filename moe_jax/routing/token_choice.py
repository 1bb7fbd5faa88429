"""Token-choice routing: each token picks its top-k experts.

k=1 is Switch (Fedus et al. 2021), k=2 GShard / Mixtral. With `score='sigmoid'` and a
`selection_bias` this is DeepSeek-V3's auxiliary-loss-free routing (see `aux_free.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.placement import Priority, capacity_for, place
from moe_jax.routing.plan import RouterOutput


def router_scores(logits: jax.Array, score: str) -> jax.Array:
  """[T, E] float32 affinities: softmax over experts, or independent sigmoids (DeepSeek-V3)."""
  if score == 'softmax':
    return jax.nn.softmax(logits, axis=-1)
  if score == 'sigmoid':
    return jax.nn.sigmoid(logits)
  raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}.")


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
