"""Training and evaluation of the MoE ViT classifier, into the LM's run-directory format.

`train(config, workdir)` trains `config.train.steps` updates of softmax cross-entropy plus the MoE
auxiliary loss, with the LM's optimizer, `TrainConfig` and run directory (`moe_jax.train`):
config.json, metrics.jsonl (with `train_accuracy`, and `eval_loss` / `eval_accuracy` on the test
split at evaluation steps), orbax checkpoints and summary.json, so `moe_jax.report` reads ViT runs
as it reads LM runs. Batch i is `image_datasets.train_batch(..., i, ...)` and its RNG
fold_in(key, i), so a restart from a checkpoint continues exactly.

  python -m moe_jax.train_vit --config configs/vit_digits.py --workdir runs/vit_digits
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from moe_jax import data, flops, image_datasets, reproducibility, sweep
from moe_jax import train as lm_train
from moe_jax.models import describe_ffn, vit


def _check_data_config(config) -> None:
  image_datasets.builder_class(config.data.name)
  value = config.data.batch_size
  if not isinstance(value, int) or value < 1:
    raise ValueError(f'config.data.batch_size={value!r} is invalid: use a positive integer.')


def check_config(config) -> tuple[lm_train.TrainConfig, vit.ViT]:
  """Validates every section of a ViT experiment config before any work; errors name the field."""
  cfg = lm_train.TrainConfig.from_config(config.train)
  _check_data_config(config)
  image_shape, num_classes = image_datasets.image_info(config.data.name)
  model = vit.build(config, num_classes)
  model.config.num_tokens(image_shape)
  return cfg, model


def _counts(config, count, **kwargs):
  model, spec = vit.from_config(config)
  image_shape, num_classes = image_datasets.image_info(config.data.name)
  return count(spec, model, image_shape, num_classes, config.data.batch_size, **kwargs)


def model_flops_per_token(config, convention: str = 'executed') -> float:
  """Forward FLOPs per token (patch) by `convention` (see `vit.vit_flops`)."""
  return _counts(config, vit.vit_flops, convention=convention)


def param_counts(config) -> tuple[int, float]:
  """(total, active per token) parameters (see `vit.vit_params`)."""
  return _counts(config, vit.vit_params)


def describe_router(config) -> str:
  """One line naming the ViT's FFN layers (`models.describe_ffn`)."""
  return describe_ffn(*vit.from_config(config))


def token_shape(config) -> flops.Shape:
  """A batch of images as the FFN layers see it: batch_size sequences of patches."""
  model, _ = vit.from_config(config)
  image_shape, _ = image_datasets.image_info(config.data.name)
  return flops.Shape(config.data.batch_size, model.num_tokens(image_shape))


TASK = sweep.Task(check_config=check_config, from_config=vit.from_config,
                  token_shape=token_shape, flops_per_token=model_flops_per_token)


def build_members(sweep_config) -> dict[str, ml_collections.ConfigDict]:
  """A ViT sweep's members, sized and checked to equal FLOPs (`sweep.build_members`)."""
  return sweep.build_members(sweep_config, TASK)


# --- Steps -------------------------------------------------------------------------------------


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, accuracy). logits [B, classes], labels [B] int."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def init_state(model: vit.ViT, cfg: lm_train.TrainConfig, rng: jax.Array, image_shape) -> dict:
  """{'params', 'opt_state', 'model_state'}, as `train.init_state`."""
  variables = _init_variables(rng, jnp.zeros((1, *image_shape), jnp.float32), model=model)
  params = variables.pop('params')
  return {'params': params, 'opt_state': lm_train.make_optimizer(cfg)[0].init(params),
          'model_state': dict(variables)}


@functools.partial(jax.jit, static_argnames='model')
def _init_variables(rng, images, *, model):
  return model.init({'params': rng, 'router': rng}, images, train=False)


