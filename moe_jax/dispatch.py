"""Executing a routing plan: dispatch tokens to expert buffers, combine expert outputs.

Implementations, all computing the same function (tests compare them):

* 'einsum'  the one-hot reference: dense [T, E, C] dispatch/combine tensors and two einsums.
* 'gather'  index gather into [E, C, d] buffers and scatter-add back: O(E*C*d), no [T, E, C] tensor.
* 'ragged'  dropless only: sort assignments by expert, grouped matmul (`jax.lax.ragged_dot`), unsort.

A `DroplessPlan` run with 'einsum' or 'gather' goes through its equivalent `SlotPlan` of capacity T;
a `SoftPlan` is dense by nature and always runs as two einsums.

The fast path 'blocked' (`MoESpec.dispatch`) lives in `moe_jax.fast_dispatch`: it skips the
[E, C, d] buffers altogether (expert-sorted rows, grouped matmul kernels) and computes the same
function.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing.plan import DroplessPlan, Plan, SlotPlan, SoftPlan

IMPLEMENTATIONS = ('einsum', 'gather', 'ragged')


@struct.dataclass
class Ragged:
  """Tokens sorted by expert. rows: [N, d]; group_sizes: [E] int32 (sums to N)."""
  rows: jax.Array
  group_sizes: jax.Array


def _one_hot_slots(plan: SlotPlan, dtype) -> jax.Array:
  """[T, E, C] 0/1 tensor: token t sits in slot (e, c)."""
  tokens = jnp.arange(plan.num_tokens, dtype=plan.slot_token.dtype)
  return (plan.slot_token[None] == tokens[:, None, None]).astype(dtype)


def _sort_by_expert(plan: DroplessPlan) -> tuple[jax.Array, jax.Array]:
  """Assignment order sorted by expert ([T*k] indices into the flattened [T, k]) and group sizes."""
  flat_expert = plan.expert_index.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  group_sizes = jnp.bincount(flat_expert, length=plan.num_experts).astype(jnp.int32)
  return order, group_sizes


def dispatch(plan: Plan, x: jax.Array, impl: str = 'gather') -> jax.Array | Ragged:
  """Moves tokens into expert buffers.

  Args:
    plan: routing plan for T tokens.
    x: [T, d] tokens.
    impl: one of IMPLEMENTATIONS.

  Returns:
    [E, C, d] buffers (empty slots are zero), or `Ragged` rows for impl='ragged'.
  """
  _check_impl(plan, impl)
  if isinstance(plan, SoftPlan):
    return jnp.einsum('tes,td->esd', plan.dispatch.astype(x.dtype), x)
  if isinstance(plan, DroplessPlan):
    if impl == 'ragged':
      order, group_sizes = _sort_by_expert(plan)
      k = plan.expert_index.shape[1]
      return Ragged(rows=x[order // k], group_sizes=group_sizes)
    plan = plan.to_slot_plan()
  if impl == 'einsum':
    return jnp.einsum('tec,td->ecd', _one_hot_slots(plan, x.dtype), x)
  padded = jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)  # row T is the empty slot
  return padded[plan.slot_token]


def combine(plan: Plan, y: jax.Array | Ragged, impl: str = 'gather') -> jax.Array:
  """Weights expert outputs back into token order; dropped tokens get zeros.

  Args:
    plan: the plan `y` was dispatched with.
    y: [E, C, d] expert outputs, or `Ragged` for impl='ragged'.

  Returns:
    [T, d] in y's dtype, accumulated in float32.
  """
  _check_impl(plan, impl)
  if isinstance(plan, SoftPlan):
    out = jnp.einsum('tes,esd->td', plan.combine, y, preferred_element_type=jnp.float32)
    return out.astype(y.dtype)
  if isinstance(plan, DroplessPlan):
    if impl == 'ragged':
      order, _ = _sort_by_expert(plan)
      t, k = plan.expert_index.shape
      unsorted = jnp.zeros_like(y.rows).at[order].set(y.rows).reshape(t, k, -1)
      out = jnp.einsum('tk,tkd->td', plan.weight, unsorted, preferred_element_type=jnp.float32)
      return out.astype(y.rows.dtype)
    plan = plan.to_slot_plan()
  if impl == 'einsum':
    weights = _one_hot_slots(plan, jnp.float32) * plan.slot_weight[None]
    out = jnp.einsum('tec,ecd->td', weights, y, preferred_element_type=jnp.float32)
    return out.astype(y.dtype)
  weighted = plan.slot_weight[..., None] * y.astype(jnp.float32)  # [E, C, d]
  out = jnp.zeros((plan.num_tokens + 1, y.shape[-1]), jnp.float32)
  out = out.at[plan.slot_token.reshape(-1)].add(weighted.reshape(-1, y.shape[-1]))
  return out[:-1].astype(y.dtype)


def moe_apply(plan: Plan, x: jax.Array, experts: Callable, impl: str = 'gather',
              ragged_experts: Callable | None = None) -> jax.Array:
  """dispatch -> experts -> combine. x: [T, d] -> [T, d].

  Args:
    experts: [E, C, d] -> [E, C, d].
    ragged_experts: (rows [N, d], group_sizes [E]) -> [N, d]; needed for impl='ragged'.
  """
  buffers = dispatch(plan, x, impl)
  if isinstance(buffers, Ragged):
    if ragged_experts is None:
      raise ValueError("impl='ragged' needs ragged_experts.")
    y = Ragged(rows=ragged_experts(buffers.rows, buffers.group_sizes),
               group_sizes=buffers.group_sizes)
  else:
    y = experts(buffers)
  return combine(plan, y, impl)


def _check_impl(plan: Plan, impl: str) -> None:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'dispatch impl must be one of {IMPLEMENTATIONS}, got {impl!r}.')
  if impl == 'ragged' and not isinstance(plan, DroplessPlan):
    raise ValueError(f"dispatch impl='ragged' runs dropless routing only (capacity_factor=None); "
                     f"this plan is a {type(plan).__name__}: use 'gather' or 'einsum'.")
