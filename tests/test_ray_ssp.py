"""SSP on Ray: the parameter server's rule and exactly-once delivery, then LeNet-5 training.

One embedded Ray session for the module. The protocol tests use the one-hot-update trick: worker
k's delta at clock c is 1 at element k * T + c of a zero vector (split over two leaves, so two
shards), so the final parameters are all ones exactly when every update was applied once, and
each view tells which updates it holds, so the staleness bound can be checked on every read.
"""

import os

import numpy as np
import pytest

from pdcnno_jax.parallel.ray_engine import ps
from pdcnno_jax.parallel.ray_engine import shared_view

_WORKERS = 2
_CLOCKS = 12


def test_split_by_bytes_balances_and_covers_every_leaf():
  shards = ps.split_by_bytes([400, 100, 300, 200, 10], 2)
  assert sorted(i for s in shards for i in s) == [0, 1, 2, 3, 4]
  loads = [sum([400, 100, 300, 200, 10][i] for i in s) for s in shards]
  assert max(loads) - min(loads) <= 10
  with pytest.raises(ValueError, match='ps_shards=3'):
    ps.split_by_bytes([1, 2], 3)


def _one_hot_worker_class(ray):
  """A worker actor (defined here so Ray ships it by value) that pushes one-hot deltas."""

  @ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)
  class OneHotWorker:

    def __init__(self, me, shards, assignment, sizes, staleness, kill_at, slow_s,
                 pipelined=False, shared=False, drop_ring_every=0):
      from pdcnno_jax.parallel.ray_engine import ps_client  # pylint: disable=g-import-not-at-top
      self.me, self.sizes, self.staleness, self.slow_s = me, sizes, staleness, slow_s
      restarted = ray.get_runtime_context().was_current_actor_reconstructed
      self.kill_at = -1 if restarted else kill_at
      self.client = ps_client.PSClient(shards, assignment, me, staleness, 60.0)
      # The worker actor's paths: the read for clock c + 1 prefetched during clock c, or the
      # push through an outbox and the read from the shards' shared-memory publications.
      if shared:
        assert self.client.attach_shared()  # Every shard is on this (the only) node.
      if drop_ring_every:  # Lose every k-th doorbell ring, as a dead shard's pipe would.
        ring, rung = self.client._ring, [0]  # pylint: disable=protected-access

        def lossy_ring(shard, clock):
          rung[0] += 1
          if rung[0] % drop_ring_every:
            ring(shard, clock)

        self.client._ring = lossy_ring  # pylint: disable=protected-access
      self.pipeline = (ps_client.ClockPipeline(self.client, _CLOCKS, prefetch=pipelined,
                                               shared=shared)
                       if pipelined or shared else None)

    def run(self):
      first = self.client.applied_clock() + 1  # A restarted worker goes on after its last push.
      views = []
      zeros = np.split(np.zeros(_WORKERS * _CLOCKS, np.float32), np.cumsum(self.sizes)[:-1])
      if self.pipeline:
        leaves = self.pipeline.begin(first, zeros if first == 0 else None)
      else:
        leaves = zeros if first == 0 else self.client.step(first, None, first)
      for clock in range(first, _CLOCKS):
        flat = np.concatenate([np.asarray(x) for x in leaves])
        views.append((clock, flat.reshape(_WORKERS, _CLOCKS).copy()))
        delta = np.zeros(_WORKERS * _CLOCKS, np.float32)
        delta[self.me * _CLOCKS + clock] = 1.0
        parts = np.split(delta, np.cumsum(self.sizes)[:-1])
        import time  # pylint: disable=g-import-not-at-top
        time.sleep(self.slow_s)
        if self.pipeline:
          leaves = self.pipeline.advance(clock, parts)
        else:
          leaves = self.client.step(clock, parts, clock + 1 if clock + 1 < _CLOCKS else None)
        if clock == self.kill_at:
          if self.pipeline:
            self.pipeline.drain()
          os.kill(os.getpid(), 9)
      return views, self.client.kept_clocks(), self.client.resends, self.client.shared_reads

  return OneHotWorker


