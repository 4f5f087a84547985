"""``train_and_evaluate(config, workdir)``: the whole experiment as one importable function.

Stages, each a plain function of (config, state) so that tests, Colab and the benchmarks call
the same code as ``main.py``::

  data -> model -> init (he | ifas | gso) -> prune (none | fmp | fmptl | random | l1)
       -> train (sync | mapreduce | ssp) -> evaluate -> report.json

The workdir alone decides whether to resume: if it holds a checkpoint, the run continues from
it (the architecture of a compacted model is recorded in the checkpoint's metadata, and the
init and pruning stages are not repeated). The batch order is a pure function of
``(seed, epoch, step)``, so a killed and resumed run ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.models import conv as conv_lib
from pdcnno_jax.models import counting, factory
from pdcnno_jax.optim import factory as optim_factory
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import report as report_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


@dataclasses.dataclass
class Experiment:
  """Everything the stages share: config, data, mesh, model structure and bookkeeping.

  Attributes:
    config: the full experiment config.
    workdir: run directory (checkpoints, metrics, report).
    dataset: the loaded data set.
    mesh: the data-parallel mesh over every device of every process.
    preprocess: uint8 images -> normalised float32 (runs inside jitted steps).
    graphdef: static structure of the current model (changes when pruning compacts it).
    model_overrides: constructor arguments of the current architecture (compaction).
    timer: wall time per phase.
    writer: metric sink.
    stage_reports: reports of the init / pruning / parallel stages, kept in checkpoints.
  """
  config: ml_collections.ConfigDict
  workdir: str
  dataset: input_pipeline.Dataset
  mesh: jax.sharding.Mesh
  preprocess: Callable[[jax.Array], jax.Array]
  graphdef: Any = None
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  timer: report_lib.PhaseTimer = dataclasses.field(default_factory=report_lib.PhaseTimer)
  writer: metrics_lib.MetricWriter | None = None
  stage_reports: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def global_batch_size(self) -> int:
    return self.config.data.batch_size

  @property
  def steps_per_epoch(self) -> int:
    return input_pipeline.steps_per_epoch(self.dataset, 'train', self.global_batch_size)

  def build_model(self, seed: int | None = None) -> nnx.Module:
    """The current architecture (with compaction overrides) freshly initialised."""
    seed = self.config.seed if seed is None else seed
    return factory.build_model(self.config.model, num_classes=self.dataset.num_classes,
                               input_shape=self.dataset.image_shape, rngs=nnx.Rngs(seed),
                               **self.model_overrides)

  def build_optimizer(self, num_epochs: float | None = None):
    epochs = self.config.num_epochs if num_epochs is None else num_epochs
    return optim_factory.build_optimizer(
        self.config.optimizer, total_steps=max(1, int(epochs * self.steps_per_epoch)),
        steps_per_epoch=self.steps_per_epoch)


# ---------------------------------------------------------------------------------------
# Training and evaluation loops (synchronous data parallel).
# ---------------------------------------------------------------------------------------


def evaluate(exp: Experiment, state: state_lib.TrainState, split: str,
             eval_step: Callable | None = None) -> dict[str, float]:
  """Exact loss and accuracy over every example of ``split``."""
  eval_step = eval_step or steps_lib.make_eval_step(exp.graphdef, exp.preprocess, exp.mesh)
  totals = None
  for batch in input_pipeline.eval_batches(
      exp.dataset, split, global_batch_size=exp.config.data.eval_batch_size,
      sharding=sharding_lib.batch_sharded(exp.mesh)):
    out = eval_step(state, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {'loss': float(totals['loss_sum']) / count,
          'accuracy': float(totals['correct']) / count}


def _evaluate_and_log(exp: Experiment, state: state_lib.TrainState, split: str,
                      eval_step: Callable, *, step: int, label: str) -> dict[str, float]:
  """Evaluates on ``split``, logs one line and writes the metrics at ``step``."""
  with exp.timer.phase('eval'):
    result = evaluate(exp, state, split, eval_step)
  metrics_lib.log_line(f'{label} {split}: loss={result["loss"]:.4f} '
                       f'accuracy={result["accuracy"]:.4f}')
  if exp.writer:
    exp.writer.write(step, result, prefix=split)
  return result


def train_epochs(exp: Experiment, state: state_lib.TrainState, *,
                 tx, num_epochs: float, dataset: input_pipeline.Dataset | None = None,
                 checkpointer: checkpointing.Checkpointer | None = None,
                 eval_split: str | None = None, phase: str = 'train',
                 log_prefix: str = 'train') -> state_lib.TrainState:
  """Synchronous data-parallel training from ``state.step`` for ``num_epochs`` epochs.

  Steps are counted from ``state.step`` (so a resumed state continues where it stopped)
  and the batch order is a pure function of (seed, epoch, step in epoch).

  Args:
    exp: the experiment.
    state: starting state (replicated on the mesh).
    tx: the optimizer whose state is ``state.opt_state``.
    num_epochs: epochs in this phase (fractions allowed).
    dataset: data to train on (default: the experiment's; pruning pre-trains on a subset).
    checkpointer: saves every ``checkpoint_every_steps`` and at each epoch end.
    eval_split: evaluated every ``eval_every_epochs`` epochs.
    phase: timer phase name for the training steps.
    log_prefix: metric name prefix.

  Returns:
    The trained state.

  Raises:
    NonFiniteLossError: when the loss becomes NaN/inf (the last good checkpoint is kept).
  """
  config = exp.config
  dataset = dataset or exp.dataset
  batch = exp.global_batch_size
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset, 'train', batch)
  total_steps = int(round(num_epochs * steps_per_epoch))
  step = int(jax.device_get(state.step))
  if step >= total_steps:
    return state
  data_sharding = sharding_lib.batch_sharded(exp.mesh)
  jitted = steps_lib.make_train_step(exp.graphdef, tx, exp.preprocess, exp.mesh)
  eval_step = steps_lib.make_eval_step(exp.graphdef, exp.preprocess, exp.mesh)
  progress = metrics_lib.Progress(total_steps, batch, first_step=step)
  compiled, pending = None, []
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
      pending.append(step_metrics)
      step += 1
      if step % config.log_every_steps == 0 or step == total_steps:
        with exp.timer.phase(phase):
          values = jax.device_get(pending)
        pending = []
        mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        if not np.isfinite(mean['loss']):
          last_good = checkpointer.latest_step() if checkpointer else None
          raise NonFiniteLossError(
              f'Training loss is {mean["loss"]} at step {step} ({log_prefix}). The run stops '
              f'here; the last good checkpoint is step {last_good} in {exp.workdir}. Lower '
              'config.optimizer.learning_rate or set config.optimizer.grad_clip_norm.')
        text, rates = progress.line(step, mean)
        metrics_lib.log_line(f'[{log_prefix}] {text}')
        if exp.writer:
          exp.writer.write(step, {**mean, **rates}, prefix=log_prefix)
      if checkpointer and step % config.checkpoint_every_steps == 0:
        _save(exp, checkpointer, state, phase=log_prefix)
    epoch += 1
    if eval_split and (epoch % config.eval_every_epochs == 0 or step >= total_steps):
      _evaluate_and_log(exp, state, eval_split, eval_step, step=step,
                        label=f'[{log_prefix}] epoch {epoch}')
    if checkpointer:
      _save(exp, checkpointer, state, phase=log_prefix)
  return state


def _full_batch(config: ml_collections.ConfigDict) -> bool:
  return config.optimizer.name == 'cgmse' and config.optimizer.mode == 'full_batch'


def full_batch_layout(num_examples: int, num_devices: int,
                      chunk_size: int) -> tuple[int, int]:
  """Examples used and chunk count of a full-batch loss over ``num_examples``.

  Chunks are equal and each is split evenly over the devices, so the batch is the largest
  multiple of ``num_chunks * num_devices`` not above ``num_examples``: fewer than that many
  examples are left out (none for 60000 examples on 1, 2, 4 or 8 devices with the default
  chunk size).

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


def train_full_batch(exp: Experiment, state: state_lib.TrainState, *, tx, num_epochs: int,
                     checkpointer: checkpointing.Checkpointer | None = None,
                     eval_split: str | None = None) -> state_lib.TrainState:
  """CGMSE in full-batch mode: ``optimizer.full_batch_iterations`` CG steps per epoch.

  Every loss and gradient is over the whole training split (one global array sharded over
  the mesh), so the curvature pairs of the modified secant equation come from consistent
  gradients (PDCNNO's Map phase on one data shard). An "epoch" here is one block of CG
  iterations; checkpoints and evaluation follow each block.

  References:
    PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt), CGMSE; DESIGN.md, "CGMSE".
  """
  config = exp.config
  iterations = config.optimizer.full_batch_iterations
  total = num_epochs * iterations
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
    if not np.isfinite(values['loss']):
      raise NonFiniteLossError(f'Full-batch loss is {values["loss"]} at CG iteration {step}.')
    text, rates = progress.line(step, values)
    metrics_lib.log_line(f'[cgmse full batch] {text}')
    if exp.writer:
      exp.writer.write(step, {**values, **rates}, prefix='train')
    if step % iterations == 0 or step == total:
      if eval_split:
        _evaluate_and_log(exp, state, eval_split, eval_step, step=step,
                          label=f'[cgmse full batch] iteration {step}')
      if checkpointer:
        _save(exp, checkpointer, state, phase='train')
  return state


def _save(exp: Experiment, checkpointer: checkpointing.Checkpointer,
          state: state_lib.TrainState, *, phase: str) -> None:
  """Saves ``state`` with what resuming needs to rebuild the experiment."""
  step = int(jax.device_get(state.step))
  if checkpointer.latest_step() == step:
    return
  meta = {'phase': phase, 'model_overrides': _jsonable(exp.model_overrides),
          'stage_reports': _jsonable(exp.stage_reports)}
  with exp.timer.phase('checkpoint'):
    try:
      checkpointer.save(step, state, meta)
    except checkpointing.NonFiniteStateError as e:
      raise NonFiniteLossError(f'{e} Lower config.optimizer.learning_rate or set '
                               'config.optimizer.grad_clip_norm.') from None
  _maybe_inject_kill(step)


def _maybe_inject_kill(step: int) -> None:
  """Fault injection for the resume tests: SIGKILL this process after saving ``step``.

  Set ``PDCNNO_FAULT_KILL_AT_STEP=<step>``; the kill lands while the asynchronous save may
  still be writing, which is exactly the case resuming must survive.
  """
  target = os.environ.get('PDCNNO_FAULT_KILL_AT_STEP')
  if target and int(target) == step:
    os.kill(os.getpid(), signal.SIGKILL)


def _jsonable(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, (np.generic, np.ndarray)):
    return tree.tolist()
  return tree


def _restore_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


# ---------------------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------------------


def setup(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Loads data and builds the mesh: the part of a run every stage needs."""
  timer = report_lib.PhaseTimer()
  config = config.copy_and_resolve_references()
  with config.unlocked():  # Loop-friendly convolution gradients for line searches.
    config.model.conv_gradients = conv_lib.resolve_conv_gradients(
        config.model.get('conv_gradients', 'auto'), config.optimizer.name)
  if config.parallel.mode == 'ssp':
    # SSP workers never meet in a collective (one may die and rejoin alone): every process
    # runs the stages, training and the final evaluation on its own devices; the stages
    # are deterministic, so every process computes the same starting state.
    mesh = sharding_lib.make_mesh(jax.local_devices())
  else:
    mesh = sharding_lib.make_mesh()
  sharding_lib.check_global_batch(config.data.batch_size, mesh)
  with timer.phase('data_load'):
    dataset = input_pipeline.load_dataset(config.data, seed=config.seed)
  preprocess = functools.partial(input_pipeline.normalize, dataset=dataset)
  return Experiment(config=config, workdir=workdir, dataset=dataset, mesh=mesh,
                    preprocess=preprocess, timer=timer,
                    writer=metrics_lib.MetricWriter(workdir))


def _model_report(model: nnx.Module) -> dict[str, Any]:
  rows = counting.count_layers(model)
  return {'params': sum(r.params for r in rows), 'macs': sum(r.macs for r in rows),
          'macs_note': 'FLOPs counted as multiply-accumulates (MACs) per example',
          'layers': [dataclasses.asdict(r) for r in rows]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the experiment described by ``config`` in ``workdir``; returns the report.

  Args:
    config: experiment config (see configs/default.py for every key).
    workdir: run directory; if it holds a checkpoint the run resumes from it.

  Returns:
    The report also written to ``<workdir>/report.json``.
  """
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  exp = setup(config, workdir)
  ssp_mode = config.parallel.mode == 'ssp'
  # SSP workers die and rejoin one at a time. Orbax's checkpointer is process-coordinated
  # (barriers when it is created and on every save), which a lone restarted worker cannot
  # pass, so SSP mode keeps per-worker checkpoints instead (parallel/ssp/training.py) and
  # re-runs the deterministic init / pruning stages when the whole job starts again.
  checkpointer = None if ssp_mode else checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints)
  resumed_from = checkpointer.latest_step() if checkpointer else None
  meta = checkpointer.read_meta() if resumed_from is not None else None
  if meta is not None:
    exp.model_overrides = _restore_overrides(meta.get('model_overrides', {}))
    exp.stage_reports = meta.get('stage_reports', {})

  model = exp.build_model()
  tx = exp.build_optimizer()
  exp.graphdef, state = state_lib.create_train_state(model, tx)
  state = sharding_lib.replicate(state, exp.mesh)
  if resumed_from is not None:
    state, _ = checkpointer.restore(state)
    metrics_lib.log_line(f'Resuming from step {resumed_from} in {workdir}.')
  else:
    state, tx = _run_stages(exp, state, tx, checkpointer)

  mode = config.parallel.mode
  if mode == 'sync' and _full_batch(config):
    state = train_full_batch(exp, state, tx=tx, num_epochs=config.num_epochs,
                             checkpointer=checkpointer, eval_split=_eval_split(exp))
  elif mode == 'sync':
    state = train_epochs(exp, state, tx=tx, num_epochs=config.num_epochs,
                         checkpointer=checkpointer, eval_split=_eval_split(exp))
  else:
    state = _run_parallel_mode(exp, state, tx, checkpointer)
  if checkpointer:
    checkpointer.close()

  with exp.timer.phase('eval'):
    test = evaluate(exp, state, 'test')
  metrics_lib.log_line(f'Test accuracy {test["accuracy"]:.4f}, loss {test["loss"]:.4f}.')
  final_model = state_lib.merge_model(exp.graphdef, jax.device_get(state))
  report = {
      'config': config.to_dict(),
      'test': test,
      'resumed_from_step': resumed_from,
      'steps': int(jax.device_get(state.step)),
      'wall_time_s': {'total': time.perf_counter() - start, **exp.timer.seconds},
      'peak_host_rss_bytes': report_lib.peak_host_rss_bytes(),
      'peak_device_memory_bytes': report_lib.peak_device_memory_bytes(),
      'model': _model_report(final_model),
      'devices': {'count': jax.device_count(), 'processes': jax.process_count(),
                  'platform': jax.default_backend()},
      **exp.stage_reports,
  }
  if exp.writer:
    exp.writer.write(report['steps'], {f'test_{k}': v for k, v in test.items()})
    exp.writer.close()
  report_lib.write_report(workdir, report)
  return report


def _eval_split(exp: Experiment) -> str:
  return 'validation' if 'validation' in exp.dataset.splits else 'test'


def _run_stages(exp: Experiment, state: state_lib.TrainState, tx,
                checkpointer: checkpointing.Checkpointer | None):
  """Init and pruning stages of a fresh run; returns the state and optimizer to train.

  The stages never checkpoint mid-way (they are deterministic and re-run after a kill);
  their result is saved at step 0 with the architecture and the stage reports, so a resume
  after that point skips them.
  """
  config = exp.config
  if config.init.method != 'he':
    with exp.timer.phase('init'):
      state = _initialise(exp, state, tx)
  if config.prune.method != 'none':
    with exp.timer.phase('prune'):
      state = _prune(exp, state)
    # The compacted model is a new parameter tree: fresh optimizer state, step 0.
    state = state.replace(step=jnp.zeros((), jnp.int32), opt_state=tx.init(state.params))
    state = sharding_lib.replicate(state, exp.mesh)
  if checkpointer and (config.init.method != 'he' or config.prune.method != 'none'):
    _save(exp, checkpointer, state, phase='stages')
  return state, tx


def _first_batches(exp: Experiment, count: int, *, seed_offset: int) -> list[dict[str, Any]]:
  """The first ``count`` training batches of a seeded order distinct from training's."""
  batches = []
  epoch = 0
  while len(batches) < count:
    for batch in input_pipeline.train_batches(
        exp.dataset, global_batch_size=exp.global_batch_size, epoch=epoch,
        seed=exp.config.seed + seed_offset, sharding=sharding_lib.batch_sharded(exp.mesh)):
      batches.append(batch)
      if len(batches) == count:
        break
    epoch += 1
  return batches


def _initialise(exp: Experiment, state: state_lib.TrainState, tx) -> state_lib.TrainState:
  """IFAS / GSO / LSUV starting point (MR-FPDCNN's IFAS); its cost goes in the report."""
  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.init import ifas, lsuv
  method = exp.config.init.method
  module = lsuv if method == 'lsuv' else ifas
  batches = _first_batches(exp, max(1, module.num_batches_needed(exp.config.init)),
                           seed_offset=1)
  params, init_report = module.initialize(
      exp.config.init, exp.graphdef, state, batches, exp.preprocess, exp.mesh,
      jax.random.key(exp.config.seed))
  exp.stage_reports['init'] = init_report
  metrics_lib.log_line(f'[init] {method}: {init_report.get("gradient_steps", 0)} gradient '
                       f'steps charged, {init_report.get("wall_time_s", 0):.1f} s.')
  return state.replace(params=params, opt_state=tx.init(params))


def _pretraining_subset(exp: Experiment) -> input_pipeline.Dataset:
  """A random ``prune.pretrain_fraction`` of the training split (PDCNNO's pre-training)."""
  dataset = exp.dataset
  if not dataset.in_memory:
    raise ValueError('Pruning pre-trains on a random subset of the training split, which '
                     'needs an in-memory data set (config.data.in_memory=True).')
  train = dataset.host_splits['train']
  count = max(exp.global_batch_size,
              int(round(exp.config.prune.pretrain_fraction * len(train.labels))))
  rng = np.random.default_rng([exp.config.seed, 0x70726574])  # 'pret'
  index = np.sort(rng.choice(len(train.labels), size=min(count, len(train.labels)),
                             replace=False))
  subset = input_pipeline.HostSplit(images=train.images[index], labels=train.labels[index])
  return dataclasses.replace(
      dataset, host_splits={**dataset.host_splits, 'train': subset},
      num_examples={**dataset.num_examples, 'train': int(index.size)})


def _prune(exp: Experiment, state: state_lib.TrainState) -> state_lib.TrainState:
  """Pre-train on a random subset, score, mask, optionally compact (FMP / FMPTL)."""
  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.pruning import compaction, stage
  config = exp.config
  eval_split = _eval_split(exp)
  subset = _pretraining_subset(exp)
  pretrain_steps = config.prune.pretrain_epochs * input_pipeline.steps_per_epoch(
      subset, 'train', exp.global_batch_size)
  pretrain_tx = optim_factory.build_optimizer(
      config.optimizer, total_steps=max(1, pretrain_steps),
      steps_per_epoch=max(1, pretrain_steps // max(1, config.prune.pretrain_epochs)))
  state = state.replace(opt_state=pretrain_tx.init(state.params))
  start = time.perf_counter()
  state = train_epochs(exp, state, tx=pretrain_tx, num_epochs=config.prune.pretrain_epochs,
                       dataset=subset, phase='prune_pretrain', log_prefix='pretrain')
  pretrain_seconds = time.perf_counter() - start
  dense_eval = evaluate(exp, state, eval_split)

  def finetune(graphdef, pruned_state, epochs):
    exp.graphdef = graphdef
    finetune_tx = exp.build_optimizer(num_epochs=epochs)
    pruned_state = pruned_state.replace(step=jnp.zeros((), jnp.int32),
                                        opt_state=finetune_tx.init(pruned_state.params))
    return train_epochs(exp, sharding_lib.replicate(pruned_state, exp.mesh),
                        tx=finetune_tx, num_epochs=epochs, phase='prune_finetune',
                        log_prefix='finetune')

  scoring = lambda: input_pipeline.train_batches(
      exp.dataset, global_batch_size=exp.global_batch_size, epoch=0, seed=config.seed + 2,
      sharding=sharding_lib.batch_sharded(exp.mesh))
  graphdef, state, prune_report = stage.run_pruning(
      config.prune, exp.graphdef, state, scoring, exp.preprocess, exp.mesh, config.model,
      exp.dataset.num_classes, exp.dataset.image_shape, finetune_fn=finetune,
      seed=config.seed)
  exp.graphdef = graphdef
  state = sharding_lib.replicate(state, exp.mesh)
  model = state_lib.merge_model(graphdef, jax.device_get(state))
  if prune_report.get('compacted'):
    exp.model_overrides = _restore_overrides(compaction.architecture_kwargs(model))
  pruned_eval = evaluate(exp, state, eval_split)
  prune_report.update({
      'pretrain_seconds': pretrain_seconds,
      'pretrain_examples': subset.num_examples['train'],
      f'{eval_split}_before_pruning': dense_eval,
      f'{eval_split}_after_pruning_before_finetuning': pruned_eval,
  })
  exp.stage_reports['prune'] = prune_report
  metrics_lib.log_line(
      f'[prune] {config.prune.method}: MACs {prune_report.get("macs_before")} -> '
      f'{prune_report.get("macs_after")}; {eval_split} accuracy {dense_eval["accuracy"]:.4f}'
      f' -> {pruned_eval["accuracy"]:.4f} before fine-tuning.')
  return state


def _run_parallel_mode(exp: Experiment, state: state_lib.TrainState, tx,
                       checkpointer: checkpointing.Checkpointer | None) -> state_lib.TrainState:
  """MapReduce or SSP training; their per-round / per-worker report joins the run's."""
  mode = exp.config.parallel.mode
  # pylint: disable=g-import-not-at-top
  if mode == 'mapreduce':
    from pdcnno_jax.parallel import mapreduce
    state, mode_report = mapreduce.train(exp, state, tx=tx, checkpointer=checkpointer)
  elif mode == 'ssp':
    from pdcnno_jax.parallel.ssp import training as ssp_training
    state, mode_report = ssp_training.train(exp, state, tx=tx, worker_checkpoints=True)
  else:
    raise ValueError(f"Unknown config.parallel.mode {mode!r}; use 'sync', 'mapreduce' or "
                     "'ssp'.")
  exp.stage_reports[mode] = mode_report
  return state
