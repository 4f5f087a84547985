"""Checkpoint saves with what resuming needs to rebuild the experiment (architecture, reports).

A checkpoint holds the `TrainState` plus JSON metadata: the phase that wrote it, the
constructor overrides of a compacted architecture, the stage reports and the mode's resume
data. `restore_meta` puts the last three back into an `Experiment`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from pdcnno_jax.loop import checks
from pdcnno_jax.loop import context
from pdcnno_jax.loop import faults
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import state as state_lib


def jsonable(tree: Any) -> Any:
  """``tree`` with NumPy scalars/arrays as Python numbers/lists and string keys."""
  if isinstance(tree, dict):
    return {str(k): jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [jsonable(v) for v in tree]
  if isinstance(tree, (np.generic, np.ndarray)):
    return tree.tolist()
  return tree


def architecture_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
  """Constructor overrides read back from JSON (lists of widths become tuples)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def save(exp: context.Experiment, checkpointer: checkpointing.Checkpointer,
         state: state_lib.TrainState, *, phase: str, loss: float | None = None) -> None:
  """Saves ``state`` (once per step) with the metadata `restore_meta` reads.

  Args:
    exp: the experiment (architecture, stage reports and mode resume data go in the meta).
    checkpointer: the run's checkpointer (it checks the state's health before writing).
    state: the state to save.
    phase: the phase that saves (recorded in the meta).
    loss: mean training loss of the last log window, for the health check (None: skip it).

  Raises:
    checks.DivergedError: the state is not healthy (NaN/inf, loss or parameter norm exploded);
      it is not written and the last good checkpoint is kept.
  """
  step = int(jax.device_get(state.step))
  if checkpointer.latest_step() == step:
    return
  meta = {'phase': phase, 'model_overrides': jsonable(exp.model_overrides),
          'stage_reports': jsonable(exp.stage_reports),
          'mode_resume': jsonable(exp.mode_resume)}
  with exp.timer.phase('checkpoint'):
    try:
      checkpointer.save(step, state, meta, loss=loss)
    except checkpointing.UnhealthyStateError as e:
      raise checks.DivergedError(
          f'{e} Lower config.optimizer.learning_rate, add config.optimizer.warmup_epochs or '
          'set config.optimizer.grad_clip_norm.') from None
  faults.maybe_kill(faults.STEP_ENV, step)


def restore_meta(exp: context.Experiment, meta: dict[str, Any]) -> None:
  """Puts a checkpoint's architecture, stage reports and mode resume data into ``exp``."""
  exp.model_overrides = architecture_overrides(meta['model_overrides'])
  exp.stage_reports = meta['stage_reports']
  exp.mode_resume = meta['mode_resume']
