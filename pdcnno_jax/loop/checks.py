"""Health checks of a running loop, the same for every mode: non-finite loss and collapse."""

from __future__ import annotations

import math

import ml_collections

from pdcnno_jax.diagnostics import collapse
from pdcnno_jax.loop import context
from pdcnno_jax.optim import factory as optim_factory


class DivergedError(FloatingPointError):
  """Training diverged; the run stops before saving the bad state (the last good one stays)."""


class NonFiniteLossError(DivergedError):
  """The training loss became NaN or inf."""


def non_finite_message(loss: float, *, where: str, last_good: int | None,
                       workdir: str) -> str:
  """The one message every mode gives for a NaN/inf loss (what happened, what to change)."""
  kept = (f'the last good checkpoint is step {last_good} in {workdir}'
          if last_good is not None else f'no checkpoint was written yet in {workdir}')
  return (f'Training loss is {loss} at {where}. The run stops here; {kept}. Lower '
          'config.optimizer.learning_rate, add config.optimizer.warmup_epochs or set '
          'config.optimizer.grad_clip_norm.')


def check_finite_loss(loss: float, *, where: str, last_good: int | None,
                      workdir: str) -> None:
  """Raises `NonFiniteLossError` when ``loss`` is NaN or inf.

  Args:
    loss: mean training loss of the last window.
    where: position in the run for the message (e.g. ``'step 120 (train)'``).
    last_good: the newest committed checkpoint step, or None.
    workdir: the run directory (named in the message).
  """
  if not math.isfinite(loss):
    raise NonFiniteLossError(non_finite_message(loss, where=where, last_good=last_good,
                                                workdir=workdir))


class CollapseWatch:
  """Feeds every log window to the collapse detector; raises when training sat at the prior.

  A collapsed network predicts the class prior (loss ln C, chance accuracy) and never
  recovers; after a whole post-warm-up epoch of it the run stops with
  `collapse.TrainingCollapseError`, before the next checkpoint, so the last good one stays.
  ``config.diagnostics.collapse_check=False`` turns the watch off.
  """

  def __init__(self, diagnostics_config: ml_collections.ConfigDict, num_classes: int,
               workdir: str, *, examples_per_epoch: int, warmup_steps: int, phase: str):
    self.detector = collapse.make_detector(diagnostics_config, num_classes, examples_per_epoch)
    self.warmup_steps = warmup_steps
    self.phase = phase
    self.workdir = workdir

  @classmethod
  def of(cls, exp: context.Experiment, **kwargs) -> CollapseWatch:
    """The watch of ``exp``'s loop (keyword arguments as the constructor's)."""
    return cls(exp.config.diagnostics, exp.dataset.num_classes, exp.workdir, **kwargs)

  def observe(self, loss: float, accuracy: float, *, first_step: int, step: int,
              examples: int, epoch: int, last_good: int | None) -> None:
    """One window of steps ``first_step .. step`` (0-based first step, ``step`` done)."""
    if self.detector is None:
      return
    if self.detector.update(loss, accuracy, examples, epoch=epoch,
                            in_warmup=first_step < self.warmup_steps):
      raise self.detector.error(step=step, phase=self.phase, workdir=self.workdir,
                                last_checkpoint=last_good)


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Steps of the learning-rate warm-up, as `optim.factory` builds the schedule."""
  return optim_factory.warmup_steps(config.optimizer, steps_per_epoch)
