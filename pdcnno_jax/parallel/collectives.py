"""Cross-process collectives for MapReduce training: weighted tree average and all-gather.

Each process ("worker") holds its own copy of a pytree on its local devices. The Reduce of
MapReduce training needs one value per process combined into one value everywhere. Both
collectives here are jitted computations over a *process mesh*, a 1-D mesh with one device of
each process (axis ``'process'``): every process contributes one row of a global
``[num_processes, ...]`` array, and a jitted sum (or identity) with a replicated output makes
XLA emit the all-reduce (or all-gather) over the backend's collectives (gloo between CPU
processes, NCCL between GPU hosts). No files or sockets of our own.

The pytree is packed into a few flat vectors first, so one Reduce is one collective per dtype
class whatever the number of leaves:

* floating leaves (parameters, BatchNorm statistics, masks, optimizer moments) are averaged
  with per-process weights (the weights sum to 1 over the processes);
* integer and unsigned leaves (step counters, optimizer counts) get the plain mean over the
  processes, rounded to the nearest integer: with K workers each starting a round at count c and
  doing n_k local steps, that is c + sum_k n_k / K;
* PRNG keys are taken from process 0 (random streams cannot be averaged).

With a single process the result equals the input exactly (weight 1.0, sum of one row).

References:
  DESIGN.md, "MapReduce training" (Reduce: a sample-weighted average, a collective across
  processes); PDCNNO paper (`papers/pdcnno_mapreduce_cgmse.txt`), the Reduce phase.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PROCESS_AXIS = 'process'

_FLOAT, _INT, _KEY = 'float', 'int', 'key'


def process_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D ``'process'`` mesh holding the first device (lowest id) of every process.

  Args:
    devices: candidate devices (default: every device of every process).

  Returns:
    Mesh of ``jax.process_count()`` devices, ordered by process index.

  Raises:
    ValueError: a process owns none of ``devices``.
  """
  devices = jax.devices() if devices is None else devices
  firsts = {}
  for device in sorted(devices, key=lambda d: d.id):
    firsts.setdefault(device.process_index, device)
  missing = sorted(set(range(jax.process_count())) - set(firsts))
  if missing:
    raise ValueError(f'Processes {missing} own none of the given devices; every process '
                     'needs a device in the collective.')
  return Mesh(np.asarray([firsts[p] for p in range(jax.process_count())]), (PROCESS_AXIS,))


def _own_device(mesh: Mesh) -> jax.Device:
  return mesh.devices[jax.process_index()]


def _kind(leaf: jax.Array) -> str:
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return _KEY
  if jnp.issubdtype(leaf.dtype, jnp.floating):
    return _FLOAT
  if jnp.issubdtype(leaf.dtype, jnp.integer) or leaf.dtype == jnp.bool_:
    return _INT
  raise TypeError(f'Cannot reduce a leaf of dtype {leaf.dtype} across processes.')


def _pack(tree: Any, weight: jax.Array, is_first: jax.Array) -> dict[str, jax.Array]:
  """Flattens ``tree`` into one [1, n] row per dtype class, weighted for the reduction."""
  rows = {_FLOAT: [], _INT: [], _KEY: []}
  for leaf in jax.tree.leaves(tree):
    kind = _kind(leaf)
    if kind == _FLOAT:
      rows[kind].append(leaf.astype(jnp.float32).ravel() * weight)
    elif kind == _INT:
      rows[kind].append(leaf.astype(jnp.int32).ravel())
    else:
      rows[kind].append(jax.random.key_data(leaf).astype(jnp.uint32).ravel() *
                        is_first.astype(jnp.uint32))
  dtypes = {_FLOAT: jnp.float32, _INT: jnp.int32, _KEY: jnp.uint32}
  return {kind: (jnp.concatenate(parts) if parts else jnp.zeros((0,), dtypes[kind]))[None]
          for kind, parts in rows.items()}


