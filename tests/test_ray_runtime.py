"""The embedded Ray cluster runs on the loopback address only."""

import ipaddress

import psutil

from pdcnno_jax.parallel.ray_engine import runtime
from pdcnno_jax.testing import config as config_testing


def test_embedded_node_is_loopback(ray_session):
  assert runtime.node_address() == '127.0.0.1'
  assert ray_session.get_runtime_context().gcs_address.startswith('127.0.0.1:')


def test_actor_connections_are_loopback(ray_session):

  @ray_session.remote(num_cpus=1)
  class Echo:

    def size(self, array):
      return array.nbytes

  import numpy as np  # pylint: disable=g-import-not-at-top
  assert ray_session.get(Echo.remote().size.remote(np.zeros(1 << 16, np.float32))) == 1 << 18
  # Every TCP connection of this driver and of the Ray processes it started (GCS, raylet,
  # workers: its descendants), whatever else the machine is connected to.
  processes = [psutil.Process()] + psutil.Process().children(recursive=True)
  peers = []
  for process in processes:
    try:
      peers += [c.raddr.ip for c in process.net_connections(kind='tcp')
                if c.status == psutil.CONN_ESTABLISHED and c.raddr]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      continue
  assert peers, 'no connection of the Ray processes was seen'
  outside = [ip for ip in peers if not ipaddress.ip_address(ip.removeprefix('::ffff:')).is_loopback]
  assert not outside, f'connections outside loopback: {outside}'


def test_start_is_idempotent(ray_session):
  assert runtime.start(config_testing.default_config()) is ray_session
