"""The registry of initialisation methods (``config.init.method``) and search spaces.

``he`` keeps the model's own initial draw; ``ifas`` (glowworm swarm with information-sharing
search, MR-FPDCNN Section 2.2) and ``gso`` (the same swarm without ISS) search starting
weights in ``ifas.py``; ``lsuv`` (Mishkin and Matas 2016) scales each layer to unit output
variance in ``lsuv.py``. Every module exposes ``num_batches_needed(init_config)`` and
``initialize(init_config, graphdef, state, batches, preprocess, mesh, key)``.
"""

from __future__ import annotations

from types import ModuleType

from pdcnno_jax.init import ifas
from pdcnno_jax.init import lsuv

SWARM_METHODS = ifas.SWARM_METHODS
SEARCH_SPACES = ifas.SEARCH_SPACES
METHODS = ('he',) + SWARM_METHODS + ('lsuv',)


def module_for(method: str) -> ModuleType:
  """The module whose ``initialize`` runs ``config.init.method=method``.

  Raises:
    ValueError: ``method`` is not one of ``METHODS``.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown config.init.method={method!r}; choose from {METHODS}.')
  return lsuv if method == 'lsuv' else ifas
