"""Feed-forward blocks: a functional core and two thin Flax modules.

`FeedForward` is the dense FFN (also the shared, always-on experts of DeepSeekMoE: n shared experts
of width f are exactly one FFN of width n * f). `Experts` holds E expert FFNs as stacked weights
[E, d, f] and runs them on a dispatcher's rows with that dispatcher's matmul (`moe_jax.moe.dispatch`).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers.projection import logical  # noqa: F401 (the layers' annotations)

ACTIVATIONS = ('swiglu', 'gelu')


def feed_forward(matmul: Callable, x, w_in, w_out, w_gate=None):
  """out = (act(x @ w_in) [* silu(x @ w_gate)]) @ w_out, with `matmul` doing each product.

  SwiGLU when w_gate is given (h = (x @ w_in) * silu(x @ w_gate)), else GELU (h = gelu(x @ w_in)).
  A `matmul` with a `swiglu(x, w_gate, w_in)` method computes that h itself (the 'blocked'
  dispatcher's fused gate/up kernels, `fast_dispatch.GroupedMatmul`).
  """
  swiglu = getattr(matmul, 'swiglu', None)
  if w_gate is not None and swiglu is not None:
    return matmul(swiglu(x, w_gate, w_in), w_out)
  h = matmul(x, w_in)
  h = h * nn.silu(matmul(x, w_gate)) if w_gate is not None else nn.gelu(h)
  return matmul(h, w_out)


def pad_hidden(width: int, w_in, w_out, w_gate=None):
  """The FFN weights with the hidden width f zero-padded to `width`: w_in, w_gate [..., d, f] ->
  [..., d, width], w_out [..., f, d] -> [..., width, d]. The FFN's output is unchanged: a padded
  unit has zero input weights, so h = 0 (gelu(0) = 0, 0 * silu(0) = 0), and zero output weights;
  the gradients of the real weights are unchanged too."""
  extra = width - w_in.shape[-1]
  if extra == 0:
    return w_in, w_out, w_gate
  wide = lambda w: None if w is None else jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, extra)])
  tall = jnp.pad(w_out, [(0, 0)] * (w_out.ndim - 2) + [(0, extra), (0, 0)])
  return wide(w_in), tall, wide(w_gate)


def _dense(x, w):
  return jnp.einsum('...d,df->...f', x, w)


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f'activation must be one of {ACTIVATIONS}, got {activation!r}.')


def _kernel_init(names: tuple[str, ...], batch_axis=()):
  """The FFN weights' initializer, its dims named logically."""
  return logical(nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal', in_axis=-2, out_axis=-1, batch_axis=batch_axis), names)


class FeedForward(nn.Module):
  """Dense FFN. x: [..., d] -> [..., d]."""
  d_ff: int
  activation: str = 'swiglu'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _check_activation(self.activation)
    d = x.shape[-1]
    w_in = self.param('w_in', _kernel_init(('embed', 'mlp')), (d, self.d_ff))
    w_out = self.param('w_out', _kernel_init(('mlp', 'embed')), (self.d_ff, d))
    w_gate = (self.param('w_gate', _kernel_init(('embed', 'mlp')), (d, self.d_ff))
              if self.activation == 'swiglu' else None)
    cast = lambda w: None if w is None else w.astype(self.dtype)
    return feed_forward(_dense, x.astype(self.dtype), cast(w_in), cast(w_out), cast(w_gate))


class Experts(nn.Module):
  """E expert FFNs with stacked weights w_in/w_gate [E, d, f], w_out [E, f, d].

  `num_experts` may be a shard of all experts (expert parallelism): the module only sees its own.
  """
  num_experts: int
  d_model: int
  d_ff: int
  activation: str = 'swiglu'
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    _check_activation(self.activation)
    e, d, f = self.num_experts, self.d_model, self.d_ff
    up, down = (_kernel_init(names, batch_axis=(0,)) for names in (('exp', 'embed', 'mlp'),
                                                                   ('exp', 'mlp', 'embed')))
    self.w_in = self.param('w_in', up, (e, d, f))
    self.w_out = self.param('w_out', down, (e, f, d))
    self.w_gate = self.param('w_gate', up, (e, d, f)) if self.activation == 'swiglu' else None

  def weights(self):
    """(w_in, w_out, w_gate or None) in the compute dtype."""
    cast = lambda w: None if w is None else w.astype(self.dtype)
    return cast(self.w_in), cast(self.w_out), cast(self.w_gate)

  def __call__(self, rows: jax.Array, matmul: Callable) -> jax.Array:
    """Each expert's FFN on its rows (in the compute dtype), every product `matmul(rows, w)` with w
    [E, d, f] or [E, f, d]: a dispatcher's, which knows the rows' layout. A matmul with a
    `hidden_width(d, f)` method (the 'blocked' dispatcher's) gets the weights zero-padded to the
    width it runs (`pad_hidden`: the same output)."""
    weights = self.weights()
    hidden_width = getattr(matmul, 'hidden_width', None)
    if hidden_width is not None:
      weights = pad_hidden(hidden_width(self.d_model, self.d_ff), *weights)
    return feed_forward(matmul, rows, *weights)