@functools.partial(jax.jit, static_argnames=('model', 'cfg'))
def train_step(state: dict, images: jax.Array, labels: jax.Array, rng: jax.Array, *, model,
               cfg: lm_train.TrainConfig):
  """One update on images [B, H, W, C], labels [B]. Returns (new state, metrics)."""

  def loss_fn(params):
    (logits, aux), model_state = model.apply(
        {'params': params, **state['model_state']}, images, train=True, rngs={'router': rng},
        mutable=['router_bias'])
    loss, accuracy = classification_loss(logits, labels)
    return loss + aux['loss'], (loss, accuracy, aux, model_state)

  grads, (loss, accuracy, aux, model_state) = jax.grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = lm_train.make_optimizer(cfg)[0].update(grads, state['opt_state'],
                                                           state['params'])
  new_state = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
               'model_state': dict(model_state)}
  metrics = {'train_loss': loss, 'train_accuracy': accuracy, 'aux_loss': aux['loss'],
             'grad_norm': optax.global_norm(grads), 'layers': aux['layers']}
  return new_state, metrics


@functools.partial(jax.jit, static_argnames='model')
def eval_step(params, model_state: dict, images: jax.Array, labels: jax.Array, *, model):
  """(mean cross-entropy, accuracy) of a batch in inference mode."""
  logits, _ = model.apply({'params': params, **model_state}, images, train=False)
  return classification_loss(logits, labels)


def evaluate(state: dict, model: vit.ViT, images: np.ndarray, labels: np.ndarray,
             num_batches: int) -> tuple[float, float]:
  """(loss, accuracy) over all of images [N, H, W, C], in `num_batches` nearly equal batches."""
  parts = [eval_step(state['params'], state['model_state'], x, y, model=model)
           for x, y in zip(np.array_split(images, num_batches), np.array_split(labels, num_batches))]
  sizes = [len(y) for y in np.array_split(labels, num_batches)]
  loss, accuracy = np.average(np.asarray(jax.device_get(parts)), axis=0, weights=sizes)
  return float(loss), float(accuracy)


# --- The loop ----------------------------------------------------------------------------------


def train(config, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes) the ViT run in `workdir` to config.train.steps; returns summary.json's
  dict: the LM's fields (`moe_jax.train.train`) plus eval_accuracy and train_accuracy;
  tokens_per_s counts patch tokens. Raises as `moe_jax.train.train` does."""
  call_start = time.perf_counter()
  reproducibility.configure_from(config)  # before JAX starts its backends
  cfg, model = check_config(config)
  batch_size = config.data.batch_size
  workdir = lm_train.run_directory(workdir)
  with data.quiet_tfds():
    splits = image_datasets.load_image_splits(config.data.name, data_dir=config.data.data_dir,
                                              manual_dir=config.data.manual_dir)
  lm_train.write_config(config, workdir)

  images, labels = splits['train']
  image_shape = images.shape[1:]
  schedule = lm_train.make_optimizer(cfg)[1]
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  state = init_state(model, cfg, init_key, image_shape)
  manager = ocp.CheckpointManager(
      workdir / 'checkpoints',
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))

  def step_fn(state, i):
    x, y = image_datasets.train_batch(images, labels, i, batch_size, config.seed)
    return train_step(state, x, y, jax.random.fold_in(train_key, i), model=model, cfg=cfg)

  def evaluate_test(state) -> dict:
    loss, accuracy = evaluate(state, model, *splits['test'], cfg.eval_batches)
    return {'eval_loss': loss, 'eval_accuracy': accuracy}

  tokens_per_step = batch_size * model.config.num_tokens(image_shape)
  loop = lm_train.run_steps(state, step_fn, evaluate_test, cfg=cfg, start=start, manager=manager,
                            workdir=workdir, schedule=schedule, tokens_per_step=tokens_per_step,
                            call_start=call_start, name=workdir.name)

  return lm_train.write_summary(
      workdir, loop, cfg=cfg, start=start, tokens_per_step=tokens_per_step,
      flops_per_token=functools.partial(model_flops_per_token, config),
      params=param_counts(config), router=describe_router(config),
      extra=('train_accuracy', 'eval_accuracy'))


def main(argv=None) -> None:
  """`python -m moe_jax.train_vit --config FILE --workdir DIR [--config.<field>=<value> ...]`."""
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file('config', None, 'a ViT config file.')
  workdir = flags.DEFINE_string('workdir', None, 'the run directory.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def run(_):
    print(json.dumps(train(config_flag.value, workdir.value), indent=2))

  app.run(run, argv)


if __name__ == '__main__':
  main()
