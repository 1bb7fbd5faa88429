"""Memory features for paper-scale training: per-block rematerialization (`config.model.remat`),
bf16 compute on float32 weights and optimizer state, gradient accumulation
(`config.train.microbatches`) and the executor that `config.moe.dispatch='auto'` picks per backend.

Each checks that the feature computes what the plain run does, on a tiny MoE LM (d_model 32, 2
blocks, 8 sequences of 16 bytes) with random tokens: no data set is read.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_tiny
from moe_jax.moe import dispatch
from moe_jax.moe.spec import MoESpec, resolve_dispatch
from moe_jax.run import run_dir, train


def tiny(**moe):
  """lm_tiny shrunk; block 1 holds the MoE layer: dropless top-2 of 4 experts, each sequence
  routed on its own, with auxiliary-loss-free balancing (its bias is model state)."""
  config = lm_tiny.get_config()
  config.data.update(seq_len=16, batch_size=8)
  config.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_every=2)
  config.moe.update(**{**dict(num_experts=4, d_ff=32, k=2, capacity_factor=None,
                              group_by='sequence', score='sigmoid', bias_update_rate=0.01), **moe})
  config.train.update(steps=10, warmup_steps=1, progress=False)
  return config


def batch(config, seed=0):
  shape = (config.data.batch_size, config.data.seq_len + 1)
  return jax.random.randint(jax.random.key(seed), shape, 0, 256, jnp.int32)


def close(a, b, atol=2e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=atol), a, b)


def test_remat_keeps_loss_and_gradients():
  """Loss and gradients (router bias update included) with every block rematerialized, in full
  and by a policy, equal those without remat to float32 round-off."""
  config = tiny()
  tokens = batch(config)
  task, _, model, _ = train.check_config(config)
  variables = jax.jit(model.init)({'params': jax.random.key(0)}, tokens[:, :-1])
  results = []
  for remat in ('none', 'full', 'dots_with_no_batch_dims_saveable'):
    config.model.remat = remat
    model = task.build(config)

    def loss(params, model=model):
      (logits, aux), state = model.apply({**variables, 'params': params}, tokens[:, :-1],
                                         train=True, mutable=['router_bias'])
      return task.loss(logits, tokens)[0] + aux['loss'], state

    results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params']))
  for other in results[1:]:
    close(results[0], other)


def test_remat_is_checked():
  config = tiny()
  config.model.remat = 'some'
  with pytest.raises(ValueError, match=r"config\.model\.remat='some' is invalid: choose one of "
                                       r"\('none', 'full', .*'nothing_saveable'"):
    train.check_config(config)


def test_bf16_computes_on_float32_weights_and_optimizer_state():
  """dtype='bfloat16': the blocks compute in bf16, parameters and AdamW moments stay float32."""
  config = tiny()
  config.model.dtype = 'bfloat16'
  task, cfg, model, _ = train.check_config(config)
  inputs = task.input_spec(config)
  state = jax.eval_shape(lambda key: train.init_state(model, cfg, key, inputs),
                         jax.random.key(0))
  floats = [leaf.dtype for leaf in jax.tree.leaves(state)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert len(floats) > 3 * len(jax.tree.leaves(state['params'])) and set(floats) == {jnp.dtype(jnp.float32)}
  _, seen = jax.eval_shape(
      lambda variables, x: model.apply(variables, x, capture_intermediates=True,
                                       mutable=['intermediates']),
      {'params': state['params'], **state['model_state']}, inputs)
  hidden = seen['intermediates']['final_norm']['__call__'][0]
  experts = seen['intermediates']['block_1']['moe']['experts']['__call__'][0]
  assert hidden.dtype == experts.dtype == jnp.bfloat16


def test_step_memory_is_xlas_analysis_or_none_where_the_backend_gives_none(monkeypatch):
  config = tiny()
  task, cfg, model, _ = train.check_config(config)
  state = train.init_state(model, cfg, jax.random.key(0), task.input_spec(config))
  args, statics = (state, batch(config), jax.random.key(1)), dict(task=task, model=model, cfg=cfg)
  memory = train.step_memory(*args, **statics)
  assert memory['argument'] >= sum(leaf.nbytes for leaf in jax.tree.leaves(state)), memory
  assert memory['total'] == memory['argument'] + memory['output'] - memory['alias'] + memory[
      'temp'], memory
  monkeypatch.setattr(jax.stages.Compiled, 'memory_analysis', lambda self: None)
  assert train.step_memory(*args, **statics) is None


def test_microbatches_equal_one_batch():
  """Two steps with the batch in 1, 2 or 4 microbatches: the same losses, gradient norms,
  parameters, AdamW moments and auxiliary-loss-free router bias, to float32 round-off."""
  config = tiny()
  task, cfg, model, _ = train.check_config(config)
  inputs = task.input_spec(config)
  start = train.init_state(model, cfg, jax.random.key(0), inputs)
  runs = []
  for k in (1, 2, 4):
    micro, steps = dataclasses.replace(cfg, microbatches=k), []
    state = jax.tree.map(jnp.copy, start)  # train_step donates the state it takes
    for step in range(2):
      state, m = train.train_step(state, batch(config, step), jax.random.key(step), task=task,
                                  model=model, cfg=micro)
      steps.append({name: m[name] for name in ('train_loss', 'aux_loss', 'grad_norm')}
                   | {'load': m['layers']['block_1']['tokens_per_expert'],
                       'state': jax.device_get(state)})  # the next step donates it
    runs.append(steps)
  assert np.all(np.abs(runs[0][0]['state']['model_state']['router_bias']['block_1']['moe']['bias'])
                == 0.01)  # one update of the bias at rate 0.01 from the first batch's load
  for other in runs[1:]:
    close(runs[0], other)


def test_microbatches_must_divide_the_batch():
  config = tiny()
  config.train.microbatches = 3
  with pytest.raises(ValueError, match=r'config\.train\.microbatches=3 is invalid: it must '
                                       r'divide config\.data\.batch_size=8'):
    train.check_config(config)


def test_run_directories_written_before_the_new_fields_resume(tmp_path):
  """A config.json without model.remat and train.microbatches holds their defaults."""
  config = tiny()
  old = config.to_dict()
  del old['model']['remat'], old['train']['microbatches']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  assert run_dir.write_config(config, tmp_path, added=train.ADDED_FIELDS) is not None
  config.train.microbatches = 2
  with pytest.raises(ValueError, match=r'train\.microbatches: 1 in config\.json, 2 now'):
    run_dir.write_config(config, tmp_path, added=train.ADDED_FIELDS)


@pytest.mark.parametrize('backend,capacity_factor,dtype,executor', [
    ('gpu', None, jnp.bfloat16, 'blocked'),
    ('gpu', 1.25, jnp.bfloat16, 'blocked'),
    ('gpu', None, jnp.float32, 'gather'),
    ('tpu', None, jnp.bfloat16, 'ragged'),
    ('tpu', 1.25, jnp.bfloat16, 'gather'),
    ('cpu', None, jnp.bfloat16, 'gather'),
    ('cpu', 1.25, jnp.float32, 'gather'),
])
def test_auto_dispatch_picks_the_backends_executor(backend, capacity_factor, dtype, executor):
  spec = MoESpec(dispatch='auto', k=2, capacity_factor=capacity_factor)
  assert resolve_dispatch(spec, backend, dtype) == executor
  assert resolve_dispatch(spec.replace(dispatch='einsum'), backend, dtype) == 'einsum'
  assert executor in dispatch.EXECUTORS


@pytest.mark.parametrize('backend,executor', [('gpu', 'blocked'), ('tpu', 'ragged'),
                                              ('cpu', 'gather')])
def test_auto_dispatch_is_resolved_when_the_layer_is_traced(monkeypatch, backend, executor):
  """The MoE layer of a dropless bf16 LM with dispatch='auto' runs the executor of the backend
  that `jax.default_backend()` names while it is traced (forced here; traced only, not run)."""
  config = tiny(dispatch='auto')
  config.model.update(dtype='bfloat16', attention='xla')  # (cuDNN's attention: a real GPU)
  task, _, model, _ = train.check_config(config)
  used = []
  moe_apply = dispatch.moe_apply
  monkeypatch.setattr(dispatch, 'moe_apply', lambda plan, x, experts, name, **options: (
      used.append(name) or moe_apply(plan, x, experts, name, **options)))
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  jax.eval_shape(model.init, jax.random.key(0), task.input_spec(config))
  assert used == [executor]
