"""Bytes moved and time spent moving them, per worker and per job: ``report['transport']``.

Every Ray mode counts what each worker pushes (``bytes_sent``) and pulls (``bytes_received``)
through the object store and the seconds those transfers took, so a run's effective throughput,
``(bytes_sent + bytes_received) / transfer_seconds``, can be read off its report.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator, Sequence


def balance_by_bytes(nbytes: Sequence[int], num_groups: int) -> list[list[int]]:
  """Leaf indices in ``num_groups`` groups of about equal bytes (greedy, largest leaf first).

  Each leaf goes to the lightest group so far (ties to the lower index); every leaf is in
  exactly one group. The SSP shards and MapReduce's Reduce leaf groups both split this way.
  """
  loads, groups = [0] * num_groups, [[] for _ in range(num_groups)]
  for index in sorted(range(len(nbytes)), key=lambda i: (-nbytes[i], i)):
    lightest = min(range(num_groups), key=lambda g: (loads[g], g))
    groups[lightest].append(index)
    loads[lightest] += int(nbytes[index])
  return [sorted(g) for g in groups]


@dataclasses.dataclass
class TransferLog:
  """One worker's transfer totals (plain numbers, so it travels through Ray as is)."""

  bytes_sent: int = 0
  bytes_received: int = 0
  transfer_seconds: float = 0.0
  transfers: int = 0

  def record(self, *, sent: int = 0, received: int = 0, seconds: float = 0.0) -> None:
    self.bytes_sent += int(sent)
    self.bytes_received += int(received)
    self.transfer_seconds += float(seconds)
    self.transfers += 1

  @contextlib.contextmanager
  def timed(self, *, sent: int = 0, received: int = 0) -> Iterator[None]:
    """Records one transfer of the given sizes that takes as long as the ``with`` body."""
    start = time.perf_counter()
    yield
    self.record(sent=sent, received=received, seconds=time.perf_counter() - start)

  def as_dict(self) -> dict[str, Any]:
    moved = self.bytes_sent + self.bytes_received
    return dict(bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
                transfer_seconds=self.transfer_seconds, transfers=self.transfers,
                mib_per_s=(moved / 2**20 / self.transfer_seconds
                           if self.transfer_seconds > 0 else None))


def job_transport(workers: Sequence[TransferLog]) -> dict[str, Any]:
  """``report['transport']``: the totals over ``workers`` and each worker's own (``workers``)."""
  total = TransferLog()
  for log in workers:
    total.record(sent=log.bytes_sent, received=log.bytes_received,
                 seconds=log.transfer_seconds)
  total.transfers = sum(log.transfers for log in workers)
  return dict(total.as_dict(), workers=[log.as_dict() for log in workers])
