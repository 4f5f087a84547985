"""The local launcher: core pinning, loopback-only listeners, and what a dead process causes.

The fault tests run ``launch_probe/fault_probe.py`` (no JAX) under the launcher: one process
SIGKILLs itself and the marker files show that the others were stopped. The listener and
peer tests join real two-process JAX jobs (``listen_probe``, ``peer_probe``).
"""

import ast
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pdcnno_jax import distributed, launch_local

_PROBE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'launch_probe')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KILLED = 128 + signal.SIGKILL


@pytest.fixture
def probes(monkeypatch):
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      p for p in (_PROBE_DIR, os.environ.get('PYTHONPATH')) if p))


def test_core_sets_are_disjoint_blocks_round_robin():
  assert launch_local.core_sets(2, 1, available=[0, 1]) == [[0], [1]]
  assert launch_local.core_sets(4, 1, available=[0, 1]) == [[0], [1], [0], [1]]
  assert launch_local.core_sets(2, 2, available=[4, 5, 6, 7]) == [[4, 5], [6, 7]]
  with pytest.raises(ValueError, match='between 1 and the 2 available cores'):
    launch_local.core_sets(2, 3, available=[0, 1])


@pytest.mark.parametrize('cores_per_process', [0, 1])
def test_launched_processes_run_pinned_with_their_arguments(probes, cores_per_process):
  out = io.StringIO()
  code = launch_local.launch(2, ['--flag=1'], module='affinity_probe', timeout_s=60, stdout=out,
                             cores_per_process=cores_per_process)
  assert code == 0, out.getvalue()
  lines = {int(m.group(1)): (ast.literal_eval(m.group(2)), ast.literal_eval(m.group(3)))
           for m in re.finditer(r'\[p(\d)\] affinity=(\[.*?\]) argv=(\[.*?\])', out.getvalue())}
  assert sorted(lines) == [0, 1], out.getvalue()
  for i, (cores, argv) in lines.items():
    assert argv[0] == '--flag=1' and f'--process_id={i}' in argv
    if cores_per_process:
      assert cores == launch_local.core_sets(2, 1)[i]
    else:
      assert cores == sorted(os.sched_getaffinity(0))


def _fault_run(tmp_path, victim, wait_for):
  out = io.StringIO()
  code = launch_local.launch(
      2, [f'--marker_dir={tmp_path}', f'--victim={victim}', f'--wait_for={wait_for}'],
      module='fault_probe', timeout_s=60, stdout=out, grace_s=2.0)
  runs = {i: (tmp_path / f'runs_{i}').read_text().count('run') for i in (0, 1)
          if (tmp_path / f'runs_{i}').exists()}
  finished = {i for i in (0, 1) if (tmp_path / f'finished_{i}').exists()}
  return code, out.getvalue(), runs, finished


@pytest.mark.parametrize('victim', [0, 1])
def test_a_dead_process_is_named_and_the_others_are_stopped(tmp_path, probes, victim):
  code, out, runs, finished = _fault_run(tmp_path, victim, f'finished_{victim}')
  assert code == _KILLED, out
  assert (f'launcher: process {victim} was killed by SIGKILL; this job needs every process, '
          'so the launcher stops the others') in out
  assert runs[victim] == 1 and not finished  # The survivor may be stopped before it starts.
  # fault_probe ignores nothing: SIGTERM ends the survivor well within the grace period.
  assert 'did not stop within' not in out


@pytest.mark.parametrize('args', [
    [f'--config={_REPO}/configs/ssp_lenet.py'],
    [f'--config={_REPO}/configs/default.py', '--config.parallel.mode=ssp'],
])
def test_ssp_is_refused_before_anything_starts(tmp_path, args):
  with pytest.raises(launch_local.LaunchError, match='SSP runs on the Ray engine.*num_workers'):
    launch_local.launch(2, args + [f'--marker_dir={tmp_path}'], module='fault_probe')
  assert not list(tmp_path.iterdir())
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert launch_local.main(['--num_processes=2', '--'] + args) == 2
  assert err.getvalue().count('\n') == 1 and 'python -m pdcnno_jax.main' in err.getvalue()


