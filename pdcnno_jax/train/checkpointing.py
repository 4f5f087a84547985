"""Verified orbax checkpoints of the training state, with resume from the workdir alone.

A checkpoint holds the full :class:`~pdcnno_jax.train.state.TrainState` (parameters,
feature masks, BatchNorm statistics, optimizer state, step), a small JSON record (epoch,
phase, anything a stage needs to resume) and a JSON item of per-leaf CRC-32 checksums with
the state's parameter norm and loss. Orbax writes the items into a temporary directory and
renames it when all are written, so the checksums commit atomically with the data.

Only healthy states are written: finite parameters, a loss at most
``config.checkpoint_max_loss_ratio`` x the best seen and a global parameter norm at most
``config.checkpoint_max_norm_ratio`` x that of the last good checkpoint. Restoring checks
every leaf against its checksum; a checkpoint that fails, is unreadable or was never
finished is skipped with a warning and the newest intact one is used. The last good
checkpoint is never rotated out, and every error names a step that is committed on disk.
Saves are asynchronous (the next steps overlap the write).
"""

from __future__ import annotations

import dataclasses
import errno
import logging as std_logging
import math
import os
import re
from typing import Any, Callable, Sequence
import zlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

CHECKSUM_ITEM = 'checksums'
_ITEMS = ('state', 'meta', CHECKSUM_ITEM)
_FORMAT = 1
_TMP_DIR = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


class UnhealthyStateError(FloatingPointError):
  """Raised instead of saving a state that is not healthy (the last good one is kept)."""


