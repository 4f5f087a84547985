"""The shared-memory publication of a PS shard: round trip, torn writes, restarts, races."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pdcnno_jax.parallel.ray_engine import shared_view
from pdcnno_jax.parallel.ray_engine import transport

_WORKERS = 3


def _layout():
  # Two small float32 leaves packed together, one int32 leaf, one leaf large enough to be alone.
  return transport.FlatLayout([np.zeros((2, 3), np.float32), np.zeros(5, np.int32),
                               np.zeros(4, np.float32), np.zeros(2**18 + 1, np.float32)])


def _buffers(layout, value):
  return [np.full(n, value, dtype) for n, dtype in zip(layout.buffer_sizes, layout.buffer_dtypes)]


def test_a_publication_reads_back_as_copies(tmp_path):
  layout, path = _layout(), str(tmp_path / 'view')
  writer = shared_view.SharedView(path, layout, _WORKERS, writer=True)
  reader = shared_view.SharedView(path, layout, _WORKERS, writer=False)
  assert reader.read() is None  # Nothing published yet.
  writer.publish(_buffers(layout, 7), np.array([3, 1, 2]), np.array([3, 2, 2]),
                 np.array([2, 0, -1]), np.array([-1, -1, 1]))
  buffers, applied, received, acked, resend_from = reader.read()
  assert [b.dtype for b in buffers] == layout.buffer_dtypes
  assert [b.size for b in buffers] == layout.buffer_sizes
  assert all((b == 7).all() for b in buffers)
  assert applied.tolist() == [3, 1, 2]
  assert received.tolist() == [3, 2, 2]
  assert acked.tolist() == [2, 0, -1]
  assert resend_from.tolist() == [-1, -1, 1]
  buffers[0][:] = -1  # A copy: neither the file nor the next read changes.
  assert (reader.read().buffers[0] == 7).all()
  assert reader.nbytes == layout.nbytes()
  # The clocks alone (s = 0 between two publications of the parameters).
  writer.publish_clocks(np.array([4, 2, 3]), np.array([3, 0, -1]), np.array([-1, 0, -1]))
  view = reader.read()
  assert all((b == 7).all() for b in view.buffers) and view.applied.tolist() == [3, 1, 2]
  assert view.received.tolist() == [4, 2, 3] and view.resend_from.tolist() == [-1, 0, -1]
  np.testing.assert_array_equal(reader.clocks(), [view.applied, view.received, view.acked,
                                                   view.resend_from])
  with pytest.raises(RuntimeError, match='a reader cannot publish'):
    reader.publish(_buffers(layout, 0), *np.zeros((4, _WORKERS)))
  reader.close()
  writer.close()
  shared_view.remove(path)
  assert not os.path.exists(path)
  shared_view.remove(path)  # Removing twice is harmless.


def test_a_torn_publication_reads_as_none_until_the_next_one(tmp_path):
  layout, path = _layout(), str(tmp_path / 'view')
  writer = shared_view.SharedView(path, layout, _WORKERS, writer=True)
  writer.publish(_buffers(layout, 1), *np.zeros((4, _WORKERS), np.int64))
  writer._header[1] |= 1  # pylint: disable=protected-access  # As a writer that died writing.
  writer.close()
  reader = shared_view.SharedView(path, layout, _WORKERS, writer=False)
  assert reader.read() is None
  # The restarted shard reopens the same file (same inode: the reader's map stays valid).
  restarted = shared_view.SharedView(path, layout, _WORKERS, writer=True)
  assert reader.read() is None
  restarted.publish(_buffers(layout, 2), np.array([5, 5, 4]), *np.zeros((3, _WORKERS)))
  view = reader.read()
  assert all((b == 2).all() for b in view.buffers) and view.applied.tolist() == [5, 5, 4]


def test_a_file_of_another_shape_or_none_is_a_clear_error(tmp_path):
  layout, path = _layout(), str(tmp_path / 'view')
  with pytest.raises(FileNotFoundError):
    shared_view.SharedView(path, layout, _WORKERS, writer=False)
  shared_view.SharedView(path, layout, _WORKERS, writer=True)
  with pytest.raises(ValueError, match='4 workers .*a file of another job'):
    shared_view.SharedView(path, layout, _WORKERS + 1, writer=False)
  # Same bytes and offsets, another dtype: only the layout's fingerprint tells.
  other = transport.FlatLayout([np.zeros((2, 3), np.float32), np.zeros(5, np.uint32),
                                np.zeros(4, np.float32), np.zeros(2**18 + 1, np.float32)])
  with pytest.raises(ValueError, match='written for 3 workers and layout .* another job'):
    shared_view.SharedView(path, other, _WORKERS, writer=False)


def test_the_default_path_is_one_per_workdir_and_shard(tmp_path):
  a = shared_view.default_path(str(tmp_path / 'a'), 0)
  assert a == shared_view.default_path(str(tmp_path / 'a'), 0)
  assert len({a, shared_view.default_path(str(tmp_path / 'a'), 1),
              shared_view.default_path(str(tmp_path / 'b'), 0)}) == 3
  if os.path.isdir('/dev/shm'):
    assert a.startswith('/dev/shm/')


def test_reads_racing_a_writer_process_never_see_a_mixed_publication(tmp_path):
  """A separate process publishes 400 states, each all k; every read is one state whole."""
  layout, path = _layout(), str(tmp_path / 'view')
  shared_view.SharedView(path, layout, _WORKERS, writer=True).close()
  reader = shared_view.SharedView(path, layout, _WORKERS, writer=False)
  script = textwrap.dedent(f"""
      import numpy as np
      from pdcnno_jax.parallel.ray_engine import shared_view
      from pdcnno_jax.parallel.ray_engine import transport
      layout = transport.FlatLayout([np.zeros((2, 3), np.float32), np.zeros(5, np.int32),
                                     np.zeros(4, np.float32), np.zeros(2**18 + 1, np.float32)])
      writer = shared_view.SharedView({path!r}, layout, {_WORKERS}, writer=True)
      for k in range(1, 401):
        writer.publish([np.full(n, k, d) for n, d in zip(layout.buffer_sizes,
                                                        layout.buffer_dtypes)],
                       *np.full((4, {_WORKERS}), k))
      """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
  writer = subprocess.Popen([sys.executable, '-c', script], env=env)
  seen = set()
  while True:
    running = writer.poll() is None
    view = reader.read()
    if view is not None:
      buffers, *clocks = view
      k = int(clocks[0][0])
      assert (np.array(clocks) == k).all()
      for b in buffers:
        assert (b == k).all(), f'publication {k} mixed with another'
      seen.add(k)
    if not running:
      break
  assert writer.returncode == 0
  assert max(seen) == 400  # The read after the writer ended sees its last publication.
  assert len(seen) >= 2  # Reads interleaved with the writes: the check is not vacuous.
