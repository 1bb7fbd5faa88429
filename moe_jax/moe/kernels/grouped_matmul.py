"""Grouped matmuls over expert-sorted, block-aligned rows: Pallas Mosaic GPU kernels for Hopper.

Layout (`BlockLayout`): M rows sorted by expert, cut into row blocks of `block_rows`. Expert e owns
the `group_blocks[e]` consecutive blocks that start at block `group_start[e]`; experts come in order
and every block after the last expert's is idle. Because no block is shared by two experts, a
grouped matmul is a plain tiled matmul whose right-hand side is chosen per row block, and idle
blocks cost nothing (they are skipped, not computed). gmm visits its tiles in bands of row tiles of
one expert (`expert_band_order`), so each band streams one expert's weights through L2.

* `gmm(lhs [M, K], rhs [E, K, N], layout)             -> [M, N]`  out[r] = lhs[r] @ rhs[expert(r)]
* `gmm(lhs [M, K], rhs [E, N, K], layout, transpose_rhs=True)`   out[r] = lhs[r] @ rhs[expert(r)].T
* `tgmm(lhs [M, P], rhs [M, Q], layout)               -> [E, P, Q]` out[e] = lhs_e.T @ rhs_e

SwiGLU's gate and up projections run fused (`swiglu`): one kernel (`gate_up`) computes
both products of a tile from one load of x, two accumulators per warpgroup, and applies SwiGLU in
its epilogue, h = (x @ w_up[e]) * silu(x @ w_gate[e]); in training it also writes the two products
as gu = [gate | up] [M, 2f] for the backward pass. The backward runs one kernel for
dx = dgate @ w_gate[e].T + dup @ w_up[e].T (`gate_up_t`, both products into one accumulator) and
one for both weight gradients (`tgmm_gate_up`). The weights stay two arrays: nothing is
concatenated or split in memory.

Rows of idle blocks in gmm's output are left unwritten by the GPU kernel: callers mask them
(`grouped_matmul` does). tgmm reads only the experts' own blocks and writes zeros for empty experts.

Backends: 'mosaic' (the kernels, Hopper sm_90), 'interpret' (the same kernels run by Pallas' GPU
interpreter on CPU: slow, for tests), 'xla' (`jax.lax.ragged_dot` reference; fine on CPU, on GPU
XLA expands it to dense per-expert work).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BACKENDS = ('mosaic', 'interpret', 'xla')
SMEM_BYTES = 226 * 1024  # of the H100's 227 KiB per block, leaving room for barriers


@struct.dataclass
class BlockLayout:
  """Which expert owns each row block. Blocks of one expert are consecutive, idle blocks trail.

  Attributes:
    block_group: [M / block_rows] int32 expert of each block, -1 for idle blocks.
    group_start: [E] int32 first block of each expert.
    group_blocks: [E] int32 number of blocks of each expert (0 for an expert without rows).
    block_rows: rows per block (static).
  """
  block_group: jax.Array
  group_start: jax.Array
  group_blocks: jax.Array
  block_rows: int = struct.field(pytree_node=False)

  @property
  def num_rows(self) -> int:
    return self.block_group.shape[0] * self.block_rows

  def row_active(self) -> jax.Array:
    """[M] bool: the row lies in an expert's block."""
    return jnp.repeat(self.block_group >= 0, self.block_rows)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Kernel tiles. Two compute warpgroups split a CTA tile along `split`; a third issues TMA copies.

  gmm: a warpgroup computes [tile_m, tile_n] of the output, stepping over K by tile_k.
  tgmm: tile_m tiles P, tile_n tiles Q (split must be 'n'), tile_k rows are reduced per step.
  """
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 4
  split: str = 'n'
  band: int = 8  # row tiles visited together (L2 reuse of the weights)
  epi: int = 64  # epilogue tile edge
  epi_slots: int = 2  # SMEM epilogue buffers per warpgroup (2: write one while the other stores)
  # '' or 'm' / 'n': pairs of CTAs (a cluster) that are neighbours along m (resp. n) share the
  # operand they have in common, loading half of it each and multicasting it to both (TMA).
  cluster: str = ''

  @property
  def cta_m(self) -> int:
    return self.tile_m * (2 if self.split == 'm' else 1)

  @property
  def cta_n(self) -> int:
    return self.tile_n * (2 if self.split == 'n' else 1)

  @property
  def cluster_m(self) -> int:
    return self.cta_m * (2 if self.cluster == 'm' else 1)

  @property
  def cluster_n(self) -> int:
    return self.cta_n * (2 if self.cluster == 'n' else 1)

  @property
  def cluster_size(self) -> int:
    return 2 if self.cluster else 1

  def smem_bytes(self, itemsize: int = 2, kind: str = 'gmm') -> int:
    """SMEM of the pipeline stages and epilogue buffers. kind: 'gmm' / 'tgmm' (one lhs and one rhs
    tile a stage), 'gate_up' / 'tgmm_gate_up' (two rhs tiles), 'gate_up_t' (two of each)."""
    lhs, rhs = {'gate_up': (1, 2), 'tgmm_gate_up': (1, 2), 'gate_up_t': (2, 2)}.get(kind, (1, 1))
    stage = (lhs * self.cta_m + rhs * self.cta_n) * self.tile_k * itemsize
    return self.stages * stage + 2 * self.epi_slots * self.epi * self.epi * itemsize


# Candidates, the default (first fitting) first; `--tune` in benchmarks/moe_layer.py times the first
# few. A 128x256 CTA tile fits 3 stages beside double-buffered 64x64 epilogue tiles, and 4 stages
# just (224 of 227 KiB), or with one epilogue buffer. (4 stages with 32x32 epilogue tiles fail
# Mosaic GPU's layout inference, jax 0.11.2.) Cluster tilings share one operand between two CTAs; a
# gmm 'm' cluster needs block_rows >= 2 * cta_m (both CTAs on one expert). docs/performance.md has
# the measurements behind this list.
GMM_TILINGS = (Tiling(128, 128, stages=3), Tiling(64, 256, stages=3, split='m'),
               Tiling(128, 128, stages=4), Tiling(64, 256, stages=4, split='m', epi_slots=1),
               Tiling(128, 128, stages=3, cluster='m'),
               Tiling(64, 128, stages=4, split='m'), Tiling(64, 128, stages=4),
               Tiling(64, 128, stages=4, cluster='m'),
               Tiling(64, 64, stages=4, split='m'), Tiling(64, 64, stages=4))
TGMM_TILINGS = (Tiling(128, 128, stages=3), Tiling(128, 128, stages=3, cluster='m'),
                Tiling(128, 128, stages=4), Tiling(128, 128, stages=4, cluster='m'),
                Tiling(128, 64, stages=4), Tiling(128, 64, stages=4, cluster='m'),
                Tiling(64, 64, stages=4))
# The fused SwiGLU kernels (no clusters). gate_up: a warpgroup holds a [tile_m, tile_n] gate and up
# accumulator each (so tile_m * tile_n <= 8192), CTA tile [cta_m, cta_n] of h; 128x64 'n' loads the
# same operand bytes a step as gmm's 128x256 CTA tile. gate_up_t: two lhs and two rhs tiles a step,
# hence tile_k 32. tgmm_gate_up: split 'n', two accumulators [tile_m, tile_n] per warpgroup.
GATE_UP_TILINGS = (Tiling(128, 64, stages=4), Tiling(64, 128, stages=4, split='m'),
                   Tiling(128, 64, stages=3), Tiling(64, 64, stages=4))
GATE_UP_T_TILINGS = (Tiling(128, 128, tile_k=32, stages=4),
                     Tiling(64, 256, tile_k=32, stages=4, split='m'),
                     Tiling(128, 128, tile_k=64, stages=2), Tiling(64, 128, tile_k=32, stages=4),
                     Tiling(64, 64, tile_k=32, stages=4))
TGMM_GATE_UP_TILINGS = (Tiling(128, 64, stages=4), Tiling(128, 64, stages=3),
                        Tiling(64, 64, stages=4))
# gmm's tile order: 'expert_bands' (`expert_band_order`) or 'snake' (fixed bands over all rows, the
# earlier order; kept to measure the difference: benchmarks/moe_layer.py --row-order).
ROW_ORDER = 'expert_bands'
# Measured winners by (kernel, block_rows, K, N), consulted before the candidate lists (see
# `kernel_tilings`); benchmarks/moe_layer.py --tune fills it in-process.
TUNED: dict[tuple, Tiling] = {}


def fitting(candidates, m_tile: int, n: int, k: int | None = None,
            kind: str = 'gmm') -> list[Tiling]:
  """Tilings whose cluster tile divides (m_tile, n), whose tile_k divides k, and that fit in SMEM
  (`Tiling.smem_bytes` of `kind`)."""
  return [t for t in candidates
          if m_tile % t.cluster_m == 0 and n % t.cluster_n == 0
          and (k is None or k % t.tile_k == 0) and t.smem_bytes(kind=kind) <= SMEM_BYTES]


def pick_tiling(candidates, m_tile: int, n: int, k: int | None = None,
                kind: str = 'gmm') -> Tiling | None:
  """The first fitting tiling, or None."""
  fits = fitting(candidates, m_tile, n, k, kind)
  return fits[0] if fits else None


def default_backend() -> str:
  """'mosaic' on a Hopper GPU, else 'xla'."""
  device = jax.devices()[0]
  if device.platform == 'gpu' and str(getattr(device, 'compute_capability', '')).startswith('9'):
    return 'mosaic'
  return 'xla'


def _transforms(minor: int, dtype):
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _store_tiles(tiles, out_smem, wg, t: Tiling):
  """Writes a warpgroup's [tile_m, tile_n] accumulators, each to its GMEM window ((acc, out_ref)
  pairs), via double-buffered SMEM epilogue tiles. The slots cycle across all the pairs, so one
  output's stores overlap the next's; only the first waits for the previous tile's stores."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  n_epi = t.tile_n // t.epi
  count = 0
  for acc, out_ref in tiles:
    acc = acc.astype(out_ref.dtype)
    for i in range(t.tile_m // t.epi):
      for j in range(n_epi):
        slot, count = count % t.epi_slots, count + 1
        rows, cols = slice(i * t.epi, (i + 1) * t.epi), slice(j * t.epi, (j + 1) * t.epi)
        plgpu.wait_smem_to_gmem(t.epi_slots - 1, wait_read_only=True)
        out_smem[wg, slot] = acc[rows, cols]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_ref.at[rows, cols])


