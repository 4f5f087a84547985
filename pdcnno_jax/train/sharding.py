"""Device mesh and shardings for data-parallel training with ``jax.jit``.

One mesh axis, ``'data'``, spans every device of every process. Parameters and optimizer
state are replicated; batches are sharded along their leading dimension.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D ``'data'`` mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) dimension over the ``'data'`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host or device arrays, identical on every process, replicated.

  Works with several processes (``jax.device_put`` of host data onto devices that other
  processes own is not allowed), and is a no-op for arrays already laid out this way.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
  """Raises a clear error unless the global batch splits evenly over the mesh."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(
        f'config.data.batch_size={global_batch_size} must be divisible by the number of '
        f'devices ({n}, over {jax.process_count()} process(es)); use a multiple of {n}.')
