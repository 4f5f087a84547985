"""Checks an experiment config and its workdir before anything expensive happens.

`preflight(config, workdir)` runs every check that needs no data and no device: types and
ranges of every key, choices read from the registries that implement them (models, pruning,
init, balancers, modes, the optimizer factory), combinations, and what can be computed from
the architecture on an abstract model (``nnx.eval_shape``, no arrays): that the model fits
the images, that a ``global_macs`` pruning target is reachable with ``prune.min_channels``,
and the size of one checkpoint, which the workdir must have room for. `check_devices` adds
what needs the device count (after ``jax.distributed.initialize``).

Every problem is one line naming the key or path, what it holds and what would be valid.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import ml_collections


class ConfigError(ValueError):
  """An experiment config is invalid; ``problems`` holds one line per invalid entry."""

  def __init__(self, problems: str | list[str]):
    self.problems = [problems] if isinstance(problems, str) else list(problems)
    super().__init__('\n'.join(self.problems))


class WorkdirError(ValueError):
  """The workdir cannot hold the run (not a directory, not writable, too little space)."""


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_int(v) and v >= low), f'an integer >= {low}'


def _number(low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (_is_number(v) and (v > low if low_open else v >= low)
            and (v < high if high_open else v <= high))
  interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
  return ok, f'a number in {interval}'


_BOOL = ((lambda v: isinstance(v, bool)), 'True or False')
_OFF_OR_AT_LEAST_ONE = ((lambda v: _is_number(v) and (v == 0 or v >= 1)),
                        '0 (off) or a number >= 1')
_POSITIVE = _number(0.0, low_open=True)
_NON_NEGATIVE = _number(0.0)
_FRACTION = _number(0.0, 1.0, high_open=True)

# Key -> (predicate, what a valid value is). Keys a config lacks are skipped (the test checks
# that every key here exists in configs/default.py).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'seed': _int_at_least(0),
    'num_epochs': _POSITIVE,  # Fractions allowed: every mode rounds epochs x steps to steps.
    'log_every_steps': _int_at_least(1),
    'eval_every_epochs': _int_at_least(1),
    'checkpoint_every_steps': _int_at_least(1),
    'keep_checkpoints': _int_at_least(1),
    'max_steps': _int_at_least(0),
    'checkpoint_max_loss_ratio': _OFF_OR_AT_LEAST_ONE,
    'checkpoint_max_norm_ratio': _OFF_OR_AT_LEAST_ONE,
    'data.batch_size': _int_at_least(1),
    'data.eval_batch_size': _int_at_least(1),
    'data.validation_holdout': ((lambda v: _is_int(v)), 'an integer (< 0: the paper holdout)'),
    'data.image_size': _int_at_least(0),
    'data.imagenet_num_classes': _int_at_least(1),
    'data.in_memory': _BOOL,
    'data.download': _BOOL,
    'model.width_multiplier': _POSITIVE,
    'model.batch_norm': _BOOL,
    'model.dropout_rate': _FRACTION,
    'optimizer.learning_rate': _POSITIVE,
    'optimizer.momentum': _FRACTION,
    'optimizer.nesterov': _BOOL,
    'optimizer.weight_decay': _NON_NEGATIVE,
    'optimizer.warmup_epochs': _NON_NEGATIVE,
    'optimizer.grad_clip_norm': _NON_NEGATIVE,
    'optimizer.cg_t': _NON_NEGATIVE,
    'optimizer.max_linesearch_steps': _int_at_least(1),
    'optimizer.full_batch_iterations': _int_at_least(1),
    'optimizer.full_batch_chunk_size': _int_at_least(0),
    'init.swarm_size': _int_at_least(1),
    'init.generations': _int_at_least(0),
    'init.sgd_steps': _int_at_least(0),
    'init.sgd_learning_rate': _POSITIVE,
    'init.subspace_dim': _int_at_least(1),
    'init.log_scale_range': _POSITIVE,
    'init.swarm_chunk_size': _int_at_least(0),
    'prune.latency_step': _number(0.0, 1.0, low_open=True),
    'prune.pretrain_fraction': _number(0.0, 1.0, low_open=True),
    'prune.pretrain_epochs': _int_at_least(0),
    'prune.score_examples': _int_at_least(1),
    'prune.norm_order': _POSITIVE,
    'prune.threshold': _NON_NEGATIVE,
    'prune.ratio': _FRACTION,
    'prune.target_mac_reduction': _number(1.0),
    'prune.min_channels': _int_at_least(1),
    'prune.iterations': _int_at_least(1),
    'prune.finetune_epochs': _int_at_least(0),
    'prune.compact': _BOOL,
    'prune.target_speedup': _number(1.0),
    'prune.latency_repeats': _int_at_least(0),
    'prune.latency_measurements': _int_at_least(1),
    'prune.latency_confirmations': _int_at_least(0),
    'parallel.straggler_probability': _number(0.0, 1.0),
    'parallel.straggler_factor': _number(1.0),
    'parallel.num_blocks': _int_at_least(1),
    'parallel.rounds_per_epoch': _int_at_least(1),
    'parallel.lbrla_ceiling': _number(0.0, 1.0, low_open=True),
    'parallel.dlbpce_entropy_target': _number(0.0, 1.0, low_open=True),
    'parallel.staleness': ((lambda v: _is_int(v) and v >= -1),
                           'an integer >= 0, or -1 for no bound (ASP)'),
    'parallel.ssp_timeout_s': _POSITIVE,
    'parallel.ssp_prefetch': _BOOL,
    'parallel.ssp_shared_memory': _BOOL,
    'parallel.runtime_heartbeat_timeout_s': _number(1.0),
    # Speeds are measured on clocks 1 .. warmup - 1 (clock 0 may include first-touch costs).
    'parallel.ssp_warmup_steps': _int_at_least(2),
    'parallel.ssp_eval_every_steps': _int_at_least(0),
}


def choices() -> dict[str, tuple[str, ...]]:
  """Key -> valid values, read from the registry of each choice."""
  # pylint: disable=g-import-not-at-top
  from pdcnno_jax import modes
  from pdcnno_jax.data import datasets
  from pdcnno_jax.init import methods as init_methods
  from pdcnno_jax.models import conv, factory
  from pdcnno_jax.optim import cgmse
  from pdcnno_jax.optim import factory as optim_factory
  from pdcnno_jax.parallel import balancers
  from pdcnno_jax.parallel.ssp import training as ssp_training
  from pdcnno_jax.pruning import latency, selection, stage
  # pylint: enable=g-import-not-at-top
  found = {
      'data.name': tuple(datasets.SUPPORTED_DATASETS),
      'model.name': tuple(factory.MODEL_NAMES),
      'model.conv_gradients': tuple(conv.CONV_GRADIENTS),
      'init.method': tuple(init_methods.METHODS),
      'init.search_space': tuple(init_methods.SEARCH_SPACES),
      'prune.method': tuple(stage.METHODS),
      'prune.selection': tuple(selection.SELECTIONS),
      'prune.latency_target': tuple(latency.TARGETS),
      'parallel.balancer': tuple(balancers.BALANCERS),
      'parallel.ssp_batch_balancer': tuple(ssp_training.BATCH_BALANCERS),
      'parallel.mode': tuple(modes.MODES),
      'parallel.engine': tuple(modes.ENGINES),
      'optimizer.schedule': tuple(optim_factory.SCHEDULES),
      'optimizer.mode': tuple(cgmse.MODES),
  }
  return found


def _lookup(config: ml_collections.ConfigDict, dotted: str):
  """``config.<dotted>``, or KeyError if any part is missing."""
  value = config
  for part in dotted.split('.'):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      raise KeyError(dotted)
    value = value[part]
  return value


def _check_values(config: ml_collections.ConfigDict) -> list[str]:
  """Checks each key on its own: choices, types and ranges, the optimizer section."""
  from pdcnno_jax.optim import factory as optim_factory  # pylint: disable=g-import-not-at-top
  problems = []
  for key, valid in choices().items():
    try:
      value = _lookup(config, key)
    except KeyError:
      continue
    if value not in valid:
      problems.append(f'config.{key}={value!r} is not one of {valid}.')
  for key, (ok, what) in RULES.items():
    try:
      value = _lookup(config, key)
    except KeyError:
      continue
    if not ok(value):
      problems.append(f'config.{key}={value!r} must be {what}.')
  if any(p.startswith('config.optimizer.') for p in problems):
    return problems  # The optimizer can be built only from valid optimizer values.
  try:  # The factory knows which optax aliases exist.
    optim_factory.build_optimizer(config.optimizer, total_steps=100, steps_per_epoch=10)
  except (ValueError, TypeError) as e:
    problems.append(f'config.optimizer.name={config.optimizer.name!r}: {e}')
  return problems


def _check_combinations(config: ml_collections.ConfigDict) -> list[str]:
  """Checks between keys, and values with a syntax of their own."""
  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.data import datasets
  from pdcnno_jax.parallel import balancers
  # pylint: enable=g-import-not-at-top
  problems = []
  spec = datasets.get_spec(config.data.name)
  if spec.image_shape is None and config.data.image_size == 0:
    problems.append(f'config.data.image_size=0: {spec.name} images vary in size; set '
                    'config.data.image_size > 0 (e.g. 224).')
  if spec.name == 'imagenet2012' and config.data.imagenet_num_classes > spec.num_classes:
    problems.append(f'config.data.imagenet_num_classes={config.data.imagenet_num_classes} '
                    f'must be at most {spec.num_classes}.')
  slowdown = config.parallel.slowdown
  if slowdown and not re.fullmatch(r'\s*\d+(\.\d+)?(\s*,\s*\d+(\.\d+)?)*\s*', slowdown):
    problems.append(f"config.parallel.slowdown={slowdown!r} must be comma-separated "
                    "factors, e.g. '1,1,2,4'.")
  if config.parallel.mode == 'ssp' and config.parallel.engine == 'jax':
    problems.append('config.parallel.engine=jax with parallel.mode=ssp: SSP runs on the Ray '
                    'engine (one driver, parallel.num_workers actors); drop '
                    '--config.parallel.engine=jax.')
  if config.parallel.lbrla_weights:
    try:
      balancers.parse_lbrla_weights(config.parallel.lbrla_weights)
    except ValueError as e:
      problems.append(f'config.parallel.lbrla_weights={config.parallel.lbrla_weights!r}: {e}')
  return problems


def model_input(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
  """``(input_shape, num_classes)`` of the model ``config`` trains, from the data set spec."""
  from pdcnno_jax.data import datasets  # pylint: disable=g-import-not-at-top
  spec = datasets.get_spec(config.data.name)
  channels = spec.image_shape[-1] if spec.image_shape is not None else 3
  size = config.data.image_size
  shape = (size, size, channels) if size > 0 else tuple(spec.image_shape)
  num_classes = (config.data.imagenet_num_classes if spec.name == 'imagenet2012'
                 else spec.num_classes)
  return shape, num_classes


def abstract_model(config: ml_collections.ConfigDict):
  """The model of ``config`` as shapes only (``nnx.eval_shape``): no arrays, no device."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.models import factory  # pylint: disable=g-import-not-at-top
  shape, num_classes = model_input(config)
  return nnx.eval_shape(lambda: factory.build_model(
      config.model, num_classes=num_classes, input_shape=shape, rngs=nnx.Rngs(0)))


