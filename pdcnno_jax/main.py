"""Command-line entry point.

  python -m pdcnno_jax.main --config=configs/default.py --workdir=workdirs/default \
      [--config.key=value ...] [--coordinator_address=host:port --num_processes=N \
      --process_id=i [--coordinator_bind_address=ip:port]] [--debug]

The workdir alone decides whether to resume: rerunning the same command after a kill
continues from the newest checkpoint. The config and the workdir are checked before JAX
starts or any data loads; every error is one line on stderr (``--debug``: the traceback).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from pdcnno_jax import config_validation, distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py) with get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, '
                               'report.json); resumes if it holds a checkpoint.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-process runs.')
_BIND = flags.DEFINE_string('coordinator_bind_address', None,
                            'ip:port process 0\'s coordination service listens on (default: '
                            '127.0.0.1 for a loopback --coordinator_address, else every '
                            'interface).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 'auto: join a job when --coordinator_address is given or '
                                 'Slurm/TPU is detected.')
flags.DEFINE_bool('debug', False, 'Show the traceback of an error instead of one line.')
flags.mark_flags_as_required(['config', 'workdir'])

# Exit codes of run(), by what went wrong.
EXIT_ERROR, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED = 1, 2, 3, 4


class _DropLibraryChatter(logging.logging.Filter):
  """Drops orbax's per-save INFO lines so the progress line stays readable."""

  def filter(self, record):
    return record.levelno > logging.logging.INFO or '/orbax/' not in record.pathname


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # A config file that failed to load leaves a placeholder that raises on use.
      config.parallel  # pylint: disable=pointless-statement
    except Exception as e:  # pylint: disable=broad-except
      raise config_validation.ConfigError(flag_error_message(e, sys.argv)) from e
  workdir = _WORKDIR.value
  config_validation.preflight(config, workdir)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         mode=_DISTRIBUTED.value,
                         heartbeat_timeout_s=config.parallel.runtime_heartbeat_timeout_s,
                         bind_address=_BIND.value)
  import jax  # pylint: disable=g-import-not-at-top
  config_validation.check_devices(config, jax.device_count(), jax.process_count())
  from pdcnno_jax import experiment  # pylint: disable=g-import-not-at-top
  report = experiment.train_and_evaluate(config, workdir)
  logging.info('Report written to %s', os.path.join(workdir, 'report.json'))
  print(f'test_accuracy={report["test"]["accuracy"]:.4f} '
        f'test_loss={report["test"]["loss"]:.4f} workdir={workdir}', flush=True)


def _config_path(argv: list[str]) -> str:
  return next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '?')


def flag_error_message(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing the flags (and loading the config file)."""
  path = _config_path(argv)
  text = str(error)
  if isinstance(error, flags.IllegalFlagValueError):
    match = re.match(r'flag --(config\.[\w.]+)=(.*?): (.*)', text, re.S)
    if match:
      key, value, reason = match.groups()
      return (f'--{key}={value}: {reason.splitlines()[0]}; give a value of the type '
              f'{key} has in configs/default.py.')
    return text.splitlines()[0]
  if isinstance(error, flags.Error):
    return text.splitlines()[0]
  if isinstance(error, SyntaxError):
    return (f'config file {error.filename or path} line {error.lineno}: {error.msg}; '
            'fix the file.')
  if isinstance(error, OSError) and not os.path.isfile(path):
    return f'config file {path} does not exist (--config); pass e.g. configs/default.py.'
  if isinstance(error, AttributeError) and 'get_config' in text:
    return f'config file {path} has no get_config() function.'
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: no such field.
    return config_validation.unknown_key_message(error)
  return f'config file {path} failed to load: {type(error).__name__}: {text.splitlines()[0]}'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports every flag or config-file problem as a ConfigError."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if '--debug' in argv:
      raise
    raise config_validation.ConfigError(flag_error_message(e, argv)) from None


def error_lines(error: Exception) -> tuple[int, list[str]]:
  """``(exit code, lines for stderr)`` of an error that ended the run."""
  # Errors whose message says what is wrong and how to fix it. Their modules are looked up,
  # not imported: an error from a module that was never imported cannot be one of them.
  datasets = sys.modules.get('pdcnno_jax.data.datasets')
  checks = sys.modules.get('pdcnno_jax.loop.checks')
  collapse = sys.modules.get('pdcnno_jax.diagnostics.collapse')
  checkpointing = sys.modules.get('pdcnno_jax.train.checkpointing')
  ray_exceptions = sys.modules.get('ray.exceptions')
  while (ray_exceptions and isinstance(error, ray_exceptions.RayTaskError)
         and isinstance(error.cause, Exception)):
    error = error.cause  # What a Ray worker actor raised, without Ray's wrapping traceback.
  if isinstance(error, config_validation.ConfigError):
    return EXIT_CONFIG, [f'Config error: {line}' for line in error.problems]
  if isinstance(error, config_validation.WorkdirError):
    return EXIT_CONFIG, [f'Workdir error: {error}']
  if datasets and isinstance(error, (datasets.DatasetNotFoundError,
                                     datasets.DatasetCorruptError)):
    return EXIT_DATA, [f'Data error: {error}']  # Its message's further lines give the fix.
  if checks and isinstance(error, checks.DivergedError):
    return EXIT_DIVERGED, [f'Training diverged: {error}']
  if collapse and isinstance(error, collapse.TrainingCollapseError):
    return EXIT_DIVERGED, [f'Training collapsed: {error}']
  if checkpointing and isinstance(error, (checkpointing.CheckpointWriteError,
                                          checkpointing.NoIntactCheckpointError,
                                          checkpointing.CheckpointMismatchError)):
    return EXIT_ERROR, [f'Checkpoint error: {error}']
  text = str(error).strip()
  return EXIT_ERROR, [f'Error: {type(error).__name__}: {text.splitlines()[0] if text else ""} '
                      '(run with --debug for the traceback)']


def run() -> None:
  """Console entry point: a failure is one line on stderr and an exit code (no traceback).

  In a multi-process job the exit skips JAX's exit barrier, which after a failure waits for
  peers that may be gone and then aborts with a C++ stack trace.
  """
  try:
    app.run(main, flags_parser=_parse_flags)
  except Exception as e:  # pylint: disable=broad-except
    if '--debug' in sys.argv or '--debug=true' in sys.argv:
      raise
    code, lines = error_lines(e)
    for line in lines:
      print(line, file=sys.stderr, flush=True)
    if 'jax' in sys.modules and sys.modules['jax'].distributed.is_initialized():
      sys.stdout.flush()
      os._exit(code)
    sys.exit(code)


if __name__ == '__main__':
  run()
