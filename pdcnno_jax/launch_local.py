"""Starts N local CPU processes that join one JAX job as N "hosts" (loopback only).

  python launch/local.py --num_processes=2 [--devices_per_process=1] -- \
      --config=configs/default.py --workdir=workdirs/two_hosts

Each process runs ``python -m pdcnno_jax.main`` (or ``--module``) with
``--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i``; the
coordination service and the CPU collectives (gloo) between them listen on 127.0.0.1 only.
Output lines are prefixed with ``[p<i>]``; the launcher's own lines with ``launcher:``.

The launcher hosts the job's coordination service in a process of its own (on 127.0.0.1), so
that any process, process 0 included, may die without taking the service with it. Every mode it runs
(sync, MapReduce on the jax engine) needs every process: when one dies the launcher says
which and how (exit code or signal), ends the others (SIGTERM, then SIGKILL after
``--grace_s``; a process joined through `pdcnno_jax.distributed` turns SIGTERM into one line)
and exits with the dead process's code (128 + N for signal N). SSP runs on the Ray engine
(one driver, worker actors) and is refused here before anything starts.

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


class LaunchError(ValueError):
  """A job the local launcher refuses to start (one line: what to run instead)."""


def parallel_mode(args: Sequence[str]) -> str | None:
  """``parallel.mode`` of the job: a ``--config.parallel.mode`` override, else ``--config``'s.

  None when the arguments name no config or it does not load (the processes report that).
  """
  mode, path = _flag(args, 'config.parallel.mode'), _flag(args, 'config')
  if mode is None and path:
    from pdcnno_jax import config_lib  # pylint: disable=g-import-not-at-top
    try:
      mode = config_lib.load_config(path).parallel.mode
    except Exception:  # pylint: disable=broad-except
      pass  # The processes report the broken config themselves.
  return mode


def refuse_ssp(args: Sequence[str]) -> None:
  """Raises LaunchError for an SSP job: SSP runs on the Ray engine, not as launched processes."""
  if parallel_mode(args) == 'ssp':
    config = _flag(args, 'config') or 'configs/ssp_lenet.py'
    raise LaunchError(
        f'SSP runs on the Ray engine, not as launcher processes: run python -m '
        f'pdcnno_jax.main --config={config} --workdir=DIR --config.parallel.num_workers=N '
        '(one driver, N worker actors).')


# The service's own dead-task detection is not needed under the launcher (it sees a death at
# once through waitpid; frozen processes are the peers' watchdogs' business), and a timeout
# shorter than a process's heartbeat interval would declare live processes dead.
_SERVICE_HEARTBEAT_TIMEOUT_S = 3600


# Hosts the service in a process of its own session, so that pausing the launcher (Ctrl-Z, a
# job-control SIGSTOP) does not freeze the service and abort every process; it ends when its
# stdin closes (the launcher shut it down or died).
_SERVICE_RUN = ('import sys; from jax._src.lib import _jax; '
                'service = _jax.get_distributed_runtime_service('
                'sys.argv[1], int(sys.argv[2]), heartbeat_timeout=int(sys.argv[3])); '
                'print("ready", flush=True); sys.stdin.read(); service.shutdown()')


class CoordinationService:
  """JAX's coordination service for ``num_processes`` processes, in a child process.

  The processes join it with `pdcnno_jax.distributed.initialize` under the environment
  variable ``distributed.EXTERNAL_SERVICE_ENV`` (process 0 then starts no service of its own).
  """

  def __init__(self, address: str, num_processes: int, python: str = sys.executable):
    self.proc = subprocess.Popen(
        [python, '-c', _SERVICE_RUN, address, str(num_processes),
         str(_SERVICE_HEARTBEAT_TIMEOUT_S)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=process_env(1), start_new_session=True)
    ready = self.proc.stdout.readline()
    if ready.strip() != b'ready':
      self.shutdown()
      raise RuntimeError(f'the coordination service on {address} did not start.')

  def shutdown(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


class _Job:
  """The processes of one launch: start, stop, with prefixed output."""

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

  def stop(self, grace_s: float) -> None:
    """SIGTERM to every running process, SIGKILL to those still running ``grace_s`` later."""
    for p in self.procs:
      if p is not None and p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        os.killpg(p.pid, signal.SIGCONT)  # A stopped (frozen) process acts on it at once.
    deadline = time.monotonic() + grace_s
    for i, p in enumerate(self.procs):
      if p is None:
        continue
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.say(f'process {i} did not stop within {grace_s:g} s of SIGTERM: killing it.')
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for t in self.pumps:
      t.join(timeout=5)


def _first_failure(codes: Sequence[int | None]) -> int | None:
  """The process whose failure ended the job, among those that have failed so far.

  A process killed by a signal, then one that failed on its own, before one that stopped
  because a peer was lost (and before survivors whose collectives failed with the death).
  """
  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
  return min(failed, key=lambda i: (codes[i] >= 0, codes[i] == distributed.EXIT_PEER_LOST),
             default=None)


def _supervise(job: _Job, deadline: float | None, timeout_s: float | None) -> int:
  """Waits for the job; at the first death says which process and how; returns the exit code."""
  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  while True:
    codes = [p.poll() for p in job.procs]
    i = _first_failure(codes)
    if i is not None:
      if codes[i] == distributed.EXIT_PEER_LOST:
        job.say(f'process {i} stopped because a peer stopped responding (its last line says '
                'which); stopping the others.')
      else:
        job.say(f'process {i} {describe_exit(codes[i])}; this job needs every process, so '
                'the launcher stops the others. Run the same command again to resume from '
                'the last checkpoint.')
      return shell_code(codes[i])
    if all(c is not None for c in codes):
      return 0
    if deadline is not None and time.monotonic() > deadline:
      job.say(f'timeout after {timeout_s} s, stopping all processes')
      return 124
    time.sleep(0.05)


def launch(num_processes: int, args: Sequence[str], *, module: str = 'pdcnno_jax.main',
           devices_per_process: int = 1, timeout_s: float | None = None,
           python: str = sys.executable, stdout=None, cores_per_process: int = 0,
           grace_s: float = 5.0) -> int:
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
    grace_s: seconds between SIGTERM and SIGKILL when the job is stopped.

  Returns:
    0 if every process succeeded, else the code of the process whose failure ended the job
    (128 + N for signal N; 124 on timeout).

  Raises:
    LaunchError: for an SSP job (`refuse_ssp`), before anything starts.
  """
  refuse_ssp(args)
  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  address = f'{distributed.LOOPBACK}:{free_port()}'
  pinned = core_sets(num_processes, cores_per_process) if cores_per_process else None
  commands = []
  for i in range(num_processes):
    run = ([python, '-c', _PINNED_RUN, ','.join(map(str, pinned[i])), module] if pinned
           else [python, '-m', module])
    commands.append([*run, *args, f'--coordinator_address={address}',
                     f'--num_processes={num_processes}', f'--process_id={i}'])
  env = process_env(devices_per_process)
  env[distributed.EXTERNAL_SERVICE_ENV] = '1'
  job = _Job(commands, env, stdout or sys.stdout)
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  service = CoordinationService(address, num_processes, python)
  try:
    for i in range(num_processes):
      job.start(i)
    return _supervise(job, deadline, timeout_s)
  finally:
    job.stop(grace_s)
    service.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--module', default='pdcnno_jax.main')
  parser.add_argument('--timeout_s', type=float, default=None)
  parser.add_argument('--cores_per_process', type=int, default=0,
                      help='pin each process to this many cores of its own (0: no pinning)')
  parser.add_argument('--grace_s', type=float, default=5.0,
                      help='when the job stops: seconds between SIGTERM and SIGKILL')
  parser.add_argument('args', nargs=argparse.REMAINDER,
                      help='arguments for every process, after --')
  ns = parser.parse_args(argv)
  args = ns.args[1:] if ns.args[:1] == ['--'] else ns.args
  try:
    return launch(ns.num_processes, args, module=ns.module,
                  devices_per_process=ns.devices_per_process, timeout_s=ns.timeout_s,
                  cores_per_process=ns.cores_per_process, grace_s=ns.grace_s)
  except LaunchError as e:
    print(f'launcher: {e}', file=sys.stderr, flush=True)
    return 2


if __name__ == '__main__':
  sys.exit(main())
