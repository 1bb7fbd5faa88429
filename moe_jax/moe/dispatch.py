"""Executing a routing plan: tokens to expert rows, the expert FFN on them, and back.

A dispatcher is a plan of G groups (every leaf with a leading G axis, as `jax.vmap` of a router
returns it) bound to an executor (`MoESpec.dispatch`):

  rows = d.dispatch(x)                  x: [G, T, d] -> rows in the compute dtype, d's own layout
  y = feed_forward(d.matmul, rows, *w)  the expert FFN, every product by d.matmul (`Experts`)
  out = d.combine(y)                    -> [G, T, d]; dropped tokens get zero

`DISPATCHERS` names the dispatcher of each plan type and executor: a new plan type or executor is
new classes and their rows there. All compute the same function (tests compare them):

* 'einsum'   `OneHot`, the reference: one-hot [T, E, C] dispatch and combine tensors, two einsums.
* 'gather'   `Gather`: index gather into the [E, C] slots and scatter-add back, no [T, E, C] tensor.
* 'ragged'   `Ragged`, dropless only: rows sorted by expert, `jax.lax.ragged_dot`, unsorted.
* 'blocked'  `fast_dispatch.Blocked`: expert-sorted rows in blocks, grouped matmul kernels.

`config.moe.dispatch='auto'` is one of these, picked per backend when the layer is traced
(`moe_jax.moe.spec.resolve_dispatch`: 'blocked' on GPU in bf16, 'ragged' on TPU for dropless
routing, else 'gather').

A `DroplessPlan` runs 'einsum' and 'gather' as its `SlotPlan` of capacity T. A `SoftPlan` is dense
by nature and runs as two einsums (`Soft`) under every executor but 'ragged'.

Under expert parallelism (`expert_axis`) capacity buffers travel by all_to_all (`ExpertParallel`).
A `DroplessPlan`'s rows ('ragged', 'blocked') travel by ragged all-to-all to grouped matmuls
(`EXPERT_PARALLEL`: `fast_dispatch.BlockedExpertParallel`); a `SlotPlan`'s 'blocked' runs as
'gather'. `moe_apply(..., num_chunks=n)` runs a dropless plan's tokens in n chunks, so that the
exchange of one chunk can overlap the experts of another.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from moe_jax.moe import fast_dispatch
from moe_jax.routing.plan import DroplessPlan, Plan, SlotPlan, SoftPlan
from moe_jax.validate import log_once

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
  """A plan bound to an executor (see the module docstring)."""

  def dispatch(self, x: jax.Array) -> jax.Array: ...

  def matmul(self, rows: jax.Array, w: jax.Array) -> jax.Array: ...

  def combine(self, y: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Buffers:
  """Capacity buffers: each group's tokens fill [E, C, d] (`group_dispatch`), and the experts run
  every group's buffers at once as rows [E, G * C, d], which an all_to_all can split by expert."""
  plan: Plan
  dtype: Any

  def dispatch(self, x: jax.Array) -> jax.Array:
    buffers = jax.vmap(self.group_dispatch)(self.plan, x)
    g, e, c, d = buffers.shape
    return buffers.transpose(1, 0, 2, 3).reshape(e, g * c, d).astype(self.dtype)

  def matmul(self, rows: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum('ecd,edf->ecf', rows, w)

  def combine(self, y: jax.Array) -> jax.Array:
    e, rows, d = y.shape
    g = jax.tree.leaves(self.plan)[0].shape[0]
    y = y.reshape(e, g, rows // g, d).transpose(1, 0, 2, 3)
    return jax.vmap(self.group_combine)(self.plan, y)


def _one_hot_slots(plan: SlotPlan, dtype) -> jax.Array:
  """[T, E, C] 0/1 tensor: token t sits in slot (e, c)."""
  tokens = jnp.arange(plan.num_tokens, dtype=plan.slot_token.dtype)
  return (plan.slot_token[None] == tokens[:, None, None]).astype(dtype)


class OneHot(Buffers):
  """'einsum', the reference: one-hot [T, E, C] dispatch and combine tensors, two einsums."""

  @staticmethod
  def group_dispatch(plan: SlotPlan | DroplessPlan, x: jax.Array) -> jax.Array:
    plan = plan.to_slot_plan()
    return jnp.einsum('tec,td->ecd', _one_hot_slots(plan, x.dtype), x)

  @staticmethod
  def group_combine(plan: SlotPlan | DroplessPlan, y: jax.Array) -> jax.Array:
    plan = plan.to_slot_plan()
    weights = _one_hot_slots(plan, jnp.float32) * plan.slot_weight[None]
    out = jnp.einsum('tec,ecd->td', weights, y, preferred_element_type=jnp.float32)
    return out.astype(y.dtype)


class Gather(Buffers):
  """'gather': index gather into the [E, C] slots and scatter-add back, O(E * C * d)."""

  @staticmethod
  def group_dispatch(plan: SlotPlan | DroplessPlan, x: jax.Array) -> jax.Array:
    plan = plan.to_slot_plan()
    padded = jnp.concatenate([x, jnp.zeros_like(x[:1])], axis=0)  # row T is the empty slot
    return padded[plan.slot_token]

  @staticmethod
  def group_combine(plan: SlotPlan | DroplessPlan, y: jax.Array) -> jax.Array:
    plan = plan.to_slot_plan()
    weighted = plan.slot_weight[..., None] * y.astype(jnp.float32)  # [E, C, d]
    out = jnp.zeros((plan.num_tokens + 1, y.shape[-1]), jnp.float32)
    out = out.at[plan.slot_token.reshape(-1)].add(weighted.reshape(-1, y.shape[-1]))
    return out[:-1].astype(y.dtype)


class Soft(Buffers):
  """Soft MoE: every slot a mix of all tokens, every output a mix of all slots (C = S)."""

  @staticmethod
  def group_dispatch(plan: SoftPlan, x: jax.Array) -> jax.Array:
    return jnp.einsum('tes,td->esd', plan.dispatch.astype(x.dtype), x)

  @staticmethod
  def group_combine(plan: SoftPlan, y: jax.Array) -> jax.Array:
    out = jnp.einsum('tes,esd->td', plan.combine, y, preferred_element_type=jnp.float32)
    return out.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class Ragged:
  """'ragged', dropless only: each of the G * T * k assignments is one row [G * T * k, d], rows
  sorted by expert, and each expert's product one slice of a grouped matmul (`ragged_dot`)."""
  plan: DroplessPlan
  dtype: Any

  @functools.cached_property
  def _sorted(self) -> tuple[jax.Array, jax.Array]:
    """(assignments in expert order [G * T * k], rows of each expert [E] int32)."""
    expert = self.plan.expert_index.reshape(-1)
    order = jnp.argsort(expert, stable=True)
    return order, jnp.bincount(expert, length=self.plan.num_experts).astype(jnp.int32)

  def dispatch(self, x: jax.Array) -> jax.Array:
    k = self.plan.expert_index.shape[-1]
    return x.reshape(-1, x.shape[-1])[self._sorted[0] // k].astype(self.dtype)

  def matmul(self, rows: jax.Array, w: jax.Array) -> jax.Array:
    out = jax.lax.ragged_dot(rows, w, self._sorted[1], preferred_element_type=jnp.float32)
    return out.astype(rows.dtype)

  def combine(self, y: jax.Array) -> jax.Array:
    g, t, k = self.plan.expert_index.shape
    unsorted = jnp.zeros_like(y).at[self._sorted[0]].set(y).reshape(g * t, k, -1)
    out = jnp.einsum('tk,tkd->td', self.plan.weight.reshape(g * t, k), unsorted,
                     preferred_element_type=jnp.float32)
    return out.astype(y.dtype).reshape(g, t, -1)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """`buffers` over the mesh axis `axis` of m shards (inside shard_map): each expert's rows travel
  to the shard holding it, which runs its E / m experts on [E / m, m * G * C, d]; the outputs
  travel back. Any `Buffers` runs so; row dispatchers have no static expert split (see
  `EXPERT_PARALLEL`)."""
  buffers: Buffers
  axis: str

  def dispatch(self, x: jax.Array) -> jax.Array:
    return jax.lax.all_to_all(self.buffers.dispatch(x), self.axis, 0, 1, tiled=True)

  def matmul(self, rows: jax.Array, w: jax.Array) -> jax.Array:
    return self.buffers.matmul(rows, w)

  def combine(self, y: jax.Array) -> jax.Array:
    return self.buffers.combine(jax.lax.all_to_all(y, self.axis, 1, 0, tiled=True))


DISPATCHERS: dict[type, dict[str, type]] = {
    SlotPlan: {'einsum': OneHot, 'gather': Gather, 'blocked': fast_dispatch.BlockedSlots},
    DroplessPlan: {'einsum': OneHot, 'gather': Gather, 'ragged': Ragged,
                   'blocked': fast_dispatch.BlockedDropless},
    SoftPlan: {'einsum': Soft, 'gather': Soft, 'blocked': Soft},
}
EXECUTORS = tuple(dict.fromkeys(name for table in DISPATCHERS.values() for name in table))
# Under expert parallelism, the row executors ('ragged', 'blocked') of these plan types; the others
# run as 'gather'.
EXPERT_PARALLEL: dict[type, type] = {DroplessPlan: fast_dispatch.BlockedExpertParallel}


def dispatcher(plan: Plan, executor: str = 'gather', *, dtype=jnp.float32,
               expert_axis: str | None = None, **options) -> Dispatcher:
  """`plan` bound to `executor`, rows in `dtype`.

  With `expert_axis` (of more than one shard; one shard holds every expert and runs as one device),
  capacity buffers are exchanged over that mesh axis by all_to_all
  (`ExpertParallel`), and a row executor ('ragged', 'blocked') runs its plan type's
  `EXPERT_PARALLEL` dispatcher, or else 'gather', logged once. `options` go to the dispatchers
  that take them (`fast_dispatch.Blocked`: block_rows, backend, tilings).
  """
  if executor not in EXECUTORS:
    raise ValueError(f'dispatch impl must be one of {EXECUTORS}, got {executor!r}.')
  table = DISPATCHERS[type(plan)]
  if executor not in table:
    raise ValueError(f'dispatch impl={executor!r} does not run a {type(plan).__name__}: use one '
                     f'of {tuple(table)}.')
  make = table[executor]
  if expert_axis is not None and jax.lax.axis_size(expert_axis) == 1:
    expert_axis = None  # every expert is on this device: nothing to exchange (e.g. an 8x1 mesh)
  if expert_axis is not None and not issubclass(make, Buffers):
    if type(plan) in EXPERT_PARALLEL:
      return _bind(EXPERT_PARALLEL[type(plan)], plan, dtype, axis=expert_axis, **options)
    log_once(log, logging.WARNING, f"config.moe.dispatch={executor!r} runs as 'gather' under "
             f'expert parallelism (mesh axis {expert_axis!r}) for a {type(plan).__name__}: its '
             'capacity buffers travel by all_to_all.')
    make = table['gather']
  bound = _bind(make, plan, dtype, **options)
  return bound if expert_axis is None else ExpertParallel(bound, expert_axis)


def _bind(make: type, plan: Plan, dtype, **options) -> Dispatcher:
  """make(plan, dtype, **the options that are fields of make)."""
  takes = {field.name for field in dataclasses.fields(make)}
  return make(plan, dtype, **{name: v for name, v in options.items() if name in takes})


def moe_apply(plan: Plan, x: jax.Array, experts: Callable, executor: str = 'gather', *,
              num_chunks: int = 1, **options) -> jax.Array:
  """dispatch -> experts(rows, matmul) -> combine. x: [G, T, d] -> [G, T, d].

  num_chunks > 1 (a `DroplessPlan` only) splits the G * T tokens into that many consecutive
  chunks, each dispatched, run and combined on its own: the same result (dropless routing is per
  token), and under expert parallelism the exchange of one chunk can overlap the expert compute of
  another. `options` as `dispatcher`'s; dtype defaults to x's.
  """
  options = {'dtype': x.dtype, **options}
  if num_chunks == 1:  # the scopes name the permutations in profiles
    with jax.named_scope('permute'):
      d = dispatcher(plan, executor, **options)
      rows = d.dispatch(x)
    y = experts(rows, d.matmul)
    with jax.named_scope('unpermute'):
      return d.combine(y)
  ys = [moe_apply(part, xs, experts, executor, **options)
        for part, xs in split_tokens(plan, x, num_chunks)]
  return jnp.concatenate(ys, axis=1).reshape(x.shape)


def split_tokens(plan: DroplessPlan, x: jax.Array, num_chunks: int) -> list[tuple]:
  """[(plan, x) of each chunk]: the G * T tokens in `num_chunks` consecutive runs (as even as
  possible), each one group [1, T_i, ...]."""
  g, t = x.shape[:2]
  if type(plan) is not DroplessPlan or not 1 <= num_chunks <= g * t:
    raise ValueError(f'num_chunks={num_chunks} splits the tokens of dropless routing: give a '
                     f'DroplessPlan (got a {type(plan).__name__}) and 1 <= num_chunks <= {g * t} '
                     'tokens.')
  bounds = [g * t * i // num_chunks for i in range(num_chunks + 1)]
  one_group = lambda a: a.reshape(1, g * t, *a.shape[2:])
  return [jax.tree.map(lambda a: one_group(a)[:, lo:hi], (plan, x))
          for lo, hi in zip(bounds, bounds[1:])]