def _run_one_hot(ray, workdir, staleness, *, kill_worker_at=-1, kill_shard_after=0,
                 snapshot_every=3, pipelined=False, shared=False, drop_ring_every=0):
  sizes = [10, 14]  # Two leaves of the 24-element vector, one per shard.
  leaves = [np.zeros(n, np.float32) for n in sizes]
  shard_cls = ray.remote(ps.ParameterShard)
  shards = [shard_cls.options(num_cpus=0, max_restarts=2, max_concurrency=100).remote(
      i, [leaves[i]], _WORKERS, staleness, str(workdir), snapshot_every, 60.0,
      kill_shard_after if i == 1 else 0, False, shared) for i in range(2)]
  worker_cls = _one_hot_worker_class(ray)
  workers = [worker_cls.remote(k, shards, [[0], [1]], sizes, staleness,
                               kill_worker_at if k == 1 else -1, 0.002 * (1 + 3 * k),
                               pipelined, shared, drop_ring_every)
             for k in range(_WORKERS)]
  results = ray.get([w.run.remote() for w in workers])
  finals = ray.get([s.final.remote() for s in shards])
  ray.get([s.remove_shared_view.remote() for s in shards])
  for actor in workers + shards:
    ray.kill(actor, no_restart=True)
  final = np.concatenate([f['leaves'][0] for f in finals])
  return results, finals, final


def _assert_views_within_bound(results, staleness):
  reached = 0
  for me, (views, *_) in enumerate(results):
    for clock, seen in views:
      np.testing.assert_array_equal(seen[me, :clock], 1.0)  # Always its own updates.
      assert set(np.unique(seen)) <= {0.0, 1.0}  # Nothing ever applied twice.
      for other in range(_WORKERS):
        # Every update through clock - s - 1 of every worker is in the view (ASP: no bound).
        bound = 0 if staleness is None else max(clock - staleness, 0)
        np.testing.assert_array_equal(seen[other, :bound], 1.0)
        if staleness == 0:  # BSP: exactly those, nothing newer.
          np.testing.assert_array_equal(seen[other, clock:], 0.0)
        newest = int(np.flatnonzero(seen[other]).max(initial=-1))
        reached = max(reached, clock - 1 - newest)
  return reached


@pytest.mark.parametrize('staleness', [0, 2, None])
def test_every_update_once_and_the_bound_holds(ray_session, tmp_path, staleness):
  results, finals, final = _run_one_hot(ray_session, tmp_path, staleness)
  np.testing.assert_array_equal(final, 1.0)
  assert [f['duplicates'] for f in finals] == [0, 0]
  reached = _assert_views_within_bound(results, staleness)
  if staleness is not None:
    assert reached <= staleness
  if staleness != 0:
    assert reached >= 1  # The slow worker really lagged: the check is not vacuous.


@pytest.mark.parametrize('staleness', [1, 3, None])
def test_prefetched_reads_keep_the_bound_and_every_update_once(ray_session, tmp_path, staleness):
  """The read for clock c + 1 goes out before clock c's push: its view still obeys the rule."""
  results, finals, final = _run_one_hot(ray_session, tmp_path, staleness, pipelined=True)
  np.testing.assert_array_equal(final, 1.0)
  assert [f['duplicates'] for f in finals] == [0, 0]
  # Own updates through c - 1 (the last one added locally), others' through c - s - 1, none
  # twice, on every view.
  reached = _assert_views_within_bound(results, staleness)
  if staleness is not None:
    assert reached <= staleness
  assert reached >= 1  # Views older than the newest clock occur: the check is not vacuous.


def test_prefetched_worker_killed_restarts_and_nothing_is_applied_twice(ray_session, tmp_path):
  results, finals, final = _run_one_hot(ray_session, tmp_path, 2, kill_worker_at=5,
                                        pipelined=True)
  np.testing.assert_array_equal(final, 1.0)
  assert results[1][0][0][0] == 6
  assert [f['duplicates'] for f in finals] == [0, 0]
  _assert_views_within_bound(results, 2)


