"""MapReduce on Ray (`parallel.ray_engine.mapreduce`): same numbers as the jax engine, faults.

One embedded Ray session for the module; LeNet-5 on the tiny generated data set of
`testing.experiments`, 4 rounds of 4 blocks (2 epochs x 2 rounds). The runs:
  * 1 worker actor against the jax engine in this process: the same training;
  * 2 worker actors (equal split) against a reference computed here with the same Map
    (`mapreduce_core.map_phase` on each worker's share) and a float64 weighted average;
  * the same 2-worker run with worker 1's actor SIGKILLed inside its Map of round 1 and the
    driver interrupted after round 2, then resumed from the workdir's checkpoint: the report
    names the re-executed blocks, every block is applied once, and the final state equals
    the failure-free run's bit for bit (a re-executed Map sees the same state and blocks).
"""

import jax
import numpy as np
import pytest

from pdcnno_jax.loop import saving
from pdcnno_jax.parallel import mapreduce
from pdcnno_jax.parallel import mapreduce_core
from pdcnno_jax.parallel import monitor as monitor_lib
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.parallel.ray_engine import map_worker
from pdcnno_jax.parallel.ray_engine import mapreduce as ray_mapreduce
from pdcnno_jax.parallel.ray_engine import runtime
from pdcnno_jax.testing import experiments as mode_fixtures
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import sharding as sharding_lib

_KILLED_ROUND, _INTERRUPTED_AFTER = 1, 2


def _config(**parallel):
  # 256 examples: 8 blocks of 32, 4 per round; batch 32 = 16 per worker, 2 steps per block.
  options = dict(num_blocks=8, rounds_per_epoch=2, engine='ray', num_workers=2,
                 balancer='equal')
  options.update(parallel)
  return mode_fixtures.mapreduce_config(**options)


@pytest.fixture(name='two_workers', scope='module')
def fixture_two_workers(ray_session, tmp_path_factory):
  """(experiment, host state at the start, final state, report) of the failure-free run."""
  del ray_session
  exp, tx, host_state = mode_fixtures.make_experiment(
      _config(), tmp_path_factory.mktemp('straight'), num_devices=1)
  state, report = mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx)
  return exp, tx, host_state, jax.device_get(state), report


@pytest.fixture(name='faulty', scope='module')
def fixture_faulty(ray_session, tmp_path_factory):
  """The 2-worker run with a killed worker and an interrupted, resumed driver."""
  del ray_session
  workdir = tmp_path_factory.mktemp('faulty')
  exp, tx, host_state = mode_fixtures.make_experiment(_config(), workdir, num_devices=1)
  checkpointer = checkpointing.Checkpointer(str(workdir / 'ckpt'))
  real_close = mapreduce_core.Rounds.close

  def close_then_interrupt(self, round_index, *args, **kwargs):
    stop = real_close(self, round_index, *args, **kwargs)
    if round_index == _INTERRUPTED_AFTER:
      raise KeyboardInterrupt('driver killed')
    return stop

  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(map_worker.KILL_MAP_ENV, f'{_KILLED_ROUND}:1')
    patch.setattr(mapreduce_core.Rounds, 'close', close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
      mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                      checkpointer=checkpointer)
  checkpointer.wait()
  first_rounds = list(exp.mode_resume['rounds'])
  # What experiment.train_and_evaluate does on a workdir holding a checkpoint.
  restored, meta = checkpointer.restore(sharding_lib.replicate(host_state, exp.mesh))
  saving.restore_meta(exp, meta)
  resumed, report = mapreduce.train(exp, restored, tx=tx, checkpointer=checkpointer)
  checkpointer.close()
  return first_rounds, jax.device_get(resumed), report


def test_one_worker_equals_the_jax_engine(ray_session, tmp_path):
  del ray_session
  # The actor's steps are stretched 2x by its slowdown: a sleep, the numbers are untouched.
  exp, tx, host_state = mode_fixtures.make_experiment(_config(num_workers=1, slowdown='2'),
                                                      tmp_path, num_devices=1)
  on_ray, report = mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx)
  exp.config.parallel.engine = 'jax'
  on_jax, jax_report = mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh),
                                       tx=tx)
  assert report['engine'] == 'ray' and 'engine' not in jax_report
  assert int(on_ray.step) == int(on_jax.step) == 16
  mode_fixtures.assert_states_close(on_ray, on_jax)
  assert [r['blocks'] for r in report['rounds']] == [[4]] * 4
  assert report['slowdown'] == [2.0] and all(r['slept_s'][0] > 0 for r in report['rounds'])
  assert report['workers_info'][0]['devices'] == 1  # Not the 8 fake devices of this process.


