"""Transfer accounting of the Ray modes (no Ray needed)."""

import numpy as np
import pytest

from pdcnno_jax.parallel.ray_engine import transport
from pdcnno_jax.parallel.ssp import serialization


def test_payload_nbytes_counts_every_leaf():
  tree = {'a': np.zeros((3, 4), np.float32), 'b': [np.zeros(5, np.int8), (np.ones(2),)]}
  assert serialization.payload_nbytes(tree) == 48 + 5 + 16


def test_job_transport_sums_workers_and_keeps_each():
  first, second = transport.TransferLog(), transport.TransferLog()
  first.record(sent=2**20, received=3 * 2**20, seconds=0.5)
  second.record(sent=2**20, seconds=0.25)
  second.record(received=2**20, seconds=0.25)
  job = transport.job_transport([first, second])
  assert job['bytes_sent'] == 2 * 2**20 and job['bytes_received'] == 4 * 2**20
  assert job['transfer_seconds'] == pytest.approx(1.0)
  assert job['mib_per_s'] == pytest.approx(6.0)
  assert job['transfers'] == 3
  assert [w['transfers'] for w in job['workers']] == [1, 2]
  assert job['workers'][0]['mib_per_s'] == pytest.approx(8.0)


def test_timed_records_the_body():
  log = transport.TransferLog()
  with log.timed(sent=10):
    pass
  assert log.bytes_sent == 10 and log.transfers == 1 and log.transfer_seconds >= 0.0
  assert transport.TransferLog().as_dict()['mib_per_s'] is None


def test_flat_layout_packs_one_buffer_per_dtype_and_unpacks_views():
  rng = np.random.default_rng(0)
  leaves = [rng.standard_normal((3, 4)).astype(np.float32), np.arange(5, dtype=np.int32),
            np.float32(2.5) * np.ones((), np.float32), rng.standard_normal(7).astype(np.float32)]
  layout = transport.FlatLayout(leaves)
  buffers = layout.pack(leaves)
  assert [(b.dtype, b.shape) for b in buffers] == [(np.float32, (20,)), (np.int32, (5,))]
  assert layout.nbytes() == sum(x.nbytes for x in leaves)
  back = layout.unpack(buffers)
  for got, want in zip(back, leaves):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert any(np.shares_memory(got, b) for b in buffers)  # A view, not a copy.
  with pytest.raises(ValueError, match=r'array 1 is int64\[5\]'):
    layout.pack([leaves[0], np.arange(5), leaves[2], leaves[3]])
  with pytest.raises(ValueError, match='3 arrays for a layout of 4'):
    layout.pack(leaves[:3])


def test_flat_layout_sends_large_leaves_alone_without_a_copy():
  leaves = [np.ones(4, np.float32), np.arange(64, dtype=np.float32).reshape(8, 8),
            np.zeros(3, np.float32)]
  layout = transport.FlatLayout(leaves, alone_from_bytes=256)  # The 8x8 leaf is 256 bytes.
  buffers = layout.pack(leaves)
  assert [b.shape for b in buffers] == [(7,), (64,)]
  assert np.shares_memory(buffers[1], leaves[1])
  for got, want in zip(layout.unpack(buffers), leaves):
    np.testing.assert_array_equal(got, want)
