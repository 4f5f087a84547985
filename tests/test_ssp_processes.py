"""SSP over JAX's coordination service with real local processes.

Each test starts 3 processes of tests/ssp_workers/ssp_process_worker.py joined
by jax.distributed.initialize on 127.0.0.1 (recoverable, short heartbeats)
and checks the JSON they write. See that script for the scenarios.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

_WORKER = os.path.join(os.path.dirname(__file__), 'ssp_workers',
                       'ssp_process_worker.py')
_NUM = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(pid, port, out_dir, scenario, restart=False):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  cmd = [sys.executable, _WORKER, f'--process_id={pid}',
         f'--num_processes={_NUM}', f'--port={port}', f'--out_dir={out_dir}',
         f'--scenario={scenario}'] + (['--restart'] if restart else [])
  log = open(os.path.join(out_dir, f'log{pid}{"r" if restart else ""}.txt'),
             'w')
  return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs, out_dir, timeout_s=60.0):
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
  for pid in range(_NUM):
    path = os.path.join(out_dir, f'{pid}.json')
    assert os.path.exists(path), f'process {pid} wrote no result; logs: {logs}'
  return [json.load(open(os.path.join(out_dir, f'{pid}.json')))
          for pid in range(_NUM)], logs


def test_ssp_contract_over_coordination_service(tmp_path):
  port = _free_port()
  procs = [_spawn(pid, port, str(tmp_path), 'main') for pid in range(_NUM)]
  results, logs = _wait(procs, str(tmp_path))
  assert [p.returncode for p in procs] == [0] * _NUM, logs
  assert results[0]['contract'] == []
  for pid, result in enumerate(results):
    assert result['errors'] == {k: [] for k in result['errors']}, (pid, result)
    for staleness in (0, 1, 3):
      stats = result['stats'][f'exact_s{staleness}']
      assert max(map(int, stats['view_staleness'])) <= staleness
      assert max(map(int, stats['update_age'])) <= staleness
      assert sum(stats['applied_per_worker'].values()) == (_NUM - 1) * 12
    stats = result['stats']['exact_sNone']
    assert sum(stats['applied_per_worker'].values()) == (_NUM - 1) * 12
  # Not vacuous: with worker 1 slow, the fast workers reach the bound s.
  for pid in (0, 2):
    for staleness in (1, 3):
      stats = results[pid]['stats'][f'exact_s{staleness}']
      assert max(map(int, stats['view_staleness'])) == staleness
  # Round-robin stragglers: larger s absorbs them (a count of blocked pulls, not a time:
  # waiting seconds depend on the machine's load).
  blocked = {s: sum(r['stats'][f'straggler_s{s}']['blocked_pulls']
                    for r in results) for s in (0, 5)}
  assert blocked[5] <= blocked[0] // 3, blocked
  message = results[0]['timeout_message']
  assert 'worker 0 at clock 1 waited' in message
  assert 'update (1, 0)' in message


def test_kill_and_restart_keeps_exact_sum(tmp_path):
  port = _free_port()
  out_dir = str(tmp_path)
  procs = [_spawn(pid, port, out_dir, 'kill') for pid in range(_NUM)]
  victim = procs[2]
  victim.wait(60)
  assert victim.returncode == -9  # Killed itself (SIGKILL) at clock 9.
  # Restart after the SSP heartbeat timeout (1 s), so that the survivors
  # first drop it from the bound, then it rejoins from its checkpoint.
  time.sleep(2.0)
  restarted = _spawn(2, port, out_dir, 'kill', restart=True)
  results, logs = _wait([procs[0], procs[1], restarted], out_dir)
  assert [p.returncode for p in (procs[0], procs[1], restarted)] == [0] * 3, (
      logs)
  assert results[2]['restart']
  for pid, result in enumerate(results):
    assert result['errors'] == {'kill': []}, (pid, result)
  for pid in (0, 1):
    stats = results[pid]['stats']['kill']
    assert any(worker == 2 for worker, _ in stats['dropped']), stats
    # They ran past the dead worker's bound (clock 9 + s + 1) while it was
    # down, and still ended with every one of its updates exactly once.
    assert max(results[pid]['dead_clocks']) > 9 + 1 + 1
    assert stats['applied_per_worker'] == {'1' if pid == 0 else '0': 24,
                                           '2': 24}
  # The restarted worker re-applied its own updates 6..9 from the store.
  assert results[2]['stats']['kill']['clock'] == 24


def test_coordinator_death_is_fatal_not_a_hang(tmp_path):
  port = _free_port()
  out_dir = str(tmp_path)
  procs = [_spawn(pid, port, out_dir, 'coordinator') for pid in range(_NUM)]
  deadline = time.monotonic() + 40
  for p in procs:
    try:
      p.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
      pytest.fail('a worker hung after the coordinator died')
  assert procs[0].returncode == -9
  for pid in (1, 2):
    assert procs[pid].returncode != 0
    log = open(os.path.join(out_dir, f'log{pid}.txt')).read()
    assert ('coordination service is unreachable' in log or
            'JAX distributed service detected fatal errors' in log), log[-2000:]
    assert not os.path.exists(os.path.join(out_dir, f'{pid}.json'))


if __name__ == '__main__':
  sys.exit(pytest.main([__file__, '-q']))