def _pipeline(body, context, specs, steps, stages):
  return plgpu.emit_pipeline_warp_specialized(
      body, grid=(steps,), memory_registers=40, in_specs=specs, wg_axis='wg', num_compute_wgs=2,
      max_concurrent_steps=stages, compute_context=context)


def _ignore(*_, **__):
  return None


def _multicast(t: Tiling, dim: str) -> dict:
  """BlockSpec kwargs: the operand indexed by the other dimension is shared along a `dim` cluster."""
  return dict(collective_axes=('cluster',)) if t.cluster == dim else {}


def _tile_grid(t: Tiling, m_iters: int, n_iters: int, minor: int, lead: tuple = (),
               order_ref=None):
  """Persistent loop over (*lead, cluster tiles); calls body(*lead indices, m tile, n tile) with
  this CTA's tile indices. Tiles are visited in `order_ref`'s order ([m_iters * n_iters] of
  mi * n_iters + ni) if given, else in bands of t.band tiles along `minor` (`planar_snake`)."""
  axis = 'cluster_grid' if t.cluster else 'sm'

  def wrap(body):
    @plgpu.nd_loop((*lead, m_iters * n_iters), collective_axes=axis)
    def _tile(info):
      *outer, lin = info.index
      if order_ref is None:
        mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), minor, t.band)
      else:
        tile = order_ref[lin]
        mi, ni = lax.div(tile, n_iters), lax.rem(tile, n_iters)
      if t.cluster == 'm':
        mi = mi * 2 + lax.axis_index('cluster')
      elif t.cluster == 'n':
        ni = ni * 2 + lax.axis_index('cluster')
      body(*outer, mi, ni)
  return wrap