@pytest.mark.parametrize('staleness', [0, 1, 3, None])
def test_shared_memory_reads_keep_the_bound_and_every_update_once(ray_session, tmp_path,
                                                                  staleness):
  """Reads from the publications, own deltas added locally: every view obeys the rule.

  Under s = 0 exactly: every view holds every update through c - 1 and none newer.
  """
  results, finals, final = _run_one_hot(ray_session, tmp_path, staleness, shared=True)
  np.testing.assert_array_equal(final, 1.0)
  assert [f['duplicates'] for f in finals] == [0, 0]
  assert [r[3] for r in results] == [_CLOCKS - 1] * _WORKERS  # Every read after clock 0's.
  # Every push came through the doorbell, none in a call: a clock made no Ray call.
  assert [f['rung_pushes'] for f in finals] == [f['pushes'] for f in finals]
  assert sum(r[2] for r in results) == 0
  reached = _assert_views_within_bound(results, staleness)
  if staleness is not None:
    assert reached <= staleness
  if staleness != 0:
    assert reached >= 1  # The slow worker really lagged: the check is not vacuous.
  assert not any(os.path.exists(shared_view.default_path(str(tmp_path), i)) for i in (0, 1))


def test_shared_memory_worker_killed_restarts_and_nothing_is_applied_twice(ray_session,
                                                                          tmp_path):
  results, finals, final = _run_one_hot(ray_session, tmp_path, 2, kill_worker_at=5, shared=True)
  np.testing.assert_array_equal(final, 1.0)
  assert results[1][0][0][0] == 6  # The restarted worker's first view is for clock 6.
  assert [f['duplicates'] for f in finals] == [0, 0]
  _assert_views_within_bound(results, 2)


def test_shared_memory_shard_killed_restarts_and_gets_the_lost_deltas(ray_session, tmp_path):
  """The restarted shard republishes its snapshot; the workers re-send what it lost."""
  results, finals, final = _run_one_hot(ray_session, tmp_path, 1, kill_shard_after=11,
                                        shared=True)
  np.testing.assert_array_equal(final, 1.0)  # Equal to a run without the failure, bitwise.
  assert finals[1]['restarted'] and not finals[0]['restarted']
  assert sum(r[2] for r in results) > 0  # Deltas after the snapshot were re-sent.
  _assert_views_within_bound(results, 1)


def test_shared_memory_lost_doorbell_rings_are_recovered_and_applied_once(ray_session,
                                                                          tmp_path):
  """A push whose ring is lost reaches the shard by re-send: asked for, or found missing."""
  results, finals, final = _run_one_hot(ray_session, tmp_path, 2, shared=True,
                                        drop_ring_every=5)
  np.testing.assert_array_equal(final, 1.0)
  assert sum(r[2] for r in results) > 0  # The lost ones were re-sent.
  assert all(f['rung_pushes'] < f['pushes'] for f in finals)
  _assert_views_within_bound(results, 2)


def test_prefetch_is_refused_under_bsp():
  from pdcnno_jax.parallel.ray_engine import ps_client  # pylint: disable=g-import-not-at-top
  client = ps_client.PSClient([], [], 0, 0, 1.0)
  with pytest.raises(ValueError, match='prefetch needs staleness >= 1'):
    ps_client.ClockPipeline(client, 4, prefetch=True)


def test_killed_worker_restarts_and_nothing_is_applied_twice(ray_session, tmp_path):
  results, finals, final = _run_one_hot(ray_session, tmp_path, 1, kill_worker_at=5)
  np.testing.assert_array_equal(final, 1.0)  # Clock 5's push landed once, before the kill.
  assert results[1][0][0][0] == 6  # The restarted worker's first view is for clock 6.
  assert all(f['applied'].tolist() == [_CLOCKS - 1] * _WORKERS for f in finals)
  _assert_views_within_bound(results, 1)


def test_killed_shard_restarts_from_its_snapshot_and_gets_the_lost_deltas(ray_session, tmp_path):
  results, finals, final = _run_one_hot(ray_session, tmp_path, 1, kill_shard_after=11)
  np.testing.assert_array_equal(final, 1.0)  # Equal to a run without the failure, bitwise.
  assert finals[1]['restarted'] and not finals[0]['restarted']
  assert sum(r[2] for r in results) > 0  # Deltas after the snapshot were re-sent.
  assert os.path.exists(os.path.join(tmp_path, 'ssp_ps_1', ps.SNAPSHOT_NAME))
  _assert_views_within_bound(results, 1)


# --- LeNet-5 through the driver --------------------------------------------------------------


def _config(**parallel):
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  config = experiments.mapreduce_config()
  config.parallel.mode = 'ssp'
  config.parallel.engine = 'ray'
  config.parallel.num_workers = _WORKERS
  config.parallel.ssp_timeout_s = 90.0
  config.checkpoint_every_steps = 4
  config.parallel.update(parallel)
  return config


