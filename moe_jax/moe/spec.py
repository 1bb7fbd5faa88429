"""`MoESpec`: one validated description of an MoE layer, shared by the layer, FLOP counts and configs.

Every field is checked when the spec is built, before anything is traced or compiled, and a bad
value raises a ValueError that names the config field (`config.moe.<field>`) and the fix.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from moe_jax.moe import families
from moe_jax.moe.experts import ACTIVATIONS
from moe_jax.validate import Section, log_once, section_values

log = logging.getLogger(__name__)
MOE = Section('moe')
GROUPINGS = ('sequence', 'position', 'batch')
SCORES = ('softmax', 'sigmoid')
PRIORITIES = ('choice', 'token', 'batch')
DISPATCHES = ('gather', 'einsum', 'ragged', 'blocked')  # the executors (dispatch.py)
AUTO = 'auto'  # config.moe.dispatch: one of DISPATCHES or this (`resolve_dispatch`)
ROUTER_LOGITS = ('linear', 'cosine')
BALANCE_SCOPES = ('group', 'sequence', 'global')


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """An MoE FFN layer.

  Attributes:
    router: a registered family (`moe_jax.moe.families`, one module each in moe_jax/routers/):
      'token_choice' (Switch k=1, GShard/Mixtral k=2, DeepSeek with score='sigmoid'),
      'expert_choice', 'soft', 'sinkhorn' (Megatron-LM), 'base' (BASE layers' balanced
      assignment), 'hash' (Hash layers; LM only: routes by token id), or one a user registered.
    num_experts: E routed experts (fine-grained experts: more, narrower ones; see flops.py).
    d_ff: hidden width of each routed expert (and of each shared expert).
    k: experts per token (token choice).
    capacity_factor: slot multiplier; None = dropless (token choice, sinkhorn, hash); 1.0 for base.
    slots_per_expert: S (Soft MoE).
    num_shared_experts: always-on experts of width d_ff (DeepSeekMoE), run as one dense FFN.
    score: 'softmax' or 'sigmoid' token-choice affinities.
    renormalize: rescale kept top-k weights to sum to 1 (None: router's default).
    priority: capacity priority: 'choice', 'token' (causal) or 'batch' (BPR).
    bias_update_rate: > 0 turns on auxiliary-loss-free balancing (needs score='sigmoid').
    jitter: multiplicative jitter eps on the router input in training (Switch).
    noise_std: Gaussian noise on router logits in training (noisy top-k).
    load_balancing_coef, z_loss_coef: auxiliary loss weights.
    balance_over: the tokens the load-balancing loss is taken over: 'group' (each routing group),
      'sequence' (each sequence: DeepSeek-V3's sequence-wise loss) or 'global' (the whole global
      batch, across data-parallel shards: Megatron-LM's and Qwen's global-batch balancing).
    num_expert_groups, groups_per_token: group-limited routing (DeepSeek-V3's node-limited
      routing): experts in num_expert_groups equal groups, each token's k experts from its
      groups_per_token best groups (token choice; 1, 1 = off).
    router_logits: 'linear' (x @ W) or 'cosine' (X-MoE / Tutel cosine_top: cosine of a
      cosine_dim-dimensional projection of x and learned expert embeddings, times a learned
      temperature).
    cosine_dim: the projection width of router_logits='cosine'.
    router_dtype: 'float32' (always, in normal use) or 'bfloat16': the router logits rounded to
      bfloat16 before routing, to study the round-off that ST-MoE's router z-loss targets.
    hash_seed: picks the fixed token-id -> expert map of router='hash'.
    group_by: token groups routed together: 'sequence' (each sequence), 'position' (the same
      position across the batch: causal for expert choice and Soft MoE), 'batch' (all tokens).
    dispatch: 'gather', 'einsum', 'ragged' (see dispatch.py), 'blocked' (fast_dispatch.py:
      expert-sorted rows and grouped-matmul kernels that run only the used slots; any router) or
      'auto': the backend's fast one, chosen when the layer is traced (`resolve_dispatch`).
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
  balance_over: str = 'group'
  num_expert_groups: int = 1
  groups_per_token: int = 1
  router_logits: str = 'linear'
  cosine_dim: int = 16
  router_dtype: str = 'float32'
  hash_seed: int = 0
  group_by: str = 'sequence'
  dispatch: str = 'gather'
  activation: str = 'swiglu'
  num_chunks: int = 1

  def __post_init__(self):
    MOE.one_of('router', self.router, families.names())
    MOE.one_of('group_by', self.group_by, GROUPINGS)
    MOE.one_of('score', self.score, SCORES)
    MOE.one_of('priority', self.priority, PRIORITIES)
    MOE.one_of('dispatch', self.dispatch, DISPATCHES + (AUTO,))
    MOE.one_of('activation', self.activation, ACTIVATIONS)
    MOE.one_of('router_logits', self.router_logits, ROUTER_LOGITS)
    MOE.one_of('router_dtype', self.router_dtype, ('float32', 'bfloat16'))
    MOE.one_of('balance_over', self.balance_over, BALANCE_SCOPES)
    for name in ('num_experts', 'd_ff', 'slots_per_expert', 'num_expert_groups',
                 'groups_per_token', 'cosine_dim'):
      MOE.positive(name, getattr(self, name))
    if self.num_shared_experts < 0:
      MOE.fail('num_shared_experts', self.num_shared_experts, 'use 0 or more shared experts')
    family = families.family(self)
    unknown = sorted(set(family.options) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f'router family {self.router!r} lists options {unknown} that are not '
                       'config.moe fields (MoESpec): fix its registration.')
    family.check(self)
    if self.capacity_factor is None:
      if not family.dropless:
        dropless = ', '.join(name for name, f in families.FAMILIES.items() if f.dropless)
        MOE.fail('capacity_factor', None, f'{self.router} routing needs a capacity; give it a '
                 f'positive capacity_factor (dropless routers: {dropless})')
    elif self.capacity_factor <= 0:
      MOE.fail('capacity_factor', self.capacity_factor,
               'use a positive factor, or None for dropless')
    self._check_router_options(family)
    if self.dispatch == 'ragged' and self.capacity_factor is not None:
      MOE.fail('dispatch', 'ragged', 'ragged dispatch runs dropless routing: set '
               "capacity_factor=None or use dispatch='gather'")
    MOE.positive('num_chunks', self.num_chunks)
    if self.num_chunks > 1 and self.capacity_factor is not None:
      MOE.fail('num_chunks', self.num_chunks, 'chunks split dropless routing only: set '
               'capacity_factor=None or num_chunks=1')
    if self.bias_update_rate < 0:
      MOE.fail('bias_update_rate', self.bias_update_rate, 'use 0 (off) or a positive rate')
    for name in ('jitter', 'noise_std', 'load_balancing_coef', 'z_loss_coef'):
      if getattr(self, name) < 0:
        MOE.fail(name, getattr(self, name), 'use a value >= 0')
    if self.dispatch == 'ragged' and self.group_by != 'batch':  # ('auto': no backend here)
      log_once(log, logging.INFO, f"config.moe.dispatch='ragged' routes one group: "
               f"group_by={self.group_by!r} runs as 'batch' (outputs are the same, the "
               'load-balancing loss is taken over the whole batch).')

  def _check_router_options(self, family: families.Family) -> None:
    """Options that only some families read (`Family.options`): refused where they would be
    ignored."""
    if self.bias_update_rate > 0 and 'bias_update_rate' not in family.options:
      MOE.fail('bias_update_rate', self.bias_update_rate, f'{self.router} routing has no '
               'selection bias: auxiliary-loss-free balancing needs '
               f'{_readers("bias_update_rate")}')
    if self.num_expert_groups > 1 or self.groups_per_token > 1:
      if 'num_expert_groups' not in family.options:
        MOE.fail('num_expert_groups', self.num_expert_groups, f'{self.router} routing has no '
                 f'group-limited routing: use {_readers("num_expert_groups")} or '
                 'num_expert_groups=1')
      if self.num_experts % self.num_expert_groups:
        MOE.fail('num_expert_groups', self.num_expert_groups,
                 f'use a divisor of num_experts={self.num_experts}')
      if self.groups_per_token > self.num_expert_groups:
        MOE.fail('groups_per_token', self.groups_per_token,
                 f'choose 1 <= groups_per_token <= num_expert_groups={self.num_expert_groups}')
      reachable = self.groups_per_token * self.num_experts // self.num_expert_groups
      if self.k > reachable:
        MOE.fail('groups_per_token', self.groups_per_token, f'its groups hold {reachable} experts, '
                 f'fewer than k={self.k}: keep more groups per token')
    if self.router_logits == 'cosine' and family.logits != 'experts':
      MOE.fail('router_logits', 'cosine', f'{self.router} routing has no [T, E] router logits to '
               "make cosine: use router_logits='linear'")
    if self.balance_over != 'group' and 'balance_over' not in family.options:
      MOE.fail('balance_over', self.balance_over, f'{self.router} routing has no load-balancing '
               "loss to take over other tokens: use balance_over='group'")

  @property
  def routing_group_by(self) -> str:
    """The grouping routing runs with: `group_by`, but 'batch' for dispatch='ragged' (and 'auto'
    where it resolves to 'ragged': TPU), which routes one group (logged once). Harmless: dropless
    routing is per token, so outputs do not change; only the load-balancing loss is then taken
    over the whole batch."""
    executor = self.dispatch
    if executor == AUTO:
      executor = resolve_dispatch(self, jax.default_backend())
    return 'batch' if executor == 'ragged' else self.group_by

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> 'MoESpec':
    """Builds a spec from a dict / ml_collections ConfigDict, rejecting unknown fields."""
    return cls(**section_values(cls, 'moe', config))

  def replace(self, **changes) -> 'MoESpec':
    return dataclasses.replace(self, **changes)


def resolve_dispatch(spec: MoESpec, backend: str, dtype: Any = jnp.bfloat16) -> str:
  """The executor of `spec.dispatch` on `backend` (`jax.default_backend()`: 'cpu', 'gpu', 'tpu')
  for experts computing in `dtype`: spec.dispatch itself unless it is 'auto', which picks

    GPU  'blocked' (Pallas Mosaic-GPU grouped matmuls on Hopper, fast_dispatch.py) in bf16 / fp16;
         'gather' in float32, where the kernels' bf16 timings do not apply
    TPU  'ragged' (`jax.lax.ragged_dot`) for dropless routing, 'gather' for capacity plans
    CPU  'gather' (and any other backend)
  """
  if spec.dispatch != AUTO:
    return spec.dispatch
  if backend in ('gpu', 'cuda', 'rocm'):
    return 'blocked' if jnp.dtype(dtype).itemsize == 2 else 'gather'
  if backend == 'tpu':
    return 'ragged' if spec.capacity_factor is None else 'gather'
  return 'gather'


def _readers(option: str) -> str:
  """The routers whose family reads `option`, as a config fix: "router='token_choice'"."""
  readers = tuple(name for name, f in families.FAMILIES.items() if option in f.options)
  if len(readers) == 1:
    return f'router={readers[0]!r}'
  return f'router in {readers}' if readers else f'a router whose family reads {option}'


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
