"""The training modes, registered in one table: the only list of ``config.parallel.mode`` values.

Every mode is a module with the same small interface (`Mode`): which mesh it trains on, whether
it uses the run's orbax checkpointer, ``validate(config, dataset)`` (called before any
training) and ``train(exp, state, *, tx, checkpointer) -> (state, report)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import ml_collections

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import context
from pdcnno_jax.parallel import mapreduce
from pdcnno_jax.parallel import sync
from pdcnno_jax.parallel.ssp import training as ssp_training
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import state as state_lib


class Mode(Protocol):
  """What the experiment layer needs of a training mode."""

  MESH: str  # 'global': every device of every process; 'local': this process's devices.
  USES_CHECKPOINTER: bool  # False: the mode keeps its own (e.g. per-worker) checkpoints.

  def validate(self, config: ml_collections.ConfigDict,
               dataset: input_pipeline.Dataset) -> None:
    ...

  def train(self, exp: context.Experiment, state: state_lib.TrainState, *, tx: Any,
            checkpointer: checkpointing.Checkpointer | None
            ) -> tuple[state_lib.TrainState, dict[str, Any]]:
    ...


MODES: dict[str, Mode] = {
    'sync': sync,
    'mapreduce': mapreduce,
    'ssp': ssp_training,
}


# How the MapReduce mode runs: 'ray' (worker actors of one driver process,
# `parallel.ray_engine`) or 'jax' (one process per worker joined by jax.distributed). SSP runs
# on Ray only (config_validation rejects 'jax' with it).
ENGINES = ('ray', 'jax')


def get_mode(name: str) -> Mode:
  """The mode registered as ``name``; a clear error naming the choices otherwise."""
  if name not in MODES:
    raise ValueError(f'Unknown config.parallel.mode={name!r}; use one of {sorted(MODES)}.')
  return MODES[name]
