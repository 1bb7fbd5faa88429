"""The router zoo against plain references: Sinkhorn (Megatron-LM), BASE layers' balanced
assignment, hash routing, cosine router logits, DeepSeek-V3's group-limited top-k, and the
load-balancing loss over sequences or the global batch."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.moe import flops
from moe_jax.moe.layer import MoELayer
from moe_jax.routers.projection import CosineProjection
from moe_jax.moe.spec import MoESpec
from tests import reference
from tests.test_routing import check_slot_plan_invariants, dense_combine, random_logits

TEXT = pathlib.Path(__file__).parents[1] / 'moe_jax' / 'shipped_data' / 'tiny_shakespeare'


def text_ids(n: int, offset: int = 0) -> np.ndarray:
  """n byte ids of Tiny Shakespeare (real text, as the LM sees it)."""
  data = next(TEXT.glob('*.txt')).read_bytes()[offset:offset + n]
  return np.frombuffer(data, np.uint8).astype(np.int32)


# --- Sinkhorn ------------------------------------------------------------------------------------

@pytest.mark.parametrize('seed,t,e', [(0, 32, 4), (1, 64, 8), (2, 10, 4)])
def test_sinkhorn_matches_megatron_loop_and_balances(seed, t, e):
  logits = random_logits(seed, t, e)
  plan = np.exp(np.asarray(routing.sinkhorn(jnp.asarray(logits)), np.float64))
  np.testing.assert_allclose(plan, reference.sinkhorn_plan(logits), rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(plan.sum(0), 1 / e, rtol=1e-4)  # columns: equal expert mass
  np.testing.assert_allclose(plan.sum(1), 1 / t, rtol=5e-2)  # rows: within the tolerance


@pytest.mark.parametrize('k', [1, 2])
def test_sinkhorn_routing_balances_in_training_and_is_top_k_in_evaluation(k):
  logits = random_logits(3, 64, 8) + np.array([3.0, 2.0] + [0.0] * 6, np.float32)  # skewed
  act = 1 / (1 + np.exp(-logits)) if k == 1 else reference.softmax(logits)
  train = routing.sinkhorn_routing(jnp.asarray(logits), k=k, capacity_factor=None, train=True)
  evaluate = routing.sinkhorn_routing(jnp.asarray(logits), k=k, capacity_factor=None, train=False)
  np.testing.assert_allclose(dense_combine(train.plan),
                             reference.top_k_combine(reference.sinkhorn_plan(logits), act, k),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dense_combine(evaluate.plan), reference.top_k_combine(act, act, k),
                             rtol=1e-5, atol=1e-6)
  assert train.metrics['max_over_mean_load'] < 0.5 * evaluate.metrics['max_over_mean_load']


def test_sinkhorn_with_capacity_keeps_slot_invariants():
  out = routing.sinkhorn_routing(jnp.asarray(random_logits(4, 32, 4)), k=2, capacity_factor=1.0,
                                 priority='token')
  check_slot_plan_invariants(out.plan, max_per_token=2)


# --- BASE layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize('seed,t,e', [(0, 16, 4), (1, 24, 8), (2, 10, 4), (3, 32, 2)])
def test_balanced_assignment_is_balanced_and_optimal(seed, t, e):
  scores = random_logits(seed, t, e)
  expert = np.asarray(routing.balanced_assignment(jnp.asarray(scores)))
  counts = np.bincount(expert, minlength=e)
  assert counts.max() <= -(-t // e) and counts.sum() == t
  if t % e == 0:
    assert np.all(counts == t // e)  # an equal share, by construction
  eps = 1e-3 * (scores.max() - scores.min())
  total = scores[np.arange(t), expert].sum()
  assert total >= reference.best_balanced_total(scores) - t * eps - 1e-4  # the auction's bound


def test_balanced_assignment_stays_balanced_when_rounds_run_out():
  scores = random_logits(5, 32, 4) + np.array([4.0, 0, 0, 0], np.float32)  # everyone wants 0
  expert = np.asarray(routing.balanced_assignment(jnp.asarray(scores), max_rounds=1))
  assert np.all(np.bincount(expert, minlength=4) == 8)


def test_base_routing_keeps_every_token_and_gates_by_sigmoid():
  logits = random_logits(6, 16, 4)
  sigmoid = 1 / (1 + np.exp(-logits))
  train = routing.base_routing(jnp.asarray(logits), train=True)
  check_slot_plan_invariants(train.plan, max_per_token=1)
  assert train.plan.capacity == 4 and float(train.metrics['fraction_dropped']) == 0.0
  combine = dense_combine(train.plan)
  chosen = combine.argmax(1)
  np.testing.assert_allclose(combine.max(1), sigmoid[np.arange(16), chosen], rtol=1e-6)
  evaluate = routing.base_routing(jnp.asarray(logits), train=False)  # greedy at test time
  np.testing.assert_allclose(dense_combine(evaluate.plan),
                             reference.top_k_combine(logits, sigmoid, 1), rtol=1e-6)


# --- Hash routing --------------------------------------------------------------------------------

def test_hash_routing_is_a_fixed_map_of_the_token_id():
  ids = text_ids(256)
  expert = np.asarray(routing.hash_expert(jnp.asarray(ids), 8))
  np.testing.assert_array_equal(expert, reference.murmur_expert(ids, 8))
  for token in np.unique(ids):  # the same id goes to the same expert, wherever it is
    assert len(set(expert[ids == token])) == 1
  by_id = np.bincount(np.asarray(routing.hash_expert(jnp.arange(256), 8)), minlength=8)
  assert by_id.min() >= 20 and by_id.max() <= 44  # the 256 ids spread over every expert
  other_seed = np.asarray(routing.hash_expert(jnp.arange(256), 8, seed=1))
  assert np.mean(other_seed != np.asarray(routing.hash_expert(jnp.arange(256), 8))) > 0.5


def test_hash_routing_plan_weights_and_losses():
  ids = jnp.asarray(text_ids(64, offset=1000))
  out = routing.hash_routing(ids, 4, capacity_factor=None)
  combine = dense_combine(out.plan)
  np.testing.assert_array_equal(combine.argmax(1), reference.murmur_expert(ids, 4))
  np.testing.assert_array_equal(combine.sum(1), 1.0)
  assert float(out.losses['load_balancing']) == 0.0 and float(out.losses['z']) == 0.0
  capped = routing.hash_routing(ids, 4, capacity_factor=1.0, priority='token')
  check_slot_plan_invariants(capped.plan, max_per_token=1)


# --- Cosine router logits ------------------------------------------------------------------------

def test_cosine_logits_match_reference_and_ignore_the_token_norm():
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  module = CosineProjection(num_outputs=4, dim=6)
  params = module.init(jax.random.key(1), x)['params']
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.asarray(x, np.float64) @ p['project']
  h /= np.linalg.norm(h, axis=-1, keepdims=True)
  e = p['centroids'] / np.linalg.norm(p['centroids'], axis=0)
  want = h @ e * np.exp(min(p['log_scale'], np.log(100.0)))
  got = module.apply({'params': params}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(got)).max() <= 2.0 + 1e-5  # |cos| <= 1 times the initial scale 2
  np.testing.assert_allclose(module.apply({'params': params}, 3.0 * x), got, rtol=1e-4, atol=1e-5)


def test_cosine_router_params_and_flops_are_counted():
  spec = MoESpec(num_experts=8, d_ff=32, k=2, router_logits='cosine', cosine_dim=4)
  x = jnp.zeros((2, 8, 16))
  params = MoELayer(spec).init(jax.random.key(0), x)['params']['router']
  counted, _ = flops.moe_params(spec, 16, flops.Shape(2, 8))
  experts = 3 * 8 * 16 * 32
  assert sum(a.size for a in jax.tree.leaves(params)) == counted - experts == 16 * 4 + 4 * 8 + 1
  assert flops.router_flops(spec, 16) == 2 * (16 * 4 + 4 * 8)


# --- DeepSeek-V3 group-limited routing -----------------------------------------------------------

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_group_limited_routing_matches_reference(seed):
  logits = random_logits(seed, 16, 16)
  out = routing.token_choice(jnp.asarray(logits), k=4, capacity_factor=None, score='sigmoid',
                             num_groups=4, groups_per_token=2)
  chosen = [set(row) for row in np.asarray(out.plan.expert_index)]
  assert chosen == reference.group_limited_experts(1 / (1 + np.exp(-logits)), 4, 4, 2)
  assert all(len({e // 4 for e in row}) <= 2 for row in chosen)


def test_one_group_is_plain_top_k():
  logits = jnp.asarray(random_logits(7, 16, 8))
  plain = routing.token_choice(logits, k=2, capacity_factor=None)
  limited = routing.token_choice(logits, k=2, capacity_factor=None, num_groups=1,
                                 groups_per_token=1)
  np.testing.assert_array_equal(plain.plan.expert_index, limited.plan.expert_index)


# --- Load-balancing loss over sequences or the global batch --------------------------------------

def test_balance_loss_over_groups_sequences_and_the_batch():
  b, l, d, e, k = 4, 8, 16, 8, 2
  x = jax.random.normal(jax.random.key(2), (b, l, d))
  spec = MoESpec(num_experts=e, d_ff=16, k=k, capacity_factor=1.25, group_by='position')
  variables = MoELayer(spec).init(jax.random.key(0), x)
  probs = reference.softmax(np.asarray(x, np.float64) @ np.asarray(variables['params']['router']
                                                                    ['kernel'], np.float64))
  choices = np.zeros_like(probs)  # each token's top-k, 1/k each (before capacity)
  top = np.argsort(-probs, axis=-1, kind='stable')[..., :k]
  np.put_along_axis(choices, top, 1.0 / k, axis=-1)
  loss = lambda p, c: e * np.sum(c.reshape(-1, e).mean(0) * p.reshape(-1, e).mean(0))
  want = {'group': np.mean([loss(probs[:, i], choices[:, i]) for i in range(l)]),  # positions
          'sequence': np.mean([loss(probs[i], choices[i]) for i in range(b)]),
          'global': loss(probs, choices)}
  for scope, value in want.items():
    _, aux = jax.jit(MoELayer(spec.replace(balance_over=scope)).apply)(variables, x)
    np.testing.assert_allclose(aux['losses']['load_balancing'], value, rtol=1e-5, err_msg=scope)
  assert len({round(v, 6) for v in want.values()}) == 3  # the three scopes differ here


# --- Config errors -------------------------------------------------------------------------------

@pytest.mark.parametrize('fields, message', [
    (dict(router='base'), "config.moe.capacity_factor=1.25 is invalid: BASE layers"),
    (dict(router='base', capacity_factor=1.0, k=2), 'config.moe.k=2 is invalid'),
    (dict(router='hash', k=2), 'config.moe.k=2 is invalid'),
    (dict(router='expert_choice', capacity_factor=None), 'needs a capacity'),
    (dict(router='expert_choice', num_expert_groups=2), 'config.moe.num_expert_groups=2'),
    (dict(num_expert_groups=3), 'use a divisor of num_experts=8'),
    (dict(k=4, num_expert_groups=4, groups_per_token=1), 'fewer than k=4'),
    (dict(router='soft', router_logits='cosine'), "config.moe.router_logits='cosine'"),
    (dict(router='expert_choice', balance_over='global'), "config.moe.balance_over='global'"),
    (dict(router_logits='dot'), "config.moe.router_logits='dot' is invalid"),
])
def test_bad_router_options_name_the_field(fields, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    MoESpec(num_experts=8, **fields)


def test_hash_routing_without_token_ids_is_refused():
  spec = MoESpec(router='hash', num_experts=4, d_ff=8, capacity_factor=None)
  with pytest.raises(ValueError, match="config.moe.router='hash' routes by token id"):
    MoELayer(spec).init(jax.random.key(0), jnp.zeros((2, 4, 8)))


@pytest.mark.parametrize('router,options', [
    ('sinkhorn', dict(k=2, capacity_factor=None)),
    ('base', dict(capacity_factor=1.0)),
    ('hash', dict(capacity_factor=None)),
])
def test_new_families_train_a_layer(router, options):
  """Forward in both modes and a gradient step through each new family's layer."""
  spec = MoESpec(router=router, num_experts=4, d_ff=16, group_by='position', **options)
  x = jax.random.normal(jax.random.key(1), (8, 4, 16))
  ids = jnp.asarray(text_ids(32).reshape(8, 4))
  layer = MoELayer(spec)
  variables = layer.init(jax.random.key(0), x, token_ids=ids)

  def loss(params, train):
    y, aux = layer.apply({'params': params}, x, train=train, token_ids=ids)
    return jnp.sum(y ** 2) + aux['loss'], y

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)  # eager would run op by op
  for train in (True, False):
    grads, y = grad(variables['params'], train)
    assert y.shape == x.shape and np.all(np.isfinite(y))
    assert np.abs(np.asarray(grads['experts']['w_in'])).sum() > 0
    if router != 'hash':  # the router learns through the combine weights
      assert np.abs(np.asarray(grads['router']['kernel'])).sum() > 0
    else:
      assert 'router' not in variables['params']
