"""One shard of the SSP parameter server (Petuum Bösen style): a Ray actor over NumPy leaves.

`split_by_bytes` gives each of ``parallel.ps_shards`` shards a byte-balanced set of parameter
leaves. A shard applies pushed deltas and serves reads under the SSP rule (Ho et al. 2013): a
read for clock c returns parameters that include every update stamped <= c - s - 1 from every
worker, the reader's own (it pushes before it reads, in the same call), possibly newer ones;
s = 0 is BSP, s = None ASP. A read that must wait is answered with the parameters at the moment
the bound is met, so under BSP it holds exactly the updates through c - 1. A shard keeps its
small leaves packed in one flat buffer per dtype, its large ones flat on their own
(`transport.FlatLayout`): a push and a reply of a small model are one array each. Buffers are
never changed in place (``p = p + d``), so a reply is a consistent snapshot while later pushes
arrive.

Exactly once: a shard applies worker k's clocks in order and ignores a clock it has applied
(a restarted worker or a re-send). Every ``ps_snapshot_every_clocks`` clocks of all workers it
writes ``<workdir>/ssp_ps_<i>/snapshot.npz`` (leaves and applied clocks) and acknowledges the
clocks it covers; workers keep their deltas until acknowledged, so a shard that Ray restarts
reloads its snapshot and gets back, by re-send, every delta it lost.

A shard created with ``publish`` also writes its buffers and clocks to shared memory after every
push it applies or finds out of order (`shared_view.SharedView`: per worker the applied,
received, acknowledged and first missing clock; under s = 0 the buffers only at the moment the
slowest worker's clock is in, as a read that waited for its bound is answered), and takes the
deltas the workers on its node put in their shared-memory outboxes when they ring its doorbell
(a FIFO its event loop reads): those workers push and read without a Ray call
(`ps_client.PSClient.send`, `read_shared`).

References:
  Ho et al., "More effective distributed ML via a stale synchronous parallel parameter
    server", NIPS 2013, section 2; DESIGN.md, "SSP".
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any, Sequence

import numpy as np

from pdcnno_jax.parallel.ray_engine import shared_view
from pdcnno_jax.parallel.ray_engine import transport

SNAPSHOT_NAME = 'snapshot.npz'


def split_by_bytes(nbytes: Sequence[int], num_shards: int) -> list[list[int]]:
  """Leaf indices of each shard: largest leaves first, each to the lightest shard so far.

  Raises:
    ValueError: ``num_shards`` < 1 or more shards than leaves.
  """
  if not 1 <= num_shards <= len(nbytes):
    raise ValueError(f'config.parallel.ps_shards={num_shards} must be in [1, {len(nbytes)}] '
                     '(the number of parameter arrays of the model).')
  return transport.balance_by_bytes(nbytes, num_shards)


def snapshot_dir(workdir: str, shard: int) -> str:
  """``<workdir>/ssp_ps_<shard>``."""
  return os.path.join(workdir, f'ssp_ps_{shard}')


def read_bound(clock: int, staleness: int | None) -> int | None:
  """The newest clock every worker's updates must be in for a read at ``clock`` (None: ASP)."""
  return None if staleness is None else clock - staleness - 1


