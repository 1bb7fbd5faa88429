"""Router families against the NumPy references, plus their invariants."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe_jax import routing
from moe_jax.routing.plan import SlotPlan
from tests import reference

SETTINGS = settings(max_examples=15, deadline=None)
# Few distinct shapes, so that compiled routers are reused across examples.
TOKENS = st.sampled_from([1, 5, 16, 24])
EXPERTS = st.sampled_from([1, 3, 8])


@functools.cache
def jitted(router, **options):
  """A compiled router with its options bound (cached: one compile per option set and shape)."""
  return jax.jit(functools.partial(router, **options))


def random_logits(seed, t, e, scale=2.0):
  return np.asarray(jax.random.normal(jax.random.key(seed), (t, e)) * scale, np.float32)


def dense_combine(plan) -> np.ndarray:
  """[T, E] combine weights of a SlotPlan or DroplessPlan."""
  plan = plan.to_slot_plan()
  out = np.zeros((plan.num_tokens + 1, plan.num_experts))
  token, weight = np.asarray(plan.slot_token), np.asarray(plan.slot_weight)
  for e in range(plan.num_experts):
    for c in range(plan.capacity):
      out[token[e, c], e] += weight[e, c]
  return out[:-1]


def check_slot_plan_invariants(plan: SlotPlan, max_per_token: int):
  token = np.asarray(plan.slot_token)
  weight = np.asarray(plan.slot_weight)
  occupied = token < plan.num_tokens
  assert token.shape[1] == plan.capacity  # capacity never exceeded: buffers are [E, C]
  assert np.all(weight >= 0)
  assert np.all(weight[~occupied] == 0)
  for e in range(plan.num_experts):  # a token sits at most once in an expert
    assert len(set(token[e][occupied[e]])) == occupied[e].sum()
  counts = np.bincount(token[occupied], minlength=plan.num_tokens)
  assert counts.max(initial=0) <= max_per_token


@SETTINGS
@given(seed=st.integers(0, 2**16), t=TOKENS, e=EXPERTS, k=st.integers(1, 2),
       cf=st.sampled_from([0.5, 1.25, 2.0]),
       priority=st.sampled_from(['choice', 'token', 'batch']))
def test_token_choice_matches_reference(seed, t, e, k, cf, priority):
  k = min(k, e)
  if reference.capacity(t, e, cf, k) < 1:
    with pytest.raises(ValueError, match='capacity_factor'):
      routing.token_choice(jnp.zeros((t, e)), k=k, capacity_factor=cf)
    return
  logits = random_logits(seed, t, e)
  out = jitted(routing.token_choice, k=k, capacity_factor=cf, priority=priority)(logits)
  check_slot_plan_invariants(out.plan, max_per_token=k)
  assert out.plan.max_per_token == k  # the bound the 'blocked' combine gathers by
  expected = reference.token_choice(logits, k, cf, priority)
  np.testing.assert_allclose(dense_combine(out.plan), expected, atol=1e-6)
  kept = (expected > 0).sum(1)
  np.testing.assert_allclose(out.metrics['fraction_dropped'], np.mean(kept == 0), atol=1e-6)
  np.testing.assert_allclose(out.metrics['assignments_dropped'], 1 - kept.sum() / (t * k),
                             atol=1e-6)
  # Combine weights: non-negative, and each token's kept weights sum to at most 1.
  assert np.all(dense_combine(out.plan).sum(1) <= 1 + 1e-6)


def test_switch_weight_is_router_probability():
  logits = random_logits(0, 16, 4)
  out = routing.token_choice(jnp.asarray(logits), k=1, capacity_factor=4.0)
  combine = dense_combine(out.plan)
  probs = reference.softmax(logits)
  np.testing.assert_allclose(combine.max(1), probs.max(1), rtol=1e-5)  # no drops at cf=4


def test_top2_weights_renormalized_when_nothing_dropped():
  out = routing.token_choice(jnp.asarray(random_logits(1, 32, 8)), k=2, capacity_factor=8.0)
  np.testing.assert_allclose(dense_combine(out.plan).sum(1), 1.0, rtol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**16), t=TOKENS, e=EXPERTS, k=st.integers(1, 2))
def test_dropless_keeps_every_assignment(seed, t, e, k):
  k = min(k, e)
  logits = random_logits(seed, t, e)
  out = jitted(routing.token_choice, k=k, capacity_factor=None)(logits)
  np.testing.assert_allclose(dense_combine(out.plan), reference.token_choice(logits, k, None),
                             atol=1e-6)
  assert float(out.metrics['fraction_dropped']) == 0.0
  np.testing.assert_allclose(out.plan.expert_load().sum(), t * k)


def test_batch_prioritized_routing_keeps_confident_tokens():
  # Tokens 0..7 all prefer expert 0; capacity 1 (cf=0.5, E=4, T=8): only the most confident stays.
  logits = np.zeros((8, 4), np.float32)
  logits[:, 0] = np.arange(8)  # token 7 is the most confident
  out = routing.token_choice(jnp.asarray(logits), k=1, capacity_factor=0.5, priority='batch')
  assert int(out.plan.slot_token[0, 0]) == 7
  out = routing.token_choice(jnp.asarray(logits), k=1, capacity_factor=0.5, priority='choice')
  assert int(out.plan.slot_token[0, 0]) == 0


@pytest.mark.parametrize('k', [1, 2])
def test_token_priority_is_causal(k):
  """With priority='token', a later token can never change an earlier token's routing."""
  logits = random_logits(3, 16, 4)
  changed = logits.copy()
  changed[8:] = random_logits(4, 8, 4, scale=5.0)
  plans = [routing.token_choice(jnp.asarray(l), k=k, capacity_factor=1.0, priority='token').plan
           for l in (logits, changed)]
  np.testing.assert_array_equal(dense_combine(plans[0])[:8], dense_combine(plans[1])[:8])


