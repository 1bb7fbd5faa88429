"""The MoE layer: router projection, a router family, dispatch, experts, combine.

Tokens are routed in groups (`MoESpec.group_by`); every group gets its own routing decision and
capacity. Expert work for all groups runs as one batched call on [E, G * C, d].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import fast_dispatch, routing
from moe_jax.experts import Experts, FeedForward
from moe_jax.spec import MoESpec


def to_groups(x: jax.Array, group_by: str) -> jax.Array:
  """[B, L, d] -> [G, n, d] token groups."""
  b, l, d = x.shape
  if group_by == 'sequence':
    return x
  if group_by == 'position':
    return x.transpose(1, 0, 2)
  return x.reshape(1, b * l, d)


def from_groups(y: jax.Array, group_by: str, shape) -> jax.Array:
  """Inverse of `to_groups`: [G, n, d] -> [B, L, d]."""
  if group_by == 'position':
    return y.transpose(1, 0, 2)
  return y.reshape(shape)


def route(spec: MoESpec, logits: jax.Array, bias: jax.Array | None,
          rng: jax.Array | None) -> routing.RouterOutput:
  """Applies the spec's router family to one group's logits ([n, E], or [n, E, S] for soft)."""
  if spec.router == 'soft':
    return routing.soft_routing(logits)
  if spec.router == 'expert_choice':
    return routing.expert_choice(logits, capacity_factor=spec.capacity_factor)
  return routing.token_choice(
      logits, k=spec.k, capacity_factor=spec.capacity_factor, score=spec.score,
      renormalize=spec.renormalize, priority=spec.priority, selection_bias=bias,
      noise_std=spec.noise_std if rng is not None else 0.0, rng=rng)


class RouterProjection(nn.Module):
  """Router logits in float32. x: [..., d] -> [..., num_outputs].

  With `normalize` (Soft MoE), inputs and each output's weights are L2-normalized and a learnable
  scalar scale multiplies the product (Puigcerver et al. 2023, section 2.3).
  """
  num_outputs: int
  normalize: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    kernel = self.param('kernel', nn.initializers.normal(0.02), (x.shape[-1], self.num_outputs))
    if self.normalize:
      scale = self.param('scale', nn.initializers.ones, ())
      x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
      kernel = scale * kernel * jax.lax.rsqrt(jnp.sum(kernel * kernel, axis=0) + 1e-6)
    return x @ kernel


class MoELayer(nn.Module):
  """Mixture-of-Experts FFN. x: [B, L, d] -> ([B, L, d], aux).

  aux = {'loss': weighted auxiliary loss (scalar), 'losses': unweighted losses, 'metrics': routing
  metrics averaged over groups ('tokens_per_expert' [E] summed)}. Dropped tokens get zero output:
  the block's residual carries them.

  With `spec.bias_update_rate > 0` the selection bias lives in the 'router_bias' collection and is
  updated by the sign rule in training when that collection is mutable (outside the gradient).

  Expert parallelism (run inside `jax.shard_map`, see `moe_jax.parallel`): `expert_axis` names the
  mesh axis the experts are sharded over. Each shard routes and dispatches its local groups to
  [G, E, C, d]; an all_to_all over `expert_axis` hands every shard its E / n experts' slots from all
  n shards, the local experts run on [E / n, n * G * C, d], and a second all_to_all brings the
  outputs back for a local combine. `batch_axes` names the axes the tokens are sharded over: aux
  losses and metrics are averaged over them (tokens_per_expert summed), so every shard reports the
  global value and the bias update is identical on every shard. Dropless routing then runs through
  slots of capacity = tokens per group (`DroplessPlan.to_slot_plan`) instead of 'ragged', and
  'blocked' runs as 'gather'.
  """
  spec: MoESpec
  dtype: Any = jnp.float32
  expert_axis: str | None = None
  batch_axes: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False):
    spec = self.spec
    # Dropless routing is per token, so grouping cannot change it: ragged runs one group.
    group_by = 'batch' if spec.dispatch == 'ragged' else spec.group_by
    groups = to_groups(x, group_by)  # [G, n, d]
    num_groups = groups.shape[0]

    router_in = groups
    if train and spec.jitter > 0:
      eps = spec.jitter
      router_in = router_in * jax.random.uniform(self._router_key(), groups.shape,
                                                 minval=1 - eps, maxval=1 + eps)
    if spec.router == 'soft':
      logits = RouterProjection(spec.num_experts * spec.slots_per_expert, normalize=True,
                                name='router')(router_in)
      logits = logits.reshape(*logits.shape[:-1], spec.num_experts, spec.slots_per_expert)
    else:
      logits = RouterProjection(spec.num_experts, name='router')(router_in)

    bias = None
    if spec.bias_update_rate > 0:
      bias_var = self.variable('router_bias', 'bias', jnp.zeros, (spec.num_experts,), jnp.float32)
      bias = bias_var.value
    rngs = None
    if train and spec.noise_std > 0:
      rngs = jax.random.split(self._router_key(), num_groups)
    out = jax.vmap(lambda lg, r: route(spec, lg, bias, r))(logits, rngs)

    num_experts = spec.num_experts
    if self.expert_axis is not None:
      num_experts = _local_experts(num_experts, self.expert_axis)
    experts = Experts(num_experts, x.shape[-1], spec.d_ff, spec.activation, self.dtype,
                      name='experts')
    if spec.dispatch == 'blocked' and self.expert_axis is None:
      max_per_token = spec.k if spec.router == 'token_choice' else None
      y = fast_dispatch.moe_apply(out.plan, groups, experts.weights(),
                                  max_per_token=max_per_token)
    elif spec.dispatch == 'ragged' and self.expert_axis is None:
      plan = jax.tree.map(lambda leaf: leaf[0], out.plan)
      y = dispatch_lib.moe_apply(plan, groups[0], experts, 'ragged', experts.ragged)[None]
    else:
      impl = 'gather' if spec.dispatch in ('ragged', 'blocked') else spec.dispatch
      y = _execute_groups(out.plan, groups, experts, impl, self.expert_axis)
    if spec.num_shared_experts:
      y = y + FeedForward(spec.num_shared_experts * spec.d_ff, spec.activation, self.dtype,
                          name='shared_experts')(groups)
    y = from_groups(y, group_by, x.shape)

    losses = jax.tree.map(jnp.mean, dict(out.losses))
    metrics = jax.tree.map(lambda value: value.mean(0), dict(out.metrics))
    load = out.metrics['tokens_per_expert'].sum(0)
    if self.batch_axes:  # every shard reports the global value
      losses, metrics = jax.lax.pmean((losses, metrics), self.batch_axes)
      load = jax.lax.psum(load, self.batch_axes)
    metrics['tokens_per_expert'] = load
    metrics['max_over_mean_load'] = routing.load_imbalance(metrics['tokens_per_expert'])
    if bias is not None and train and self.is_mutable_collection('router_bias'):
      bias_var.value = routing.update_bias(bias, metrics['tokens_per_expert'],
                                           spec.bias_update_rate)
    loss = spec.load_balancing_coef * losses['load_balancing'] + spec.z_loss_coef * losses['z']
    return y.astype(x.dtype), {'loss': loss, 'losses': losses, 'metrics': metrics}

  def _router_key(self) -> jax.Array:
    """The 'router' rng; sharded, each shard folds in its index to draw its own noise."""
    key = self.make_rng('router')
    return jax.random.fold_in(key, jax.lax.axis_index(self.batch_axes)) if self.batch_axes else key


def _local_experts(num_experts: int, expert_axis: str) -> int:
  """Experts per shard of `expert_axis` (call inside shard_map)."""
  size = jax.lax.axis_size(expert_axis)
  if num_experts % size:
    raise ValueError(f'config.mesh.expert={size} (mesh axis {expert_axis!r}) does not divide '
                     f'config.moe.num_experts={num_experts}: use an expert axis size that divides '
                     f'{num_experts}.')
  return num_experts // size


def _execute_groups(plan, groups, experts: Experts, impl: str, expert_axis: str | None = None):
  """All groups with one expert call: buffers [G, E, C, d] run as [E, G * C, d].

  With `expert_axis` (size n), an all_to_all turns the local [G, E, C, d] into [n * G, E / n, C, d]
  (this shard's experts, every shard's groups), and a second one sends the outputs back.
  """
  buffers = jax.vmap(lambda p, g: dispatch_lib.dispatch(p, g, impl))(plan, groups)
  if expert_axis is not None:
    buffers = jax.lax.all_to_all(buffers, expert_axis, split_axis=1, concat_axis=0, tiled=True)
  g, e, c, d = buffers.shape
  y = experts(buffers.transpose(1, 0, 2, 3).reshape(e, g * c, d))
  y = y.reshape(e, g, c, d).transpose(1, 0, 2, 3)
  if expert_axis is not None:
    y = jax.lax.all_to_all(y, expert_axis, split_axis=0, concat_axis=1, tiled=True)
  return jax.vmap(lambda p, b: dispatch_lib.combine(p, b, impl))(plan, y)
