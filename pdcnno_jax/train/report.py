"""The run report (``<workdir>/report.json``) and resource measurements.

The report gathers test accuracy and loss, wall time by phase (compile, train, eval and any
stage such as IFAS or pruning), peak host memory (RSS of this process) and peak device
memory where the backend reports it, and model size (params, MACs).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from typing import Any, Iterator

import jax


def peak_host_rss_bytes() -> int:
  """Peak resident set size of this process, in bytes."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == 'darwin' else peak * 1024)


def peak_device_memory_bytes() -> int | None:
  """Peak bytes in use on this process's devices, or None where the backend can't say."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  # Backends without memory stats raise.
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


class PhaseTimer:
  """Accumulates wall time per named phase (``with timer.phase('train'): ...``)."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - start)

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def write_report(workdir: str, report: dict[str, Any]) -> str:
  """Writes ``report`` as ``<workdir>/report.json`` (process 0 only); returns the path."""
  path = os.path.join(workdir, 'report.json')
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2, sort_keys=True, default=str)
    os.replace(path + '.tmp', path)
  return path
