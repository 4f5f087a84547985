"""A small key-value store interface for the SSP engine, and an in-memory store.

The stale-synchronous-parallel protocol (`protocol.py`) needs only a handful of
operations from its parameter store: write-once (or explicitly overwritten)
keys, blocking reads with a timeout, non-blocking reads, directory listings,
deletes and barriers. `Store` states them; `InMemoryStore` implements them for
unit tests with threads; `coordination.CoordinationStore` implements them over
the key-value store of JAX's distributed runtime.

Keys are '/'-separated paths. A directory `d` holds every key that starts with
`d + '/'`; directory reads return full keys, sorted.

References:
  DESIGN.md, "SSP": "write-once keys, blocking get with timeout, barriers, ...
  behind a small store interface with an in-memory implementation for unit
  tests."
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
import threading
import time


class StoreError(RuntimeError):
  """Base class of the errors a `Store` raises."""


class StoreTimeoutError(StoreError, TimeoutError):
  """A blocking store operation did not complete within its timeout."""


class KeyExistsError(StoreError):
  """A write-once key was written a second time."""


class Store(abc.ABC):
  """Key-value store of the SSP protocol; implementations are thread-safe."""

  @abc.abstractmethod
  def set(self, key: str, value: bytes, *, overwrite: bool = False) -> None:
    """Stores `value` under `key`.

    Args:
      key: '/'-separated key.
      value: payload.
      overwrite: if False (default) the key is write-once.

    Raises:
      KeyExistsError: if the key exists and `overwrite` is False.
    """

  @abc.abstractmethod
  def get(self, key: str, timeout_s: float) -> bytes:
    """Returns the value of `key`, waiting up to `timeout_s` for it to appear.

    Raises:
      StoreTimeoutError: if the key did not appear in time.
    """

  @abc.abstractmethod
  def try_get(self, key: str) -> bytes | None:
    """Returns the value of `key`, or None if it does not exist."""

  @abc.abstractmethod
  def dir_get(self, directory: str) -> list[tuple[str, bytes]]:
    """Returns the (full key, value) pairs under `directory`, sorted by key."""

  @abc.abstractmethod
  def delete(self, key: str) -> None:
    """Deletes `key` and every key under directory `key`; missing is fine."""

  @abc.abstractmethod
  def barrier(self, name: str, timeout_s: float,
              participants: Sequence[int]) -> None:
    """Blocks until every process in `participants` reached barrier `name`.

    Barrier names are single-use.

    Args:
      name: unique barrier name.
      timeout_s: how long to wait.
      participants: ids of the processes taking part (the caller included).

    Raises:
      StoreTimeoutError: if some participant did not arrive in time.
    """


def check_key(key: str) -> None:
  if not isinstance(key, str) or not key or key.endswith('/'):
    raise ValueError(
        f'Store keys must be non-empty strings without a trailing "/", got '
        f'{key!r}.')


class InMemoryStore(Store):
  """Thread-safe in-process `Store`, for tests and single-process runs.

  One instance is shared by all the (thread) workers; `barrier` counts
  arrivals, so each participant must call it exactly once per name.
  """

  def __init__(self):
    self._data: dict[str, bytes] = {}
    self._cond = threading.Condition()
    self._barriers: dict[str, tuple[tuple[int, ...], int]] = {}

  def set(self, key: str, value: bytes, *, overwrite: bool = False) -> None:
    check_key(key)
    with self._cond:
      if not overwrite and key in self._data:
        raise KeyExistsError(f'Key {key!r} already exists (write-once).')
      self._data[key] = bytes(value)
      self._cond.notify_all()

  def get(self, key: str, timeout_s: float) -> bytes:
    check_key(key)
    deadline = time.monotonic() + max(timeout_s, 0.0)
    with self._cond:
      while key not in self._data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          raise StoreTimeoutError(
              f'Key {key!r} did not appear within {timeout_s:.3g} s.')
        self._cond.wait(remaining)
      return self._data[key]

  def try_get(self, key: str) -> bytes | None:
    check_key(key)
    with self._cond:
      return self._data.get(key)

  def dir_get(self, directory: str) -> list[tuple[str, bytes]]:
    prefix = directory.rstrip('/') + '/'
    with self._cond:
      return sorted((k, v) for k, v in self._data.items()
                    if k.startswith(prefix))

  def delete(self, key: str) -> None:
    prefix = key.rstrip('/') + '/'
    with self._cond:
      self._data.pop(key, None)
      for k in [k for k in self._data if k.startswith(prefix)]:
        del self._data[k]

  def barrier(self, name: str, timeout_s: float,
              participants: Sequence[int]) -> None:
    members = tuple(sorted(participants))
    deadline = time.monotonic() + timeout_s
    with self._cond:
      known, arrived = self._barriers.get(name, (members, 0))
      if known != members:
        raise ValueError(
            f'Barrier {name!r} was entered with participants {known} and now '
            f'with {members}; every participant must pass the same list.')
      self._barriers[name] = (members, arrived + 1)
      self._cond.notify_all()
      while self._barriers[name][1] < len(members):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          raise StoreTimeoutError(
              f'Barrier {name!r}: {self._barriers[name][1]} of {len(members)} '
              f'participants arrived within {timeout_s:.3g} s.')
        self._cond.wait(remaining)

  def __len__(self) -> int:
    with self._cond:
      return len(self._data)
