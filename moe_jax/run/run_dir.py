"""A run directory, the unit of record of one training run, and its files:

  workdir/
    config.json      the full config; a later call with a different config is refused
    metrics.jsonl    one JSON object per logged step (`RunLog`)
    events.out.tfevents.*  the same records for TensorBoard (`moe_jax.run.events`)
    checkpoints/     orbax CheckpointManager (written by `moe_jax.run.train`)
    unreadable_checkpoints/  checkpoints that did not restore, moved aside (`moe_jax.run.train`)
    timing.json      wall and training seconds up to the latest checkpoint (`RunTime`)
    summary.json     the finished run's numbers (`write_summary`)
    run.lock         held by the live run that uses the directory (`locked`)

Only process 0 of a multi-process run writes these files (`is_primary`); orbax coordinates the
checkpoints of all processes itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import socket
import time
from typing import Any, Iterator

import jax

from moe_jax.run import events


def is_primary() -> bool:
  """Whether this process writes the run directory's files (process 0)."""
  return jax.process_index() == 0


def write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def run_directory(workdir: str | os.PathLike) -> pathlib.Path:
  """`workdir` as an absolute path; NotADirectoryError when it is a file."""
  path = pathlib.Path(workdir).resolve()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f'workdir {path} is a file, not a run directory: give a new '
                             'directory, or the directory of a run to resume.')
  return path


class RunInUse(OSError):
  """Another live process holds the run directory's lock."""


@contextlib.contextmanager
def locked(workdir: pathlib.Path) -> Iterator[None]:
  """Holds workdir/run.lock (creating workdir) until the block ends or the process dies, so that
  two runs never write one directory; RunInUse when another process holds it. The lock is
  `fcntl.flock`'s, which the kernel drops with its holder (even after kill -9), and the file, left
  in place, names its last holder. Process 0 of a multi-process run holds it alone."""
  if not is_primary():
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  fd = os.open(workdir / 'run.lock', os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
      raise RunInUse(f'{workdir} is in use by a live run ({holder}); wait for it to end or stop '
                     'it (Ctrl-C), then rerun to resume, or use another --workdir.') from None
    except OSError as e:  # a file system without flock (some network ones): run unguarded
      logging.getLogger(__name__).warning('cannot lock %s (%s): a second run into it would not '
                                          'be refused', workdir / 'run.lock', e.strerror)
    else:
      os.ftruncate(fd, 0)
      os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode())
    yield
  finally:
    os.close(fd)  # releases the lock


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """The steps of workdir/checkpoints/ written to the end (orbax renames each into place when it is
  complete), in order."""
  path = workdir / 'checkpoints'
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'section.field': value} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def write_config(config, workdir: pathlib.Path, may_differ: tuple[str, ...] = (),
                 added: dict | None = None) -> dict | None:
  """Writes workdir/config.json, or checks that the one there holds the same config but for the
  fields `may_differ` ('section.field'), which keep the first call's values. `added`: {'section.
  field': default} of fields newer than some config.json files; one that lacks such a field
  holds its default.

  Returns the config found there, flattened (`flatten`), or None for a new run. Raises ValueError
  naming every differing field.
  """
  path = workdir / 'config.json'
  text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + '\n'
  if not path.exists():
    workdir.mkdir(parents=True, exist_ok=True)
    if is_primary():
      write_atomic(path, text)
    return None
  old, new = flatten(json.loads(path.read_text())), flatten(json.loads(text))
  old.update({key: value for key, value in (added or {}).items() if key in new and key not in old})
  diff = [f'  {key}: {old.get(key, "<absent>")!r} in {path.name}, {new.get(key, "<absent>")!r} now'
          for key in sorted(set(old) | set(new))
          if key not in may_differ and old.get(key) != new.get(key)]
  if diff:
    raise ValueError(
        f'{path} holds a different config, so this is not a restart of that run:\n'
        + '\n'.join(diff) + '\nUse a new --workdir for a new run, or rerun with the config in '
        f'{path} to resume it.')
  return old


def finished_summary(workdir: pathlib.Path, steps: int) -> dict | None:
  """summary.json of a run that finished all `steps`, else None."""
  path = workdir / 'summary.json'
  if path.exists():
    summary = json.loads(path.read_text())
    if summary.get('steps') == steps:
      return summary
  return None


def write_summary(workdir: pathlib.Path, summary: dict) -> dict:
  """Writes summary.json; returns `summary`."""
  if is_primary():
    write_atomic(workdir / 'summary.json', json.dumps(summary, indent=2) + '\n')
  return summary


def resume_metrics(path: pathlib.Path, step: int) -> list[dict]:
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
    write_atomic(path, ''.join(json.dumps(r) + '\n' for r in records))
  return records


class RunLog:
  """Appends metrics.jsonl records to that file and to the run's TensorBoard events (process 0
  only); opening it drops what an earlier call wrote past `start` from both."""

  def __init__(self, workdir: pathlib.Path, start: int):
    self.records = resume_metrics(workdir / 'metrics.jsonl', start)
    self._files = None
    if is_primary():
      self._files = ((workdir / 'metrics.jsonl').open('a'),
                     events.RunEvents(workdir, self.records))

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
      write_atomic(workdir / 'timing.json', json.dumps(
          {'wall_s': self.wall_s, 'train_s': self.train_s, 'timed_steps': self.timed_steps}) + '\n')
