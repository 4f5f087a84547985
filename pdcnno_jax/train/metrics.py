"""Metric sinks: TensorBoard event files, a JSONL log and a progress line.

Only process 0 writes. Values are pulled to the host in one ``jax.device_get`` per log
interval, never per step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Writes scalars to ``<workdir>/tensorboard`` and ``<workdir>/metrics.jsonl``.

  Args:
    workdir: run directory.
    enabled: write anything at all (False on processes other than 0).
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')

  def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = '') -> None:
    """Records ``scalars`` at ``step`` (names get ``prefix/``)."""
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time()}
    for name, value in scalars.items():
      key = f'{prefix}/{name}' if prefix else name
      value = _to_python(value)
      record[key] = value
      if isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, int(step))
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


class Progress:
  """Formats a progress line with steps/s, images/s and ETA over the last interval."""

  def __init__(self, total_steps: int, global_batch_size: int, first_step: int = 0):
    self.total_steps = total_steps
    self.batch = global_batch_size
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def line(self, step: int, scalars: Mapping[str, float]) -> tuple[str, dict[str, float]]:
    """Returns the progress line and the rates it shows."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    elapsed = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    steps_per_s = steps / elapsed
    eta = (self.total_steps - step) / steps_per_s
    rates = {'steps_per_s': steps_per_s, 'images_per_s': steps_per_s * self.batch}
    shown = ' '.join(f'{k}={float(v):.4g}' for k, v in scalars.items())
    text = (f'step {step}/{self.total_steps} {shown} | {steps_per_s:.1f} steps/s '
            f'{rates["images_per_s"]:.0f} img/s | ETA {eta / 60:.1f} min')
    return text, rates


def log_line(text: str) -> None:
  """Logs on process 0 only."""
  if jax.process_index() == 0:
    logging.info('%s', text)
