"""Checks an experiment config before anything expensive happens.

Every error says which key is wrong, what it holds, and what would be valid.
"""

from __future__ import annotations

import re

import ml_collections


class ConfigError(ValueError):
  """An experiment config is invalid (unknown key, bad value)."""


_CHOICES = {
    'data.name': ('mnist', 'fashion_mnist', 'emnist/digits', 'svhn_cropped', 'imagenet2012'),
    'init.method': ('he', 'ifas', 'gso', 'lsuv'),
    'init.search_space': ('layer_scales', 'subspace'),
    'prune.method': ('none', 'fmp', 'fmptl', 'random', 'l1'),
    'prune.selection': ('threshold', 'layer_ratio', 'global_macs'),
    'parallel.mode': ('sync', 'mapreduce', 'ssp'),
    'parallel.balancer': ('equal', 'proportional', 'lbrla', 'dlbpce'),
    'optimizer.mode': ('full_batch', 'minibatch'),
    'model.conv_gradients': ('auto', 'lax', 'loop_friendly'),
    'optimizer.schedule': ('constant', 'cosine'),
}

_POSITIVE = ('num_epochs', 'data.batch_size', 'data.eval_batch_size', 'log_every_steps',
             'checkpoint_every_steps', 'keep_checkpoints', 'eval_every_epochs',
             'parallel.heartbeat_timeout_s', 'parallel.runtime_heartbeat_timeout_s')


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` describing the first invalid entry of ``config``."""
  from pdcnno_jax.models import factory  # pylint: disable=g-import-not-at-top
  for key, choices in _CHOICES.items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      continue
    if value not in choices:
      raise ConfigError(f'config.{key}={value!r} is not one of {choices}.')
  if config.model.name not in factory.MODEL_NAMES:
    raise ConfigError(f'config.model.name={config.model.name!r} is not one of '
                      f'{factory.MODEL_NAMES}.')
  for key in _POSITIVE:
    if _get(config, key) <= 0:
      raise ConfigError(f'config.{key}={_get(config, key)!r} must be positive.')
  if config.model.width_multiplier <= 0:
    raise ConfigError('config.model.width_multiplier must be positive.')
  if not 0.0 < config.prune.pretrain_fraction <= 1.0:
    raise ConfigError('config.prune.pretrain_fraction must be in (0, 1].')
  slowdown = config.parallel.slowdown
  if slowdown and not re.fullmatch(r'\s*\d+(\.\d+)?(\s*,\s*\d+(\.\d+)?)*\s*', slowdown):
    raise ConfigError(f"config.parallel.slowdown={slowdown!r} must be comma-separated "
                      "factors, e.g. '1,1,2,4'.")


def unknown_key_message(error: Exception) -> str:
  """Turns ml_collections' error for an unknown ``--config.key`` into one clear line."""
  text = str(error).strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
  return (f'unknown config key in a --config.* override ({text}). Every valid key is listed '
          'in configs/default.py.')
