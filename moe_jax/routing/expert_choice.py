"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Every expert processes exactly C tokens (perfect balance); a token may get 0..E experts. The choice
looks at the whole token group, so within a sequence it sees future tokens. The causal variant
used for language models groups tokens by *position across the batch* (see `moe_jax.moe.layer`):
experts then compete only over tokens at the same position of different sequences, which never
reveals the future but couples the sequences of a batch and needs batch size >> E / capacity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses
from moe_jax.routing.capacity import expert_capacity
from moe_jax.routing.metrics import routing_metrics
from moe_jax.routing.plan import RouterOutput, SlotPlan


def expert_choice(logits: jax.Array, *, capacity_factor: float) -> RouterOutput:
  """Routes by letting every expert pick its C highest-scoring tokens.

  Args:
    logits: [T, E] float32 router logits.
    capacity_factor: average experts per token; C = round(T * capacity_factor / E) <= T.

  Returns:
    RouterOutput with a SlotPlan whose weights are the softmax-over-experts scores of the chosen
    (token, expert) pairs; losses 'load_balancing' (0: balance is by construction) and 'z'.
  """
  logits = logits.astype(jnp.float32)
  t, num_experts = logits.shape
  capacity = expert_capacity(t, num_experts, capacity_factor)
  if capacity > t:
    raise ValueError(
        f'capacity_factor={capacity_factor} gives expert capacity {capacity} > {t} tokens per '
        f'group; expert choice needs capacity_factor <= num_experts={num_experts}.')
  probs = jax.nn.softmax(logits, axis=-1)
  weight, token = jax.lax.top_k(probs.T, capacity)  # [E, C]
  plan = SlotPlan(slot_token=token.astype(jnp.int32), slot_weight=weight, num_tokens=t)
  return RouterOutput(
      plan=plan,
      losses={'load_balancing': jnp.zeros((), jnp.float32), 'z': losses.z_loss(logits)},
      metrics=routing_metrics(plan, probs, num_assignments=1))