def _unpack(totals: dict[str, jax.Array], like: Any, num_processes: int) -> Any:
  """Inverse of `_pack` on the reduced rows: shapes and dtypes from ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  offsets = {_FLOAT: 0, _INT: 0, _KEY: 0}
  out = []
  for leaf in leaves:
    kind = _kind(leaf)
    if kind == _KEY:
      data = jax.random.key_data(leaf)
      size = data.size
      piece = totals[kind][offsets[kind]:offsets[kind] + size]
      value = jax.random.wrap_key_data(piece.reshape(data.shape).astype(data.dtype),
                                       impl=jax.random.key_impl(leaf))
    else:
      size = leaf.size
      piece = totals[kind][offsets[kind]:offsets[kind] + size].reshape(leaf.shape)
      if kind == _INT:  # Mean over processes, rounded half up, in exact integer arithmetic.
        piece = (piece + num_processes // 2) // num_processes
      value = piece.astype(leaf.dtype)
    offsets[kind] += size
    out.append(value)
  return jax.tree.unflatten(treedef, out)


class TreeAverager:
  """Weighted average of a per-process pytree over every process, as one collective.

  Usage (every process calls it at the same point, with its own tree and weight)::

    averager = TreeAverager(local_sharding)
    merged = averager(local_tree, weight)  # weights sum to 1 over the processes

  The result lives on the devices of ``out_sharding`` (normally this process's local mesh,
  replicated) and is bitwise identical on every process (one all-reduce whose result every
  process receives).

  Args:
    out_sharding: sharding of every leaf of the result (this process's devices only).
    mesh: the process mesh (default `process_mesh()`).
  """

  def __init__(self, out_sharding: jax.sharding.Sharding, mesh: Mesh | None = None):
    self._mesh = process_mesh() if mesh is None else mesh
    self._device = _own_device(self._mesh)
    if self._device not in out_sharding.device_set:
      raise ValueError(f'out_sharding must include this process\'s device {self._device} of '
                       'the process mesh.')
    self._out_sharding = out_sharding
    self._row_sharding = NamedSharding(self._mesh, PartitionSpec(PROCESS_AXIS))
    num_processes = self._mesh.devices.size
    self._pack = jax.jit(_pack, out_shardings=out_sharding)
    self._sum = jax.jit(functools.partial(jnp.sum, axis=0),
                        out_shardings=NamedSharding(self._mesh, PartitionSpec()))
    self._unpack = jax.jit(functools.partial(_unpack, num_processes=num_processes),
                           out_shardings=out_sharding)
    self._is_first = jax.process_index() == 0

  def __call__(self, tree: Any, weight: float) -> Any:
    """Returns sum_p weight_p * tree_p (floats), mean (integers), process 0's keys.

    Args:
      tree: this process's pytree, laid out as ``out_sharding``.
      weight: this process's weight; the weights of all processes should sum to 1.
    """
    rows = self._pack(tree, jnp.float32(weight), jnp.bool_(self._is_first))
    totals = {}
    for kind, row in rows.items():
      own = next(s.data for s in row.addressable_shards if s.device == self._device)
      global_row = jax.make_array_from_single_device_arrays(
          (self._mesh.devices.size,) + row.shape[1:], self._row_sharding, [own])
      totals[kind] = self._sum(global_row).addressable_data(0)
    # Back onto this process's devices (the sum lives on the process-mesh device).
    totals = jax.device_put(totals, self._out_sharding)
    return self._unpack(totals, tree)


def allgather_rows(row: np.ndarray, mesh: Mesh | None = None) -> np.ndarray:
  """Stacks every process's ``row`` (same shape and dtype everywhere): [P, *row.shape].

  A jitted identity from a process-sharded to a replicated array, i.e. an all-gather over
  the same collectives as `TreeAverager`.

  Args:
    row: this process's values (numpy, e.g. a `WorkerStats.to_vectors()` row).
    mesh: the process mesh (default `process_mesh()`).

  Returns:
    Host array with process p's row at index p, identical on every process.
  """
  mesh = process_mesh() if mesh is None else mesh
  row = np.asarray(row)
  local = jax.device_put(row[None], _own_device(mesh))
  global_rows = jax.make_array_from_single_device_arrays(
      (mesh.devices.size,) + row.shape, NamedSharding(mesh, PartitionSpec(PROCESS_AXIS)),
      [local])
  gathered = _gather(global_rows, NamedSharding(mesh, PartitionSpec()))
  return np.asarray(gathered.addressable_data(0))


@functools.partial(jax.jit, static_argnums=(1,))
def _gather(rows: jax.Array, replicated: NamedSharding) -> jax.Array:
  return jax.lax.with_sharding_constraint(rows, replicated)
