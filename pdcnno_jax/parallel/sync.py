"""Synchronous data-parallel training: ``config.parallel.mode = 'sync'``.

One jitted step over the global batch, sharded over every device of every process
(``NamedSharding`` on the global mesh); optax optimizers and CGMSE in mini-batch mode step
through `steps.make_train_step`, CGMSE in full-batch mode (PDCNNO's Map phase on one data
shard) evaluates every loss and gradient over the whole training split, in rematerialised
chunks. The batch order is a pure function of ``(seed, epoch, step)``, so a resumed run ends
with the same parameters as an uninterrupted one.

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt), CGMSE; DESIGN.md, "CGMSE".
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import checks
from pdcnno_jax.loop import context
from pdcnno_jax.loop import evaluation
from pdcnno_jax.loop import periodic
from pdcnno_jax.loop import saving
from pdcnno_jax.loop import windows
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib

MESH = 'global'  # Every device of every process.
USES_CHECKPOINTER = True


def validate(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> None:
  """Synchronous training runs on every data set and optimizer (no mode-specific checks)."""
  del config, dataset


def is_full_batch(config: ml_collections.ConfigDict) -> bool:
  return config.optimizer.name == 'cgmse' and config.optimizer.mode == 'full_batch'


def train(exp: context.Experiment, state: state_lib.TrainState, *, tx,
          checkpointer: checkpointing.Checkpointer | None
          ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Trains ``config.num_epochs`` epochs (mini-batch, or full-batch CGMSE); no mode report."""
  run = train_full_batch if is_full_batch(exp.config) else train_epochs
  state = run(exp, state, tx=tx, num_epochs=exp.config.num_epochs, checkpointer=checkpointer,
              eval_split=exp.eval_split)
  return state, {}


def _last_good(checkpointer: checkpointing.Checkpointer | None) -> int | None:
  return checkpointer.last_good_step() if checkpointer else None


def train_epochs(exp: context.Experiment, state: state_lib.TrainState, *,
                 tx, num_epochs: float, dataset: input_pipeline.Dataset | None = None,
                 checkpointer: checkpointing.Checkpointer | None = None,
                 eval_split: str | None = None, phase: str = 'train',
                 log_prefix: str = 'train') -> state_lib.TrainState:
  """Synchronous data-parallel training from ``state.step`` for ``num_epochs`` epochs.

  Steps are counted from ``state.step`` (a resumed state continues where it stopped), the
  batch order is a pure function of (seed, epoch, step in epoch), and ``config.max_steps``
  caps the steps of the phase.

  Args:
    exp: the experiment.
    state: starting state (replicated on the mesh).
    tx: the optimizer whose state is ``state.opt_state``.
    num_epochs: epochs in this phase (fractions allowed).
    dataset: data to train on (default: the experiment's; pruning pre-trains on a subset).
    checkpointer: saves every ``checkpoint_every_steps`` and at each epoch end.
    eval_split: evaluated every ``eval_every_epochs`` epochs and at the end.
    phase: timer phase name for the training steps.
    log_prefix: metric name prefix.

  Returns:
    The trained state.

  Raises:
    checks.NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
    collapse.TrainingCollapseError: a whole post-warm-up epoch at the class prior.
  """
  config = exp.config
  dataset = dataset or exp.dataset
  batch = exp.global_batch_size
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset, 'train', batch)
  total_steps = exp.step_limit(int(round(num_epochs * steps_per_epoch)))
  step = int(jax.device_get(state.step))
  if step >= total_steps:
    return state
  data_sharding = sharding_lib.batch_sharded(exp.mesh)
  jitted = steps_lib.make_train_step(exp.graphdef, tx, exp.preprocess, exp.mesh)
  eval_step = steps_lib.make_eval_step(exp.graphdef, exp.preprocess, exp.mesh)
  progress = metrics_lib.Progress(total_steps, batch, first_step=step)
  window = windows.MetricWindow()
  watch = checks.CollapseWatch.of(exp, examples_per_epoch=steps_per_epoch * batch,
                                  warmup_steps=checks.warmup_steps(config, steps_per_epoch),
                                  phase=log_prefix)
  compiled, loss = None, None
  epoch = step // steps_per_epoch
  while step < total_steps:
    batches = input_pipeline.train_batches(
        dataset, global_batch_size=batch, epoch=epoch, seed=config.seed,
        sharding=data_sharding, start_step=step - epoch * steps_per_epoch)
    for batch_arrays in batches:
      if step >= total_steps:
        break
      if compiled is None:
        with exp.timer.phase('compile'):
          compiled = jitted.lower(state, batch_arrays).compile()
      with exp.timer.phase(phase):
        state, step_metrics = compiled(state, batch_arrays)
      window.add(step_metrics)
      step += 1
      if periodic.every(step, config.log_every_steps, total_steps):
        window_steps = len(window)
        with exp.timer.phase(phase):
          mean = window.mean()
        loss = mean['loss']
        checks.check_finite_loss(loss, where=f'step {step} ({log_prefix})',
                                 last_good=_last_good(checkpointer), workdir=exp.workdir)
        watch.observe(loss, mean['accuracy'], first_step=step - window_steps, step=step,
                      examples=window_steps * batch, epoch=epoch,
                      last_good=_last_good(checkpointer))
        text, rates = progress.line(step, mean)
        metrics_lib.log_line(f'[{log_prefix}] {text}')
        if exp.writer:
          exp.writer.write(step, {**mean, **rates}, prefix=log_prefix)
      if checkpointer and periodic.every(step, config.checkpoint_every_steps, last=False):
        saving.save(exp, checkpointer, state, phase=log_prefix, loss=loss)
    epoch += 1
    if eval_split and (periodic.every(epoch, config.eval_every_epochs, last=False)
                       or step >= total_steps):
      evaluation.evaluate_and_log(exp, state, eval_split, eval_step, step=step,
                                  label=f'[{log_prefix}] epoch {epoch}')
    if checkpointer:
      saving.save(exp, checkpointer, state, phase=log_prefix, loss=loss)
  return state


