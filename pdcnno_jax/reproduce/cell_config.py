"""Config file of one reproduction cell: `--config=pdcnno_jax/reproduce/cell_config.py:PATH`.

PATH is the cell's `config.json` (the complete config the runner resolved from configs/*.py
and the grid's overrides), so that the cell runs through `pdcnno_jax.main` like any experiment.
"""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
  """The config stored at ``path``."""
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
