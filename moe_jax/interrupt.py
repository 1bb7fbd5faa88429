"""Ctrl-C that stops a training run at a safe point (no JAX import: the CLI uses it before JAX).

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives:
inside XLA's compiler (whose threads go on: the process then crashed at exit with a segmentation
fault) or inside orbax's checkpointing code (which caught it: training went on to the end). Within
`deferred()`, the first Ctrl-C only sets a flag, `requested()`, which the trainer reads at safe
points (before it writes anything, after compiling or restoring, after each step; moe_jax/train.py)
and where it checkpoints and stops. The handler then gives SIGINT back to the operating system, so
that a second Ctrl-C ends the process at once, as a kill would: the run resumes from its last
checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

_requested = False


def requested() -> bool:
  """Whether Ctrl-C was pressed within the outermost `deferred()`."""
  return _requested


def _on_sigint(signum, frame) -> None:
  del signum, frame
  global _requested
  _requested = True
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
  os.write(2, b'\nCtrl-C: stopping at the next safe point, after a checkpoint; '
           b'press it again to stop at once (the steps since the last checkpoint are lost).\n')


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Ctrl-C sets `requested()` instead of raising KeyboardInterrupt, until the block ends.

  Only in the main thread and where SIGINT has Python's default handler: nested in another
  `deferred()`, or where the caller ignores SIGINT or handles it its own way, it changes nothing.
  """
  global _requested
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  _requested = False
  signal.signal(signal.SIGINT, _on_sigint)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _requested = False
