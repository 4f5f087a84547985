"""Multi-host start-up: ``jax.distributed.initialize`` when flags or the environment ask.

Three ways a process learns it is part of a multi-process job:
  * explicit flags / arguments: coordinator address, number of processes, process id
    (the local launcher in ``launch/local.py`` sets these for N CPU processes);
  * Slurm or a Cloud TPU pod: ``jax.distributed.initialize()`` auto-detects the cluster
    from the environment (SLURM_* variables, TPU metadata);
  * neither: a single process, nothing to initialise.

Network exposure. JAX's coordination service (gRPC, no authentication: any client that
reaches the port can read and write the job's key-value store) runs in process 0, or in the
local launcher (``launch/local.py``), which hosts it on 127.0.0.1 so that any process may
die without taking it along. With a loopback coordinator address the service and the CPU
collectives (gloo, one TCP listener per process on a random port) bind to 127.0.0.1. On a
cluster the service binds to ``bind_address`` when one is given, else to every interface
(JAX's default, logged as a warning); restrict the port to the job's hosts with a firewall
or a private network.

Dead peers. `PeerWatchdog` ends a process whose peer stopped beating with one line on
stderr, before JAX's runtime notices the missing heartbeats and aborts every process with a
C++ stack trace, also while the process waits in JAX's exit barrier; SIGTERM (the launcher
stopping the job) is one line too.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import signal
import sys
import threading
import time
from typing import Callable

import jax
from absl import logging

_CLUSTER_ENV_HINTS = ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                      'OMPI_COMM_WORLD_SIZE')
# Read by jax.distributed.initialize when no coordinator_bind_address argument is given.
_BIND_ENV = 'JAX_COORDINATOR_BIND_ADDRESS'
LOOPBACK = '127.0.0.1'
EXIT_PEER_LOST = 5  # Exit code of a process stopped because a peer is gone.
# Set (to 1) by the local launcher, which hosts the coordination service itself: process 0
# then joins it instead of starting its own.
EXTERNAL_SERVICE_ENV = 'PDCNNO_EXTERNAL_COORDINATION_SERVICE'
_LIVENESS_DIR = 'pdcnno_liveness/'
_DONE = 'done'


def cluster_detected() -> bool:
  """Whether the environment looks like a cluster JAX can auto-detect (Slurm, TPU, MPI)."""
  return any(name in os.environ for name in _CLUSTER_ENV_HINTS)


def split_address(address: str, what: str = '--coordinator_address') -> tuple[str, int]:
  """``(host, port)`` of ``'host:port'`` (IPv6 hosts in brackets); ValueError if malformed."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{what}={address!r} must be 'host:port' with a port in 1..65535, "
                     "e.g. '127.0.0.1:12355'.")
  return host.strip('[]'), int(port)


def is_loopback(host: str) -> bool:
  """Whether ``host`` (a name or an IP address) is this machine's loopback interface."""
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def coordinator_bind_address(coordinator_address: str | None,
                             bind_address: str | None = None) -> str | None:
  """The address process 0's coordination service listens on.

  Args:
    coordinator_address: ``host:port`` the processes connect to (None: auto-detected).
    bind_address: ``host:port`` given by the user (``--coordinator_bind_address``).

  Returns:
    ``bind_address`` when given; ``127.0.0.1:<port>`` for a loopback coordinator address;
    otherwise None (JAX binds to every interface).
  """
  if bind_address:
    split_address(bind_address, '--coordinator_bind_address')
    return bind_address
  if coordinator_address is None:
    return None
  host, port = split_address(coordinator_address)
  return f'{LOOPBACK}:{port}' if is_loopback(host) else None


@contextlib.contextmanager
def _bind_env(address: str | None):
  """Sets JAX's bind-address variable for one ``initialize`` call (either start-up path)."""
  previous = os.environ.get(_BIND_ENV)
  if address is not None:
    os.environ[_BIND_ENV] = address
  try:
    yield
  finally:
    if previous is None:
      os.environ.pop(_BIND_ENV, None)
    else:
      os.environ[_BIND_ENV] = previous


@contextlib.contextmanager
def _service_hosted_elsewhere(hosted: bool):
  """While ``hosted``: ``jax.distributed.initialize`` in process 0 starts no service.

  JAX has no public option for it: this hides the service factory its initialize calls.
  """
  if not hosted:
    yield
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  lib = jax_distributed._jax  # pylint: disable=protected-access

  class _WithoutService:

    def __getattr__(self, name):
      return getattr(lib, name)

    @staticmethod
    def get_distributed_runtime_service(*unused_args, **unused_kwargs):
      return None

  jax_distributed._jax = _WithoutService()  # pylint: disable=protected-access
  try:
    yield
  finally:
    jax_distributed._jax = lib  # pylint: disable=protected-access


