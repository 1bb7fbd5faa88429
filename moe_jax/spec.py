"""`MoESpec`: one validated description of an MoE layer, shared by the layer, FLOP counts and configs.

Every field is checked when the spec is built, before anything is traced or compiled, and a bad
value raises a ValueError that names the config field (`config.moe.<field>`) and the fix.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from moe_jax.validate import Section, log_once, section_values

log = logging.getLogger(__name__)
MOE = Section('moe')
ROUTERS = ('token_choice', 'expert_choice', 'soft')
GROUPINGS = ('sequence', 'position', 'batch')
SCORES = ('softmax', 'sigmoid')
PRIORITIES = ('choice', 'token', 'batch')
DISPATCHES = ('gather', 'einsum', 'ragged', 'blocked')


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """An MoE FFN layer.

  Attributes:
    router: 'token_choice' (Switch k=1, GShard/Mixtral k=2, DeepSeek with score='sigmoid'),
      'expert_choice' or 'soft'.
    num_experts: E routed experts (fine-grained experts: more, narrower ones; see flops.py).
    d_ff: hidden width of each routed expert (and of each shared expert).
    k: experts per token (token choice).
    capacity_factor: slot multiplier; None = dropless (token choice only).
    slots_per_expert: S (Soft MoE).
    num_shared_experts: always-on experts of width d_ff (DeepSeekMoE), run as one dense FFN.
    score: 'softmax' or 'sigmoid' token-choice affinities.
    renormalize: rescale kept top-k weights to sum to 1 (None: router's default).
    priority: capacity priority: 'choice', 'token' (causal) or 'batch' (BPR).
    bias_update_rate: > 0 turns on auxiliary-loss-free balancing (needs score='sigmoid').
    jitter: multiplicative jitter eps on the router input in training (Switch).
    noise_std: Gaussian noise on router logits in training (noisy top-k).
    load_balancing_coef, z_loss_coef: auxiliary loss weights.
    group_by: token groups routed together: 'sequence' (each sequence), 'position' (the same
      position across the batch: causal for expert choice and Soft MoE), 'batch' (all tokens).
    dispatch: 'gather', 'einsum', 'ragged' (see dispatch.py) or 'blocked' (fast_dispatch.py:
      expert-sorted rows and grouped-matmul kernels that run only the used slots; any router).
    activation: 'swiglu' or 'gelu'.
    num_chunks: dropless routing only: the tokens run in this many chunks, so that under expert
      parallelism the exchange of one chunk overlaps the experts of another (dispatch.moe_apply).
  """
  router: str = 'token_choice'
  num_experts: int = 8
  d_ff: int = 256
  k: int = 1
  capacity_factor: float | None = 1.25
  slots_per_expert: int = 1
  num_shared_experts: int = 0
  score: str = 'softmax'
  renormalize: bool | None = None
  priority: str = 'choice'
  bias_update_rate: float = 0.0
  jitter: float = 0.0
  noise_std: float = 0.0
  load_balancing_coef: float = 0.01
  z_loss_coef: float = 1e-3
  group_by: str = 'sequence'
  dispatch: str = 'gather'
  activation: str = 'swiglu'
  num_chunks: int = 1

  def __post_init__(self):
    MOE.one_of('router', self.router, ROUTERS)
    MOE.one_of('group_by', self.group_by, GROUPINGS)
    MOE.one_of('score', self.score, SCORES)
    MOE.one_of('priority', self.priority, PRIORITIES)
    MOE.one_of('dispatch', self.dispatch, DISPATCHES)
    MOE.one_of('activation', self.activation, ('swiglu', 'gelu'))
    MOE.positive('num_experts', self.num_experts)
    MOE.positive('d_ff', self.d_ff)
    MOE.positive('slots_per_expert', self.slots_per_expert)
    if self.num_shared_experts < 0:
      MOE.fail('num_shared_experts', self.num_shared_experts, 'use 0 or more shared experts')
    if self.router == 'token_choice' and not 1 <= self.k <= self.num_experts:
      MOE.fail('k', self.k, f'choose 1 <= k <= num_experts={self.num_experts}')
    if self.capacity_factor is None:
      if self.router != 'token_choice':
        MOE.fail('capacity_factor', None, f'dropless routing is token choice only; give the '
                 f'{self.router} router a positive capacity_factor')
    elif self.capacity_factor <= 0:
      MOE.fail('capacity_factor', self.capacity_factor,
               'use a positive factor, or None for dropless')
    if self.dispatch == 'ragged' and self.capacity_factor is not None:
      MOE.fail('dispatch', 'ragged', 'ragged dispatch runs dropless routing: set '
               "capacity_factor=None or use dispatch='gather'")
    MOE.positive('num_chunks', self.num_chunks)
    if self.num_chunks > 1 and self.capacity_factor is not None:
      MOE.fail('num_chunks', self.num_chunks, 'chunks split dropless routing only: set '
               'capacity_factor=None or num_chunks=1')
    if self.bias_update_rate < 0:
      MOE.fail('bias_update_rate', self.bias_update_rate, 'use 0 (off) or a positive rate')
    if self.bias_update_rate > 0 and (self.router != 'token_choice' or self.score != 'sigmoid'):
      MOE.fail('bias_update_rate', self.bias_update_rate, 'auxiliary-loss-free balancing needs '
               "router='token_choice' and score='sigmoid'")
    for name in ('jitter', 'noise_std', 'load_balancing_coef', 'z_loss_coef'):
      if getattr(self, name) < 0:
        MOE.fail(name, getattr(self, name), 'use a value >= 0')
    if self.routing_group_by != self.group_by:
      log_once(log, logging.INFO, f"config.moe.dispatch='ragged' routes one group: "
               f"group_by={self.group_by!r} runs as 'batch' (outputs are the same, the "
               'load-balancing loss is taken over the whole batch).')

  @property
  def routing_group_by(self) -> str:
    """The grouping routing runs with: `group_by`, but 'batch' for dispatch='ragged', which routes
    one group (logged once). Harmless: dropless routing is per token, so outputs do not change;
    only the load-balancing loss is then taken over the whole batch."""
    return 'batch' if self.dispatch == 'ragged' else self.group_by

  @property
  def active_experts(self) -> int:
    """Routed experts per token as FLOPs see them (k for token choice, capacity for the others)."""
    return self.k if self.router == 'token_choice' else 1

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'MoESpec':
    """Builds a spec from a dict / ml_collections ConfigDict, rejecting unknown fields."""
    return cls(**section_values(cls, 'moe', config))

  def replace(self, **changes) -> 'MoESpec':
    return dataclasses.replace(self, **changes)


_OPTIONAL_TYPES = {'capacity_factor': float, 'renormalize': bool}  # fields that may be None


def moe_config(**overrides):
  """`config.moe` for an ml_collections experiment config: every MoESpec field at its default,
  then `overrides`. Fields that may be None keep their type, so `--config.moe.capacity_factor=2`
  and `--config.moe.renormalize=True` parse from the command line."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top

  values = {f.name: f.default for f in dataclasses.fields(MoESpec)}
  MOE.known(overrides, values)
  values.update(overrides)
  config = ml_collections.ConfigDict()
  for name, value in values.items():
    field_type = _OPTIONAL_TYPES.get(name)
    config[name] = value if field_type is None else config_dict.FieldReference(
        value, field_type=field_type)
  return config