def test_proportional_batches_follow_speeds_and_stragglers_are_injected(ray_session, tmp_path):
  """Worker 1 three times slower: after warm-up it gets the smaller piece; transients drawn.

  Transients stretch a step by 1.5x only, so worker 0's median warm-up step stays below worker
  1's even where the seeded draws hit worker 0 in the warm-up.
  """
  from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding  # pylint: disable=g-import-not-at-top
  del ray_session
  config = _config(staleness=1, slowdown='1,3', ssp_batch_balancer='proportional',
                   ssp_warmup_steps=4, straggler_probability=0.25,
                   straggler_factor=1.5)
  exp, tx, host_state = experiments.make_experiment(config, tmp_path, num_devices=1)
  _, report = ssp_driver.train(exp, sharding.replicate(host_state, exp.mesh), tx=tx)
  sizes = report['batch_sizes']
  assert sum(sizes) == config.data.batch_size and sizes[0] > sizes[1], sizes
  assert all(r['transient_steps'] > 0 for r in report['per_worker'])  # Seeded draws.
  # One node: every clock through shared memory, every push through the doorbell.
  assert [r['read_path'] for r in report['per_worker']] == ['shared_memory'] * _WORKERS
  assert all(r['shared_memory_reads'] == r['steps'] - 1 for r in report['per_worker'])
  assert [p['rung_pushes'] for p in report['ps']] == [p['pushes'] for p in report['ps']]
  publication = shared_view.default_path(str(tmp_path), 0)
  assert not any(os.path.exists(p) for p in (publication, shared_view.doorbell_path(publication),
                                             shared_view.outbox_path(publication, 0, 0),
                                             shared_view.wake_path(publication, 0)))


def test_bsp_on_ray_matches_synchronous_training_through_a_shard_kill(ray_session, tmp_path):
  """s = 0, 2 shards, shard 1 SIGKILLed after 13 pushes: the parameters of synchronous SGD."""
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel import sync  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding  # pylint: disable=g-import-not-at-top
  del ray_session
  config = _config(staleness=0, ps_shards=2, slowdown='1,3', ps_snapshot_every_clocks=4)
  exp, tx, host_state = experiments.make_experiment(config, tmp_path, num_devices=1)
  plain = sync.train_epochs(exp, sharding.replicate(host_state, exp.mesh), tx=tx,
                            num_epochs=config.num_epochs)
  state, report = ssp_driver.train(exp, sharding.replicate(host_state, exp.mesh), tx=tx,
                                   faults=ssp_driver.FaultPlan(shard_pushes={1: 13}))
  assert [p['restarted'] for p in report['ps']] == [False, True]
  assert sum(r['resent_deltas'] for r in report['per_worker']) > 0
  experiments.assert_states_close(jax.device_get(state.params), jax.device_get(plain.params),
                                  rtol=1e-4, atol=2e-6)
  assert report['clocks'] == 16 and report['max_view_staleness'] == 0
  # Exact BSP through shared memory, the shard kill included.
  assert [r['read_path'] for r in report['per_worker']] == ['shared_memory'] * _WORKERS
  assert [p['applied'] for p in report['ps']] == [[15, 15]] * 2
  moved = report['transport']
  assert moved['bytes_sent'] > 0 and moved['bytes_received'] > 0
  assert len(moved['workers']) == _WORKERS and len(moved['wait_seconds'][0]) == 16
  assert report['per_worker'][1]['slept_s'] > 0
  # Each actor runs its own JAX on 1 CPU device: the test session's 8 fake devices stay out.
  assert [r['devices'] for r in report['per_worker']] == [1, 1]
  assert report['accuracy_vs_time'][-1]['clock'] == 16


