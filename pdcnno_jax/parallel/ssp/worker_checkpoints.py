"""Per-worker SSP checkpoints: one worker's replica and protocol state in a host-local file.

SSP workers die and rejoin one at a time, so they cannot use orbax's process-coordinated
checkpointer (it runs barriers on every save). Each worker writes
``<workdir>/ssp_worker_<k>/clock_<c>.ssp`` atomically in the project's pickle-free payload
format (`serialization`), keeping the newest `KEEP_CHECKPOINTS`.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import jax
import numpy as np
from absl import logging

from pdcnno_jax.parallel.ssp import serialization

KEEP_CHECKPOINTS = 2
_CHECKPOINT_PATTERN = re.compile(r'clock_(\d+)\.ssp$')


def to_host(tree: Any) -> Any:
  """Host numpy copy; PRNG key leaves become their raw key data."""

  def get(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return np.asarray(jax.random.key_data(x))
    return np.asarray(x)

  return jax.tree.map(get, jax.device_get(tree))


def from_host(host: Any, like: Any) -> Any:
  """Inverse of `to_host`, using ``like`` for key leaves' implementation."""

  def put(x, ref):
    if isinstance(ref, jax.Array) and jax.dtypes.issubdtype(ref.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
    return np.asarray(x)

  return jax.tree.map(put, host, like)


def save_worker_checkpoint(directory: str, clock: int, state: Any,
                           ssp_state: dict[str, np.ndarray], keep: int = KEEP_CHECKPOINTS) -> str:
  """Writes one worker's replica and SSP state atomically; keeps the newest ``keep``.

  Args:
    directory: the worker's checkpoint directory.
    clock: the worker's next clock (steps done).
    state: the worker's `TrainState` (device or host arrays).
    ssp_state: the worker's SSP position: ``next_clock`` and ``applied`` (per worker, the
      last clock applied; -1 where none), NumPy integers.
    keep: checkpoints kept.

  Returns:
    The file written.
  """
  os.makedirs(directory, exist_ok=True)
  payload = serialization.encode({'state': to_host(state),
                                  'ssp': {k: np.asarray(v) for k, v in ssp_state.items()}})
  path = os.path.join(directory, f'clock_{clock:010d}.ssp')
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  for old in list_worker_checkpoints(directory)[:-keep]:
    os.remove(old)
  return path


def list_worker_checkpoints(directory: str) -> list[str]:
  """Complete checkpoint files in ``directory``, oldest first."""
  paths = [p for p in glob.glob(os.path.join(directory, 'clock_*.ssp'))
           if _CHECKPOINT_PATTERN.search(p)]
  return sorted(paths, key=lambda p: int(_CHECKPOINT_PATTERN.search(p).group(1)))


def _read_intact(paths: list[str]) -> tuple[str, dict[str, np.ndarray]] | None:
  """The newest of ``paths`` whose payload passes its checksum, decoded; None if none does."""
  for path in reversed(paths):
    try:
      with open(path, 'rb') as f:
        return path, serialization.decode_flat(f.read())
    except (OSError, serialization.PayloadError) as e:
      logging.warning('Skipping SSP checkpoint %s: %s', path, e)
  return None


def load_worker_checkpoint(directory: str, like: Any) -> tuple[Any, dict[str, np.ndarray]] | None:
  """Newest intact checkpoint of ``directory`` as ``(host state like ``like``, SSP state)``.

  A checkpoint that is unreadable or fails its checksum is skipped with a warning, so one
  corrupt file does not stop a worker from rejoining; None when no intact one exists.

  Raises:
    serialization.PayloadError: when the checkpoint does not match ``like`` (a different model).
  """
  found = _read_intact(list_worker_checkpoints(directory))
  if found is None:
    return None
  path, flat = found
  ssp_state = {'next_clock': flat.pop("['ssp']['next_clock']"),
               'applied': flat.pop("['ssp']['applied']")}
  host_like = to_host(like)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(host_like)
  paths_expected = ["['state']" + jax.tree_util.keystr(p) for p, _ in leaves]
  if set(paths_expected) != set(flat):
    raise serialization.PayloadError(
        f'SSP checkpoint {path} does not match the current model/optimizer; delete '
        f'{directory} (or use a new workdir) to start this worker afresh.')
  host = jax.tree_util.tree_unflatten(treedef, [np.array(flat[p]) for p in paths_expected])
  return from_host(host, like), ssp_state
