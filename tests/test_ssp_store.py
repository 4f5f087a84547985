"""Store semantics: InMemoryStore, and the JAX-version checks of the coordination store.

The same contract is checked against the coordination service itself by
tests/test_ssp_processes.py (tests/ssp_workers/ssp_process_worker.py).
"""

import threading
import time

import pytest

from pdcnno_jax.parallel import ssp
from pdcnno_jax.parallel.ssp import coordination


def test_write_once_overwrite_and_try_get():
  store = ssp.InMemoryStore()
  store.set('a/1', b'x')
  with pytest.raises(ssp.KeyExistsError, match='write-once'):
    store.set('a/1', b'y')
  store.set('a/1', b'y', overwrite=True)
  assert store.try_get('a/1') == b'y'
  assert store.try_get('a/2') is None
  with pytest.raises(ValueError, match='trailing'):
    store.set('a/', b'x')


def test_blocking_get_wakes_up_and_times_out():
  store = ssp.InMemoryStore()
  threading.Timer(0.05, lambda: store.set('late', b'v')).start()
  assert store.get('late', timeout_s=10.0) == b'v'
  with pytest.raises(ssp.StoreTimeoutError, match="'never'"):
    store.get('never', timeout_s=0.05)


def test_directories_are_prefixes_with_a_slash():
  store = ssp.InMemoryStore()
  for key in ('a/b/2', 'a/b/1', 'a/bc', 'a/b'):
    store.set(key, key.encode())
  assert store.dir_get('a/b') == [('a/b/1', b'a/b/1'), ('a/b/2', b'a/b/2')]
  store.delete('a/b')  # The key and its directory.
  assert store.dir_get('a') == [('a/bc', b'a/bc')]
  store.delete('missing')
  assert len(store) == 1


def test_barrier_releases_all_and_times_out():
  store = ssp.InMemoryStore()
  released = []

  def arrive(i):
    store.barrier('b', 10.0, [0, 1, 2])
    released.append(i)

  threads = [threading.Thread(target=arrive, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  time.sleep(0.05)
  assert not released
  arrive(2)
  for t in threads:
    t.join(10)
  assert sorted(released) == [0, 1, 2]
  with pytest.raises(ssp.StoreTimeoutError, match='1 of 2'):
    store.barrier('lonely', 0.05, [0, 1])
  with pytest.raises(ValueError, match='same list'):
    store.barrier('lonely', 0.05, [0, 2])


def test_coordination_store_needs_initialized_runtime():
  with pytest.raises(RuntimeError, match='not initialised'):
    coordination.CoordinationStore()


def test_unsupported_jax_client_is_a_clear_error():

  class OldClient:

    def key_value_set(self, key, value):
      pass

  with pytest.raises(coordination.UnsupportedJaxError,
                     match='blocking_key_value_get_bytes'):
    coordination.check_supported_jax(OldClient())
  coordination.check_supported_jax()  # The installed JAX is supported.
