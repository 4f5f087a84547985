"""Helpers shared by the tests and benchmarks: default configs, models, data, problems.

* `config.py`: configs/default.py and its sections with overrides, so that tests start
  from the complete defaults instead of partial ConfigDicts.
* `models.py`: quickly initialised models and synthetic learnable IDX data sets.
* `experiments.py`: a tiny learnable in-memory data set and its `Experiment` (mode tests).
* `problems.py`: unconstrained optimisation problems with known minimisers (CGMSE tests
  and benchmarks).
"""

from pdcnno_jax.testing.config import default_config, section
from pdcnno_jax.testing.models import make_idx_dataset, random_batch, random_model
from pdcnno_jax.testing.models import synthetic_images

__all__ = ['default_config', 'make_idx_dataset', 'random_batch', 'random_model', 'section',
           'synthetic_images']
