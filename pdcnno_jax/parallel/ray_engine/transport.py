"""Bytes moved and time spent moving them, per worker and per job: ``report['transport']``.

Every Ray mode counts what each worker pushes (``bytes_sent``) and pulls (``bytes_received``)
through the object store and the seconds those transfers took, so a run's effective throughput,
``(bytes_sent + bytes_received) / transfer_seconds``, can be read off its report.json.
`FlatLayout` packs the small arrays of a list into one contiguous buffer per dtype, so that a
push or a reply of a small model is one array for Ray to serialise instead of one per leaf.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator, Sequence

import numpy as np


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


# Leaves of at least this many bytes travel as buffers of their own (views, no copy): packing
# them would copy them into fresh memory, which costs more than the per-leaf overhead it saves
# (np.concatenate of VGG-16's 58 MiB took 0.2-0.8 s on the 2-core test machine).
ALONE_FROM_BYTES = 2**20


class FlatLayout:
  """Where each leaf of a list of arrays lies in a few flat buffers.

  Leaves under ``alone_from_bytes`` are packed into one contiguous buffer per dtype; larger
  leaves are flat buffers of their own (a view of the leaf where it is contiguous). Buffers
  come in the order their first leaf appears; `unpack` returns views into them (no copy), so
  read-only buffers from Ray's object store give read-only leaves.

  Args:
    leaves: arrays whose shapes and dtypes define the layout.
    alone_from_bytes: leaves of at least this many bytes are not packed with others.
  """

  def __init__(self, leaves: Sequence[Any], alone_from_bytes: int = ALONE_FROM_BYTES):
    self.shapes = [tuple(np.shape(x)) for x in leaves]
    self.dtypes = [np.dtype(np.asarray(x).dtype) for x in leaves]
    self.buffer_dtypes: list[np.dtype] = []
    self.buffer_sizes: list[int] = []
    self.slots = []  # (buffer, start, stop) of each leaf.
    packed: dict[np.dtype, int] = {}  # dtype -> its packed buffer.
    for shape, dtype in zip(self.shapes, self.dtypes):
      size = int(np.prod(shape, dtype=np.int64))
      alone = size * dtype.itemsize >= alone_from_bytes
      if alone or dtype not in packed:
        self.buffer_dtypes.append(dtype)
        self.buffer_sizes.append(0)
        if not alone:
          packed[dtype] = len(self.buffer_sizes) - 1
      b = len(self.buffer_sizes) - 1 if alone else packed[dtype]
      self.slots.append((b, self.buffer_sizes[b], self.buffer_sizes[b] + size))
      self.buffer_sizes[b] += size

  def pack(self, leaves: Sequence[Any]) -> list[np.ndarray]:
    """The buffers holding ``leaves`` (a buffer of one leaf is a view of it).

    Raises:
      ValueError: ``leaves`` differ from the layout in number, shape or dtype.
    """
    if len(leaves) != len(self.shapes):
      raise ValueError(f'FlatLayout.pack: {len(leaves)} arrays for a layout of '
                       f'{len(self.shapes)}.')
    parts: list[list[np.ndarray]] = [[] for _ in self.buffer_dtypes]
    for i, (leaf, (b, _, _)) in enumerate(zip(leaves, self.slots)):
      leaf = np.asarray(leaf)
      if leaf.shape != self.shapes[i] or leaf.dtype != self.dtypes[i]:
        raise ValueError(f'FlatLayout.pack: array {i} is {leaf.dtype}{list(leaf.shape)}, the '
                         f'layout says {self.dtypes[i]}{list(self.shapes[i])}.')
      parts[b].append(leaf.ravel())
    return [np.concatenate(p) if len(p) > 1 else p[0] for p in parts]

  def unpack(self, buffers: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The leaves as views into ``buffers`` (as `pack` returns them)."""
    return [buffers[b][start:stop].reshape(shape)
            for (b, start, stop), shape in zip(self.slots, self.shapes)]

  def nbytes(self) -> int:
    return sum(n * d.itemsize for n, d in zip(self.buffer_sizes, self.buffer_dtypes))


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
