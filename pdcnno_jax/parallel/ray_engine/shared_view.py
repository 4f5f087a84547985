"""A parameter shard's parameters in shared memory, read without a call by its node's workers.

The SSP rule asks of the view a worker trains clock c on that it hold every worker's updates
through c - s - 1 and the worker's own (Ho et al. 2013, section 2), under s = 0 exactly those;
it need not come back in the reply to the worker's own push. A push that waits for that reply
costs a Ray actor round trip a clock, which on a busy node is the wait for the shard's process
to get a core (README, "MapReduce and SSP on Ray": 5-8 ms of a 23-35 ms LeNet-5 step on 2 loaded
cores). So each shard publishes its buffers and clocks into one file in ``/dev/shm`` after every
push it applies (`SharedView.publish`): per worker, the newest clock in the published
parameters, the newest clock it has taken (the same under s >= 1; under s = 0 the parameters are
published only when every worker's clock is in, `publish_clocks` updates the rest), the newest
its snapshot covers (acknowledged: the worker may drop the deltas it keeps through it) and the
first clock it lacks (the worker re-sends from there). A worker on the same node pushes without
a reply, reads the newest publication (`SharedView.read`) and adds its own deltas it lacks
(`ps_client.PSClient.read_shared`): Bösen's process cache, written by the server. The worker's
deltas take the opposite way: it writes each into one of two outbox files of its own
(`outbox_path`, a `SharedView` whose one clock is the delta's) and rings the shard's doorbell, a
FIFO (`doorbell_path`) that the shard's event loop reads, with 16 bytes (worker, clock): a push
is no Ray call at all. A worker that waits for the bound blocks on a FIFO of its own
(`wake_path`), into which the shard writes a byte after each publication, so that waiting takes
no CPU from the workers that compute (four workers share two cores in the tests). A Ray actor
call costs 0.3-1 ms of the caller's time on a loaded 2-core node even without a payload or a
reply (inline, a LeNet-5 delta adds ~0.4 ms), against a few microseconds for a write to a pipe.

Consistency. A publication and a read hold an advisory lock on the file (``flock``: exclusive
to publish, shared to read). The lock orders them on every architecture (it is a system call)
and the kernel drops it when its holder dies. The sequence word is odd while a publication is
written: a shard killed in the middle leaves it odd, and readers find nothing until the
restarted shard publishes again. The file keeps its size and inode for the whole job, so the
maps of the readers stay valid across a shard's restart; the driver removes it at the end.

References:
  Ho et al., "More effective distributed ML via a stale synchronous parallel parameter
    server", NIPS 2013, sections 2-3 (the client cache); DESIGN.md, "SSP".
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
from typing import NamedTuple, Sequence

import numpy as np

from pdcnno_jax.parallel.ray_engine import transport

# 'pdcsview' in ASCII: a file of another kind (or of an older layout) is never read as a view.
_MAGIC = 0x7064637376696577
_HEADER_WORDS = 5  # magic, sequence, number of workers, total bytes, layout fingerprint.
_ALIGN = 64


# Per worker: applied (in the buffers), received, acknowledged, resend-from clocks.
_CLOCK_VECTORS = 4


class Clocks(NamedTuple):
  """The clock vectors of a publication (copies), one entry per worker.

  Attributes:
    applied: the newest clock in the published parameters (-1: none).
    received: the newest clock the shard has taken (>= ``applied``).
    acked: the newest clock the shard's snapshot covers.
    resend_from: the first clock to send again (-1: none missing).
  """
  applied: np.ndarray
  received: np.ndarray
  acked: np.ndarray
  resend_from: np.ndarray


class Publication(NamedTuple):
  """One read of a shard's publication (copies).

  Attributes:
    buffers: the packed parameter buffers (`transport.FlatLayout`).
    applied, received, acked, resend_from: as in `Clocks`.
  """
  buffers: list[np.ndarray]
  applied: np.ndarray
  received: np.ndarray
  acked: np.ndarray
  resend_from: np.ndarray


def _offsets(layout: transport.FlatLayout, num_workers: int) -> tuple[list[int], int]:
  """Byte offset of each buffer (cache-line aligned) and the file's size."""
  offset = 8 * (_HEADER_WORDS + _CLOCK_VECTORS * num_workers)
  offsets = []
  for size, dtype in zip(layout.buffer_sizes, layout.buffer_dtypes):
    offset = -(-offset // _ALIGN) * _ALIGN
    offsets.append(offset)
    offset += size * dtype.itemsize
  return offsets, max(offset, 8 * _HEADER_WORDS)


def _fingerprint(layout: transport.FlatLayout) -> int:
  """63 bits of a hash of the buffers' sizes and dtypes."""
  text = repr([(n, d.str) for n, d in zip(layout.buffer_sizes, layout.buffer_dtypes)])
  return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], 'little') >> 1


def default_path(workdir: str, shard: int) -> str:
  """The file of ``shard`` of the job in ``workdir``: one per workdir, so a rerun reuses it.

  In ``/dev/shm`` (memory, never written back to disk) where the node has it, else in the
  temporary directory.
  """
  digest = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]
  root = '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else (
      tempfile.gettempdir())
  return os.path.join(root, f'pdcnno_ssp_{digest}_shard{shard}')


def outbox_path(publication: str, worker: int, slot: int) -> str:
  """The file of ``worker``'s outbox slot ``slot`` next to the shard's ``publication``."""
  return f'{publication}_worker{worker}_slot{slot}'


def doorbell_path(publication: str) -> str:
  """The FIFO through which workers announce their outbox deltas to the shard."""
  return f'{publication}_doorbell'


