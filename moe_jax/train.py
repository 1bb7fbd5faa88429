"""Training and evaluation of the transformer LM on byte-level text, with a run directory.

`train(config, workdir)` trains `config.train.steps` AdamW steps (linear warmup, cosine decay,
global-norm clipping) on next-byte cross-entropy plus the MoE auxiliary loss, and records:

  workdir/
    config.json      the full config; a later call with a different config is refused
    metrics.jsonl    one JSON object per logged step (see `_record`)
    events.out.tfevents.*  the same records for TensorBoard (`moe_jax.tensorboard_events`)
    checkpoints/     orbax CheckpointManager: {params, opt_state, model_state (router_bias)}
    timing.json      wall and training seconds up to the latest checkpoint (`RunTime`)
    summary.json     final losses, FLOPs and parameter counts, throughput, router description

Training restarts from the latest checkpoint and continues exactly as an uninterrupted run
would: batch i is `data.train_batch(tokens, i, ...)`, a function of (seed, i) only, and its RNG
is fold_in(key, i). Records past the restored step are dropped first (metrics.jsonl, events).
Ctrl-C checkpoints the current step first; a non-finite loss stops the run before it is saved.

`config.mesh` = {data, expert} (absent: 1x1, one device) lays the run out on a device mesh
(`moe_jax.parallel`, docs/parallelism.md): params and optimizer state by `parallel.param_shardings`,
the batch over every device, the MoE layers expert-parallel under `jax.shard_map`. A run may resume
on a different mesh (config.mesh is exempt from the config.json check).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.sharding import Mesh

from moe_jax import data, flops, parallel, reproducibility, tensorboard_events
from moe_jax.models import describe_ffn, transformer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`config.train`. Steps count optimizer updates; 0 for an `*_every` field means 'final only'."""
  steps: int = 300
  learning_rate: float = 3e-3
  end_lr_fraction: float = 0.1
  warmup_steps: int = 30
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  progress: bool = True

  def __post_init__(self):
    for name in ('steps', 'log_every', 'eval_batches', 'keep_checkpoints'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        _fail(name, getattr(self, name), 'use a positive integer')
    for name in ('eval_every', 'checkpoint_every'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        _fail(name, getattr(self, name), 'use 0 (final step only) or a positive integer')
    if not 0 <= self.warmup_steps < self.steps:
      _fail('warmup_steps', self.warmup_steps, f'use 0 <= warmup_steps < steps={self.steps}')
    if self.learning_rate <= 0:
      _fail('learning_rate', self.learning_rate, 'use a positive rate')
    for name in ('end_lr_fraction', 'weight_decay', 'clip_norm'):
      if getattr(self, name) < 0:
        _fail(name, getattr(self, name), 'use a value >= 0 (clip_norm=0: no clipping)')

  @classmethod
  def from_config(cls, config) -> 'TrainConfig':
    return cls(**transformer.section_values(cls, 'train', config))


def _fail(field: str, value, fix: str):
  raise ValueError(f'config.train.{field}={value!r} is invalid: {fix}.')


def _check_data_config(config) -> None:
  for name in ('seq_len', 'batch_size'):
    value = config.data[name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'config.data.{name}={value!r} is invalid: use a positive integer.')


# --- Run directory -----------------------------------------------------------------------------


def _config_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True) + '\n'


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


MESH_FIELDS = ('mesh.data', 'mesh.expert')  # device layout: may change when a run resumes


def is_primary() -> bool:
  """Whether this process writes the run directory's files (process 0 of a multi-process run;
  orbax coordinates the checkpoints of all processes itself)."""
  return jax.process_index() == 0


def write_config(config, workdir: pathlib.Path) -> None:
  """Writes workdir/config.json (process 0), or checks that an existing one holds the same config.

  config.mesh may differ (a resume on another mesh); config.json keeps the first call's.
  """
  path = workdir / 'config.json'
  text = _config_json(config)
  if path.exists():
    old, new = _flatten(json.loads(path.read_text())), _flatten(json.loads(text))
    diff = [f'  {key}: {old.get(key, "<absent>")!r} in {path.name}, {new.get(key, "<absent>")!r} '
            'now' for key in sorted(set(old) | set(new))
            if key not in MESH_FIELDS and old.get(key) != new.get(key)]
    if diff:
      raise ValueError(
          f'{path} holds a different config, so this is not a restart of that run:\n'
          + '\n'.join(diff) + '\nUse a new --workdir for a new run, or rerun with the config in '
          f'{path} to resume it.')
    _log_mesh_change(old, new, config)
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if is_primary():
    _write_atomic(path, text)


def _log_mesh_change(old: dict, new: dict, config) -> None:
  """Logs a resume on another mesh; warns where routing depends on the number of shards."""
  old_mesh, new_mesh = (tuple(flat.get(key, 1) for key in MESH_FIELDS) for flat in (old, new))
  if old_mesh == new_mesh:
    return
  log.info('resuming on mesh (data, expert) = %s a run started on %s', new_mesh, old_mesh)
  spec = transformer.from_config(config)[1]
  if spec is not None and math.prod(old_mesh) != math.prod(new_mesh) and (
      spec.group_by != 'sequence' or spec.dispatch == 'ragged' or spec.jitter or spec.noise_std):
    log.warning('the number of shards changes from %d to %d: with group_by=%r, dispatch=%r, '
                'jitter=%r, noise_std=%r routing is per shard, so the resumed run trains a '
                'different model (docs/parallelism.md)', math.prod(old_mesh), math.prod(new_mesh),
                spec.group_by, spec.dispatch, spec.jitter, spec.noise_std)


def _resume_metrics(path: pathlib.Path, step: int) -> list[dict]:
  """Records of metrics.jsonl up to `step` (a restored checkpoint); drops the rest from the file."""
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  records = []
  for n, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines) - 1:  # the last line, cut short by a kill
        break
      raise ValueError(f'{path}:{n + 1} is not JSON; fix or remove that line.') from None
    if record['step'] <= step:
      records.append(record)
  if is_primary():
    _write_atomic(path, ''.join(json.dumps(r) + '\n' for r in records))
  return records


