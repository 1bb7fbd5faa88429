"""The runs of a set of claims: which (claim, member, seed) to train, where, and training them.

Every run trains into `workdir/<key>_<claim>/<member>/seed_<s>/`. Two runs of different claims
with the same config and seed (e.g. GShard top-2 in claims (b) and (c)) are trained once: the
later one's directory is a symbolic link to the first's. A finished run (its summary.json covers
every step) is never trained again, so a crashed table resumes and runs made elsewhere (copied
into the workdir) are reused. `train_all(runs, jobs=J)` trains up to J runs at once, each in its
own process (`python -m experiments train-one ...`).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Callable, Sequence

import ml_collections

from experiments import CLAIMS

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a claim: `config` (the member's, with `seed` set) into `directory`."""
  key: str
  member: str
  seed: int
  config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
  directory: pathlib.Path
  pilot: bool = False  # a run of the claim's pilot (`claim_runs`)

  @property
  def identity(self) -> str:
    """The config as canonical JSON: two runs with equal identities train the same thing."""
    return json.dumps(self.config.to_dict(), sort_keys=True, default=str)


def claim_dir(workdir: pathlib.Path, key: str) -> pathlib.Path:
  return workdir / f'{key}_{CLAIMS[key]}'


def claim_module(key: str):
  return importlib.import_module(f'experiments.{CLAIMS[key]}')


def key_of(module) -> str:
  """The key of a claim module in CLAIMS ('a' for experiments.moe_vs_dense)."""
  return {name: key for key, name in CLAIMS.items()}[module.__name__.rsplit('.', 1)[-1]]


def claim_runs(key: str, scale: str, seeds: Sequence[int], workdir: pathlib.Path,
               data_dir: str | None = None, pilot: bool = False) -> list[Run]:
  """The runs of claim `key` at `scale` with `seeds`, members sized and checked at equal FLOPs
  (`sweep.build_members`) before anything trains. pilot: the claim's `pilot_config` where it has
  one (a search for its regime), else its own members."""
  from moe_jax.run import sweep  # heavy imports only when a claim runs
  module = claim_module(key)
  claim = (getattr(module, 'pilot_config', module.get_config) if pilot else module.get_config)(scale)
  if data_dir is not None:
    claim.base.data.data_dir = data_dir
  runs = []
  for member, config in sweep.build_members(claim).items():
    for seed in seeds:
      config = ml_collections.ConfigDict(config.to_dict())
      config.seed = int(seed)
      runs.append(Run(key, member, int(seed), config,
                      claim_dir(workdir, key) / member / f'seed_{seed}', pilot))
  return runs


DIVERGED = 'diverged.json'  # written into a run directory whose loss went non-finite


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
      continue
    original = first[run.identity]
    if not run.directory.is_symlink() and not run.directory.exists():
      run.directory.parent.mkdir(parents=True, exist_ok=True)
      run.directory.symlink_to(os.path.relpath(original.directory, run.directory.parent))
  return list(first.values())


def train_one(run: Run, log: Callable = print) -> None:
  """Trains `run` in this process (resuming a crashed run, skipping a finished one)."""
  if is_finished(run):
    log(f'  {run.member} seed {run.seed}: finished earlier, reused')
    return
  from moe_jax import reproducibility
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


def child_command(run: Run, scale: str, workdir: pathlib.Path, data_dir: str | None) -> list:
  command = [sys.executable, '-m', 'experiments', 'train-one', '--claim', run.key, '--member',
             run.member, '--seed', str(run.seed), '--scale', scale, '--workdir',
             str(workdir.resolve())]
  command += ['--pilot'] if run.pilot else []
  return command + (['--data_dir', str(pathlib.Path(data_dir).resolve())] if data_dir else [])


def train_all(runs: Sequence[Run], *, scale: str, workdir: pathlib.Path, jobs: int = 1,
              data_dir: str | None = None, log: Callable = print) -> None:
  """Trains every unfinished run of `runs` (duplicates once): in this process when jobs == 1,
  else up to `jobs` child processes at a time, each with 0.9/jobs of the GPU's memory unless
  XLA_PYTHON_CLIENT_MEM_FRACTION is set (log: the run's directory + '.log'). A child that fails
  is reported and its run left unfinished; the others go on."""
  pending = [run for run in link_duplicates(runs) if not is_finished(run)]
  log(f'{len(pending)} run(s) to train, {len(runs) - len(pending)} finished or shared')
  if jobs == 1:
    for run in pending:
      train_one(run, log)
    return
  env = dict(os.environ)
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / jobs:.3f}')
  running: dict[Run, subprocess.Popen] = {}
  start = time.perf_counter()
  while pending or running:
    while pending and len(running) < jobs:
      run = pending.pop(0)
      run.directory.parent.mkdir(parents=True, exist_ok=True)
      log_path = run.directory.with_name(run.directory.name + '.log')
      with log_path.open('w') as log_file:
        running[run] = subprocess.Popen(child_command(run, scale, workdir, data_dir),
                                        stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO)
      log(f'({run.key}) {run.member} seed {run.seed}: started, log {log_path}')
    time.sleep(1.0)
    for run, process in list(running.items()):
      if process.poll() is not None:
        del running[run]
        status = 'finished' if process.returncode == 0 else (
            f'FAILED (exit {process.returncode}); see {run.directory}.log')
        log(f'({run.key}) {run.member} seed {run.seed}: {status} at '
            f'{time.perf_counter() - start:.0f} s')
