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

Where every shard runs on the worker's node and publishes to shared memory (`shared_view`), a
clock makes no Ray call (``shared``): the push of clock c goes to the worker's shared-memory
outbox and rings the shard's doorbell (`PSClient.send`), and the parameters for clock c + 1 are
the shards' newest publications (others' updates as fresh as a blocking call's, not a clock
older as the prefetch's; under s = 0 the one published when every clock c was in) plus the
worker's own deltas they lack, all of which it still keeps. The publications also carry what the
replies did: the acknowledged clocks (kept deltas through them are dropped) and a shard's first
missing clock (re-sent from there, in calls). A publication that misses the bound is read again
until it holds it (the wait goes to ``wait_seconds``); once it has waited `SETTLE_AFTER_S` the
worker makes sure that every shard holds all its pushes (`PSClient.settle`: the publications
show them within milliseconds, or a call after `SETTLE_GRACE_S` finds what a restart or a lost
ring lost, and it is re-sent), so that no two workers wait on each other's re-sends.

Transfer seconds (`transport.TransferLog`) are the seconds a worker's clock is blocked in
transport: issuing calls (packing, serialising), waiting for replies, writing outboxes, reading
publications and adding its own delta to a view, less the part of that wait the shard spent
waiting for the staleness bound (or, reading publications, that they missed it), which goes to
``wait_seconds`` (one entry per clock). A prefetched reply that arrived during the step
costs only its deserialisation.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import select
import time
from typing import Any, Sequence

import numpy as np

from pdcnno_jax.parallel.ray_engine import transport
from pdcnno_jax.parallel.ssp import serialization

