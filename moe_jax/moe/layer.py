"""The MoE layer: router projection, a router family, dispatch, experts, combine.

Tokens are routed in groups (`MoESpec.group_by`); every group gets its own routing decision and
capacity. One dispatcher (`moe_jax.moe.dispatch`) runs the experts for all groups at once.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import routing
from moe_jax.moe import dispatch, families
from moe_jax.moe.experts import Experts, FeedForward
from moe_jax.moe.spec import MoESpec, resolve_dispatch

EXPERTS = 'experts'  # the `Experts` submodule: stacked weights [E, ...], sharded over the experts


def to_groups(x: jax.Array, group_by: str) -> jax.Array:
  """[B, L, d] -> [G, T, d] token groups."""
  b, l, d = x.shape
  if group_by == 'sequence':
    return x
  if group_by == 'position':
    return x.transpose(1, 0, 2)
  return x.reshape(1, b * l, d)


def from_groups(y: jax.Array, group_by: str, shape) -> jax.Array:
  """Inverse of `to_groups`: [G, T, d] -> [B, L, d]."""
  if group_by == 'position':
    return y.transpose(1, 0, 2)
  return y.reshape(shape)


class MoELayer(nn.Module):
  """Mixture-of-Experts FFN. x: [B, L, d] -> ([B, L, d], aux).

  aux = {'loss': weighted auxiliary loss (scalar), 'losses': unweighted losses, 'metrics': routing
  metrics averaged over groups ('tokens_per_expert' [E] summed)}. Dropped tokens get zero output:
  the block's residual carries them.

  With `spec.bias_update_rate > 0` the selection bias lives in the 'router_bias' collection and is
  updated by the sign rule in training when that collection is mutable (outside the gradient).

  Expert parallelism (run inside `jax.shard_map`, see `moe_jax.parallel.sharding`): `expert_axis` names the
  mesh axis the experts are sharded over. Each shard routes its own groups and runs its E / n
  experts; capacity buffers travel by all_to_all, dropless rows by ragged all-to-all
  (`dispatch.dispatcher`). `batch_axes`
  names the axes the tokens are sharded over: aux losses and metrics are averaged over them
  (tokens_per_expert summed), so every shard reports the global value and the bias update is
  identical on every shard.
  """
  spec: MoESpec
  dtype: Any = jnp.float32
  expert_axis: str | None = None
  batch_axes: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, token_ids: jax.Array | None = None):
    """x: [B, L, d]; token_ids: [B, L] int, the LM's input ids (needed by hash routing)."""
    axes = None if self.expert_axis is not None or self.is_initializing() else context_axes()
    if axes is not None:
      return self._shard_mapped(x, train, token_ids, *axes)
    spec = self.spec
    groups = to_groups(x, spec.routing_group_by)  # [G, T, d]
    bias = (self.variable('router_bias', 'bias', jnp.zeros, (spec.num_experts,), jnp.float32)
            if spec.bias_update_rate > 0 else None)
    selection_bias = None if bias is None else bias.value
    with jax.named_scope('route'):  # logits, top-k and the plan; the scope names it in profiles
      logits = self._router_logits(groups, train)
      rngs = (jax.random.split(self._router_key(), groups.shape[0])
              if train and spec.noise_std > 0 else None)
      ids = self._grouped_ids(token_ids)
      out = jax.vmap(lambda lg, rng, tid: families.route(
          spec, families.Group(lg, selection_bias, rng, train, tid)))(logits, rngs, ids)

    experts = Experts(self._num_local_experts(), x.shape[-1], spec.d_ff, spec.activation,
                      self.dtype, name=EXPERTS)
    executor = resolve_dispatch(spec, jax.default_backend(), self.dtype)
    y = dispatch.moe_apply(out.plan, groups, experts, executor, dtype=self.dtype,
                           expert_axis=self.expert_axis, num_chunks=spec.num_chunks)
    if spec.num_shared_experts:
      y = y + FeedForward(spec.num_shared_experts * spec.d_ff, spec.activation, self.dtype,
                          name='shared_experts')(groups)

    aux = layer_aux(spec, out, self.batch_axes, x.shape[:2])
    if bias is not None and train and self.is_mutable_collection('router_bias'):
      bias.value = routing.update_bias(selection_bias, aux['metrics']['tokens_per_expert'],
                                       spec.bias_update_rate)
    return from_groups(y, spec.routing_group_by, x.shape).astype(x.dtype), aux

  def _shard_mapped(self, x, train: bool, token_ids, expert_axis: str, batch_axes: tuple):
    """The layer under `jax.shard_map` over the context mesh (`context_axes`): each shard routes
    its own sequences (x split over `batch_axes`) and holds E / size(expert_axis) experts. The
    variables enter with the experts over `expert_axis` and everything else whole: XLA gathers
    what the logical rules store sharded (the experts' embed dim over 'fsdp', ...) first. Tokens
    are whole on the mesh's other axes (tensor), which repeat the same work."""
    local = self.clone(parent=None, expert_axis=expert_axis, batch_axes=batch_axes)
    variables = {name: dict(value) for name, value in self.variables.items()}
    mutable = (['router_bias'] if train and 'router_bias' in variables
               and self.is_mutable_collection('router_bias') else False)
    spec = self.spec
    key = self.make_rng('router') if train and (spec.jitter > 0 or spec.noise_std > 0) else None
    tokens = P(batch_axes)
    variable_specs = jax.tree_util.tree_map_with_path(
        lambda path, leaf: P(expert_axis) if EXPERTS in {getattr(k, 'key', None) for k in path}
        else P(), variables)

    def body(variables, x, key, token_ids):
      return local.apply(variables, x, train=train, token_ids=token_ids, mutable=mutable,
                         rngs=None if key is None else {'router': key})

    out_specs = (tokens, P())
    if mutable:
      out_specs = (out_specs, {'router_bias': P()})
    out = jax.shard_map(body, in_specs=(variable_specs, tokens, P(), tokens),
                        out_specs=out_specs)(variables, x, key, token_ids)
    if mutable:
      out, updated = out
      self.put_variable('router_bias', 'bias', updated['router_bias']['bias'])
    return out

  def _router_logits(self, groups: jax.Array, train: bool) -> jax.Array | None:
    """[G, T, E] float32 logits ([G, T, E, S] for a family of logits='slots', Soft MoE; None for
    logits='none', hash routing), of jittered tokens in training."""
    spec = self.spec
    family = families.family(spec)
    projection = family.make_projection(spec)
    if projection is None:
      return None
    if train and spec.jitter > 0:
      groups = groups * jax.random.uniform(self._router_key(), groups.shape,
                                           minval=1 - spec.jitter, maxval=1 + spec.jitter)
    logits = projection(groups).astype(spec.router_dtype).astype(jnp.float32)
    return logits.reshape(*logits.shape[:-1], *family.logits_shape(spec))

  def _grouped_ids(self, token_ids: jax.Array | None) -> jax.Array | None:
    """[G, T] token ids of the routing groups, when the router reads them (logits='none': hash
    routing)."""
    if families.family(self.spec).logits != 'none':
      return None
    if token_ids is None:
      raise ValueError(f"config.moe.router={self.spec.router!r} routes by token id, and this "
                       'model passes none (only the LM has token ids): choose another router.')
    return to_groups(token_ids[..., None], self.spec.routing_group_by)[..., 0]

  def _router_key(self) -> jax.Array:
    """The 'router' rng; sharded, each shard folds in its index to draw its own noise."""
    key = self.make_rng('router')
    return jax.random.fold_in(key, jax.lax.axis_index(self.batch_axes)) if self.batch_axes else key

  def _num_local_experts(self) -> int:
    """E, or the experts of one shard of `expert_axis` (inside shard_map)."""
    if self.expert_axis is None:
      return self.spec.num_experts
    size = jax.lax.axis_size(self.expert_axis)
    if self.spec.num_experts % size:
      raise ValueError(f'config.mesh.expert={size} (mesh axis {self.expert_axis!r}) does not '
                       f'divide config.moe.num_experts={self.spec.num_experts}: use an expert axis '
                       f'size that divides {self.spec.num_experts}.')
    return self.spec.num_experts // size