def _expert_row_tiles(t: Tiling, block_group_ref, order_ref, m_iters: int, n_iters: int):
  """`_tile_grid` over (row tile, column tile) pairs in `order_ref`'s order, calling
  body(expert, cta_m rows, cta_n columns, ni) for the tiles of an expert's rows; idle tiles are
  skipped. (Both CTAs of an 'm' cluster own the same expert: see `fitting`.)"""
  def wrap(body):
    @_tile_grid(t, m_iters, n_iters, minor=0, order_ref=order_ref)
    def _tile(mi, ni):
      group = block_group_ref[mi]

      @pl.when(group >= 0)
      def _run():
        body(group, pl.ds(mi * t.cta_m, t.cta_m), pl.ds(ni * t.cta_n, t.cta_n), ni)
  return wrap


def _wg_slices(t: Tiling, wg):
  """(rows, columns) of the CTA tile that warpgroup wg computes."""
  wg_m = pl.ds(wg * t.tile_m, t.tile_m) if t.split == 'm' else slice(None)
  wg_n = pl.ds(wg * t.tile_n, t.tile_n) if t.split == 'n' else slice(None)
  return wg_m, wg_n


def _kernel_scope(t: Tiling, specs, steps: int, like, out_dtype, body):
  """Runs body(allocs, out_smem, wg) with the pipeline's SMEM stages (for `specs` over refs shaped
  `like`) and the epilogue buffers allocated once for the persistent kernel; then waits for the
  last stores."""
  allocs = _pipeline(_ignore, _ignore, specs, steps, t.stages).get_allocations(*like)
  out_smem = plgpu.SMEM((2, t.epi_slots, t.epi, t.epi), out_dtype,
                        transforms=_transforms(t.epi, out_dtype))

  @functools.partial(pl.run_scoped, allocs=allocs, out_smem=out_smem, collective_axes='wg')
  def _scope(allocs, out_smem):
    body(allocs, out_smem, lax.axis_index('wg'))

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _run_tile(t: Tiling, specs, steps, operands, allocs, num_accs: int, mma, store):
  """One output tile: a pipeline of `steps` K steps over `operands`; each step calls
  mma(SMEM tiles, accumulators) to issue its wgmmas into `num_accs` float32 [tile_m, tile_n]
  accumulators per warpgroup, and store(their values) writes them at the end."""
  def context(run):
    acc = plgpu.ACC((t.tile_m, t.tile_n), jnp.float32)

    @functools.partial(pl.run_scoped, accs=(acc,) * num_accs)
    def _accs(accs):
      run(accs)
      store([a[...] for a in accs])

  def step(_, *tiles_and_accs):
    *tiles, accs = tiles_and_accs
    mma(tiles, accs)
    # Wait for this step's wgmma before its SMEM slot is released. (Releasing a step later,
    # delay_release=1, races here: the persistent loop restarts the pipeline for each tile and
    # the next prologue refills the last slot while its wgmma may still read it; the GPU
    # interpreter reports it as a barrier phase error.)
    plgpu.wgmma_wait(0)
    return accs

  _pipeline(step, context, specs, steps, t.stages)(*operands, allocations=allocs)


