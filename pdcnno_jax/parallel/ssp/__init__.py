"""Stale synchronous parallel training over a key-value store.

Modules: ``store`` (the `Store` interface and `InMemoryStore`), ``coordination`` (a `Store`
over JAX's coordination service, the only module touching JAX's private client),
``serialization`` (pytrees <-> bytes without pickle), ``liveness`` (heartbeat leases),
``protocol`` (`SSPWorker`, the SSP clock protocol), ``worker_checkpoints``, ``report``,
``steps`` (the worker step both engines share) and ``training`` (the SSP training mode; with
``parallel.engine = 'ray'`` it hands the job to ``parallel/ray_engine/ssp_driver``).

References:
  DESIGN.md, "SSP"; papers/delay_sync_parallel.txt; Ho et al., NIPS 2013.
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
