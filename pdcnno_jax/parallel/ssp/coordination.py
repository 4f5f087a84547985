"""`Store` over the key-value store of JAX's coordination service.

`jax.distributed.initialize` starts a coordination service in process 0 and a client in every
process; its key-value store (write-once keys, blocking gets, directory reads, deletes,
barriers) carries the SSP protocol. JAX exposes the client only privately
(``jax._src.distributed.global_state.client``); this is the only module that touches it.

Fault model: with recoverability on (`initialize`), a worker that dies does not take the others
down, and a restarted process with the same id reconnects and sees the stored keys. Process 0
hosts the service: its death ends the job (store calls raise `CoordinatorUnavailableError`);
restart the whole job from the checkpoints. With recoverability on, a process still connected
when process 0 exits is aborted, so every process ends with `shutdown(store)` (process 0 last).

References:
  DESIGN.md, "SSP".
"""

from __future__ import annotations

from collections.abc import Sequence
import inspect
import logging
import time

import jax

from pdcnno_jax.parallel.ssp import store as store_lib

# Methods of jaxlib's DistributedRuntimeClient that CoordinationStore calls.
_REQUIRED_CLIENT_METHODS = (
    'key_value_set_bytes',
    'blocking_key_value_get_bytes',
    'key_value_try_get_bytes',
    'key_value_dir_get_bytes',
    'key_value_delete',
    'wait_at_barrier',
)
_MIN_JAX_VERSION = (0, 5, 0)


class UnsupportedJaxError(RuntimeError):
  """The installed JAX lacks the coordination-service features SSP needs."""


class CoordinatorUnavailableError(store_lib.StoreError):
  """The coordination service (hosted by process 0) cannot be reached."""


def _version_tuple(version: str) -> tuple[int, ...]:
  parts = []
  for part in version.split('.')[:3]:
    digits = ''.join(ch for ch in part if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def _distributed_state():
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the JAX build.
    raise UnsupportedJaxError(
        f'jax {jax.__version__} has no jax._src.distributed module; the SSP '
        'store needs jax>=0.5 with the coordination-service key-value store.'
    ) from e
  return distributed.global_state


def check_supported_jax(client=None) -> None:
  """Raises `UnsupportedJaxError` unless this JAX has the needed client API.

  Args:
    client: a DistributedRuntimeClient to check; by default the class of the
      one `jax.distributed.initialize` creates.

  Raises:
    UnsupportedJaxError: on an old JAX, or a client without the key-value
      methods this module calls.
  """
  if _version_tuple(jax.__version__) < _MIN_JAX_VERSION:
    raise UnsupportedJaxError(
        f'jax {jax.__version__} is too old for the SSP coordination store; '
        f'install jax>={".".join(map(str, _MIN_JAX_VERSION))}.')
  if client is None:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    client = getattr(_jax, 'DistributedRuntimeClient', None)
    if client is None:
      raise UnsupportedJaxError(
          f'jax {jax.__version__}: jaxlib has no DistributedRuntimeClient.')
  missing = [m for m in _REQUIRED_CLIENT_METHODS if not hasattr(client, m)]
  if missing:
    raise UnsupportedJaxError(
        f'jax {jax.__version__}: the distributed runtime client lacks '
        f'{missing}; the SSP coordination store was written against jax 0.10. '
        'Use the in-memory store, or a JAX whose client has these methods.')


def initialize(coordinator_address: str,
               num_processes: int,
               process_id: int,
               *,
               heartbeat_timeout_s: int = 10,
               recoverable: bool = True,
               initialization_timeout_s: int = 120,
               shutdown_timeout_s: int = 30) -> None:
  """Starts JAX's distributed runtime with the settings SSP faults need.

  Must run before any JAX computation (like `jax.distributed.initialize`).

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: number of processes (= SSP workers).
    process_id: this process's id in [0, num_processes).
    heartbeat_timeout_s: seconds without heartbeats after which the service
      considers a process dead (`heartbeat_timeout_seconds`).
    recoverable: sets `jax_enable_recoverability`, so that a dead worker does
      not abort the others and may reconnect after a restart.
    initialization_timeout_s: how long to wait for all processes to connect.
    shutdown_timeout_s: `shutdown_timeout_seconds` of JAX's shutdown barrier.
  """
  check_supported_jax()
  try:
    jax.config.update('jax_enable_recoverability', bool(recoverable))
  except AttributeError as e:
    if recoverable:
      raise UnsupportedJaxError(
          f'jax {jax.__version__} has no jax_enable_recoverability option: a '
          'dead worker would abort the job. Upgrade JAX, or pass '
          'recoverable=False and accept that.') from e
  kwargs = dict(
      initialization_timeout=int(initialization_timeout_s),
      heartbeat_timeout_seconds=max(1, int(round(heartbeat_timeout_s))),
      shutdown_timeout_seconds=int(shutdown_timeout_s),
  )
  accepted = inspect.signature(jax.distributed.initialize).parameters
  dropped = sorted(k for k in kwargs if k not in accepted)
  if dropped:
    logging.warning('jax %s: jax.distributed.initialize does not take %s; '
                    'using its defaults.', jax.__version__, dropped)
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      **{k: v for k, v in kwargs.items() if k in accepted})


def _status_code(error: Exception) -> str:
  """Returns the absl status name a JaxRuntimeError message starts with."""
  return str(error).split(':', 1)[0].strip()