# Longest wait for a shard's wake-up before a worker that waits reads the publications again
# (a backstop: the shard wakes it after each publication).
SHARED_POLL_S = 0.01
# Seconds a read waits for the bound before it makes sure the shards hold this worker's pushes
# (`PSClient.settle`): by then they normally do, and the check costs one read of the clocks.
SETTLE_AFTER_S = 0.05
# Seconds `PSClient.settle` waits for a publication to show this worker's pushes before it asks
# the shard in a call (a push that is late, not lost, is then a duplicate the shard ignores).
SETTLE_GRACE_S = 1.0


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
    self.shared_reads = 0
    self.last_sent = -1  # The newest clock pushed by `send`.
    self.shared: list[Any] | None = None  # `shared_view.SharedView` per shard (`attach_shared`).
    self.outboxes: list[list[Any]] = []  # Per shard, this worker's two outbox slots.
    self.doorbells: list[int] = []  # Per shard, the write end of its doorbell FIFO.
    self._wakes: list[int] = []  # Per shard, the read end of this worker's wake FIFO.
    self._wake_keepers: list[int] = []
    self.dropped_rings = 0
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

  def attach_shared(self) -> bool:
    """Maps every shard's shared-memory publication; False (nothing mapped) unless all are here.

    A shard publishes only when it was started with ``publish``; a shard on another Ray node
    is read through calls.
    """
    import ray  # pylint: disable=g-import-not-at-top
    from pdcnno_jax.parallel.ray_engine import shared_view  # pylint: disable=g-import-not-at-top
    infos = ray.get([s.shared_view_info.remote() for s in self.shards])
    here = ray.get_runtime_context().get_node_id()
    if not infos or any(info is None or info['node_id'] != here for info in infos):
      return False
    self.shared = [shared_view.SharedView(info['path'], layout, info['num_workers'],
                                          writer=False)
                   for info, layout in zip(infos, self.layouts())]
    self.outboxes = [[shared_view.SharedView(shared_view.outbox_path(info['path'], self.worker,
                                                                     slot),
                                             layout, 1, writer=True) for slot in range(2)]
                     for info, layout in zip(infos, self.layouts())]
    # Open while the shard holds its reading end (it opened it before answering).
    self.doorbells = [shared_view.open_fifo(shared_view.doorbell_path(info['path']),
                                            reader=False) for info in infos]
    # Our own wake-up FIFOs, with a writer of our own so that they never read as closed.
    self._wakes = [shared_view.open_fifo(shared_view.wake_path(info['path'], self.worker),
                                         reader=True) for info in infos]
    self._wake_keepers = [shared_view.open_fifo(shared_view.wake_path(info['path'],
                                                                      self.worker),
                                                reader=False) for info in infos]
    return True

  def _await_publication(self) -> None:
    """Blocks until a shard has published since the last call (or `SHARED_POLL_S`)."""
    ready, _, _ = select.select(self._wakes, [], [], SHARED_POLL_S)
    for fd in ready:
      try:
        while os.read(fd, 4096):
          pass
      except BlockingIOError:
        pass

  def _ring(self, shard: int, clock: int) -> None:
    """Announces clock ``clock``'s delta in the outbox to ``shard`` (16 bytes, one write).

    A ring that cannot be written (the shard died: no reader; or it stopped reading: the pipe
    is full) is dropped: the restarted shard asks for the clocks it lacks (``resend_from``),
    or `settle` finds them missing, and the kept deltas are sent again.
    """
    try:
      os.write(self.doorbells[shard], np.array([self.worker, clock], np.int64).tobytes())
    except (BrokenPipeError, BlockingIOError):
      self.dropped_rings += 1

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
    """Pushes the kept deltas of clocks ``first`` .. ``upto`` - 1 to ``shard`` in order.

    Each waits out a shard that is restarting (`_call`), so a re-send is never lost.
    """
    for clock, part in list(self._kept[shard].items()):
      if first <= clock < upto:
        self._call(shard, clock, part, None)
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
      self._drop_acknowledged(shard, int(reply['acked'][self.worker]))
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

  def send(self, clock: int, delta: Sequence[np.ndarray]) -> None:
    """Pushes ``delta`` (clock ``clock``) through the outboxes (`attach_shared`): no call.

    Each shard's part goes to this worker's outbox slot clock % 2 and the shard's doorbell
    rings; the publications tell what a reply would (applied, acknowledged and missing
    clocks; `read_shared`).
    """
    start = time.perf_counter()
    sent, settle_s = 0, 0.0
    for shard, (layout, leaves) in enumerate(zip(self.layouts(), self.assignment)):
      part = layout.pack([delta[i] for i in leaves])
      self._kept[shard][clock] = part  # Kept until a snapshot of that shard covers it.
      sent += serialization.payload_nbytes(part)
      # The slot's previous delta (clock - 2) must have been taken before it is overwritten:
      # `settle` waits for that (and re-sends what a restarted shard lost).
      clocks = self.shared[shard].clocks()
      if clocks is None or clocks.received[self.worker] < clock - 2:
        settled = time.perf_counter()
        self.settle()  # It logs its own seconds.
        settle_s += time.perf_counter() - settled
      stamp = np.array([clock])  # The slot's one clock: the delta's.
      self.outboxes[shard][clock % 2].publish(part, stamp, stamp, stamp, stamp)
      self._ring(shard, clock)
    self.last_sent = clock
    self.log.record(sent=sent, seconds=time.perf_counter() - start - settle_s)

  def settle(self) -> None:
    """Blocks until every shard holds every clock `send` pushed, re-sending what one lost.

    Pushes normally show in the publications within a few milliseconds. One that a shard asks
    for again (``resend_from``: it restarted) is re-sent at once; a shard whose publication
    still lacks a push after `SETTLE_GRACE_S` is asked in a call (which waits out a restart),
    and the clocks it lacks are re-sent.
    """
    if self.last_sent < 0:
      return
    start = time.perf_counter()
    while True:
      clocks = [view.clocks() for view in self.shared]
      lagging = [i for i, c in enumerate(clocks)
                 if c is None or c.received[self.worker] < self.last_sent]
      if not lagging:
        break
      for shard in lagging:
        if clocks[shard] is not None:
          self._resend_requested(shard, clocks[shard])
      if time.perf_counter() - start > SETTLE_GRACE_S:
        for shard in lagging:
          reply = self._call(shard, self.last_sent, None, None)
          applied = int(reply['applied'][self.worker])
          if applied < self.last_sent:
            self._resend(shard, applied + 1, self.last_sent + 1)
        break
      self._await_publication()
    self.log.record(seconds=time.perf_counter() - start)

  def _resend_requested(self, shard: int, clocks: Any, lost_after_settle: bool = False) -> bool:
    """Re-sends what ``shard``'s publication (`shared_view.Clocks`) asks for; True if any.

    It asks with ``resend_from``; with ``lost_after_settle`` (every push of this worker was
    answered) a publication that holds fewer of them is a restarted shard's that lost some.
    """
    first = int(clocks.resend_from[self.worker])
    if first < 0 and lost_after_settle and clocks.received[self.worker] < self.last_sent:
      first = int(clocks.received[self.worker]) + 1
    if first < 0:
      return False
    self._resend(shard, first, self.last_sent + 1)
    return True

  def _drop_acknowledged(self, shard: int, acked: int) -> None:
    for kept in [c for c in self._kept[shard] if c <= acked]:
      del self._kept[shard][kept]

  def read_shared(self, read_clock: int) -> list[np.ndarray]:
    """The parameters for ``read_clock`` from the shards' publications (`attach_shared`).

    Each publication must hold every other worker's updates through read_clock - s - 1 (ASP:
    any); this worker's clocks through read_clock - 1 that it lacks are added from the kept
    deltas, so every one of them must have been pushed (`send`) already.

    Returns:
      The parameter leaves (writable copies).

    Raises:
      TimeoutError: the publications miss the bound for longer than ``timeout_s``.
      RuntimeError: a delta the view lacks is no longer kept (a broken invariant).
    """
    if self.shared is None:
      raise RuntimeError('PSClient.read_shared: no publications mapped (attach_shared first).')
    start = time.perf_counter()
    bound = None if self.staleness is None else read_clock - self.staleness - 1
    unmet_since, settled, settle_s = None, False, 0.0

    def meets_bound(applied: np.ndarray) -> bool:
      return bound is None or np.delete(applied, self.worker).min(initial=bound) >= bound

    while True:
      # The clocks first (a few bytes): the parameters are copied once the bound is met.
      clocks = [view.clocks() for view in self.shared]
      for shard, vectors in enumerate(clocks):
        if vectors is None:
          continue
        self._drop_acknowledged(shard, int(vectors.acked[self.worker]))
        if self._resend_requested(shard, vectors, lost_after_settle=settled):
          clocks[shard] = None  # Read again after the re-sends.
      if all(c is not None and meets_bound(c.applied) for c in clocks):
        views = [view.read() for view in self.shared]
        if all(v is not None and meets_bound(v.applied) for v in views):
          break
      now = time.perf_counter()
      if unmet_since is None:
        unmet_since = now
      elif not settled and now - unmet_since > SETTLE_AFTER_S:
        settled = True
        self.settle()
        settle_s = time.perf_counter() - now
      if now - start > self.timeout_s:
        raise TimeoutError(
            f'PS worker {self.worker}: the shared-memory publications missed the bound of '
            f'clock {read_clock} for {self.timeout_s:.3g} s (applied '
            f'{[None if c is None else c.applied.tolist() for c in clocks]}); raise '
            'config.parallel.ssp_timeout_s if workers are that slow.')
      self._await_publication()
    ready = time.perf_counter()
    wait = 0.0 if unmet_since is None else max(ready - unmet_since - settle_s, 0.0)
    leaves: list[Any] = [None] * self.num_leaves
    for shard, (view, layout) in enumerate(zip(views, self.layouts())):
      for clock in range(int(view.applied[self.worker]) + 1, read_clock):
        if clock not in self._kept[shard]:
          raise RuntimeError(f'PS worker {self.worker}: shard {shard} lacks clock {clock} of '
                             'this worker, which is no longer kept.')
        for buffer, part in zip(view.buffers, self._kept[shard][clock]):
          np.add(buffer, part, out=buffer)
      for i, leaf in zip(self.assignment[shard], layout.unpack(view.buffers)):
        leaves[i] = leaf
    self.own_in_view = [read_clock - 1] * len(self.shards)
    self._count_staleness(read_clock, np.min([v.applied for v in views], axis=0))
    self.shared_reads += 1
    self.wait_seconds.append(wait)
    # `settle` logged its own seconds.
    self.log.record(received=sum(view.nbytes for view in self.shared),
                    seconds=time.perf_counter() - start - wait - settle_s)
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


