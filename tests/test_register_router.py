"""A router family defined here, in a user's module, and registered: no project file knows it.

The family is top-k with a temperature: each token's k experts are the top-k of
softmax(logits / TEMPERATURE), their weights renormalized, placed into capacity by the shared
`routing.place`. Registered as 'tempered_top_k', it validates as `config.moe.router`, routes like
token choice on tempered logits, counts FLOPs and parameters, labels sweeps, is checked for
causality, lists in `moe-jax config`, and trains an LM through the trainer.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_tiny
from moe_jax import cli, routing
from moe_jax.moe import causality, families, flops
from moe_jax.run import sweep, train
from moe_jax.models import transformer
from moe_jax.moe.spec import MoESpec

NAME = 'tempered_top_k'
TEMPERATURE = 0.5


def route_tempered(spec, group: families.Group) -> routing.RouterOutput:
  """Top-k of softmax(logits / TEMPERATURE) for one group of T tokens, weights renormalized."""
  probs = jax.nn.softmax(group.logits / TEMPERATURE, axis=-1)  # [T, E]
  weight, expert_index = jax.lax.top_k(probs, spec.k)  # [T, k]
  weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  capacity = routing.capacity_for(group.num_tokens, spec.num_experts, spec.capacity_factor, spec.k)
  return routing.place(expert_index, weight, probs, group.logits, capacity=capacity,
                       priority=spec.priority)


TEMPERED = families.Family(
    route=route_tempered,
    couples_group=False,  # a token's choice is its own; only capacity is shared (`place`)
    cite=f'top-k of softmax(logits / {TEMPERATURE}) (tests/test_register_router.py)',
    options=('k', 'capacity_factor', 'priority', 'balance_over'),
    dropless=True,  # capacity_factor=None: routing.capacity_for gives None, place goes dropless
    check=families.check_k,
)


@pytest.fixture(scope='module', autouse=True)
def registered():
  families.register(NAME, TEMPERED)
  yield
  families.unregister(NAME)


def tiny_spec(**changes) -> MoESpec:
  return MoESpec(**{'router': NAME, 'num_experts': 4, 'd_ff': 64, 'k': 2,
                    'priority': 'token', **changes})


def tiny_config(data_dir=None, **moe):
  """lm_tiny shrunk (d_model 32, 2 blocks: block 1 MoE with 4 experts, batch 8 x 32), routed by
  the registered family."""
  config = lm_tiny.get_config()
  config.data.data_dir = data_dir
  config.data.seq_len, config.data.batch_size = 32, 8
  config.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_every=2)
  config.moe.update(router=NAME, num_experts=4, d_ff=64, k=2, **moe)
  config.train.update(steps=4, warmup_steps=1, log_every=1, eval_every=4, eval_batches=1,
                      checkpoint_every=0, progress=False)
  return config


def test_the_registry_validates_names_when_a_spec_is_built():
  assert NAME in families.names() and tiny_spec().router == NAME
  with pytest.raises(ValueError, match=r"config\.moe\.router='tempered_top_q' is invalid"):
    MoESpec(router='tempered_top_q')
  with pytest.raises(ValueError, match='already registered'):
    families.register(NAME, families.Family(route=route_tempered, couples_group=True, cite=''))
  with pytest.raises(ValueError, match=r'config\.moe\.k=5 is invalid'):  # the family's check
    tiny_spec(k=5)
  with pytest.raises(ValueError, match=r'config\.moe\.num_expert_groups=2'):  # not an option
    tiny_spec(num_expert_groups=2)
  families.register('later', TEMPERED)  # registered after import, accepted at validation time
  try:
    assert MoESpec(router='later').router == 'later'
  finally:
    families.unregister('later')
  with pytest.raises(ValueError, match="config.moe.router='later' is invalid"):
    MoESpec(router='later')


@pytest.mark.parametrize('capacity_factor', [None, 1.0])
def test_it_routes_as_token_choice_on_tempered_logits(capacity_factor):
  """Reference: token choice (renormalized top-k) of logits / TEMPERATURE, the same plan."""
  spec = tiny_spec(capacity_factor=capacity_factor)
  logits = jax.random.normal(jax.random.key(0), (16, 4))
  plan = families.route(spec, families.Group(logits)).plan
  want = routing.token_choice(logits / TEMPERATURE, k=2, capacity_factor=capacity_factor,
                              renormalize=True, priority='token').plan
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), plan, want)


def test_flops_and_params_count_its_router():
  """By hand: d=32, E=4, f=64, k=2, capacity_factor=1.25, groups of 32 tokens: router 2*d*E,
  capacity round(2 * 32 * 1.25 / 4) = 20 slots, so 4 * 20 / 32 = 2.5 expert FFNs per token
  executed, 2 active; a SwiGLU expert 2 * 3 * d * f FLOPs."""
  spec, shape, d = tiny_spec(), flops.Shape(batch_size=8, seq_len=32), 32
  ffn = 2 * 3 * d * 64
  assert flops.router_flops(spec, d) == 2 * d * 4
  assert flops.moe_flops(spec, d, shape, 'executed') == 2 * d * 4 + 2.5 * ffn
  assert flops.moe_flops(spec, d, shape, 'active') == 2 * d * 4 + 2 * ffn
  assert flops.moe_params(spec, d, shape) == (d * 4 + 4 * 3 * d * 64, d * 4 + 2 * 3 * d * 64)
  cosine = tiny_spec(router_logits='cosine', cosine_dim=8)  # the family's default projections
  assert flops.router_flops(cosine, d) == 2 * (d * 8 + 8 * 4)
  assert flops.moe_params(cosine, d, shape)[0] == d * 8 + 8 * 4 + 1 + 4 * 3 * d * 64


def test_sweep_labels_and_sizes_it():
  config = tiny_config()
  assert sweep.describe(config) == f'{NAME} k=2 cf=1.25 E=4 f=64'
  members = sweep.build_members(ml_sweep(config))
  assert sweep.describe(members['tempered']).startswith(f'{NAME} k=2 cf=1.25 E=4 f=')


def ml_sweep(base):
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict()
  config.base = base
  config.members = {'dense': {'model': {'moe_every': 0}}, 'tempered': {'moe': {'router': NAME}}}
  config.size_experts, config.flops_tolerance, config.flops_match = True, 0.02, 'active'
  return config


def test_the_causality_check_reads_its_family():
  """couples_group=False: causal as token choice is (dropless, or priority='token'), refused with
  priority='choice' and k=2; and an LM built from it keeps its logits before a cut still when every
  later token changes."""
  assert causality.future_leak(tiny_spec()) is None
  assert causality.future_leak(tiny_spec(capacity_factor=None, priority='choice')) is None
  leak = causality.future_leak(tiny_spec(priority='choice'))
  assert leak is not None and leak.field == 'priority'
  config = tiny_config(priority='choice')
  with pytest.raises(ValueError, match=r"config\.moe\.priority='choice' is not causal"):
    transformer.build(config)
  assert past_change(tiny_config(capacity_factor=0.5)) == 0.0  # capacity binds: still causal
  leaky = tiny_config(capacity_factor=0.5, priority='choice')
  leaky.model.allow_future_leak = True
  assert past_change(leaky) > 1e-4  # the check has power: the refused set-up does leak


def past_change(config, cut: int = 16) -> float:
  """The largest change of the LM's logits (evaluation mode) before position `cut` when every
  token from `cut` on changes."""
  model = transformer.build(config)
  tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, 256)
  changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % 256)

  @jax.jit
  def logits(token_sets):
    variables = model.init(jax.random.key(2), token_sets[0])
    return jax.lax.map(lambda t: model.apply(variables, t)[0], token_sets)

  both = logits(jnp.stack([tokens, changed]))
  assert float(jnp.abs(both[1, :, cut:] - both[0, :, cut:]).max()) > 1e-3
  return float(jnp.abs(both[1, :, :cut] - both[0, :, :cut]).max())


def test_config_command_lists_it(capsys):
  assert cli.main(['moe-jax', 'config', '--config', lm_tiny.__file__,
                   f'--config.moe.router={NAME}']) == 0
  out = capsys.readouterr().out
  assert f'router: {NAME}' in out and TEMPERED.cite in out


def test_the_trainer_trains_an_lm_with_it(data_dir, tmp_path):
  config = tiny_config(data_dir)
  summary = train.train(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert np.isfinite([r['train_loss'] for r in records]).all() and np.isfinite(summary['eval_loss'])
  assert summary['router'].startswith(f'{NAME} (')
  assert summary['flops_active'] == transformer.model_flops_per_token(config, 'active')
  assert (summary['params_total'], summary['params_active']) == transformer.param_counts(config)
  assert any(r.get('moe/block_1/tokens_per_expert') for r in records)