# --- Model, optimizer, steps -------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (weight decay on matrices only), warmup + cosine schedule, global-norm clipping first."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
      end_value=cfg.learning_rate * cfg.end_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
  return optax.chain(clip, optax.adamw(schedule, weight_decay=cfg.weight_decay,
                                       mask=decay_mask)), schedule


def cross_entropy(logits: jax.Array, batch: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy. logits: [B, L, V] for inputs batch[:, :-1], batch: [B, L+1]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def init_state(model, cfg: TrainConfig, rng: jax.Array, batch_size: int, seq_len: int,
               mesh: Mesh | None = None) -> dict:
  """{'params', 'opt_state', 'model_state'}; model_state holds the non-trainable collections.

  With `mesh`, laid out by `parallel.param_shardings` (the values do not depend on the mesh).
  """
  return _init_state(rng, model=model, cfg=cfg, shape=(batch_size, seq_len), mesh=mesh)


def abstract_state(model, cfg: TrainConfig, batch_size: int, seq_len: int, mesh: Mesh) -> dict:
  """`init_state`'s shapes with `mesh`'s shardings: the orbax restore target on this mesh."""
  shapes = jax.eval_shape(functools.partial(init_state, model, cfg, batch_size=batch_size,
                                            seq_len=seq_len), jax.random.key(0))
  return parallel.restore_target(shapes, mesh)


def _forward(model, mesh: Mesh | None, *, train: bool):
  """apply(variables, tokens, rngs=None) of `model`; on `mesh` through `parallel.shard_module`.

  Training, it returns ((logits, aux), updated router_bias collection); else (logits, aux).
  """
  mutable = ['router_bias'] if train else False
  if mesh is None:
    return functools.partial(model.apply, train=train, mutable=mutable)
  return parallel.shard_module(model, mesh, train=train, mutable=mutable)


# Compiled functions take the model, TrainConfig and mesh (hashable) as static arguments, so
# runs of one config in one process (a resume, a test) reuse the compiled code.
@functools.partial(jax.jit, static_argnames=('model', 'cfg', 'shape', 'mesh'))
def _init_state(rng, *, model, cfg: TrainConfig, shape: tuple[int, int], mesh: Mesh | None):
  variables = model.init({'params': rng, 'router': rng}, jnp.zeros(shape, jnp.int32), train=False)
  params = variables.pop('params')
  state = {'params': params, 'opt_state': make_optimizer(cfg)[0].init(params),
           'model_state': dict(variables)}
  return state if mesh is None else parallel.constrain(state, mesh)


@functools.partial(jax.jit, static_argnames=('model', 'cfg', 'mesh'))
def train_step(state: dict, batch: jax.Array, rng: jax.Array, *, model, cfg: TrainConfig,
               mesh: Mesh | None = None):
  """One update on batch [B, L+1]. Returns (new state, metrics).

  With `mesh`: state as `init_state(..., mesh)`, batch over every device; the model runs under
  `shard_map`. The loss (cross-entropy of the whole batch + the globally averaged aux loss) and its
  gradients are taken outside the shard_map: with group_by='sequence' they equal one device's.
  """
  forward = _forward(model, mesh, train=True)

  def loss_fn(params):
    (logits, aux), model_state = forward({'params': params, **state['model_state']},
                                         batch[:, :-1], rngs={'router': rng})
    loss = cross_entropy(logits, batch)
    return loss + aux['loss'], (loss, aux, model_state)

  grads, (loss, aux, model_state) = jax.grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = make_optimizer(cfg)[0].update(grads, state['opt_state'], state['params'])
  new_state = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
               'model_state': dict(model_state)}
  if mesh is not None:
    new_state = parallel.constrain(new_state, mesh)
  metrics = {'train_loss': loss, 'aux_loss': aux['loss'], 'grad_norm': optax.global_norm(grads),
             'layers': aux['layers']}
  return new_state, metrics


