"""Starts N local CPU processes that join one JAX job as N "hosts" (loopback only).

  python launch/local.py --num_processes=2 [--devices_per_process=1] -- \
      --config=configs/default.py --workdir=workdirs/two_hosts

Each process runs ``python -m pdcnno_jax.main`` (or ``--module``) with
``--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i``; the
coordination service and the CPU collectives (gloo) between them listen on 127.0.0.1 only.
Output lines are prefixed with ``[p<i>]``; the launcher's own lines with ``launcher:``.

When a process dies the launcher says which one and how (exit code or signal), then follows
``--on_failure``: ``stop`` ends the job (sync and MapReduce need every process), ``restart``
starts the same command again after ``--restart_delay_s`` so that an SSP worker rejoins
(at most ``--max_restarts`` times per process), ``continue`` lets the others go on;
``auto`` (default) is ``restart`` for ``parallel.mode = 'ssp'`` and ``stop`` otherwise. Process
0 hosts the coordination service: its death always ends the job. The exit code is 0 when
every process's last run succeeded, else the first failure's (128 + N for signal N).

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


FAILURE_POLICIES = ('auto', 'stop', 'restart', 'continue')


def describe_exit(returncode: int) -> str:
  """``'exited with code 1'`` or ``'was killed by SIGKILL'`` for a Popen return code."""
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f'signal {-returncode}'
    return f'was killed by {name}'
  return f'exited with code {returncode}'


def shell_code(returncode: int) -> int:
  """A Popen return code as a shell exit status (128 + N for signal N)."""
  return 128 - returncode if returncode < 0 else returncode


def _flag(args: Sequence[str], name: str) -> str | None:
  """The last ``--name=value`` (or ``--name value``) in ``args``."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(args):
      value = args[i + 1]
  return value


def resolve_failure_policy(policy: str, args: Sequence[str],
                           restart_delay_s: float | None = None) -> tuple[str, float]:
  """``(policy, restart delay)`` with ``'auto'`` and a None delay resolved from the config.

  ``auto`` reads ``parallel.mode`` from ``--config`` (and a ``--config.parallel.mode``
  override): ``restart`` for SSP, whose workers rejoin, else ``stop``. The default delay is
  the SSP heartbeat timeout plus one second, so that the others drop the dead worker from
  the staleness bound before it rejoins.
  """
  if policy not in FAILURE_POLICIES:
    raise ValueError(f'--on_failure={policy!r} must be one of {FAILURE_POLICIES}.')
  mode, heartbeat = _flag(args, 'config.parallel.mode'), None
  path = _flag(args, 'config')
  if path and (mode is None or restart_delay_s is None):
    from pdcnno_jax import config_lib  # pylint: disable=g-import-not-at-top
    try:
      config = config_lib.load_config(path)
      mode = mode or config.parallel.mode
      heartbeat = config.parallel.heartbeat_timeout_s
    except Exception:  # pylint: disable=broad-except
      pass  # The processes report the broken config themselves.
  heartbeat = float(_flag(args, 'config.parallel.heartbeat_timeout_s') or heartbeat or 0.0)
  if policy == 'auto':
    policy = 'restart' if mode == 'ssp' else 'stop'
  delay = restart_delay_s if restart_delay_s is not None else (
      heartbeat + 1.0 if heartbeat else 0.0)
  return policy, delay


class _Job:
  """The processes of one launch: start, restart, stop, with prefixed output."""

  def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str], stdout):
    self.commands, self.env, self.stdout = commands, env, stdout
    self.procs: list[subprocess.Popen] = [None] * len(commands)
    self.pumps: list[threading.Thread] = []

  def say(self, message: str) -> None:
    self.stdout.write(f'launcher: {message}\n')
    self.stdout.flush()

  def start(self, i: int) -> None:
    proc = subprocess.Popen(self.commands[i], env=self.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f'[p{i}]', self.stdout),
                            daemon=True)
    pump.start()
    self.procs[i] = proc
    self.pumps.append(pump)

  def stop(self) -> None:
    for p in self.procs:
      if p is not None and p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        os.killpg(p.pid, signal.SIGCONT)  # A stopped (frozen) process acts on it at once.
    for p in self.procs:
      if p is None:
        continue
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for t in self.pumps:
      t.join(timeout=5)