@pytest.mark.parametrize('args, expected', [
    ([f'--config={_REPO}/configs/ssp_lenet.py'], 'ssp'),
    ([f'--config={_REPO}/configs/default.py'], 'sync'),
    ([f'--config={_REPO}/configs/default.py', '--config.parallel.mode=mapreduce'], 'mapreduce'),
    (['--config=no/such/file.py'], None),
])
def test_parallel_mode_reads_the_config_and_its_override(args, expected):
  assert launch_local.parallel_mode(args) == expected


@pytest.mark.parametrize('address, bind, expected', [
    ('127.0.0.1:1234', None, '127.0.0.1:1234'),
    ('localhost:1234', None, '127.0.0.1:1234'),
    ('[::1]:1234', None, '127.0.0.1:1234'),
    ('10.0.0.5:1234', None, None),
    ('10.0.0.5:1234', '10.0.0.5:1234', '10.0.0.5:1234'),
    (None, '0.0.0.0:8476', '0.0.0.0:8476'),
    (None, None, None),
])
def test_coordinator_bind_address(address, bind, expected):
  assert distributed.coordinator_bind_address(address, bind) == expected


def test_malformed_addresses_are_clear_errors():
  with pytest.raises(ValueError, match='--coordinator_bind_address'):
    distributed.coordinator_bind_address('127.0.0.1:1234', '10.0.0.5')
  with pytest.raises(ValueError, match='--coordinator_address'):
    distributed.coordinator_bind_address('127.0.0.1', None)


def test_local_job_listens_on_loopback_only(probes):
  out = io.StringIO()
  code = launch_local.launch(2, [], module='listen_probe', timeout_s=120, stdout=out)
  assert code == 0, out.getvalue()
  found = {int(m.group(1)): ast.literal_eval(m.group(2))
           for m in re.finditer(r'\[p(\d)\] listeners=(\[.*?\])', out.getvalue())}
  assert sorted(found) == [0, 1], out.getvalue()
  assert found[0] and found[1], found  # Gloo in each process.
  for address, _ in found[0] + found[1]:
    assert distributed.is_loopback(address), found


def test_the_launchers_coordination_service_listens_on_loopback_in_its_own_session():
  import psutil  # pylint: disable=g-import-not-at-top
  port = launch_local.free_port()
  service = launch_local.CoordinationService(f'127.0.0.1:{port}', 2)
  try:
    process = psutil.Process(service.proc.pid)
    connections = getattr(process, 'net_connections', process.connections)(kind='tcp')
    listening = {(c.laddr.ip.removeprefix('::ffff:'), c.laddr.port) for c in connections
                 if c.status == 'LISTEN'}
    assert os.getsid(service.proc.pid) != os.getsid(0)  # Not paused with the launcher.
  finally:
    service.shutdown()
  assert listening == {('127.0.0.1', port)}, listening
  assert service.proc.returncode == 0


@pytest.mark.parametrize('victim', [0, 1])
def test_a_killed_process_ends_the_survivor_with_one_line_and_no_cpp_stack(probes, victim):
  out = io.StringIO()
  code = launch_local.launch(2, [f'--victim={victim}', '--heartbeat_s=10', '--kill'],
                             module='peer_probe', timeout_s=120, stdout=out)
  text = out.getvalue()
  assert code == _KILLED, text[-3000:]
  assert (f'launcher: process {victim} was killed by SIGKILL; this job needs every process'
          in text), text[-3000:]
  survivor = [line for line in text.splitlines() if line.startswith(f'[p{1 - victim}]')]
  assert not any('Check failure' in line or 'Traceback' in line or 'F0000' in line
                 for line in survivor), survivor
  errors = [line for line in survivor if 'Error' in line or 'error' in line]
  assert len(errors) == 1, survivor  # SIGTERM's line, or its collective's error.
  assert 'finished without noticing' not in text


@pytest.mark.parametrize('when', ['mid_run', 'at_exit'])
def test_a_frozen_peer_ends_the_survivor_with_one_line(probes, when):
  out = io.StringIO()
  extra = ['--at_exit'] if when == 'at_exit' else []
  code = launch_local.launch(2, ['--victim=1', '--heartbeat_s=10'] + extra, module='peer_probe',
                             timeout_s=120, stdout=out)
  survivor = [line for line in out.getvalue().splitlines() if line.startswith('[p0]')]
  assert code == distributed.EXIT_PEER_LOST, out.getvalue()[-3000:]
  assert any(line.startswith('[p0] Error: process 1 stopped responding') for line in survivor)
  assert not any('Check failure' in line or 'Traceback' in line for line in survivor), survivor
  assert 'launcher: process 0 stopped because a peer stopped responding' in out.getvalue()