def full_batch_layout(num_examples: int, num_devices: int,
                      chunk_size: int) -> tuple[int, int]:
  """Examples used and chunk count of a full-batch loss over ``num_examples``.

  Chunks are equal and each is split evenly over the devices, so the batch is the largest
  multiple of ``num_chunks * num_devices`` not above ``num_examples``.

  Args:
    num_examples: size of the training split.
    num_devices: devices in the mesh.
    chunk_size: at most this many examples per chunk; 0 means a single chunk.

  Returns:
    ``(examples_used, num_chunks)``.

  Raises:
    ValueError: a negative chunk size, or fewer examples than devices.
  """
  if chunk_size < 0:
    raise ValueError(f'config.optimizer.full_batch_chunk_size must be >= 0 (0: no chunking), '
                     f'got {chunk_size}.')
  num_chunks = 1 if chunk_size == 0 else max(1, -(-num_examples // chunk_size))
  unit = num_chunks * num_devices
  used = num_examples - num_examples % unit
  if used == 0:
    raise ValueError(f'{num_examples} training examples cannot fill {num_chunks} chunk(s) on '
                     f'{num_devices} device(s); raise config.optimizer.full_batch_chunk_size.')
  return used, num_chunks


def train_full_batch(exp: context.Experiment, state: state_lib.TrainState, *, tx,
                     num_epochs: float, checkpointer: checkpointing.Checkpointer | None = None,
                     eval_split: str | None = None) -> state_lib.TrainState:
  """CGMSE in full-batch mode: ``optimizer.full_batch_iterations`` CG steps per epoch.

  Every loss and gradient is over the whole training split (one global array sharded over
  the mesh), so the curvature pairs of the modified secant equation come from consistent
  gradients. An "epoch" here is one block of CG iterations; checkpoints and evaluation follow
  each block, and ``config.max_steps`` caps the iterations.
  """
  config = exp.config
  iterations = config.optimizer.full_batch_iterations
  total = exp.step_limit(int(round(num_epochs * iterations)))
  step = int(jax.device_get(state.step))
  if step >= total:
    return state
  num_train, num_chunks = full_batch_layout(
      exp.dataset.num_examples['train'], exp.mesh.devices.size,
      config.optimizer.full_batch_chunk_size)
  dropped = exp.dataset.num_examples['train'] - num_train
  metrics_lib.log_line(
      f'[cgmse full batch] {num_train} examples in {num_chunks} chunk(s) of '
      f'{num_train // num_chunks}' + (f' ({dropped} left out to make equal chunks)'
                                      if dropped else ''))
  full = next(iter(input_pipeline.train_batches(
      exp.dataset, global_batch_size=num_train, epoch=0, seed=config.seed,
      sharding=sharding_lib.batch_sharded(exp.mesh))))
  jitted = steps_lib.make_train_step(exp.graphdef, tx, exp.preprocess, exp.mesh,
                                     num_chunks=num_chunks)
  with exp.timer.phase('compile'):
    compiled = jitted.lower(state, full).compile()
  eval_step = steps_lib.make_eval_step(exp.graphdef, exp.preprocess, exp.mesh)
  progress = metrics_lib.Progress(total, num_train, first_step=step)
  while step < total:
    with exp.timer.phase('train'):
      state, step_metrics = compiled(state, full)
      values = jax.device_get(step_metrics)
    step += 1
    checks.check_finite_loss(float(values['loss']), where=f'CG iteration {step} (full batch)',
                             last_good=_last_good(checkpointer), workdir=exp.workdir)
    text, rates = progress.line(step, values)
    metrics_lib.log_line(f'[cgmse full batch] {text}')
    if exp.writer:
      exp.writer.write(step, {**values, **rates}, prefix='train')
    if periodic.every(step, iterations, total):
      if eval_split:
        evaluation.evaluate_and_log(exp, state, eval_split, eval_step, step=step,
                                    label=f'[cgmse full batch] iteration {step}')
      if checkpointer:
        saving.save(exp, checkpointer, state, phase='train', loss=float(values['loss']))
  return state