def _supervise(job: _Job, policy: str, max_restarts: int, restart_delay_s: float,
               deadline: float | None, timeout_s: float | None) -> int:
  """Waits for the job, acting on each process death by ``policy``; returns the exit code."""
  n = len(job.procs)
  restarts, pending, given_up = [0] * n, {}, {}
  while True:
    now = time.monotonic()
    for i in [i for i, at in pending.items() if at <= now]:
      del pending[i]
      job.start(i)
    codes = [p.poll() for p in job.procs]
    for i, code in enumerate(codes):
      if code in (None, 0) or i in pending or i in given_up:
        continue
      how = describe_exit(code)
      from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
      if code == distributed.EXIT_PEER_LOST:
        job.say(f'process {i} stopped because a peer stopped responding (its last line says '
                'which); stopping the others.')
        return code
      if i == 0:
        job.say(f'process 0 {how}; it hosts the coordination service, so the job cannot '
                'go on: stopping the others. Run the same command again to resume from the '
                'checkpoints.')
        return shell_code(code)
      if policy == 'stop':
        job.say(f'process {i} {how}; stopping the others (this mode needs every process; '
                'SSP runs rejoin with --on_failure=restart).')
        return shell_code(code)
      if policy == 'restart' and restarts[i] < max_restarts:
        restarts[i] += 1
        job.say(f'process {i} {how}; starting it again in {restart_delay_s:g} s to rejoin '
                f'(restart {restarts[i]} of {max_restarts}).')
        pending[i] = now + restart_delay_s
        continue
      job.say(f'process {i} {how}; the others go on without it'
              + (f' ({max_restarts} restarts used).' if policy == 'restart' else '.'))
      given_up[i] = shell_code(code)
    if not pending and all(c is not None for c in codes):
      return next((shell_code(c) for c in codes if c), 0)
    if deadline is not None and now > deadline:
      job.say(f'timeout after {timeout_s} s, stopping all processes')
      return 124
    time.sleep(0.1)


def launch(num_processes: int, args: Sequence[str], *, module: str = 'pdcnno_jax.main',
           devices_per_process: int = 1, timeout_s: float | None = None,
           python: str = sys.executable, stdout=None, cores_per_process: int = 0,
           on_failure: str = 'auto', max_restarts: int = 3,
           restart_delay_s: float | None = None) -> int:
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
    on_failure: what a dead process other than 0 causes (module docstring).
    max_restarts: with ``restart``, how often each process is started again.
    restart_delay_s: seconds between a death and the restart (None: from the config,
      `resolve_failure_policy`).

  Returns:
    0 if every process's last run succeeded, else the first failure's exit code
    (128 + N for signal N; 124 on timeout).
  """
  policy, delay = resolve_failure_policy(on_failure, args, restart_delay_s)
  address = f'127.0.0.1:{free_port()}'
  pinned = core_sets(num_processes, cores_per_process) if cores_per_process else None
  commands = []
  for i in range(num_processes):
    run = ([python, '-c', _PINNED_RUN, ','.join(map(str, pinned[i])), module] if pinned
           else [python, '-m', module])
    commands.append([*run, *args, f'--coordinator_address={address}',
                     f'--num_processes={num_processes}', f'--process_id={i}'])
  job = _Job(commands, process_env(devices_per_process), stdout or sys.stdout)
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  try:
    for i in range(num_processes):
      job.start(i)
    return _supervise(job, policy, max_restarts, delay, deadline, timeout_s)
  finally:
    job.stop()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--module', default='pdcnno_jax.main')
  parser.add_argument('--timeout_s', type=float, default=None)
  parser.add_argument('--cores_per_process', type=int, default=0,
                      help='pin each process to this many cores of its own (0: no pinning)')
  parser.add_argument('--on_failure', choices=FAILURE_POLICIES, default='auto',
                      help='when a process other than 0 dies: stop the job, restart it '
                      '(SSP rejoin) or continue; auto: restart for SSP, else stop')
  parser.add_argument('--max_restarts', type=int, default=3,
                      help='with --on_failure=restart: restarts per process')
  parser.add_argument('--restart_delay_s', type=float, default=None,
                      help='seconds before a restart (default: SSP heartbeat timeout + 1)')
  parser.add_argument('args', nargs=argparse.REMAINDER,
                      help='arguments for every process, after --')
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ['--'] else ns.args
  return launch(ns.num_processes, args, module=ns.module,
                devices_per_process=ns.devices_per_process, timeout_s=ns.timeout_s,
                cores_per_process=ns.cores_per_process, on_failure=ns.on_failure,
                max_restarts=ns.max_restarts, restart_delay_s=ns.restart_delay_s)


if __name__ == '__main__':
  sys.exit(main())
