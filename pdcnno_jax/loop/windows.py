"""Metric windows: per-step device metrics gathered and averaged once per log interval.

Steps return small device arrays; fetching them every step would synchronise the host with
the device. A window keeps them and fetches the whole interval in one ``device_get``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np


class MetricWindow:
  """Per-step metric dicts of one log interval."""

  def __init__(self):
    self._pending: list[Mapping[str, Any]] = []

  def add(self, metrics: Mapping[str, Any]) -> None:
    self._pending.append(metrics)

  def __len__(self) -> int:
    return len(self._pending)

  def mean(self) -> dict[str, float]:
    """Fetches the window, returns the mean of every metric and starts a new window."""
    values = jax.device_get(self._pending)
    self._pending = []
    if not values:
      return {}
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}
