"""SSP training (pdcnno_jax.parallel.ssp.training): helpers in-process, then real processes.

The multi-process tests start 2 worker processes of this file joined by
``distributed.initialize(..., recoverable=True)`` on 127.0.0.1 (short heartbeats), each training
LeNet-5 on a tiny generated data set through ``training.train``, and check what they wrote:

  * bsp: s = 0 with worker 1 slowed 3x ends with the parameters of synchronous training
    (computed here, in the test process, by ``sync.train_epochs``) to float tolerance; every
    applied update was exactly one clock old; both processes return identical states.
  * kill: s = 2 with worker 1 slowed; worker 1 checkpoints every 4 clocks, SIGKILLs itself after
    publishing clock 9, and is started again: it rejoins at clock 10 from its checkpoint, the
    run completes, the view staleness reached s but never exceeded it, worker 0 dropped the dead
    worker from the bound, and after the drain both workers' parameters agree (each update
    applied exactly once) before worker 0's state is adopted.

This file is also the worker: ``python test_ssp_training.py --process_id=I ...``.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)
_NUM = 2
_KILL_CLOCK = 9
_HEARTBEAT_S = 2.0


def _fixtures():
  """pdcnno_jax.testing.experiments, imported late: worker processes import JAX after initialising."""
  from pdcnno_jax.testing import experiments as mode_fixtures  # pylint: disable=g-import-not-at-top
  return mode_fixtures


def _config(**parallel):
  config = _fixtures().mapreduce_config()
  config.parallel.mode = 'ssp'
  config.parallel.engine = 'jax'  # These tests are of the jax.distributed engine.
  config.parallel.heartbeat_timeout_s = _HEARTBEAT_S
  config.parallel.ssp_timeout_s = 90.0
  config.parallel.update(parallel)
  return config


# --- Helpers (in-process) ------------------------------------------------------------------------


def test_equal_and_proportional_batch_sizes():
  from pdcnno_jax.loop import batching  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(batching.equal_batch_sizes(128, 4, 2), [32] * 4)
  with pytest.raises(ValueError, match='divisible by the 3 workers'):
    batching.equal_batch_sizes(128, 3)
  sizes = batching.proportional_batch_sizes(128, np.array([4.0, 4.0, 4.0, 1.0]), 2)
  assert sizes.sum() == 128 and np.all(sizes % 2 == 0)
  np.testing.assert_array_equal(sizes, [40, 40, 38, 10])
  one_slow = batching.proportional_batch_sizes(8, np.array([1.0, 1000.0]))
  np.testing.assert_array_equal(one_slow, [1, 7])  # Never below one unit.


def test_worker_rows_partition_each_global_batch():
  from pdcnno_jax.loop import batching  # pylint: disable=g-import-not-at-top
  order = np.random.default_rng(0).permutation(100)
  sizes = np.array([3, 5, 2])
  for index in range(10):
    pieces = [batching.worker_rows(order, index, sizes, k) for k in range(3)]
    assert [len(p) for p in pieces] == [3, 5, 2]
    np.testing.assert_array_equal(np.concatenate(pieces), order[index * 10:(index + 1) * 10])


def test_worker_checkpoint_round_trip_and_mismatch(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import serialization  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import worker_checkpoints  # pylint: disable=g-import-not-at-top
  _, _, state = _fixtures().make_experiment(_config(), tmp_path)
  directory = str(tmp_path / 'w0')
  assert worker_checkpoints.load_worker_checkpoint(directory, state) is None
  ssp_state = {'next_clock': np.asarray(7, np.int64), 'applied': np.asarray([6, 4], np.int64)}
  for clock in (3, 5, 7):
    worker_checkpoints.save_worker_checkpoint(directory, clock, state, ssp_state)
  assert [os.path.basename(p) for p in worker_checkpoints.list_worker_checkpoints(directory)] == [
      'clock_0000000005.ssp', 'clock_0000000007.ssp']
  restored, restored_ssp = worker_checkpoints.load_worker_checkpoint(directory, state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(restored_ssp['applied'], [6, 4])
  with pytest.raises(serialization.PayloadError, match='does not match'):
    worker_checkpoints.load_worker_checkpoint(directory, state.replace(opt_state=()))

  # A corrupted newest snapshot is skipped: the worker rejoins from the older intact one.
  older = {'next_clock': np.asarray(5, np.int64), 'applied': np.asarray([4, 3], np.int64)}
  worker_checkpoints.save_worker_checkpoint(directory, 5, state, older)
  newest = worker_checkpoints.list_worker_checkpoints(directory)[-1]
  with open(newest, 'r+b') as f:
    f.seek(200)
    byte = f.read(1)
    f.seek(200)
    f.write(bytes([byte[0] ^ 0xFF]))
  _, fallback_ssp = worker_checkpoints.load_worker_checkpoint(directory, state)
  np.testing.assert_array_equal(fallback_ssp['applied'], [4, 3])


def test_report_figures():
  from pdcnno_jax.parallel.ssp import report as ssp_report  # pylint: disable=g-import-not-at-top
  assert ssp_report.merge_histograms([{'0': 2, '-1': 1}, {0: 1, 2: 4}]) == {-1: 1, 0: 3, 2: 4}
  rows = [dict(loop_s=2.0, examples=100, steps=10, publish_s=0.1, pull_s=0.5, wait_s=0.4,
               busy_s=1.0, applied_staleness={'0': 9}, view_staleness={'0': 10}),
          dict(loop_s=4.0, examples=100, steps=10, publish_s=0.1, pull_s=0.1, wait_s=0.0,
               busy_s=3.0, applied_staleness={'1': 9}, view_staleness={'1': 10})]
  report = ssp_report.job_report(rows, staleness=1, global_batch_size=20)
  assert report['wall_s'] == 4.0 and report['throughput_examples_per_s'] == 50.0
  assert report['coordination_s_per_step'] == pytest.approx(0.4 / 20)
  assert report['coordination_fraction'] == pytest.approx(0.4 / 4.4)
  assert report['max_view_staleness'] == 1
  curve = [{'wall_s': 1.0, 'accuracy': 0.5}, {'wall_s': 2.0, 'accuracy': 0.9}]
  assert ssp_report.time_to_accuracy(curve, 0.85) == 2.0
  assert ssp_report.time_to_accuracy(curve, 0.95) is None


def test_one_process_equals_synchronous_training(tmp_path):
  """One worker (in-memory store): SSP is plain training on the global batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import training  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel import sync  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  config = _config(staleness=0, ssp_eval_every_steps=8)
  exp, tx, host_state = _fixtures().make_experiment(config, tmp_path, num_devices=2)
  plain = sync.train_epochs(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                               num_epochs=config.num_epochs)
  state, report = training.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                                 worker_checkpoints=False)
  _fixtures().assert_states_close(state.params, plain.params)
  assert int(state.step) == 16 and report['clocks'] == 16
  assert [p['clock'] for p in report['accuracy_vs_time']] == [8, 16]
  assert report['accuracy_vs_time'][-1]['accuracy'] > 0.5  # It learned.
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_equivalent_to(sharding_lib.replicated(exp.mesh), leaf.ndim)


