"""A background thread that runs an iterator a few items ahead of its consumer.

The input pipeline prepares host batches (gather, assemble into global arrays) in this
thread so that host work overlaps device compute. Errors raised by the source re-raise in
the consumer; dropping or closing the iterator stops the thread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

_T = TypeVar('_T')
_END = object()


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: BaseException


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
  """Puts `item` unless `stop` is set first; returns whether it was put."""
  while not stop.is_set():
    try:
      out.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(source: Iterator[Any], out: queue.Queue, stop: threading.Event):
  """Thread body: moves `source` into `out` until exhausted or stopped."""
  try:
    for item in source:
      if not _put(out, stop, item):
        return
    _put(out, stop, _END)
  except BaseException as e:  # pylint: disable=broad-exception-caught
    _put(out, stop, _Failure(e))


class Prefetcher(Iterator[_T]):
  """Runs an iterator in a daemon thread, `size` items ahead of the consumer.

  Exceptions raised by the source are re-raised in the consumer. `close()`,
  also called when the consumer drops the iterator (the thread holds no
  reference to it), stops the thread.
  """

  def __init__(self, source: Iterable[_T], size: int):
    self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce,
        args=(iter(source), self._queue, self._stop),
        daemon=True,
    )
    self._thread.start()

  def __next__(self) -> _T:
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    """Stops the background thread (it exits within ~0.1 s)."""
    self._stop.set()
    self._done = True

  def __del__(self):
    self.close()


def maybe_prefetch(source: Iterable[_T], size: int) -> Iterator[_T]:
  """`Prefetcher(source, size)`, or `iter(source)` when `size` is 0."""
  return Prefetcher(source, size) if size > 0 else iter(source)