class CoordinationStore(store_lib.Store):
  """`Store` over the key-value store of JAX's distributed runtime.

  Create it after `jax.distributed.initialize` (or `initialize` above). Values
  travel through gRPC, which JAX configures with compression
  (`use_compression=True`); see benchmarks/bench_ssp_overhead.py for what
  that costs.
  """

  def __init__(self, client=None):
    """Wraps `client`, by default the one `jax.distributed.initialize` made.

    Raises:
      RuntimeError: if the distributed runtime is not initialised.
      UnsupportedJaxError: if the client lacks a needed method.
    """
    if client is None:
      state = _distributed_state()
      client = state.client
      if client is None:
        raise RuntimeError(
            'JAX distributed runtime is not initialised: call '
            'pdcnno_jax.parallel.ssp.coordination.initialize(...) (or '
            'jax.distributed.initialize) before creating a CoordinationStore.')
    check_supported_jax(client)
    self._client = client
    self._errors = tuple(
        e for e in (getattr(jax.errors, 'JaxRuntimeError', None), RuntimeError)
        if e is not None)

  @property
  def process_id(self) -> int:
    return _distributed_state().process_id

  @property
  def num_processes(self) -> int:
    return _distributed_state().num_processes

  def _raise(self, error: Exception, what: str):
    code = _status_code(error)
    if code == 'UNAVAILABLE':
      raise CoordinatorUnavailableError(
          f'{what}: the coordination service is unreachable. It lives in '
          'process 0 (the coordinator); its death is fatal to an SSP job: '
          'restart every process from its checkpoint. Original error: '
          f'{error}') from error
    if code == 'DEADLINE_EXCEEDED':
      raise store_lib.StoreTimeoutError(f'{what}: {error}') from error
    if code == 'ALREADY_EXISTS':
      raise store_lib.KeyExistsError(f'{what}: {error}') from error
    raise store_lib.StoreError(f'{what}: {error}') from error

  def set(self, key: str, value: bytes, *, overwrite: bool = False) -> None:
    store_lib.check_key(key)
    try:
      self._client.key_value_set_bytes(key, bytes(value),
                                       allow_overwrite=overwrite)
    except self._errors as e:
      self._raise(e, f'set({key!r})')

  def get(self, key: str, timeout_s: float) -> bytes:
    store_lib.check_key(key)
    try:
      return self._client.blocking_key_value_get_bytes(
          key, max(1, int(timeout_s * 1000)))
    except self._errors as e:
      self._raise(e, f'get({key!r}, timeout_s={timeout_s:.3g})')

  def try_get(self, key: str) -> bytes | None:
    store_lib.check_key(key)
    try:
      return self._client.key_value_try_get_bytes(key)
    except self._errors as e:
      if _status_code(e) == 'NOT_FOUND':
        return None
      self._raise(e, f'try_get({key!r})')

  def dir_get(self, directory: str) -> list[tuple[str, bytes]]:
    try:
      entries = self._client.key_value_dir_get_bytes(directory.rstrip('/'))
    except self._errors as e:
      self._raise(e, f'dir_get({directory!r})')
    return sorted(entries)

  def delete(self, key: str) -> None:
    try:
      self._client.key_value_delete(key.rstrip('/'))
    except self._errors as e:
      if _status_code(e) == 'NOT_FOUND':
        return
      self._raise(e, f'delete({key!r})')

  def barrier(self, name: str, timeout_s: float,
              participants: Sequence[int]) -> None:
    try:
      self._client.wait_at_barrier(name, max(1, int(timeout_s * 1000)),
                                   list(participants))
    except self._errors as e:
      self._raise(e, f'barrier({name!r}, participants={list(participants)})')



def shutdown(store: CoordinationStore, timeout_s: float = 60.0) -> None:
  """Shuts the distributed runtime down in a safe order: process 0 last.

  With recoverability on, JAX's own shutdown barrier no longer waits for the
  other processes, and a process still connected when process 0 exits is
  aborted. Every process calls this at the end: the others announce their exit
  and disconnect; process 0 waits (up to `timeout_s`) for the announcements and
  for the others to disconnect, then stops the service.

  Args:
    store: the job's store.
    timeout_s: how long process 0 waits for the others.
  """
  state = _distributed_state()
  if state.client is None:
    return
  pid, num = state.process_id, state.num_processes
  if pid != 0:
    store.set(f'pdcnno_ssp/_exit/{pid}', b'1', overwrite=True)
    jax.distributed.shutdown()
    return
  deadline = time.monotonic() + timeout_s
  pending = set(range(1, num))
  while pending and time.monotonic() < deadline:
    for worker in sorted(pending):
      if store.try_get(f'pdcnno_ssp/_exit/{worker}') is not None:
        pending.discard(worker)
    time.sleep(0.05)
  if not pending and hasattr(state.client, 'get_live_nodes'):
    # get_live_nodes acts as a barrier among the live processes named, so it
    # returns once the others have disconnected.
    while (len(state.client.get_live_nodes(list(range(num)))) > 1 and
           time.monotonic() < deadline):
      time.sleep(0.05)
  elif not pending:
    time.sleep(1.0)  # Grace period for the others' disconnect RPCs.
  if pending:
    logging.warning('Processes %s did not announce their exit within %.3g s; '
                    'shutting the coordination service down anyway.',
                    sorted(pending), timeout_s)
  store.delete('pdcnno_ssp/_exit')
  jax.distributed.shutdown()
