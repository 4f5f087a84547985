"""The embedded Ray cluster runs on the loopback address only."""

import subprocess

import pytest

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
  ss = subprocess.run(['ss', '-tn', 'state', 'established'], capture_output=True, text=True,
                      check=False)
  if ss.returncode != 0:
    pytest.skip('ss is not available')
  peers = [line.split()[-1] for line in ss.stdout.splitlines()[1:] if line.strip()]
  outside = [p for p in peers if not p.rsplit(':', 1)[0].strip('[]').endswith('127.0.0.1')
             and not p.startswith('[::1]')]
  assert not outside, f'connections outside loopback: {outside}'


def test_start_is_idempotent(ray_session):
  assert runtime.start(config_testing.default_config()) is ray_session
