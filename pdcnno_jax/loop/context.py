"""`Experiment`: what the stages and every training mode share for one run.

The experiment layer builds it (`pdcnno_jax.experiment.setup`); modes and stages read it and
record their results in it. Its architecture fields (``graphdef``, ``model_overrides``) change
when pruning compacts the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.models import factory
from pdcnno_jax.optim import factory as optim_factory
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import report as report_lib


@dataclasses.dataclass
class Experiment:
  """Everything the stages and modes share: config, data, mesh, model structure, bookkeeping.

  Attributes:
    config: the full experiment config.
    workdir: run directory (checkpoints, metrics, report).
    dataset: the loaded data set.
    mesh: the mesh the mode asked for (every device of every process, or this process's).
    preprocess: uint8 images -> normalised float32 (runs inside jitted steps).
    graphdef: static structure of the current model (changes when pruning compacts it).
    model_overrides: constructor arguments of the current architecture (compaction).
    timer: wall time per phase.
    writer: metric sink.
    stage_reports: reports of the init / pruning stages and of the mode, kept in checkpoints.
    mode_resume: what the training mode needs to resume mid-way (e.g. MapReduce's next round
      and its block assignment), kept in checkpoints.
  """
  config: ml_collections.ConfigDict
  workdir: str
  dataset: input_pipeline.Dataset
  mesh: jax.sharding.Mesh
  preprocess: Callable[[jax.Array], jax.Array]
  graphdef: Any = None
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  timer: report_lib.PhaseTimer = dataclasses.field(default_factory=report_lib.PhaseTimer)
  writer: metrics_lib.MetricWriter | None = None
  stage_reports: dict[str, Any] = dataclasses.field(default_factory=dict)
  mode_resume: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def global_batch_size(self) -> int:
    return self.config.data.batch_size

  @property
  def steps_per_epoch(self) -> int:
    return input_pipeline.steps_per_epoch(self.dataset, 'train', self.global_batch_size)

  @property
  def eval_split(self) -> str:
    """The split evaluated during training: validation where the data set has one."""
    return 'validation' if 'validation' in self.dataset.splits else 'test'

  def step_limit(self, total_steps: int) -> int:
    """``total_steps`` capped by ``config.max_steps`` (0: no cap)."""
    cap = int(self.config.max_steps)
    return min(total_steps, cap) if cap > 0 else total_steps

  def build_model(self, seed: int | None = None) -> nnx.Module:
    """The current architecture (with compaction overrides) freshly initialised."""
    seed = self.config.seed if seed is None else seed
    return factory.build_model(self.config.model, num_classes=self.dataset.num_classes,
                               input_shape=self.dataset.image_shape, rngs=nnx.Rngs(seed),
                               **self.model_overrides)

  def build_optimizer(self, num_epochs: float | None = None):
    """The configured optimizer with a schedule over ``num_epochs`` (default: the run's)."""
    epochs = self.config.num_epochs if num_epochs is None else num_epochs
    return optim_factory.build_optimizer(
        self.config.optimizer, total_steps=max(1, int(epochs * self.steps_per_epoch)),
        steps_per_epoch=self.steps_per_epoch)
