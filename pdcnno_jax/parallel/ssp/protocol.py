"""The stale-synchronous-parallel (SSP) clock protocol over a `Store`.

Worker i keeps a clock c (steps done); step c produces an update stamped (i, c), published to
the store. Before step c a worker must have applied every other worker's updates stamped
<= c - s - 1 (it blocks until they are published), may apply newer ones, and always sees its
own: s = 0 is BSP, s = None (infinite) is ASP. The loop of one worker::

  worker = SSPWorker(store, i, n, staleness=s, timeout_s=120, like=params)
  joined = worker.join(checkpointed_ssp_state_or_None)   # own updates after the checkpoint
  for c in range(joined.next_clock, num_steps):
    params = apply(params, worker.pull(c))               # blocks only past the bound
    delta = train_step(params); params = params + delta  # read-my-writes
    worker.publish(c, delta)                             # then checkpoint + worker.commit()
  params = apply(params, worker.drain(num_steps - 1)); worker.close()

Store layout under ``pdcnno_ssp/<run_id>/``: ``u/<worker>/<clock>`` updates (write-once),
``clock/``, ``ack/`` (clocks durably applied per source), ``hb/`` heartbeats, ``gc/``, ``done/``.
A worker deletes its own updates once every unfinished worker acknowledged them. A worker
silent for ``heartbeat_timeout_s`` leaves the bound; restarted, it re-applies its own updates
after its checkpoint and rejoins at its last published clock + 1.

References:
  Ho et al., "More effective distributed ML via a stale synchronous parallel parameter
    server", NIPS 2013 (the SSP condition, section 2).
  papers/delay_sync_parallel.txt, section 4 (delay synchronization = SSP); DESIGN.md, "SSP".
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import dataclasses
import json
import logging
import time
from typing import Any

import jax
import numpy as np

from pdcnno_jax.parallel.ssp import liveness as liveness_lib
from pdcnno_jax.parallel.ssp import serialization
from pdcnno_jax.parallel.ssp import store as store_lib

_ROOT = 'pdcnno_ssp'


class SSPTimeoutError(TimeoutError):
  """A worker waited longer than its timeout for updates it must see."""


class SSPStateError(RuntimeError):
  """The protocol was used out of order or a restart state is inconsistent."""


@dataclasses.dataclass(frozen=True)
class Update:
  """One published update.

  Attributes:
    worker: id of the worker that produced it.
    clock: the step (clock) it was produced at.
    tree: the update pytree (structured like `like`, or a {path: array} dict).
  """
  worker: int
  clock: int
  tree: Any


@dataclasses.dataclass(frozen=True)
class JoinResult:
  """What `SSPWorker.join` returns.

  Attributes:
    next_clock: the first step this worker computes.
    updates: updates to apply to the (checkpointed) params before that step:
      this worker's own updates published after its checkpoint.
  """
  next_clock: int
  updates: list[Update]


@dataclasses.dataclass
class SSPStats:
  """Counters of one worker; times in seconds, sizes in bytes.

  Staleness is counted in clocks. `view_staleness` is, per pull at clock c,
  max over the other (live) workers j of (c - 1 - last clock of j applied):
  the SSP bound keeps it <= s. `update_age` is, per update (j, t) applied by
  `pull(c)`, c - 1 - t (negative when j was ahead); `drain` is not counted.
  """
  worker: int
  staleness: int | None
  clock: int = 0
  steps: int = 0
  elapsed_s: float = 0.0
  steps_per_s: float = 0.0
  pulls: int = 0
  blocked_pulls: int = 0
  wait_s: float = 0.0
  pull_s: float = 0.0
  publish_s: float = 0.0
  encode_s: float = 0.0
  decode_s: float = 0.0
  bytes_published: int = 0
  bytes_received: int = 0
  applied_updates: int = 0
  gc_deleted: int = 0
  view_staleness: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  update_age: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  applied_per_worker: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  dropped: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  heartbeat_error: str | None = None

  def as_dict(self) -> dict[str, Any]:
    """JSON-friendly view (histogram keys as ints, sorted)."""
    out = dataclasses.asdict(self)
    for name in ('view_staleness', 'update_age', 'applied_per_worker'):
      counts = getattr(self, name)
      out[name] = {int(k): int(v) for k, v in sorted(counts.items())}
    out['dropped'] = [list(d) for d in self.dropped]
    return out


def sum_updates(updates: Sequence[Update]) -> Any | None:
  """Sums the trees of `updates` leaf-wise (numpy); None if there are none."""
  if not updates:
    return None
  return jax.tree_util.tree_map(lambda *xs: np.sum(xs, axis=0),
                                *[u.tree for u in updates])


def normalise_staleness(staleness: int | None) -> int | None:
  """s as an int >= 0, or None for infinite (ASP: -1, None or inf)."""
  if staleness is None or (isinstance(staleness, float) and
                           np.isinf(staleness)):
    return None
  if int(staleness) != staleness or staleness < -1:
    raise ValueError(
        f'staleness must be an int >= 0, or -1 / None for infinite (ASP); '
        f'got {staleness!r}.')
  return None if staleness == -1 else int(staleness)


class SSPWorker:
  """One worker of an SSP job: publishes its updates, pulls the others'.

  Not thread-safe: one worker object per training loop.
  """

  def __init__(self,
               store: store_lib.Store,
               worker_id: int,
               num_workers: int,
               staleness: int | None,
               timeout_s: float = 120.0,
               *,
               run_id: str = 'default',
               like: Any = None,
               compression: str = 'none',
               cast_floats_to: str | None = None,
               heartbeat_timeout_s: float = 10.0,
               heartbeat_interval_s: float | None = None,
               poll_interval_s: float | None = None,
               commit_on_pull: bool = True,
               gc: bool = True,
               gc_waits_for_dead: bool = True,
               coordinator_id: int = 0):
    """Creates the worker; call `join` before `pull`/`publish`.

    Args:
      store: the shared key-value store.
      worker_id: this worker's id in [0, num_workers).
      num_workers: number of workers.
      staleness: s >= 0, or None / -1 for infinite (ASP).
      timeout_s: longest wait for updates the bound requires (raises
        `SSPTimeoutError` after it).
      run_id: namespace of this job's keys (several jobs may share a store).
      like: pytree with the updates' structure; pulled updates are decoded
        into it. If None they are {key path: array} dicts.
      compression: payload compression, see `serialization.encode`.
      cast_floats_to: optional lossy float cast of payloads, e.g. 'bfloat16'.
      heartbeat_timeout_s: silence after which a worker counts as dead.
      heartbeat_interval_s: heartbeat period (default timeout / 4).
      poll_interval_s: slice of a blocking wait between liveness checks
        (default min(1, timeout / 2)).
      commit_on_pull: acknowledge applied updates after every pull (no
        checkpoints). With checkpoints, pass False and call `commit` after
        each checkpoint, so that a restart finds what it needs in the store.
      gc: delete own updates once every worker acknowledged them.
      gc_waits_for_dead: keep updates a dead worker has not acknowledged.
      coordinator_id: the worker whose process hosts the store; its `close`
        waits for all the others and then deletes the run's keys.

    Raises:
      ValueError: on bad arguments.
    """
    if num_workers < 1:
      raise ValueError(f'num_workers must be >= 1, got {num_workers}.')
    if not 0 <= worker_id < num_workers:
      raise ValueError(
          f'worker_id must be in [0, {num_workers}), got {worker_id}.')
    if timeout_s <= 0 or heartbeat_timeout_s <= 0:
      raise ValueError('timeout_s and heartbeat_timeout_s must be > 0, got '
                       f'{timeout_s} and {heartbeat_timeout_s}.')
    if '/' in run_id or not run_id:
      raise ValueError(f'run_id must be a non-empty name without "/", got '
                       f'{run_id!r}.')
    if compression not in serialization.COMPRESSIONS:
      raise ValueError(f'compression must be one of '
                       f'{serialization.COMPRESSIONS}, got {compression!r}.')
    self.store = store
    self.worker_id = worker_id
    self.num_workers = num_workers
    self.staleness = normalise_staleness(staleness)
    self.timeout_s = float(timeout_s)
    self.run_id = run_id
    self._like = like
    self._compression = compression
    self._cast = cast_floats_to
    self._poll_s = (min(1.0, heartbeat_timeout_s / 2) if poll_interval_s is None
                    else poll_interval_s)
    self._commit_on_pull = commit_on_pull
    self._gc = gc
    self._gc_waits_for_dead = gc_waits_for_dead
    self._coordinator_id = coordinator_id
    self._root = f'{_ROOT}/{run_id}'
    self._heartbeat = liveness_lib.Heartbeat(
        store, self._key('hb', worker_id),
        heartbeat_interval_s or heartbeat_timeout_s / 4)
    self._liveness = liveness_lib.Liveness(store, f'{self._root}/hb',
                                           heartbeat_timeout_s)
    self._applied = [-1] * num_workers  # Highest contiguous clock applied.
    self._next_clock: int | None = None
    self._start_clock = 0
    self._joined_at = 0.0
    self._gc_upto = -1
    self._dead: set[int] = set()
    self._closed = False
    self._stats = SSPStats(worker=worker_id, staleness=self.staleness)

  # Keys.

  def _key(self, kind: str, worker: int) -> str:
    return f'{self._root}/{kind}/{worker}'

  def _update_key(self, worker: int, clock: int) -> str:
    return f'{self._root}/u/{worker}/{clock:010d}'

  def _read_ints(self, kind: str) -> dict[int, Any]:
    return {int(k.rsplit('/', 1)[1]): json.loads(v)
            for k, v in self.store.dir_get(f'{self._root}/{kind}')}

  # Life cycle.

  def join(self, state: dict[str, Any] | None = None) -> JoinResult:
    """Starts the heartbeat and resolves this worker's starting clock.

    Args:
      state: None for a fresh start, or `state()` as saved in this worker's
        last checkpoint (restart).

    Returns:
      The first clock to compute and the own updates, published after the
      checkpoint, to re-apply to the checkpointed params.

    Raises:
      SSPStateError: if the store and `state` disagree (e.g. a fresh start in
        a run where this worker already published, or updates needed for the
        restart were garbage-collected).
    """
    if self._next_clock is not None:
      raise SSPStateError(f'Worker {self.worker_id} already joined.')
    me = self.worker_id
    last_published = self._last_written_clock()
    updates = []
    if state is None:
      if last_published >= 0:
        raise SSPStateError(
            f'Worker {me} has already published clocks 0..{last_published} in '
            f'run {self.run_id!r}: pass the SSP state saved in its checkpoint '
            'to join() to rejoin, or start a new run_id.')
    else:
      applied = [int(x) for x in np.asarray(state['applied']).reshape(-1)]
      if len(applied) != self.num_workers:
        raise SSPStateError(
            f'Checkpointed SSP state has {len(applied)} workers, this job has '
            f'{self.num_workers}.')
      if applied[me] > last_published:
        raise SSPStateError(
            f'Checkpoint of worker {me} is at clock {applied[me]} but the '
            f'store says it published only up to {last_published}: the store '
            'belongs to a different run.')
      for t in range(applied[me] + 1, last_published + 1):
        payload = self.store.try_get(self._update_key(me, t))
        if payload is None:
          raise SSPStateError(
              f'Worker {me} cannot rejoin: its update {t} was '
              'garbage-collected after its checkpoint. Use '
              'commit_on_pull=False and call commit() after each checkpoint.')
        updates.append(self._decode(me, t, payload))
      applied[me] = last_published
      self._applied = applied
      raw_gc = self.store.try_get(self._key('gc', me))
      self._gc_upto = -1 if raw_gc is None else int(json.loads(raw_gc))
    self._next_clock = last_published + 1
    self._start_clock = self._next_clock
    self._joined_at = time.monotonic()
    self._stats.clock = self._next_clock
    self._heartbeat.start()
    self._liveness.refresh()
    if state is not None:
      self.commit()
    return JoinResult(next_clock=self._next_clock, updates=updates)

  def _last_written_clock(self) -> int:
    """This worker's last published clock, counting an update written without its clock key.

    `publish` writes the update, then the clock: a worker killed between the two left an
    update that others may already have applied, so a rejoin adopts it instead of computing
    (and failing to write) that clock again.
    """
    me = self.worker_id
    clock = self.published_clock()
    while self.store.try_get(self._update_key(me, clock + 1)) is not None:
      clock += 1
    if clock != self.published_clock():
      self.store.set(self._key('clock', me), str(clock).encode(), overwrite=True)
    return clock

  def published_clock(self, worker: int | None = None) -> int:
    """The last clock `worker` (default: this one) published in this run, or -1.

    Callable before `join`, e.g. to tell a rejoin into a running job from a
    new job.
    """
    worker = self.worker_id if worker is None else worker
    raw = self.store.try_get(self._key('clock', worker))
    return -1 if raw is None else int(json.loads(raw))

  def state(self) -> dict[str, np.ndarray]:
    """The protocol state to save with the params in a checkpoint."""
    self._check_joined()
    return {'next_clock': np.asarray(self._next_clock, np.int64),
            'applied': np.asarray(self._applied, np.int64)}

  def commit(self) -> None:
    """Acknowledges (durably) every update applied so far."""
    self.store.set(self._key('ack', self.worker_id),
                   json.dumps(self._applied).encode(), overwrite=True)

  def close(self) -> None:
    """Marks this worker finished; the coordinator waits for all, then cleans.

    Raises:
      SSPTimeoutError: (coordinator only) if some worker did not finish within
        `timeout_s`.
    """
    if self._closed:
      return
    self._closed = True
    self._heartbeat.stop()
    self.store.set(self._key('done', self.worker_id),
                   json.dumps(self._applied[self.worker_id]).encode(),
                   overwrite=True)
    if self.worker_id != self._coordinator_id:
      return
    deadline = time.monotonic() + self.timeout_s
    while True:
      done = self._read_ints('done')
      missing = [w for w in range(self.num_workers) if w not in done]
      if not missing:
        break
      if time.monotonic() > deadline:
        raise SSPTimeoutError(
            f'Coordinator (worker {self.worker_id}) waited {self.timeout_s:.3g}'
            f' s for workers {missing} to finish run {self.run_id!r}.')
      time.sleep(self._poll_s / 4)
    self.store.delete(self._root)

  def abandon(self) -> None:
    """Stops the heartbeat without marking this worker finished.

    For a worker that gives up (e.g. on an exception it cannot handle): the
    others drop it from the staleness bound after the heartbeat timeout, and
    it may rejoin later from its checkpoint.
    """
    self._heartbeat.stop()

  # Steps.

  def _check_joined(self) -> None:
    if self._next_clock is None:
      raise SSPStateError(
          f'Worker {self.worker_id}: call join() before pull/publish/state.')

  def _check_clock(self, clock: int, what: str) -> None:
    self._check_joined()
    if clock != self._next_clock:
      raise SSPStateError(
          f'Worker {self.worker_id}: {what}({clock}) out of order; the next '
          f'clock is {self._next_clock} (pull(c), then publish(c), then c+1).')

  def _decode(self, worker: int, clock: int, payload: bytes) -> Update:
    t0 = time.perf_counter()
    tree = serialization.decode(payload, like=self._like)
    self._stats.decode_s += time.perf_counter() - t0
    self._stats.bytes_received += len(payload)
    return Update(worker=worker, clock=clock, tree=tree)

  def publish(self, clock: int, update: Any) -> None:
    """Publishes this worker's update of step `clock` (write-once).

    Args:
      clock: the step that produced `update`; must be the current clock.
      update: pytree of arrays, e.g. params after the step minus before.
    """
    self._check_clock(clock, 'publish')
    me = self.worker_id
    t0 = time.perf_counter()
    payload = serialization.encode(update, compression=self._compression,
                                   cast_floats_to=self._cast)
    t1 = time.perf_counter()
    self.store.set(self._update_key(me, clock), payload)
    self.store.set(self._key('clock', me), str(clock).encode(), overwrite=True)
    self._stats.encode_s += t1 - t0
    self._stats.publish_s += time.perf_counter() - t1
    self._stats.bytes_published += len(payload)
    self._applied[me] = clock
    self._next_clock = clock + 1
    self._stats.clock = self._next_clock
    if self._gc:
      self._collect_garbage()

  def _is_dead(self, worker: int) -> bool:
    self._liveness.refresh()
    dead = self._liveness.is_dead(worker)
    if dead and worker not in self._dead:
      logging.warning('SSP worker %d: worker %d missed heartbeats for %.3g s; '
                      'dropping it from the staleness bound at clock %d.',
                      self.worker_id, worker, self._liveness.timeout_s,
                      self._next_clock)
      self._stats.dropped.append((worker, self._next_clock))
    if dead:
      self._dead.add(worker)
    else:
      self._dead.discard(worker)
    return dead

  def _fetch(self, worker: int, upto: int, published: int, deadline: float,
             wait_for_dead: bool, clock: int, out: list[Update],
             draining: bool) -> float:
    """Applies `worker`'s updates through `upto`; returns seconds waited."""
    waited = 0.0
    t = self._applied[worker] + 1
    while t <= upto:
      key = self._update_key(worker, t)
      if t <= published:
        payload = self.store.try_get(key)
        if payload is None:
          raise SSPStateError(
              f'Worker {self.worker_id}: update ({worker}, {t}) is published '
              'but gone from the store (garbage-collected before this worker '
              'acknowledged it; was gc_waits_for_dead=False?).')
      else:
        if not wait_for_dead and worker in self._dead and self._is_dead(worker):
          return waited
        payload = None
        while payload is None:
          remaining = deadline - time.monotonic()
          if remaining <= 0:
            raise SSPTimeoutError(
                f'SSP worker {self.worker_id} at clock {clock} waited '
                f'{self.timeout_s:.3g} s for update ({worker}, {t}) of run '
                f'{self.run_id!r} (staleness {self.staleness}); worker '
                f'{worker} has published up to clock {published}. Is it alive '
                'and running the same number of steps? Raise timeout_s if it '
                'is just slow.')
          t0 = time.monotonic()
          try:
            payload = self.store.get(key, min(self._poll_s, remaining))
          except store_lib.StoreTimeoutError:
            pass
          waited += time.monotonic() - t0
          if payload is None:
            done = self.store.try_get(self._key('done', worker))
            if done is not None and int(json.loads(done)) < t:
              return waited  # Finished before this clock: nothing to wait for.
            if not wait_for_dead and self._is_dead(worker):
              return waited
      out.append(self._decode(worker, t, payload))
      self._applied[worker] = t
      self._stats.applied_per_worker[worker] += 1
      if not draining:
        self._stats.update_age[clock - 1 - t] += 1
      t += 1
    return waited

  def _gather(self, clock: int, required: int | None, wait_for_dead: bool,
              upto_required_only: bool = False
              ) -> tuple[list[Update], float]:
    published = {w: int(c) for w, c in self._read_ints('clock').items()}
    deadline = time.monotonic() + self.timeout_s
    out: list[Update] = []
    waited = 0.0
    for worker in range(self.num_workers):
      if worker == self.worker_id:
        continue
      have = published.get(worker, -1)
      if required is None:
        upto = have
      elif upto_required_only:
        upto = required
      else:
        upto = max(have, required)
      waited += self._fetch(worker, upto, have, deadline, wait_for_dead, clock,
                            out, draining=upto_required_only)
    self._stats.applied_updates += len(out)
    return out, waited

  def pull(self, clock: int) -> list[Update]:
    """Returns the other workers' updates to apply before step `clock`.

    Blocks until every live worker's updates through clock - s - 1 are
    available (never for ASP), then also takes whatever newer updates are
    already published. Each update is returned exactly once over the run.

    Args:
      clock: the step about to be computed (= the number of steps done).

    Returns:
      Updates in (worker, clock) order.

    Raises:
      SSPTimeoutError: if a live worker's required update did not arrive
        within `timeout_s`.
    """
    self._check_clock(clock, 'pull')
    t0 = time.perf_counter()
    required = None if self.staleness is None else clock - self.staleness - 1
    updates, waited = self._gather(clock, required, wait_for_dead=False)
    if waited > 0:  # Take what was published while we waited, too.
      newer, _ = self._gather(clock, None, wait_for_dead=False)
      updates = sorted(updates + newer, key=lambda u: (u.worker, u.clock))
    self._stats.pulls += 1
    self._stats.wait_s += waited
    self._stats.blocked_pulls += waited > 0
    lags = [clock - 1 - self._applied[w] for w in range(self.num_workers)
            if w != self.worker_id and w not in self._dead]
    if lags:
      self._stats.view_staleness[max(lags)] += 1
    if self._commit_on_pull:
      self.commit()
    self._stats.pull_s += time.perf_counter() - t0
    self._stats.heartbeat_error = (None if self._heartbeat.error is None else
                                   repr(self._heartbeat.error))
    return updates

  def drain(self, last_clock: int, *, include_dead: bool = True
            ) -> list[Update]:
    """Returns every remaining update through `last_clock`, waiting for them.

    Call after the last step so that every worker ends with every update.

    Args:
      last_clock: the last step of the run.
      include_dead: wait (up to `timeout_s`) for dead workers to come back;
        if False, finish without their missing updates.

    Raises:
      SSPTimeoutError: if some worker's updates did not arrive in time.
    """
    self._check_joined()
    t0 = time.perf_counter()
    updates, waited = self._gather(self._next_clock, last_clock,
                                   wait_for_dead=include_dead,
                                   upto_required_only=True)
    self._stats.wait_s += waited
    self.commit()
    self._stats.pull_s += time.perf_counter() - t0
    return updates

  def _collect_garbage(self) -> None:
    """Deletes own updates every other unfinished worker acknowledged."""
    me = self.worker_id
    acks = self._read_ints('ack')
    done = self._read_ints('done')
    bound = acks.get(me, [-1] * self.num_workers)[me]  # Own restart needs.
    for worker in range(self.num_workers):
      if worker == me or worker in done:
        continue
      if not self._gc_waits_for_dead and worker in self._dead:
        continue
      bound = min(bound, acks.get(worker, [-1] * self.num_workers)[me])
    if bound <= self._gc_upto:
      return
    for t in range(self._gc_upto + 1, bound + 1):
      self.store.delete(self._update_key(me, t))
      self._stats.gc_deleted += 1
    self._gc_upto = bound
    self.store.set(self._key('gc', me), str(bound).encode(), overwrite=True)

  @property
  def dead_workers(self) -> frozenset[int]:
    """Workers currently dropped from the staleness bound."""
    return frozenset(self._dead)

  def stats(self) -> SSPStats:
    """The worker's counters (a live object; use `.as_dict()` to log).

    `steps` and `steps_per_s` count this incarnation's steps since `join`.
    """
    if self._next_clock is not None:
      self._stats.steps = self._next_clock - self._start_clock
      self._stats.elapsed_s = time.monotonic() - self._joined_at
      self._stats.steps_per_s = self._stats.steps / max(
          self._stats.elapsed_s, 1e-9)
    return self._stats
