"""'blocked' dispatch: expert-sorted, block-aligned rows and grouped matmuls; used slots only.

The capacity buffers [E, C, d] of 'einsum' / 'gather' run every slot, full or empty, so a capacity
factor of 1.25 costs at least 25% more expert FLOPs than the routing uses; dropless 'ragged' relies
on `jax.lax.ragged_dot`, which XLA's GPU backend expands per expert. Here every kept assignment
becomes one row of a buffer sorted by expert, each expert's rows start on a block boundary
(`block_rows`), and the expert FFN runs as grouped matmuls over those blocks
(`moe_jax.moe.kernels.grouped_matmul`: Pallas Mosaic GPU kernels on Hopper, an XLA reference
elsewhere). Padding is under one block per expert, and blocks beyond the used ones are skipped.

Routing is unchanged: a `SlotPlan` (token choice with capacity, expert choice) keeps exactly the
tokens its slots hold, a `DroplessPlan` keeps all, so results equal 'einsum' up to rounding.
Permutations are gathers in both directions when each token sits in at most
`SlotPlan.max_per_token` slots (token choice: k); otherwise (expert choice) the combine is a
scatter-add. A `SoftPlan` is dense and runs as two einsums (`dispatch.Soft`).

Across devices (expert parallelism), `BlockedExpertParallel` runs a `DroplessPlan` so: each
shard's rows travel to the shards holding their experts by ragged all-to-all (`ragged_exchange`)
and land there already expert-sorted and block-aligned for the grouped matmuls.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.moe import ragged_exchange
from moe_jax.moe.kernels import grouped_matmul as gm
from moe_jax.routing.plan import DroplessPlan, SlotPlan

# SwiGLU's gate and up as one fused kernel on Hopper (`grouped_matmul.swiglu`): True, False (two
# grouped matmuls; benchmarks/moe_layer.py's 'blocked_unfused' A/B) or 'auto': fused only where f
# is not a multiple of 256, so the unfused gate / up kernels cannot use 256-wide CTA tiles (fine64,
# f=1408: forward 3.41-3.62 vs 3.79-3.81 ms, fwd+bwd level). Where they can, the fused kernels'
# 64-wide wgmma tiles lose (fwd+bwd, mixtral 28.63 vs 28.07 ms, switch64 12.30 vs 11.50 ms; one
# H200, 2026-12-02). docs/performance.md, "The fused SwiGLU gate/up kernels".
FUSE_GATE_UP: bool | str = 'auto'


def fuse_gate_up(d_ff: int) -> bool:
  """Whether `GroupedMatmul.swiglu` runs the fused kernels for expert width d_ff."""
  if FUSE_GATE_UP == 'auto':
    return d_ff % 256 != 0
  return bool(FUSE_GATE_UP)


# The smallest edge of a kernel tile (`grouped_matmul`'s tilings): expert widths are padded to it.
KERNEL_ALIGN = 64

# jnp.searchsorted's default 'scan' is a while loop, which XLA's GPU backend steps from the host;
# unrolled, its ~log2(n) steps are plain kernels of one executable.
SEARCH = 'scan_unrolled'


@struct.dataclass
class RowPlan:
  """Where each kept assignment of G * T tokens lives in the expert-sorted buffer of M rows.

  Attributes:
    layout: which expert owns each block of rows.
    row_token: [M] int32 token of each row, G * T for padding and idle rows.
    row_weight: [M] float32 combine weight of each row, 0 for padding.
    dest: [G * T, k] int32 rows of each token's assignments (M = none), or None: combine by
      scatter-add. k: the most rows one token has (`SlotPlan.max_per_token`).
    weight: [G * T, k] float32 combine weight of each entry of dest (None with dest).
    groups: (G, T) (static).
  """
  layout: gm.BlockLayout
  row_token: jax.Array
  row_weight: jax.Array
  dest: jax.Array | None
  weight: jax.Array | None
  groups: tuple[int, int] = struct.field(pytree_node=False)


def num_rows(assignments: int, num_experts: int, block_rows: int) -> int:
  """Static buffer size: every assignment, under one block of padding per expert, one idle block."""
  blocks = math.ceil(assignments / block_rows) + num_experts + 1
  return blocks * block_rows


def _layout(counts: jax.Array, total_rows: int, block_rows: int):
  """Layout of experts holding counts [E] rows; returns it with each expert's first row [E]."""
  blocks = (counts + block_rows - 1) // block_rows
  ends = jnp.cumsum(blocks)
  start = ends - blocks
  block = jnp.arange(total_rows // block_rows, dtype=jnp.int32)
  owner = jnp.searchsorted(ends, block, side='right', method=SEARCH).astype(jnp.int32)
  layout = gm.BlockLayout(block_group=jnp.where(block < ends[-1], owner, -1),
                          group_start=start.astype(jnp.int32),
                          group_blocks=blocks.astype(jnp.int32), block_rows=block_rows)
  return layout, (start * block_rows).astype(jnp.int32)


def _rank_in_group(keys: jax.Array, num_groups: int) -> jax.Array:
  """Stable rank of each entry among entries with the same key. keys: 1-D in [0, num_groups]."""
  order = jnp.argsort(keys, stable=True)
  first = jnp.searchsorted(keys[order], jnp.arange(num_groups + 1), side='left', method=SEARCH)
  rank_sorted = jnp.arange(keys.shape[0]) - first[keys[order]]
  return jnp.zeros_like(keys).at[order].set(rank_sorted.astype(keys.dtype))


def _token_major(token, row, weight, num_tokens: int, width: int, num_rows_: int):
  """[num_tokens, width] rows and weights of each token's entries (row M / weight 0 where none)."""
  rank = _rank_in_group(token, num_tokens)
  dest = jnp.full((num_tokens + 1, width), num_rows_, jnp.int32)
  dest = dest.at[token, rank].set(row, mode='drop')
  w = jnp.zeros((num_tokens + 1, width), weight.dtype).at[token, rank].set(weight, mode='drop')
  return dest[:-1], w[:-1]


def slot_rows(plan: SlotPlan, block_rows: int | None = None) -> RowPlan:
  """The row plan of a group-batched `SlotPlan` (slot_token [G, E, C]): one row a kept slot.

  Token t of group g is token g * T + t of all G * T. With `plan.max_per_token` the combine
  gathers each token's rows (`RowPlan.dest`), else it scatter-adds. block_rows: rows per block (a
  multiple of the kernels' row tile), default `default_block_rows`.
  """
  g, num_experts, c = plan.slot_token.shape
  n, t = plan.num_tokens, g * plan.num_tokens
  occupied = plan.slot_token < n  # [G, E, C]
  bound = g * num_experts * c
  if plan.max_per_token is not None:
    bound = min(bound, t * plan.max_per_token)
  block_rows = default_block_rows(bound, num_experts) if block_rows is None else block_rows
  total = num_rows(bound, num_experts, block_rows)
  counts_ge = occupied.sum(-1).astype(jnp.int32)  # [G, E]
  layout, start = _layout(counts_ge.sum(0), total, block_rows)
  offset = jnp.cumsum(counts_ge, axis=0) - counts_ge  # rows of earlier groups, per expert
  rank = jnp.cumsum(occupied, axis=-1) - 1
  row = jnp.where(occupied, start[None, :, None] + offset[..., None] + rank, total).reshape(-1)
  group_base = (jnp.arange(g, dtype=jnp.int32) * n)[:, None, None]
  token = jnp.where(occupied, plan.slot_token + group_base, t).reshape(-1)
  weight = jnp.where(occupied, plan.slot_weight, 0.0).reshape(-1)
  dest = w = None
  if plan.max_per_token is not None:
    dest, w = _token_major(token, row, weight, t, plan.max_per_token, total)
  return _row_plan(layout, (g, n), token, row, weight, dest, w)


def dropless_rows(plan: DroplessPlan, block_rows: int | None = None) -> RowPlan:
  """The row plan of a group-batched `DroplessPlan` (expert_index [G, T, k]): one row an
  assignment. Token order and block_rows as `slot_rows`."""
  g, n, k = plan.expert_index.shape
  num_experts, t = plan.num_experts, g * n
  block_rows = default_block_rows(t * k, num_experts) if block_rows is None else block_rows
  expert = plan.expert_index.reshape(-1)
  total = num_rows(t * k, num_experts, block_rows)
  counts = jnp.zeros(num_experts, jnp.int32).at[expert].add(1)
  layout, start = _layout(counts, total, block_rows)
  row = start[expert] + _rank_in_group(expert, num_experts)
  token = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
  weight = plan.weight.reshape(-1)
  dest, w = row.reshape(t, k), plan.weight.reshape(t, k)
  return _row_plan(layout, (g, n), token, row, weight, dest, w)


def _row_plan(layout, groups, token, row, weight, dest, w) -> RowPlan:
  """The `RowPlan` of the kept assignments' token, row and weight (1-D each) of G * T tokens."""
  total, t = layout.num_rows, groups[0] * groups[1]
  row_token = jnp.full((total,), t, jnp.int32).at[row].set(token, mode='drop')
  row_weight = jnp.zeros((total,), weight.dtype).at[row].set(weight, mode='drop')
  return RowPlan(layout=layout, row_token=row_token, row_weight=row_weight, dest=dest, weight=w,
                 groups=groups)


def _gather_rows(x, index):
  """x[index] (rows of x), zero where index is out of range."""
  return jnp.take(x, index, axis=0, mode='fill', fill_value=0)


@jax.custom_vjp
def _permute(x, row_token, dest):
  """rows[r] = x[row_token[r]] (zero for padding); the gradient gathers through dest."""
  return _gather_rows(x, row_token)


def _permute_fwd(x, row_token, dest):
  return _permute(x, row_token, dest), (row_token, dest)


def _permute_bwd(res, g):
  row_token, dest = res
  dx = _gather_rows(g, dest).astype(jnp.float32).sum(1).astype(g.dtype)
  return dx, None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def _unpermute(rows, dest, weight, row_token, row_weight):
  """out[t] = sum_j weight[t, j] * rows[dest[t, j]], accumulated in float32. rows: [M, d].

  row_token / row_weight (the same map seen from the rows) serve the backward pass only: the
  gradient of the weights flows through `weight`.
  """
  out = jnp.einsum('tk,tkd->td', weight, _gather_rows(rows, dest),
                   preferred_element_type=jnp.float32)
  return out.astype(rows.dtype)


def _unpermute_fwd(rows, dest, weight, row_token, row_weight):
  return _unpermute(rows, dest, weight, row_token, row_weight), (rows, dest, weight, row_token,
                                                                  row_weight)


def _unpermute_bwd(res, g):
  rows, dest, weight, row_token, row_weight = res
  d_rows = (row_weight[:, None] * _gather_rows(g, row_token).astype(jnp.float32)).astype(rows.dtype)
  d_weight = jnp.einsum('td,tkd->tk', g, _gather_rows(rows, dest),
                        preferred_element_type=jnp.float32).astype(weight.dtype)
  return d_rows, None, d_weight, None, None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def permute(rows_plan: RowPlan, x: jax.Array) -> jax.Array:
  """x: [G * T, d] -> [M, d] expert-sorted rows (zero padding)."""
  if rows_plan.dest is None:
    return _gather_rows(x, rows_plan.row_token)
  return _permute(x, rows_plan.row_token, rows_plan.dest)


def unpermute(rows_plan: RowPlan, rows: jax.Array, num_tokens: int) -> jax.Array:
  """Weighted sum of each token's rows: [M, d] -> [num_tokens, d] in rows' dtype."""
  if rows_plan.dest is None:
    weighted = rows_plan.row_weight[:, None] * rows.astype(jnp.float32)
    out = jnp.zeros((num_tokens + 1, rows.shape[-1]), jnp.float32)
    return out.at[rows_plan.row_token].add(weighted)[:-1].astype(rows.dtype)
  return _unpermute(rows, rows_plan.dest, rows_plan.weight, rows_plan.row_token,
                    rows_plan.row_weight)


def default_block_rows(assignments: int, num_experts: int) -> int:
  """128-row blocks, or 64 when experts average under 1024 rows (less padding per expert)."""
  return 128 if assignments >= 1024 * num_experts else 64


@dataclasses.dataclass(frozen=True)
class GroupedMatmul:
  """A `Blocked` dispatcher's matmul: `mm(rows, w)` one grouped matmul over its layout, and
  `mm.swiglu(rows, w_gate, w_up)` SwiGLU's gate and up, fused (`experts.feed_forward` uses it when
  present). Read at trace time: `FUSE_GATE_UP`."""
  layout: gm.BlockLayout
  backend: str | None
  tilings: tuple

  def __call__(self, rows: jax.Array, w: jax.Array) -> jax.Array:
    return gm.grouped_matmul(rows, w, self.layout, self.backend, self.tilings)

  def hidden_width(self, d_model: int, d_ff: int) -> int:
    """The expert width the products run at: d_ff, or where no kernel tiling fits the products
    [M, d] @ [E, d, f] and [M, f] @ [E, f, d] (e.g. f = 880, DeepSeekMoE 2B's), the next multiple
    of KERNEL_ALIGN that fits. `experts.Experts` zero-pads the weights to it (the same output, the
    padding's FLOPs executed); unpadded, the products would run on XLA's ragged_dot, which the
    GPU backend expands to dense per-expert work (tens of GB at paper scale)."""
    if (self.backend or gm.default_backend()) == 'xla' or self._fits(d_model, d_ff):
      return d_ff
    padded = -(-d_ff // KERNEL_ALIGN) * KERNEL_ALIGN
    return padded if self._fits(d_model, padded) else d_ff

  def _fits(self, d_model: int, d_ff: int) -> bool:
    rows = self.layout.block_rows
    return all(gm.kernel_tilings((rows, k), (1, k, n), rows) is not None
               for k, n in ((d_model, d_ff), (d_ff, d_model)))

  def swiglu(self, rows: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    if not fuse_gate_up(w_gate.shape[-1]):  # exactly experts.feed_forward's unfused arithmetic
      return self(rows, w_up) * jax.nn.silu(self(rows, w_gate))
    # Unmasked idle rows: h feeds the down projection's grouped matmul only, which skips them.
    return gm.swiglu(rows, w_gate, w_up, self.layout, self.backend, mask=False)


@dataclasses.dataclass(frozen=True)
class Blocked:
  """'blocked' (a `dispatch.Dispatcher`): rows [M, d] sorted by expert in blocks of `block_rows`,
  the expert products grouped matmuls over the used blocks (`grouped_matmul`: kernels on Hopper,
  XLA elsewhere, or `backend`; optional (forward, d lhs, d rhs) kernel `tilings`), SwiGLU's gate
  and up fused into one kernel (`grouped_matmul.swiglu`, `FUSE_GATE_UP`).

  Tokens are cast to `dtype` before they are permuted (the permutation's gradient rounds to it).
  """
  plan: SlotPlan | DroplessPlan
  dtype: Any
  block_rows: int | None = None
  backend: str | None = None
  tilings: tuple = (None,) * 3
  build: ClassVar[Callable[..., RowPlan]]  # the plan type's row plan

  @functools.cached_property
  def rows_plan(self) -> RowPlan:
    return self.build(self.plan, self.block_rows)

  def dispatch(self, x: jax.Array) -> jax.Array:
    g, t, d = x.shape
    return permute(self.rows_plan, x.reshape(g * t, d).astype(self.dtype))

  @functools.cached_property
  def matmul(self) -> GroupedMatmul:
    """matmul(rows, w): a grouped matmul; matmul.swiglu(rows, w_gate, w_up): fused gate and up."""
    return GroupedMatmul(self.rows_plan.layout, self.backend, tuple(self.tilings))

  def combine(self, y: jax.Array) -> jax.Array:
    g, t = self.rows_plan.groups
    return unpermute(self.rows_plan, y, g * t).reshape(g, t, -1)


class BlockedSlots(Blocked):
  build = staticmethod(slot_rows)


class BlockedDropless(Blocked):
  build = staticmethod(dropless_rows)


@dataclasses.dataclass(frozen=True)
class BlockedExpertParallel:
  """'blocked' across the mesh axis `axis` of m shards (inside shard_map), for a `DroplessPlan`
  (expert_index [G, T, k]) of E experts, E / m on each shard: a `dispatch.Dispatcher`.

  dispatch  x [G, T, d] -> this shard's A = G * T * k assignments sorted by expert (`dropless_rows`
            with one-row blocks), then a ragged all-to-all (`ragged_exchange`) sends each expert's
            rows to the shard holding it, where they land block-aligned, expert-sorted: [R, d].
  matmul    grouped matmuls of the E / m local experts over the used blocks, SwiGLU's gate and up
            fused (as `Blocked`).
  combine   the outputs travel back by the reverse exchange and are unpermuted, [G, T, d].

  Every assignment is computed exactly once: nothing is dropped, nothing padded beyond the last
  block of each expert. R is static and sized for the worst case, every token of all m shards
  choosing this shard's experts, m * G * T * min(k, E / m) rows plus block padding
  (`num_rows`), so no routing can overflow it; the Mosaic kernels skip its idle blocks.
  """
  plan: DroplessPlan
  dtype: Any
  axis: str
  block_rows: int | None = None
  backend: str | None = None
  tilings: tuple = (None,) * 3

  @functools.cached_property
  def _plan(self) -> tuple[RowPlan, ragged_exchange.Slices, gm.BlockLayout]:
    """(this shard's rows sorted by expert, the exchange to the experts, their local layout)."""
    g, t, k = self.plan.expert_index.shape
    m, num_experts = jax.lax.axis_size(self.axis), self.plan.num_experts
    if num_experts % m:
      raise ValueError(f'config.mesh.expert={m} (mesh axis {self.axis!r}) does not divide '
                       f'config.moe.num_experts={num_experts}.')
    local = num_experts // m
    sorted_rows = dropless_rows(self.plan, block_rows=1)
    counts = jax.lax.all_gather(sorted_rows.layout.group_blocks, self.axis)  # [m, E] sent rows
    peer_rows = g * t * min(k, local)  # rows one shard sends one peer, at most
    block_rows = self.block_rows or default_block_rows(g * t * k, local)
    total_rows = num_rows(m * peer_rows, local, block_rows)
    held = counts.sum(0).reshape(m, local)  # rows of each expert, by the shard holding it
    blocks = (held + block_rows - 1) // block_rows
    first = ((jnp.cumsum(blocks, axis=1) - blocks) * block_rows).reshape(1, num_experts)
    size = counts.reshape(m, m, local)
    src = (jnp.cumsum(counts, axis=1) - counts).reshape(m, m, local)
    dst = (first + jnp.cumsum(counts, axis=0) - counts).reshape(m, m, local)
    slices = ragged_exchange.Slices(size, src, dst, self.axis, peer_rows)
    layout, _ = _layout(held[jax.lax.axis_index(self.axis)], total_rows, block_rows)
    return sorted_rows, slices, layout

  def dispatch(self, x: jax.Array) -> jax.Array:
    g, t, d = x.shape
    sorted_rows, slices, layout = self._plan
    rows = permute(sorted_rows, x.reshape(g * t, d).astype(self.dtype))
    return slices.send(rows, layout.num_rows)

  @functools.cached_property
  def matmul(self) -> GroupedMatmul:
    """As `Blocked.matmul`, over the local experts' layout: fused SwiGLU gate / up included."""
    return GroupedMatmul(self._plan[2], self.backend, tuple(self.tilings))

  def combine(self, y: jax.Array) -> jax.Array:
    sorted_rows, slices, _ = self._plan
    g, t = sorted_rows.groups
    back = slices.reverse().send(y, sorted_rows.layout.num_rows)
    return unpermute(sorted_rows, back, g * t).reshape(g, t, -1)
