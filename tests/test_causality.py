"""Causality through the whole LM, for every shipped LM config, sweep member and claim member.

A decoder LM's logits at position s may depend only on tokens at positions <= s, in any row of the
batch (rows are decoded in lockstep). Each member is built exactly as its sweep builds it (its
MoESpec and its batch x seq_len token layout, which set the capacity), made narrow for speed, with
sharp routers so that capacity binds and a non-zero auxiliary-loss-free bias; then every token at a
position >= t of every row is replaced and the logits before t must not move, in training and in
evaluation mode. Setups that can leak are refused when built (`moe_jax.causality`), and with the
opt-in flag the same check sees their leak: the test has the power to fail.
"""
import functools
import importlib
import json
import pkgutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import configs
from configs import lm_tiny
from experiments import CLAIMS, common
from moe_jax import sweep
from moe_jax.models import transformer

SHARPNESS = 30.0  # router weights x this: near one-hot routing, so capacity binds


def shipped_configs() -> dict[str, ml_collections.ConfigDict]:
  """{name: get_config()} of every config module in configs/."""
  modules = {info.name: importlib.import_module(f'configs.{info.name}')
             for info in pkgutil.iter_modules(configs.__path__)}
  return {name: module.get_config() for name, module in sorted(modules.items())
          if hasattr(module, 'get_config')}


def _is_lm(config) -> bool:
  return 'seq_len' in config.get('data', {})


def shipped_lm_members() -> dict[str, ml_collections.ConfigDict]:
  """{'source/member': config} of every LM the project ships: each LM config in configs/, each
  member of each sweep there, each member of each LM claim at both scales."""
  members = {}
  for source, config in shipped_configs().items():
    if 'members' in config and _is_lm(config.base):
      members.update({f'{source}/{name}': c for name, c in sweep.build_members(config).items()})
    elif _is_lm(config):
      members[source] = config
  for key, claim in CLAIMS.items():
    module = importlib.import_module(f'experiments.{claim}')
    for scale in common.SCALES:
      config = module.get_config(scale)
      if config.task == 'lm':
        members.update({f'{key}_{claim}@{scale}/{name}': c
                        for name, c in sweep.build_members(config).items()})
  return members


def narrow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The member at width 32 (2 heads, expert width <= 32): the same routing, token layout, depth
  and MoE blocks, cheaper to run."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(d_model=32, num_heads=2, d_ff=64, dtype='float32')
  config.moe.d_ff = min(config.moe.d_ff, 32)
  return config


LOSS_ONLY = ('load_balancing_coef', 'z_loss_coef', 'balance_over')  # aux losses only: logits ignore them


def _same_test(config) -> str:
  """What the check runs: members equal in this are checked once."""
  config = narrow(config)
  moe = {k: v for k, v in config.moe.to_dict().items() if k not in LOSS_ONLY}
  return json.dumps([config.model.to_dict(), moe, config.data.batch_size, config.data.seq_len],
                    sort_keys=True, default=str)


MEMBERS = shipped_lm_members()
CASES: dict[str, list[str]] = {}  # {first name: every member name it stands for}
for _name, _config in MEMBERS.items():
  CASES.setdefault(_same_test(_config), []).append(_name)
CASES = {names[0]: names for names in CASES.values()}


def sharpen(variables, rng):
  """Router kernels x SHARPNESS; every auxiliary-loss-free bias random and non-zero."""
  def change(path, leaf):
    names = [getattr(p, 'key', '') for p in path]
    if 'router' in names and names[-1] == 'kernel':
      return leaf * SHARPNESS
    if 'router' in names and names[-1] == 'log_scale':  # cosine logits: the largest temperature
      return leaf + jnp.log(SHARPNESS)
    if names[-1] == 'bias' and 'router_bias' in names:
      return jax.random.normal(jax.random.fold_in(rng, len(leaf)), leaf.shape)
    return leaf
  return jax.tree_util.tree_map_with_path(change, variables)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, token_sets):
  """Logits [V, B, L, vocab] of each of token_sets [V, B, L] in training and in evaluation mode,
  one sharpened initialization for all, and the MoE layers' metrics of the first set."""
  variables = sharpen(model.init(jax.random.key(2), token_sets[0]), jax.random.key(3))

  def train(tokens):
    (logits, aux), _ = model.apply(variables, tokens, train=True, mutable=['router_bias'],
                                   rngs={'router': jax.random.key(7)})
    return logits, aux['layers']

  def evaluate(tokens):
    logits, aux = model.apply(variables, tokens)
    return logits, aux['layers']

  (train_logits, layers), (eval_logits, _) = (jax.lax.map(train, token_sets),
                                              jax.lax.map(evaluate, token_sets))
  return {'train': train_logits, 'eval': eval_logits}, jax.tree.map(lambda v: v[0], layers)


