"""Starts N local CPU processes that join one JAX job as N "hosts" (loopback only).

  python launch/local.py --num_processes=2 [--devices_per_process=1] -- \
      --config=configs/default.py --workdir=workdirs/two_hosts

Each process runs ``python -m pdcnno_jax.main`` (or ``--module``) with
``--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i``; CPU
collectives between them go over gloo. Output lines are prefixed with ``[p<i>]``. If any
process fails, the others are terminated and the launcher exits with that process's code.
Extra environment per process (e.g. a slowdown for heterogeneous workers) comes from the
config, not from the launcher.

``--cores_per_process=C`` pins process i to its own C CPU cores (round robin over the cores
this launcher may use), so that each process stands for a node with C cores: XLA sizes its
CPU thread pool from the affinity mask. Unpinned, a single process already spreads its work
over every core, so on a small machine "1 process vs 2 processes" does not compare one node
with two.
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


# Sets the CPU affinity of the interpreter before the module runs (and before XLA or TF
# create their thread pools, which then size themselves to the pinned cores).
_PINNED_RUN = ('import os, runpy, sys; '
               'os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")}); '
               'module = sys.argv[2]; sys.argv = [module] + sys.argv[3:]; '
               'runpy.run_module(module, run_name="__main__", alter_sys=True)')


def core_sets(num_processes: int, cores_per_process: int,
              available: Sequence[int] | None = None) -> list[list[int]]:
  """CPU cores of each process: consecutive blocks of the available cores, round robin.

  Args:
    num_processes: processes to place.
    cores_per_process: cores each process gets (>= 1).
    available: cores to use (default: this process's affinity mask).

  Returns:
    One sorted list of core ids per process (shared only when the processes need more
    cores than there are).

  Raises:
    ValueError: cores_per_process < 1 or more than the available cores.
  """
  cores = sorted(os.sched_getaffinity(0) if available is None else available)
  if not 1 <= cores_per_process <= len(cores):
    raise ValueError(f'cores_per_process={cores_per_process} must be between 1 and the '
                     f'{len(cores)} available cores {cores}.')
  return [sorted({cores[(i * cores_per_process + j) % len(cores)]
                  for j in range(cores_per_process)}) for i in range(num_processes)]


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
           python: str = sys.executable, stdout=None, cores_per_process: int = 0) -> int:
  """Runs ``num_processes`` copies of ``python -m module args`` as one JAX job.

  Args:
    num_processes: processes ("hosts") to start.
    args: arguments passed to every process (before the coordinator flags).
    module: the Python module each process runs.
    devices_per_process: CPU devices each process exposes.
    timeout_s: kill everything after this many seconds (None: no limit).
    python: interpreter.
    stdout: where prefixed output goes (default sys.stdout).
    cores_per_process: pin each process to this many cores of its own (`core_sets`);
      0: no pinning.

  Returns:
    0 if every process succeeded, else the first non-zero exit code.
  """
  stdout = stdout or sys.stdout
  address = f'127.0.0.1:{free_port()}'
  env = process_env(devices_per_process)
  pinned = core_sets(num_processes, cores_per_process) if cores_per_process else None
  procs, pumps = [], []
  for i in range(num_processes):
    run = ([python, '-c', _PINNED_RUN, ','.join(map(str, pinned[i])), module] if pinned
           else [python, '-m', module])
    cmd = [*run, *args, f'--coordinator_address={address}',
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
  parser.add_argument('--cores_per_process', type=int, default=0,
                      help='pin each process to this many cores of its own (0: no pinning)')
  parser.add_argument('args', nargs=argparse.REMAINDER,
                      help='arguments for every process, after --')
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ['--'] else ns.args
  return launch(ns.num_processes, args, module=ns.module,
                devices_per_process=ns.devices_per_process, timeout_s=ns.timeout_s,
                cores_per_process=ns.cores_per_process)


if __name__ == '__main__':
  sys.exit(main())