class _FakeStore:
  """The key-value calls PeerWatchdog makes; ``fail`` makes them raise."""

  def __init__(self):
    self.values, self.fail = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.fail:
      raise RuntimeError('UNAVAILABLE')
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    if self.fail:
      raise RuntimeError('UNAVAILABLE')
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watch(store, until):
  lost = []
  watchdog = distributed.PeerWatchdog(store, 0, 2, 0.2, interval_s=0.01,
                                      on_lost=lambda *a: lost.append(a))
  watchdog.start()
  deadline = time.monotonic() + 30
  while not until(lost) and time.monotonic() < deadline:
    time.sleep(0.01)
  watchdog.stop()
  return lost


def test_watchdog_reports_a_silent_peer_and_an_unreachable_service():
  store = _FakeStore()
  store.values['pdcnno_liveness/1'] = '7'  # Never changes: a silent peer.
  lost = _watch(store, bool)
  assert lost and lost[0][:2] == (0, 1) and lost[0][2] > 0.2
  store = _FakeStore()
  store.fail = True
  lost = _watch(store, bool)
  assert lost and lost[0][:2] == (0, 0) and lost[0][2] < -0.2


def test_finish_watches_the_peers_during_the_exit_barrier_then_joins_the_thread():
  store = _FakeStore()
  store.values['pdcnno_liveness/1'] = '7'  # A peer that dies while this one waits at exit.
  lost, barrier = [], []

  def exit_barrier():  # Returns once the watchdog has seen the dead peer.
    barrier.append(store.values['pdcnno_liveness/0'])
    deadline = time.monotonic() + 30
    while not lost and time.monotonic() < deadline:
      time.sleep(0.01)

  watchdog = distributed.PeerWatchdog(store, 0, 2, 0.2, interval_s=0.01,
                                      on_lost=lambda *a: lost.append(a), shutdown=exit_barrier)
  watchdog.start()
  watchdog.finish()
  assert barrier == ['done']  # Marked done before it enters the barrier.
  assert lost and lost[0][:2] == (0, 1)
  assert not any(t.name == 'PeerWatchdog' and t.is_alive() for t in threading.enumerate())


def test_finish_after_the_service_is_gone_is_not_a_death():
  store = _FakeStore()
  store.values['pdcnno_liveness/1'] = 'done'
  lost = []

  def exit_barrier():  # The job ends and process 0 takes the service with it.
    store.fail = True
    time.sleep(0.6)

  watchdog = distributed.PeerWatchdog(store, 0, 2, 0.2, interval_s=0.01,
                                      on_lost=lambda *a: lost.append(a), shutdown=exit_barrier)
  watchdog.start()
  watchdog.finish()
  assert not lost
  assert not any(t.name == 'PeerWatchdog' and t.is_alive() for t in threading.enumerate())


def test_a_failed_exit_barrier_is_one_line_and_exit_code_5(tmp_path):
  script = tmp_path / 'failed_barrier.py'
  script.write_text(
      'import sys\n'
      f'sys.path.insert(0, {_REPO!r})\n'
      'from pdcnno_jax import distributed\n'
      'class Store:\n'
      '  def key_value_set(self, key, value, allow_overwrite=False):\n'
      '    pass\n'
      '  def key_value_dir_get(self, prefix):\n'
      '    return []\n'
      'def barrier():\n'
      '  raise RuntimeError("DEADLINE_EXCEEDED: Shutdown barrier timed out\\nmore")\n'
      'distributed.PeerWatchdog(Store(), 0, 2, 5.0, interval_s=0.01, shutdown=barrier).start()\n')
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=120, check=False, cwd=tmp_path)
  assert done.returncode == distributed.EXIT_PEER_LOST, done.stderr
  assert done.stderr.strip().count('\n') == 0, done.stderr
  assert 'could not leave the job' in done.stderr and 'Shutdown barrier' in done.stderr


def test_watchdog_ignores_a_peer_that_finished():
  store = _FakeStore()
  store.values['pdcnno_liveness/1'] = 'done'
  start = time.monotonic()
  assert not _watch(store, lambda lost: lost or time.monotonic() - start > 1.0)
  assert store.values['pdcnno_liveness/0'] == 'done'  # stop() marks this process done.
