"""The modules that make router logits (each named 'router' in the MoE layer's parameters): a
linear projection, L2-normalized for Soft MoE, and the cosine router. A family picks one
(`Family.projection`); they live below the layer so that families can name them.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def logical(init, names: tuple[str | None, ...]):
  """`init` with its dims named logically (the names' mesh axes: `moe_jax.parallel.rules`).

  While logical axis rules are in context (`nn.logical_axis_rules`, as `parallel.rules` sets
  them to derive the train state's shardings and to run on a mesh), the value comes boxed in
  `nn.LogicallyPartitioned` (`nn.with_logical_partitioning`); elsewhere `module.init` returns
  plain arrays, as it did before. The box only records the names: the state's shardings apply
  them (jit's out_shardings), never a constraint inside init, which flax also runs abstractly for
  its shape check at apply time, where DenseGeneral boxes a flattened kernel (rules=() skips it).
  """
  boxed = nn.with_logical_partitioning(init, names, rules=())

  @functools.wraps(init)
  def wrapper(*args, **kwargs):
    return (boxed if nn.get_logical_axis_rules() else init)(*args, **kwargs)

  return wrapper


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
    kernel = self.param('kernel', logical(nn.initializers.normal(0.02), ('embed', None)),
                        (x.shape[-1], self.num_outputs))
    if self.normalize:
      scale = self.param('scale', nn.initializers.ones, ())
      x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
      kernel = scale * kernel * jax.lax.rsqrt(jnp.sum(kernel * kernel, axis=0) + 1e-6)
    return x @ kernel


class CosineProjection(nn.Module):
  """Cosine router logits (X-MoE, Chi et al. 2022; Tutel's cosine_top). x: [..., d] -> [..., E].

  logits = cos(x W, e_i) * t: x is projected to `dim` dimensions, compared by cosine with E learned
  expert embeddings (`centroids`: a name other than 'experts', which would shard them over the
  expert axis), and scaled by a learned temperature t = exp(min(s, log 100)), s initialized to
  log(1 / 0.5) (Tutel's init_t=0.5 and clamp at 1 / 0.01).
  """
  num_outputs: int
  dim: int

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    project = self.param('project', logical(nn.initializers.lecun_normal(), ('embed', None)),
                         (x.shape[-1], self.dim))
    centroids = self.param('centroids', nn.initializers.normal(0.01), (self.dim, self.num_outputs))
    log_scale = self.param('log_scale', nn.initializers.constant(jnp.log(2.0)), ())
    unit = lambda v, axis: v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis, keepdims=True), 1e-12))
    cosine = unit(x @ project, -1) @ unit(centroids, 0)
    return cosine * jnp.exp(jnp.minimum(log_scale, jnp.log(100.0)))
