"""Dispatch/combine implementations compute the same function as the plain reference."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing, validate
from moe_jax.moe import dispatch, fast_dispatch, spec
from moe_jax.moe.experts import Experts
from tests import reference

T, E, D, F = 12, 4, 8, 16


def make_experts(seed=0):
  module = Experts(num_experts=E, d_model=D, d_ff=F)
  params = module.init(jax.random.key(seed), jnp.zeros((E, 1, D)), jnp.matmul)
  return module, params


def expert_fns(params):
  """Per-expert NumPy SwiGLU FFNs from the stacked weights."""
  p = jax.tree.map(np.asarray, params['params'])
  silu = lambda v: v / (1 + np.exp(-v))
  return [lambda v, e=e: ((v @ p['w_in'][e]) * silu(v @ p['w_gate'][e])) @ p['w_out'][e]
          for e in range(E)]


def one_group(tree):
  """A leading group axis G = 1 on every leaf."""
  return jax.tree.map(lambda leaf: leaf[None], tree)


@functools.partial(jax.jit, static_argnames=('module', 'impl'))  # eager would run op by op
def run(plan, x, module, params, impl):
  return dispatch.moe_apply(one_group(plan), x[None], module.bind(params), impl)[0]


ROUTERS = {  # name: (router, its NumPy reference)
    'switch': (lambda lg: routing.token_choice(lg, k=1, capacity_factor=1.0),
               lambda lg: reference.token_choice(lg, 1, 1.0)),
    'top2': (lambda lg: routing.token_choice(lg, k=2, capacity_factor=0.75),
             lambda lg: reference.token_choice(lg, 2, 0.75)),
    'dropless': (lambda lg: routing.token_choice(lg, k=2, capacity_factor=None),
                 lambda lg: reference.token_choice(lg, 2, None)),
    'expert_choice': (lambda lg: routing.expert_choice(lg, capacity_factor=1.0),
                      lambda lg: reference.expert_choice(lg, 1.0)),
}


@pytest.mark.parametrize('impl', ['einsum', 'gather'])
def test_sparse_plans_match_reference(impl):
  x = jax.random.normal(jax.random.key(1), (T, D))
  logits = jax.random.normal(jax.random.key(2), (T, E)) * 2
  module, params = make_experts()
  for name, (router, ref) in ROUTERS.items():
    plan, combine = jax.jit(router)(logits).plan, ref(np.asarray(logits))
    expected = reference.moe_output(np.asarray(x, np.float64), combine, expert_fns(params))
    np.testing.assert_allclose(run(plan, x, module, params, impl), expected, atol=1e-5,
                               err_msg=name)
    dropped = combine.sum(1) == 0
    assert np.all(np.asarray(run(plan, x, module, params, impl))[dropped] == 0), name


def test_ragged_matches_reference():
  x = jax.random.normal(jax.random.key(1), (T, D))
  logits = jax.random.normal(jax.random.key(2), (T, E)) * 2
  module, params = make_experts()
  plan = ROUTERS['dropless'][0](logits).plan
  combine = ROUTERS['dropless'][1](np.asarray(logits))
  expected = reference.moe_output(np.asarray(x, np.float64), combine, expert_fns(params))
  np.testing.assert_allclose(run(plan, x, module, params, 'ragged'), expected, atol=1e-5)


@pytest.mark.parametrize('impl', ['ragged', 'blocked'])
def test_chunks_of_dropless_tokens_match_reference(impl):
  """num_chunks runs the tokens in uneven consecutive chunks (12 tokens in 5): the same output."""
  x = jax.random.normal(jax.random.key(1), (T, D))
  logits = jax.random.normal(jax.random.key(2), (T, E)) * 2
  module, params = make_experts()
  plan = one_group(ROUTERS['dropless'][0](logits).plan)
  expected = reference.moe_output(np.asarray(x, np.float64),
                                  ROUTERS['dropless'][1](np.asarray(logits)), expert_fns(params))
  got = dispatch.moe_apply(plan, x[None], module.bind(params), impl, num_chunks=5)[0]
  np.testing.assert_allclose(got, expected, atol=1e-5)
  slots = one_group(ROUTERS['top2'][0](logits).plan)
  with pytest.raises(ValueError, match=r'num_chunks=2 splits the tokens of dropless routing'):
    dispatch.moe_apply(slots, x[None], module.bind(params), 'gather', num_chunks=2)


def test_soft_plan_matches_reference():
  x = jax.random.normal(jax.random.key(1), (T, D))
  logits = jax.random.normal(jax.random.key(3), (T, E, 2))
  module, params = make_experts()
  plan = routing.soft_routing(logits).plan
  expected = reference.soft_moe_output(np.asarray(x, np.float64), np.asarray(logits, np.float64),
                                       expert_fns(params))
  np.testing.assert_allclose(run(plan, x, module, params, 'gather'), expected, atol=1e-5)


@pytest.mark.parametrize('name', ['top2', 'dropless', 'expert_choice'])
def test_gradients_agree_across_implementations(name):
  x = jax.random.normal(jax.random.key(1), (T, D))
  logits = jax.random.normal(jax.random.key(2), (T, E)) * 2
  module, params = make_experts()
  impls = ['einsum', 'gather'] + (['ragged'] if name == 'dropless' else [])

  def loss(params, x, logits, impl):
    plan = ROUTERS[name][0](logits).plan
    return jnp.sum(run(plan, x, module, params, impl) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  grads = [grad(params, x, logits, impl) for impl in impls]
  for other in grads[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grads[0], other)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
  assert np.abs(np.asarray(grads[0][2])).sum() > 0  # the router gets a gradient


def test_bad_impl_is_named():
  plan = one_group(routing.token_choice(jnp.zeros((4, 2)), k=1, capacity_factor=1.0).plan)
  with pytest.raises(ValueError, match="impl='ragged' does not run a SlotPlan"):
    dispatch.dispatcher(plan, 'ragged')
  with pytest.raises(ValueError, match='dispatch impl must be one of'):
    dispatch.dispatcher(plan, 'magic')


def test_every_configurable_dispatch_has_dispatchers():
  assert set(dispatch.EXECUTORS) == set(spec.DISPATCHES)
  for table in dispatch.DISPATCHERS.values():
    assert 'gather' in table  # the expert-parallel fallback


def test_remaps_are_logged_once(caplog):
  """'ragged' routes one group, and expert parallelism runs a SlotPlan's 'blocked' as 'gather'
  (a DroplessPlan's rows travel by ragged all-to-all: no remap)."""
  validate.log_once.cache_clear()
  caplog.set_level(logging.INFO)

  def bind_twice(x):  # inside shard_map over an expert axis of two shards
    for _ in range(2):
      spec.MoESpec(capacity_factor=None, dispatch='ragged', group_by='position')
      slots = one_group(routing.token_choice(jnp.zeros((4, 2)), k=1, capacity_factor=1.0).plan)
      assert isinstance(dispatch.dispatcher(slots, 'blocked', expert_axis='expert').buffers,
                        dispatch.Gather)
      dropless = one_group(routing.token_choice(jnp.zeros((4, 2)), k=1,
                                                capacity_factor=None).plan)
      for executor in ('ragged', 'blocked'):
        assert isinstance(dispatch.dispatcher(dropless, executor, expert_axis='expert'),
                          fast_dispatch.BlockedExpertParallel)
    return x

  mesh = jax.make_mesh((2,), ('expert',), devices=jax.devices()[:2])
  # Jitted: eager shard_map would run the routing op by op on each device (40 s on CI's CPU).
  jax.jit(jax.shard_map(bind_twice, mesh=mesh, in_specs=jax.P(), out_specs=jax.P()))(jnp.zeros(()))
  messages = [r.getMessage() for r in caplog.records]
  assert messages == [
      "config.moe.dispatch='ragged' routes one group: group_by='position' runs as 'batch' "
      '(outputs are the same, the load-balancing loss is taken over the whole batch).',
      "config.moe.dispatch='blocked' runs as 'gather' under expert parallelism (mesh axis "
      "'expert') for a SlotPlan: its capacity buffers travel by all_to_all."]