def context_axes() -> tuple[str, tuple[str, ...]] | None:
  """(expert axis, batch axes) when a mesh and logical axis rules are in context with automatic
  axes (`moe_jax.parallel.rules.use`; not inside a shard_map over them): the mesh axes of the
  logical names 'exp' and 'batch'. None otherwise: the layer runs on the tokens it is given."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.auto_axes or not nn.get_logical_axis_rules():
    return None
  expert, = nn.logical_to_mesh_axes(('exp',))
  batch, = nn.logical_to_mesh_axes(('batch',))
  if expert is None or batch is None:
    return None
  return expert, (batch,) if isinstance(batch, str) else tuple(batch)


def layer_aux(spec: MoESpec, out: routing.RouterOutput, batch_axes: tuple[str, ...],
              batch_shape: tuple[int, int]) -> dict:
  """The layer's aux of G groups' router outputs: losses and metrics averaged over the groups and
  the `batch_axes` shards, tokens_per_expert summed, and the weighted loss. The load-balancing
  loss is taken over `spec.balance_over` (`balance_loss`). batch_shape: the local (B, L)."""
  losses = jax.tree.map(jnp.mean, dict(out.losses))
  if spec.balance_over != 'group':
    losses['load_balancing'] = balance_loss(spec, out.balance, batch_axes, batch_shape)
  metrics = jax.tree.map(lambda value: value.mean(0), dict(out.metrics))
  load = out.metrics['tokens_per_expert'].sum(0)
  if batch_axes:  # every shard reports the global value
    losses, metrics = jax.lax.pmean((losses, metrics), batch_axes)
    load = jax.lax.psum(load, batch_axes)
  metrics['tokens_per_expert'] = load
  metrics['max_over_mean_load'] = routing.load_imbalance(load)
  loss = spec.load_balancing_coef * losses['load_balancing'] + spec.z_loss_coef * losses['z']
  return {'loss': loss, 'losses': losses, 'metrics': metrics}


def balance_loss(spec: MoESpec, balance: routing.Balance, batch_axes: tuple[str, ...],
                 batch_shape: tuple[int, int]) -> jax.Array:
  """The Switch load-balancing loss over each sequence ('sequence', DeepSeek-V3's sequence-wise
  loss) or over the global batch ('global': f and P averaged over every token of every shard of
  `batch_axes` before their product, as Megatron-LM's and Qwen's global-batch balancing).

  balance: [G, T, E] per-token terms of the routing groups; batch_shape: the local (B, L).
  """
  b, l = batch_shape
  probs, choices = (from_groups(term, spec.routing_group_by, (b, l, term.shape[-1]))
                    for term in (balance.probs, balance.choices))  # [B, L, E]
  if spec.balance_over == 'sequence':
    return jnp.mean(jax.vmap(routing.balance_loss)(probs, choices))
  mean_probs, mean_choices = probs.mean(axis=(0, 1)), choices.mean(axis=(0, 1))
  if batch_axes:
    mean_probs, mean_choices = jax.lax.pmean((mean_probs, mean_choices), batch_axes)
  return routing.balance_loss(mean_probs, mean_choices)
