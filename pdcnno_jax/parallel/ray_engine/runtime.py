"""Starts or joins the Ray cluster the MapReduce and SSP modes run on.

Embedded (``config.parallel.ray_address = ''``): `start` launches a local Ray instance whose
node address is 127.0.0.1, so every connection between the driver, the raylet, the GCS and the
worker actors is a loopback one; the dashboard is off and Ray's token authentication stays on
(Ray's gRPC servers still listen on all interfaces; the README's security model lists them).
Cluster (``ray_address = 'auto'`` or ``'host:port'``, as ``ray start --head`` prints): `start`
joins it and binds nothing itself. Worker actors get one CPU each and, on GPU hosts,
``config.parallel.gpus_per_worker`` GPUs, and each runs its own JAX on its own devices.

Ray reads whether a Linux node may use a non-loopback address when it is imported, so `start`
sets that switch before the first ``import ray`` of the process (and its children inherit it).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ml_collections
from absl import logging

# Ray uses the loopback address as the node address when this is off (its OSX/Windows
# default); read at ``import ray``.
_LOOPBACK_SWITCH = 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'
# Arguments and replies up to this size travel inline in the actor call instead of through the
# object store (Ray's `max_direct_call_object_size`, 100 KiB by default): a LeNet-5 update
# (0.24 MB) then costs one call, not a put and a get. Embedded instances only; a cluster keeps
# the setting of its `ray start --head`.
INLINE_OBJECT_BYTES = 2**20


class RayUnavailableError(RuntimeError):
  """Ray is not installed or its cluster cannot be started or reached."""


def _import_ray(embedded: bool):
  if embedded:
    os.environ.setdefault(_LOOPBACK_SWITCH, '0')
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RayUnavailableError(
        'config.parallel.engine=ray needs the `ray` package: run scripts/setup.sh (or '
        '`pip install ray`), or set --config.parallel.engine=jax.') from e
  return ray


def _session_root() -> str:
  """Where the embedded instance keeps its session (sockets, logs).

  Ray's Unix socket paths live under it and may not exceed 107 bytes: a long TMPDIR (Bazel's
  sandbox has one) moves it to a short directory of this user under /tmp.
  """
  root = os.path.join(tempfile.gettempdir(), 'ray')
  if len(root) > 40 and os.path.isdir('/tmp'):
    root = f'/tmp/ray_{os.getuid()}'
  return root


def start(config: ml_collections.ConfigDict) -> Any:
  """Starts the embedded cluster or joins ``config.parallel.ray_address``; returns ``ray``.

  Idempotent: a process already connected to Ray keeps its connection.
  """
  address = config.parallel.ray_address
  ray = _import_ray(embedded=not address)
  if ray.is_initialized():
    return ray
  kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True,
                                configure_logging=False)
  try:
    if address:
      ray.init(address=address, **kwargs)
    else:
      # One CPU per worker actor plus one per parameter-server shard and the driver's share;
      # Ray only uses the count to schedule actors, the OS shares the cores.
      num_cpus = max(os.cpu_count() or 1,
                     config.parallel.num_workers + config.parallel.ps_shards + 1)
      ray.init(num_cpus=num_cpus, _temp_dir=_session_root(),
               _system_config={'max_direct_call_object_size': INLINE_OBJECT_BYTES}, **kwargs)
      if node_address() != '127.0.0.1':
        logging.warning('The embedded Ray node uses %s, not 127.0.0.1: Ray was imported before '
                        'runtime.start; import it only through runtime.start.', node_address())
  except (ConnectionError, RuntimeError, ValueError) as e:
    where = f'the Ray cluster at {address!r}' if address else 'an embedded Ray instance'
    raise RayUnavailableError(
        f'Could not start or reach {where}: {e}. For a cluster, check that `ray start --head` '
        'runs there and that --config.parallel.ray_address matches what it printed.') from e
  return ray


def node_address() -> str:
  """The address of this node as Ray knows it (127.0.0.1 when embedded)."""
  import ray  # pylint: disable=g-import-not-at-top
  return ray.util.get_node_ip_address()


def worker_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``Actor.options(...)`` for one training worker: its CPU and GPU share."""
  return dict(num_cpus=1, num_gpus=config.parallel.gpus_per_worker)


def actor_env(config: ml_collections.ConfigDict,
              passed: tuple[str, ...] = ()) -> dict[str, str]:
  """Environment variables of a worker actor: its own JAX on its own devices.

  The driver's XLA_FLAGS may fake several host devices (the tests do); a CPU worker gets
  ``parallel.ray_worker_cpu_devices`` of them instead, a GPU worker the GPUs Ray assigns it
  (CUDA_VISIBLE_DEVICES). The package's own root leads PYTHONPATH, so the actors import the
  same pdcnno_jax as the driver; ``passed`` names further variables copied from the driver.
  """
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = {name: os.environ[name] for name in ('TF_CPP_MIN_LOG_LEVEL',) + tuple(passed)
         if name in os.environ}
  if config.parallel.gpus_per_worker > 0:
    env['JAX_PLATFORMS'] = os.environ.get('JAX_PLATFORMS', '')
  else:
    env['JAX_PLATFORMS'] = 'cpu'
    flags.append('--xla_force_host_platform_device_count='
                 f'{int(config.parallel.ray_worker_cpu_devices)}')
  env['XLA_FLAGS'] = ' '.join(flags)
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (package_root, os.environ.get('PYTHONPATH', '')) if p)
  return env


def stop() -> None:
  """Disconnects (and, when embedded, shuts the local instance down)."""
  import ray  # pylint: disable=g-import-not-at-top
  if ray.is_initialized():
    ray.shutdown()