class NonFiniteStateError(UnhealthyStateError):
  """Raised instead of saving a state with NaN or inf parameters."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions); one line, no traceback."""


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by a different architecture or optimizer."""


class NoIntactCheckpointError(FileNotFoundError):
  """Checkpoints exist but none of them passes its checks."""


class _Corrupt(Exception):
  """A step that is unreadable or fails its checksums (the message says why)."""


def is_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of ``tree`` is finite (one device->host sync)."""
  flags = [jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  return bool(np.all(jax.device_get(flags))) if flags else True


def leaf_name(path: Sequence[Any]) -> str:
  """``'params.conv1.kernel.value'``: a key path as orbax names it, whatever the container."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '.'.join(parts)


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(x: Any) -> np.ndarray:
  """The bytes orbax stores for leaf ``x``, on this host (typed PRNG keys as key data)."""
  if isinstance(x, jax.Array):
    if _is_key(x):
      x = jax.random.key_data(x)
    if not (x.is_fully_addressable or x.is_fully_replicated):
      x = multihost_utils.process_allgather(x, tiled=True)
  return np.require(np.asarray(x), requirements='C')  # Keeps 0-d arrays 0-d.


def _signature(x: Any) -> tuple[tuple[int, ...], str]:
  """``(shape, dtype name)`` of a leaf as stored (array or ``jax.ShapeDtypeStruct``)."""
  if _is_key(x):
    x = jax.eval_shape(jax.random.key_data, x)
  return tuple(int(d) for d in x.shape), np.dtype(x.dtype).name


def checksums(tree: Any) -> dict[str, dict[str, Any]]:
  """``{leaf name: {'shape', 'dtype', 'crc32'}}`` over the raw bytes of each leaf.

  Args:
    tree: a pytree of arrays (jax, numpy); jax arrays are copied to host.

  Raises:
    ValueError: when two leaves have the same name.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name, array = leaf_name(path), _host(leaf)
    if name in out:
      raise ValueError(f'Two state leaves are both named {name}; cannot checksum them.')
    out[name] = {'shape': list(array.shape), 'dtype': array.dtype.name,
                 'crc32': zlib.crc32(array.reshape(-1).view(np.uint8))}
  return out


def global_norm(tree: Any) -> float:
  """sqrt(sum of squares) of the floating-point leaves (inf when it overflows float32)."""
  total = 0.0
  for leaf in jax.tree.leaves(tree):
    array = _host(leaf)
    if jax.numpy.issubdtype(array.dtype, jax.numpy.floating):
      flat = array.reshape(-1).astype(np.float32, copy=False)
      with np.errstate(over='ignore', invalid='ignore'):
        total += float(np.dot(flat, flat))
  return math.sqrt(total) if math.isfinite(total) else math.inf


def health_problem(*, finite: bool, param_norm: float, loss: float | None,
                   best_loss: float | None, reference_norm: float | None,
                   max_loss_ratio: float, max_norm_ratio: float) -> str | None:
  """Why a state must not be saved, or None when it is healthy.

  Args:
    finite: whether every parameter is finite.
    param_norm: the global parameter norm of the state.
    loss: the training loss of the last log window (None: not checked).
    best_loss: the best loss seen before (None or 0: no reference).
    reference_norm: the parameter norm of the last good checkpoint (None: none yet).
    max_loss_ratio: the loss may be at most this x ``best_loss``; 0 disables.
    max_norm_ratio: the norm may be at most this x ``reference_norm``; 0 disables.
  """
  if not finite:
    return 'parameters are not finite'
  if loss is not None and not math.isfinite(loss):
    return f'the training loss is {loss}'
  if max_loss_ratio and loss is not None and best_loss and loss > max_loss_ratio * best_loss:
    return (f'the training loss {loss:.4g} is above config.checkpoint_max_loss_ratio='
            f'{max_loss_ratio:g} x the best loss seen ({best_loss:.4g})')
  if max_norm_ratio and reference_norm is not None and (
      param_norm > max_norm_ratio * reference_norm):
    return (f'the parameter norm {param_norm:.4g} is above config.checkpoint_max_norm_ratio='
            f'{max_norm_ratio:g} x that of the last good checkpoint ({reference_norm:.4g})')
  return None


def mismatch(saved: dict[str, dict[str, Any]], current: Any) -> str | None:
  """How the leaves of ``current`` differ from a checksum record, or None when they match."""
  here = {leaf_name(p): _signature(x)
          for p, x in jax.tree_util.tree_flatten_with_path(current)[0]}
  there = {name: (tuple(r['shape']), r['dtype']) for name, r in saved.items()}
  lines = [f'{name}: saved {there[name][0]} {there[name][1]} vs current {here[name][0]} '
           f'{here[name][1]}' for name in there if name in here and there[name] != here[name]]
  lines += [f'{name}: saved {there[name][0]}, absent now' for name in there if name not in here]
  lines += [f'{name}: not in the checkpoint, current {here[name][0]}'
            for name in here if name not in there]
  if not lines:
    return None
  more = f' (and {len(lines) - 6} more)' if len(lines) > 6 else ''
  return '; '.join(lines[:6]) + more


def _os_error_text(error: BaseException) -> str:
  """The OS-level reason in an exception chain (orbax wraps tensorstore wraps the OS)."""
  seen, pending, last = set(), [error], error
  while pending:
    e = pending.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    last = e
    code = getattr(e, 'errno', None)
    match = _OS_ERROR_CODE.search(str(e))
    code = code if isinstance(code, int) else (int(match.group(1)) if match else None)
    if code:
      return f'{os.strerror(code)} (errno {code})'
    pending += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]
  text = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
  return f'{type(last).__name__}: {text[:300]}'


def load_arrays(state_dir: str) -> Any:
  """Reads a saved state directory (``<ckpt>/<step>/state``) as host arrays on one device.

  Works whatever topology (processes, devices) wrote it: the tree of shapes and dtypes is
  read from the checkpoint's metadata. For tests, tools and notebooks.
  """
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata
  return jax.device_get(checkpointer.restore(state_dir, _local_target(tree)))


def _local_target(metadata_tree: Any) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      metadata_tree)


