"""Which routing set-ups keep a decoder LM causal, checked before anything is built.

A decoder LM is causal when its output at position s depends only on tokens at positions <= s,
in its own sequence and in every other sequence of the batch (the batch is decoded in lockstep, so
a token at a later position does not exist yet). Attention is causal by its mask; routing is causal
when no routing decision for a token depends on a token at a later position:

* token choice, dropless (`capacity_factor=None`): each token picks its experts alone. Causal.
* token choice with a capacity: assignments of one group compete for slots. With
  `group_by='position'` a group holds one position of every sequence: causal. With
  `group_by='sequence'` the slots are claimed in `priority` order, which is causal only for
  `priority='token'` (token 0's choices, then token 1's, ...) or `priority='choice'` with k = 1
  (the same order). `priority='choice'` with k > 1 lets a later token's first choice push an
  earlier token's second choice out; `'batch'` orders by router score, so any later token can
  displace an earlier one. `group_by='batch'` lets position 100 of one sequence displace position
  0 of the next. Not causal.
* hash routing: a token's expert is a function of its own id; with a capacity, as token choice.
* expert choice, Soft MoE, Sinkhorn and BASE (balanced assignment): every decision looks at the
  whole group (Sinkhorn and BASE in training; they route each token alone in evaluation), so only
  `group_by='position'` is causal (`Family.couples_group`).

The check reads only the family (`moe_jax.moe.families`): a family that couples the group gets the
group rule; any other (a registered one included) gets token choice's capacity rules, with its
`per_token` experts as k.

`group_by='position'` couples the sequences of a batch at one position: causal, provided the rows of
a batch are different text (not one row's continuation); `moe_jax.data.text` lays out batches so.
"""
from __future__ import annotations

import dataclasses

from moe_jax.moe import families
from moe_jax.moe.spec import MoESpec


@dataclasses.dataclass(frozen=True)
class Leak:
  """Why a spec can let a token see a later one: the `config.moe` field to change and how."""
  field: str
  reason: str
  fix: str


def _capacity_leak(spec: MoESpec) -> Leak | None:
  """Per-token routing (token choice, hash, ...): only competing for capacity can leak."""
  if spec.capacity_factor is None or spec.group_by == 'position':
    return None
  fix = ("use priority='token' with group_by='sequence', capacity_factor=None (dropless), or "
         "group_by='position'")
  if spec.group_by == 'batch':
    return Leak('group_by', 'token choice with a capacity over the whole batch lets a later '
                'position of one sequence take the slot of an earlier position of another', fix)
  if spec.priority == 'batch':
    return Leak('priority', 'batch-prioritized routing orders tokens by router score, so a later '
                'token can take an earlier token\'s expert slot', fix)
  k = families.family(spec).per_token(spec)
  if spec.priority == 'choice' and k > 1:
    return Leak('priority', f"with k={k}, priority='choice' fills every first choice before "
                'any second choice, so a later token can push an earlier token\'s second choice '
                'out of capacity', fix)
  return None


def _group_leak(spec: MoESpec) -> Leak | None:
  if spec.group_by == 'position':
    return None
  return Leak('group_by', f'{spec.router} routing decides over the whole group of tokens, so with '
              f'group_by={spec.group_by!r} a token\'s routing depends on later tokens',
              "use group_by='position' (the same position across the batch)")


def future_leak(spec: MoESpec | None) -> Leak | None:
  """How `spec`'s routing can let a token see a later one in a decoder LM, or None if it cannot."""
  if spec is None:
    return None
  if families.family(spec).couples_group:
    return _group_leak(spec)
  return _capacity_leak(spec)


def require_causal(spec: MoESpec | None, allow_future_leak: bool = False) -> None:
  """Raises ValueError naming `config.moe.<field>` and the causal alternative when `spec` can leak
  the future, unless `allow_future_leak` (config.model.allow_future_leak: study the leak itself)."""
  leak = future_leak(spec)
  if leak is None or allow_future_leak:
    return
  value = getattr(spec, leak.field)
  raise ValueError(
      f'config.moe.{leak.field}={value!r} is not causal: {leak.reason}. A decoder LM would see '
      f'the future. Fix: {leak.fix}; or set config.model.allow_future_leak=True to study the '
      'leak itself.')
