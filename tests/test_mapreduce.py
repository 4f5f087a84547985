"""Tests for pdcnno_jax.parallel.mapreduce and collectives in one process.

The Split helpers and report figures are pure numpy; the training tests run LeNet-5 on a tiny
generated in-memory data set over the 8 fake CPU devices of tests/conftest.py (one worker whose
local mesh is those 8 devices). Real multi-process runs are in test_mapreduce_multiprocess.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import batching
from pdcnno_jax.loop import saving
from pdcnno_jax.parallel import collectives
from pdcnno_jax.parallel import mapreduce
from pdcnno_jax.parallel import sync
from pdcnno_jax.testing import experiments as mode_fixtures
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import sharding as sharding_lib

# --- Split --------------------------------------------------------------------------------


def test_rounds_of_an_epoch_partition_its_permutation():
  plan = mapreduce.make_block_plan(1003, 20, 4, num_workers=2, local_batch_size=10)
  assert plan.block_size == 50 and plan.blocks_per_round == 5
  rounds = [plan.round_blocks(seed=3, epoch=1, round_in_epoch=r) for r in range(4)]
  assert all(r.shape == (5, 50) for r in rounds)
  order = input_pipeline.epoch_permutation(1003, 3, 1)
  np.testing.assert_array_equal(np.concatenate(rounds).ravel(), order[:1000])
  other_epoch = plan.round_blocks(seed=3, epoch=2, round_in_epoch=0)
  assert not np.array_equal(other_epoch, rounds[0])


def test_worker_shares_are_consecutive_disjoint_and_cover_the_round():
  round_blocks = np.arange(6 * 4).reshape(6, 4)
  assignment = np.array([1, 3, 0, 2])
  shares = [mapreduce.worker_share(round_blocks, assignment, k) for k in range(4)]
  assert [len(s) for s in shares] == [4, 12, 0, 8]
  np.testing.assert_array_equal(np.concatenate(shares), round_blocks.ravel())
  with pytest.raises(ValueError, match='sum to the 6 blocks'):
    mapreduce.worker_share(round_blocks, np.array([1, 1]), 0)


def test_local_steps_count_full_local_batches():
  np.testing.assert_array_equal(mapreduce.local_steps([1, 2, 5], 50, 32), [1, 3, 7])


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_blocks=10, rounds_per_epoch=3), 'multiple of'),
    (dict(num_blocks=4, rounds_per_epoch=2, num_workers=3), 'at least 6'),
    (dict(num_blocks=100, rounds_per_epoch=1, local_batch_size=16), 'fewer than one local'),
    (dict(num_blocks=4, rounds_per_epoch=0), 'rounds_per_epoch=0'),
])
def test_block_plan_rejects_settings_that_do_not_fit(kwargs, match):
  args = dict(num_blocks=8, rounds_per_epoch=2, num_workers=2, local_batch_size=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    mapreduce.make_block_plan(1000, args.pop('num_blocks'), args.pop('rounds_per_epoch'),
                              **args)


def test_local_batch_size():
  assert batching.local_batch_size(128, 4, 2) == 32
  with pytest.raises(ValueError, match='divisible by the 3 worker'):
    batching.local_batch_size(128, 3, 1)
  with pytest.raises(ValueError, match='divisible by the 3 devices'):
    batching.local_batch_size(128, 4, 3)


# --- Report figures -------------------------------------------------------------------------


def _gathered(busy, samples, reduce_s=0.0):
  busy = np.asarray(busy, np.float64)
  samples = np.asarray(samples, np.float64)
  rows = np.full((len(busy), 14), np.nan)
  rows[:, 0] = samples / busy  # speed
  rows[:, 6] = busy  # busy_s
  rows[:, 7] = busy  # wall_s
  rows[:, 8] = 0.5 * samples / 10  # loss_sum: loss 0.5 over steps of 10 samples
  rows[:, 9] = 0.25 * samples  # correct_sum
  rows[:, 10] = samples
  rows[:, 11] = samples / 10  # steps
  rows[:, 12] = reduce_s
  rows[:, 13] = busy.max() + np.max(reduce_s)  # round_s
  return rows


def test_round_report_figures():
  report = mapreduce.round_report(7, 1, np.array([3, 1]), _gathered([3.0, 2.0], [300, 100],
                                                                      reduce_s=[0.1, 1.1]))
  assert report['makespan_s'] == 3.0
  assert report['idle_s'] == [0.0, 1.0]
  assert report['speed'] == [100.0, 50.0]
  assert report['loss'] == pytest.approx(0.5)
  assert report['accuracy'] == pytest.approx(0.25)
  assert report['reduce_s'] == pytest.approx(0.1)  # Without the wait of the early worker.
  assert report['round_s'] == pytest.approx(4.1)
  assert 0 < report['entropy'] < 1
  balanced = mapreduce.round_report(0, 0, np.array([2, 2]), _gathered([2.0, 2.0], [200, 200]))
  assert balanced['entropy'] == pytest.approx(1.0)
  assert balanced['idle_s'] == [0.0, 0.0]


def test_speedup_of_balanced_equal_workers_is_their_number():
  rounds = [mapreduce.round_report(r, 0, np.array([2, 2, 2]),
                                   _gathered([2.0, 2.0, 2.0], [200, 200, 200]))
            for r in range(3)]
  figures = mapreduce.speedup_report(rounds)
  assert figures['speedup'] == pytest.approx(3.0)
  assert figures['ideal_speedup'] == pytest.approx(3.0)
  assert figures['efficiency'] == pytest.approx(1.0)
  # A slow worker holding the round back lowers the speed-up below the ideal.
  slow = [mapreduce.round_report(0, 0, np.array([2, 2]), _gathered([1.0, 4.0], [100, 100]))]
  figures = mapreduce.speedup_report(slow)
  assert figures['t1_s'] == pytest.approx(2.0)  # 200 examples at 100/s.
  assert figures['speedup'] == pytest.approx(0.5)
  assert figures['ideal_speedup'] == pytest.approx(1.25)


# --- Collectives in one process ---------------------------------------------------------------


def test_tree_averager_in_one_process_scales_floats_only():
  mesh = sharding_lib.make_mesh(jax.local_devices())
  replicated = sharding_lib.replicated(mesh)
  tree = {'w': jnp.arange(6.0).reshape(2, 3), 'count': jnp.array(7, jnp.int32),
          'key': jax.random.key(3), 'h': jnp.ones(4, jnp.bfloat16)}
  tree = jax.device_put(tree, replicated)
  averager = collectives.TreeAverager(replicated)
  out = averager(tree, 1.0)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and a.sharding == replicated
  np.testing.assert_array_equal(out['w'], tree['w'])
  np.testing.assert_array_equal(jax.random.key_data(out['key']),
                                jax.random.key_data(tree['key']))
  half = averager(tree, 0.5)
  np.testing.assert_array_equal(half['w'], 0.5 * np.arange(6.0).reshape(2, 3))
  assert int(half['count']) == 7


def test_allgather_rows_in_one_process():
  rows = collectives.allgather_rows(np.array([1.0, np.nan, 3.0]))
  assert rows.shape == (1, 3)
  np.testing.assert_array_equal(rows, [[1.0, np.nan, 3.0]])


# --- Training ---------------------------------------------------------------------------------


def test_one_worker_one_step_per_round_equals_plain_training(tmp_path):
  # 256 examples, batch 32: 8 blocks of 32 and 8 rounds per epoch = 1 local step per round.
  # The worker's local mesh is the 8 fake devices (data parallel inside the process).
  config = mode_fixtures.mapreduce_config(num_blocks=8, rounds_per_epoch=8, balancer='dlbpce')
  exp, tx, host_state = mode_fixtures.make_experiment(config, tmp_path)
  plain = sync.train_epochs(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                               num_epochs=config.num_epochs)
  merged, report = mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx)
  assert int(merged.step) == int(plain.step) == 16
  mode_fixtures.assert_states_close(merged.params, plain.params)
  mode_fixtures.assert_states_close(merged.opt_state, plain.opt_state)
  for leaf in jax.tree.leaves(merged):
    assert leaf.sharding.is_equivalent_to(sharding_lib.replicated(exp.mesh), leaf.ndim)
  assert len(report['rounds']) == 16
  assert all(r['blocks'] == [1] and r['steps'] == [1] for r in report['rounds'])
  assert report['rounds'][-1]['test']['accuracy'] > 0.5  # It learned something.
  assert report['speedup']['workers'] == 1


def test_killed_run_resumes_at_its_last_round(tmp_path, monkeypatch):
  config = mode_fixtures.mapreduce_config(num_blocks=8, rounds_per_epoch=2, balancer='lbrla')
  exp, tx, host_state = mode_fixtures.make_experiment(config, tmp_path, num_devices=1)
  straight, _ = mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx)

  checkpointer = checkpointing.Checkpointer(str(tmp_path / 'ckpt'))
  real_map_phase, calls = mapreduce.map_phase, []

  def dies_in_round_3(*args):
    calls.append(None)
    if len(calls) == 3:
      raise KeyboardInterrupt('killed')
    return real_map_phase(*args)

  monkeypatch.setattr(mapreduce, 'map_phase', dies_in_round_3)
  with pytest.raises(KeyboardInterrupt):
    mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                    checkpointer=checkpointer)
  checkpointer.wait()
  monkeypatch.setattr(mapreduce, 'map_phase', real_map_phase)

  # What experiment.train_and_evaluate does on a workdir holding a checkpoint.
  restored, meta = checkpointer.restore(sharding_lib.replicate(host_state, exp.mesh))
  saving.restore_meta(exp, meta)
  assert exp.mode_resume['next_round'] == 2
  resumed, report = mapreduce.train(exp, restored, tx=tx, checkpointer=checkpointer)
  checkpointer.close()
  assert [r['round'] for r in report['rounds']] == [0, 1, 2, 3]
  assert int(resumed.step) == int(straight.step)
  mode_fixtures.assert_states_close(resumed.params, straight.params, rtol=0, atol=0)


def test_full_batch_cgmse_is_refused_with_a_fix(tmp_path):
  config = mode_fixtures.mapreduce_config(num_blocks=8, rounds_per_epoch=2)
  config.optimizer.name = 'cgmse'
  config.optimizer.mode = 'full_batch'
  exp, tx, host_state = mode_fixtures.make_experiment(config, tmp_path, num_devices=1)
  with pytest.raises(ValueError, match="optimizer.mode='minibatch'"):
    mapreduce.train(exp, host_state, tx=tx)
