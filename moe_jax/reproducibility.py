"""Deterministic execution and a record of the software and devices a run used.

On CPU and TPU, XLA runs a compiled program the same way every time: the same config and seed give
the same numbers, bit for bit. XLA:GPU does not by default: scatter-adds use atomics (the
combine of gather dispatch, embedding gradients) and autotuning may pick a different GEMM
algorithm in another process. `config.deterministic=True` turns on XLA's deterministic-ops mode
(`--xla_gpu_deterministic_ops=true`: deterministic scatter, no autotuning by timing); the
project's own Pallas kernels write each output tile from one program, with no atomics, so they are
deterministic already. Its cost is measured in docs/performance.md.

XLA reads its flags once, when JAX starts its backends: `configure` must run before the first
array is made. The command line, sweeps and claims call it first thing.
"""
from __future__ import annotations

import os

DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'


def deterministic_flag_set() -> bool:
  """Whether XLA_FLAGS asks XLA:GPU for deterministic ops."""
  return DETERMINISTIC_FLAG in os.environ.get('XLA_FLAGS', '').split()


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, 'backends_are_initialized', None)
  return started() if started is not None else bool(getattr(xla_bridge, '_backends', {}))


def configure(deterministic: bool) -> None:
  """Sets XLA_FLAGS for `deterministic` (config.deterministic) before JAX starts its backends.

  Once they have started the flags cannot change: that is fine off GPU (deterministic anyway) and
  a ValueError naming the field and the fix on GPU when the running mode differs.
  """
  if deterministic == deterministic_flag_set():
    return
  if _backends_started():
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() != 'gpu':
      return
    raise ValueError(
        f'config.deterministic={deterministic!r} cannot take effect: JAX already runs on the GPU '
        f'{"without" if deterministic else "with"} {DETERMINISTIC_FLAG}. Start a new process '
        f'(with XLA_FLAGS={DETERMINISTIC_FLAG} for True), or set config.deterministic='
        f'{not deterministic!r}.')
  flags = [flag for flag in os.environ.get('XLA_FLAGS', '').split() if flag != DETERMINISTIC_FLAG]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [DETERMINISTIC_FLAG] * deterministic)


def configure_from(config) -> None:
  """`configure` with an experiment config's `deterministic` field (absent: False), checked."""
  deterministic = config.get('deterministic', False)
  if not isinstance(deterministic, bool):
    raise ValueError(f'config.deterministic={deterministic!r} is invalid: use True or False.')
  configure(deterministic)


def environment() -> dict:
  """What a run's numbers depend on besides its config: jax and jaxlib versions, backend, device
  kind and count, processes, and whether XLA:GPU ran deterministic ops."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'xla_gpu_deterministic_ops': deterministic_flag_set(),
  }