def _reference(exp, tx, host_state, report):
  """The 2-worker rounds recomputed here: the same Map per share, a float64 average."""
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  split = exp.dataset.host_splits['train']
  batch = report['local_batch_size']
  worker = mapreduce_core.Worker(
      data_sharding=sharding_lib.batch_sharded(mesh),
      step_fn=mapreduce_core.local_train_step(exp.graphdef, tx, exp.preprocess, mesh),
      slow=slowdown_lib.Slowdown(), monitor=monitor_lib.WorkerMonitor(),
      images=split.images, labels=split.labels, batch=batch)
  parallel = exp.config.parallel
  plan = mapreduce_core.make_block_plan(exp.dataset.num_examples['train'], parallel.num_blocks,
                                        parallel.rounds_per_epoch, num_workers=2,
                                        local_batch_size=batch)
  state = host_state
  for r in report['rounds']:
    round_blocks = plan.round_blocks(exp.config.seed, r['epoch'],
                                     r['round'] % plan.rounds_per_epoch)
    trained = []
    for k in range(2):
      share = mapreduce_core.worker_share(round_blocks, np.array(r['blocks']), k)
      out, figures = mapreduce_core.map_phase(
          worker, sharding_lib.replicate(state, mesh), share)
      trained.append((jax.device_get(out), figures['samples']))
    total = sum(n for _, n in trained)

    def average(*leaves):
      if np.issubdtype(np.asarray(leaves[0]).dtype, np.floating):
        return sum(np.float64(x) * n / total for x, (_, n) in zip(leaves, trained))
      return (sum(np.int64(x) for x in leaves) + 1) // 2

    state = jax.tree.map(average, *[s for s, _ in trained])
  return state


def test_two_workers_equal_the_same_map_and_a_weighted_average(two_workers):
  exp, tx, host_state, state, report = two_workers
  reference = _reference(exp, tx, host_state, report)
  mode_fixtures.assert_states_close(state, reference)
  assert int(state.step) == 16  # 4 rounds of 2 blocks x 2 steps on each worker.
  first_round_params = jax.tree.leaves(host_state.params)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                    first_round_params))


def test_report_has_rounds_waits_and_transport(two_workers):
  _, _, host_state, _, report = two_workers
  rounds = report['rounds']
  assert len(rounds) == 4 and report['workers'] == 2
  for r in rounds:
    assert r['blocks'] == [2, 2] and r['samples'] == [64, 64]  # Every block once.
    assert r['wait_seconds'] >= 0 and r['reexecuted'] == []
    assert r['slept_s'] == [0.0, 0.0]  # No slowdown configured.
  state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(host_state))
  transport = report['transport']
  assert len(transport['workers']) == 2
  for worker in transport['workers']:
    assert worker['bytes_received'] == worker['bytes_sent'] == 4 * state_bytes
    assert worker['transfer_seconds'] > 0
  assert transport['bytes_sent'] == sum(w['bytes_sent'] for w in transport['workers'])


def test_killed_worker_map_runs_again_and_only_once(faulty, two_workers):
  first_rounds, _, _ = faulty
  assert [r['round'] for r in first_rounds] == [0, 1, 2]
  for r in first_rounds:
    assert r['samples'] == [64, 64]  # Each worker's blocks trained once in every round.
    if r['round'] == _KILLED_ROUND:
      (entry,) = r['reexecuted']
      # Round 1 holds blocks 4-7 of epoch 0; worker 1 has the last two.
      assert entry['worker'] == 1 and entry['blocks'] == [6, 7]
      assert entry['ran_on'] == 1 and entry['attempts'] >= 2  # Restarted, then re-run there.
      assert entry['errors']  # What the failed attempts raised.
    else:
      assert r['reexecuted'] == []
  assert [r['blocks'] for r in first_rounds] == [
      r['blocks'] for r in two_workers[4]['rounds'][:3]]


def test_killed_driver_resumes_and_matches_the_failure_free_run(faulty, two_workers):
  _, resumed, report = faulty
  assert [r['round'] for r in report['rounds']] == [0, 1, 2, 3]
  mode_fixtures.assert_states_close(resumed, two_workers[3], rtol=0, atol=0)


def test_shards_split_leaves_by_bytes_and_cover_them_once():
  groups = ray_mapreduce.shard_leaves([100, 1, 60, 50, 2], 2)
  assert sorted(sum(groups, [])) == [0, 1, 2, 3, 4]
  assert groups == [[0, 1, 4], [2, 3]]  # 103 and 110 bytes.
  assert ray_mapreduce.shard_leaves([5, 5], 4) == [[0], [1]]


def test_average_leaf_matches_the_collective_rules():
  floats = [np.array([1.0, 2.0], np.float32), np.array([3.0, 5.0], np.float32)]
  np.testing.assert_allclose(ray_mapreduce.average_leaf(floats, np.array([0.25, 0.75])),
                             [2.5, 4.25])
  counts = [np.array(3, np.int32), np.array(6, np.int32)]
  assert int(ray_mapreduce.average_leaf(counts, np.array([0.5, 0.5]))) == 5  # 4.5 -> 5.
  assert ray_mapreduce.average_leaf(counts, np.array([0.5, 0.5])).dtype == np.int32


def test_zero_workers_are_refused_with_the_key():
  config = _config(num_workers=0)
  with pytest.raises(ValueError, match='num_workers=0'):
    ray_mapreduce.validate(config, mode_fixtures.quadrants_dataset())


def test_actor_env_gives_each_worker_one_cpu_device(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_foo=1')
  env = runtime.actor_env(_config())
  assert env['JAX_PLATFORMS'] == 'cpu'
  assert env['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=1'
