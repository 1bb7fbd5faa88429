"""One trainer for every task (`moe_jax.run.tasks`: the LM on text, the ViT on images).

`train(config, workdir)` trains `config.train.steps` AdamW steps (linear warmup, cosine decay,
global-norm clipping) on the task's loss plus the MoE auxiliary loss, into the run directory
`workdir` (`moe_jax.run.run_dir`: config.json, metrics.jsonl, TensorBoard events, orbax checkpoints
of {params, opt_state, model_state (router_bias)}, timing.json, summary.json).

Training restarts from the latest checkpoint and continues exactly as an uninterrupted run
would: batch i is the task's `Data.train_batch(i)`, a function of (seed, i) only (tokenized
text: read in order by `moe_jax.data.pipeline`, whose state is saved in workdir/data_state/<step>/
beside each checkpoint and restored with it), and its RNG is fold_in(key, i). Records past the
restored step are dropped first (metrics.jsonl, events).
Ctrl-C checkpoints the current step first; a non-finite loss stops the run before it is saved.
A checkpoint that does not restore (cut short, corrupted) is moved aside and the run resumes from
the one before it; one that cannot be written (a full disk) stops the run with `CheckpointNotSaved`,
the earlier ones intact. A run holds its workdir's lock (`run_dir.locked`) while it lives.

`config.mesh` = {data, fsdp, expert, tensor} (absent: all 1, one device) lays the run out on a
device mesh (`moe_jax.parallel.sharding`, `moe_jax.parallel.rules`, docs/parallelism.md): params and
optimizer state by their logical annotations (`state_shardings`), the batch over data * fsdp *
expert, the MoE layers expert-parallel under `jax.shard_map`. A run may resume on a different mesh
(config.mesh is exempt from the config.json check).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.sharding import Mesh

from moe_jax import interrupt, reproducibility, routing
from moe_jax.models import describe_ffn
from moe_jax.moe import flops
from moe_jax.parallel import rules, sharding
from moe_jax.run import run_dir, tasks, upcycling
from moe_jax.validate import Section, section_values

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`config.train` (configs/common.py `train()` builds it from these fields and defaults). Steps
  count optimizer updates; 0 for an `*_every` field means 'final only'. microbatches: gradient
  accumulation, each step's batch in that many equal microbatches (`train_step`)."""
  steps: int = 300
  learning_rate: float = 3e-3
  end_lr_fraction: float = 0.1  # cosine decays to learning_rate * end_lr_fraction
  warmup_steps: int = 30
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # 0 = no clipping
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  progress: bool = True
  microbatches: int = 1  # divides config.data.batch_size

  def __post_init__(self):
    for name in ('steps', 'log_every', 'eval_batches', 'keep_checkpoints', 'microbatches'):
      TRAIN.positive(name, getattr(self, name))
    for name in ('eval_every', 'checkpoint_every'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        TRAIN.fail(name, getattr(self, name), 'use 0 (final step only) or a positive integer')
    if not 0 <= self.warmup_steps < self.steps:
      TRAIN.fail('warmup_steps', self.warmup_steps, f'use 0 <= warmup_steps < steps={self.steps}')
    if self.learning_rate <= 0:
      TRAIN.fail('learning_rate', self.learning_rate, 'use a positive rate')
    for name in ('end_lr_fraction', 'weight_decay', 'clip_norm'):
      if getattr(self, name) < 0:
        TRAIN.fail(name, getattr(self, name), 'use a value >= 0 (clip_norm=0: no clipping)')

  @classmethod
  def from_config(cls, config) -> 'TrainConfig':
    return cls(**section_values(cls, 'train', config))


TRAIN = Section('train')


class Setup(NamedTuple):
  """An experiment config, checked (`check_config`): its task, config.train, model and mesh."""
  task: tasks.Task
  cfg: TrainConfig
  model: Any  # the task's flax model, unsharded
  mesh: Mesh


def check_config(config, mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> Setup:
  """Validates every section of an experiment config, before any work; errors name the field.
  mesh: the run's (default: `sharding.mesh_from_config`, which needs the devices it names; an
  `AbstractMesh` checks a layout without them)."""
  task = tasks.of(config)
  cfg = TrainConfig.from_config(config.train)
  model = task.build(config)
  mesh = sharding.mesh_from_config(config) if mesh is None else mesh
  batch_size, seq_len = config.data.batch_size, task.token_shape(config).seq_len
  sharding.check_mesh(model.spec, mesh, batch_size, seq_len)
  if cfg.microbatches > 1:
    shards = sharding.batch_shards(mesh)
    if batch_size % (cfg.microbatches * shards):
      TRAIN.fail('microbatches', cfg.microbatches, f'it must divide config.data.batch_size='
                 f'{batch_size} into microbatches that divide over the {shards} batch shard(s) '
                 '(data * fsdp * expert)')
    sharding.check_mesh(model.spec, mesh, batch_size // cfg.microbatches, seq_len)
  return Setup(task, cfg, model, mesh)


# --- Optimizer, state, steps -------------------------------------------------------------------


class Optimizer(NamedTuple):
  """`make_optimizer`'s optax transformation and its learning-rate schedule."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def make_optimizer(cfg: TrainConfig) -> Optimizer:
  """AdamW (weight decay on matrices only), warmup + cosine schedule, global-norm clipping first."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
      end_value=cfg.learning_rate * cfg.end_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
  return Optimizer(optax.chain(clip, optax.adamw(schedule, weight_decay=cfg.weight_decay,
                                                 mask=decay_mask)), schedule)


def init_state(model, cfg: TrainConfig, rng: jax.Array, inputs: jax.ShapeDtypeStruct,
               mesh: Mesh | None = None) -> dict:
  """{'params', 'opt_state', 'model_state'}; model_state holds the non-trainable collections.

  inputs: a batch of model inputs (`Task.input_spec`). With `mesh`, laid out by
  `state_shardings` (the values do not depend on the mesh).
  """
  return _init_state(rng, model=model, cfg=cfg, inputs=inputs, mesh=mesh)


def _boxed_state(rng, model, cfg: TrainConfig, inputs: jax.ShapeDtypeStruct) -> dict:
  """The train state; under logical axis rules (`rules.boxed_shapes`) with the params'
  `nn.LogicallyPartitioned` boxes, which optax's moments carry too."""
  variables = model.init({'params': rng, 'router': rng}, jnp.zeros(inputs.shape, inputs.dtype),
                         train=False)
  params = variables.pop('params')
  return {'params': params, 'opt_state': make_optimizer(cfg).tx.init(params),
          'model_state': dict(variables)}


@functools.lru_cache(maxsize=64)
def state_shardings(model, cfg: TrainConfig, inputs: jax.ShapeDtypeStruct, mesh: Mesh) -> dict:
  """`NamedSharding`s of the train state on `mesh`, from the params' logical annotations
  (`sharding.state_shardings`): every weight and its AdamW moments stored alike."""
  boxed = rules.boxed_shapes(functools.partial(_boxed_state, model=model, cfg=cfg, inputs=inputs),
                            jax.random.key(0))
  return sharding.state_shardings(boxed, mesh)


def abstract_state(model, cfg: TrainConfig, inputs: jax.ShapeDtypeStruct, mesh: Mesh) -> dict:
  """`init_state`'s shapes with `mesh`'s shardings: the orbax restore target on this mesh."""
  shapes = jax.eval_shape(functools.partial(init_state, model, cfg, inputs=inputs),
                          jax.random.key(0))
  return sharding.restore_target(shapes, state_shardings(model, cfg, inputs, mesh))


def _apply(model, mesh: Mesh | None, variables, inputs, *, train: bool, rngs=None):
  """model.apply(variables, inputs); on `mesh` through `sharding.shard_module`. Training, it
  returns ((logits, aux), updated router_bias collection); else (logits, aux)."""
  mutable = ['router_bias'] if train else False
  if mesh is None:
    return model.apply(variables, inputs, train=train, mutable=mutable, rngs=rngs)
  return sharding.shard_module(model, mesh, train=train, mutable=mutable,
                               seq_len=model.config.num_tokens(inputs.shape[1:]))(
                                   variables, inputs, rngs)


# Compiled functions take the task, model, TrainConfig, input spec and mesh (hashable) as static
# arguments, so runs of one config in one process (a resume, a test) reuse the compiled code.
@functools.partial(jax.jit, static_argnames=('model', 'cfg', 'inputs', 'mesh'))
def _init_state(rng, *, model, cfg: TrainConfig, inputs: jax.ShapeDtypeStruct,
                mesh: Mesh | None):
  state = _boxed_state(rng, model, cfg, inputs)  # no rules in context: plain arrays
  if mesh is None:
    return state
  return jax.lax.with_sharding_constraint(state, state_shardings(model, cfg, inputs, mesh))


def _train_step(state: dict, batch, rng: jax.Array, *, task: tasks.Task, model, cfg: TrainConfig,
                mesh: Mesh | None = None):
  """One update on a batch of `task`. Returns (new state, metrics): train_loss and train_<metric>
  for each metric of the task's loss, aux_loss, grad_norm, and the MoE layers' metrics ('layers').

  With `mesh`: state as `init_state(..., mesh)`, batch over every device; the model runs under
  `shard_map`. The loss (of the whole batch + the globally averaged aux loss) and its gradients
  are taken outside the shard_map: with group_by='sequence' they equal one device's.

  cfg.microbatches = k > 1 accumulates the gradients of k microbatches (`_accumulate`): the
  same update as one batch wherever the loss is a mean of per-group terms of equal groups.
  """

  def grad_fn(params, batch, rng):
    def loss_fn(params):
      (logits, aux), model_state = _apply(model, mesh, {'params': params, **state['model_state']},
                                          task.inputs(batch), train=True, rngs={'router': rng})
      with jax.named_scope('loss'):
        loss, metrics = task.loss(logits, batch)
      return loss + aux['loss'], (loss, metrics, aux, model_state)
    return jax.grad(loss_fn, has_aux=True)(params)

  if cfg.microbatches == 1:
    grads, (loss, extra, aux, model_state) = grad_fn(state['params'], batch, rng)
  else:
    grads, (loss, extra, aux, model_state) = _accumulate(
        grad_fn, state, batch, rng, cfg.microbatches, mesh, model.spec)
  with jax.named_scope('optimizer'):  # the scopes name the step's parts in profiles
    updates, opt_state = make_optimizer(cfg).tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
  new_state = {'params': params, 'opt_state': opt_state, 'model_state': dict(model_state)}
  if mesh is not None:
    inputs = task.inputs(batch)
    new_state = jax.lax.with_sharding_constraint(new_state, state_shardings(
        model, cfg, jax.ShapeDtypeStruct(inputs.shape, inputs.dtype), mesh))
  metrics = {'train_loss': loss, **{f'train_{name}': value for name, value in extra.items()},
             'aux_loss': aux['loss'], 'grad_norm': optax.global_norm(grads),
             'layers': aux['layers']}
  return new_state, metrics


# The state is donated: XLA writes the new state into the old one's buffers, so one state is
# live per step, not two. A caller that needs the old state after a step passes a copy (or calls
# train_step inside its own jax.jit, where the donation does not apply). A checkpoint is safe:
# orbax copies the arrays to the host before its save returns (TransferPriority.SYNCHRONOUS, its
# default), so the next step may take them.
train_step = jax.jit(_train_step, static_argnames=('task', 'model', 'cfg', 'mesh'),
                     donate_argnames='state')


def step_memory(*args, **statics) -> dict[str, int] | None:
  """XLA's memory analysis of `train_step` compiled for (args, statics) on their devices: bytes
  of its arguments, outputs, outputs aliasing donated arguments, temporaries, and their sum as
  held at once (argument + output - alias + temp); None where the backend gives no analysis. A
  call then reuses this compilation."""
  stats = train_step.lower(*args, **statics).compile().memory_analysis()
  if stats is None:
    return None
  sizes = {name: int(getattr(stats, f'{name}_size_in_bytes'))
           for name in ('argument', 'output', 'alias', 'temp')}
  return {**sizes, 'total': sizes['argument'] + sizes['output'] - sizes['alias'] + sizes['temp']}


def _accumulate(grad_fn, state: dict, batch, rng: jax.Array, k: int, mesh: Mesh | None, spec):
  """grad_fn(params, microbatch, rng) -> (grads, (loss, metrics, aux, model_state)) over k
  microbatches of batch_size / k examples (rows j, j + k, j + 2k, ...: each device's share of
  the batch splits evenly) in a `jax.lax.scan`, with their own router RNGs (split from `rng`).
  Returns the same as grad_fn of the whole batch: gradients, losses and metrics are the
  microbatches' means (tokens_per_expert: their sum).

  Equal to one batch of batch_size when every term of the loss is a mean over equal token groups
  that a microbatch holds whole: the task's loss (a mean over examples), the aux losses with
  group_by='sequence' (balance_over 'group' or 'sequence') and dropless or capacity routing, whose
  capacity is per group. group_by 'batch' / 'position' and balance_over='global' route or balance
  over a microbatch's tokens, not the batch's. Every microbatch routes with the step's router_bias,
  and the aux-loss-free bias then takes one update from the whole batch's load (the summed
  tokens_per_expert), as one batch would.
  """
  split = lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

  def body(total, xs):
    micro, key = xs
    if mesh is not None:
      micro = jax.lax.with_sharding_constraint(micro, sharding.batch_sharding(mesh))
    grads, out = grad_fn(state['params'], micro, key)
    return jax.tree.map(jnp.add, total, grads), out

  zeros = jax.tree.map(jnp.zeros_like, state['params'])
  grads, (loss, extra, aux, model_states) = jax.lax.scan(
      body, zeros, (jax.tree.map(split, batch), jax.random.split(rng, k)))
  mean = lambda tree: jax.tree.map(lambda x: x.mean(0), tree)
  layers = {block: {name: value.sum(0) if name == 'tokens_per_expert' else value.mean(0)
                    for name, value in values.items()} for block, values in aux['layers'].items()}
  model_state = dict(jax.tree.map(lambda x: x[-1], model_states))
  if 'router_bias' in model_state:  # one sign-rule update from the whole batch's load
    model_state['router_bias'] = {
        block: jax.tree.map(lambda bias, block=block: routing.update_bias(
            bias, layers[block]['tokens_per_expert'], spec.bias_update_rate), tree)
        for block, tree in state['model_state']['router_bias'].items()}
  return (jax.tree.map(lambda g: g / k, grads),
          (loss.mean(0), mean(extra), {'loss': aux['loss'].mean(0), 'layers': layers},
           model_state))


@functools.partial(jax.jit, static_argnames=('task', 'model', 'mesh'))
def eval_step(params, model_state: dict, batch, *, task: tasks.Task, model,
              mesh: Mesh | None = None) -> dict:
  """{'loss', and each metric of the task's loss} of a batch in inference mode (on `mesh` as
  `train_step`)."""
  logits, _ = _apply(model, mesh, {'params': params, **model_state}, task.inputs(batch),
                     train=False)
  loss, metrics = task.loss(logits, batch)
  return {'loss': loss, **metrics}


def held_out_means(values: list[dict], weights: list[int] | None = None) -> dict:
  """{'eval_<metric>': mean over the held-out batches} of `eval_step`'s `values`, eval_loss first:
  the plain mean, or weighted by `weights` (the examples in each batch)."""
  names = sorted(values[0], key=lambda name: name != 'loss')
  if weights is None:
    return {f'eval_{name}': float(np.mean([v[name] for v in values])) for name in names}
  means = np.average(np.asarray([[v[name] for name in names] for v in values]), axis=0,
                     weights=weights)
  return {f'eval_{name}': float(mean) for name, mean in zip(names, means)}


def _record(step: int, metrics: dict, lr: float, tokens_per_s: float) -> dict:
  """A metrics.jsonl line: step, train_loss, aux_loss, grad_norm, lr, tokens_per_s (None right
  after a call's first step) and 'moe/<block>/<metric>' per MoE layer (tokens_per_expert as a
  list). eval_loss is added on evaluation steps."""
  record = {'step': step, 'train_loss': float(metrics['train_loss']),
            'aux_loss': float(metrics['aux_loss']), 'grad_norm': float(metrics['grad_norm']),
            'lr': lr, 'tokens_per_s': tokens_per_s}
  record.update({name: float(value) for name, value in metrics.items()
                 if name.startswith('train_') and name not in record})  # e.g. train_accuracy
  for block, values in metrics['layers'].items():
    for name, value in values.items():
      value = np.asarray(value)
      record[f'moe/{block}/{name}'] = value.tolist() if value.ndim else float(value)
  return record


def describe_router(config) -> str:
  """One line naming the model's FFN layers (`models.describe_ffn`)."""
  return describe_ffn(*tasks.of(config).from_config(config))


# --- The loop ----------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training, raised after the state was checkpointed at `step` (0: before the
  first step, with nothing to resume but config.json)."""

  def __init__(self, step: int):
    super().__init__(f'interrupted at step {step}; rerun the same command to resume' if step else
                     'interrupted before the first step; rerun the same command to start the run')
    self.step = step


class CheckpointNotSaved(OSError):
  """A checkpoint could not be written (a full disk, a read-only directory); the earlier ones are
  kept."""


def _reason(error: BaseException) -> str:
  """The gist of a save or restore error, for one line: orbax's (tensorstore's) messages run to
  several lines of paths, with the operating system's error code inside; the first error of the
  chain says most."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  lines = str(error).strip().splitlines()
  line = lines[0] if lines else type(error).__name__
  return line if len(line) <= 160 else line[:160] + '...'


def _not_saved(step: int | None, workdir: pathlib.Path, error: Exception) -> CheckpointNotSaved:
  good = [s for s in run_dir.checkpoint_steps(workdir) if s != step]
  kept = (f'the last good checkpoint, step {good[-1]}, is kept' if good else
          'there is no checkpoint yet')
  return CheckpointNotSaved(
      f'could not save the checkpoint at step {step} in {workdir / "checkpoints"}: '
      f'{_reason(error)}; {kept}. Free space (or make it writable), then rerun the same command '
      'to resume.')


@jax.jit
def _leaf_sums(state) -> list[jax.Array]:
  """Per leaf, the sum of its elements' bits as unsigned integers, modulo 2**32: integer sums do
  not depend on the order of the additions, so on the mesh."""
  def bits(x):
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).sum(dtype=jnp.uint32)
  return [bits(x) for x in jax.tree.leaves(state)]