class ParameterShard:
  """Shard ``shard`` of the parameter server (an async Ray actor: `ray.remote` wraps it).

  Args:
    shard: this shard's index.
    leaves: its initial parameter leaves (NumPy).
    num_workers: workers pushing to it.
    staleness: s >= 0, or None (ASP).
    workdir: where its snapshots go.
    snapshot_every: clocks (of every worker) between snapshots; 0: never.
    timeout_s: longest wait of a read for its bound.
    kill_after_pushes: test hook: the first incarnation SIGKILLs itself after applying this
      many pushes (0: never).
    resume: start from the snapshot in the workdir (a rerun after the driver died); a shard
      that Ray restarts always does.
    publish: also publish the parameters to shared memory (for the workers on this node):
      after every applied push, under s = 0 only when every worker's next clock is in.
  """

  def __init__(self, shard: int, leaves: Sequence[np.ndarray], num_workers: int,
               staleness: int | None, workdir: str, snapshot_every: int, timeout_s: float,
               kill_after_pushes: int = 0, resume: bool = False, publish: bool = False):
    import ray  # pylint: disable=g-import-not-at-top
    self.shard = shard
    self.num_workers = num_workers
    self.staleness = staleness
    self.timeout_s = float(timeout_s)
    self.directory = snapshot_dir(workdir, shard)
    self.snapshot_every = int(snapshot_every)
    self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
    self.kill_after = 0 if self.restarted else int(kill_after_pushes)
    self.layout = transport.FlatLayout(leaves)
    # Read-only buffers are fine: they are never changed in place.
    self.buffers = self.layout.pack([np.asarray(x) for x in leaves])
    self.applied = np.full(num_workers, -1, np.int64)
    self.speeds = np.full(num_workers, np.nan)
    if self.restarted or resume:
      self._restore()
    else:
      os.makedirs(self.directory, exist_ok=True)
      path = os.path.join(self.directory, SNAPSHOT_NAME)
      if os.path.exists(path):
        os.remove(path)
    self.acked = self.applied.copy()
    self.resend_from = np.full(num_workers, -1, np.int64)  # Per worker; -1: nothing missing.
    # Per worker, doorbell pushes that came before a clock they follow (it was lost with a
    # ring or a restart, or is on its way as a re-send in a call): held until it comes.
    self._early: list[dict[int, Sequence[np.ndarray]]] = [{} for _ in range(num_workers)]
    self.pushes = 0
    self.rung_pushes = 0  # Pushes that came through the doorbell, new when they came.
    self.duplicates = 0
    self.snapshots = 0
    self.rejoins = 0
    self._since_snapshot = 0
    self._waiters: list[tuple[int, asyncio.Future]] = []
    self._speed_waiters: list[asyncio.Future] = []
    self.shared: shared_view.SharedView | None = None
    self._view_lowest = -2  # min(applied) of the parameters published last.
    self._wakes: dict[int, int] = {}  # Worker -> the write end of its wake FIFO.
    self._outboxes: dict[tuple[int, int], shared_view.SharedView] = {}  # (worker, slot).
    if publish:
      self.shared = shared_view.SharedView(shared_view.default_path(workdir, shard),
                                           self.layout, num_workers, writer=True)
      self._publish(view=True)
      # Workers announce the deltas they put in their outboxes here; the actor's event loop
      # (running: Ray builds an async actor on it) reads it. The shard keeps a writer open
      # itself, so that the FIFO never reads as closed while workers come and go.
      path = shared_view.doorbell_path(self.shared.path)
      self._doorbell = shared_view.open_fifo(path, reader=True)
      self._doorbell_writer = shared_view.open_fifo(path, reader=False)
      asyncio.get_running_loop().add_reader(self._doorbell, self._ring)

  def _restore(self) -> None:
    path = os.path.join(self.directory, SNAPSHOT_NAME)
    if not os.path.exists(path):
      return  # Killed before its first snapshot: the workers re-send everything.
    with np.load(path, allow_pickle=False) as snap:
      self.buffers = self.layout.pack([snap[f'leaf_{i}'] for i in range(len(self.layout.shapes))])
      self.applied = np.array(snap['applied'])
      self.speeds = np.array(snap['speeds'])

  def _snapshot(self) -> None:
    path = os.path.join(self.directory, SNAPSHOT_NAME)
    tmp = f'{path}.tmp.npz'
    np.savez(tmp, applied=self.applied, speeds=self.speeds,
             **{f'leaf_{i}': x for i, x in enumerate(self.layout.unpack(self.buffers))})
    os.replace(tmp, path)
    self.acked = self.applied.copy()
    self.snapshots += 1
    self._since_snapshot = 0

  def _apply(self, worker: int, clock: int, delta: Sequence[np.ndarray]) -> bool:
    """Applies one packed delta unless it is a duplicate; False: clocks before it are missing."""
    last = int(self.applied[worker])
    if clock <= last:
      self.duplicates += 1  # Already applied (a re-send or a restarted worker): once only.
      return True
    if clock != last + 1:
      return False  # This shard restarted from a snapshot: the worker re-sends from last + 1.
    if [np.shape(d) for d in delta] != [(n,) for n in self.layout.buffer_sizes]:
      raise ValueError(f'PS shard {self.shard}: worker {worker} pushed buffers of shapes '
                       f'{[np.shape(d) for d in delta]}, expected {self.layout.buffer_sizes}.')
    self.buffers = [p + d for p, d in zip(self.buffers, delta)]
    self.applied[worker] = clock
    self.pushes += 1
    self._since_snapshot += 1
    if self.snapshot_every and self._since_snapshot >= self.snapshot_every * self.num_workers:
      self._snapshot()
    if self.kill_after and self.pushes >= self.kill_after:
      os.kill(os.getpid(), signal.SIGKILL)
    return True

  def _publish(self, view: bool = False) -> None:
    """Publishes the clocks, and the parameters unless s = 0 holds them back.

    Under s = 0 a read for clock c must hold exactly every update through c - 1: the
    parameters go out only at the moment the slowest worker's clock is in (as a call waiting
    for its bound is answered), or with ``view`` (the start, a restart).
    """
    if self.shared is None:
      return
    lowest = int(self.applied.min())
    if view or self.staleness != 0 or lowest > self._view_lowest:
      self.shared.publish(self.buffers, self.applied, self.applied, self.acked, self.resend_from)
      self._view_lowest = lowest
    else:
      self.shared.publish_clocks(self.applied, self.acked, self.resend_from)
    for worker, fd in list(self._wakes.items()):
      try:
        os.write(fd, b'\0')
      except BlockingIOError:
        pass  # Full: the worker has wake-ups it has not read yet.
      except OSError:
        os.close(fd)  # The worker died; its next ring opens its new FIFO.
        del self._wakes[worker]

  def _view(self, wait_s: float) -> dict[str, Any]:
    return dict(buffers=list(self.buffers), applied=self.applied.copy(),
                acked=self.acked.copy(), wait_s=wait_s)

  def _wake(self) -> None:
    lowest = int(self.applied.min())
    still = []
    for bound, future in self._waiters:
      if bound <= lowest and not future.done():
        future.set_result(self._view(0.0))  # The parameters at the moment the bound is met.
      elif not future.done():
        still.append((bound, future))
    self._waiters = still

  async def push_and_read(self, worker: int, clock: int, delta: Sequence[np.ndarray] | None,
                          read_clock: int | None) -> dict[str, Any]:
    """Applies ``delta`` (worker's clock ``clock``; None: no push), then reads for ``read_clock``.

    Args:
      worker: the pushing worker.
      clock: the clock of ``delta``.
      delta: the delta packed by this shard's `layout` (`transport.FlatLayout`), or None.
      read_clock: the clock the parameters read are for; None: push only.

    Returns:
      ``buffers``, the packed leaves (None when ``read_clock`` is None), the ``applied`` and
      acknowledged (``acked``) clock of every worker, and ``wait_s``, the seconds the read
      waited for its bound; with ``resend_from`` and nothing applied when this shard lacks the
      worker's clocks from ``resend_from`` on (it restarted from a snapshot).
    """
    if delta is not None and not self._receive(worker, clock, delta, hold_early=False):
      return dict(self._view(0.0), buffers=None, resend_from=int(self.applied[worker]) + 1)
    if read_clock is None:
      return dict(self._view(0.0), buffers=None)
    bound = read_bound(read_clock, self.staleness)
    if bound is None or bound <= int(self.applied.min()):
      return self._view(0.0)
    start = time.perf_counter()
    future = asyncio.get_running_loop().create_future()
    self._waiters.append((bound, future))
    try:
      view = await asyncio.wait_for(future, self.timeout_s)
    except asyncio.TimeoutError as e:
      raise TimeoutError(
          f'PS shard {self.shard}: worker {worker} waited {self.timeout_s:.3g} s for every '
          f'worker to reach clock {bound} (applied {self.applied.tolist()}); raise '
          'config.parallel.ssp_timeout_s if workers are that slow.') from e
    return dict(view, wait_s=time.perf_counter() - start)

  def _receive(self, worker: int, clock: int, delta: Sequence[np.ndarray],
               hold_early: bool) -> bool:
    """Applies a push, then any held pushes that follow it; False: clocks before it are missing.

    A push that comes before the clocks it follows is held (``hold_early``: a doorbell push can
    overtake a re-send in a call, or follow a ring lost with a restart) or refused (a caller
    that reads the reply re-sends); either way the publication asks the worker to re-send from
    the first missing clock, in case they were lost.
    """
    last = int(self.applied[worker])
    if clock > last + 1:
      if hold_early:
        self._early[worker][clock] = delta
      if self.resend_from[worker] != last + 1:
        self.resend_from[worker] = last + 1
        self._publish()
      return hold_early
    self._apply(worker, clock, delta)
    early = self._early[worker]
    while early and self.applied[worker] + 1 in early:
      self._apply(worker, int(self.applied[worker]) + 1, early.pop(self.applied[worker] + 1))
    for stale in [c for c in early if c <= self.applied[worker]]:
      del early[stale]
    if self.applied[worker] != last:
      self.resend_from[worker] = -1
      self._publish()
      self._wake()
    return True

  def _ring(self) -> None:
    """Takes the pushes the doorbell announces: (worker, clock) records of 16 bytes each."""
    try:
      data = os.read(self._doorbell, 1 << 16)
    except BlockingIOError:
      return
    for worker, clock in np.frombuffer(data, np.int64).reshape(-1, 2).tolist():
      if worker not in self._wakes:
        try:
          self._wakes[worker] = shared_view.open_fifo(
              shared_view.wake_path(self.shared.path, worker), reader=False)
        except OSError:
          pass  # Not there yet: the worker falls back on a timed wait.
      key = (worker, clock % 2)
      if key not in self._outboxes:
        self._outboxes[key] = shared_view.SharedView(
            shared_view.outbox_path(self.shared.path, *key), self.layout, 1, writer=False)
      delta = self._outboxes[key].read()
      if delta is not None and int(delta.applied[0]) == clock:
        if clock > self.applied[worker] and clock not in self._early[worker]:
          self.rung_pushes += 1
        self._receive(worker, clock, delta.buffers, hold_early=True)
      elif clock > self.applied[worker] and self.resend_from[worker] < 0:
        # Torn or overwritten (a writer that died, or an old record after a restart): the
        # worker re-sends it from what it keeps.
        self.resend_from[worker] = self.applied[worker] + 1
        self._publish()

  async def shared_view_info(self) -> dict[str, str] | None:
    """Where this shard publishes (``path``, ``num_workers``), on which Ray node (``node_id``).

    None: it does not publish.
    """
    if self.shared is None:
      return None
    import ray  # pylint: disable=g-import-not-at-top
    return dict(path=self.shared.path, num_workers=self.num_workers,
                node_id=ray.get_runtime_context().get_node_id())

  async def remove_shared_view(self) -> None:
    """Closes and deletes the publication (the driver calls it at the end of the job)."""
    if self.shared is not None:
      asyncio.get_running_loop().remove_reader(self._doorbell)
      for fd in [self._doorbell, self._doorbell_writer, *self._wakes.values()]:
        os.close(fd)
      self._wakes = {}
      shared_view.remove(shared_view.doorbell_path(self.shared.path))
      for box in self._outboxes.values():
        box.close()
      self._outboxes = {}
      for worker in range(self.num_workers):
        shared_view.remove(shared_view.wake_path(self.shared.path, worker))
        for slot in range(2):
          shared_view.remove(shared_view.outbox_path(self.shared.path, worker, slot))
      self.shared.close()
      shared_view.remove(self.shared.path)
      self.shared = None

  async def get_layout(self) -> transport.FlatLayout:
    """How this shard packs its leaves (a client asks once)."""
    return self.layout

  async def applied_clocks(self) -> np.ndarray:
    """The newest clock applied from each worker (a restarted or resumed worker asks)."""
    self.rejoins += 1
    return self.applied.copy()

  async def exchange_speed(self, worker: int, speed: float) -> list[float]:
    """Records ``worker``'s warm-up speed; returns every worker's once all have one."""
    if np.isnan(self.speeds[worker]):
      self.speeds[worker] = speed
    if np.isnan(self.speeds).any():
      future = asyncio.get_running_loop().create_future()
      self._speed_waiters.append(future)
      await asyncio.wait_for(future, self.timeout_s)
    else:
      for future in self._speed_waiters:
        if not future.done():
          future.set_result(None)
      self._speed_waiters = []
    return self.speeds.tolist()

  async def final(self) -> dict[str, Any]:
    """The shard's ``leaves`` (unpacked) and counters at the end of the run."""
    return dict(self._view(0.0), leaves=self.layout.unpack(self.buffers), pushes=self.pushes,
                rung_pushes=self.rung_pushes, duplicates=self.duplicates,
                snapshots=self.snapshots, rejoins=self.rejoins, restarted=self.restarted)

  async def pid(self) -> int:
    return os.getpid()
