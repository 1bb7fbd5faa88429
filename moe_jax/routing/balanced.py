"""BASE layers (Lewis et al. 2021): a balanced assignment of tokens to experts.

In training every expert takes at most C = ceil(T / E) tokens of a group (exactly T / E when E
divides T) and every token exactly one expert: the assignment that maximizes the total token-expert
affinity under that constraint, found by the auction algorithm (Bertsekas 1988) as BASE layers do.
No token is dropped and no auxiliary loss is needed: balance holds by construction. A token's
output is sigmoid(affinity) * FFN_e(x) (BASE's gate). In evaluation each token takes its best
expert (BASE's greedy test-time routing).

Causality: the assignment couples every token of a group, so in training a token's expert depends
on later tokens unless the group holds one position of every sequence (`group_by='position'`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.routing.plan import RouterOutput
from moe_jax.routing.placement import place


def balanced_capacity(num_tokens: int, num_experts: int) -> int:
  """C = ceil(T / E): the tokens each expert takes under a balanced assignment."""
  return math.ceil(num_tokens / num_experts)


def _auction_round(state, scores, capacity: int, eps: jax.Array):
  """One round: every unassigned token bids for its best expert at the current prices; each expert
  keeps its `capacity` highest bids (ties: lower token index) and, once full, raises its price to
  the lowest bid it kept."""
  price, owner, bid, rounds = state
  t, e = scores.shape
  value = scores - price[None, :]
  top_value, top_expert = jax.lax.top_k(value, 2)
  best, second, choice = top_value[:, 0], top_value[:, 1], top_expert[:, 0]
  free = owner < 0
  owner = jnp.where(free, choice, owner)
  bid = jnp.where(free, price[choice] + best - second + eps, bid)
  claims = jnp.where(jax.nn.one_hot(owner, e, dtype=jnp.bool_), bid[:, None], -jnp.inf)  # [T, E]
  order = jnp.argsort(-claims, axis=0, stable=True)  # order[r, e]: the token of rank r
  rank = jnp.zeros((t, e), jnp.int32).at[order, jnp.arange(e)[None, :]].set(
      jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, e)))
  kept = (rank < capacity) & jnp.isfinite(claims)  # [T, E]
  full = kept.sum(axis=0) >= capacity
  price = jnp.where(full, jnp.min(jnp.where(kept, claims, jnp.inf), axis=0), price)
  owner = jnp.where(kept.any(axis=1), owner, -1)
  return price, owner, bid, rounds + 1


def _fill_free_slots(owner: jax.Array, num_experts: int, capacity: int) -> jax.Array:
  """Gives each still unassigned token (owner -1) a free expert slot, in token order. [T] -> [T]."""
  assigned = jnp.where(owner < 0, num_experts, owner)  # out of bounds: not counted
  count = jnp.zeros(num_experts, jnp.int32).at[assigned].add(1, mode='drop')
  slot = jnp.arange(num_experts * capacity)
  free = slot % capacity >= count[slot // capacity]
  free_slots = jnp.argsort(~free, stable=True)  # free slots first, in order
  waiting = jnp.cumsum(owner < 0) - 1
  return jnp.where(owner < 0, free_slots[jnp.clip(waiting, 0)] // capacity, owner).astype(jnp.int32)


def balanced_assignment(scores: jax.Array, *, max_rounds: int = 100,
                        eps: float | None = None) -> jax.Array:
  """The expert of each token under a balanced assignment (at most ceil(T / E) tokens per expert)
  that maximizes sum_t scores[t, expert_t], by the auction algorithm.

  Args:
    scores: [T, E] float32 affinities.
    max_rounds: bidding rounds; tokens still unassigned after them take the free slots in token
      order (the assignment stays balanced; only its optimality is then approximate).
    eps: the bid increment (default 1e-3 of the score range). A finished auction is within
      T * eps of the optimum.

  Returns:
    [T] int32 expert of each token.
  """
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  t, e = scores.shape
  capacity = balanced_capacity(t, e)
  if e == 1:
    return jnp.zeros(t, jnp.int32)
  if eps is None:
    eps = 1e-3 * (jnp.max(scores) - jnp.min(scores)) + 1e-12
  # initial values derived from `scores`, so that they vary over a mesh exactly as it does
  init = (jnp.zeros_like(scores[0]), jnp.full_like(scores[:, 0], -1, jnp.int32),
          jnp.zeros_like(scores[:, 0]), 0)
  _, owner, _, _ = jax.lax.while_loop(
      lambda s: jnp.any(s[1] < 0) & (s[3] < max_rounds),
      lambda s: _auction_round(s, scores, capacity, eps), init)
  return _fill_free_slots(owner, e, capacity)


def base_routing(logits: jax.Array, *, train: bool = True, max_rounds: int = 100) -> RouterOutput:
  """BASE layer routing of one group.

  Args:
    logits: [T, E] float32 token-expert affinities.
    train: balanced assignment (training) or each token's best expert (evaluation).

  Returns:
    RouterOutput with a SlotPlan of capacity ceil(T / E) in training (nothing dropped), a
    DroplessPlan in evaluation; weights sigmoid(affinity); losses as `token_choice`'s.
  """
  logits = logits.astype(jnp.float32)
  t, e = logits.shape
  if train:
    expert_index = balanced_assignment(logits, max_rounds=max_rounds)[:, None]
  else:
    expert_index = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
  weight = jax.nn.sigmoid(jnp.take_along_axis(logits, expert_index, axis=-1))
  return place(expert_index, weight, jax.nn.softmax(logits, axis=-1), logits,
               capacity=balanced_capacity(t, e) if train else None)
