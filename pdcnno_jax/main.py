"""Command-line entry point.

  python -m pdcnno_jax.main --config=configs/default.py --workdir=workdirs/default \
      [--config.key=value ...] [--coordinator_address=host:port --num_processes=N \
      --process_id=i]

The workdir alone decides whether to resume: rerunning the same command after a kill
continues from the newest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pdcnno_jax import config_validation, distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py) with get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, '
                               'report.json); resumes if it holds a checkpoint.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 'auto: join a job when --coordinator_address is given or '
                                 'Slurm/TPU is detected.')
flags.mark_flags_as_required(['config', 'workdir'])


class _DropLibraryChatter(logging.logging.Filter):
  """Drops orbax's per-save INFO lines so the progress line stays readable."""

  def filter(self, record):
    return record.levelno > logging.logging.INFO or '/orbax/' not in record.pathname


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  ssp = config.parallel.mode == 'ssp'  # Workers that may die and rejoin: recoverable runtime.
  joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  mode=_DISTRIBUTED.value, recoverable=ssp,
                                  heartbeat_timeout_s=config.parallel.runtime_heartbeat_timeout_s)
  config_validation.validate(config)
  # Imported after distributed initialisation: importing TF/tfds first is harmless, but
  # keeping JAX device use after initialize() is the documented order.
  from pdcnno_jax import experiment  # pylint: disable=g-import-not-at-top
  report = experiment.train_and_evaluate(config, _WORKDIR.value)
  if joined and ssp:  # With recoverability, process 0 must leave last.
    from pdcnno_jax.parallel.ssp import coordination  # pylint: disable=g-import-not-at-top
    coordination.shutdown(coordination.CoordinationStore())
  logging.info('Report written to %s', os.path.join(_WORKDIR.value, 'report.json'))
  print(f'test_accuracy={report["test"]["accuracy"]:.4f} '
        f'test_loss={report["test"]["loss"]:.4f} workdir={_WORKDIR.value}', flush=True)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports an unknown ``--config.key`` as a ConfigError."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such field.
    raise config_validation.ConfigError(config_validation.unknown_key_message(e)) from None


def run() -> None:
  """Console entry point that turns config errors into one clear line, not a traceback."""
  # Errors whose message says what is wrong and how to fix it: no traceback.
  from pdcnno_jax.data.datasets import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.loop.checks import NonFiniteLossError  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, flags_parser=_parse_flags)
  except config_validation.ConfigError as e:
    print(f'Config error: {e}', file=sys.stderr)
    sys.exit(2)
  except DatasetNotFoundError as e:
    print(f'Data error: {e}', file=sys.stderr)
    sys.exit(3)
  except NonFiniteLossError as e:
    print(f'Training diverged: {e}', file=sys.stderr)
    sys.exit(4)


if __name__ == '__main__':
  run()
