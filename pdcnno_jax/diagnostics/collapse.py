"""Collapse detector: training that sits at the class prior (loss ln C, chance accuracy).

A network whose ReLUs all die (or whose logits stop depending on the input) predicts the
class prior: its cross-entropy is ln(C) and its accuracy is chance, 1 / C on balanced
classes, and it never recovers because no gradient reaches the dead units. The detector is
fed the training loss and accuracy of every log window; when the windows of at least one
whole epoch of examples in a row, all after the learning-rate warm-up, have a loss within
``tolerance * ln(C)`` of ln(C) and an accuracy at most ``chance_factor / C``, it reports a
collapse, and :meth:`CollapseDetector.error` builds the error that stops the run.

References:
  DESIGN.md, "Diagnostics"; Lu et al. 2019, "Dying ReLU and initialization"; Goyal et al.
  2017, "Accurate, large minibatch SGD" (learning-rate warm-up).
"""

from __future__ import annotations

import math
from typing import Optional

import ml_collections


class TrainingCollapseError(RuntimeError):
  """Training collapsed to the class prior; the run stops (its last checkpoint is kept)."""


class CollapseDetector:
  """Watches per-log-window (loss, accuracy) for a whole post-warm-up epoch at the prior.

  Args:
    num_classes: C.
    examples_per_epoch: training examples in one epoch of the phase being watched.
    tolerance: relative band around ln(C) (0.02: within 2%).
    chance_factor: accuracy at most ``chance_factor / C`` counts as chance.
  """

  def __init__(self, num_classes: int, examples_per_epoch: int, *, tolerance: float = 0.02,
               chance_factor: float = 1.5):
    if num_classes < 2:
      raise ValueError(f'CollapseDetector needs num_classes >= 2, got {num_classes}.')
    if examples_per_epoch < 1:
      raise ValueError(f'CollapseDetector needs examples_per_epoch >= 1, got '
                       f'{examples_per_epoch}.')
    self.num_classes = int(num_classes)
    self.examples_per_epoch = int(examples_per_epoch)
    self.tolerance = float(tolerance)
    self.chance_factor = float(chance_factor)
    self.prior_loss = math.log(num_classes)
    self.streak_examples = 0  # Consecutive post-warm-up examples at the prior.
    self.streak_start_epoch: Optional[int] = None
    self.last: Optional[tuple[float, float, int]] = None  # (loss, accuracy, epoch).

  def at_prior(self, loss: float, accuracy: float) -> bool:
    """Whether one window's loss and accuracy are those of the class prior."""
    return (abs(loss - self.prior_loss) <= self.tolerance * self.prior_loss
            and accuracy <= self.chance_factor / self.num_classes)

  def update(self, loss: float, accuracy: float, examples: int, *, epoch: int,
             in_warmup: bool) -> bool:
    """Feeds one log window; True once a whole post-warm-up epoch sat at the prior.

    Args:
      loss: the window's mean training loss.
      accuracy: the window's mean training accuracy.
      examples: training examples in the window (steps x global batch).
      epoch: the (0-based) epoch the window ends in, for the message.
      in_warmup: whether any step of the window was still in the learning-rate warm-up.
    """
    self.last = (float(loss), float(accuracy), int(epoch))
    if in_warmup or not self.at_prior(loss, accuracy):
      self.streak_examples, self.streak_start_epoch = 0, None
      return False
    if self.streak_start_epoch is None:
      self.streak_start_epoch = int(epoch)
    self.streak_examples += int(examples)
    return self.streak_examples >= self.examples_per_epoch

  def message(self, *, step: int, phase: str = 'train', workdir: str = '',
              last_checkpoint: Optional[int] = None) -> str:
    """What happened and what to change, in one paragraph."""
    loss, accuracy, epoch = self.last if self.last else (float('nan'),) * 2 + (0,)
    where = (f'the last checkpoint (step {last_checkpoint}) is kept in {workdir}'
             if last_checkpoint is not None else f'no checkpoint was written in {workdir!r}')
    return (
        f'Training collapsed ({phase}): for {self.streak_examples} examples (>= one epoch of '
        f'{self.examples_per_epoch}) since epoch {self.streak_start_epoch}, up to step {step}'
        f' of epoch {epoch}, the training loss stayed within {100 * self.tolerance:g}% of '
        f'ln({self.num_classes}) = {self.prior_loss:.4f} (last {loss:.4f}) at chance accuracy '
        f'(last {accuracy:.4f}): the network predicts the class prior, typically because its '
        f'ReLUs died in the first steps. The run stops; {where}. Lower '
        'config.optimizer.learning_rate or raise config.optimizer.warmup_epochs (e.g. 1), '
        'then start in a fresh workdir; set config.diagnostics.collapse_check=False to train on '
        'regardless.')

  def error(self, **kwargs) -> TrainingCollapseError:
    """:class:`TrainingCollapseError` with :meth:`message` (same keyword arguments)."""
    return TrainingCollapseError(self.message(**kwargs))


def make_detector(diagnostics_config: ml_collections.ConfigDict, num_classes: int,
                  examples_per_epoch: int) -> Optional[CollapseDetector]:
  """The detector ``config.diagnostics`` asks for, or None when ``collapse_check`` is off."""
  if not diagnostics_config.collapse_check:
    return None
  return CollapseDetector(num_classes, examples_per_epoch,
                          tolerance=float(diagnostics_config.collapse_tolerance),
                          chance_factor=float(diagnostics_config.collapse_chance_factor))