def _gmm_kernel(block_group_ref, order_ref, a_ref, b_ref, out_ref, *, t: Tiling,
                transpose_rhs: bool):
  m, k = a_ref.shape
  n = out_ref.shape[1]
  smem = dict(transforms=_transforms(t.tile_k, a_ref.dtype), memory_space=plgpu.SMEM)
  a_spec = plgpu.BlockSpec((t.cta_m, t.tile_k), lambda kk: (0, kk), **smem, **_multicast(t, 'n'))
  if transpose_rhs:
    b_spec = plgpu.BlockSpec((t.cta_n, t.tile_k), lambda kk: (0, kk), **smem, **_multicast(t, 'm'))
  else:
    b_spec = plgpu.BlockSpec((t.tile_k, t.cta_n), lambda kk: (kk, 0), **smem, **_multicast(t, 'm'))
  specs, steps = [a_spec, b_spec], k // t.tile_k

  def body(allocs, out_smem, wg):
    wg_m, wg_n = _wg_slices(t, wg)

    @_expert_row_tiles(t, block_group_ref, order_ref, m // t.cluster_m, n // t.cluster_n)
    def _tile(group, cta_m, cta_n, _):
      def mma(tiles, accs):
        a_smem, b_smem = tiles
        b = b_smem.at[wg_n, :].transpose((1, 0)) if transpose_rhs else b_smem.at[:, wg_n]
        plgpu.wgmma(accs[0], a_smem.at[wg_m, :], b)

      def store(values):
        _store_tiles([(values[0], out_ref.at[cta_m, cta_n].at[wg_m, wg_n])], out_smem, wg, t)

      expert = b_ref.at[group]
      b_tile = expert.at[cta_n, :] if transpose_rhs else expert.at[:, cta_n]
      _run_tile(t, specs, steps, (a_ref.at[cta_m, :], b_tile), allocs, 1, mma, store)

  _kernel_scope(t, specs, steps, (a_ref, b_ref.at[0]), out_ref.dtype, body)


def _expert_specs(t: Tiling, a_ref, b_ref, halves: int = 1):
  """specs(first) of tgmm-like kernels: K steps of tile_k rows from row block `first`, one
  [tile_k, cta_m] tile of a_ref and `halves` [tile_k, cta_n] tiles of b_ref a step."""
  def specs(first):
    a_spec = plgpu.BlockSpec((t.tile_k, t.cta_m), lambda j: (first + j, 0),
                             transforms=_transforms(t.cta_m, a_ref.dtype), memory_space=plgpu.SMEM,
                             **_multicast(t, 'n'))
    b_spec = plgpu.BlockSpec((t.tile_k, t.cta_n), lambda j: (first + j, 0),
                             transforms=_transforms(t.cta_n, b_ref.dtype), memory_space=plgpu.SMEM,
                             **_multicast(t, 'm'))
    return [a_spec] + [b_spec] * halves
  return specs


def _tgmm_kernel(start_ref, blocks_ref, a_ref, b_ref, out_ref, *, t: Tiling):
  num_experts, p, q = out_ref.shape
  specs = _expert_specs(t, a_ref, b_ref)

  def body(allocs, out_smem, wg):
    _, wg_n = _wg_slices(t, wg)

    @_tile_grid(t, p // t.cluster_m, q // t.cluster_n, minor=1, lead=(num_experts,))
    def _tile(e, pi, qi):
      cta_p, cta_q = pl.ds(pi * t.cta_m, t.cta_m), pl.ds(qi * t.cta_n, t.cta_n)

      def mma(tiles, accs):
        a_smem, b_smem = tiles
        plgpu.wgmma(accs[0], a_smem.transpose((1, 0)), b_smem.at[:, wg_n])

      def store(values):
        _store_tiles([(values[0], out_ref.at[e, cta_p, cta_q].at[:, wg_n])], out_smem, wg, t)

      first, steps = start_ref[e], blocks_ref[e]  # in tile_k-row steps
      _run_tile(t, specs(first), steps, (a_ref.at[:, cta_p], b_ref.at[:, cta_q]), allocs, 1,
                mma, store)

  _kernel_scope(t, specs(0), t.stages, (a_ref, b_ref), out_ref.dtype, body)


def _launch(body, out_type, backend: str, t: Tiling, *args):
  interpret = None
  if backend == 'interpret':
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
    interpret = params.InterpretGPUParams()
  num_sms = 2 if backend == 'interpret' else getattr(jax.devices()[0], 'core_count', 132)
  if t.cluster:
    grid = dict(grid=(num_sms // t.cluster_size,), grid_names=('cluster_grid',),
                cluster=(t.cluster_size,), cluster_names=('cluster',))
  else:
    grid = dict(grid=(num_sms,), grid_names=('sm',))
  kernel = plgpu.kernel(
      body, out_type=out_type, **grid, num_threads=3, thread_name='wg', interpret=interpret,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return kernel(*args)


def _tile_groups(layout: BlockLayout, cta_m: int) -> jax.Array:
  """Expert of each cta_m-row tile (cta_m divides block_rows)."""
  return jnp.repeat(layout.block_group, layout.block_rows // cta_m)


def expert_band_order(groups: jax.Array, n_iters: int, band: int) -> jax.Array:
  """Visiting order of gmm's (row tile, column tile) pairs: [m_iters * n_iters] of mi * n_iters + ni.

  Row tiles go in bands of up to `band` consecutive tiles of one expert, and each band sweeps all
  column tiles (reversing direction from band to band), so the weight columns a band reads stay in
  L2 for all of its rows. Bands never straddle two experts, which fixed-size bands over all rows
  would: a straddling band streams two experts' weights at once. groups: [m_iters] expert of each
  row tile, -1 for idle tiles (trailing, as in `BlockLayout`); idle tiles go last.
  """
  m_iters = groups.shape[0]
  mi = jnp.arange(m_iters, dtype=jnp.int32)
  first = jnp.concatenate([jnp.ones((1,), bool), groups[1:] != groups[:-1]])  # run starts
  run_start = lax.cummax(jnp.where(first, mi, 0), axis=0)
  next_run = lax.cummin(jnp.where(first, mi, m_iters)[::-1], axis=0)[::-1]
  run_end = jnp.concatenate([next_run[1:], jnp.full((1,), m_iters, jnp.int32)])
  pos = mi - run_start
  band_start = run_start + pos // band * band
  size = jnp.minimum(band, run_end - band_start)
  band_id = jnp.cumsum(pos % band == 0) - 1
  ni = jnp.arange(n_iters, dtype=jnp.int32)[None, :]
  col = jnp.where((band_id % 2 == 0)[:, None], ni, n_iters - 1 - ni)
  position = (n_iters * band_start + (pos % band))[:, None] + col * size[:, None]
  position = jnp.where((groups >= 0)[:, None], position, mi[:, None] * n_iters + ni)
  tiles = mi[:, None] * n_iters + ni
  return jnp.zeros((m_iters * n_iters,), jnp.int32).at[position.reshape(-1)].set(tiles.reshape(-1))


def _group_sizes(layout: BlockLayout) -> jax.Array:
  return layout.group_blocks * layout.block_rows


def gmm(lhs, rhs, layout: BlockLayout, *, transpose_rhs: bool = False, backend: str = 'xla',
        tiling: Tiling | None = None) -> jax.Array:
  """Grouped matmul on raw kernels (no masking, no custom gradient). See module docstring."""
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if backend == 'xla':
    w = rhs.transpose(0, 2, 1) if transpose_rhs else rhs
    out = lax.ragged_dot(lhs, w, _group_sizes(layout), preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
  t = tiling or pick_tiling(GMM_TILINGS, layout.block_rows, n, lhs.shape[1])
  if t is None:
    raise ValueError(f'no gmm tiling fits block_rows={layout.block_rows}, N={n}, K={lhs.shape[1]}.')
  body = functools.partial(_gmm_kernel, t=t, transpose_rhs=transpose_rhs)
  out_type = jax.ShapeDtypeStruct((lhs.shape[0], n), lhs.dtype)
  m_iters, n_iters = lhs.shape[0] // t.cluster_m, n // t.cluster_n
  if ROW_ORDER == 'expert_bands':
    order = expert_band_order(_tile_groups(layout, t.cluster_m), n_iters, t.band)
  else:  # 'snake': fixed bands of t.band row tiles over all rows
    snake = lambda i: plgpu.planar_snake(i, (m_iters, n_iters), 0, t.band)
    mi, ni = jax.vmap(snake)(jnp.arange(m_iters * n_iters, dtype=jnp.int32))
    order = mi * n_iters + ni
  return _launch(body, out_type, backend, t, _tile_groups(layout, t.cta_m), order, lhs, rhs)


def tgmm(lhs, rhs, layout: BlockLayout, *, backend: str = 'xla',
         tiling: Tiling | None = None) -> jax.Array:
  """out[e] = lhs_e.T @ rhs_e over expert e's rows: lhs [M, P], rhs [M, Q] -> [E, P, Q]."""
  num_experts = layout.group_start.shape[0]
  p, q = lhs.shape[1], rhs.shape[1]
  if backend == 'xla':
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    out = lax.ragged_dot_general(lhs, rhs, _group_sizes(layout), dims,
                                 preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
  t = tiling or pick_tiling(TGMM_TILINGS, p, q)
  if t is None or layout.block_rows % t.tile_k or t.split != 'n':
    raise ValueError(f'no tgmm tiling fits P={p}, Q={q}, block_rows={layout.block_rows}.')
  steps = layout.block_rows // t.tile_k
  body = functools.partial(_tgmm_kernel, t=t)
  out_type = jax.ShapeDtypeStruct((num_experts, p, q), lhs.dtype)
  return _launch(body, out_type, backend, t, layout.group_start * steps,
                 layout.group_blocks * steps, lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(lhs, rhs, layout, backend, tilings):
  # A Pallas call's output does not carry the manual mesh axes its inputs vary over (inside
  # shard_map); _vary_like restores them so that outputs and gradients type-check.
  return _vary_like(gmm(lhs, rhs, layout, backend=backend, tiling=tilings[0]), lhs)


def _grouped_fwd(lhs, rhs, layout, backend, tilings):
  return _grouped(lhs, rhs, layout, backend, tilings), (lhs, rhs, layout)


def _grouped_bwd(backend, tilings, residuals, g):
  lhs, rhs, layout = residuals
  dlhs = gmm(g, rhs, layout, transpose_rhs=True, backend=backend, tiling=tilings[1])
  drhs = tgmm(lhs, g, layout, backend=backend, tiling=tilings[2])
  no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), layout)
  return _vary_like(dlhs, lhs), _vary_like(drhs.astype(rhs.dtype), rhs), no_grad


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def kernel_tilings(lhs_shape, rhs_shape, block_rows: int, tilings=(None, None, None)):
  """(forward, d lhs, d rhs) tilings for lhs [M, K] @ rhs [E, K, N], or None if one does not fit."""
  k, n = lhs_shape[1], rhs_shape[2]
  fwd, dlhs, drhs = tilings
  fwd = fwd or TUNED.get(('gmm', block_rows, k, n)) or pick_tiling(GMM_TILINGS, block_rows, n, k)
  dlhs = (dlhs or TUNED.get(('gmm_t', block_rows, n, k))
          or pick_tiling(GMM_TILINGS, block_rows, k, n))
  drhs = drhs or TUNED.get(('tgmm', block_rows, k, n)) or pick_tiling(TGMM_TILINGS, k, n)
  if drhs is not None and block_rows % drhs.tile_k:
    drhs = None
  return None if None in (fwd, dlhs, drhs) else (fwd, dlhs, drhs)


def _vary_like(x, like):
  """x marked as varying over every manual mesh axis that `like` varies over (inside shard_map):
  the custom gradient of x, computed from `like`, then has x's type, and autodiff sums it over
  the axes x was replicated on (e.g. expert weights over 'data')."""
  axes = tuple(sorted(_varying(like) - _varying(x)))
  if not axes:
    return x
  pcast = getattr(jax.lax, 'pcast', None)  # jax.lax.pvary before it
  return pcast(x, axes, to='varying') if pcast else jax.lax.pvary(x, axes)


def _varying(x) -> frozenset:
  """The manual mesh axes x varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  return frozenset(aval.mat.varying if hasattr(aval, 'mat') else getattr(aval, 'vma', ()))


def grouped_matmul(lhs, rhs, layout: BlockLayout, backend: str | None = None,
                   tilings: tuple = (None, None, None)) -> jax.Array:
  """Differentiable out[r] = lhs[r] @ rhs[expert(r)], zero on idle rows. lhs [M, K], rhs [E, K, N].

  The backward pass runs gmm with the transposed weights (d lhs) and tgmm (d rhs). tilings:
  optional (forward, d lhs, d rhs) kernel tilings; shapes no kernel tiling fits run on 'xla'.
  """
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}.')
  if backend != 'xla':
    tilings = kernel_tilings(lhs.shape, rhs.shape, layout.block_rows, tuple(tilings))
    backend = 'xla' if tilings is None else backend
  out = _grouped(lhs, _vary_like(rhs.astype(lhs.dtype), lhs), layout, backend,
                 tuple(tilings or (None,) * 3))
  return jnp.where(layout.row_active()[:, None], out, 0)


# ------------------------------------------------------------------------------------------------
# Fused SwiGLU gate / up
# ------------------------------------------------------------------------------------------------


def _silu_mul(gate, up):
  """up * silu(gate), in the inputs' dtype (float32 accumulators in the kernel)."""
  return up * (gate * jax.nn.sigmoid(gate))


def _gate_up_kernel(block_group_ref, order_ref, a_ref, bg_ref, bu_ref, h_ref, *gu_ref,
                    t: Tiling):
  """h = up * silu(gate) of [cta_m, cta_n] tiles of h; gate and up each one accumulator per
  warpgroup, from one A tile and one tile of each weight a step. With gu_ref, also writes gate
  and up to gu = [gate | up] [M, 2f]."""
  m, k = a_ref.shape
  f = bg_ref.shape[2]
  smem = dict(transforms=_transforms(t.tile_k, a_ref.dtype), memory_space=plgpu.SMEM)
  b_spec = plgpu.BlockSpec((t.tile_k, t.cta_n), lambda kk: (kk, 0), **smem)
  specs = [plgpu.BlockSpec((t.cta_m, t.tile_k), lambda kk: (0, kk), **smem), b_spec, b_spec]
  steps = k // t.tile_k

  def body(allocs, out_smem, wg):
    wg_m, wg_n = _wg_slices(t, wg)

    @_expert_row_tiles(t, block_group_ref, order_ref, m // t.cta_m, f // t.cta_n)
    def _tile(group, cta_m, cta_n, ni):
      def mma(tiles, accs):
        a_smem, bg_smem, bu_smem = tiles
        a = a_smem.at[wg_m, :]
        plgpu.wgmma(accs[0], a, bg_smem.at[:, wg_n])
        plgpu.wgmma(accs[1], a, bu_smem.at[:, wg_n])

      def store(values):
        gate, up = values
        tiles = [(_silu_mul(gate, up), h_ref.at[cta_m, cta_n])]
        if gu_ref:
          up_n = pl.ds(f + ni * t.cta_n, t.cta_n)
          tiles += [(gate, gu_ref[0].at[cta_m, cta_n]), (up, gu_ref[0].at[cta_m, up_n])]
        _store_tiles([(value, ref.at[wg_m, wg_n]) for value, ref in tiles], out_smem, wg, t)

      operands = (a_ref.at[cta_m, :], bg_ref.at[group].at[:, cta_n], bu_ref.at[group].at[:, cta_n])
      _run_tile(t, specs, steps, operands, allocs, 2, mma, store)

  _kernel_scope(t, specs, steps, (a_ref, bg_ref.at[0], bu_ref.at[0]), h_ref.dtype, body)


def _gate_up_t_kernel(block_group_ref, order_ref, gu_ref, bg_ref, bu_ref, out_ref, *, t: Tiling):
  """out = d_gate @ w_gate[e].T + d_up @ w_up[e].T, gu_ref = [d_gate | d_up] [M, 2f]: each step
  loads a K slice of both halves and of both weights and issues both products into one
  accumulator."""
  m = gu_ref.shape[0]
  f = bg_ref.shape[2]
  n = out_ref.shape[1]
  steps = f // t.tile_k  # K steps over each half; the up half starts this many K blocks in
  smem = dict(transforms=_transforms(t.tile_k, gu_ref.dtype), memory_space=plgpu.SMEM)
  b_spec = plgpu.BlockSpec((t.cta_n, t.tile_k), lambda kk: (0, kk), **smem)
  specs = [plgpu.BlockSpec((t.cta_m, t.tile_k), lambda kk: (0, kk), **smem),
           plgpu.BlockSpec((t.cta_m, t.tile_k), lambda kk: (0, kk + steps), **smem), b_spec, b_spec]

  def body(allocs, out_smem, wg):
    wg_m, wg_n = _wg_slices(t, wg)

    @_expert_row_tiles(t, block_group_ref, order_ref, m // t.cta_m, n // t.cta_n)
    def _tile(group, cta_m, cta_n, _):
      def mma(tiles, accs):
        ag_smem, au_smem, bg_smem, bu_smem = tiles
        plgpu.wgmma(accs[0], ag_smem.at[wg_m, :], bg_smem.at[wg_n, :].transpose((1, 0)))
        plgpu.wgmma(accs[0], au_smem.at[wg_m, :], bu_smem.at[wg_n, :].transpose((1, 0)))

      def store(values):
        _store_tiles([(values[0], out_ref.at[cta_m, cta_n].at[wg_m, wg_n])], out_smem, wg, t)

      rows = gu_ref.at[cta_m, :]
      operands = (rows, rows, bg_ref.at[group].at[cta_n, :], bu_ref.at[group].at[cta_n, :])
      _run_tile(t, specs, steps, operands, allocs, 1, mma, store)

  _kernel_scope(t, specs, steps, (gu_ref, gu_ref, bg_ref.at[0], bu_ref.at[0]), out_ref.dtype,
                body)


def _tgmm_gate_up_kernel(start_ref, blocks_ref, a_ref, gu_ref, outg_ref, outu_ref, *, t: Tiling):
  """outg[e] = a_e.T @ d_gate_e and outu[e] = a_e.T @ d_up_e (gu = [d_gate | d_up] [M, 2f]), one
  A tile and one tile of each half a step, two accumulators per warpgroup (split 'n')."""
  num_experts, p, f = outg_ref.shape
  specs = _expert_specs(t, a_ref, gu_ref, halves=2)

  def body(allocs, out_smem, wg):
    _, wg_n = _wg_slices(t, wg)

    @_tile_grid(t, p // t.cta_m, f // t.cta_n, minor=1, lead=(num_experts,))
    def _tile(e, pi, qi):
      cta_p, cta_q = pl.ds(pi * t.cta_m, t.cta_m), pl.ds(qi * t.cta_n, t.cta_n)

      def mma(tiles, accs):
        a_smem, bg_smem, bu_smem = tiles
        a = a_smem.transpose((1, 0))
        plgpu.wgmma(accs[0], a, bg_smem.at[:, wg_n])
        plgpu.wgmma(accs[1], a, bu_smem.at[:, wg_n])

      def store(values):
        _store_tiles([(value, out.at[e, cta_p, cta_q].at[:, wg_n])
                      for value, out in zip(values, (outg_ref, outu_ref))], out_smem, wg, t)

      first, steps = start_ref[e], blocks_ref[e]  # in tile_k-row steps
      up_q = pl.ds(f + qi * t.cta_n, t.cta_n)
      _run_tile(t, specs(first), steps, (a_ref.at[:, cta_p], gu_ref.at[:, cta_q],
                                         gu_ref.at[:, up_q]), allocs, 2, mma, store)

  _kernel_scope(t, specs(0), t.stages, (a_ref, gu_ref, gu_ref), outg_ref.dtype, body)


GATE_UP_CANDIDATES = {'gate_up': GATE_UP_TILINGS, 'gate_up_t': GATE_UP_T_TILINGS,
                      'tgmm_gate_up': TGMM_GATE_UP_TILINGS}


def _gate_up_fits(t: Tiling, kind: str) -> bool:
  if t.cluster or (kind == 'tgmm_gate_up' and t.split != 'n'):
    return False
  if kind in ('gate_up', 'tgmm_gate_up') and t.tile_m * t.tile_n > 8192:
    return False  # two float32 accumulators per warpgroup
  return t.tile_m % t.epi == 0 and t.tile_n % t.epi == 0


def gate_up_fitting(kind: str, m_tile: int, n: int, k: int | None = None) -> list[Tiling]:
  """The candidate tilings of fused kernel `kind` ('gate_up', 'gate_up_t', 'tgmm_gate_up') that
  fit (`fitting`, plus the fused kernels' own limits), the default first."""
  return [t for t in fitting(GATE_UP_CANDIDATES[kind], m_tile, n, k, kind)
          if _gate_up_fits(t, kind)]


def gate_up_tilings(x_shape, f: int, block_rows: int, tilings=(None, None, None)):
  """(gate_up, gate_up_t, tgmm_gate_up) tilings for x [M, d] and weights [E, d, f], or None if one
  does not fit (the caller then runs the unfused path). Given tilings come first, then measured
  winners (`TUNED`, keyed like gmm's: (kind, block_rows, K, N)), then the first fitting."""
  d = x_shape[1]
  shapes = {'gate_up': (d, f, block_rows, f, d), 'gate_up_t': (f, d, block_rows, d, f),
            'tgmm_gate_up': (d, f, d, f, None)}  # kind: (K, N of the key, fitting's m_tile, n, k)

  def pick(given, kind):
    key_k, key_n, *fit = shapes[kind]
    fits = gate_up_fitting(kind, *fit)
    return given or TUNED.get((kind, block_rows, key_k, key_n)) or (fits[0] if fits else None)

  fwd, dx, dw = (pick(given, kind) for given, kind in zip(tilings, shapes))
  if dw is not None and block_rows % dw.tile_k:
    dw = None
  return None if None in (fwd, dx, dw) else (fwd, dx, dw)


def gate_up(x, w_gate, w_up, layout: BlockLayout, *, backend: str = 'interpret',
            tiling: Tiling | None = None, with_gu: bool = False):
  """h [M, f] = (x @ w_up[e]) * silu(x @ w_gate[e]) (raw kernel: rows of idle blocks unwritten);
  with_gu: (h, gu = [x @ w_gate[e] | x @ w_up[e]] [M, 2f]). backend 'mosaic' or 'interpret'."""
  m, f = x.shape[0], w_gate.shape[2]
  t = tiling or gate_up_tilings(x.shape, f, layout.block_rows)[0]
  h_type = jax.ShapeDtypeStruct((m, f), x.dtype)
  out_type = (h_type, jax.ShapeDtypeStruct((m, 2 * f), x.dtype)) if with_gu else h_type
  order = expert_band_order(_tile_groups(layout, t.cta_m), f // t.cta_n, t.band)
  body = functools.partial(_gate_up_kernel, t=t)
  return _launch(body, out_type, backend, t, _tile_groups(layout, t.cta_m), order, x, w_gate, w_up)


def gate_up_t(gu, w_gate, w_up, layout: BlockLayout, *, backend: str = 'interpret',
              tiling: Tiling | None = None):
  """[M, d] = gu[:, :f] @ w_gate[e].T + gu[:, f:] @ w_up[e].T (rows of idle blocks unwritten)."""
  m, d = gu.shape[0], w_gate.shape[1]
  t = tiling or gate_up_tilings((m, d), w_gate.shape[2], layout.block_rows)[1]
  order = expert_band_order(_tile_groups(layout, t.cta_m), d // t.cta_n, t.band)
  body = functools.partial(_gate_up_t_kernel, t=t)
  return _launch(body, jax.ShapeDtypeStruct((m, d), gu.dtype), backend, t,
                 _tile_groups(layout, t.cta_m), order, gu, w_gate, w_up)


def tgmm_gate_up(x, gu, layout: BlockLayout, *, backend: str = 'interpret',
                 tiling: Tiling | None = None):
  """(x_e.T @ gu_e[:, :f], x_e.T @ gu_e[:, f:]) per expert e: two [E, d, f] (zeros for empty
  experts)."""
  num_experts, d, f = layout.group_start.shape[0], x.shape[1], gu.shape[1] // 2
  t = tiling or gate_up_tilings(x.shape, f, layout.block_rows)[2]
  steps = layout.block_rows // t.tile_k
  out = jax.ShapeDtypeStruct((num_experts, d, f), x.dtype)
  body = functools.partial(_tgmm_gate_up_kernel, t=t)
  return _launch(body, (out, out), backend, t, layout.group_start * steps,
                 layout.group_blocks * steps, x, gu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _swiglu(x, w_gate, w_up, layout, backend, tilings):
  return _vary_like(gate_up(x, w_gate, w_up, layout, backend=backend, tiling=tilings[0]), x)


def _swiglu_fwd(x, w_gate, w_up, layout, backend, tilings):
  h, gu = gate_up(x, w_gate, w_up, layout, backend=backend, tiling=tilings[0], with_gu=True)
  return _vary_like(h, x), (x, w_gate, w_up, _vary_like(gu, x), layout)


def swiglu_grad(gu, dh, active):
  """[d gate | d up] [M, 2f] of h = up * silu(gate) for gu = [gate | up], zero on inactive rows;
  float32 arithmetic, gu's dtype out (XLA fuses it into one element-wise pass)."""
  f = gu.shape[1] // 2
  gate, up = gu[:, :f].astype(jnp.float32), gu[:, f:].astype(jnp.float32)
  dh = dh.astype(jnp.float32)
  sig = jax.nn.sigmoid(gate)
  d_gate = dh * up * sig * (1 + gate * (1 - sig))
  d_up = dh * gate * sig
  dgu = jnp.concatenate([d_gate, d_up], axis=1)
  return jnp.where(active[:, None], dgu, 0).astype(gu.dtype)


def _swiglu_bwd(backend, tilings, residuals, dh):
  x, w_gate, w_up, gu, layout = residuals
  dgu = swiglu_grad(gu, dh, layout.row_active())
  dx = gate_up_t(dgu, w_gate, w_up, layout, backend=backend, tiling=tilings[1])
  dw_gate, dw_up = tgmm_gate_up(x, dgu, layout, backend=backend, tiling=tilings[2])
  no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), layout)
  return (_vary_like(dx, x), _vary_like(dw_gate.astype(w_gate.dtype), w_gate),
          _vary_like(dw_up.astype(w_up.dtype), w_up), no_grad)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(x, w_gate, w_up, layout: BlockLayout, backend: str | None = None,
           tilings: tuple = (None, None, None), mask: bool = True, fuse: bool = True):
  """Differentiable h[r] = (x[r] @ w_up[e]) * silu(x[r] @ w_gate[e]), e = expert(r). x [M, d],
  weights [E, d, f].

  On the kernel backends gate and up run fused (`gate_up`, `gate_up_t`, `tgmm_gate_up`); with
  `fuse=False`, on 'xla', or where no fused tiling fits (f not a multiple of the tile), as two
  `grouped_matmul`s (the same arithmetic as `experts.feed_forward`). mask: zero the rows of idle
  blocks; without it the fused path leaves them undefined, which is fine when h only feeds
  grouped matmuls (they skip idle blocks, and `grouped_matmul` masks its own output).
  """
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}.')
  fused = None
  if fuse and backend != 'xla':
    fused = gate_up_tilings(x.shape, w_gate.shape[2], layout.block_rows, tuple(tilings))
  if fused is None:
    up = grouped_matmul(x, w_up, layout, backend)
    return up * jax.nn.silu(grouped_matmul(x, w_gate, layout, backend))
  w_gate, w_up = (_vary_like(w.astype(x.dtype), x) for w in (w_gate, w_up))
  h = _swiglu(x, w_gate, w_up, layout, backend, fused)
  return jnp.where(layout.row_active()[:, None], h, 0) if mask else h
