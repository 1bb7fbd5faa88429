"""Sinkhorn routing (Megatron-LM's `sinkhorn` router type; Clark et al. 2022, "Unified scaling
laws for routed language models"): top-k on a balanced transport plan.

In training, each token's experts are the top-k of the Sinkhorn-normalized router logits: rows and
columns of exp(logits) are rescaled until every token carries mass 1/T and every expert 1/E, so
the choice is pushed towards equal loads without an auxiliary loss. The combine weights are the
plain router activations of the chosen experts (sigmoid for k = 1, softmax otherwise), so the
gradient reaches the router as usual; the normalization itself is not differentiated. In
evaluation, top-k of the activations (Megatron's inference path).

Causality: the normalization couples every token of a group, so in training a token's experts
depend on later tokens unless the group holds one position of every sequence
(`group_by='position'`; `moe_jax/moe/causality.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing.plan import RouterOutput
from moe_jax.routing.placement import Priority, capacity_for, place


def sinkhorn(logits: jax.Array, *, tol: float = 1e-4, max_iters: int = 100) -> jax.Array:
  """Log of the balanced plan diag(u) exp(logits) diag(v): rows sum to 1/T, columns to 1/E.

  Args:
    logits: [T, E] float32.
    tol: stop when the column scales change by less than this (mean absolute change, as
      Megatron-LM) or after max_iters.

  Returns:
    [T, E] float32 log-plan (log domain throughout, so large logits cannot overflow).
  """
  t, e = logits.shape
  log_rows, log_cols = -jnp.log(float(t)), -jnp.log(float(e))

  def step(state):
    _, log_v, i, _ = state
    log_u = log_rows - jax.nn.logsumexp(logits + log_v[None, :], axis=1)
    new_v = log_cols - jax.nn.logsumexp(logits + log_u[:, None], axis=0)
    change = jnp.mean(jnp.abs(jnp.exp(new_v) - jnp.exp(log_v)))
    return log_u, new_v, i + 1, change

  # initial values derived from `logits`, so that they vary over a mesh exactly as it does
  init = (jnp.zeros_like(logits[:, 0]), jnp.zeros_like(logits[0]), 0,
          jnp.full_like(logits[0, 0], jnp.inf))
  log_u, log_v, _, _ = jax.lax.while_loop(
      lambda s: (s[3] > tol) & (s[2] < max_iters), step, init)
  return logits + log_u[:, None] + log_v[None, :]


def activation(logits: jax.Array, k: int) -> jax.Array:
  """[T, E] combine scores: sigmoid for k = 1, softmax for k > 1 (Megatron-LM's choice)."""
  return jax.nn.sigmoid(logits) if k == 1 else jax.nn.softmax(logits, axis=-1)


def sinkhorn_routing(logits: jax.Array, *, k: int, capacity_factor: float | None,
                     priority: Priority = 'token', train: bool = True) -> RouterOutput:
  """Top-k routing balanced by Sinkhorn normalization in training.

  Args:
    logits: [T, E] float32 router logits.
    k: experts per token.
    capacity_factor: as `token_choice` (None: dropless).
    priority: capacity priority (`slot_positions`).
    train: balance by Sinkhorn (training) or plain top-k of the activations (evaluation).

  Returns:
    RouterOutput as `token_choice`'s; the weights are not renormalized.
  """
  logits = logits.astype(jnp.float32)
  scores = activation(logits, k)
  choose_by = jax.lax.stop_gradient(sinkhorn(logits)) if train else scores
  _, expert_index = jax.lax.top_k(choose_by, k)
  weight = jnp.take_along_axis(scores, expert_index, axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  return place(expert_index, weight, probs, logits, priority=priority,
               capacity=capacity_for(logits.shape[0], logits.shape[1], capacity_factor, k))