def wake_path(publication: str, worker: int) -> str:
  """The FIFO through which the shard wakes ``worker`` after each publication."""
  return f'{publication}_wake{worker}'


def open_fifo(path: str, *, reader: bool) -> int:
  """A non-blocking end of the FIFO at ``path`` (a reader creates it if it is missing).

  Raises:
    OSError: a writer's FIFO has no reader (ENXIO) or does not exist.
  """
  if reader and not os.path.exists(path):
    os.mkfifo(path, 0o600)
  return os.open(path, (os.O_RDONLY if reader else os.O_WRONLY) | os.O_NONBLOCK)


class SharedView:
  """The shared-memory publication of one shard's packed buffers and applied clocks.

  Args:
    path: the file (`default_path`).
    layout: how the shard packs its leaves (`transport.FlatLayout`).
    num_workers: workers of the job (the length of the applied-clock vector).
    writer: the shard's side: create the file (or reopen it at its size after a restart)
      and map it writable; False: a worker's read-only map of an existing file.

  Raises:
    FileNotFoundError: a reader's file does not exist.
    ValueError: the file was written for another layout or number of workers.
  """

  def __init__(self, path: str, layout: transport.FlatLayout, num_workers: int, *,
               writer: bool):
    self.path = path
    self.writer = writer
    self.num_workers = int(num_workers)
    offsets, size = _offsets(layout, self.num_workers)
    self._fd = os.open(path, (os.O_RDWR | os.O_CREAT) if writer else os.O_RDONLY, 0o600)
    try:
      if writer:
        if os.fstat(self._fd).st_size != size:
          os.ftruncate(self._fd, size)
      elif os.fstat(self._fd).st_size != size:
        raise ValueError(f'SharedView {path}: {os.fstat(self._fd).st_size} bytes, expected '
                         f'{size} for this layout and {num_workers} workers (a file of '
                         'another job?).')
      self._map = mmap.mmap(self._fd, size,
                            prot=mmap.PROT_READ | (mmap.PROT_WRITE if writer else 0))
    except BaseException:
      os.close(self._fd)
      raise
    self.nbytes = layout.nbytes()
    self._header = np.frombuffer(self._map, np.int64, _HEADER_WORDS, 0)
    self._clocks = np.frombuffer(self._map, np.int64, _CLOCK_VECTORS * self.num_workers,
                                 8 * _HEADER_WORDS).reshape(_CLOCK_VECTORS, self.num_workers)
    self._buffers = [np.frombuffer(self._map, dtype, n, offset)
                     for n, dtype, offset in zip(layout.buffer_sizes, layout.buffer_dtypes,
                                                 offsets)]
    expected = (_MAGIC, self.num_workers, size, _fingerprint(layout))
    found = (int(self._header[0]),) + tuple(int(x) for x in self._header[2:])
    if writer and found != expected:
      self._header[:] = (_MAGIC, 0) + expected[1:]  # Nothing published yet.
    elif not writer and found != expected:
      self.close()
      raise ValueError(f'SharedView {path}: written for {found[1]} workers and layout '
                       f'{found[3]:x}, expected {num_workers} workers and layout '
                       f'{expected[3]:x} (a file of another job?).')

  def publish(self, buffers: Sequence[np.ndarray], applied: np.ndarray, received: np.ndarray,
              acked: np.ndarray, resend_from: np.ndarray) -> None:
    """Writes the arguments as the newest publication (the shard's side; see `Publication`)."""
    self._write(buffers, (applied, received, acked, resend_from))

  def publish_clocks(self, received: np.ndarray, acked: np.ndarray,
                     resend_from: np.ndarray) -> None:
    """Updates all but the parameters and their ``applied`` clocks (a full `publish` first)."""
    self._write(None, (None, received, acked, resend_from))

  def _write(self, buffers, vectors) -> None:
    if not self.writer:
      raise RuntimeError(f'SharedView {self.path}: a reader cannot publish.')
    fcntl.flock(self._fd, fcntl.LOCK_EX)
    try:
      # Odd while written (already odd after a writer that died writing): a writer that dies
      # here leaves it odd.
      self._header[1] |= 1
      for target, vector in zip(self._clocks, vectors):
        if vector is not None:
          target[:] = vector
      for target, source in zip(self._buffers, buffers or ()):
        np.copyto(target, source)
      self._header[1] += 1
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)

  def clocks(self) -> Clocks | None:
    """Only the clock vectors of the newest publication (a few bytes); None as `read`."""
    return self._copy(with_buffers=False)

  def read(self) -> Publication | None:
    """A copy of the newest publication; None if there is none.

    None too while the publication is torn (its writer died writing it) until the next one.
    """
    return self._copy(with_buffers=True)

  def _copy(self, with_buffers: bool) -> Clocks | Publication | None:
    fcntl.flock(self._fd, fcntl.LOCK_SH)
    try:
      sequence = int(self._header[1])
      if self._header[0] != _MAGIC or sequence == 0 or sequence % 2:
        return None
      clocks = self._clocks.copy()
      if not with_buffers:
        return Clocks(*clocks)
      return Publication([np.array(b) for b in self._buffers], *clocks)
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)

  def close(self) -> None:
    """Unmaps the file (the arrays `read` returned are copies and stay valid)."""
    if self._fd < 0:
      return
    del self._header, self._clocks, self._buffers
    self._map.close()
    os.close(self._fd)
    self._fd = -1


def remove(path: str) -> None:
  """Deletes the file of a finished job (mapped views stay valid until they are closed)."""
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
