"""Router quantities worked out by hand: the arithmetic is in the comments, beside the property tests
of tests/test_routing.py. Logits are log-probabilities, so that softmax(logits) = probs exactly."""
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing

#  4 tokens, 2 experts: token t's router probabilities.
PROBS = np.array([[0.9, 0.1],
                  [0.6, 0.4],
                  [0.3, 0.7],
                  [0.8, 0.2]], np.float32)


def test_load_balancing_loss_top1():
  # Top-1 choices: experts [0, 0, 1, 0].
  # f_e, fraction of assignments: f_0 = 3/4, f_1 = 1/4.
  # P_e, mean probability:        P_0 = (0.9 + 0.6 + 0.3 + 0.8) / 4 = 0.65, P_1 = 0.35.
  # loss = E * sum_e f_e * P_e = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 2 * (0.4875 + 0.0875) = 1.15.
  out = routing.token_choice(jnp.log(PROBS), k=1, capacity_factor=None)
  np.testing.assert_array_equal(out.plan.expert_index[:, 0], [0, 0, 1, 0])
  np.testing.assert_allclose(out.losses['load_balancing'], 1.15, rtol=1e-6)


def test_load_balancing_loss_top2():
  # 2 tokens, 3 experts, k = 2; choices t0 -> (0, 1), t1 -> (1, 2).
  # f counts all T * k = 4 assignments: f = [1, 2, 1] / 4 = [0.25, 0.5, 0.25].
  # P = mean over tokens = [(0.5 + 0.1) / 2, (0.3 + 0.6) / 2, (0.2 + 0.3) / 2] = [0.3, 0.45, 0.25].
  # loss = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25) = 3 * (0.075 + 0.225 + 0.0625) = 1.0875.
  probs = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
  loss = routing.load_balancing_loss(probs, jnp.array([[0, 1], [1, 2]]))
  np.testing.assert_allclose(loss, 1.0875, rtol=1e-6)


def test_z_loss():
  # logsumexp([0, 0]) = log(1 + 1) = log 2;  logsumexp([log 3, 0]) = log(3 + 1) = 2 log 2.
  # z = mean of the squares = ((log 2)^2 + 4 (log 2)^2) / 2 = 2.5 (log 2)^2 = 1.2011325...
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])
  np.testing.assert_allclose(routing.z_loss(logits), 2.5 * np.log(2.0) ** 2, rtol=1e-6)


@pytest.mark.parametrize('tokens, experts, factor, k, capacity', [
    (8, 4, 1.0, 1, 2),    # 1 * 8 * 1.0 / 4 = 2
    (8, 4, 1.25, 1, 3),   # 8 * 1.25 / 4 = 2.5: halves round up (Python's round(2.5) would give 2)
    (5, 4, 1.0, 1, 1),    # 1.25 -> 1
    (7, 4, 1.0, 1, 2),    # 1.75 -> 2
    (8, 4, 1.0, 2, 4),    # k counts: 2 * 8 * 1.0 / 4 = 4
    (24, 8, 0.75, 2, 5),  # 2 * 24 * 0.75 / 8 = 4.5 -> 5
])
def test_capacity_rounding(tokens, experts, factor, k, capacity):
  assert routing.expert_capacity(tokens, experts, factor, k) == capacity


def test_capacity_rounding_to_zero_says_the_least_factor():
  # 1 * 4 * 0.1 / 16 = 0.025 rounds to 0 slots. round(x) >= 1 needs x >= 0.5, so
  # capacity_factor >= 0.5 * E / (k * T) = 0.5 * 16 / 4 = 2.
  with pytest.raises(ValueError, match=r'round\(0.025\) = 0 slots .* at least 2,'):
    routing.expert_capacity(4, 16, 0.1)


def test_expert_choice_capacity_and_slots():
  # C = round(T * capacity_factor / E) = round(4 * 1.0 / 2) = 2 tokens per expert.
  # Expert 0's column of PROBS is [0.9, 0.6, 0.3, 0.8]: its top 2 are t0 (0.9), t3 (0.8).
  # Expert 1's column is           [0.1, 0.4, 0.7, 0.2]: its top 2 are t2 (0.7), t1 (0.4).
  out = routing.expert_choice(jnp.log(PROBS), capacity_factor=1.0)
  np.testing.assert_array_equal(out.plan.slot_token, [[0, 3], [2, 1]])
  np.testing.assert_allclose(out.plan.slot_weight, [[0.9, 0.8], [0.7, 0.4]], rtol=1e-6)
  # capacity_factor 2: C = round(4 * 2 / 2) = 4 = T, every expert takes every token.
  plan = routing.expert_choice(jnp.log(PROBS), capacity_factor=2.0).plan
  np.testing.assert_array_equal(np.sort(plan.slot_token, axis=1), [[0, 1, 2, 3]] * 2)
  # capacity_factor 3: C = round(4 * 3 / 2) = 6 > T = 4 tokens: no expert can fill its slots.
  with pytest.raises(ValueError, match='capacity 6 > 4 tokens'):
    routing.expert_choice(jnp.log(PROBS), capacity_factor=3.0)


# 4 tokens, 3 experts, k = 2: (first, second) choice of each token.
CHOICES = jnp.array([[0, 1],   # t0
                     [1, 0],   # t1
                     [0, 2],   # t2
                     [2, 0]])  # t3


def test_slot_positions_choice_priority():
  # 'choice' fills every first choice, in token order, then every second choice:
  #   first:  t0 -> e0 slot 0, t1 -> e1 slot 0, t2 -> e0 slot 1, t3 -> e2 slot 0
  #   second: t0 -> e1 slot 1, t1 -> e0 slot 2, t2 -> e2 slot 1, t3 -> e0 slot 3
  positions = routing.slot_positions(CHOICES, 3, 'choice')
  np.testing.assert_array_equal(positions, [[0, 1], [0, 2], [1, 1], [0, 3]])


def test_slot_positions_token_priority():
  # 'token' fills token 0's choices, then token 1's, ... (causal: no later token displaces one):
  #   t0 -> e0 slot 0, e1 slot 0;  t1 -> e1 slot 1, e0 slot 1
  #   t2 -> e0 slot 2, e2 slot 0;  t3 -> e2 slot 1, e0 slot 3
  positions = routing.slot_positions(CHOICES, 3, 'token')
  np.testing.assert_array_equal(positions, [[0, 0], [1, 1], [2, 0], [1, 3]])


@pytest.mark.parametrize('priority, slot_token', [
    # Capacity 2 drops positions >= 2. 'choice' drops t1's and t3's second choices (e0 slots 2, 3):
    ('choice', [[0, 2], [1, 0], [3, 2]]),
    # 'token' drops t2's *first* choice (e0 slot 2, taken by t1's second) and t3's second choice.
    ('token', [[0, 1], [0, 1], [2, 3]]),
])
def test_capacity_keeps_the_slots_of_the_priority(priority, slot_token):
  # Logits whose softmax top-2 are CHOICES. C = round(k * T * cf / E) = round(2 * 4 * 0.75 / 3) = 2.
  logits = jnp.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], [1.0, 0.0, 2.0]])
  plan = routing.token_choice(logits, k=2, capacity_factor=0.75, priority=priority).plan
  np.testing.assert_array_equal(plan.slot_token, slot_token)
