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
