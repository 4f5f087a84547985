"""Moving state between the global data-parallel mesh and a process-local mesh.

MapReduce and SSP workers train their own replica on their own devices; the experiment keeps
state replicated on the global mesh (every device of every process). One implementation of
both directions for every mode.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pdcnno_jax.train import sharding as sharding_lib


def local_devices(mesh: jax.sharding.Mesh) -> list[jax.Device]:
  """This process's devices of ``mesh``."""
  devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if not devices:
    raise ValueError('The mesh holds no device of this process.')
  return devices


def to_local(tree: Any, local_sharding: jax.sharding.Sharding, *, copy: bool = False) -> Any:
  """A replicated global pytree as this process's own copy, replicated on its local mesh.

  Args:
    tree: arrays replicated on the global mesh (or host arrays).
    local_sharding: replicated sharding of the process's local mesh.
    copy: return fresh buffers even for arrays already on ``local_sharding`` (a caller that
      donates or mutates the result must not alias the input).
  """

  def put(x):
    if isinstance(x, jax.Array):
      if x.sharding == local_sharding:
        return jnp.copy(x) if copy else x
      x = x.addressable_data(0)
    return jax.device_put(x, local_sharding)

  return jax.tree.map(put, tree)


def to_global(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Inverse of `to_local`: identical per-process copies as one array replicated on ``mesh``.

  No host transfer: every local shard is reused as this process's shard of the global array.
  """
  sharding = sharding_lib.replicated(mesh)

  def put(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
    return jax.make_array_from_single_device_arrays(x.shape, sharding,
                                                    [s.data for s in shards])

  return jax.tree.map(put, tree)