def _terminated(signum, unused_frame) -> None:
  print(f'Error: process {jax.process_index()} was stopped by {signal.Signals(signum).name} '
        '(a launcher ends the job when one of its processes dies: its line names which); '
        'run the same command again to resume from the last checkpoint.',
        file=sys.stderr, flush=True)
  os._exit(128 + signum)


def stop_on_sigterm() -> bool:
  """Turns SIGTERM into one line on stderr and exit code 143 (no traceback, no C++ stack).

  Only from the main thread and only when SIGTERM has its default action (a handler the
  program installed stays). Returns whether it installed the handler.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    return False
  signal.signal(signal.SIGTERM, _terminated)
  return True


def use_loopback_cpu_collectives() -> bool:
  """Makes gloo (CPU collectives between processes) listen on 127.0.0.1.

  By default gloo binds to the address the machine's host name resolves to, which may be a
  network interface. JAX has no public option for it: this registers the CPU backend with
  gloo collectives on 127.0.0.1 (``make_gloo_tcp_collectives(hostname=...)``). Call it after
  ``jax.distributed.initialize`` and before the first JAX computation.

  Returns:
    Whether it took effect (False, with a warning, on a JAX without these internals or
    when the CPU backend already exists).
  """
  try:
    # pylint: disable=g-import-not-at-top
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    # pylint: enable=g-import-not-at-top

    def cpu_client():
      collectives = _jax.make_gloo_tcp_collectives(
          distributed_client=jax_distributed.global_state.client, hostname=LOOPBACK)
      return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory('cpu', cpu_client, priority=0, fail_quietly=False)
    return True
  except (ImportError, AttributeError, TypeError, RuntimeError) as e:
    logging.warning('gloo listens on the address of this host name, not only 127.0.0.1 '
                    '(jax %s: %s).', jax.__version__, e)
    return False


def watch_limit_s(heartbeat_timeout_s: float, interval_s: float = 1.0) -> float:
  """Seconds of peer silence after which `PeerWatchdog` stops this process.

  JAX's client heartbeats every half timeout, so its service may declare a peer dead (and
  abort everyone) half a timeout after the peer's last beat: the watchdog acts before that.
  """
  return max(1.0, heartbeat_timeout_s / 2 - 2 * interval_s)


def _peer_lost(process_id: int, peer: int, silent_s: float) -> None:
  what = ('the coordination service is unreachable' if peer == 0 and
          silent_s < 0 else f'process {peer} stopped responding {abs(silent_s):.0f} s ago')
  print(f'Error: {what} (dead, hung or cut off); this job needs every process, so process '
        f'{process_id} stops too.', file=sys.stderr, flush=True)
  os._exit(EXIT_PEER_LOST)


class PeerWatchdog:
  """Beats through the coordination service's key-value store and watches the peers' beats.

  Each process increments its own counter every ``interval_s``; a peer whose counter has not
  changed for ``limit_s`` (measured on this host's clock, so host clocks need not agree)
  calls ``on_lost(process_id, peer, silent_s)``; an unreachable service counts as the death
  of process 0 (``silent_s < 0``).

  At exit `finish` marks this process done (its peers stop watching it), leaves the job
  through ``shutdown`` (JAX's exit barrier, which waits for every peer) while the thread still
  watches the peers that are not done, so a peer that dies meanwhile ends this process with
  one line instead of a C++ abort; then it stops and joins the thread, so that no thread is
  inside a coordination-service call when the interpreter tears down. `stop` ends the
  watching without leaving the job.
  """

  def __init__(self, client, process_id: int, num_processes: int, limit_s: float, *,
               interval_s: float = 1.0,
               on_lost: Callable[[int, int, float], None] = _peer_lost,
               shutdown: Callable[[], None] = jax.distributed.shutdown):
    self._client, self._id, self._n = client, process_id, num_processes
    self._limit_s, self._interval_s, self._on_lost = limit_s, interval_s, on_lost
    self._shutdown = shutdown
    self._stopped = threading.Event()
    self._finished = threading.Event()
    self._thread = threading.Thread(target=self._run, name='PeerWatchdog', daemon=True)

  def start(self) -> 'PeerWatchdog':
    self._thread.start()
    atexit.register(self.finish)  # Runs before JAX's own exit handler (registered earlier).
    return self

  def finish(self) -> None:
    """Marks this process done, leaves the job while watching the peers, stops the thread."""
    if self._stopped.is_set():
      return
    self._finished.set()
    self._mark_done()
    try:
      self._shutdown()
    except Exception as e:  # pylint: disable=broad-except
      self.stop()
      print(f'Error: process {self._id} could not leave the job (JAX\'s exit barrier failed: '
            f'{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); a '
            'peer is probably gone.', file=sys.stderr, flush=True)
      os._exit(EXIT_PEER_LOST)
    self.stop()

  def stop(self) -> None:
    """Stops watching and joins the thread (marks this process done unless `finish` did)."""
    if self._stopped.is_set():
      return
    self._stopped.set()
    # A call in flight returns within the service's RPC time; a hung service is the one case
    # in which the (daemon) thread may outlive this wait.
    self._thread.join(timeout=max(30.0, 4 * self._interval_s))
    if not self._finished.is_set():
      self._mark_done()

  def _mark_done(self) -> None:
    try:
      self._client.key_value_set(f'{_LIVENESS_DIR}{self._id}', _DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # The service is gone: nobody is left to watch this process.

  def _run(self) -> None:
    beats, seen, now = 0, {}, time.monotonic()
    last_change = dict.fromkeys(range(self._n), now)
    reached = now
    while not self._stopped.wait(self._interval_s):
      now = time.monotonic()
      try:
        if not self._finished.is_set():
          beats += 1
          self._client.key_value_set(f'{_LIVENESS_DIR}{self._id}', str(beats),
                                     allow_overwrite=True)
        values = dict(self._client.key_value_dir_get(_LIVENESS_DIR))
        reached = now
      except Exception:  # pylint: disable=broad-except
        # After `finish` the service may be gone because the job ended: not a death.
        if (now - reached > self._limit_s and not self._stopped.is_set()
            and not self._finished.is_set()):
          self._on_lost(self._id, 0, -(now - reached))
          return
        continue
      for peer in range(self._n):
        value = values.get(f'{_LIVENESS_DIR}{peer}')
        if peer == self._id or value == _DONE:
          last_change[peer] = now
        elif value != seen.get(peer):
          seen[peer], last_change[peer] = value, now
        elif now - last_change[peer] > self._limit_s and not self._stopped.is_set():
          self._on_lost(self._id, peer, now - last_change[peer])
          return


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = 'auto',
               initialization_timeout: int = 300, heartbeat_timeout_s: float | None = None,
               bind_address: str | None = None) -> bool:
  """Joins the multi-process job if one is configured; returns whether it did.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
    num_processes: total processes in the job.
    process_id: this process's index in ``[0, num_processes)``.
    mode: ``'auto'`` (initialise if an address is given or a cluster is detected),
      ``'on'`` (always; rely on auto-detection for missing values) or ``'off'``.
    initialization_timeout: seconds to wait for every process to connect.
    heartbeat_timeout_s: seconds without heartbeats after which the coordination service
      counts a process as dead (None: JAX's 100); a `PeerWatchdog` stops the survivors of a
      silent peer after `watch_limit_s` of it.
    bind_address: ``host:port`` process 0's coordination service listens on (see
      `coordinator_bind_address` for the default).

  Raises:
    ValueError: for an inconsistent combination of arguments.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"--distributed must be 'auto', 'on' or 'off', got {mode!r}.")
  explicit = coordinator_address is not None
  if mode == 'off' or (mode == 'auto' and not explicit and not cluster_detected()):
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ValueError('--coordinator_address needs --num_processes and --process_id too.')
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f'--process_id={process_id} must be in [0, {num_processes}).')
  bind = coordinator_bind_address(coordinator_address, bind_address)
  if bind is None and process_id in (0, None):
    logging.warning('The coordination service listens on every interface without '
                    'authentication; pass --coordinator_bind_address=IP:PORT to restrict it.')
  # CPU devices of different processes talk over gloo (harmless on GPU/TPU hosts).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  with _bind_env(bind), _service_hosted_elsewhere(bool(os.environ.get(EXTERNAL_SERVICE_ENV))):
    timeouts = ({} if heartbeat_timeout_s is None else
                {'heartbeat_timeout_seconds': max(1, int(round(heartbeat_timeout_s)))})
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=initialization_timeout, **timeouts)
  if bind is not None and is_loopback(split_address(bind)[0]):
    use_loopback_cpu_collectives()
  if jax.process_count() > 1:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    PeerWatchdog(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                 watch_limit_s(100 if heartbeat_timeout_s is None else heartbeat_timeout_s)
                 ).start()
    stop_on_sigterm()
  logging.info('Joined job as process %d of %d (coordination service on %s).',
               jax.process_index(), jax.process_count(), bind or 'every interface')
  return True
