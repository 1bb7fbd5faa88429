"""Ragged all-to-all over one mesh axis (inside `jax.shard_map`), and the slices that travel in it.

`ragged_all_to_all` has the semantics of `jax.lax.ragged_all_to_all` (its docstring): slice i of
this shard's operand, rows input_offsets[i] : + send_sizes[i], goes to shard i // (S / m) of the m
shards, where it lands at output_offsets[i]; recv_sizes lists the slices coming in, source-major.
Two implementations (`IMPLS`), chosen by backend (`BY_PLATFORM`) or forced (`force`, for tests and
benchmarks):

* 'ragged'  the collective itself: each row travels once. GPU and TPU.
* 'padded'  a stand-in with the same semantics for backends without it (XLA:CPU: "UNIMPLEMENTED:
            HLO opcode ragged-all-to-all"): every shard packs its slices for each peer into a
            zero-padded block of `peer_rows` rows, one tiled `all_to_all` trades the blocks, and
            the receiver scatters the rows to their offsets. It moves m * peer_rows rows per shard.
            On an axis of one shard (m = 1) it is the default on every backend: the rows stay on
            the device, so a gather and a scatter are the whole exchange. (XLA:GPU's in-process
            ragged all-to-all kernel took 51 ms there for what the gather and scatter move in well
            under 1 ms, on one H200: docs/parallelism.md.)

`Slices` describes one exchange as seen by every shard, and its return trip (`reverse`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import struct


def padded_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis_name: str, peer_rows: int | None = None) -> jax.Array:
  """`jax.lax.ragged_all_to_all` from a tiled `all_to_all`. operand [N, ...], output [M, ...],
  the four offsets and sizes [S] (S a multiple of the axis size m) -> [M, ...].

  peer_rows: static bound on the rows this shard sends one peer (and receives from one); rows
  beyond it are lost. Default S / m * N: every slice could be all of the operand.
  """
  m = jax.lax.axis_size(axis_name)
  n = operand.shape[0]
  peer_rows = input_offsets.shape[0] // m * n if peer_rows is None else peer_rows
  sources = _packed_rows(input_offsets, send_sizes, m, peer_rows, none=n)
  packed = jnp.take(operand, sources, axis=0, mode='fill', fill_value=0)  # [m, peer_rows, ...]
  received = jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=True)  # block j: from shard j
  landing = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  targets = _packed_rows(landing, recv_sizes, m, peer_rows, none=output.shape[0])
  return output.at[targets].set(received.astype(output.dtype), mode='drop')


def _packed_rows(offsets, sizes, m: int, peer_rows: int, none: int) -> jax.Array:
  """[m, peer_rows] int32: the row behind each row of the m packed blocks, `none` for padding.

  Block j packs slices j * S/m ... (j + 1) * S/m - 1 back to back; slice i covers rows
  offsets[i] : offsets[i] + sizes[i].
  """
  offsets, sizes = offsets.reshape(m, -1), sizes.reshape(m, -1)
  ends = jnp.cumsum(sizes, axis=1)  # [m, S/m]
  row = jnp.arange(peer_rows, dtype=offsets.dtype)
  piece = (row[None, None, :] >= ends[:, :, None]).sum(1)  # [m, peer_rows] slice of each row
  inside = piece < sizes.shape[1]
  piece = jnp.minimum(piece, sizes.shape[1] - 1)
  start = jnp.take_along_axis(ends - sizes, piece, axis=1)
  rows = jnp.take_along_axis(offsets, piece, axis=1) + row[None] - start
  return jnp.where(inside, rows, none).astype(jnp.int32)


def _collective(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                axis_name: str, peer_rows: int | None = None) -> jax.Array:
  del peer_rows  # each row travels once
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                   recv_sizes, axis_name=axis_name)


IMPLS: dict[str, Callable[..., jax.Array]] = {'ragged': _collective, 'padded': padded_all_to_all}
BY_PLATFORM = {'gpu': 'ragged', 'cuda': 'ragged', 'rocm': 'ragged', 'tpu': 'ragged',
               'cpu': 'padded'}
_forced: list[str] = []


@contextlib.contextmanager
def force(impl: str) -> Iterator[None]:
  """Within the block, functions traced use `impl` whatever the backend (tests)."""
  if impl not in IMPLS:
    raise ValueError(f'ragged all-to-all impl must be one of {tuple(IMPLS)}, got {impl!r}.')
  _forced.append(impl)
  try:
    yield
  finally:
    _forced.pop()


def default_impl(axis_size: int | None = None) -> str:
  """The forced impl, else 'padded' on an axis of one shard, else the backend's (`BY_PLATFORM`;
  'padded' for an unknown platform)."""
  if _forced:
    return _forced[-1]
  if axis_size == 1:
    return 'padded'
  return BY_PLATFORM.get(jax.default_backend(), 'padded')


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis_name: str, peer_rows: int | None = None,
                      impl: str | None = None) -> jax.Array:
  """`jax.lax.ragged_all_to_all` by `impl` (default `default_impl(axis size)`); peer_rows: see
  `padded_all_to_all` (the collective ignores it)."""
  impl = impl or default_impl(jax.lax.axis_size(axis_name))
  return IMPLS[impl](operand, output, input_offsets, send_sizes, output_offsets,
                                       recv_sizes, axis_name=axis_name, peer_rows=peer_rows)


@struct.dataclass
class Slices:
  """One ragged exchange over the m shards of `axis_name`, as every shard sees it.

  Slice (j, d, l) moves size[j, d, l] rows from shard j, where they start at row src[j, d, l], to
  shard d, where they start at row dst[j, d, l]. size, src, dst: [m, m, L] int32, the same on
  every shard. peer_rows: the most rows one shard sends another (`padded_all_to_all`).
  """
  size: jax.Array
  src: jax.Array
  dst: jax.Array
  axis_name: str = struct.field(pytree_node=False)
  peer_rows: int | None = struct.field(pytree_node=False, default=None)

  def send(self, rows: jax.Array, num_rows: int) -> jax.Array:
    """This shard's part of the exchange: rows [N, ...] -> [num_rows, ...], zero where no slice
    landed. Differentiable: when no two slices share a row (a partial permutation, as the dropless
    dispatch sends), the gradient is the return trip of the output's gradient."""
    return _send(rows, self.size, self.src, self.dst, self.axis_name, self.peer_rows, num_rows)

  def reverse(self) -> Slices:
    """The return trip: every slice goes back from where it landed to where it came from."""
    swap = lambda a: a.swapaxes(0, 1)
    return Slices(swap(self.size), swap(self.dst), swap(self.src), self.axis_name, self.peer_rows)