@SETTINGS
@given(seed=st.integers(0, 2**16), t=TOKENS, e=EXPERTS, cf=st.sampled_from([0.5, 2.0]))
def test_expert_choice_matches_reference_and_is_balanced(seed, t, e, cf):
  cap = reference.capacity(t, e, cf)
  if cap < 1 or cap > t:
    with pytest.raises(ValueError, match='capacity_factor'):
      routing.expert_choice(jnp.zeros((t, e)), capacity_factor=cf)
    return
  logits = random_logits(seed, t, e)
  out = jitted(routing.expert_choice, capacity_factor=cf)(logits)
  check_slot_plan_invariants(out.plan, max_per_token=e)
  assert out.plan.max_per_token is None  # a token may sit in every expert
  np.testing.assert_allclose(dense_combine(out.plan), reference.expert_choice(logits, cf),
                             atol=1e-6)
  np.testing.assert_array_equal(out.plan.expert_load(), np.full(e, cap))  # exactly balanced
  assert float(out.metrics['max_over_mean_load']) == 1.0


@SETTINGS
@given(seed=st.integers(0, 2**16), t=TOKENS, e=EXPERTS, s=st.sampled_from([1, 2]))
def test_soft_routing_rows_and_columns_normalized(seed, t, e, s):
  logits = random_logits(seed, t, e * s, scale=3.0).reshape(t, e, s)
  plan = jitted(routing.soft_routing)(logits).plan
  np.testing.assert_allclose(plan.dispatch.sum(0), 1.0, rtol=1e-5)  # each slot: mix of tokens
  np.testing.assert_allclose(plan.combine.sum((1, 2)), 1.0, rtol=1e-5)  # each token: mix of slots
  assert np.all(np.asarray(plan.dispatch) >= 0) and np.all(np.asarray(plan.combine) >= 0)
  np.testing.assert_allclose(plan.expert_load(), np.full(e, s), rtol=1e-5)  # mass conservation


def test_sigmoid_bias_changes_selection_not_weights():
  logits = jnp.asarray(random_logits(5, 32, 8))
  bias = jnp.zeros(8).at[3].set(10.0)  # expert 3 always chosen
  plain = routing.token_choice(logits, k=2, capacity_factor=None, score='sigmoid')
  biased = routing.token_choice(logits, k=2, capacity_factor=None, score='sigmoid',
                                selection_bias=bias)
  assert np.all(np.any(np.asarray(biased.plan.expert_index) == 3, axis=1))
  scores = jax.nn.sigmoid(logits)
  chosen = jnp.take_along_axis(scores, biased.plan.expert_index, axis=1)
  np.testing.assert_allclose(biased.plan.weight, chosen / chosen.sum(1, keepdims=True), rtol=1e-6)
  assert not np.array_equal(plain.plan.expert_index, biased.plan.expert_index)


def test_bias_update_sign_rule_balances_load():
  logits = jnp.asarray(random_logits(6, 256, 8)) + 0.5 * jnp.arange(8.0)  # skewed to high experts
  route = jitted(routing.token_choice, k=2, capacity_factor=None, score='sigmoid')
  bias, imbalance = jnp.zeros(8), []
  for _ in range(300):
    load = route(logits, selection_bias=bias).metrics['tokens_per_expert']
    imbalance.append(float(routing.load_imbalance(load)))
    new_bias = routing.update_bias(bias, load, rate=0.01)
    np.testing.assert_allclose(new_bias - bias, 0.01 * np.sign(load.mean() - load), atol=1e-6)
    bias = new_bias
  assert imbalance[0] > 2.0  # max/mean load before balancing
  assert np.mean(imbalance[-50:]) < 0.6 * imbalance[0]


def test_load_balancing_loss_values():
  uniform = jnp.full((8, 4), 0.25)
  balanced = jnp.arange(8)[:, None] % 4
  np.testing.assert_allclose(routing.load_balancing_loss(uniform, balanced), 1.0, rtol=1e-6)
  peaked = jax.nn.one_hot(jnp.zeros(8, int), 4)
  np.testing.assert_allclose(routing.load_balancing_loss(peaked, jnp.zeros((8, 1), int)), 4.0)


def test_z_loss_value():
  logits = jnp.log(jnp.full((3, 4), 0.5))  # logsumexp = log(2)
  np.testing.assert_allclose(routing.z_loss(logits), np.log(2.0) ** 2, rtol=1e-6)


def test_noisy_top_k_needs_rng_and_changes_choices():
  logits = jnp.zeros((64, 8))
  with pytest.raises(ValueError, match='rng'):
    routing.token_choice(logits, k=1, capacity_factor=None, noise_std=1.0)
  out = routing.token_choice(logits, k=1, capacity_factor=None, noise_std=1.0,
                             rng=jax.random.key(0))
  assert len(np.unique(np.asarray(out.plan.expert_index))) > 1


def test_capacity_rounding_to_zero_names_the_field():
  with pytest.raises(ValueError, match=r'capacity_factor=0.1 .* 0 slots'):
    routing.expert_capacity(4, 16, 0.1)
  with pytest.raises(ValueError, match='capacity_factor must be > 0'):
    routing.expert_capacity(4, 16, 0.0)
  with pytest.raises(ValueError, match='k must be'):
    routing.token_choice(jnp.zeros((4, 2)), k=3, capacity_factor=1.0)
