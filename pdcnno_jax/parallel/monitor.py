"""Per-worker monitor: throughput and resource utilisations over a window (one round).

The MapReduce loop opens a window at the start of a round, records each finished step's sample
count and busy seconds (two float additions, no system calls), and closes the window at the
round boundary, where the operating-system counters are read once. The result is this worker's
`WorkerStats` (one row); the loop gathers every worker's row (`WorkerStats.to_vectors`) and
hands them to a balancer.

Utilisations are fractions in [0, 1], NaN where the host or backend cannot tell:
  node         busy share of all CPUs over the window (from psutil.cpu_times deltas);
  memory       used share of host memory at the window's end;
  disk         share of the window some disk was busy (Linux busy_time, like iostat %util),
               else bytes moved / disk_bandwidth_bytes_per_s when that is given;
  network      bytes sent + received on non-loopback interfaces / link bandwidth (from
               psutil.net_if_stats, or network_bandwidth_bytes_per_s when given);
  accelerator  bytes_in_use / bytes_limit of the fullest local device (jax memory_stats();
               None on CPU, hence NaN there).

References:
  PDCNNO paper, section "LBRLA": disk I/O, GPU, memory, network and node usage of each node;
  DESIGN.md "LBRLA" and "MapReduce training".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import psutil

from pdcnno_jax.parallel import balancers


@dataclasses.dataclass(frozen=True)
class _Counters:
  """Operating-system counters at one instant."""
  wall: float
  cpu_busy: float
  cpu_total: float
  disk_busy_ms: float | None
  disk_bytes: float | None
  network_bytes: float


def _read_counters(clock: Callable[[], float]) -> _Counters:
  cpu = psutil.cpu_times()
  # Linux counts guest time inside user time as well; do not count it twice.
  cpu_total = float(sum(cpu)) - getattr(cpu, 'guest', 0.0) - getattr(cpu, 'guest_nice', 0.0)
  cpu_idle = cpu.idle + getattr(cpu, 'iowait', 0.0)
  disk = psutil.disk_io_counters()
  network = psutil.net_io_counters(pernic=True)
  network_bytes = sum(c.bytes_sent + c.bytes_recv for name, c in network.items()
                      if not _is_loopback(name))
  return _Counters(
      wall=clock(),
      cpu_busy=cpu_total - cpu_idle,
      cpu_total=cpu_total,
      disk_busy_ms=None if disk is None else getattr(disk, 'busy_time', None),
      disk_bytes=None if disk is None else float(disk.read_bytes + disk.write_bytes),
      network_bytes=float(network_bytes))


def _is_loopback(interface: str) -> bool:
  return interface == 'lo' or (interface.startswith('lo') and interface[2:].isdigit())


def _link_bandwidth_bytes_per_s() -> float | None:
  """Sum of the reported speeds of the up, non-loopback interfaces; None when unknown."""
  megabits = sum(stats.speed for name, stats in psutil.net_if_stats().items()
                 if stats.isup and stats.speed > 0 and not _is_loopback(name))
  return megabits * 1e6 / 8 if megabits > 0 else None


def accelerator_memory_utilisation(devices: Sequence[Any] | None = None) -> float:
  """bytes_in_use / bytes_limit of the fullest device, NaN when no device reports it."""
  fractions = []
  for device in jax.local_devices() if devices is None else devices:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  # Backends without the query raise.
      stats = None
    if stats and stats.get('bytes_limit'):
      fractions.append(stats.get('bytes_in_use', 0) / stats['bytes_limit'])
  return float(np.clip(max(fractions), 0.0, 1.0)) if fractions else float('nan')


class WorkerMonitor:
  """Measures this worker's speed and utilisations over a window.

  Usage per round:

    monitor.start()
    for batch in my_blocks:
      state, seconds = slowdown.run(train_step, state, batch)
      monitor.record(num_samples=len(batch), busy_s=seconds)
    stats = monitor.stop()  # WorkerStats with one row: this worker.

  Speed is samples per busy second (time spent waiting for other workers is not busy time).
  A window without recorded work reuses the last measured speed.
  """

  def __init__(self, *, network_bandwidth_bytes_per_s: float | None = None,
               disk_bandwidth_bytes_per_s: float | None = None,
               devices: Sequence[Any] | None = None,
               clock: Callable[[], float] = time.perf_counter):
    """Initialises the monitor.

    Args:
      network_bandwidth_bytes_per_s: link bandwidth for the network utilisation; None reads it
        from the interfaces (NaN utilisation when they do not report a speed).
      disk_bandwidth_bytes_per_s: disk bandwidth, used only where the OS has no disk busy time.
      devices: accelerator devices to query; None means jax.local_devices().
      clock: monotonic clock in seconds.
    """
    self._network_bandwidth = network_bandwidth_bytes_per_s
    self._disk_bandwidth = disk_bandwidth_bytes_per_s
    self._devices = devices
    self._clock = clock
    self._start: _Counters | None = None
    self._samples = 0.0
    self._busy_s = 0.0
    self._steps = 0
    self._last_speed: float | None = None

  @property
  def steps(self) -> int:
    """Steps recorded in the open window."""
    return self._steps

  @property
  def mean_step_s(self) -> float:
    """Mean busy seconds per recorded step of the open window (NaN when none)."""
    return self._busy_s / self._steps if self._steps else float('nan')

  def start(self) -> None:
    """Opens a window: snapshots the counters and clears the accumulators."""
    self._start = _read_counters(self._clock)
    self._samples = 0.0
    self._busy_s = 0.0
    self._steps = 0

  def record(self, num_samples: float, busy_s: float, steps: int = 1) -> None:
    """Adds finished work to the window. Cheap: no system calls.

    Args:
      num_samples: samples the work processed.
      busy_s: seconds it took (device work finished, slowdown included).
      steps: how many steps it was.
    """
    if num_samples < 0 or busy_s < 0 or steps < 0:
      raise ValueError(
          f'num_samples, busy_s and steps must be >= 0, got {num_samples}, {busy_s}, {steps}.')
    self._samples += num_samples
    self._busy_s += busy_s
    self._steps += steps

  def stop(self) -> balancers.WorkerStats:
    """Closes the window and returns this worker's `WorkerStats` (one row).

    Raises:
      RuntimeError: `start` was not called, or no work has ever been recorded (no speed).
    """
    if self._start is None:
      raise RuntimeError('WorkerMonitor.stop() called without start().')
    end = _read_counters(self._clock)
    begin, self._start = self._start, None
    wall_s = max(end.wall - begin.wall, 1e-9)
    if self._samples > 0 and self._busy_s > 0:
      self._last_speed = self._samples / self._busy_s
    if self._last_speed is None:
      raise RuntimeError(
          'WorkerMonitor recorded no work yet, so this worker has no speed to report; give '
          'every worker at least one block (min_blocks >= 1) or record() its steps.')
    utilisation = dict(
        node=_fraction(end.cpu_busy - begin.cpu_busy, end.cpu_total - begin.cpu_total),
        memory=psutil.virtual_memory().percent / 100.0,
        disk=self._disk_utilisation(begin, end, wall_s),
        network=self._network_utilisation(begin, end, wall_s),
        accelerator=accelerator_memory_utilisation(self._devices))
    return balancers.WorkerStats(
        speed=np.array([self._last_speed]),
        utilisation={k: np.array([v]) for k, v in utilisation.items()},
        busy_s=np.array([self._busy_s]),
        wall_s=np.array([wall_s]))

  def _disk_utilisation(self, begin: _Counters, end: _Counters, wall_s: float) -> float:
    if begin.disk_busy_ms is not None and end.disk_busy_ms is not None:
      return _fraction(end.disk_busy_ms - begin.disk_busy_ms, 1000.0 * wall_s)
    if self._disk_bandwidth and begin.disk_bytes is not None and end.disk_bytes is not None:
      return _fraction(end.disk_bytes - begin.disk_bytes, self._disk_bandwidth * wall_s)
    return float('nan')

  def _network_utilisation(self, begin: _Counters, end: _Counters, wall_s: float) -> float:
    bandwidth = self._network_bandwidth or _link_bandwidth_bytes_per_s()
    if not bandwidth:
      return float('nan')
    return _fraction(end.network_bytes - begin.network_bytes, bandwidth * wall_s)


def _fraction(numerator: float, denominator: float) -> float:
  if denominator <= 0:
    return float('nan')
  return float(np.clip(numerator / denominator, 0.0, 1.0))
