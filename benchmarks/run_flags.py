"""absl flags shared by the benchmarks that train through the trainer and tabulate runs."""

from __future__ import annotations

import os

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATA_DIR = flags.DEFINE_string('data_dir', os.path.join(REPO, 'data', 'tfds'),
                               'TFDS data_dir holding fashion_mnist.')
SEED = flags.DEFINE_integer('seed', 0, 'Experiment seed (same for every run).')
WORKDIR_ROOT = flags.DEFINE_string('workdir_root', None,
                                   'Parent of the per-run workdirs (default: a new /tmp dir).')
SAVE_JSON = flags.DEFINE_string('save_json', None, 'Write the table here as JSON.')
