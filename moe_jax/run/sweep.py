"""Equal-FLOPs sweeps: build every member's config, size and check FLOPs, train each, report.

A sweep config has `base` (a full experiment config of any task, `moe_jax.run.tasks`), `members`
({name: overrides of base}), `size_experts`, `flops_tolerance` and `flops_match`: the FLOPs
convention members are sized and checked by, 'active' (the papers': k experts per token) or
'executed' (capacity padding counts; see moe_jax/moe/flops.py). Absent, 'active'. Nothing is trained
until every member is built, validated and found within tolerance of the dense budget; a crashed
sweep resumes where it stopped (finished members are left as they are, an unfinished one resumes
from its last checkpoint, and a member whose run directory holds a different config is refused).

Every experiment has this shape: a config of configs/ or experiments/ whose `get_config(arg)`
returns a sweep, with optional `seeds` (each member runs once per seed). A paper claim
(experiments/) is such a sweep plus a verdict over its finished runs. `plan_runs` lists the
runs (member x seed), `train_runs` trains them, here or `jobs` at a time in child processes, a
run shared by two sweeps (same config and seed) once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import time
from typing import Callable, Sequence

import ml_collections

from moe_jax import reproducibility
from moe_jax import models
from moe_jax.moe import flops
from moe_jax.run import report, tasks


def member_config(base: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """A deep copy of `base` with `overrides` ({'moe': {...}, 'model': {...}, ...}) applied."""
  config = ml_collections.ConfigDict(base.to_dict())
  for section, values in overrides.items():
    if section not in config:
      raise ValueError(f'config.members override section {section!r} is not in config.base; '
                       f'known sections: {sorted(config)}.')
    if isinstance(values, (dict, ml_collections.ConfigDict)):
      for field, value in values.items():
        if field not in config[section]:
          raise ValueError(f'config.members override {section}.{field} is not a field of '
                           f'config.base.{section}.')
        config[section][field] = value
    else:
      config[section] = values
  return config


def build_members(sweep: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """Every member's config, sized to the dense FLOP budget when `size_experts`, and checked
  (`train.check_config`).

  Each MoE layer's budget is one dense FFN of width config.model.d_ff, in the sweep's
  `flops_match` convention.

  Raises:
    ValueError: a member's config is invalid, or its model FLOPs/token differ from the dense
      model's by more than `flops_tolerance` (every offending member is named).
  """
  from moe_jax.run import train  # heavy imports only when building a sweep

  convention = flops_match(sweep)
  task = tasks.of(sweep.base)
  members = {}
  for name, overrides in sweep.members.items():
    config = member_config(sweep.base, overrides)
    train.check_config(config)
    model, spec = task.from_config(config)
    if spec is not None and sweep.size_experts:
      budget = flops.ffn_flops(model.d_model, model.d_ff, model.activation)
      config.moe.d_ff = flops.size_to_budget(spec, model.d_model, task.token_shape(config),
                                             budget, convention).d_ff
    members[name] = config
  dense = member_config(sweep.base, {'model': {'moe_every': 0}})
  member_flops = {name: task.flops_per_token(c, convention) for name, c in members.items()}
  flops.check_equal_flops(member_flops,
                          budget=task.flops_per_token(dense, convention),
                          tolerance=sweep.flops_tolerance, convention=convention)
  return members


def flops_match(sweep: ml_collections.ConfigDict) -> str:
  """The sweep's FLOPs convention, `config.flops_match` ('active' when absent), checked."""
  return flops.check_convention(sweep.get('flops_match', 'active'))


def describe(config: ml_collections.ConfigDict) -> str:
  """A short human label of a member's FFN, e.g. 'token_choice k=2 cf=1.25 E=8 f=204'
  (`models.describe_ffn`, short)."""
  return models.describe_ffn(*tasks.of(config).from_config(config), short=True)


# --- Runs: members x seeds, trained once each ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep: member `member`'s config with `seed`, into `directory`."""
  member: str
  seed: int
  config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
  directory: pathlib.Path
  tag: str = ''  # the caller's label of the run's sweep (e.g. a claim's key), shown in logs

  @property
  def identity(self) -> str:
    """The config as canonical JSON: two runs with equal identities train the same thing."""
    return json.dumps(self.config.to_dict(), sort_keys=True, default=str)


DIVERGED = 'diverged.json'  # written into a run directory whose loss went non-finite


def plan_runs(sweep: ml_collections.ConfigDict, workdir: pathlib.Path,
              seeds: Sequence[int] | None = None, only: Sequence[str] | None = None,
              tag: str = '') -> list[Run]:
  """Every member x seed of `sweep` (members built and checked by `build_members` first), in
  seed-major order. A sweep without `seeds` runs each member once at its base seed into
  `workdir/<member>`; with seeds (or `seeds` given), into `workdir/<member>/seed_<s>`."""
  members = build_members(sweep)
  if only:
    unknown = sorted(set(only) - set(members))
    if unknown:
      raise ValueError(f'--only names unknown member(s) {unknown}; members: {sorted(members)}.')
    members = {name: members[name] for name in only}
  if seeds is None and 'seeds' not in sweep:
    return [Run(name, config.seed, config, workdir / name, tag) for name, config in members.items()]
  runs = []
  for seed in (seeds if seeds is not None else sweep.seeds):
    for name, config in members.items():
      config = ml_collections.ConfigDict(config.to_dict())
      config.seed = int(seed)
      runs.append(Run(name, int(seed), config, workdir / name / f'seed_{seed}', tag))
  return runs


