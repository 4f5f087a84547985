"""A worker's side of the SSP parameter server: push a delta, pull the parameters, per clock.

`PSClient` sends each shard (`ps.ParameterShard`) its part of the worker's delta and reads back
its leaves in one call per shard, all shards at once: O(P) bytes per clock. Each part travels
as a few flat buffers (`transport.FlatLayout`: small leaves packed per dtype, large ones
alone), through Ray's object store or, when small, inline in the call (`runtime.start`), and
replies are read zero-copy. The client keeps every delta until the shard's snapshot
acknowledges it; when a shard restarted (Ray raises on the call in flight, or the shard asks for
``resend_from``) it re-sends the kept deltas in order and repeats the call, so every delta is
applied exactly once.

`ClockPipeline` gives a worker the parameters of each clock. Under s >= 1 (and ASP) it prefetches:
the read for clock c + 1 goes out with the push of clock c - 1 and is answered while clock c
trains; the worker adds its own clock-c delta to that view where the view lacks it (a read that
waited for its bound is answered when the bound is met, possibly after the clock-c push). The
shard answers the read under the bound of clock c + 1 (every worker's updates through c - s),
so the view obeys the SSP rule for the clock it is used at. Under s = 0 that bound includes the
clock being trained, so the push of clock c and the read for c + 1 are one blocking call.

Transfer seconds (`transport.TransferLog`) are the seconds a worker's clock is blocked in
transport: issuing calls (packing, serialising), waiting for replies and adding its own delta to a
prefetched view, less the part of that wait the shard spent waiting for the staleness bound, which
goes to ``wait_seconds`` (one entry per clock). A prefetched reply that arrived during the step
costs only its deserialisation.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from pdcnno_jax.parallel.ray_engine import transport
from pdcnno_jax.parallel.ssp import serialization


@dataclasses.dataclass
class PendingCall:
  """One push-and-read in flight to every shard (`PSClient.issue`)."""
  clock: int
  parts: list[list[np.ndarray] | None]
  read_clock: int | None
  refs: list[Any]
  issued: float  # time.perf_counter() when the calls were out.
  issue_s: float  # Seconds spent issuing them.


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
    # Per shard, this worker's newest clock in the view `collect` returned last.
    self.own_in_view: list[int] = [-1] * len(self.shards)
    self._layouts: list[transport.FlatLayout] | None = None
    self._kept: list[collections.OrderedDict[int, list[np.ndarray]]] = [
        collections.OrderedDict() for _ in self.shards]

  def layouts(self) -> list[transport.FlatLayout]:
    """How each shard packs its leaves (asked once)."""
    if self._layouts is None:
      import ray  # pylint: disable=g-import-not-at-top
      self._layouts = ray.get([s.get_layout.remote() for s in self.shards])
    return self._layouts

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

  def issue(self, clock: int, delta: Sequence[np.ndarray] | None,
            read_clock: int | None) -> PendingCall:
    """Starts pushing ``delta`` (clock ``clock``; None: read only) and reading for ``read_clock``.

    Every shard's call is in flight at once; `collect` waits for the replies.
    """
    start = time.perf_counter()
    parts = [None if delta is None else layout.pack([delta[i] for i in leaves])
             for layout, leaves in zip(self.layouts(), self.assignment)]
    for shard, part in enumerate(parts):
      if part is not None:
        self._kept[shard][clock] = part  # Kept until a snapshot of that shard covers it.
    refs = [s.push_and_read.remote(self.worker, clock, part, read_clock)
            for s, part in zip(self.shards, parts)]
    issued = time.perf_counter()
    return PendingCall(clock, parts, read_clock, refs, issued, issued - start)

  def _reply(self, shard: int, call: PendingCall) -> dict[str, Any]:
    """The reply of ``shard`` to ``call``; a failed call is repeated on its own (`_call`)."""
    import ray  # pylint: disable=g-import-not-at-top
    try:
      reply = ray.get(call.refs[shard])
      if 'resend_from' in reply:
        self._resend(shard, reply['resend_from'], call.clock)
        reply = self._call(shard, call.clock, call.parts[shard], call.read_clock)
    except ray.exceptions.RayActorError:
      reply = self._call(shard, call.clock, call.parts[shard], call.read_clock)
    return reply

  def collect(self, call: PendingCall, new_clock: bool = True) -> list[np.ndarray] | None:
    """Waits for ``call``'s replies; the parameter leaves read (read-only views), or None.

    Args:
      call: from `issue`.
      new_clock: its wait opens a new entry of ``wait_seconds``; False: adds to the last one.
    """
    start = time.perf_counter()
    replies = [self._reply(shard, call) for shard in range(len(self.shards))]
    elapsed = time.perf_counter() - start
    # The shard's wait for the bound, less the part of it this worker spent on other work.
    wait = min(max(max(r['wait_s'] for r in replies) - (start - call.issued), 0.0), elapsed)
    self.log.record(sent=sum(serialization.payload_nbytes(p) for p in call.parts),
                    received=sum(serialization.payload_nbytes(r['buffers']) for r in replies),
                    seconds=call.issue_s + elapsed - wait)
    if new_clock or not self.wait_seconds:
      self.wait_seconds.append(wait)
    else:
      self.wait_seconds[-1] += wait
    for shard, reply in enumerate(replies):
      for kept in [c for c in self._kept[shard] if c <= reply['acked'][self.worker]]:
        del self._kept[shard][kept]
    if call.read_clock is None:
      return None
    self.own_in_view = [int(r['applied'][self.worker]) for r in replies]
    self._count_staleness(call.read_clock, np.min([r['applied'] for r in replies], axis=0))
    leaves: list[Any] = [None] * self.num_leaves
    for indices, layout, reply in zip(self.assignment, self.layouts(), replies):
      for i, leaf in zip(indices, layout.unpack(reply['buffers'])):
        leaves[i] = leaf
    return leaves

  def step(self, clock: int, delta: Sequence[np.ndarray] | None,
           read_clock: int | None) -> list[np.ndarray] | None:
    """Pushes ``delta`` (this worker's clock ``clock``) and reads for ``read_clock``, blocking.

    Args:
      clock: the clock of ``delta``.
      delta: the delta's leaves in the order of the parameter leaves; None: read only.
      read_clock: the clock the parameters read are for; None: push only.

    Returns:
      The parameter leaves (read-only NumPy views), or None.
    """
    return self.collect(self.issue(clock, delta, read_clock))

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


class ClockPipeline:
  """The parameters of each clock of one worker's run, one push per clock (module docstring).

  Args:
    client: the worker's `PSClient`.
    total_clocks: clocks of the run (no read goes out for clock ``total_clocks``).
    prefetch: read for clock c + 1 while clock c trains (only where s >= 1 or ASP).
  """

  def __init__(self, client: PSClient, total_clocks: int, prefetch: bool):
    if prefetch and client.staleness == 0:
      raise ValueError('ClockPipeline: prefetch needs staleness >= 1 (or ASP): under s = 0 the '
                       'read for clock c + 1 must wait for every worker\'s clock c.')
    self.client = client
    self.total = int(total_clocks)
    self.prefetch = prefetch
    self._pending: PendingCall | None = None

  def begin(self, first: int, leaves: Sequence[np.ndarray] | None = None) -> list[Any]:
    """The parameters for clock ``first``: ``leaves`` if given, else read from the shards."""
    if leaves is None:
      leaves = self.client.step(first, None, first)
    if self.prefetch and first + 1 < self.total:
      self._pending = self.client.issue(first, None, first + 1)
    return list(leaves)

  def advance(self, clock: int, delta: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Pushes clock ``clock``'s ``delta``; the parameters for clock + 1 (None after the last)."""
    if not self.prefetch:
      return self.client.step(clock, delta, clock + 1 if clock + 1 < self.total else None)
    call = self.client.issue(clock, delta, clock + 2 if clock + 2 < self.total else None)
    previous, self._pending = self._pending, call
    view = self.client.collect(previous) if previous is not None else None
    if clock + 1 >= self.total:
      self.drain()
      return None
    if previous is None or previous.read_clock != clock + 1:
      raise RuntimeError(f'ClockPipeline: no read for clock {clock + 1} in flight (begin first).')
    # It always sees its own updates: a shard whose view was taken after this push had arrived
    # (a read that waited for its bound) holds it already; the others get it added here.
    start = time.perf_counter()
    leaves = list(view)
    for own, indices in zip(self.client.own_in_view, self.client.assignment):
      if own < clock:
        for i in indices:
          leaves[i] = np.add(view[i], delta[i])
    self.client.log.transfer_seconds += time.perf_counter() - start
    return leaves

  def drain(self) -> None:
    """Waits for the call in flight (its push applied); its wait joins the last clock's."""
    if self._pending is not None:
      call, self._pending = self._pending, None
      self.client.collect(call, new_clock=False)
