"""Causality through the whole LM, for every shipped LM config, sweep member and claim member,
and every paper-scale LM (configs/papers/) with its presets (`:scale=cpu`, `:scale=gpu`).

A decoder LM's logits at position s may depend only on tokens at positions <= s, in any row of the
batch (rows are decoded in lockstep). Each member is built exactly as its sweep builds it (its
MoESpec and its batch x seq_len token layout, which set the capacity), made narrow for speed, with
sharp routers so that capacity binds and a non-zero auxiliary-loss-free bias; then every token at a
position >= t of every row is replaced and the logits before t must not move, in training and in
evaluation mode. A paper config keeps its routing and its kind of model (grouped-query or latent
attention, dense first blocks, tied embeddings, encoder-decoder) at a test's depth and token
layout (`at_test_scale`); an encoder-decoder's positions are its decoder's, and its encoder input
(all of it earlier, by design) must move the logits. Setups that can leak are refused when built
(`moe_jax.moe.causality`), and with the opt-in flag the same check sees their leak: the test has the
power to fail.
"""
import functools
import importlib
import json
import math
import pkgutil

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import configs
import configs.papers
from configs import lm_tiny
from configs.common import SCALES
from experiments import CLAIMS
from moe_jax.models import transformer
from moe_jax.moe import families
from moe_jax.run import sweep

SHARPNESS = 30.0  # router weights x this: near one-hot routing, so capacity binds


def shipped_configs(package=configs, arg=None) -> dict[str, ml_collections.ConfigDict]:
  """{name: get_config(arg)} of every config module in `package` (configs/, or configs/papers/)."""
  modules = {info.name: importlib.import_module(f'{package.__name__}.{info.name}')
             for info in pkgutil.iter_modules(package.__path__)}
  return {name: module.get_config(*([arg] if arg else [])) for name, module in
          sorted(modules.items()) if hasattr(module, 'get_config')}


def _is_lm(config) -> bool:
  return 'seq_len' in config.get('data', {})


PAPER_BATCH, PAPER_SEQ_LEN, PAPER_INPUT_LEN = 8, 64, 16  # a paper LM's token layout here


def tokens_for_a_slot(config) -> int:
  """The tokens a routing group needs for every expert to have a slot (capacity >= 1); 0 for a
  dense model or dropless routing."""
  spec = transformer.from_config(config)[1]
  if spec is None or spec.capacity_factor is None:
    return 0
  per_token = families.family(spec).per_token(spec) or 1
  return math.ceil(spec.num_experts / (per_token * spec.capacity_factor))