@functools.partial(jax.jit, static_argnames=('model', 'mesh'))
def eval_step(params, model_state: dict, batch: jax.Array, *, model,
              mesh: Mesh | None = None) -> jax.Array:
  """Mean cross-entropy of batch [B, L+1] in inference mode (on `mesh` as `train_step`)."""
  logits, _ = _forward(model, mesh, train=False)({'params': params, **model_state}, batch[:, :-1])
  return cross_entropy(logits, batch)


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
  """One line naming the LM's FFN layers (`models.describe_ffn`)."""
  return describe_ffn(*transformer.from_config(config))


# --- The loop ----------------------------------------------------------------------------------


def check_config(config) -> tuple[TrainConfig, transformer.Transformer, Mesh]:
  """Validates every section of an experiment config, before any work; errors name the field.

  Returns (config.train, the model, the device mesh of config.mesh).
  """
  cfg = TrainConfig.from_config(config.train)
  model = transformer.build(config)
  _check_data_config(config)
  mesh = parallel.mesh_from_config(config)
  parallel.check_mesh(model.spec, mesh, config.data.batch_size, config.data.seq_len)
  return cfg, model, mesh


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training, raised after the state was checkpointed at `step`."""

  def __init__(self, step: int):
    super().__init__(f'interrupted at step {step}; rerun the same command to resume')
    self.step = step


class NonFiniteLoss(FloatingPointError):
  """A non-finite train loss or gradient norm stopped training; that state was not saved."""


@dataclasses.dataclass
class RunTime:
  """Time spent on a run over all the calls that trained it. timing.json, written with each
  checkpoint, carries the totals up to it into the call that resumes from that checkpoint."""
  call_start: float  # time.perf_counter() when this call started
  earlier_wall_s: float = 0.0  # wall time of the earlier calls
  train_s: float = 0.0  # training seconds: each call's first (compiling) step, evaluations left out
  timed_steps: int = 0  # the steps that train_s covers

  @classmethod
  def resume(cls, workdir: pathlib.Path, start: int, call_start: float) -> 'RunTime':
    path = workdir / 'timing.json'
    if not start or not path.exists():
      return cls(call_start)
    saved = json.loads(path.read_text())
    return cls(call_start, saved['wall_s'], saved['train_s'], saved['timed_steps'])

  @property
  def wall_s(self) -> float:
    return self.earlier_wall_s + time.perf_counter() - self.call_start

  def tokens_per_s(self, tokens_per_step: int) -> float | None:
    if not self.timed_steps or self.train_s <= 0:
      return None
    return self.timed_steps * tokens_per_step / self.train_s

  def save(self, workdir: pathlib.Path) -> None:
    if is_primary():
      _write_atomic(workdir / 'timing.json', json.dumps(
          {'wall_s': self.wall_s, 'train_s': self.train_s, 'timed_steps': self.timed_steps}) + '\n')


class RunLog:
  """Appends metrics.jsonl records to that file and to the run's TensorBoard events (process 0
  only); opening it drops what an earlier call wrote past `start` from both."""

  def __init__(self, workdir: pathlib.Path, start: int):
    self.records = _resume_metrics(workdir / 'metrics.jsonl', start)
    self._files = None
    if is_primary():
      self._files = ((workdir / 'metrics.jsonl').open('a'),
                     tensorboard_events.RunEvents(workdir, self.records))

  def write(self, record: dict) -> None:
    self.records.append(record)
    if self._files:
      metrics, events = self._files
      metrics.write(json.dumps(record) + '\n')
      metrics.flush()
      events.write(record)

  def close(self) -> None:
    for file in self._files or ():
      file.close()


@dataclasses.dataclass
class StepsDone:
  """What `run_steps` leaves: the final state, every metrics.jsonl record of the run, the seconds
  of this call's first (compiling) step, and the run's times over all calls."""
  state: Any
  records: list[dict]
  first_step_s: float | None
  time: RunTime


def _check_finite(unchecked: list[tuple], manager, workdir: pathlib.Path) -> None:
  """Raises NonFiniteLoss at the first of `unchecked` (step, train loss, grad norm) with a
  non-finite loss or norm."""
  for step, loss, grad_norm in jax.device_get(unchecked):
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      good = manager.latest_step()
      kept = (f'the last good checkpoint, step {good}, is kept in {workdir / "checkpoints"}'
              if good else 'there is no checkpoint yet')
      raise NonFiniteLoss(
          f'train loss {float(loss)}, gradient norm {float(grad_norm)} at step {step}: stopped '
          f'without saving that state; {kept}. The same command would resume from there and '
          'likely meet it again: start a new --workdir with a lower config.train.learning_rate, '
          'a larger config.moe.z_loss_coef (router logits) or config.train.clip_norm > 0.')


def _checkpoint(manager, step: int, state, clock: RunTime, workdir: pathlib.Path) -> None:
  manager.save(step, args=ocp.args.StandardSave(state))
  clock.save(workdir)


def run_steps(state, step_fn, evaluate, *, cfg: TrainConfig, start: int, manager,
              workdir: pathlib.Path, schedule, tokens_per_step: int, call_start: float,
              name: str = 'train') -> StepsDone:
  """The training loop of every task: steps `state` from `start` to cfg.steps.

  step_fn(state, i) -> (state, metrics) runs optimizer step i (its metrics as `train_step`'s, plus
  any scalar 'train_*' extras, e.g. train_accuracy); evaluate(state) -> {'eval_...': float}.
  Every log_every steps a `_record` goes to metrics.jsonl and the TensorBoard events (`RunLog`);
  evaluation runs every eval_every steps and at the end; the state is checkpointed through
  `manager` (with timing.json, `RunTime`; call_start: when this call started) every
  checkpoint_every steps and at the end. A tqdm bar shows progress when cfg.progress and stderr
  is a terminal. Only process 0 writes files (every process steps, evaluates and checkpoints).

  Before a step is logged or checkpointed, the losses and gradient norms of the steps since the
  last check must be finite, else NonFiniteLoss (the bad state is not saved). Ctrl-C checkpoints
  the last completed step and raises `Interrupted`. A ValueError from step_fn or evaluate comes
  from the model's code, not from the user's input: it is re-raised as a RuntimeError.
  """
  run_log = RunLog(workdir, start)
  clock = RunTime.resume(workdir, start, call_start)
  first_step_s, last_step, last_time = None, start, time.perf_counter()
  done, unchecked = (state, start), []  # the last completed step; losses not yet checked
  bar = tqdm.tqdm(total=cfg.steps, initial=start, desc=f'train {name}', unit='step',
                  disable=not cfg.progress or not sys.stderr.isatty() or not is_primary(),
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
        _check_finite(unchecked, manager, workdir)
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
        _checkpoint(manager, step, state, clock, workdir)
      done = (state, step)
  except KeyboardInterrupt:
    state, step = done
    if step > (manager.latest_step() or 0):
      _check_finite([u for u in unchecked if u[0] <= step], manager, workdir)
      _checkpoint(manager, step, state, clock, workdir)
    raise Interrupted(step) from None
  except ValueError as e:
    raise RuntimeError(f'training failed at step {i + 1}: {e}') from e
  finally:
    bar.close()
    run_log.close()
    manager.wait_until_finished()
    manager.close()
  return StepsDone(state, run_log.records, first_step_s, clock)


def write_summary(workdir: pathlib.Path, loop: StepsDone, *, cfg: TrainConfig, start: int,
                  tokens_per_step: int, flops_per_token: Callable[[str], float],
                  params: tuple[int, float], router: str, extra: tuple[str, ...] = ()) -> dict:
  """Writes and returns summary.json (see `train`): the last record's losses (and its `extra`
  fields, e.g. accuracies), the model's counts (FLOPs per token by each convention of
  `flops.CONVENTIONS`: flops_per_token(convention)), the run's throughput and times, and the
  software and devices it ran on (`reproducibility.environment`)."""
  last = loop.records[-1]
  summary = {
      'steps': cfg.steps,
      'train_loss': last['train_loss'],
      'eval_loss': last.get('eval_loss'),
      **{name: last.get(name) for name in extra},
      **{f'flops_{c}': flops_per_token(c) for c in flops.CONVENTIONS},
      'params_total': params[0],
      'params_active': params[1],
      'tokens_per_s': loop.time.tokens_per_s(tokens_per_step),
      'wall_s': loop.time.wall_s,
      'first_step_s': loop.first_step_s,
      'resumed_from_step': start,
      'router': router,
      'environment': reproducibility.environment(),
  }
  if is_primary():
    _write_atomic(workdir / 'summary.json', json.dumps(summary, indent=2) + '\n')
  return summary


def run_directory(workdir: str | os.PathLike) -> pathlib.Path:
  """`workdir` as an absolute path; NotADirectoryError when it is a file."""
  path = pathlib.Path(workdir).resolve()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f'workdir {path} is a file, not a run directory: give a new '
                             'directory, or the directory of a run to resume.')
  return path


def train(config, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes) the run in `workdir` to config.train.steps; returns summary.json's dict:

  steps; train_loss, eval_loss (the final step's); flops_active, flops_executed (forward FLOPs
  per token by each convention of moe_jax/flops.py); params_total, params_active; tokens_per_s
  (training throughput over all calls, each call's first, compiling step and evaluations left
  out); wall_s (all calls); first_step_s (this call's); resumed_from_step; router
  (`describe_router`); environment (`reproducibility.environment`).

  Raises, before writing anything: ValueError for a bad config field or when workdir/config.json
  holds a different config; NotADirectoryError when workdir is a file; FileNotFoundError when the
  data set is not found. While training: `Interrupted` (Ctrl-C, after a checkpoint) and
  `NonFiniteLoss` (see `run_steps`).
  """
  call_start = time.perf_counter()
  reproducibility.configure_from(config)  # before JAX starts its backends
  cfg, model, mesh = check_config(config)
  batch_size, seq_len = config.data.batch_size, config.data.seq_len
  workdir = run_directory(workdir)
  splits = data.load_text_splits(config.data.name, data_dir=config.data.data_dir,
                                 manual_dir=config.data.manual_dir)
  write_config(config, workdir)
  finished = workdir / 'summary.json'
  if finished.exists() and json.loads(finished.read_text()).get('steps') == cfg.steps:
    log.info('%s finished all %d steps earlier: nothing to do', workdir, cfg.steps)
    return json.loads(finished.read_text())

  tokens = data.encode(splits['train'])
  place = functools.partial(jax.device_put, device=parallel.batch_sharding(mesh))
  eval_set = [place(batch) for batch in data.eval_batches(
      data.encode(splits['validation']), batch_size, seq_len, cfg.eval_batches)]

  schedule = make_optimizer(cfg)[1]
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  manager = ocp.CheckpointManager(
      workdir / 'checkpoints',
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
  start = manager.latest_step() or 0
  if start:  # onto this mesh, whichever mesh wrote it
    target = abstract_state(model, cfg, batch_size, seq_len, mesh)
    state = manager.restore(start, args=ocp.args.StandardRestore(target))
    log.info('restored the checkpoint at step %d from %s onto mesh %s', start,
             workdir / 'checkpoints', dict(mesh.shape))
  else:
    state = init_state(model, cfg, init_key, batch_size, seq_len, mesh)

  def step_fn(state, i):
    batch = place(data.train_batch(tokens, i, batch_size, seq_len, config.seed))
    return train_step(state, batch, jax.random.fold_in(train_key, i), model=model, cfg=cfg,
                      mesh=mesh)

  def evaluate(state) -> dict:
    losses = [eval_step(state['params'], state['model_state'], batch, model=model, mesh=mesh)
              for batch in eval_set]
    return {'eval_loss': float(np.mean(jax.device_get(losses)))}

  tokens_per_step = batch_size * seq_len
  loop = run_steps(state, step_fn, evaluate, cfg=cfg, start=start, manager=manager,
                   workdir=workdir, schedule=schedule, tokens_per_step=tokens_per_step,
                   call_start=call_start, name=workdir.name)

  return write_summary(workdir, loop, cfg=cfg, start=start, tokens_per_step=tokens_per_step,
                       flops_per_token=functools.partial(transformer.model_flops_per_token, config),
                       params=transformer.param_counts(config), router=describe_router(config))
