"""SSP protocol on the in-memory store, one thread per worker (fast tests)."""

import os
import sys
import threading

import numpy as np
import pytest

from pdcnno_jax.parallel import ssp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'ssp_workers'))
import indicator_loop  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run_job(num_workers, staleness, steps, delay_s=lambda w, c: 0.0,
             store=None, **worker_kwargs):
  """Runs one worker per thread; returns (views, errors, stats, store)."""
  store = ssp.InMemoryStore() if store is None else store
  like = indicator_loop.empty_view(num_workers, steps)
  workers = [ssp.SSPWorker(store, i, num_workers, staleness, timeout_s=20.0,
                           like=like, heartbeat_timeout_s=5.0, **worker_kwargs)
             for i in range(num_workers)]
  views, errors = [None] * num_workers, [[] for _ in range(num_workers)]

  def body(i):
    try:
      views[i], errors[i] = indicator_loop.run(
          workers[i], steps, delay_s=lambda c: delay_s(i, c))
    except Exception as e:  # pylint: disable=broad-except
      errors[i] = [repr(e)]

  threads = [threading.Thread(target=body, args=(i,))
             for i in range(num_workers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  return views, errors, [w.stats() for w in workers], store


@pytest.mark.parametrize('staleness', [0, 1, 3, None])
def test_exact_sum_bound_and_read_my_writes(staleness):
  # Worker 1 is slow, so the fast ones run into the bound.
  num_workers, steps = 3, 12
  _, errors, stats, store = _run_job(
      num_workers, staleness, steps,
      delay_s=lambda w, c: 0.01 if w == 1 else 0.0)
  assert errors == [[]] * num_workers
  for st in stats:
    assert sum(st.applied_per_worker.values()) == (num_workers - 1) * steps
    if staleness is not None:
      assert max(st.view_staleness) <= staleness
      assert max(st.update_age) <= staleness
  if staleness is not None:
    # Not vacuous: the fast workers reach the bound.
    assert max(stats[0].view_staleness) == staleness
    assert max(stats[2].view_staleness) == staleness
  assert len(store) == 0  # The coordinator cleaned the run up.


def test_garbage_collection_bounds_retained_updates():
  num_workers, steps, staleness = 2, 20, 1
  store = ssp.InMemoryStore()
  like = indicator_loop.empty_view(num_workers, steps)
  workers = [ssp.SSPWorker(store, i, num_workers, staleness, timeout_s=10.0,
                           like=like) for i in range(num_workers)]
  retained = []

  def body(i):
    indicator_loop.run(
        workers[i], steps, close=False,
        after_publish=lambda c, v: retained.append(
            len(store.dir_get(f'pdcnno_ssp/default/u/{i}'))))

  threads = [threading.Thread(target=body, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  # Each worker holds back only updates the other may not have applied yet:
  # at most staleness + 3 (published ahead of the bound + ack lag).
  assert max(retained) <= staleness + 3
  assert sum(w.stats().gc_deleted for w in workers) >= 2 * (steps - 4)


def test_wait_shrinks_as_staleness_grows():
  # Round-robin transient straggler: at step c, worker c % 3 is slow.
  # s = 0 makes everyone wait for every straggler; s = 5 absorbs them (the
  # few short waits left come from workers finishing at the same time).
  num_workers, steps = 3, 12

  def delay(w, c):
    return 0.03 if c % num_workers == w else 0.0

  blocked = {}
  for staleness in (0, 5):
    _, errors, stats, _ = _run_job(num_workers, staleness, steps, delay)
    assert errors == [[]] * num_workers
    blocked[staleness] = sum(st.blocked_pulls for st in stats)
  assert blocked[0] >= num_workers * steps // 2
  assert blocked[5] <= blocked[0] // 3


def test_timeout_raises_clear_error():
  store = ssp.InMemoryStore()
  w0 = ssp.SSPWorker(store, 0, 2, staleness=0, timeout_s=0.3)
  w1 = ssp.SSPWorker(store, 1, 2, staleness=0, timeout_s=0.3)
  w0.join()
  w1.join()  # Alive (heartbeats) but never publishes.
  w0.pull(0)
  w0.publish(0, {'x': np.ones(2)})
  with pytest.raises(ssp.SSPTimeoutError,
                     match=r'worker 0 at clock 1 waited .* update \(1, 0\)'):
    w0.pull(1)
  w0.abandon()
  w1.abandon()


def test_dead_worker_dropped_then_rejoins_exactly():
  num_workers, steps, staleness = 3, 16, 1
  store = ssp.InMemoryStore()
  like = indicator_loop.empty_view(num_workers, steps)
  kwargs = dict(timeout_s=20.0, like=like, heartbeat_timeout_s=0.3,
                commit_on_pull=False)
  checkpoint = {}
  crash_clock, checkpoint_clock = 6, 3

  class Crash(Exception):
    pass

  def victim_hook(worker):
    def hook(clock, view):
      if clock == checkpoint_clock:  # Checkpoint, then acknowledge.
        checkpoint['view'] = {'count': view['count'].copy(), 'nested': {
            'mirror': view['nested']['mirror'].copy()}}
        checkpoint['state'] = worker.state()
        worker.commit()
      if clock == crash_clock:
        worker.abandon()
        raise Crash()
    return hook

  survivors = [ssp.SSPWorker(store, i, num_workers, staleness, **kwargs)
                for i in (0, 1)]
  results = {}

  def survivor(i):
    results[i] = indicator_loop.run(
        survivors[i], steps, delay_s=lambda c: 0.005,
        after_publish=lambda c, v: survivors[i].commit())

  threads = [threading.Thread(target=survivor, args=(i,)) for i in (0, 1)]
  victim = ssp.SSPWorker(store, 2, num_workers, staleness, **kwargs)
  for t in threads:
    t.start()
  with pytest.raises(Crash):
    indicator_loop.run(victim, steps, after_publish=victim_hook(victim))
  # The survivors drop the dead worker from the bound and run past it.
  past_bound = crash_clock + staleness + 2
  for _ in range(400):
    if min(w.stats().clock for w in survivors) > past_bound:
      break
    threading.Event().wait(0.05)
  assert min(w.stats().clock for w in survivors) > past_bound
  restarted = ssp.SSPWorker(store, 2, num_workers, staleness, **kwargs)
  view, errors = indicator_loop.run(restarted, steps,
                                    state=checkpoint['state'],
                                    view=checkpoint['view'])
  for t in threads:
    t.join(30)
  assert errors == []
  for i in (0, 1):
    assert results[i][1] == []
    assert any(w == 2 for w, _ in survivors[i].stats().dropped)
  np.testing.assert_array_equal(view['count'], 1)
  assert len(store) == 0


def test_misuse_raises_clear_errors():
  store = ssp.InMemoryStore()
  with pytest.raises(ValueError, match='staleness must be'):
    ssp.SSPWorker(store, 0, 2, staleness=-2)
  with pytest.raises(ValueError, match='worker_id must be in'):
    ssp.SSPWorker(store, 2, 2, staleness=0)
  worker = ssp.SSPWorker(store, 0, 1, staleness=0, gc=False)
  with pytest.raises(ssp.SSPStateError, match='call join'):
    worker.pull(0)
  worker.join()
  with pytest.raises(ssp.SSPStateError, match='out of order'):
    worker.publish(1, {'x': np.ones(1)})
  worker.pull(0)
  worker.publish(0, {'x': np.ones(1)})
  worker.abandon()
  # A fresh worker 0 in the same run must bring its checkpoint.
  with pytest.raises(ssp.SSPStateError, match='already published clocks 0..0'):
    ssp.SSPWorker(store, 0, 1, staleness=0).join()


def test_restart_fails_clearly_if_its_updates_were_collected():
  store = ssp.InMemoryStore()
  workers = [ssp.SSPWorker(store, i, 2, staleness=0, timeout_s=5.0)
             for i in range(2)]
  state = None
  for w in workers:
    w.join()
  for clock in range(4):
    for w in workers:
      w.pull(clock)
      w.publish(clock, {'x': np.ones(1)})
    if clock == 0:
      state = workers[1].state()  # An old checkpoint; acks went past it.
  workers[0].abandon()
  workers[1].abandon()
  with pytest.raises(ssp.SSPStateError, match='garbage-collected'):
    ssp.SSPWorker(store, 1, 2, staleness=0).join(state)


def test_rejoin_adopts_an_update_written_before_its_clock_key():
  # A worker killed between writing update (1, 3) and its clock key: the others may already
  # have applied that update, so the rejoined worker replays it and continues at clock 4.
  store = ssp.InMemoryStore()
  workers = [ssp.SSPWorker(store, i, 2, staleness=0, timeout_s=5.0, commit_on_pull=False)
             for i in range(2)]
  for w in workers:
    w.join()
  for clock in range(3):
    for w in workers:
      w.pull(clock)
      w.publish(clock, {'x': np.full(1, float(clock))})
  state = workers[1].state()
  workers[1].commit()
  workers[1].abandon()
  key = 'pdcnno_ssp/default/u/1/{:010d}'.format  # The documented store layout.
  store.set(key(3), store.try_get(key(2)))
  again = ssp.SSPWorker(store, 1, 2, staleness=0, timeout_s=5.0, commit_on_pull=False)
  joined = again.join(state)
  assert joined.next_clock == 4
  assert len(joined.updates) == 1 and joined.updates[0].clock == 3
  again.abandon()
  workers[0].abandon()
