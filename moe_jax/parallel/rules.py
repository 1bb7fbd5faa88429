"""Sharding by logical axis names: the one table that maps them to the mesh axes.

Layers name the dims of their weights and activations logically (`nn.with_logical_partitioning`
on a parameter's initializer, `nn.with_logical_constraint` on an activation), as MaxText does;
`RULES` turns those names into mesh axes. The mesh has four axes, `MESH_AXES` = ('data', 'fsdp',
'expert', 'tensor'), in that order (tensor fastest-varying: the neighbouring devices of a node):

  logical name  mesh axes                  what it names
  batch         ('data', 'fsdp', 'expert') the batch dim of tokens and activations
  embed         'fsdp'                     d_model of every weight (ZeRO-3: XLA gathers it for use)
  heads         'tensor'                   attention heads (query, key, value: column-parallel;
  kv_heads      'tensor'                   the output projection: row-parallel)
  mlp           'tensor'                   the dense FFN's width (w_in, w_gate column-, w_out
                                           row-parallel) and the experts' width in storage
  vocab         'tensor'                   the vocabulary dim of the (un)embedding
  exp           'expert'                   the leading E dim of the stacked expert weights
  kv, norm, length, latent, classes, patch -  replicated (head size, norm scales, positions, ...)

Every parameter and its optimizer state is stored by these rules (optax's moments carry the same
boxes, so `nn.get_partition_spec` names them alike). A mesh axis that does not divide a dim is
dropped for that dim (the dim is replicated over it: e.g. 256 byte-vocab rows over a tensor axis of
3), and so are axes of size 1, so a 2x4 (data x expert) mesh keeps its old specs.

The MoE layer reads 'batch' and 'exp' from the same table (`moe.layer.MoELayer`): under `use(mesh)`
it runs under `jax.shard_map` with its tokens split over the 'batch' axes and its experts over the
'exp' axis; every other layer runs under jit's automatic partitioning (GSPMD).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA, FSDP, EXPERT, TENSOR = 'data', 'fsdp', 'expert', 'tensor'
MESH_AXES = (DATA, FSDP, EXPERT, TENSOR)
BATCH_AXES = (DATA, FSDP, EXPERT)  # tokens: every shard routes only its own sequences

RULES = (
    ('batch', BATCH_AXES),
    ('embed', FSDP),
    ('heads', TENSOR),
    ('kv_heads', TENSOR),
    ('mlp', TENSOR),
    ('vocab', TENSOR),
    ('exp', EXPERT),
    ('kv', None),
    ('norm', None),
    ('length', None),
    ('latent', None),
    ('classes', None),
    ('patch', None),
)


def mesh_axes(names: tuple[str | None, ...]) -> P:
  """The mesh PartitionSpec of logical `names` by `RULES` (unknown names: replicated)."""
  return nn.logical_to_mesh_axes(names, RULES)


def _fit(spec: P, shape: tuple[int, ...], mesh_shape) -> P:
  """`spec` without the mesh axes that are absent, of size 1, or do not divide their dim."""
  dims = []
  for i, entry in enumerate(tuple(spec)[:len(shape)]):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
    if axes and shape[i] % math.prod(mesh_shape[a] for a in axes):
      axes = ()
    dims.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while dims and dims[-1] is None:
    dims.pop()
  return P(*dims)


def boxed_shapes(fn, *args) -> Any:
  """`jax.eval_shape(fn, *args)` with `RULES` in context, so that the layers' logical names come
  boxed (`moe.experts.logical`): the input of `specs` / `shardings`. No mesh is set: nothing is
  constrained."""
  with nn.logical_axis_rules(RULES):
    return jax.eval_shape(fn, *args)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def specs(tree: Any, mesh) -> Any:
  """Mesh PartitionSpecs for a pytree holding `nn.LogicallyPartitioned` boxes (`boxed_shapes` of
  `module.init`, or of an optimizer state built from boxed params): a box's names through
  `RULES`, fitted to its shape and `mesh` (`_fit`); an unboxed leaf is replicated. The result has
  the unboxed tree's structure."""
  logical = nn.get_partition_spec(tree)
  values = jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)
  shape = dict(mesh.shape)
  return jax.tree.map(lambda s, v: _fit(mesh_axes(tuple(s)), getattr(v, 'shape', ()), shape),
                      logical, values, is_leaf=lambda x: isinstance(x, P))


def shardings(tree: Any, mesh) -> Any:
  """`NamedSharding`s of `specs(tree, mesh)`, for jit's out_shardings and orbax restore targets."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs(tree, mesh),
                      is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def use(mesh):
  """Inside: `mesh` is the context mesh (jax.set_mesh outside jit, its abstract mesh inside) and
  `RULES` the logical axis rules, so `nn.with_logical_constraint` shards activations and the MoE
  layers run under `jax.shard_map` over it."""
  with contextlib.ExitStack() as stack:
    try:
      stack.enter_context(jax.set_mesh(mesh))
    except ValueError:  # inside jit: only the abstract mesh may be set
      stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    stack.enter_context(nn.logical_axis_rules(RULES))
    yield
