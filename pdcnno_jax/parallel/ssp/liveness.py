"""Heartbeat leases in a `Store`: which SSP workers are alive.

JAX's live-node query is a collective with barrier semantics, so a worker blocked in an SSP
wait cannot use it alone. Instead every worker overwrites a heartbeat key from a background
thread, and a reader declares a worker dead when its key has not changed for ``timeout_s`` of
the reader's own monotonic clock (no cross-host clock comparison). A worker that never sent a
heartbeat is "not yet joined", not dead; a dead worker leaves the staleness bound.

References:
  DESIGN.md, "SSP" (a dead worker leaves the bound and may rejoin).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from pdcnno_jax.parallel.ssp import store as store_lib


class Heartbeat:
  """Background thread that overwrites `key` every `interval_s` seconds."""

  def __init__(self, store: store_lib.Store, key: str, interval_s: float):
    if interval_s <= 0:
      raise ValueError(f'interval_s must be > 0, got {interval_s}.')
    self._store = store
    self._key = key
    self._interval_s = interval_s
    self._incarnation = f'{os.getpid()}-{time.time_ns()}'
    self._count = 0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.error: BaseException | None = None

  def beat(self) -> None:
    self._count += 1
    self._store.set(self._key, f'{self._incarnation}:{self._count}'.encode(),
                    overwrite=True)

  def start(self) -> None:
    if self._thread is not None:
      return
    self.beat()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name=f'ssp-heartbeat-{self._key}')
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.wait(self._interval_s):
      try:
        self.beat()
      except Exception as e:  # pylint: disable=broad-except
        if self.error is None:  # E.g. CoordinatorUnavailableError: say why.
          logging.error('SSP heartbeat %s failed: %s', self._key, e)
        self.error = e  # Surfaces through SSPWorker.stats(); keep beating.

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None


class Liveness:
  """Tracks the heartbeat keys under `directory` as seen by this process."""

  def __init__(self, store: store_lib.Store, directory: str, timeout_s: float,
               time_fn=time.monotonic):
    if timeout_s <= 0:
      raise ValueError(f'timeout_s must be > 0, got {timeout_s}.')
    self._store = store
    self._directory = directory.rstrip('/')
    self._timeout_s = timeout_s
    self._time_fn = time_fn
    self._last_value: dict[int, bytes] = {}
    self._last_change: dict[int, float] = {}

  @property
  def timeout_s(self) -> float:
    return self._timeout_s

  def refresh(self) -> None:
    """Reads every heartbeat key once."""
    now = self._time_fn()
    for key, value in self._store.dir_get(self._directory):
      worker = int(key.rsplit('/', 1)[1])
      if self._last_value.get(worker) != value:
        self._last_value[worker] = value
        self._last_change[worker] = now

  def is_dead(self, worker: int) -> bool:
    """True if `worker` joined and its heartbeat is older than the timeout."""
    last = self._last_change.get(worker)
    return last is not None and self._time_fn() - last > self._timeout_s
