"""Stale synchronous parallel training over a key-value store.

Modules, one job each:
  store.py          `Store` interface (write-once keys, blocking get with a
                    timeout, directory reads, deletes, barriers) and
                    `InMemoryStore` for tests.
  coordination.py   `CoordinationStore` over the key-value store of JAX's
                    distributed runtime; `initialize` (heartbeats,
                    recoverability) and `shutdown` (process 0 last). The only
                    module that touches JAX's private client.
  serialization.py  pytrees of arrays <-> bytes without pickle.
  liveness.py       heartbeat leases: which workers are alive.
  protocol.py       `SSPWorker`: the SSP clock protocol (Ho et al. 2013).

Usage (one process per worker; see protocol.py for the full loop):

  from pdcnno_jax.parallel import ssp
  from pdcnno_jax.parallel.ssp import coordination
  coordination.initialize(address, num_processes, process_id,
                          heartbeat_timeout_s=10, recoverable=True)
  store = coordination.CoordinationStore()
  worker = ssp.SSPWorker(store, process_id, num_processes, staleness=2,
                         timeout_s=120, like=params)
  ...
  coordination.shutdown(store)

References:
  DESIGN.md, "SSP"; delay_sync_parallel.txt; Ho et al., NIPS 2013.
"""

from pdcnno_jax.parallel.ssp.protocol import JoinResult
from pdcnno_jax.parallel.ssp.protocol import SSPStateError
from pdcnno_jax.parallel.ssp.protocol import SSPStats
from pdcnno_jax.parallel.ssp.protocol import SSPTimeoutError
from pdcnno_jax.parallel.ssp.protocol import SSPWorker
from pdcnno_jax.parallel.ssp.protocol import sum_updates
from pdcnno_jax.parallel.ssp.protocol import Update
from pdcnno_jax.parallel.ssp.store import InMemoryStore
from pdcnno_jax.parallel.ssp.store import KeyExistsError
from pdcnno_jax.parallel.ssp.store import Store
from pdcnno_jax.parallel.ssp.store import StoreError
from pdcnno_jax.parallel.ssp.store import StoreTimeoutError
