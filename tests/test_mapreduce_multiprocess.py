"""MapReduce training with real local processes joined by jax.distributed (gloo on CPU).

One 2-process job (started with pdcnno_jax.launch_local) trains LeNet-5 on a small generated
data set for 3 rounds, with worker 1 slowed 3x (config.parallel.slowdown = '1,3') and the
default DLBPCE balancer, and checkpoints every round. Each process writes what it saw; the
tests check:
  * after every Reduce both processes hold bitwise identical states (and they differed before
    it, so the Reduce did the work);
  * after the first round and after the second, the slowed worker trains a third of the fast
    worker's blocks;
  * the round checkpoints carry the resume point.

Timing is made deterministic so that no assertion depends on the load of the machine: each
worker's `Slowdown` reads a step clock under which every step's device work takes exactly
`_TICK_S` (the slowdown then really sleeps its extra 2 x `_TICK_S`), so the monitor measures
busy times in the exact ratio 1 : 3. Everything else (Map, Reduce, all-gather, balancer,
checkpoints) is the real thing.

This file is also the worker: ``python -m test_mapreduce_multiprocess --out_dir=...`` (with
the launcher's coordinator flags).
"""

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)
_NUM_PROCESSES = 2
_ROUNDS = 3
_TICK_S = 0.005


class _StepClock:
  """Clock for `Slowdown.run`: the step itself takes `tick`, sleeps take what they sleep.

  `Slowdown.run` reads the clock three times per step (start, device work done, end), so the
  second read of each triple is where the step's compute time passes.
  """

  def __init__(self, tick: float):
    self.tick = tick
    self.now = 0.0
    self.calls = 0

  def __call__(self) -> float:
    self.calls += 1
    if self.calls % 3 == 2:
      self.now += self.tick
    return self.now

  def sleep(self, seconds: float) -> None:
    self.now += seconds
    time.sleep(seconds)


# --- The worker (runs in each launched process) ----------------------------------------------


def _worker(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  args = parser.parse_args(argv)

  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel import collectives, mapreduce  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel import slowdown  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments as mode_fixtures  # pylint: disable=g-import-not-at-top

  # 2560 examples = 40 blocks of 64 = one local batch (128 // 2 processes) each; 1 round per
  # epoch. Steps of 64 examples keep the scheduler's jitter small next to a step.
  config = mode_fixtures.mapreduce_config(num_blocks=40, rounds_per_epoch=1, slowdown='1,3',
                                          balancer='dlbpce')
  config.num_epochs = _ROUNDS
  config.data.batch_size = 128
  exp, tx, host_state = mode_fixtures.make_experiment(config, args.out_dir, num_train=2560)

  reduces = []
  average = collectives.TreeAverager.__call__

  def recording_average(self, tree, weight):
    out = average(self, tree, weight)
    reduces.append({
        'weight': float(weight),
        'before': [np.asarray(x).tolist() for x in jax.tree.leaves(tree.params)][-1],
        'after_sum': float(sum(np.abs(np.asarray(x, np.float64)).sum()
                               for x in jax.tree.leaves(out))),
    })
    return out

  collectives.TreeAverager.__call__ = recording_average
  clock, from_config = _StepClock(_TICK_S), slowdown.Slowdown.from_config.__func__
  slowdown.Slowdown.from_config = classmethod(
      lambda cls, *a, **k: from_config(cls, *a, clock=clock, sleep=clock.sleep, **k))
  checkpointer = checkpointing.Checkpointer(os.path.join(args.out_dir, 'ckpt'))
  state, report = mapreduce.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                                  checkpointer=checkpointer)
  checkpointer.close()
  meta = checkpointer.read_meta()
  local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
  pid = jax.process_index()
  np.savez(os.path.join(args.out_dir, f'params{pid}.npz'),
           *[np.asarray(x) for x in jax.tree.leaves(local.params)])
  with open(os.path.join(args.out_dir, f'{pid}.json'), 'w') as f:
    json.dump({'report': report, 'reduces': reduces, 'meta': meta,
               'step': int(local.step), 'devices': jax.device_count()}, f)


# --- The tests -----------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def job(tmp_path_factory):
  """Runs the 2-process job once; returns (per-process results, params, log)."""
  from pdcnno_jax import launch_local  # pylint: disable=g-import-not-at-top
  out_dir = str(tmp_path_factory.mktemp('mapreduce_job'))
  log = io.StringIO()
  old = os.environ.get('PYTHONPATH')
  os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (_TESTS, _REPO, old) if p)
  try:
    code = launch_local.launch(_NUM_PROCESSES, [f'--out_dir={out_dir}'],
                               module='test_mapreduce_multiprocess', devices_per_process=1,
                               timeout_s=150, stdout=log)
  finally:
    if old is None:
      del os.environ['PYTHONPATH']
    else:
      os.environ['PYTHONPATH'] = old
  assert code == 0, log.getvalue()[-5000:]
  results, params = [], []
  for pid in range(_NUM_PROCESSES):
    with open(os.path.join(out_dir, f'{pid}.json')) as f:
      results.append(json.load(f))
    with np.load(os.path.join(out_dir, f'params{pid}.npz')) as npz:
      params.append([npz[k] for k in sorted(npz.files, key=lambda k: int(k.split('_')[1]))])
  return results, params, log.getvalue()


def test_processes_hold_identical_states_after_each_reduce(job):
  results, params, log = job
  assert results[0]['devices'] == _NUM_PROCESSES, log[-3000:]
  for a, b in zip(params[0], params[1]):
    np.testing.assert_array_equal(a, b)
  assert results[0]['step'] == results[1]['step']
  # The first Reduce is the warm-up (compilation) on a scratch copy; then one per round.
  first, second = (r['reduces'][1:] for r in results)
  assert len(first) == len(second) == _ROUNDS
  for mine, theirs in zip(first, second):
    assert mine['after_sum'] == theirs['after_sum']  # Same averaged state, bit for bit.
    assert mine['before'] != theirs['before']  # Trained on different blocks before it.
    assert mine['weight'] + theirs['weight'] == pytest.approx(1.0)


def test_slowed_worker_gets_a_third_of_the_fast_workers_blocks(job):
  results, _, _ = job
  rounds = results[0]['report']['rounds']
  assert [r['next_blocks'] for r in rounds] == [
      r['next_blocks'] for r in results[1]['report']['rounds']]
  assert rounds[0]['blocks'] == [20, 20]  # Round 0: equal split.
  for r in rounds:
    assert r['speed'][0] / r['speed'][1] == pytest.approx(3.0)
  # After the first round and after the second: a third of the fast worker's blocks.
  assert rounds[0]['next_blocks'] == [30, 10]
  assert rounds[1]['blocks'] == [30, 10]
  assert rounds[1]['next_blocks'] == [30, 10]  # Balanced: DLBPCE moves nothing.
  assert rounds[1]['entropy'] == pytest.approx(1.0)
  # Under the equal split the fast worker waits 40 steps' time for the slowed one.
  assert rounds[0]['idle_s'] == pytest.approx([40 * _TICK_S, 0.0])
  assert rounds[1]['idle_s'] == pytest.approx([0.0, 0.0], abs=1e-9)


def test_round_checkpoints_record_the_resume_point(job):
  results, _, _ = job
  meta = results[0]['meta']
  assert meta['phase'] == 'mapreduce'
  resume = meta['mode_resume']
  assert resume['next_round'] == _ROUNDS
  assert resume['num_workers'] == _NUM_PROCESSES
  assert resume['blocks'] == results[0]['report']['rounds'][-1]['next_blocks']


if __name__ == '__main__':
  _worker(sys.argv[1:])
