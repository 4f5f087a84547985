"""Test session setup: CPU only, 8 fake devices for the multi-device tests.

XLA reads XLA_FLAGS when the backend starts, so it must be set before anything imports JAX
and initialises devices. Tests that need exactly one device build a one-device mesh.
"""

import os

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@pytest.fixture(name='ray_session', scope='module')
def fixture_ray_session():
  """The embedded Ray cluster (`runtime.start` imports Ray: its loopback switch is read then)."""
  from pdcnno_jax.parallel.ray_engine import runtime  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import config as config_testing  # pylint: disable=g-import-not-at-top
  try:
    ray = runtime.start(config_testing.default_config())
  except runtime.RayUnavailableError as e:
    pytest.skip(str(e))
  yield ray
  runtime.stop()