def test_killed_worker_then_killed_driver_the_rerun_resumes_from_the_workdir(ray_session, tmp_path):
  from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import training  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding  # pylint: disable=g-import-not-at-top
  del ray_session
  config = _config(staleness=1, ps_snapshot_every_clocks=2)
  exp, tx, host_state = experiments.make_experiment(config, tmp_path, num_devices=1)
  # Worker 1 is SIGKILLed after its clock 5 (Ray restarts it: it resumes from its clock-4
  # checkpoint at clock 6), then the driver dies once every worker pushed clock 11.
  with pytest.raises(ssp_driver.DriverCrash) as crash:
    ssp_driver.train(exp, sharding.replicate(host_state, exp.mesh), tx=tx,
                     faults=ssp_driver.FaultPlan(worker_clock={1: 5}, driver_clock=11))
  stopped = crash.value.shards[0]
  assert stopped['rejoins'] == 1  # Worker 1, restarted by Ray, asked where to go on from.
  assert stopped['duplicates'] == 0 and stopped['pushes'] == 2 * 12  # Clocks 0..11, once each.
  assert os.path.exists(os.path.join(tmp_path, ssp_driver.JOB_FILE))
  # The rerun is the user's: the mode's entry point, no fault plan.
  _, report = training.train(exp, sharding.replicate(host_state, exp.mesh), tx=tx)
  firsts = [r['first_clock'] for r in report['per_worker']]
  assert report['resumed'] and min(firsts) >= 8  # From a snapshot, not from clock 0.
  shard = report['ps'][0]
  assert shard['applied'] == [15, 15] and shard['duplicates'] == 0 and shard['rejoins'] == 2
  # The resumed shard applied exactly the clocks after its snapshot, each once.
  assert shard['pushes'] == sum(16 - f for f in firsts)
  assert not os.path.exists(os.path.join(tmp_path, ssp_driver.JOB_FILE))


def test_a_non_finite_loss_stops_the_job_with_the_one_message(ray_session, tmp_path):
  from pdcnno_jax.loop import checks  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding  # pylint: disable=g-import-not-at-top
  del ray_session
  config = _config(staleness=1)
  config.optimizer.learning_rate = 1e12
  config.log_every_steps = 2
  config.diagnostics.collapse_check = False
  exp, tx, host_state = experiments.make_experiment(config, tmp_path, num_devices=1)
  with pytest.raises(checks.NonFiniteLossError, match='Training loss is (nan|inf) at clock') as e:
    ssp_driver.train(exp, sharding.replicate(host_state, exp.mesh), tx=tx)
  from pdcnno_jax import main  # pylint: disable=g-import-not-at-top
  code, lines = main.error_lines(e.value)  # The one line main prints, without Ray's wrapping.
  assert code == 4 and len(lines) == 1 and lines[0].startswith('Training diverged: Training loss')


def test_a_collapsed_run_stops_the_job_with_the_one_message(ray_session, tmp_path):
  # conv1's bias far below zero kills every ReLU from the start: the logits no longer depend
  # on the input, the classifier settles on the class prior, and after a post-warm-up epoch
  # of clocks at it the job stops (the trainer's collapse watch, in every worker actor).
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.diagnostics import collapse  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding  # pylint: disable=g-import-not-at-top
  del ray_session
  config = _config(staleness=1)
  config.num_epochs = 4
  config.optimizer.warmup_epochs = 0.0
  config.log_every_steps = 2
  exp, tx, host_state = experiments.make_experiment(config, tmp_path, num_devices=1)
  dead = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.full_like(x, -1e3) if "['conv1']" in jax.tree_util.keystr(path)
                       and 'bias' in jax.tree_util.keystr(path) else x), host_state.params)
  host_state = host_state.replace(params=dead)
  with pytest.raises(collapse.TrainingCollapseError, match=r'\(SSP worker \d\)') as e:
    ssp_driver.train(exp, sharding.replicate(host_state, exp.mesh), tx=tx)
  from pdcnno_jax import main  # pylint: disable=g-import-not-at-top
  code, lines = main.error_lines(e.value)
  assert code == 4 and len(lines) == 1 and lines[0].startswith('Training collapsed: ')


def test_bad_ray_keys_are_clear_errors(tmp_path):
  from pdcnno_jax.parallel.ssp import training  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  for parallel, match in ((dict(num_workers=0), 'parallel.num_workers=0'),
                          (dict(ps_shards=0), 'parallel.ps_shards=0'),
                          (dict(ps_snapshot_every_clocks=-1), 'ps_snapshot_every_clocks'),
                          (dict(num_workers=3), 'divisible by the 3 workers')):
    exp, _, _ = experiments.make_experiment(_config(**parallel), tmp_path, num_devices=1)
    with pytest.raises(ValueError, match=match):
      training.validate(exp.config, exp.dataset)
