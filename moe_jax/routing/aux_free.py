"""DeepSeek-V3 auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-AI 2024).

Routing uses sigmoid scores plus a per-expert bias that only affects *which* experts are chosen
(`token_choice(score='sigmoid', selection_bias=bias)`). After each step, outside the gradient, the
bias of overloaded experts goes down and that of underloaded experts goes up by a fixed rate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def update_bias(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
  """Sign-rule update: b_e += rate * sign(mean load - load_e).

  Args:
    bias: [E] float32 selection bias.
    tokens_per_expert: [E] load observed with that bias (summed over all shards and groups).
    rate: update speed u (DeepSeek-V3 uses 1e-3).

  Returns:
    [E] float32 new bias (gradient-free).
  """
  load = jax.lax.stop_gradient(tokens_per_expert.astype(jnp.float32))
  return bias + rate * jnp.sign(jnp.mean(load) - load)