class ClockPipeline:
  """The parameters of each clock of one worker's run, one push per clock (module docstring).

  Args:
    client: the worker's `PSClient`.
    total_clocks: clocks of the run (no read goes out for clock ``total_clocks``).
    prefetch: read for clock c + 1 while clock c trains (only where s >= 1 or ASP).
    shared: push and read through shared memory (``client.attach_shared()`` returned True);
      overrides ``prefetch``.
  """

  def __init__(self, client: PSClient, total_clocks: int, prefetch: bool,
               shared: bool = False):
    if prefetch and client.staleness == 0:
      raise ValueError('ClockPipeline: prefetch needs staleness >= 1 (or ASP): under s = 0 the '
                       'read for clock c + 1 must wait for every worker\'s clock c.')
    if shared and client.shared is None:
      raise ValueError('ClockPipeline: shared reads need the publications mapped '
                       '(client.attach_shared() returned False or was not called).')
    self.client = client
    self.total = int(total_clocks)
    self.shared = shared
    self.prefetch = prefetch and not shared
    self._pending: PendingCall | None = None

  @property
  def read_path(self) -> str:
    """How this pipeline reads: ``shared_memory``, ``prefetch`` or ``call``."""
    return 'shared_memory' if self.shared else 'prefetch' if self.prefetch else 'call'

  def begin(self, first: int, leaves: Sequence[np.ndarray] | None = None) -> list[Any]:
    """The parameters for clock ``first``: ``leaves`` if given, else read from the shards."""
    if leaves is None:
      leaves = self.client.step(first, None, first)
    if self.prefetch and first + 1 < self.total:
      self._pending = self.client.issue(first, None, first + 1)
    return list(leaves)

  def advance(self, clock: int, delta: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Pushes clock ``clock``'s ``delta``; the parameters for clock + 1 (None after the last)."""
    if self.shared:
      self.client.send(clock, delta)
      if clock + 1 >= self.total:
        self.drain()
        self.client.wait_seconds.append(0.0)  # One entry per clock; the last reads nothing.
        return None
      return self.client.read_shared(clock + 1)
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
    """Waits until this worker's pushes are applied; a call's wait joins the last clock's."""
    if self.shared:
      self.client.settle()
    if self._pending is not None:
      call, self._pending = self._pending, None
      self.client.collect(call, new_clock=False)
