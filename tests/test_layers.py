"""The MoE layer end to end against the NumPy reference; causality, gradients, config errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe.layer import MoELayer
from moe_jax.moe.spec import MoESpec
from tests import reference

B, L, D = 4, 8, 16
SPECS = {
    'switch': MoESpec(num_experts=4, d_ff=32, k=1, capacity_factor=1.0),
    'top2_bpr': MoESpec(num_experts=4, d_ff=32, k=2, capacity_factor=0.75, priority='batch'),
    'dropless_ragged': MoESpec(num_experts=4, d_ff=32, k=2, capacity_factor=None,
                               dispatch='ragged'),
    'expert_choice': MoESpec(router='expert_choice', num_experts=4, d_ff=32,
                             capacity_factor=1.0, group_by='position'),
    'soft': MoESpec(router='soft', num_experts=4, d_ff=32, slots_per_expert=2,
                    group_by='position'),
    'fine_grained_shared': MoESpec(num_experts=8, d_ff=8, k=4, capacity_factor=1.0,
                                   num_shared_experts=2, dispatch='einsum'),
    'top2_blocked': MoESpec(num_experts=4, d_ff=32, k=2, capacity_factor=0.75,
                            dispatch='blocked'),
    'aux_free': MoESpec(num_experts=4, d_ff=32, k=2, capacity_factor=None, score='sigmoid',
                        bias_update_rate=0.01),
}


def init(spec, x, seed=0):
  return jax.jit(MoELayer(spec).init)(jax.random.key(seed), x)


def apply(spec, variables, x, **kwargs):
  """MoELayer(spec).apply(variables, x, **kwargs), jitted: run eagerly, the layer executes op by
  op, each op compiled on its own (the file took 200 s on CI's CPU that way)."""
  return jax.jit(functools.partial(MoELayer(spec).apply, **kwargs))(variables, x)


def silu(v):
  return v / (1 + np.exp(-v))


def reference_layer(spec, variables, x):
  """Loops over groups and tokens with the reference routers."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  w = p['experts']
  fns = [lambda v, e=e: ((v @ w['w_in'][e]) * silu(v @ w['w_gate'][e])) @ w['w_out'][e]
         for e in range(spec.num_experts)]
  x = np.asarray(x, np.float64)
  groups = {'sequence': x, 'position': x.transpose(1, 0, 2), 'batch': x.reshape(1, -1, D)}[
      'batch' if spec.dispatch == 'ragged' else spec.group_by]
  outs = []
  for g in groups:
    kernel = p['router']['kernel']
    if spec.router == 'soft':
      xn = g / np.sqrt((g * g).sum(-1, keepdims=True) + 1e-6)
      kn = p['router']['scale'] * kernel / np.sqrt((kernel * kernel).sum(0) + 1e-6)
      logits = (xn @ kn).reshape(len(g), spec.num_experts, spec.slots_per_expert)
      outs.append(reference.soft_moe_output(g, logits, fns))
      continue
    logits = g @ kernel
    if spec.router == 'expert_choice':
      combine = reference.expert_choice(logits, spec.capacity_factor)
    elif spec.score == 'sigmoid':  # aux-free, bias still 0 at init: top-k of sigmoid, renormalized
      scores = 1 / (1 + np.exp(-logits))
      combine = np.zeros_like(scores)
      for i, row in enumerate(scores):
        top = np.argsort(-row, kind='stable')[:spec.k]
        combine[i, top] = row[top] / row[top].sum()
    else:
      combine = reference.token_choice(logits, spec.k, spec.capacity_factor, spec.priority)
    out = reference.moe_output(g, combine, fns)
    if spec.num_shared_experts:
      s = p['shared_experts']
      out = out + ((g @ s['w_in']) * silu(g @ s['w_gate'])) @ s['w_out']
    outs.append(out)
  y = np.stack(outs)
  return y.transpose(1, 0, 2) if spec.group_by == 'position' else y.reshape(B, L, D)


@pytest.mark.parametrize('name', list(SPECS))
def test_layer_matches_reference(name):
  spec = SPECS[name]
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  variables = init(spec, x)
  y, aux = apply(spec, variables, x)
  np.testing.assert_allclose(y, reference_layer(spec, variables, x), atol=2e-5)
  assert set(aux['metrics']) >= {'tokens_per_expert', 'fraction_dropped', 'router_entropy',
                                 'max_over_mean_load', 'assignments_dropped'}
  assert aux['metrics']['tokens_per_expert'].shape == (spec.num_experts,)

  grads = jax.jit(jax.grad(lambda v, x: jnp.sum(MoELayer(spec).apply(v, x)[0] ** 2)
                           + MoELayer(spec).apply(v, x)[1]['loss'], argnums=(0, 1)))(variables, x)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
  assert np.abs(np.asarray(grads[0]['params']['router']['kernel'])).sum() > 0


def test_dropped_tokens_get_zero_output():
  spec = MoESpec(num_experts=4, d_ff=32, k=1, capacity_factor=0.25)  # capacity 0.5 -> 1 of 8
  x = jax.random.normal(jax.random.key(2), (B, L, D))
  y, aux = apply(spec, init(spec, x), x)
  routed = np.abs(np.asarray(y)).sum(-1) > 0  # [B, L]
  assert 0 < routed.sum() <= B * 4  # at most one token per expert per sequence
  np.testing.assert_allclose(aux['metrics']['fraction_dropped'], 1 - routed.mean(), atol=1e-6)


@pytest.mark.parametrize('name', ['switch', 'expert_choice', 'soft'])
def test_causal_variants_never_see_future_tokens(name):
  spec = SPECS[name]
  if name == 'switch':
    spec = spec.replace(k=2, priority='token')
  x = jax.random.normal(jax.random.key(3), (B, L, D))
  variables = init(spec, x)
  changed = x.at[:, L // 2:].set(jax.random.normal(jax.random.key(4), (B, L - L // 2, D)) * 3)
  y0, _ = apply(spec, variables, x)
  y1, _ = apply(spec, variables, changed)
  np.testing.assert_allclose(y0[:, :L // 2], y1[:, :L // 2], atol=1e-6)
  assert not np.allclose(y0[:, L // 2:], y1[:, L // 2:])


def test_non_causal_soft_grouping_sees_future_tokens():
  """The caveat the 'position' grouping exists for: sequence groups mix the future in."""
  spec = SPECS['soft'].replace(group_by='sequence')
  x = jax.random.normal(jax.random.key(3), (B, L, D))
  variables = init(spec, x)
  y0, _ = apply(spec, variables, x)
  y1, _ = apply(spec, variables, x.at[:, -1].set(5.0))
  assert not np.allclose(y0[:, 0], y1[:, 0])


def test_aux_free_bias_updates_only_in_training():
  spec = SPECS['aux_free']
  x = jax.random.normal(jax.random.key(5), (B, L, D)) + 1.0
  variables = init(spec, x)
  np.testing.assert_array_equal(variables['router_bias']['bias'], np.zeros(4))
  (_, aux), state = apply(spec, variables, x, train=True, mutable=['router_bias'])
  load = np.asarray(aux['metrics']['tokens_per_expert'])
  np.testing.assert_allclose(state['router_bias']['bias'], 0.01 * np.sign(load.mean() - load))
  _, state = apply(spec, variables, x, train=False, mutable=['router_bias'])
  np.testing.assert_array_equal(state['router_bias']['bias'], np.zeros(4))


def test_jitter_and_noise_use_the_router_rng():
  spec = SPECS['switch'].replace(jitter=0.1, noise_std=1.0)
  x = jax.random.normal(jax.random.key(6), (B, L, D))
  variables = init(spec, x)
  outs = [apply(spec, variables, x, train=True, rngs={'router': jax.random.key(i)})[0]
          for i in (0, 0, 1)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.allclose(outs[0], outs[2])
  y_eval, _ = apply(spec, variables, x)  # no noise, no rng needed at eval
  y_plain, _ = apply(SPECS['switch'], variables, x)
  np.testing.assert_array_equal(y_eval, y_plain)


@pytest.mark.parametrize('fields, message', [
    (dict(router='switch'), r"config.moe.router='switch' is invalid"),
    (dict(k=9), r'config.moe.k=9 is invalid: choose 1 <= k <= num_experts=8'),
    (dict(router='expert_choice', capacity_factor=None), r'config.moe.capacity_factor=None'),
    (dict(dispatch='ragged'), r"config.moe.dispatch='ragged' is invalid: ragged dispatch runs "
                              r'dropless'),
    (dict(bias_update_rate=0.1), r"needs router='token_choice' and score='sigmoid'"),
    (dict(num_experts=0), r'config.moe.num_experts=0 is invalid'),
    (dict(capacity_factor=-1.0), r'config.moe.capacity_factor=-1.0 is invalid'),
])
def test_bad_spec_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    MoESpec(**fields)


def test_unknown_config_field_is_named():
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_expert'\]"):
    MoESpec.from_config({'num_expert': 4})


def test_capacity_rounding_to_zero_fails_before_compiling():
  spec = MoESpec(num_experts=64, d_ff=8, k=1, capacity_factor=0.1)
  x = jnp.zeros((2, 8, D))
  with pytest.raises(ValueError, match='capacity_factor=0.1 gives an expert capacity'):
    MoELayer(spec).init(jax.random.key(0), x)
