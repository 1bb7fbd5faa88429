"""Routing plans: what a router decides, in a form that dispatch/combine can execute.

Three layouts cover every router family:

* `SlotPlan`      capacity-bounded sparse routing (token choice with capacity, expert choice):
                  expert `e`'s slot `c` holds token `slot_token[e, c]` with weight `slot_weight[e, c]`.
* `DroplessPlan`  every token keeps all of its `k` choices (no capacity, nothing dropped).
* `SoftPlan`      Soft MoE: every slot is a convex mix of all tokens, every output a convex mix
                  of all slots.

A router returns a `RouterOutput`: the plan plus its auxiliary losses and metrics.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import losses


@struct.dataclass
class SlotPlan:
  """Sparse routing into fixed-size expert buffers.

  Attributes:
    slot_token: [E, C] int32 token index held by each slot; `num_tokens` marks an empty slot.
    slot_weight: [E, C] float32 combine weight of each slot (0 for empty slots).
    num_tokens: T (static).
    max_per_token: the most slots one token can hold (static): k for token choice, None for
      expert choice (up to E).
  """
  slot_token: jax.Array
  slot_weight: jax.Array
  num_tokens: int = struct.field(pytree_node=False)
  max_per_token: int | None = struct.field(pytree_node=False, default=None)

  @property
  def num_experts(self) -> int:
    return self.slot_token.shape[0]

  @property
  def capacity(self) -> int:
    return self.slot_token.shape[1]

  def occupied(self) -> jax.Array:
    """[E, C] bool: slot holds a token."""
    return self.slot_token < self.num_tokens

  def expert_load(self) -> jax.Array:
    """[E] float32 number of tokens each expert processes."""
    return self.occupied().sum(axis=1).astype(jnp.float32)

  def slots_per_token(self) -> jax.Array:
    """[T] float32 number of expert slots holding each token (0 = dropped)."""
    ones = self.occupied().astype(jnp.float32).reshape(-1)
    return jnp.zeros(self.num_tokens + 1).at[self.slot_token.reshape(-1)].add(ones)[:-1]

  def to_slot_plan(self) -> SlotPlan:
    return self


@struct.dataclass
class DroplessPlan:
  """Token-choice routing without capacity: each token goes to all of its `k` experts.

  Attributes:
    expert_index: [T, k] int32 chosen experts, distinct within a row.
    weight: [T, k] float32 combine weights.
    num_experts: E (static).
  """
  expert_index: jax.Array
  weight: jax.Array
  num_experts: int = struct.field(pytree_node=False)

  @property
  def num_tokens(self) -> int:
    return self.expert_index.shape[0]

  def expert_load(self) -> jax.Array:
    """[E] float32 number of tokens each expert processes."""
    return jnp.zeros(self.num_experts).at[self.expert_index.reshape(-1)].add(1.0)

  def slots_per_token(self) -> jax.Array:
    """[T] float32, always k."""
    return jnp.full((self.num_tokens,), float(self.expert_index.shape[1]))

  def to_slot_plan(self) -> SlotPlan:
    """The same routing as a `SlotPlan` with capacity T (every expert can hold every token)."""
    t, k = self.expert_index.shape
    onehot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.int32)  # [T, k, E]
    position = (jnp.cumsum(onehot.reshape(t * k, -1), axis=0) - 1).reshape(t, k, -1)
    position = jnp.sum(position * onehot, axis=-1)  # [T, k]
    return scatter_to_slots(self.expert_index, position, self.weight, self.num_experts, capacity=t)


@struct.dataclass
class SoftPlan:
  """Soft MoE routing (Puigcerver et al. 2023).

  Attributes:
    dispatch: [T, E, S] float32; for each slot (e, s) a softmax over tokens (sums to 1 over T).
    combine: [T, E, S] float32; for each token a softmax over all slots (sums to 1 over E, S).
  """
  dispatch: jax.Array
  combine: jax.Array

  @property
  def num_tokens(self) -> int:
    return self.dispatch.shape[0]

  @property
  def num_experts(self) -> int:
    return self.dispatch.shape[1]

  @property
  def capacity(self) -> int:
    return self.dispatch.shape[2]

  def expert_load(self) -> jax.Array:
    """[E] float32 total token mass dispatched to each expert (= slots per expert)."""
    return self.dispatch.sum(axis=(0, 2))

  def slots_per_token(self) -> jax.Array:
    """[T] float32 total combine mass of each token (= 1: no token is ever dropped)."""
    return self.combine.sum(axis=(1, 2))


Plan = SlotPlan | DroplessPlan | SoftPlan


@struct.dataclass
class Balance:
  """Per-token terms of the Switch load-balancing loss, so that it can be taken over any tokens:
  one group (the router's own loss), a sequence, or the global batch (`MoESpec.balance_over`).

  Attributes:
    probs: [T, E] router probabilities (rows sum to 1).
    choices: [T, E] each token's share of its k choices per expert (rows sum to 1).
  """
  probs: jax.Array
  choices: jax.Array

  def loss(self) -> jax.Array:
    """E * sum_e f_e * P_e over every token held (1 when perfectly balanced)."""
    return losses.balance_loss(self.probs, self.choices)


@struct.dataclass
class RouterOutput:
  """A routing plan with its auxiliary losses (scalars, unweighted) and metrics; top-k families
  also give their per-token `Balance` terms."""
  plan: Plan
  losses: Mapping[str, jax.Array]
  metrics: Mapping[str, jax.Array]
  balance: Balance | None = None


def scatter_to_slots(expert_index, position, weight, num_experts: int, capacity: int) -> SlotPlan:
  """Builds a `SlotPlan` from per-assignment slot positions; positions >= capacity are dropped.

  Args:
    expert_index: [T, k] int32 expert of each assignment.
    position: [T, k] int32 slot of each assignment inside its expert's buffer.
    weight: [T, k] float32 combine weight of each assignment.
  """
  t, k = expert_index.shape
  token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
  slot_token = jnp.full((num_experts, capacity), t, jnp.int32)
  slot_token = slot_token.at[expert_index, position].set(token, mode='drop')
  slot_weight = jnp.zeros((num_experts, capacity), jnp.float32)
  slot_weight = slot_weight.at[expert_index, position].set(weight, mode='drop')
  return SlotPlan(slot_token=slot_token, slot_weight=slot_weight, num_tokens=t, max_per_token=k)
