"""The runs of a set of claims: which (claim, member, seed) to train, where, and training them.

Every run trains into `workdir/<key>_<claim>/<member>/seed_<s>/`, planned and trained by the sweep
machinery (`moe_jax.run.sweep.plan_runs`, `train_runs`): two runs of different claims with the
same config and seed (e.g. GShard top-2 in claims (b) and (c)) train once, the later one's
directory a symbolic link to the first's; a finished run (or one that diverged) is never trained
again, so a crashed table resumes and runs made elsewhere (copied into the workdir) are reused.
With `jobs` > 1 each run trains in its own process, `python -m experiments train-one ...`.
"""
from __future__ import annotations

import importlib
import pathlib
import sys
from typing import Callable, Sequence

from experiments import CLAIMS


def claim_dir(workdir: pathlib.Path, key: str) -> pathlib.Path:
  return workdir / f'{key}_{CLAIMS[key]}'


def claim_module(key: str):
  return importlib.import_module(f'experiments.{CLAIMS[key]}')


def key_of(module) -> str:
  """The key of a claim module in CLAIMS ('a' for experiments.moe_vs_dense)."""
  return {name: key for key, name in CLAIMS.items()}[module.__name__.rsplit('.', 1)[-1]]


def claim_config(key: str, scale: str, pilot: bool = False):
  """Claim `key`'s sweep at `scale`; pilot: its `pilot_config` where it has one (a search for
  its regime), else its own sweep."""
  module = claim_module(key)
  return (getattr(module, 'pilot_config', module.get_config) if pilot else module.get_config)(
      f'scale={scale}')


def claim_runs(key: str, scale: str, seeds: Sequence[int], workdir: pathlib.Path,
               data_dir: str | None = None, pilot: bool = False) -> list:
  """The runs (`sweep.Run`, tagged with the claim) of claim `key` at `scale` with `seeds`,
  members sized and checked at equal FLOPs before anything trains."""
  from moe_jax.run import sweep  # heavy imports only when a claim runs
  claim = claim_config(key, scale, pilot)
  if data_dir is not None:
    claim.base.data.data_dir = data_dir
  return sweep.plan_runs(claim, claim_dir(workdir, key), seeds=seeds, tag=key)


def is_finished(run) -> bool:
  from moe_jax.run import sweep
  return sweep.is_finished(run)


def train_all(runs: Sequence, *, scale: str, workdir: pathlib.Path, jobs: int = 1,
              data_dir: str | None = None, pilot: bool = False, log: Callable = print) -> None:
  """Trains every unfinished run of `runs` (`sweep.train_runs`; pilot runs if `pilot`), `jobs`
  at a time."""
  from moe_jax.run import sweep

  def child_command(run) -> list[str]:
    command = [sys.executable, '-m', 'experiments', 'train-one', '--claim', run.tag, '--member',
               run.member, '--seed', str(run.seed), '--scale', scale, '--workdir',
               str(workdir.resolve())]
    command += ['--pilot'] if pilot else []
    return command + (['--data_dir', str(pathlib.Path(data_dir).resolve())] if data_dir else [])

  sweep.train_runs(runs, jobs=jobs, child_command=child_command, log=log)


def train_one(run, log: Callable = print) -> None:
  from moe_jax.run import sweep
  sweep.train_one(run, log)
