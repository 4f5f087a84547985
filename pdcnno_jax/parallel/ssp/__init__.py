"""Stale synchronous parallel training over a key-value store."""

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