def future_changes_past(config, cuts=(0.25, 0.5)) -> tuple[dict, dict]:
  """({mode: largest |change| of the logits before the cut when every token from the cut on
  changes, over the cuts}, the MoE layers' metrics in training mode of the unchanged batch)."""
  b, length = config.data.batch_size, config.data.seq_len
  tokens = jax.random.randint(jax.random.key(1), (b, length), 0, 256)
  starts = [int(length * cut) for cut in cuts]
  changed = [tokens.at[:, t:].set((tokens[:, t:] + 1 + jnp.arange(length - t) % 200) % 256)
             for t in starts]
  logits, layers = _logits(transformer.build(config), jnp.stack([tokens] + changed))
  worst = {mode: max(float(jnp.abs(values[i + 1, :, :t] - values[0, :, :t]).max())
                     for i, t in enumerate(starts)) for mode, values in logits.items()}
  return worst, jax.device_get(layers)


@pytest.mark.parametrize('name', sorted(CASES))
def test_no_shipped_lm_sees_a_later_token(name):
  config = narrow(MEMBERS[name])
  worst, layers = future_changes_past(config)
  assert worst == {'train': 0.0, 'eval': 0.0}, f'{CASES[name]}: logits before the cut moved: {worst}'
  spec = transformer.from_config(config)[1]
  if spec is not None and spec.router == 'token_choice' and spec.capacity_factor is not None:
    # Capacity really bound: the check saw routing that drops assignments.
    assert max(float(m['assignments_dropped']) for m in layers.values()) > 0.05, name


def test_every_kind_of_shipped_config_is_covered():
  kinds = {name.split('/')[0] for name in MEMBERS}
  assert {'lm_tiny', 'compare_routers'} <= kinds
  assert {f'{k}_{c}@{s}' for k, c in CLAIMS.items() if k != 'f' for s in common.SCALES} <= kinds
  routers = {(c.moe.router, c.moe.capacity_factor is None) for c in MEMBERS.values()
             if c.model.moe_every}
  assert routers >= {('token_choice', False), ('token_choice', True), ('expert_choice', False),
                     ('soft', False), ('sinkhorn', True), ('base', False), ('hash', True)}


BOTH = ('train', 'eval')
LEAKS = {  # config.moe changes of a compare_routers-like LM that leak, the field named, the modes
    'top2_choice_priority': ({'k': 2, 'priority': 'choice'}, 'priority', BOTH),
    'batch_prioritized': ({'k': 1, 'priority': 'batch'}, 'priority', BOTH),
    'capacity_over_the_batch': ({'k': 1, 'group_by': 'batch'}, 'group_by', BOTH),
    'expert_choice_by_sequence': ({'router': 'expert_choice', 'capacity_factor': 2.0}, 'group_by',
                                  BOTH),
    'soft_by_sequence': ({'router': 'soft', 'slots_per_expert': 2}, 'group_by', BOTH),
    # balanced in training only: in evaluation each token takes its own top-k
    'sinkhorn_by_sequence': ({'router': 'sinkhorn', 'capacity_factor': None}, 'group_by',
                             ('train',)),
    'base_by_sequence': ({'router': 'base', 'capacity_factor': 1.0}, 'group_by', ('train',)),
}


def leaky(changes: dict, allow: bool) -> ml_collections.ConfigDict:
  config = narrow(lm_tiny.get_config())
  config.data.update(batch_size=4, seq_len=32)
  config.model.update(num_layers=2, moe_every=1, allow_future_leak=allow)
  config.moe.update(num_experts=4, **changes)
  return config


@pytest.mark.parametrize('name', sorted(LEAKS))
def test_leaking_setups_are_refused_before_building(name):
  changes, field, _ = LEAKS[name]
  with pytest.raises(ValueError, match=rf'config\.moe\.{field}=.* is not causal.*Fix:.*'
                                       r'allow_future_leak'):
    transformer.build(leaky(changes, allow=False))


@pytest.mark.parametrize('name', sorted(LEAKS))
def test_the_check_sees_the_leak_when_it_is_allowed(name):
  changes, _, modes = LEAKS[name]
  worst, _ = future_changes_past(leaky(changes, allow=True))
  for mode in BOTH:
    leaked = worst[mode] > 1e-3
    assert leaked == (mode in modes), f'{name} in {mode}: leak expected {mode in modes}, {worst}'
