"""The mesh, the train state's layout, and a model on a mesh (each MoE layer under `shard_map`).

Layout. A 4-D mesh with axes ('data', 'fsdp', 'expert', 'tensor') over all devices (all sizes 1 is
one device, no shard_map). Weights are stored by their logical names through `rules.RULES`
(`state_shardings`): d_model over 'fsdp', heads / FFN width / vocabulary over 'tensor', the experts'
E over 'expert'; the optimizer moments alike.
  * tokens: the batch dim is sharded over data * fsdp * expert: each device holds
    b = B / (data * fsdp * expert) sequences (`BATCH`), the same ones on every 'tensor' shard.
  * inside the MoE layer's shard_map: expert weights (leaves under a module named 'experts',
    leading dim E) over 'expert' (E / expert experts per device), everything else (router,
    shared experts, the aux-free bias, scalars) whole; XLA gathers the fsdp / tensor shards.
  * the rest of the model runs under jit's automatic partitioning (GSPMD).
Inside `shard_map` each device routes its own token groups, and `MoELayer(expert_axis='expert')`
sends every expert's tokens to the device holding it over the 'expert' axis, runs its E / expert
local experts and sends the outputs back. How is chosen by the plan (`dispatch.dispatcher`):
  * capacity plans (and dispatch 'einsum' / 'gather'): capacity buffers [E, G * C, d] trade expert
    blocks for token blocks by a dense all_to_all (`dispatch.ExpertParallel`);
  * dropless plans with dispatch 'ragged' / 'blocked': exactly the rows each expert needs travel by
    ragged all-to-all (`ragged_exchange`: `jax.lax.ragged_all_to_all` on GPU / TPU, a padded
    all_to_all stand-in on CPU) and the local experts run as grouped matmuls over them
    (`fast_dispatch.BlockedExpertParallel`); `MoESpec.num_chunks` pipelines the exchange.
Gradients of replicated params are summed over the devices that share them by `shard_map` itself.

Exactness. Routing is per token group (`MoESpec.group_by`), and a shard routes only its own tokens.
Let s = 0..N-1, N = data * fsdp * expert, index the shards data-major (the order of `BATCH`).
  * 'sequence': groups never straddle shards, so the sharded layer equals the unsharded layer on
    the whole batch: outputs, aux losses, metrics, gradients, bias update (float rounding aside).
  * 'position' and 'batch': a shard's groups hold only its b local sequences (one position of b
    sequences; all b * L local tokens), and capacity is computed from that local group size. The
    sharded layer equals the unsharded layer applied to each sub-batch x[s*b:(s+1)*b] separately,
    outputs concatenated, aux losses and metrics averaged over the N sub-batches, tokens_per_expert
    summed (max_over_mean_load taken from that sum), and the bias updated from the summed load.
  * dropless: token outputs do not depend on grouping and equal the whole-batch layer; the aux
    losses follow the group_by rule above ('ragged' routes one 'batch' group; the load-balancing
    loss is not linear in a group's statistics), so 'blocked' with 'sequence' equals it all.
  * router jitter / noise: each shard folds its index into the 'router' key, so random draws differ
    from an unsharded run.

Cost. The capacity path computes every slot, full or empty (a capacity plan's 'blocked' runs as
'gather' here, logged once; a dropless plan under 'einsum' / 'gather' runs through capacity slots of
size T: E / k times the grouped FLOPs). The dropless path computes each assignment once; its
receive buffer is sized for the worst case (every token of the expert axis choosing one device's
experts), memory only where the Mosaic kernels run: they skip its idle blocks.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.moe import families, flops
from moe_jax.moe.layer import EXPERTS as EXPERTS_KEY, MoELayer
from moe_jax.moe.spec import MoESpec
from moe_jax.parallel import rules
from moe_jax.parallel.rules import BATCH_AXES, DATA, EXPERT, FSDP, TENSOR
from moe_jax.validate import Section

AXES = rules.MESH_AXES  # ('data', 'fsdp', 'expert', 'tensor')
BATCH = P(BATCH_AXES)  # leading (batch) dim sharded over data * fsdp * expert
MESH = Section('mesh')


def make_mesh(data: int = 1, expert: int = 1, devices: Sequence[jax.Device] | None = None, *,
              fsdp: int = 1, tensor: int = 1) -> Mesh:
  """A ('data', 'fsdp', 'expert', 'tensor') mesh of those sizes over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = {DATA: data, FSDP: fsdp, EXPERT: expert, TENSOR: tensor}
  for name, size in sizes.items():
    MESH.positive(name, size)
  total = math.prod(sizes.values())
  if total != len(devices):
    n = len(devices)
    named = _fields(' * ', **sizes)
    hint = f'data={n // expert}, expert={expert}' if n % expert == 0 else f'data={n}, expert=1'
    simulate = ''
    if total > n and all(d.platform == 'cpu' for d in devices):
      simulate = (f' To try this mesh on a CPU, simulate {total} devices: start the '
                  f'command with XLA_FLAGS=--xla_force_host_platform_device_count={total}.')
    raise ValueError(
        f'{named} = {total} does not match the {n} devices: choose sizes whose product is {n} '
        f'(e.g. {hint}).{simulate}')
  return jax.make_mesh(tuple(sizes.values()), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def mesh_shape(config) -> dict[str, int]:
  """{axis: size} of `config.mesh` for the four axes (an absent section or field: 1), each a
  positive int."""
  given = dict(config.mesh.items()) if 'mesh' in config else {}
  MESH.known(given, AXES)
  sizes = {axis: given.get(axis, 1) for axis in AXES}
  for name, size in sizes.items():
    MESH.positive(name, size)
  return sizes


def mesh_from_config(config) -> Mesh:
  """The mesh of `config.mesh` = {data, fsdp, expert, tensor}; an absent section means 1x1.

  All sizes 1 is one (local) device however many there are; otherwise their product must equal
  the device count (`make_mesh`).
  """
  sizes = mesh_shape(config)
  one = math.prod(sizes.values()) == 1
  return make_mesh(sizes[DATA], sizes[EXPERT], jax.local_devices()[:1] if one else None,
                   fsdp=sizes[FSDP], tensor=sizes[TENSOR])


def abstract_mesh(config) -> jax.sharding.AbstractMesh:
  """`config.mesh` as a device-free `AbstractMesh` (for `check_mesh` and planning: no device is
  touched, so it may describe a pod from a laptop)."""
  return jax.sharding.AbstractMesh(tuple(mesh_shape(config).values()), AXES)


def _fields(sep: str, **sizes) -> str:
  """'config.mesh.data=2 * config.mesh.expert=4' (sep ' * '): data and expert always, the other
  axes when larger than 1."""
  return sep.join(f'config.mesh.{name}={size}' for name, size in sizes.items()
                  if size > 1 or name in (DATA, EXPERT))


def batch_shards(mesh) -> int:
  """The shards of the batch: data * fsdp * expert (the tensor axis repeats them)."""
  return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def check_mesh(spec: MoESpec | None, mesh: Mesh | jax.sharding.AbstractMesh, batch_size: int,
               seq_len: int | None = None) -> None:
  """Raises a ValueError naming the config field when `spec` cannot run sharded over `mesh`.

  Checks the mesh axes, that the expert axis divides num_experts, that the global batch divides
  over all devices and, given seq_len, that the router works on the local token groups. spec=None
  (a dense model) checks the mesh and the batch only.
  """
  missing = [a for a in AXES if a not in mesh.shape]
  if missing:
    raise ValueError(f'mesh axes {tuple(mesh.axis_names)} lack {missing}: build the mesh with '
                     f'parallel.sharding.make_mesh (config.mesh.data, fsdp, expert, tensor).')
  data, fsdp, expert = (mesh.shape[axis] for axis in BATCH_AXES)
  if spec is not None and spec.num_experts % expert:
    raise ValueError(f'config.mesh.expert={expert} does not divide config.moe.num_experts='
                     f'{spec.num_experts}: use an expert axis size that divides the experts.')
  shards = data * fsdp * expert
  if batch_size % shards:
    raise ValueError(
        f'config.data.batch_size={batch_size} is not divisible by '
        f'{_fields(" * ", data=data, fsdp=fsdp, expert=expert)} = {shards}: tokens are sharded '
        f'over these axes; use a multiple of {shards}.')
  if spec is None or seq_len is None:
    return
  group_by = spec.routing_group_by
  n = flops.Shape(batch_size // shards, seq_len).group_size(group_by)
  try:
    families.route_shapes(spec, n)
  except ValueError as e:
    raise ValueError(
        f'Under {_fields(", ", data=data, fsdp=fsdp, expert=expert)} each device routes '
        f"group_by={group_by!r} groups of {n} tokens ({batch_size // shards} local sequences of "
        f'{seq_len}): {e} Or raise config.data.batch_size / use fewer devices.') from e


def _leaf_spec(path, leaf) -> P:
  keys = {getattr(k, 'key', getattr(k, 'name', None)) for k in path}
  return P(EXPERT) if EXPERTS_KEY in keys and len(getattr(leaf, 'shape', ())) >= 1 else P()


def param_specs(tree: Any) -> Any:
  """The MoE layer's compute layout inside its shard_map, by path: leaves under a key 'experts'
  (stacked expert weights [E, ...]) get P('expert'); everything else P() (whole). Storage follows
  the logical rules instead (`state_shardings`, `moe_jax.parallel.rules`)."""
  return jax.tree_util.tree_map_with_path(_leaf_spec, tree)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
  """`NamedSharding`s of `param_specs(tree)`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, _leaf_spec(path, leaf)), tree)


def state_shardings(boxed: Any, mesh: Mesh) -> Any:
  """`NamedSharding`s of a variables / params / train-state pytree from its logical annotations:
  `boxed` holds the `nn.LogicallyPartitioned` boxes of `module.init` (and of an optimizer state
  built from boxed params), from `rules.boxed_shapes`. The result has the unboxed structure
  (`rules.shardings`)."""
  return rules.shardings(boxed, mesh)


def restore_target(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` (arrays or shapes) carrying `shardings` (a mesh's
  `state_shardings`).

  An orbax restore target (`ocp.args.StandardRestore(restore_target(...))`): it lays a checkpoint
  written on any mesh out on this one.
  """
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] token batch: B over data * fsdp * expert."""
  return NamedSharding(mesh, BATCH)


def init_variables(module, mesh: Mesh, rngs, *args, **kwargs):
  """`module.init(rngs, *args, **kwargs)` laid out by its logical annotations
  (`state_shardings`); the values are the same as on one device."""
  boxed = rules.boxed_shapes(lambda r: module.init(r, *args, **kwargs), rngs)
  # A function of its own: JAX's trace cache knows nothing of flax's rules context.
  return jax.jit(lambda r: module.init(r, *args, **kwargs),
                 out_shardings=state_shardings(boxed, mesh))(rngs)


def expert_parallel(module: MoELayer) -> MoELayer:
  """`module` (a `MoELayer`) configured to run inside your own shard_map over a `make_mesh`
  mesh: experts over 'expert', tokens over data * fsdp * expert."""
  return module.clone(expert_axis=EXPERT, batch_axes=BATCH_AXES)


def shard_module(module, mesh: Mesh, *, train: bool = False,
                 mutable: bool | Sequence[str] = False, seq_len: int | None = None,
                 always_shard: bool = False) -> Callable:
  """`module.apply` laid out over `mesh` by the logical rules (`rules.use`).

  `module`: an unsharded `MoELayer`, or a model of them (`Transformer`, `ViT`). Its dense layers
  run under jit's automatic partitioning (weights stored as the rules say, XLA gathering the fsdp
  shards for use, heads and FFN width over 'tensor'); each MoE layer runs under its own
  `jax.shard_map`, tokens over data * fsdp * expert and experts over 'expert' (`MoELayer`).
  seq_len: the tokens per example its MoE layers see, for `check_mesh` (default x.shape[1], for
  token inputs x [B, L, ...]; a ViT's images have more dims). Returns apply(variables, x,
  rngs=None) with module.apply's outputs: (y, aux), or ((y, aux), updated collections) when
  `mutable` names collections (e.g. ['router_bias']). `variables` hold global arrays (an
  unsharded module's tree, e.g. from `init_variables`); x: [B, ...] with B over data * fsdp *
  expert. On a one-device mesh this is plain `module.apply` (no shard_map: random draws as
  unsharded), unless `always_shard`: then the expert-parallel path runs with its exchange local
  (tests, benchmarks).
  """

  def apply(variables, x, rngs=None):
    check_mesh(module.spec, mesh, batch_size=x.shape[0],
               seq_len=x.shape[1] if seq_len is None else seq_len)
    if mesh.size == 1 and not always_shard:
      return module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
    with rules.use(mesh):
      x = jax.lax.with_sharding_constraint(x, batch_sharding(mesh))
      return module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)

  return apply


shard_moe_layer = shard_module  # the name for a single layer
