"""SSP through the command line: a worker killed mid-run and started again finishes the job.

Two processes of ``python -m pdcnno_jax.main`` (the user's entry point, not ``training.train``)
join on 127.0.0.1 with ``parallel.mode = ssp``. Worker 1 SIGKILLs itself after publishing a
clock past its first checkpoint and is started again with the same ``--process_id``: it passes
the whole experiment (no orbax checkpointer, no collective on a global mesh in SSP mode), rejoins
from its per-worker checkpoint, and both processes exit 0 with the same test accuracy and
worker 0's report counting every clock.
"""

import json
import os
import socket
import subprocess
import sys
import time

from pdcnno_jax import launch_local, testing

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KILL_CLOCK = 9
_HEARTBEAT_S = 2.0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(pid, port, workdir, data_dir, log_path, kill=False):
  env = launch_local.process_env(1)
  env.pop('PDCNNO_SSP_FAULT_KILL_AT_CLOCK', None)
  if kill:
    env['PDCNNO_SSP_FAULT_KILL_AT_CLOCK'] = str(_KILL_CLOCK)
  cmd = [sys.executable, '-m', 'pdcnno_jax.main', f'--config={_REPO}/configs/ssp_lenet.py',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         '--config.parallel.engine=jax',
         '--config.data.batch_size=32', '--config.data.eval_batch_size=128',
         '--config.num_epochs=3', '--config.checkpoint_every_steps=4',
         '--config.log_every_steps=4', '--config.parallel.staleness=2',
         "--config.parallel.slowdown=1,3", '--config.parallel.straggler_probability=0',
         f'--config.parallel.heartbeat_timeout_s={_HEARTBEAT_S}',
         '--config.parallel.ssp_timeout_s=90', '--config.parallel.ssp_eval_every_steps=8',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={pid}']
  log = open(log_path, 'w')
  return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO)


def _wait(procs, timeout_s):
  deadline = time.monotonic() + timeout_s
  try:
    for p in procs:
      p.wait(max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_killed_worker_restarted_from_the_command_line_completes_the_run(tmp_path):
  data_dir = testing.make_idx_dataset(str(tmp_path / 'tfds'), num_train=256, num_test=64)
  port, workdir = _free_port(), str(tmp_path / 'workdir')
  logs = {name: str(tmp_path / f'{name}.log') for name in ('p0', 'p1', 'p1_restarted')}
  first = _spawn(0, port, workdir, data_dir, logs['p0'])
  victim = _spawn(1, port, workdir, data_dir, logs['p1'], kill=True)
  restarted = None
  try:
    victim.wait(180)
    assert victim.returncode == -9, open(logs['p1']).read()[-3000:]
    time.sleep(_HEARTBEAT_S + 1.0)  # Worker 0 drops it from the bound first.
    restarted = _spawn(1, port, workdir, data_dir, logs['p1_restarted'])
    _wait([first, restarted], timeout_s=240)
  finally:
    _wait([p for p in (first, victim, restarted) if p is not None], timeout_s=1)
  outputs = {name: open(path).read() for name, path in logs.items()}
  assert first.returncode == 0, outputs['p0'][-4000:]
  assert restarted.returncode == 0, outputs['p1_restarted'][-4000:]

  accuracies = [line for name in ('p0', 'p1_restarted')
                for line in outputs[name].splitlines() if line.startswith('test_accuracy=')]
  assert len(accuracies) == 2
  # Both evaluate worker 0's final state on their own devices: the same figure.
  assert accuracies[0].split()[0] == accuracies[1].split()[0]

  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  ssp = report['ssp']
  rows = ssp['per_worker']
  assert rows[1]['first_clock'] == _KILL_CLOCK + 1  # Rejoined at its last published clock + 1.
  assert rows[0]['clock'] == rows[1]['clock'] == ssp['clocks'] == report['steps'] == 24
  assert any(worker == 1 for worker, _ in rows[0]['dropped'])
  assert ssp['max_view_staleness'] <= 2
  assert max(ssp['final_params_max_abs_diff']) < 1e-5  # Every update applied exactly once.
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))  # No orbax in SSP mode.