def at_test_scale(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A paper-scale LM at a test's depth and token layout, its routing and model kind unchanged:
  at most one dense first block, then MoE blocks (one, or two where every block is MoE), as many
  encoder blocks as decoder blocks; batch PAPER_BATCH of PAPER_SEQ_LEN tokens (PAPER_INPUT_LEN
  encoder tokens), or more where a routing group (a position across the batch, or a sequence)
  needs more tokens for one slot per expert. Capacity per group follows the smaller groups:
  causality is structural."""
  config = ml_collections.ConfigDict(config.to_dict())
  model = config.model
  model.first_dense_layers = min(model.first_dense_layers, 1)
  depth = max(2, model.first_dense_layers + model.moe_every)
  model.num_layers = min(model.num_layers, depth)
  model.encoder_layers = min(model.encoder_layers, depth)
  group = tokens_for_a_slot(config)
  across_batch = bool(group) and config.moe.group_by == 'position'
  per_sequence = 0 if across_batch else group
  config.data.update(batch_size=max(PAPER_BATCH, group if across_batch else 0),
                     seq_len=max(PAPER_SEQ_LEN, per_sequence))
  if transformer.input_len(config):
    config.data.input_len = max(PAPER_INPUT_LEN, per_sequence)
  return config


PAPER_PRESETS = ('scale=cpu', 'scale=gpu')  # each paper config's presets (configs/papers/common.py)


def paper_lms(arg=None) -> dict[str, ml_collections.ConfigDict]:
  """{'papers/name[:arg]': config} of every LM in configs/papers/, at full scale or with the
  preset `arg`."""
  suffix = f':{arg}' if arg else ''
  return {f'papers/{name}{suffix}': config
          for name, config in shipped_configs(configs.papers, arg).items()
          if config.get('task') == 'lm'}


def claim_configs() -> dict[str, ml_collections.ConfigDict]:
  """{'key_claim@scale': config} of each claim at each scale it has a regime for (a claim whose
  pilot has not fixed its regime at a scale refuses to build there: nothing to check yet)."""
  configs_ = {}
  for key, claim in CLAIMS.items():
    module = importlib.import_module(f'experiments.{claim}')
    for scale in SCALES:
      try:
        configs_[f'{key}_{claim}@{scale}'] = module.get_config(f'scale={scale}')
      except ValueError as error:
        if 'pilot' not in str(error):
          raise
  return configs_


def shipped_lm_members() -> dict[str, ml_collections.ConfigDict]:
  """{'source/member': config} of every LM the project ships: each LM config in configs/, each
  member of each sweep there, each member of each LM claim at both scales, and each paper LM of
  configs/papers/ `at_test_scale`, and with its presets (PAPER_PRESETS: scale=cpu as it is,
  scale=gpu `at_test_scale`)."""
  members = {}
  for source, config in shipped_configs().items():
    if 'members' in config and _is_lm(config.base):
      members.update({f'{source}/{name}': c for name, c in sweep.build_members(config).items()})
    elif _is_lm(config):
      members[source] = config
  for source, config in claim_configs().items():
    if config.task == 'lm':
      members.update({f'{source}/{name}': c for name, c in sweep.build_members(config).items()})
  members.update({name: at_test_scale(c) for name, c in paper_lms().items()})
  # The presets: cpu as it trains (its own token layout), gpu at a test's depth and layout.
  members.update(paper_lms('scale=cpu'))
  members.update({name: at_test_scale(c) for name, c in paper_lms('scale=gpu').items()})
  return members


NARROW_ATTENTION = dict(head_dim=16, q_lora_rank=16, kv_lora_rank=8, rope_head_dim=4)  # when set


def narrow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The member at width 32 (2 heads, expert width <= 32, vocabulary <= 512): the same routing,
  token layout, depth, MoE blocks and kind of attention (grouped-query keeps fewer K/V heads than
  query heads: 1 of 2; latent attention small ranks), cheaper to run."""
  config = ml_collections.ConfigDict(config.to_dict())
  model = config.model
  if model.get('num_kv_heads'):
    model.num_kv_heads = 1 if model.num_kv_heads < model.num_heads else 2
  model.update(d_model=32, num_heads=2, d_ff=64, dtype='float32')
  for name, small in NARROW_ATTENTION.items():
    if model.get(name):
      model[name] = small
  if 'vocab_size' in model:
    model.vocab_size = min(model.vocab_size, 512)
  if 'moe' in config:  # not in a dense model's config (T5)
    config.moe.d_ff = min(config.moe.d_ff, 32)
  return config


LOSS_ONLY = ('load_balancing_coef', 'z_loss_coef', 'balance_over')  # aux losses only: logits ignore them


def _same_test(config) -> str:
  """What the check runs: members equal in this are checked once."""
  config = narrow(config)
  moe = {k: v for k, v in config.get('moe', {}).items() if k not in LOSS_ONLY}
  return json.dumps([config.model.to_dict(), moe, config.data.batch_size, config.data.seq_len,
                     transformer.input_len(config)], sort_keys=True, default=str)


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


def future_changes_past(config, cuts=(0.25, 0.5)) -> tuple[dict, dict, dict | None]:
  """({mode: largest |change| of the logits before the cut when every token from the cut on
  changes, over the cuts}, the MoE layers' metrics in training mode of the unchanged batch,
  {mode: largest |change| of the logits when the encoder input changes} or None).

  An encoder-decoder's cuts are decoder positions: its encoder input is all earlier and stays,
  and changing it alone must move the logits (the third value: the check has power)."""
  b, length, inputs = config.data.batch_size, config.data.seq_len, transformer.input_len(config)
  tokens = jax.random.randint(jax.random.key(1), (b, inputs + length), 0, 256)

  def replace(start, stop):
    return tokens.at[:, start:stop].set(
        (tokens[:, start:stop] + 1 + jnp.arange(stop - start) % 200) % 256)

  starts = [int(length * cut) for cut in cuts]
  changed = [replace(inputs + t, inputs + length) for t in starts]
  changed += [replace(0, inputs)] if inputs else []
  logits, layers = _logits(transformer.build(config), jnp.stack([tokens] + changed))
  worst = {mode: max(float(jnp.abs(values[i + 1, :, :t] - values[0, :, :t]).max())
                     for i, t in enumerate(starts)) for mode, values in logits.items()}
  encoder = ({mode: float(jnp.abs(values[-1] - values[0]).max()) for mode, values in logits.items()}
             if inputs else None)
  return worst, jax.device_get(layers), encoder


@pytest.mark.parametrize('name', sorted(CASES))
def test_no_shipped_lm_sees_a_later_token(name):
  """Every shipped LM (configs/, sweep and claim members, configs/papers/), narrowed. Paper
  configs run at a reduced depth and token layout (`at_test_scale`): their capacity per group
  then differs from the paper's, but causality is structural (which tokens share a routing group
  and in what order they claim slots), and each keeps its routing spec and kind of model. An
  encoder-decoder is checked at its decoder positions, and its encoder input must move them."""
  config = narrow(MEMBERS[name])
  worst, layers, encoder = future_changes_past(config)
  assert worst == {'train': 0.0, 'eval': 0.0}, f'{CASES[name]}: logits before the cut moved: {worst}'
  if encoder is not None:
    assert min(encoder.values()) > 1e-3, f'{CASES[name]}: the encoder input moved nothing: ' \
                                         f'{encoder}'
  spec = transformer.from_config(config)[1]
  if spec is not None and spec.router == 'token_choice' and spec.capacity_factor is not None:
    # Capacity really bound: the check saw routing that drops assignments.
    assert max(float(m['assignments_dropped']) for m in layers.values()) > 0.05, name


def test_every_kind_of_shipped_config_is_covered():
  kinds = {name.split('/')[0] for name in MEMBERS} | set(MEMBERS)
  assert {'lm_tiny', 'compare_routers'} <= kinds
  assert {name for name, c in claim_configs().items() if c.task == 'lm'} <= kinds
  papers = shipped_configs(configs.papers)
  assert {f'papers/{name}' for name, c in papers.items() if c.task != 'vit'} <= kinds
  assert {f'papers/{name}:{arg}' for name, c in papers.items() if c.task != 'vit'
          for arg in PAPER_PRESETS} <= kinds
  assert {'papers/t5_base', 'papers/switch_base', 'papers/mixtral_8x7b',
          'papers/deepseek_v3'} <= kinds  # the discovery found them
  # The kinds of model the paper configs bring, as the check runs them (narrowed).
  models, specs = zip(*(transformer.from_config(narrow(c)) for c in MEMBERS.values()))
  kinds_of_model = {
      'encoder-decoder': lambda m: m.encoder_layers and m.is_moe(m.encoder_layers - 1),
      'grouped-query': lambda m: 0 < m.num_kv_heads < m.num_heads,
      'latent': lambda m: m.latent and m.q_lora_rank,
      'dense first': lambda m: m.first_dense_layers and m.moe_every,
      'tied': lambda m: m.tie_embeddings}
  missing = [name for name, kind in kinds_of_model.items() if not any(map(kind, models))]
  assert not missing, f'no shipped LM checked as: {missing}'
  assert any(s and s.num_expert_groups > 1 and s.bias_update_rate > 0 for s in specs), \
      'no group-limited routing with auxiliary-loss-free bias checked'
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
  worst, _, _ = future_changes_past(leaky(changes, allow=True))
  for mode in BOTH:
    leaked = worst[mode] > 1e-3
    assert leaked == (mode in modes), f'{name} in {mode}: leak expected {mode in modes}, {worst}'
