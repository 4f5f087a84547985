"""Builds the optimizer named in ``config.optimizer``: any optax alias, or CGMSE.

Names:
  * ``sgd``, ``momentum`` (heavy ball / Nesterov), ``adam``, ``adamw``, ``rmsprop``,
    ``adagrad``, ``lamb``, ``lion``, ... : optax aliases, with the learning-rate schedule
    below, optional global-norm clipping and decoupled weight decay where the alias has none.
  * ``lbfgs``: ``optax.lbfgs`` with its zoom line search (learning rate ignored).
  * ``cgmse``: PDCNNO's conjugate gradient with a modified secant equation
    (``pdcnno_jax.optim.cgmse``); ``optimizer.mode`` picks full-batch or mini-batch use.

Schedules: ``constant`` or ``cosine`` (decay to 0 over the run) after a linear warm-up of
``warmup_epochs``. ``OPTIMIZER_NAMES`` and ``SCHEDULES`` are the lists config validation
reads; every key read here is set by ``configs/default.py``.
"""

from __future__ import annotations

import inspect

import ml_collections
import optax

# Names with their own construction here; any other name must be an optax alias.
OPTIMIZER_NAMES = ('cgmse', 'lbfgs', 'momentum')
SCHEDULES = ('constant', 'cosine')
# Aliases whose signature already has a weight-decay argument.
_LINE_SEARCH = ('cgmse', 'lbfgs')  # Step sizes from a line search: no schedule.
_DECOUPLED_DECAY = ('adamw', 'lamb', 'lion', 'adafactor')


def is_optimizer_name(name: str) -> bool:
  """Whether ``build_optimizer`` accepts ``config.optimizer.name=name``."""
  return name in OPTIMIZER_NAMES or callable(getattr(optax, name, None))


def learning_rate_schedule(opt_config: ml_collections.ConfigDict, *, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up then constant or cosine decay of ``opt_config.learning_rate``."""
  base = opt_config.learning_rate
  warmup = warmup_steps(opt_config, steps_per_epoch)
  name = opt_config.schedule
  if name == 'constant':
    main = optax.constant_schedule(base)
  elif name == 'cosine':
    main = optax.cosine_decay_schedule(base, max(1, total_steps - warmup))
  else:
    raise ValueError(f'Unknown optimizer.schedule {name!r}; use one of {SCHEDULES}.')
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def warmup_steps(opt_config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Steps of the linear learning-rate warm-up; 0 for line-search optimizers (no schedule)."""
  if opt_config.name in _LINE_SEARCH:
    return 0
  return int(round(opt_config.warmup_epochs * steps_per_epoch))


def build_optimizer(opt_config: ml_collections.ConfigDict, *, total_steps: int,
                    steps_per_epoch: int) -> optax.GradientTransformation:
  """Returns the optax transformation described by ``opt_config``.

  Args:
    opt_config: the ``config.optimizer`` section.
    total_steps: optimizer updates in the whole run (for decaying schedules).
    steps_per_epoch: updates per epoch (for warm-up given in epochs).

  Raises:
    ValueError: for an unknown optimizer name or schedule.
  """
  name = opt_config.name
  if name == 'cgmse':
    # The line search must see the true objective: no schedule, clipping or decay around it.
    from pdcnno_jax.optim import cgmse  # pylint: disable=g-import-not-at-top
    return cgmse.cgmse(learning_rate=None, mode=opt_config.mode, t=opt_config.cg_t,
                       max_linesearch_steps=opt_config.max_linesearch_steps)
  if name == 'lbfgs':
    return optax.lbfgs()
  schedule = learning_rate_schedule(opt_config, total_steps=total_steps,
                                    steps_per_epoch=steps_per_epoch)
  weight_decay = opt_config.weight_decay
  if name == 'momentum':
    tx = optax.sgd(schedule, momentum=opt_config.momentum,
                   nesterov=opt_config.nesterov)
  else:
    if not is_optimizer_name(name):
      raise ValueError(
          f'Unknown optimizer {name!r}: config.optimizer.name must be an optax alias '
          "(sgd, momentum, adam, adamw, rmsprop, ...), 'lbfgs' or 'cgmse'.")
    alias = getattr(optax, name)
    kwargs = {'learning_rate': schedule}
    if name in _DECOUPLED_DECAY and 'weight_decay' in inspect.signature(alias).parameters:
      kwargs['weight_decay'] = weight_decay
      weight_decay = 0.0
    tx = alias(**kwargs)
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  return optax.chain(*parts, tx) if parts else tx