class _DiskFullTracebacks(std_logging.Filter):
  """Drops the tracebacks orbax logs from its threads for a full disk (one line each stays).

  The failure reaches the caller as one ``CheckpointWriteError`` line; without this filter
  the reason is buried in hundreds of lines of the same chained traceback.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and f'{os.sep}orbax{os.sep}' in record.pathname and (
        _os_error_text(error).endswith(f'(errno {errno.ENOSPC})')):
      record.exc_info, record.exc_text = None, None
      record.msg, record.args = f'{record.getMessage()} [{_os_error_text(error)}]', ()
    return True


def _quiet_disk_full_tracebacks() -> None:
  logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _DiskFullTracebacks) for f in logger.filters):
    logger.addFilter(_DiskFullTracebacks())


@dataclasses.dataclass
class _KeepLatestAndLastGood:
  """Orbax preservation policy: the newest ``n`` steps not known bad, plus the last good."""
  n: int
  bad_steps: Callable[[], set[int]]
  last_good: Callable[[], int | None]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    bad = self.bad_steps()
    kept = {info.step for info in checkpoints if info.step not in bad}
    kept = set(sorted(kept)[-self.n:]) | {self.last_good()}
    return [info.step in kept for info in checkpoints]


class Checkpointer:
  """Orbax ``CheckpointManager`` for one workdir, with verified restore and healthy saves.

  Args:
    directory: where checkpoints go (``<workdir>/checkpoints``).
    keep: number of most recent checkpoints kept (the last good one is kept as well).
    async_save: write in a background thread (the next steps overlap the write).
    max_loss_ratio: refuse a save whose loss is above this x the best seen; 0 disables.
    max_norm_ratio: refuse a save whose global parameter norm is above this x that of the
      last good checkpoint; 0 disables.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               max_loss_ratio: float = 0.0, max_norm_ratio: float = 0.0):
    if keep < 1:
      raise ValueError(f'keep (config.keep_checkpoints) must be >= 1, got {keep}.')
    self.directory = os.path.abspath(directory)
    self._max_loss_ratio, self._max_norm_ratio = max_loss_ratio, max_norm_ratio
    self._status: dict[int, str | None] = {}  # Step -> None (intact) or why it is skipped.
    self._good: int | None = None  # Newest step committed on disk and intact.
    self._latest_saved: int | None = None  # Newest step this object saved (maybe pending).
    self._pending: tuple[int, dict[str, Any]] | None = None
    self._deferred_error: CheckpointWriteError | None = None
    self._best_loss: float | None = None
    self._reference_norm: float | None = None
    self._scanned = False
    # What the scan read and verified (step, arrays on one device, meta, checksum record), so a
    # single-process resume places it instead of reading the step a second time.
    self._verified: tuple[int, Any, dict, dict] | None = None
    self._incomplete = self._warn_incomplete()
    _quiet_disk_full_tracebacks()
    policy = _KeepLatestAndLastGood(
        keep, lambda: {s for s, why in self._status.items() if why is not None},
        lambda: self._good)
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        preservation_policy=policy)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  @classmethod
  def from_config(cls, directory: str, config: ml_collections.ConfigDict) -> Checkpointer:
    """A checkpointer with the workdir-level settings of ``configs/default.py``."""
    return cls(directory, keep=config.keep_checkpoints,
               max_loss_ratio=config.checkpoint_max_loss_ratio,
               max_norm_ratio=config.checkpoint_max_norm_ratio)

  def _warn_incomplete(self) -> list[str]:
    """Names the saves that never finished (orbax removes them when it opens the directory)."""
    names = sorted(n for n in (os.listdir(self.directory) if os.path.isdir(self.directory)
                               else []) if _TMP_DIR.match(n))
    for name in names:
      logging.warning('Skipping incomplete checkpoint %s (its save never finished); it is '
                      'removed.', os.path.join(self.directory, name))
    return names

  # --- which steps are good -------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest step saved by this object, else the newest intact checkpoint, else None.

    The first call verifies the checkpoints on disk, newest first, and skips (with a
    warning) those that fail.

    Raises:
      NoIntactCheckpointError: when checkpoints exist but none is intact.
    """
    if self._latest_saved is not None:
      return self._latest_saved
    self._scan()
    if self._good is None and any(why is not None for why in self._status.values()):
      raise NoIntactCheckpointError(self._inventory())
    return self._good

  def last_good_step(self) -> int | None:
    """The newest step committed on disk and intact (never one still being written)."""
    self._scan()
    self._settle(block=False)
    return self._good

  def last_good_text(self) -> str:
    """'the last good checkpoint is step N in DIR' (or that there is none yet)."""
    step = self.last_good_step()
    if step is None:
      return f'no checkpoint yet in {self.directory}'
    return f'the last good checkpoint is step {step} in {self.directory}'

  def _scan(self) -> None:
    """Verifies steps on disk, newest first, down to the first intact one."""
    if self._scanned:
      return
    self._scanned = True
    for step in sorted(self._manager.all_steps(), reverse=True):
      if self._status.get(step, None) is not None:
        continue
      try:
        state, meta, record = self._read(step, None)
      except _Corrupt as e:
        self._mark_bad(step, str(e))
        continue
      self._adopt(step, record)
      if jax.process_count() == 1:
        self._verified = (step, state, meta, record)
      return

  def _mark_bad(self, step: int, why: str) -> None:
    self._status[step] = why
    logging.warning('Skipping checkpoint step %d in %s: %s. It is removed at the next save.',
                    step, self.directory, why)

  def _adopt(self, step: int, record: dict[str, Any]) -> None:
    self._status[step] = None
    self._good = step
    self._reference_norm = record['param_norm']
    self._best_loss = record['best_loss']

  def _inventory(self) -> str:
    found = [f'step {s}: {why}' for s, why in sorted(self._status.items()) if why]
    found += [f'{name}: incomplete save' for name in self._incomplete]
    return (f'No intact checkpoint in {self.directory}; found ' + '; '.join(found) +
            '. Delete that directory (or use a new --workdir) to start afresh.')

  # --- reading ----------------------------------------------------------------------------

  def _read(self, step: int, target: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(state, meta, checksum record)`` of ``step``, verified against its checksums.

    ``target`` (a ``jax.ShapeDtypeStruct`` tree) lays the state out; None reads it onto one
    local device as saved.

    Raises:
      _Corrupt: the step is unreadable or fails a checksum.
      CheckpointMismatchError: the step's tree differs from ``target``.
    """
    if not os.path.isdir(os.path.join(self.directory, str(step), CHECKSUM_ITEM)):
      raise _Corrupt('it has no checksum record (deleted, or written by an older version)')
    try:
      jsons = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore(), **{CHECKSUM_ITEM: ocp.args.JsonRestore()}))
      meta, record = jsons['meta'], jsons[CHECKSUM_ITEM]
      if not isinstance(record, dict) or record.get('format') != _FORMAT:
        raise _Corrupt('its checksum record is missing or of another format')
    except _Corrupt:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Whatever orbax/tensorstore raise.
      raise _Corrupt(f'its meta or checksum record is unreadable ({_os_error_text(e)})') from e
    if target is not None:
      self._check_layout(step, record, target)
    try:
      if target is None:
        target = _local_target(self._manager.item_metadata(step)['state'])
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))['state']
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'its arrays are unreadable ({_os_error_text(e)})') from e
    actual = checksums(state)
    bad = [name for name, r in record['checksums'].items() if actual.get(name) != r]
    if bad or set(actual) != set(record['checksums']):
      raise _Corrupt(f'checksum mismatch in {", ".join(bad[:3]) or "the leaf set"} '
                     '(the data changed on disk)')
    return state, meta, record

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores the state (laid out like ``abstract_state``) and meta of ``step``.

    Args:
      abstract_state: a state pytree (or its ``jax.ShapeDtypeStruct`` tree with shardings)
        giving structure, shapes, dtypes and shardings of the restored arrays.
      step: which checkpoint; by default the newest intact one (corrupt newer ones are
        skipped with a warning).

    Raises:
      FileNotFoundError: no checkpoint (``NoIntactCheckpointError``: none intact, or
        ``step`` fails its checks).
      CheckpointMismatchError: the checkpoint holds a different architecture/optimizer.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    while True:
      chosen = self.latest_step() if step is None else step
      if chosen is None:
        raise FileNotFoundError(f'No checkpoint in {self.directory}.')
      try:
        state, meta, record = self._placed(chosen, target) or self._read(chosen, target)
        break
      except _Corrupt as e:
        self._mark_bad(chosen, str(e))
        if step is not None:
          raise NoIntactCheckpointError(self._inventory()) from None
        self._good, self._latest_saved, self._scanned = None, None, False
    self._adopt(chosen, record)
    logging.info('Restored checkpoint step %d from %s', chosen, self.directory)
    return state, meta

  def _check_layout(self, step: int, record: dict[str, Any], target: Any) -> None:
    differences = mismatch(record['checksums'], target)
    if differences:
      raise CheckpointMismatchError(
          f'Checkpoint step {step} in {self.directory} was written by a different model '
          f'or optimizer: {differences}. Resume with the config that wrote it, or use a '
          'new --workdir.')

  def _placed(self, step: int, target: Any) -> tuple[Any, dict, dict] | None:
    """The scan's verified copy of ``step`` laid out like ``target``, else None."""
    verified, self._verified = self._verified, None
    if verified is None or verified[0] != step:
      return None
    _, host_state, meta, record = verified
    self._check_layout(step, record, target)
    by_name = {leaf_name(path): x
               for path, x in jax.tree_util.tree_flatten_with_path(host_state)[0]}
    state = jax.tree_util.tree_map_with_path(
        lambda path, t: jax.device_put(by_name[leaf_name(path)], getattr(t, 'sharding', None)),
        target)
    return state, meta, record

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of ``step`` (the newest intact one by default) without the state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  # --- writing ----------------------------------------------------------------------------

  def set_norm_reference(self, params: Any) -> None:
    """Uses the norm of ``params`` (a fresh run's initial state) until a checkpoint exists."""
    self._scan()
    if self._good is None:
      self._reference_norm = global_norm(params)

  def save(self, step: int, state: Any, meta: dict[str, Any], *, loss: float | None = None,
           force: bool = True) -> None:
    """Saves ``state`` (with ``meta`` and checksums) at ``step`` if it is healthy.

    Args:
      step: the training step.
      state: a state with a ``params`` attribute (device or host arrays).
      meta: JSON-serialisable record.
      loss: the training loss of the last log window (None: no loss check).
      force: passed to orbax (save whatever its save interval says).

    Raises:
      UnhealthyStateError: the state fails a health check (``NonFiniteStateError`` for
        NaN/inf parameters); nothing is written and the last good checkpoint is kept.
      CheckpointWriteError: this or the previous asynchronous save could not be written.
    """
    self._scan()
    self._settle(block=True)
    host = jax.tree.map(_host, state)
    norm = global_norm(host.params)
    problem = health_problem(
        finite=all(np.isfinite(x).all() for x in jax.tree.leaves(host.params)
                   if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)),
        param_norm=norm, loss=loss, best_loss=self._best_loss,
        reference_norm=self._reference_norm, max_loss_ratio=self._max_loss_ratio,
        max_norm_ratio=self._max_norm_ratio)
    if problem:
      error = NonFiniteStateError if problem.startswith('parameters') else UnhealthyStateError
      raise error(f'Not saving step {step}: {problem}; {self.last_good_text()}.')
    best = self._best_loss if loss is None else min(
        loss, math.inf if self._best_loss is None else self._best_loss)
    record = {'format': _FORMAT, 'checksums': checksums(host), 'param_norm': norm,
              'loss': loss, 'best_loss': best}
    if self._status.get(step) is not None and step in self._manager.all_steps():
      logging.warning('Replacing checkpoint step %d in %s (it failed its checks).', step,
                      self.directory)
      self._manager.delete(step)
      del self._status[step]
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
          **{CHECKSUM_ITEM: ocp.args.JsonSave(record)}), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from None
    self._best_loss = best
    self._pending, self._latest_saved = (step, record), step
    if not self._manager.is_saving_in_progress():
      self._settle(block=True)

  def _settle(self, *, block: bool) -> None:
    """Records the pending save as good once it is committed (or raises its write error)."""
    if self._deferred_error is not None and block:
      error, self._deferred_error = self._deferred_error, None
      raise error
    if self._pending is None or (not block and self._manager.is_saving_in_progress()):
      return
    step, record = self._pending
    self._pending = None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._latest_saved = self._good
      error = self._write_error(step, e)
      if block:
        raise error from None
      self._deferred_error = error
      return
    if os.path.isdir(os.path.join(self.directory, str(step))):
      self._adopt(step, record)

  def _write_error(self, step: int, error: BaseException) -> CheckpointWriteError:
    reason = _os_error_text(error)
    hint = ' Free disk space or point --workdir elsewhere.' if os.strerror(
        errno.ENOSPC) in reason else ''
    return CheckpointWriteError(
        f'Could not write checkpoint step {step} to {os.path.join(self.directory, str(step))}: '
        f'{reason}; {self.last_good_text()}.{hint}')

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk.

    Raises:
      CheckpointWriteError: a pending save could not be written.
    """
    self._settle(block=True)

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    try:
      self._settle(block=True)
    finally:
      self._manager.close()

