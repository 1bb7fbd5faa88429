"""Expert capacity: how many token slots each expert buffer holds."""
from __future__ import annotations

import math


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1) -> int:
  """C = round(k * T * capacity_factor / E), the slots per expert for a group of T tokens.

  Raises:
    ValueError: naming `capacity_factor` when it is not positive or C rounds to zero.
  """
  if capacity_factor <= 0:
    raise ValueError(f'capacity_factor must be > 0, got {capacity_factor}; use None for dropless '
                     'routing.')
  exact = k * num_tokens * capacity_factor / num_experts
  capacity = math.floor(exact + 0.5)
  if capacity < 1:
    need = 0.5 * num_experts / (k * num_tokens)
    raise ValueError(
        f'capacity_factor={capacity_factor} gives an expert capacity of round({exact:.3g}) = 0 '
        f'slots for groups of {num_tokens} tokens, {num_experts} experts, k={k}. Raise '
        f'capacity_factor to at least {need:.3g}, use larger token groups or fewer experts.')
  return capacity