def _exchange(rows, size, src, dst, axis_name, peer_rows, num_rows):
  me = jax.lax.axis_index(axis_name)
  flat = lambda a: a.reshape(-1)
  out = jnp.zeros_like(rows, shape=(num_rows, *rows.shape[1:]))  # varying as rows
  return ragged_all_to_all(rows, out, flat(src[me]), flat(size[me]), flat(dst[me]),
                           flat(size[:, me]), axis_name=axis_name, peer_rows=peer_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _send(rows, size, src, dst, axis_name, peer_rows, num_rows):
  return _exchange(rows, size, src, dst, axis_name, peer_rows, num_rows)


def _send_fwd(rows, size, src, dst, axis_name, peer_rows, num_rows):
  out = _exchange(rows, size, src, dst, axis_name, peer_rows, num_rows)
  return out, (size, src, dst, rows.shape[0])


def _send_bwd(axis_name, peer_rows, num_rows, residuals, g):
  """The return trip (a gather, a collective and a scatter) instead of autodiff's transpose
  (whose scatter-add accumulates into every row of the operand)."""
  del num_rows
  size, src, dst, n = residuals
  back = Slices(size, src, dst, axis_name, peer_rows).reverse()
  return _exchange(g, back.size, back.src, back.dst, axis_name, peer_rows, n), None, None, None


_send.defvjp(_send_fwd, _send_bwd)