def max_mac_reduction(model, min_channels: int) -> float:
  """Dense MACs / MACs with every prunable layer at ``min_channels`` (the reachable limit).

  Uses the counting code of ``select_by_macs`` (models/counting.py); works on an abstract
  model.
  """
  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.models import counting
  from pdcnno_jax.pruning import masking
  # pylint: enable=g-import-not-at-top
  full = {s.name: s.out_channels for s in model.layer_specs() if s.out_mask_path is not None}
  floor = dict(full)
  for s in masking.prunable_specs(model):
    floor[s.name] = min(s.out_channels, min_channels)
  return counting.totals(model, full)['macs'] / counting.totals(model, floor)['macs']


def _check_architecture(config: ml_collections.ConfigDict) -> list[str]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  shape, num_classes = model_input(config)
  try:
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((2,) + shape), train=False),
                   state)
  except (ValueError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return [f'config.model.name={config.model.name!r} does not fit '
            f'config.data.name={config.data.name!r} images of shape {shape} ({first}).']
  prune = config.prune
  if prune.method != 'none' and prune.selection == 'global_macs':
    best = max_mac_reduction(model, prune.min_channels)
    if prune.target_mac_reduction > best:
      return [f'config.prune.target_mac_reduction={prune.target_mac_reduction} is out of '
              f'reach: with prune.min_channels={prune.min_channels}, '
              f'{config.model.name} can shrink at most {best:.3g}x; lower the target or '
              'min_channels.']
  return []


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` with one line per invalid entry of ``config`` (no data, no device)."""
  problems = _check_values(config)
  if not problems:  # Combinations and the architecture assume valid single values.
    problems = _check_combinations(config)
  if not problems:
    problems = _check_architecture(config)
  if problems:
    raise ConfigError(problems)


def checkpoint_bytes(config: ml_collections.ConfigDict) -> int:
  """Bytes of one training-state checkpoint (step, parameters, model state, optimizer state)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.optim import factory as optim_factory  # pylint: disable=g-import-not-at-top
  tx = optim_factory.build_optimizer(config.optimizer, total_steps=100, steps_per_epoch=10)
  model = abstract_model(config)
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  opt_state = jax.eval_shape(tx.init, params)
  leaves = jax.tree.leaves((jax.ShapeDtypeStruct((), 'int32'), params, model_state, opt_state))
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves if hasattr(x, 'dtype')))


def check_workdir(workdir: str, min_free_bytes: int = 0) -> None:
  """Raises `WorkdirError` unless ``workdir`` is (or can be made) a writable directory.

  Nothing is created: the deepest existing ancestor must be a directory that accepts a file
  and has ``min_free_bytes`` free.
  """
  if not workdir:
    raise WorkdirError('--workdir is empty; give a directory for checkpoints and metrics.')
  if '://' in workdir:  # Remote (e.g. gs://) workdirs are checked by their file system.
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory; choose another path.')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f'--workdir={workdir} cannot be created: {existing} is a file.')
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} is not writable ({existing}: {e.strerror}); '
                       'choose a writable directory.') from None
  free = shutil.disk_usage(existing).free
  if free < min_free_bytes:
    raise WorkdirError(f'--workdir={workdir}: {free / 2**20:.1f} MiB free on {existing}, '
                       f'one checkpoint needs {min_free_bytes / 2**20:.1f} MiB; free space or '
                       'choose another directory.')


def check_devices(config: ml_collections.ConfigDict, num_devices: int,
                  num_processes: int = 1) -> None:
  """Raises `ConfigError` unless the global batch splits over every device of the job.

  Every mode splits ``data.batch_size`` evenly over processes and then over each process's
  devices, i.e. over all ``num_devices``.
  """
  batch = config.data.batch_size
  if batch % num_devices:
    lower, upper = (batch // num_devices) * num_devices, (batch // num_devices + 1) * num_devices
    near = ' or '.join(str(b) for b in (lower, upper) if b > 0)
    raise ConfigError(f'config.data.batch_size={batch} must be divisible by the {num_devices} '
                      f'devices ({num_processes} process(es)); use {near}.')


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`validate` then `check_workdir` with room for one checkpoint: before any data loads."""
  validate(config)
  check_workdir(workdir, checkpoint_bytes(config))


def unknown_key_message(error: Exception) -> str:
  """Turns ml_collections' error for an unknown ``--config.key`` into one clear line."""
  text = str(error).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
  return (f'unknown config key in a --config.* override ({text}). Every valid key is listed '
          'in configs/default.py.')