def is_finished(run: Run) -> bool:
  """Whether `run` trained all its steps, or stopped on a non-finite loss (a result too)."""
  from moe_jax.run import run_dir
  return (run_dir.finished_summary(run.directory, run.config.train.steps) is not None or
          (run.directory / DIVERGED).exists())


def link_duplicates(runs: Sequence[Run]) -> list[Run]:
  """The runs to train: the first of each identity. The directory of every later run with the
  same identity becomes a relative symbolic link to the first's (made once, kept)."""
  first: dict[str, Run] = {}
  for run in runs:
    if run.identity not in first:
      first[run.identity] = run
    elif not run.directory.is_symlink() and not run.directory.exists():
      run.directory.parent.mkdir(parents=True, exist_ok=True)
      run.directory.symlink_to(os.path.relpath(first[run.identity].directory, run.directory.parent))
  return list(first.values())


def train_one(run: Run, log: Callable = print) -> None:
  """Trains `run` in this process (resuming a crashed run, skipping a finished one). A non-finite
  loss ends the run with `DIVERGED` written, not the sweep."""
  if is_finished(run):
    log(f'  {run.member} seed {run.seed}: finished earlier, reused')
    return
  from moe_jax.run import train
  reproducibility.configure_from(run.config)
  start = time.perf_counter()
  try:
    train.train(run.config, run.directory)
  except train.NonFiniteLoss as e:
    (run.directory / DIVERGED).write_text(json.dumps({'message': str(e)}) + '\n')
    log(f'  {run.member} seed {run.seed}: diverged after {time.perf_counter() - start:.0f} s: {e}')
    return
  log(f'  {run.member} seed {run.seed}: trained in {time.perf_counter() - start:.0f} s')


def train_runs(runs: Sequence[Run], *, jobs: int = 1, child_command: Callable | None = None,
               log: Callable = print) -> None:
  """Trains every unfinished run of `runs` (duplicates once): in this process when jobs == 1,
  else up to `jobs` child processes at a time, `child_command(run)` each (its argv; log: the
  run's directory + '.log'), with HEADROOM/jobs (0.9/jobs) of the GPU's memory unless
  XLA_PYTHON_CLIENT_MEM_FRACTION is set (`memory_plan`). A child that fails is reported and its run left
  unfinished; the others go on."""
  pending = [run for run in link_duplicates(runs) if not is_finished(run)]
  log(f'{len(pending)} run(s) to train, {len(runs) - len(pending)} finished or shared')
  if jobs == 1:
    for run in pending:
      train_one(run, log)
    return
  from moe_jax.run import memory_plan  # the share of GPU memory the plan counts on
  env = dict(os.environ)
  env.setdefault(memory_plan.MEMORY_FRACTION, f'{memory_plan.HEADROOM / jobs:.3f}')
  running: dict[Run, subprocess.Popen] = {}
  start = time.perf_counter()
  name = lambda run: f'({run.tag}) ' * bool(run.tag) + f'{run.member} seed {run.seed}'
  while pending or running:
    while pending and len(running) < jobs:
      run = pending.pop(0)
      run.directory.parent.mkdir(parents=True, exist_ok=True)
      log_path = run.directory.with_name(run.directory.name + '.log')
      with log_path.open('w') as log_file:
        running[run] = subprocess.Popen(child_command(run), stdout=log_file,
                                        stderr=subprocess.STDOUT, env=env)
      log(f'{name(run)}: started, log {log_path}')
    time.sleep(1.0)
    for run, process in list(running.items()):
      if process.poll() is not None:
        del running[run]
        status = 'finished' if process.returncode == 0 else (
            f'FAILED (exit {process.returncode}); see {run.directory}.log')
        log(f'{name(run)}: {status} at {time.perf_counter() - start:.0f} s')


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str | pathlib.Path,
              only: list[str] | None = None) -> str:
  """Trains every member (x seed, where the sweep has `seeds`) into `workdir`, then writes and
  returns the results table."""
  workdir = pathlib.Path(workdir)
  reproducibility.configure_from(sweep.base)  # before building members starts JAX's backends
  runs = plan_runs(sweep, workdir, only=only)
  workdir.mkdir(parents=True, exist_ok=True)
  members = {run.member: run.config for run in runs}
  (workdir / 'sweep.json').write_text(json.dumps(
      {name: {'description': describe(c), 'config': c.to_dict(), 'flops_match': flops_match(sweep)}
       for name, c in members.items()}, indent=2, default=str))
  start = time.time()
  for i, run in enumerate(runs):
    print(f'[{i + 1}/{len(runs)}] {run.member}: {describe(run.config)}', flush=True)
    train_one(run)  # resumes an unfinished run, reuses a finished one
  print(f'sweep finished in {time.time() - start:.0f} s')
  return report.write_report(workdir)