def test_bad_settings_are_clear_errors(tmp_path):
  from pdcnno_jax.parallel.ssp import training  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  for parallel, match in ((dict(ssp_batch_balancer='dlbpce'), 'ssp_batch_balancer'),
                          (dict(staleness=-3), 'staleness must be'),
                          (dict(ssp_warmup_steps=0), 'ssp_warmup_steps')):
    exp, tx, state = _fixtures().make_experiment(_config(**parallel), tmp_path, num_devices=1)
    with pytest.raises(ValueError, match=match):
      training.train(exp, sharding_lib.replicate(state, exp.mesh), tx=tx,
                     worker_checkpoints=False)


# --- The worker (runs in each spawned process) ---------------------------------------------------


def _worker(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--scenario', choices=('bsp', 'kill'), required=True)
  parser.add_argument('--restart', action='store_true')
  args = parser.parse_args(argv)
  pid = args.process_id

  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  # JAX's own heartbeat is generous (a process of a loaded machine that misses it aborts);
  # the SSP liveness that drops a dead worker from the bound uses _HEARTBEAT_S.
  distributed.initialize(f'127.0.0.1:{args.port}', _NUM, pid, recoverable=True,
                         heartbeat_timeout_s=20, initialization_timeout=90)
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import coordination  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import training  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  if args.scenario == 'bsp':
    config = _config(staleness=0, slowdown='1,3')
  else:
    config = _config(staleness=2, slowdown='1,3')
    config.num_epochs = 3
    config.checkpoint_every_steps = 4
    if pid == 1 and not args.restart:
      os.environ['PDCNNO_SSP_FAULT_KILL_AT_CLOCK'] = str(_KILL_CLOCK)
  workdir = os.path.join(args.out_dir, 'workdir')
  exp, tx, host_state = _fixtures().make_experiment(config, workdir)
  # No orbax checkpointer: creating one runs a collective, which a restarted process cannot
  # join (its gloo context keys already exist); the per-worker checkpoints need none.
  state, report = training.train(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                                 worker_checkpoints=args.scenario == 'kill')
  local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
  np.savez(os.path.join(args.out_dir, f'params{pid}.npz'),
           *[np.asarray(x) for x in jax.tree.leaves(local.params)])
  with open(os.path.join(args.out_dir, f'{pid}.json'), 'w') as f:
    json.dump({'report': report, 'devices': jax.device_count(), 'restart': args.restart,
               'step': int(local.step)}, f)
  coordination.shutdown(coordination.CoordinationStore(), timeout_s=60)


# --- Multi-process tests -------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(pid, port, out_dir, scenario, restart=False):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=os.pathsep.join(p for p in (_TESTS, _REPO, os.environ.get('PYTHONPATH'))
                                        if p))
  env.pop('PDCNNO_SSP_FAULT_KILL_AT_CLOCK', None)
  cmd = [sys.executable, os.path.abspath(__file__), f'--process_id={pid}', f'--port={port}',
         f'--out_dir={out_dir}', f'--scenario={scenario}'] + (['--restart'] if restart else [])
  log = open(os.path.join(out_dir, f'log{pid}{"r" if restart else ""}.txt'), 'w')
  return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(procs, out_dir, timeout_s=120.0):
  deadline = time.monotonic() + timeout_s
  try:
    for p in procs:
      p.wait(max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = {name: open(os.path.join(out_dir, name)).read()[-3000:]
          for name in sorted(os.listdir(out_dir)) if name.startswith('log')}
  assert [p.returncode for p in procs] == [0] * len(procs), logs
  results, params = [], []
  for pid in range(_NUM):
    with open(os.path.join(out_dir, f'{pid}.json')) as f:
      results.append(json.load(f))
    with np.load(os.path.join(out_dir, f'params{pid}.npz')) as npz:
      params.append([npz[k] for k in sorted(npz.files, key=lambda k: int(k.split('_')[1]))])
  return results, params


def test_bsp_processes_match_synchronous_training(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel import sync  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  port, out_dir = _free_port(), str(tmp_path)
  procs = [_spawn(pid, port, out_dir, 'bsp') for pid in range(_NUM)]
  # Meanwhile: the synchronous reference on one device, global batch 32 per step.
  config = _config(staleness=0)
  exp, tx, host_state = _fixtures().make_experiment(config, tmp_path / 'sync', num_devices=1)
  plain = sync.train_epochs(exp, sharding_lib.replicate(host_state, exp.mesh), tx=tx,
                               num_epochs=config.num_epochs)
  reference = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(plain.params))]
  results, params = _finish(procs, out_dir)

  assert results[0]['devices'] == _NUM
  for a, b in zip(params[0], params[1]):
    np.testing.assert_array_equal(a, b)  # Every worker returns the same state.
  for got, want in zip(params[0], reference):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
  report = results[0]['report']
  assert report['clocks'] == results[0]['step'] == 16
  # Each worker applied the other's updates 0..14 before steps 1..15, each exactly 1 clock old
  # (age 0 in c - 1 - t); update 15 came with the drain.
  assert report['applied_staleness_histogram'] == {'0': 2 * 15}
  assert report['max_view_staleness'] == 0
  assert max(report['final_params_max_abs_diff']) < 1e-5
  assert report['per_worker'][1]['slept_s'] > 0  # Worker 1 really was slower.


