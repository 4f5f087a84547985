"""Which rows of a global batch this process materialises, and how they become global arrays.

Every process builds the same global batch conceptually; a `BatchLayout` says which of its
rows live on this process's devices (from the sharding), so a process reads only those rows
and `jax.make_array_from_process_local_data` assembles the global, sharded `jax.Array`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from pdcnno_jax.data.types import Batch, HostBatch


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """Maps a global batch onto this process's devices.

  Attributes:
    global_batch_size: rows per global batch.
    local_rows: sorted global row indices this process's devices hold.
    sharding: the sharding of every batch array (batch dim only).
  """

  global_batch_size: int
  local_rows: np.ndarray
  sharding: jax.sharding.Sharding

  @classmethod
  def create(
      cls, sharding: jax.sharding.Sharding, global_batch_size: int
  ) -> BatchLayout:
    """Derives the layout; checks the batch splits evenly over the devices."""
    if global_batch_size <= 0:
      raise ValueError(
          f'global_batch_size must be > 0, got {global_batch_size}.'
      )
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = sharding.spec
      batch_axes = spec[0] if len(spec) else None
      # Rank-agnostic: shard dim 0 only, so images and labels share it.
      sharding = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(batch_axes)
      )
      axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes or ()
      shards = math.prod(sharding.mesh.shape[a] for a in axes)
      if global_batch_size % shards:
        raise ValueError(
            f'The global batch ({global_batch_size}) must be divisible by the '
            f'{shards} devices of mesh axes {axes}.'
        )
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = set()
    for index in index_map.values():
      start, stop, _ = index[0].indices(global_batch_size)
      rows.update(range(start, stop))
    return cls(global_batch_size, np.array(sorted(rows), np.int64), sharding)

  def to_global(self, local: HostBatch) -> Batch:
    """Assembles this process's rows into global arrays."""
    return {
        key: jax.make_array_from_process_local_data(
            self.sharding, value, (self.global_batch_size,) + value.shape[1:]
        )
        for key, value in local.items()
    }

  def local_batch_size(self) -> int:
    """Rows per process; streaming needs every process to own an equal share."""
    local = len(self.local_rows)
    if local * jax.process_count() != self.global_batch_size:
      raise ValueError(
          'Streaming mode needs a sharding in which every process holds an '
          f'equal, disjoint share of the batch; this process holds {local} of '
          f'{self.global_batch_size} rows over {jax.process_count()} processes.'
      )
    return local
