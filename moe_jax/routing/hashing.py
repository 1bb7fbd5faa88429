"""Hash routing (Roller et al. 2021, "Hash layers for large sparse models"): a fixed map from
token id to expert, the classic no-learning baseline.

Each token goes to expert hash(token id) mod E with weight 1; there is no router to train, so no
auxiliary loss. The hash is a fixed integer mix (a murmur3 finalizer) of the id and a seed, so
ids spread evenly over the experts and the map is the same on every device and run. Causal: a
token's expert depends on its own id alone (with a capacity, as token choice: `priority='token'`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.plan import RouterOutput
from moe_jax.routing.placement import Priority, capacity_for, place


def hash_expert(token_ids: jax.Array, num_experts: int, seed: int = 0) -> jax.Array:
  """[...] int token ids -> [...] int32 experts in [0, E): murmur3's 32-bit finalizer of id + seed."""
  x = token_ids.astype(jnp.uint32) + jnp.uint32(seed)
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  x = x ^ (x >> 16)
  return (x % jnp.uint32(num_experts)).astype(jnp.int32)


def hash_routing(token_ids: jax.Array, num_experts: int, *, capacity_factor: float | None,
                 priority: Priority = 'token', seed: int = 0) -> RouterOutput:
  """Routes each token to its hashed expert.

  Args:
    token_ids: [T] int token ids of one group.
    num_experts: E.
    capacity_factor: as `token_choice` with k = 1 (None: dropless).
    seed: picks another fixed map.

  Returns:
    RouterOutput with weights 1; losses 0 (nothing to learn); metrics with a one-hot 'probability'
    (router entropy 0).
  """
  expert_index = hash_expert(token_ids, num_experts, seed)[:, None]
  probs = jax.nn.one_hot(expert_index[:, 0], num_experts)
  out = place(expert_index, jnp.ones(expert_index.shape, jnp.float32), probs, None,
              priority=priority,
              capacity=capacity_for(token_ids.shape[0], num_experts, capacity_factor, 1))
  return out.replace(losses=jax.tree.map(jnp.zeros_like, dict(out.losses)), balance=None)
