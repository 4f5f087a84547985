"""One process of a multi-process SSP test over JAX's coordination service.

Run by tests/test_ssp_processes.py as
  python ssp_process_worker.py --process_id=I --num_processes=N --port=P
      --out_dir=D --scenario={main,kill} [--restart]
Writes D/<process_id>.json with the contract violations and SSP stats of each
run. Scenarios:
  main: store contract checks (process 0), a barrier, then the indicator loop
        for s in {0, 1, 3, inf} with worker 1 slow, a round-robin straggler
        run for s in {0, 5}, and a timed-out wait (processes 0 and 1).
  kill: s = 1; process 2 checkpoints at clock 5, publishes up to clock 9 and
        SIGKILLs itself; the test restarts it with --restart, it rejoins from
        its checkpoint. Survivors record the clocks they ran while worker 2
        was dropped from the bound.
  coordinator: process 0 (host of the coordination service) SIGKILLs itself
        at clock 3; the others must fail (not hang).
"""

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import indicator_loop  # pylint: disable=g-import-not-at-top,wrong-import-position

from pdcnno_jax.parallel import ssp  # pylint: disable=g-import-not-at-top,wrong-import-position
from pdcnno_jax.parallel.ssp import coordination  # pylint: disable=g-import-not-at-top,wrong-import-position

HEARTBEAT_TIMEOUT_S = 1.0


def _parse():
  parser = argparse.ArgumentParser()
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--scenario', choices=('main', 'kill', 'coordinator'),
                      required=True)
  parser.add_argument('--restart', action='store_true')
  return parser.parse_args()


def _worker(store, args, run_id, staleness, steps, **kwargs):
  kwargs.setdefault('timeout_s', 30.0)
  return ssp.SSPWorker(
      store, args.process_id, args.num_processes, staleness, run_id=run_id,
      like=indicator_loop.empty_view(args.num_processes, steps),
      heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, **kwargs)


def _store_contract(store):
  """Checks CoordinationStore semantics; returns the violations."""
  errors = []
  store.set('contract/a/1', b'\x00one')
  store.set('contract/a/2', b'two')
  store.set('contract/ab', b'sibling')
  try:
    store.set('contract/a/1', b'again')
    errors.append('write-once key was overwritten')
  except ssp.KeyExistsError:
    pass
  store.set('contract/a/2', b'TWO', overwrite=True)
  if store.dir_get('contract/a') != [('contract/a/1', b'\x00one'),
                                     ('contract/a/2', b'TWO')]:
    errors.append(f'dir_get: {store.dir_get("contract/a")}')
  if store.try_get('contract/missing') is not None:
    errors.append('try_get of a missing key is not None')
  if store.get('contract/a/1', 1.0) != b'\x00one':
    errors.append('get returned a wrong value')
  try:
    store.get('contract/missing', 0.2)
    errors.append('get of a missing key did not time out')
  except ssp.StoreTimeoutError:
    pass
  store.delete('contract/a')
  store.delete('contract/never_written')
  if store.dir_get('contract') != [('contract/ab', b'sibling')]:
    errors.append(f'delete of a directory: {store.dir_get("contract")}')
  store.delete('contract')
  return errors


def _main_scenario(store, args, result):
  pid, n = args.process_id, args.num_processes
  if pid == 0:
    result['contract'] = _store_contract(store)
  store.barrier('main_start', 30.0, list(range(n)))
  steps = 12
  for staleness in (0, 1, 3, None):
    run_id = f'exact_s{staleness}'
    worker = _worker(store, args, run_id, staleness, steps)
    _, errors = indicator_loop.run(
        worker, steps, delay_s=lambda c: 0.01 if pid == 1 else 0.0)
    result['errors'][run_id] = errors
    result['stats'][run_id] = worker.stats().as_dict()
  for staleness in (0, 5):  # Round-robin transient straggler.
    run_id = f'straggler_s{staleness}'
    worker = _worker(store, args, run_id, staleness, steps)
    _, errors = indicator_loop.run(
        worker, steps, delay_s=lambda c: 0.05 if c % n == pid else 0.0)
    result['errors'][run_id] = errors
    result['stats'][run_id] = worker.stats().as_dict()
  if pid in (0, 1):  # Worker 1 is alive but never publishes.
    worker = ssp.SSPWorker(store, pid, 2, 0, timeout_s=1.0, run_id='timeout',
                           heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    worker.join()
    if pid == 0:
      worker.pull(0)
      worker.publish(0, {'x': np.zeros(1)})
      try:
        worker.pull(1)
      except ssp.SSPTimeoutError as e:
        result['timeout_message'] = str(e)
      store.set('timeout_checked', b'1')
    else:
      store.get('timeout_checked', 30.0)
    worker.abandon()
  store.barrier('main_end', 30.0, list(range(n)))


def _kill_scenario(store, args, result):
  pid, steps, staleness = args.process_id, 24, 1
  checkpoint_clock, crash_clock = 5, 9
  ckpt_path = os.path.join(args.out_dir, 'checkpoint_2.npz')
  worker = _worker(store, args, 'kill', staleness, steps,
                   commit_on_pull=False)
  dead_clocks = []

  def hook(clock, view):
    if pid != 2:
      worker.commit()
      if 2 in worker.dead_workers:
        dead_clocks.append(clock)
      return
    if clock == checkpoint_clock and not args.restart:
      state = worker.state()
      np.savez(ckpt_path, count=view['count'], mirror=view['nested']['mirror'],
               next_clock=state['next_clock'], applied=state['applied'])
      worker.commit()  # Acknowledge only what the checkpoint holds.
    if clock == crash_clock and not args.restart:
      os.kill(os.getpid(), signal.SIGKILL)

  state = view = None
  if args.restart:
    ckpt = np.load(ckpt_path)
    state = {'next_clock': ckpt['next_clock'], 'applied': ckpt['applied']}
    view = {'count': ckpt['count'].copy(),
            'nested': {'mirror': ckpt['mirror'].copy()}}
  delay = 0.05 if pid != 2 else 0.0
  _, errors = indicator_loop.run(worker, steps, delay_s=lambda c: delay,
                                 state=state, view=view, after_publish=hook)
  result['errors']['kill'] = errors
  result['stats']['kill'] = worker.stats().as_dict()
  result['dead_clocks'] = dead_clocks


def _coordinator_scenario(store, args, result):
  steps = 200
  worker = _worker(store, args, 'coordinator', 1, steps, timeout_s=20.0)

  def hook(clock, view):
    del view
    if args.process_id == 0 and clock == 3:
      os.kill(os.getpid(), signal.SIGKILL)

  indicator_loop.run(worker, steps, delay_s=lambda c: 0.05,
                     after_publish=hook)
  result['errors']['coordinator'] = ['survived the coordinator death']


def main():
  args = _parse()
  coordination.initialize(
      f'127.0.0.1:{args.port}', args.num_processes, args.process_id,
      heartbeat_timeout_s=2, recoverable=True, initialization_timeout_s=60)
  store = coordination.CoordinationStore()
  result = {'errors': {}, 'stats': {}, 'restart': args.restart}
  start = time.monotonic()
  if args.scenario == 'main':
    _main_scenario(store, args, result)
  elif args.scenario == 'kill':
    _kill_scenario(store, args, result)
  else:
    _coordinator_scenario(store, args, result)
  result['seconds'] = time.monotonic() - start
  with open(os.path.join(args.out_dir, f'{args.process_id}.json'), 'w') as f:
    json.dump(result, f)
  coordination.shutdown(store, timeout_s=30.0)


if __name__ == '__main__':
  main()
