"""Multi-host start-up: ``jax.distributed.initialize`` when flags or the environment ask.

Three ways a process learns it is part of a multi-process job:
  * explicit flags / arguments: coordinator address, number of processes, process id
    (the local launcher in ``launch/local.py`` sets these for N CPU processes);
  * Slurm or a Cloud TPU pod: ``jax.distributed.initialize()`` auto-detects the cluster
    from the environment (SLURM_* variables, TPU metadata);
  * neither: a single process, nothing to initialise.

On CPU, cross-process collectives use gloo (set before initialisation).
"""

from __future__ import annotations

import os

import jax
from absl import logging

_CLUSTER_ENV_HINTS = ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                      'OMPI_COMM_WORLD_SIZE')


def cluster_detected() -> bool:
  """Whether the environment looks like a cluster JAX can auto-detect (Slurm, TPU, MPI)."""
  return any(name in os.environ for name in _CLUSTER_ENV_HINTS)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = 'auto',
               initialization_timeout: int = 300, recoverable: bool = False,
               heartbeat_timeout_s: float | None = None) -> bool:
  """Joins the multi-process job if one is configured; returns whether it did.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: total processes in the job.
    process_id: this process's index in ``[0, num_processes)``.
    mode: ``'auto'`` (initialise if an address is given or a cluster is detected),
      ``'on'`` (always; rely on auto-detection for missing values) or ``'off'``.
    initialization_timeout: seconds to wait for every process to connect.
    recoverable: SSP training: start the runtime through
      ``parallel.ssp.coordination.initialize`` with recoverability on, so that a dead worker
      does not abort the others and may rejoin (end such a job with ``coordination.shutdown``).
    heartbeat_timeout_s: with ``recoverable``, seconds without heartbeats after which the
      coordination service counts a process as dead (None: 10).

  Raises:
    ValueError: for an inconsistent combination of arguments.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"--distributed must be 'auto', 'on' or 'off', got {mode!r}.")
  explicit = coordinator_address is not None
  if mode == 'off' or (mode == 'auto' and not explicit and not cluster_detected()):
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ValueError('--coordinator_address needs --num_processes and --process_id too.')
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f'--process_id={process_id} must be in [0, {num_processes}).')
  # CPU devices of different processes talk over gloo (harmless on GPU/TPU hosts).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if recoverable:
    from pdcnno_jax.parallel.ssp import coordination  # pylint: disable=g-import-not-at-top
    coordination.initialize(coordinator_address, num_processes, process_id,
                            heartbeat_timeout_s=10 if heartbeat_timeout_s is None
                            else heartbeat_timeout_s,
                            recoverable=True, initialization_timeout_s=initialization_timeout)
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=initialization_timeout)
  logging.info('Joined job as process %d of %d (%d devices in all).', jax.process_index(),
               jax.process_count(), jax.device_count())
  return True

