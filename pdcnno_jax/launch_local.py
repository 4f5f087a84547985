"""Starts N local CPU processes that join one JAX job as N "hosts" (loopback only).

  python launch/local.py --num_processes=2 [--devices_per_process=1] -- \
      --config=configs/default.py --workdir=workdirs/two_hosts

Each process runs ``python -m pdcnno_jax.main`` (or ``--module``) with
``--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i``; CPU
collectives between them go over gloo. Output lines are prefixed with ``[p<i>]``. If any
process fails, the others are terminated and the launcher exits with that process's code.
Extra environment per process (e.g. a slowdown for heterogeneous workers) comes from the
config, not from the launcher.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str, sink) -> None:
  for line in iter(stream.readline, b''):
    sink.write(f'{prefix} {line.decode(errors="replace")}')
    sink.flush()


def process_env(devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
  """Environment of one local CPU process with ``devices_per_process`` CPU devices."""
  env = dict(os.environ if base is None else base)
  env['JAX_PLATFORMS'] = 'cpu'
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env['XLA_FLAGS'] = ' '.join(flags)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return env


def launch(num_processes: int, args: Sequence[str], *, module: str = 'pdcnno_jax.main',
           devices_per_process: int = 1, timeout_s: float | None = None,
           python: str = sys.executable, stdout=None) -> int:
  """Runs ``num_processes`` copies of ``python -m module args`` as one JAX job.

  Args:
    num_processes: processes ("hosts") to start.
    args: arguments passed to every process (before the coordinator flags).
    module: the Python module each process runs.
    devices_per_process: CPU devices each process exposes.
    timeout_s: kill everything after this many seconds (None: no limit).
    python: interpreter.
    stdout: where prefixed output goes (default sys.stdout).

  Returns:
    0 if every process succeeded, else the first non-zero exit code.
  """
  stdout = stdout or sys.stdout
  address = f'127.0.0.1:{free_port()}'
  env = process_env(devices_per_process)
  procs, pumps = [], []
  for i in range(num_processes):
    cmd = [python, '-m', module, *args, f'--coordinator_address={address}',
           f'--num_processes={num_processes}', f'--process_id={i}']
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f'[p{i}]', stdout), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  code = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed:
        code = failed[0].returncode
        break
      if deadline is not None and time.monotonic() > deadline:
        stdout.write(f'launcher: timeout after {timeout_s} s, stopping all processes\n')
        code = 124
        break
      time.sleep(0.1)
    else:
      code = next((p.returncode for p in procs if p.returncode), 0)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  if code == 0:
    code = next((p.returncode for p in procs if p.returncode), 0)
  return code


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--module', default='pdcnno_jax.main')
  parser.add_argument('--timeout_s', type=float, default=None)
  parser.add_argument('args', nargs=argparse.REMAINDER,
                      help='arguments for every process, after --')
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ['--'] else ns.args
  return launch(ns.num_processes, args, module=ns.module,
                devices_per_process=ns.devices_per_process, timeout_s=ns.timeout_s)


if __name__ == '__main__':
  sys.exit(main())
