"""Orbax checkpoints of the training state, with resume from the workdir alone.

A checkpoint holds the full :class:`~pdcnno_jax.train.state.TrainState` (parameters,
feature masks, BatchNorm statistics, optimizer state, step) plus a small JSON record
(epoch, phase, anything a stage needs to resume). Saves are asynchronous; only finite
states are ever written, so the newest checkpoint is always a good one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class NonFiniteStateError(RuntimeError):
  """Raised instead of saving a state with NaN or inf parameters."""


def is_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite (one device->host sync)."""
  flags = [jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  return bool(np.all(jax.device_get(flags))) if flags else True


def load_arrays(state_dir: str) -> Any:
  """Reads a saved state directory (``<ckpt>/<step>/state``) as host arrays on one device.

  Works whatever topology (processes, devices) wrote it: the tree of shapes and dtypes is
  read from the checkpoint's metadata. For tests, tools and notebooks.
  """
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        tree)
  return jax.device_get(checkpointer.restore(state_dir, target))


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for one workdir.

  Args:
    directory: where checkpoints go (``<workdir>/checkpoints``).
    keep: number of most recent checkpoints kept.
    async_save: write in a background thread (the next steps overlap the write).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = True) -> None:
    """Saves ``state`` and ``meta`` at ``step`` after checking the state is finite.

    Raises:
      NonFiniteStateError: when a parameter is NaN/inf (the previous checkpoint is kept).
    """
    if not is_finite(state.params):
      raise NonFiniteStateError(
          f'Parameters are not finite at step {step}; not saving. The last good checkpoint '
          f'(step {self.latest_step()}) is kept in {self.directory}.')
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores the state (laid out like ``abstract_state``) and meta of ``step``.

    Args:
      abstract_state: a state pytree (or its ``jax.ShapeDtypeStruct`` tree with shardings)
        giving structure, shapes, dtypes and shardings of the restored arrays.
      step: which checkpoint; the latest by default.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return restored['state'], restored['meta']

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of ``step`` (latest by default) without loading the state."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return restored['meta']

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
