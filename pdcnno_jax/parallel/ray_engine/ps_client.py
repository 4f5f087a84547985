"""A worker's side of the SSP parameter server: push a delta, pull the parameters, per clock.

`PSClient.step` sends each shard (`ps.ParameterShard`) its part of the worker's delta and reads
back its leaves for the next clock in one call per shard, all shards at once: O(P) bytes per
clock. Deltas travel as NumPy arrays through Ray's object store and replies are read zero-copy.
The client keeps every delta until the shard's snapshot acknowledges it; when a shard restarted
(Ray raises on the call in flight, or the shard asks for ``resend_from``) it re-sends the kept
deltas in order and repeats the call, so every delta is applied exactly once. It counts the bytes
and seconds of every transfer (`transport.TransferLog`: the seconds a read waits for the SSP
bound are not transfer time) and the staleness of each view.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Sequence

import numpy as np

from pdcnno_jax.parallel.ray_engine import transport
from pdcnno_jax.parallel.ssp import serialization


class PSClient:
  """Worker ``worker``'s connection to every shard.

  Args:
    shards: the shard actor handles.
    assignment: leaf indices of each shard (`ps.split_by_bytes`).
    worker: this worker's index.
    staleness: s (None: ASP), for the view-staleness histogram.
    timeout_s: longest wait for a restarting shard.
  """

  def __init__(self, shards: Sequence[Any], assignment: Sequence[Sequence[int]], worker: int,
               staleness: int | None, timeout_s: float):
    self.shards = list(shards)
    self.assignment = [list(a) for a in assignment]
    self.num_leaves = sum(len(a) for a in assignment)
    self.worker = worker
    self.staleness = staleness
    self.timeout_s = float(timeout_s)
    self.log = transport.TransferLog()
    self.wait_seconds: list[float] = []
    self.view_staleness: collections.Counter = collections.Counter()
    self.update_age: collections.Counter = collections.Counter()
    self.resends = 0
    self._kept: list[collections.OrderedDict[int, list[np.ndarray]]] = [
        collections.OrderedDict() for _ in self.shards]

  def _call(self, shard: int, clock: int, part: list[np.ndarray] | None,
            read_clock: int | None) -> dict[str, Any]:
    """One shard's push-and-read, repeated after re-sends until the shard accepts it."""
    import ray  # pylint: disable=g-import-not-at-top
    deadline = time.monotonic() + self.timeout_s
    while True:
      try:
        reply = ray.get(self.shards[shard].push_and_read.remote(self.worker, clock, part,
                                                                read_clock))
      except ray.exceptions.RayActorError as e:
        if time.monotonic() > deadline:
          raise TimeoutError(f'PS shard {shard} did not come back within {self.timeout_s:.3g} s '
                             '(config.parallel.ssp_timeout_s).') from e
        time.sleep(0.2)  # Ray is restarting the shard: ask again.
        continue
      if 'resend_from' not in reply:
        return reply
      self._resend(shard, reply['resend_from'], clock)

  def _resend(self, shard: int, first: int, upto: int) -> None:
    """Pushes the kept deltas of clocks ``first`` .. ``upto`` - 1 to ``shard`` in order."""
    import ray  # pylint: disable=g-import-not-at-top
    for clock, part in self._kept[shard].items():
      if first <= clock < upto:
        ray.get(self.shards[shard].push_and_read.remote(self.worker, clock, part, None))
        self.resends += 1
        self.log.record(sent=serialization.payload_nbytes(part))

  def step(self, clock: int, delta: Sequence[np.ndarray] | None,
           read_clock: int | None) -> list[np.ndarray] | None:
    """Pushes ``delta`` (this worker's clock ``clock``) and reads for ``read_clock``.

    Args:
      clock: the clock of ``delta``.
      delta: the delta's leaves in the order of the parameter leaves; None: read only.
      read_clock: the clock the parameters read are for; None: push only.

    Returns:
      The parameter leaves (read-only NumPy views of the object store), or None.
    """
    import ray  # pylint: disable=g-import-not-at-top
    parts = [None if delta is None else [delta[i] for i in leaves]
             for leaves in self.assignment]
    start = time.perf_counter()
    replies = []
    for shard, part in enumerate(parts):
      if part is not None:
        self._kept[shard][clock] = part  # Kept until a snapshot of that shard covers it.
    # Every shard's call is in flight at once; a failed one is repeated on its own (`_call`).
    refs = [s.push_and_read.remote(self.worker, clock, part, read_clock)
            for s, part in zip(self.shards, parts)]
    for shard, ref in enumerate(refs):
      try:
        reply = ray.get(ref)
        if 'resend_from' in reply:
          self._resend(shard, reply['resend_from'], clock)
          reply = self._call(shard, clock, parts[shard], read_clock)
      except ray.exceptions.RayActorError:
        reply = self._call(shard, clock, parts[shard], read_clock)
      replies.append(reply)
    elapsed = time.perf_counter() - start
    wait = max(r['wait_s'] for r in replies)
    received = sum(serialization.payload_nbytes(r['leaves']) for r in replies if r['leaves'])
    self.log.record(sent=sum(serialization.payload_nbytes(p) for p in parts if p),
                    received=received, seconds=max(elapsed - wait, 0.0))
    self.wait_seconds.append(wait)
    for shard, reply in enumerate(replies):
      for kept in [c for c in self._kept[shard] if c <= reply['acked'][self.worker]]:
        del self._kept[shard][kept]
    if read_clock is None:
      return None
    self._count_staleness(read_clock, np.min([r['applied'] for r in replies], axis=0))
    leaves: list[Any] = [None] * self.num_leaves
    for indices, reply in zip(self.assignment, replies):
      for i, leaf in zip(indices, reply['leaves']):
        leaves[i] = leaf
    return leaves

  def _count_staleness(self, read_clock: int, applied: np.ndarray) -> None:
    """View staleness: read_clock - 1 - the oldest other worker's newest clock in the view."""
    others = [int(a) for k, a in enumerate(applied) if k != self.worker]
    if not others:
      return
    self.view_staleness[read_clock - 1 - min(others)] += 1
    for newest in others:
      self.update_age[read_clock - 1 - newest] += 1

  def applied_clock(self) -> int:
    """The newest of this worker's clocks that every shard has applied (-1: none)."""
    import ray  # pylint: disable=g-import-not-at-top
    return int(min(ray.get(s.applied_clocks.remote())[self.worker] for s in self.shards))

  def kept_clocks(self) -> list[list[int]]:
    """Per shard, the clocks of the deltas kept until a snapshot acknowledges them."""
    return [list(k) for k in self._kept]

