"""Health checks of a running loop: one non-finite-loss check with one message for all modes."""

from __future__ import annotations

import math


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
