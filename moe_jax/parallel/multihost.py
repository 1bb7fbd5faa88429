"""Multi-process start-up: `jax.distributed.initialize()` before the mesh is built.

Call `initialize_from_env()` first thing in main, before any JAX computation (even `jax.devices()`).
Afterwards `jax.devices()` lists the devices of every process, `sharding.make_mesh` builds the
global mesh over them, and nothing else changes. See docs/parallelism.md for launch recipes.

Where the process layout comes from, first match wins:
  1. an explicit coordinator (argument, or $JAX_COORDINATOR_ADDRESS) with num_processes and
     process_id (arguments, or $JAX_NUM_PROCESSES / $JAX_PROCESS_ID);
  2. a multi-process launcher seen in the environment (`detect_cluster`: Slurm `srun` steps, Open
     MPI `mpirun`, multi-host TPU slices on GKE / Megascale): JAX's own auto-detection;
  3. `enable=True` or $MOE_JAX_DISTRIBUTED=1: JAX's auto-detection anyway (Cloud TPU VM pod slices,
     whose hosts are only in the metadata server; Kubernetes; mpi4py);
  otherwise a single process: nothing to do. $MOE_JAX_DISTRIBUTED=0 (or enable=False) turns it off.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import jax

ENV_ENABLE = 'MOE_JAX_DISTRIBUTED'
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """'slurm', 'openmpi' or 'tpu' when `environ` shows a multi-process launch, else None."""
  if int(environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1 and 'SLURM_PROCID' in environ:
    return 'slurm'  # inside `srun -n N` (a batch script alone is one process)
  if int(environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'openmpi'
  hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES') or ''
  if len([h for h in hosts.split(',') if h]) > 1 or 'MEGASCALE_COORDINATOR_ADDRESS' in environ:
    return 'tpu'
  return None


def _int_or_none(name: str, value) -> int | None:
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is invalid: use an integer.') from None


def initialize_from_env(coordinator_address: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None, *, enable: bool | None = None,
                        environ: Mapping[str, str] | None = None,
                        initialize: Callable | None = None) -> bool:
  """Starts JAX's distributed runtime when this is one process of many; no-op otherwise.

  Args:
    coordinator_address: 'host:port' of process 0 (flag); default $JAX_COORDINATOR_ADDRESS.
    num_processes, process_id: needed with a coordinator; default $JAX_NUM_PROCESSES /
      $JAX_PROCESS_ID.
    enable: True forces JAX's auto-detection, False never initializes; None (default) reads
      $MOE_JAX_DISTRIBUTED ('1' / '0'), else decides from the environment.
    environ, initialize: the environment and `jax.distributed.initialize` (injectable for tests).

  Returns:
    True when the distributed runtime is running (started now or before), False for one process.
  """
  environ = os.environ if environ is None else environ
  initialize = jax.distributed.initialize if initialize is None else initialize
  if enable is None and environ.get(ENV_ENABLE, '') != '':
    enable = environ[ENV_ENABLE].lower() not in ('0', 'false', 'no')
  if enable is False:
    return False
  if initialize is jax.distributed.initialize and jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int_or_none(ENV_NUM_PROCESSES, environ.get(ENV_NUM_PROCESSES))
  if process_id is None:
    process_id = _int_or_none(ENV_PROCESS_ID, environ.get(ENV_PROCESS_ID))
  if coordinator_address:
    for name, env, value in (('num_processes', ENV_NUM_PROCESSES, num_processes),
                             ('process_id', ENV_PROCESS_ID, process_id)):
      if value is None:
        raise ValueError(f'coordinator_address={coordinator_address!r} is set but {name} is not: '
                         f'pass --{name} or set ${env} on every process.')
    initialize(coordinator_address=coordinator_address, num_processes=num_processes,
               process_id=process_id)
    return True
  if enable or detect_cluster(environ):
    initialize(num_processes=num_processes, process_id=process_id)
    return True
  return False