def test_killed_worker_rejoins_and_the_run_completes(tmp_path):
  port, out_dir = _free_port(), str(tmp_path)
  procs = [_spawn(pid, port, out_dir, 'kill') for pid in range(_NUM)]
  victim = procs[1]
  victim.wait(90)
  assert victim.returncode == -9, open(os.path.join(out_dir, 'log1.txt')).read()[-3000:]
  time.sleep(_HEARTBEAT_S + 1.0)  # The survivor drops it from the bound first.
  restarted = _spawn(1, port, out_dir, 'kill', restart=True)
  results, params = _finish([procs[0], restarted], out_dir)

  assert results[1]['restart']
  for a, b in zip(params[0], params[1]):
    np.testing.assert_array_equal(a, b)
  first, again = (r['report'] for r in results)
  assert first == {**again, 'accuracy_vs_time': first['accuracy_vs_time']}
  rows = first['per_worker']
  assert rows[1]['first_clock'] == _KILL_CLOCK + 1  # Rejoined at its last published clock + 1.
  assert rows[0]['clock'] == rows[1]['clock'] == first['clocks'] == 24
  assert any(worker == 1 for worker, _ in rows[0]['dropped'])
  # The bound held and was reached (worker 1 is slower), so the check is not vacuous.
  assert max(int(k) for k in rows[0]['view_staleness']) == 2
  assert first['max_view_staleness'] <= 2
  # (Applied-update ages may exceed s here: updates of a worker dropped from the bound while it
  # was dead arrive late by design; the bound is on the live workers' view.)
  # Before adopting worker 0's state, both held init + every update exactly once: a missed or
  # twice-applied update of a LeNet step would differ by far more than float rounding.
  assert max(first['final_params_max_abs_diff']) < 1e-5
  # The restarted worker's own updates 8..9 (after its clock-8 checkpoint) came from the store.
  assert sorted(os.listdir(os.path.join(out_dir, 'workdir', 'ssp_worker_1')))[-1] == (
      'clock_0000000024.ssp')


if __name__ == '__main__':
  _worker(sys.argv[1:])