def fingerprint(state) -> str:
  """A hash of every bit of `state`, saved with each checkpoint and checked when it is restored:
  orbax reads some damaged files (bytes overwritten) without an error."""
  sums = np.asarray(jax.device_get(_leaf_sums(state)), np.uint32)
  return hashlib.sha256(sums.tobytes()).hexdigest()[:16]


class NonFiniteLoss(FloatingPointError):
  """A non-finite train loss or gradient norm stopped training; that state was not saved."""


@dataclasses.dataclass
class StepsDone:
  """What `run_steps` leaves: the final state, every metrics.jsonl record of the run, the seconds
  of this call's first (compiling) step, and the run's times over all calls."""
  state: Any
  records: list[dict]
  first_step_s: float | None
  time: run_dir.RunTime


def stability_advice(cfg: TrainConfig, z_loss_coef: float | None = None) -> str:
  """The config changes that make a diverging run more stable, from its values `cfg` and
  `z_loss_coef` (config.moe.z_loss_coef; None: a dense model, no router)."""
  knobs = [f'a lower config.train.learning_rate (now {cfg.learning_rate}, e.g. '
           f'{cfg.learning_rate / 3:.2g})']
  warmup = min(max(2 * cfg.warmup_steps, cfg.steps // 10, 1), cfg.steps - 1)
  if warmup > cfg.warmup_steps:
    knobs.append(f'a longer config.train.warmup_steps (now {cfg.warmup_steps} of {cfg.steps} '
                 f'steps, e.g. {warmup})')
  knobs.append(f'a smaller config.train.clip_norm (now {cfg.clip_norm}, e.g. '
               f'{cfg.clip_norm / 4:g})' if cfg.clip_norm > 0 else
               'config.train.clip_norm=1.0 (now 0: no clipping)')
  if z_loss_coef is not None:  # the router z-loss keeps router logits small
    knobs.append(f'a larger config.moe.z_loss_coef (now {z_loss_coef}, e.g. '
                 f'{10 * z_loss_coef if z_loss_coef > 0 else 1e-3:g}: smaller router logits)')
  return ', '.join(knobs[:-1]) + ' or ' + knobs[-1]


def _check_finite(unchecked: list[tuple], manager, workdir: pathlib.Path, advice: str) -> None:
  """Raises NonFiniteLoss at the first of `unchecked` (step, train loss, grad norm) with a
  non-finite loss or norm; `advice`: `stability_advice`."""
  for step, loss, grad_norm in jax.device_get(unchecked):
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      good = manager.latest_step()
      kept = (f'the last good checkpoint, step {good}, is kept in {workdir / "checkpoints"}'
              if good else 'there is no checkpoint yet')
      raise NonFiniteLoss(
          f'train loss {float(loss)}, gradient norm {float(grad_norm)} at step {step}: stopped '
          f'without saving that state; {kept}. The same command would resume from there and '
          f'likely meet it again: start a new --workdir with {advice}.')


def _checkpoint(manager, step: int, state, clock: run_dir.RunTime, workdir: pathlib.Path,
                save_data=None) -> None:
  """Saves `state` at `step` (asynchronously) through `manager`, and timing.json; save_data(workdir,
  step, kept_steps) first writes the input pipeline's state after `step` batches (`Data.feed`).
  Raises CheckpointNotSaved when this save, or the earlier one still being written, fails."""
  _finish_saves(manager, workdir)  # an asynchronous save's error surfaces here, or at the end
  try:
    if save_data is not None:
      save_data(workdir, step, manager.all_steps())
    manager.save(step, args=ocp.args.StandardSave(state),
                 custom_metadata={'fingerprint': fingerprint(state)})
    clock.save(workdir)
  except Exception as e:  # pylint: disable=broad-except  # orbax raises Exception, ValueError, ...
    raise _not_saved(step, workdir, e) from e


def _finish_saves(manager, workdir: pathlib.Path) -> None:
  """Waits for the save in flight; CheckpointNotSaved when it failed."""
  in_flight = manager.latest_step()  # orbax forgets a failed save's step
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _not_saved(in_flight, workdir, e) from e


def _close(manager, workdir: pathlib.Path) -> None:
  """Waits for the save in flight (CheckpointNotSaved when it failed), then closes `manager`."""
  try:
    _finish_saves(manager, workdir)
  finally:
    with contextlib.suppress(Exception):  # close() raises a failed save's error again
      manager.close()


def run_steps(state, step_fn, evaluate, *, cfg: TrainConfig, start: int, manager,
              workdir: pathlib.Path, schedule, tokens_per_step: int, call_start: float,
              name: str = 'train', z_loss_coef: float | None = None,
              save_data=None) -> StepsDone:
  """The training loop of every task: steps `state` from `start` to cfg.steps.

  step_fn(state, i) -> (state, metrics) runs optimizer step i (metrics as `train_step`'s);
  evaluate(state) -> {'eval_...': float}. Every log_every steps a `_record` goes to metrics.jsonl
  and the TensorBoard events (`run_dir.RunLog`); evaluation runs every eval_every steps and at the
  end; the state is checkpointed through `manager` (with timing.json, `run_dir.RunTime`;
  call_start: when this call started) every checkpoint_every steps and at the end, the input
  pipeline's state with it (`save_data`, see `_checkpoint`). A tqdm bar
  shows progress when cfg.progress and stderr is a terminal. Only process 0 writes files (every
  process steps, evaluates and checkpoints).

  Before a step is logged or checkpointed, the losses and gradient norms of the steps since the
  last check must be finite, else NonFiniteLoss (the bad state is not saved; its message names
  the knobs of `stability_advice`, z_loss_coef: the MoE layers', None: dense). Ctrl-C checkpoints
  the last completed step and raises `Interrupted` (within `interrupt.deferred()`: once the step in
  progress is done; a KeyboardInterrupt raised inside a step, which took that state as `train_step`
  donates it, leaves the last checkpoint as it is). A failed save raises `CheckpointNotSaved`. A
  ValueError from step_fn or evaluate comes from the model's code, not from the user's input: it
  is re-raised as a RuntimeError.
  """
  advice = stability_advice(cfg, z_loss_coef)
  run_log = run_dir.RunLog(workdir, start)
  clock = run_dir.RunTime.resume(workdir, start, call_start)
  first_step_s, last_step, last_time = None, start, time.perf_counter()
  done, unchecked = (state, start), []  # the last completed step; losses not yet checked
  bar = tqdm.tqdm(total=cfg.steps, initial=start, desc=f'train {name}', unit='step',
                  disable=not cfg.progress or not sys.stderr.isatty() or not run_dir.is_primary(),
                  dynamic_ncols=True)
  try:
    for i in range(start, cfg.steps):
      state, metrics = step_fn(state, i)
      step = i + 1
      unchecked.append((step, metrics['train_loss'], metrics['grad_norm']))
      bar.update()
      if first_step_s is None:  # compiles (unless this process already did); not timed
        jax.block_until_ready(metrics)
        first_step_s = time.perf_counter() - last_time
        last_step, last_time = step, time.perf_counter()
      final = step == cfg.steps
      evaluating = final or (cfg.eval_every and step % cfg.eval_every == 0)
      logging_step = evaluating or step % cfg.log_every == 0
      saving = final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
      if logging_step or saving:
        _check_finite(unchecked, manager, workdir, advice)
        unchecked = []
      if logging_step:
        metrics = jax.device_get(metrics)  # waits for the step
        elapsed = time.perf_counter() - last_time
        clock.train_s += elapsed
        clock.timed_steps += step - last_step
        tokens_per_s = ((step - last_step) * tokens_per_step / elapsed
                        if step > last_step else None)
        record = _record(step, metrics, float(schedule(i)), tokens_per_s)
        if evaluating:
          record.update(evaluate(state))
          log.info('step %d: train_loss %.4f, eval_loss %.4f', step, record['train_loss'],
                   record['eval_loss'])
        run_log.write(record)
        bar.set_postfix(loss=f'{record["train_loss"]:.3f}')
        last_step, last_time = step, time.perf_counter()
      if saving:
        _checkpoint(manager, step, state, clock, workdir, save_data)
      done = (state, step)
      if interrupt.requested() and not final:  # Ctrl-C (moe_jax/interrupt.py): stop, as below
        raise KeyboardInterrupt
  except KeyboardInterrupt:
    state, step = done
    if _donated(state):  # interrupted inside the step that took it: the last checkpoint stands
      log.warning('the state of step %d went into the interrupted step: the run resumes from its '
                  'last checkpoint', step)
      step = manager.latest_step() or 0
    elif step > (manager.latest_step() or 0):
      _check_finite([u for u in unchecked if u[0] <= step], manager, workdir, advice)
      _checkpoint(manager, step, state, clock, workdir, save_data)
    raise Interrupted(step) from None
  except ValueError as e:
    raise RuntimeError(f'training failed at step {i + 1}: {e}') from e
  finally:
    bar.close()
    run_log.close()
    _close(manager, workdir)
  return StepsDone(state, run_log.records, first_step_s, clock)


def _donated(state) -> bool:
  """Whether `state`'s arrays were donated to a step (`train_step`) and are gone."""
  return any(leaf.is_deleted() for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array))


def _summary(config, loop: StepsDone, *, task: tasks.Task, cfg: TrainConfig, start: int,
             tokens_per_step: int, step_memory: dict | None = None) -> dict:
  """summary.json (see `train`): the last record's losses and other train_ / eval_ metrics (e.g.
  accuracies), the model's counts, the run's throughput and times, and the software and devices it
  ran on (`reproducibility.environment`)."""
  last = loop.records[-1]
  extra = [name for name in last if name.startswith(('train_', 'eval_'))
           and name not in ('train_loss', 'eval_loss')]
  total, active = task.param_counts(config)
  return {
      'steps': cfg.steps,
      'train_loss': last['train_loss'],
      'eval_loss': last.get('eval_loss'),
      **{name: last[name] for name in extra},
      **{f'flops_{c}': task.flops_per_token(config, c) for c in flops.CONVENTIONS},
      'params_total': total,
      'params_active': active,
      'tokens_per_s': loop.time.tokens_per_s(tokens_per_step),
      'wall_s': loop.time.wall_s,
      'first_step_s': loop.first_step_s,
      'peak_memory_bytes': peak_memory_bytes(),
      'step_memory_bytes': step_memory,
      'resumed_from_step': start,
      'router': describe_router(config),
      'environment': reproducibility.environment(),
  }


def peak_memory_bytes() -> int | None:
  """The most bytes a local device has held so far in this process (`Device.memory_stats`'
  peak_bytes_in_use, the largest over the local devices), or None where the backend does not
  report it (CPU)."""
  peaks = [(device.memory_stats() or {}).get('peak_bytes_in_use') for device in jax.local_devices()]
  peaks = [peak for peak in peaks if peak is not None]
  return max(peaks) if peaks else None


MESH_FIELDS = ('mesh.data', 'mesh.fsdp', 'mesh.expert', 'mesh.tensor')  # device layout: may
# change when a run resumes
# Fields newer than some run directories: a config.json without one holds this default.
ADDED_FIELDS = {'model.remat': 'none', 'train.microbatches': 1}


def _check_held_out(data: tasks.Data, mesh: Mesh) -> None:
  """Raises ValueError when a held-out batch does not divide over the mesh's devices."""
  sizes = sorted({len(jax.tree.leaves(batch)[0]) for batch in data.eval_batches})
  shards = sharding.batch_shards(mesh)
  if any(size % shards for size in sizes):
    raise ValueError(f'held-out batches of {sizes} examples do not divide over the {shards} '
                     'batch shards of config.mesh (data * fsdp * expert): change '
                     'config.train.eval_batches so that they do.')


def _log_mesh_change(old: dict, config, spec) -> None:
  """Logs a resume on another mesh; warns where routing depends on the number of shards."""
  new = run_dir.flatten(config.to_dict())
  old_mesh, new_mesh = (tuple(flat.get(key, 1) for key in MESH_FIELDS) for flat in (old, new))
  if old_mesh == new_mesh:
    return
  log.info('resuming on mesh (data, fsdp, expert, tensor) = %s a run started on %s', new_mesh,
           old_mesh)
  shards = lambda mesh: math.prod(mesh[:3])  # data * fsdp * expert: the routing shards
  if spec is not None and shards(old_mesh) != shards(new_mesh) and (
      spec.routing_group_by != 'sequence' or spec.jitter or spec.noise_std):
    log.warning('the number of shards changes from %d to %d: with group_by=%r, dispatch=%r, '
                'jitter=%r, noise_std=%r routing is per shard, so the resumed run trains a '
                'different model (docs/parallelism.md)', shards(old_mesh), shards(new_mesh),
                spec.group_by, spec.dispatch, spec.jitter, spec.noise_std)


def train(config, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes) the run in `workdir` to config.train.steps; returns summary.json's dict:

  steps; train_loss, eval_loss (the final step's) and the task's other metrics (the ViT's
  train_accuracy, eval_accuracy); flops_active, flops_executed (forward FLOPs per token by each
  convention of moe_jax/moe/flops.py); params_total, params_active; tokens_per_s (training throughput
  over all calls, each call's first, compiling step and evaluations left out; a ViT's tokens are
  patches); wall_s (all calls); first_step_s (this call's); peak_memory_bytes (this call's most
  bytes on a device, `peak_memory_bytes`; None on CPU); step_memory_bytes (XLA's memory analysis
  of this call's train step, `step_memory`; None where the backend gives none); resumed_from_step;
  router
  (`describe_router`); environment (`reproducibility.environment`).

  Raises, before writing anything: ValueError for a bad config field, when workdir/config.json
  holds a different config, or when config.upcycle.from_workdir (relative: to the current
  directory) holds no dense run to upcycle; NotADirectoryError when workdir is a file;
  FileNotFoundError when the data set is not found; `run_dir.RunInUse` when another live run holds
  workdir. While training: `Interrupted` (Ctrl-C, after a checkpoint; at any moment of this call,
  `moe_jax.interrupt`), `NonFiniteLoss` (see `run_steps`) and `CheckpointNotSaved`.
  """
  with interrupt.deferred(), contextlib.ExitStack() as hold:
    return _train(config, workdir, hold)


def _stop_if_interrupted(step: int, manager=None) -> None:
  """Raises Interrupted(step) after Ctrl-C (`moe_jax.interrupt`), closing `manager` first."""
  if interrupt.requested():
    if manager is not None:
      manager.close()
    raise Interrupted(step)


def _saved_fingerprint(manager, step: int) -> str | None:
  """The `fingerprint` saved with checkpoint `step`; None if unreadable or absent (saved before
  checkpoints had one)."""
  try:
    return (manager.metadata(step).custom_metadata or {}).get('fingerprint')
  except Exception:  # pylint: disable=broad-except  # then the arrays alone decide
    return None


def _restore(manager, target, workdir: pathlib.Path, mesh: Mesh) -> tuple[Any, int]:
  """(state, step) of the latest checkpoint that restores onto `target`'s shardings ((None, 0) if
  none does), in one log line. One that does not restore (cut short, corrupted) is moved to
  workdir/unreadable_checkpoints/ and the one before it is tried (on one process only)."""
  bad = []
  while step := manager.latest_step():
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(target))
      saved = _saved_fingerprint(manager, step)
      if saved is not None and saved != fingerprint(state):
        raise ValueError('its arrays do not match the fingerprint saved with them: damaged bytes')
      break
    except Exception as e:  # pylint: disable=broad-except  # orbax raises Exception, ValueError
      if isinstance(e, jax.errors.JaxRuntimeError) or jax.process_count() > 1:
        raise  # the device (e.g. its memory), not the files; or processes that must agree
      aside = workdir / 'unreadable_checkpoints' / str(step)
      while aside.exists():
        aside = aside.with_name(aside.name + '+')
      aside.parent.mkdir(exist_ok=True)
      shutil.move(workdir / 'checkpoints' / str(step), aside)
      manager.reload()
      bad.append(f'checkpoints/{step} did not restore ({_reason(e)}) and was moved to {aside}')
  else:
    state = None
  if bad:
    log.warning('%s: resuming from %s', '; '.join(bad),
                f'step {step}' if step else 'the start (no checkpoint restores)')
  elif step:
    log.info('restored the checkpoint at step %d from %s onto mesh %s', step,
             workdir / 'checkpoints', dict(mesh.shape))
  return state, step or 0


def _train(config, workdir: str | os.PathLike, hold: contextlib.ExitStack) -> dict:
  call_start = time.perf_counter()
  reproducibility.configure_from(config)  # before JAX starts its backends
  task, cfg, model, mesh = check_config(config)
  dense_run = upcycling.check(config)
  workdir = run_dir.run_directory(workdir)
  data = task.load(config)
  _check_held_out(data, mesh)
  inputs = task.input_spec(config)
  dense_params = None
  if dense_run is not None and not upcycling.latest_step(workdir):  # a new run: read and map
    dense_params = upcycling.dense_params(dense_run)  # the dense weights before writing anything
    upcycling.check_params(abstract_state(model, cfg, inputs, mesh)['params'], dense_params)
  _stop_if_interrupted(0)  # nothing written yet
  hold.enter_context(run_dir.locked(workdir))  # until this call ends: no second run in workdir
  old = run_dir.write_config(config, workdir, may_differ=MESH_FIELDS, added=ADDED_FIELDS)
  if old is not None:
    _log_mesh_change(old, config, model.spec)
  finished = run_dir.finished_summary(workdir, cfg.steps)
  if finished is not None:
    log.info('%s finished all %d steps earlier: nothing to do', workdir, cfg.steps)
    return finished

  place = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
  eval_set = [place(batch) for batch in data.eval_batches]
  schedule = make_optimizer(cfg).schedule
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  manager = ocp.CheckpointManager(
      workdir / 'checkpoints',
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
  start = manager.latest_step() or 0
  feed = data.feed(sharding.batch_sharding(mesh))  # training batches, placed on the mesh
  if start:  # onto this mesh, whichever mesh wrote it
    state, start = _restore(manager, abstract_state(model, cfg, inputs, mesh), workdir, mesh)
  if start:
    feed.restore(workdir, start)  # a streamed data set: its reader's state at that step
  else:
    state = init_state(model, cfg, init_key, inputs, mesh)
    if dense_run is not None and dense_params is None:  # no checkpoint restored: start over
      dense_params = upcycling.dense_params(dense_run)
    if dense_params is not None:  # sparse upcycling: start from the dense run's weights
      params = upcycling.upcycle_params(state['params'], dense_params, init_key,
                                        config.upcycle.noise_std)
      state['params'] = jax.device_put(params, state_shardings(model, cfg, inputs, mesh)['params'])
      log.info('upcycled the dense run %s (step %d) into %s', dense_run,
               upcycling.latest_step(dense_run), workdir)
  _stop_if_interrupted(start, manager)  # after compiling the initial state or restoring one

  memory = {}  # {'step': XLA's analysis of the step (`step_memory`)}, made at the first step

  def step_fn(state, i):
    args = (state, feed.batch(i), jax.random.fold_in(train_key, i))
    statics = {'task': task, 'model': model, 'cfg': cfg, 'mesh': mesh}
    if 'step' not in memory:
      memory['step'] = step_memory(*args, **statics)
      if memory['step']:
        log.info('train step compiled; XLA memory per device, GiB: %s', ', '.join(
            f'{name} {value / 2 ** 30:.2f}' for name, value in memory['step'].items()))
    return train_step(*args, **statics)

  def evaluate(state) -> dict:
    values = [eval_step(state['params'], state['model_state'], batch, task=task, model=model,
                        mesh=mesh) for batch in eval_set]
    means = held_out_means(jax.device_get(values), data.eval_weights)
    if data.eval_bytes_per_token:  # text: nats per token -> bits per UTF-8 byte
      means['eval_bits_per_byte'] = means['eval_loss'] / (math.log(2) * data.eval_bytes_per_token)
    return means

  shape = task.token_shape(config)
  tokens_per_step = shape.batch_size * shape.seq_len
  loop = run_steps(state, step_fn, evaluate, cfg=cfg, start=start, manager=manager,
                   workdir=workdir, schedule=schedule, tokens_per_step=tokens_per_step,
                   call_start=call_start, name=workdir.name,
                   z_loss_coef=getattr(model.spec, 'z_loss_coef', None),
                   save_data=feed.save)
  return run_dir.write_summary(workdir, _summary(config, loop, task=task, cfg=cfg, start=start,
                                                 tokens_per_step=tokens_per_step,
                                                 step_memory=memory.get('step')))
