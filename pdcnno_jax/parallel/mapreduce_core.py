"""MapReduce training's Split, Map and round bookkeeping, shared by its two engines.

Split: each epoch the training set, in the epoch's permutation (the order synchronous training
uses), is cut into ``parallel.num_blocks`` equal blocks; an epoch has ``rounds_per_epoch``
rounds, each training the next ``num_blocks / rounds_per_epoch`` blocks (`BlockPlan`).
Map: worker k trains its own copy on its ``a_k`` consecutive blocks of the round
(`worker_share`, `map_phase`) in local batches, its steps stretched by its slowdown.
After the Reduce, `Rounds.close` turns every worker's figures into the round's report, asks the
balancer (equal, proportional, LBRLA, DLBPCE) for the next assignment, checks the loss,
evaluates and checkpoints with the resume point in ``exp.mode_resume``.
The engines differ in how Map runs and how the Reduce is computed: one process per worker
joined by collectives (`parallel.mapreduce`), or worker actors of one driver process
(`parallel.ray_engine.mapreduce`).

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt): Split / Map / Reduce, LBRLA, speed-up.
  MR-FPDCNN paper (papers/mr_fpdcnn_taylor_glowworm_zh.txt): DLBPCE, computing entropy.
  DESIGN.md, "MapReduce training", "LBRLA", "DLBPCE".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import checks
from pdcnno_jax.loop import context
from pdcnno_jax.loop import evaluation
from pdcnno_jax.loop import periodic
from pdcnno_jax.loop import saving
from pdcnno_jax.parallel import balancers
from pdcnno_jax.parallel import monitor as monitor_lib
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib

# Per-round figures each worker reports after Map, after the monitor's
# `balancers.VECTOR_FIELDS`.
EXTRA_FIELDS = ('loss_sum', 'correct_sum', 'samples', 'steps', 'reduce_s', 'round_s')


# ---------------------------------------------------------------------------------------
# Split: blocks and per-worker shares (pure numpy).
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """How the training set is cut into blocks and rounds.

  Attributes:
    num_examples: training examples N.
    num_blocks: blocks per epoch.
    rounds_per_epoch: rounds per epoch.
    block_size: examples per block, N // num_blocks.
  """
  num_examples: int
  num_blocks: int
  rounds_per_epoch: int
  block_size: int

  @property
  def blocks_per_round(self) -> int:
    return self.num_blocks // self.rounds_per_epoch

  def round_blocks(self, seed: int, epoch: int, round_in_epoch: int) -> np.ndarray:
    """Example indices of the blocks of one round: [blocks_per_round, block_size].

    Block b of an epoch is ``order[b * block_size:(b + 1) * block_size]`` with ``order`` the
    epoch's permutation (a pure function of seed and epoch); round r holds blocks
    ``[r * blocks_per_round, (r + 1) * blocks_per_round)``.
    """
    if not 0 <= round_in_epoch < self.rounds_per_epoch:
      raise ValueError(f'round_in_epoch={round_in_epoch} is outside '
                       f'[0, {self.rounds_per_epoch}).')
    order = input_pipeline.epoch_permutation(self.num_examples, seed, epoch)
    first = round_in_epoch * self.blocks_per_round
    blocks = order[:self.num_blocks * self.block_size].reshape(self.num_blocks,
                                                                self.block_size)
    return blocks[first:first + self.blocks_per_round]


def make_block_plan(num_examples: int, num_blocks: int, rounds_per_epoch: int, *,
                    num_workers: int, local_batch_size: int) -> BlockPlan:
  """Checks the Split settings and returns the plan.

  Args:
    num_examples: training examples.
    num_blocks: config.parallel.num_blocks.
    rounds_per_epoch: config.parallel.rounds_per_epoch.
    num_workers: processes (workers).
    local_batch_size: examples per local step.

  Raises:
    ValueError: settings that leave a worker without a full local batch, or that do not
      divide; the message says which key to change.
  """
  if rounds_per_epoch < 1:
    raise ValueError(f'config.parallel.rounds_per_epoch={rounds_per_epoch} must be >= 1.')
  if num_blocks < 1 or num_blocks % rounds_per_epoch:
    raise ValueError(
        f'config.parallel.num_blocks={num_blocks} must be a positive multiple of '
        f'config.parallel.rounds_per_epoch={rounds_per_epoch} (each round trains '
        'num_blocks / rounds_per_epoch blocks).')
  if num_blocks // rounds_per_epoch < num_workers:
    raise ValueError(
        f'Each round has {num_blocks // rounds_per_epoch} blocks (config.parallel.num_blocks='
        f'{num_blocks} / rounds_per_epoch={rounds_per_epoch}) but there are {num_workers} '
        f'workers; every worker needs at least one block: raise num_blocks to at least '
        f'{num_workers * rounds_per_epoch}.')
  block_size = num_examples // num_blocks
  if block_size < local_batch_size:
    raise ValueError(
        f'Blocks hold {block_size} examples ({num_examples} // config.parallel.num_blocks='
        f'{num_blocks}), fewer than one local batch of {local_batch_size} '
        '(config.data.batch_size // processes); lower num_blocks or the batch size.')
  return BlockPlan(num_examples, num_blocks, rounds_per_epoch, block_size)


def worker_share(round_blocks: np.ndarray, assignment: np.ndarray, worker: int) -> np.ndarray:
  """Example indices worker ``worker`` trains: its run of consecutive blocks, flattened.

  Args:
    round_blocks: [blocks_per_round, block_size] from `BlockPlan.round_blocks`.
    assignment: [K] blocks per worker, summing to blocks_per_round.
    worker: worker index.
  """
  assignment = np.asarray(assignment, np.int64)
  if assignment.sum() != round_blocks.shape[0] or np.any(assignment < 0):
    raise ValueError(f'Assignment {assignment.tolist()} must be >= 0 and sum to the '
                     f'{round_blocks.shape[0]} blocks of the round.')
  bounds = np.concatenate([[0], np.cumsum(assignment)])
  return round_blocks[bounds[worker]:bounds[worker + 1]].reshape(-1)


def local_steps(assignment: np.ndarray, block_size: int, local_batch_size: int) -> np.ndarray:
  """[K] local steps per worker: full local batches in each worker's share."""
  return np.asarray(assignment, np.int64) * block_size // local_batch_size


# ---------------------------------------------------------------------------------------
# Report figures (pure numpy).
# ---------------------------------------------------------------------------------------


def round_report(round_index: int, epoch: int, assignment: np.ndarray,
                 gathered: np.ndarray) -> dict[str, Any]:
  """Per-round figures from the all-gathered worker rows.

  Args:
    round_index: global round index.
    epoch: epoch of the round.
    assignment: [K] blocks each worker trained.
    gathered: [K, len(VECTOR_FIELDS) + len(EXTRA_FIELDS)] rows.

  Returns:
    JSON-able dict: blocks, samples, steps, busy_s, idle_s (= makespan - busy_k, the time
    worker k waits at the Reduce), speed (examples per busy second), makespan_s (the longest
    busy time), entropy (normalised parallel computing entropy of the busy times; 1 = perfect
    balance), reduce_s (the Reduce of the last worker to arrive, i.e. the collective without
    waiting), round_s (wall time of the round, Map + Reduce, on the slowest process), loss and
    accuracy (example-weighted means of the Map steps).
  """
  num_monitor = len(balancers.VECTOR_FIELDS)
  stats = balancers.WorkerStats.from_vectors(gathered[:, :num_monitor])
  extra = dict(zip(EXTRA_FIELDS, gathered[:, num_monitor:].T))
  busy = stats.busy_s
  makespan = float(busy.max())
  samples = extra['samples']
  steps = np.maximum(extra['steps'], 1)
  return {
      'round': int(round_index),
      'epoch': int(epoch),
      'blocks': [int(b) for b in assignment],
      'samples': [int(s) for s in samples],
      'steps': [int(s) for s in extra['steps']],
      'busy_s': [float(b) for b in busy],
      'idle_s': [float(makespan - b) for b in busy],
      'speed': [float(s) for s in stats.speed],
      'makespan_s': makespan,
      'entropy': balancers.parallel_computing_entropy(busy),
      'reduce_s': float(extra['reduce_s'].min()),
      'round_s': float(extra['round_s'].max()),
      'loss': float(extra['loss_sum'].sum() / steps.sum()),
      'accuracy': float(extra['correct_sum'].sum() / max(samples.sum(), 1.0)),
  }


def speedup_report(rounds: list[dict[str, Any]]) -> dict[str, Any]:
  """Speed-up ratio S = T_1 / T_p over the given rounds.

  T_p is the measured parallel time: the sum over rounds of the round's wall time (Map, with
  the host-side batch preparation, and Reduce, on the slowest process). T_1, the time one node
  would need for the same work, is estimated from the same run as the examples trained by all
  workers divided by the throughput of the fastest worker (examples per busy second over all
  rounds), i.e. a single node as fast as the fastest one trains everything alone, with no
  Reduce. Also reported: the ideal speed-up of a perfectly balanced assignment,
  sum_k speed_k / max_k speed_k, and the efficiency S / K.

  Args:
    rounds: `round_report` dicts.

  Returns:
    JSON-able dict with t1_s, tp_s, speedup, ideal_speedup, efficiency, workers.

  References:
    PDCNNO and MR-FPDCNN papers, speed-up ratio S = T_1 / T_p.
  """
  if not rounds:
    return {}
  samples = np.sum([r['samples'] for r in rounds], axis=0).astype(np.float64)
  busy = np.sum([r['busy_s'] for r in rounds], axis=0)
  speed = samples / np.maximum(busy, 1e-12)
  t1 = float(samples.sum() / speed.max())
  tp = float(sum(r['round_s'] for r in rounds))
  speedup = t1 / tp if tp > 0 else float('nan')
  return {
      't1_s': t1, 'tp_s': tp, 'speedup': speedup,
      'ideal_speedup': float(speed.sum() / speed.max()),
      'efficiency': speedup / len(samples), 'workers': len(samples),
      'note': 'T_1 = examples trained / throughput of the fastest worker (measured in this '
              'run); T_p = sum over rounds of the round wall time (Map + Reduce).',
  }


# ---------------------------------------------------------------------------------------
# Map.
# ---------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> None:
  """MapReduce needs blocks of an in-memory data set and mini-batch local training."""
  if not dataset.in_memory:
    raise ValueError(
        f'parallel.mode=mapreduce needs an in-memory data set to cut into blocks; '
        f'{dataset.name} is streamed. Set config.data.in_memory=True (or use '
        "parallel.mode='sync' for streamed data sets).")
  if config.optimizer.name == 'cgmse' and config.optimizer.mode == 'full_batch':
    raise ValueError(
        "parallel.mode=mapreduce trains in local mini-batches; CGMSE's full_batch mode is not "
        "supported there. Set config.optimizer.mode='minibatch' (or parallel.mode='sync' "
        'for full-batch CGMSE).')


@dataclasses.dataclass
class Worker:
  """One worker's Map machinery: its step, slowdown, monitor and the training arrays."""
  data_sharding: jax.sharding.Sharding
  step_fn: Callable[..., Any]
  slow: slowdown_lib.Slowdown
  monitor: monitor_lib.WorkerMonitor
  images: np.ndarray
  labels: np.ndarray
  batch: int
  warm: bool = False

  def batches(self, indices: np.ndarray):
    for step in range(len(indices) // self.batch):
      rows = indices[step * self.batch:(step + 1) * self.batch]
      yield jax.device_put({'image': self.images[rows], 'label': self.labels[rows]},
                           self.data_sharding)


def map_phase(worker: Worker, state: state_lib.TrainState,
              indices: np.ndarray) -> tuple[state_lib.TrainState, dict[str, float]]:
  """Map: local training on ``indices``; returns the state and this worker's round figures."""
  loss_sum, correct_sum, steps = jnp.zeros(()), jnp.zeros(()), 0
  worker.monitor.start()
  for batch in worker.batches(indices):
    (state, metrics), seconds = worker.slow.run(worker.step_fn, state, batch)
    worker.monitor.record(worker.batch, seconds)
    loss_sum = loss_sum + metrics['loss']
    correct_sum = correct_sum + metrics['accuracy'] * worker.batch
    steps += 1
  stats = worker.monitor.stop()
  loss_sum, correct_sum = jax.device_get((loss_sum, correct_sum))
  return state, {'row': stats.to_vectors()[0], 'loss_sum': float(loss_sum),
                 'correct_sum': float(correct_sum), 'samples': steps * worker.batch,
                 'steps': steps}


def figures_row(figures: dict[str, Any], reduce_s: float, round_s: float) -> np.ndarray:
  """One worker's row of the round: its monitor vector, then `EXTRA_FIELDS`."""
  return np.concatenate([figures['row'], [
      figures['loss_sum'], figures['correct_sum'], figures['samples'], figures['steps'],
      reduce_s, round_s]]).astype(np.float64)


@functools.lru_cache(maxsize=8)
def local_train_step(graphdef, tx, preprocess, mesh):
  """The jitted local step, shared by repeated `train` calls on the same model and mesh."""
  return steps_lib.make_train_step(graphdef, tx, preprocess, mesh)


# ---------------------------------------------------------------------------------------
# Round bookkeeping: report, balance, check, evaluate, checkpoint.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rounds:
  """What a MapReduce run keeps from round to round, whichever engine runs the rounds.

  Attributes:
    exp: the experiment.
    plan: the Split.
    num_workers: K.
    total_rounds: rounds of the whole run.
    checkpointer: saves at round boundaries (None: no checkpoints).
    first_round: the round to start at (after the last one a resumed checkpoint saved).
    blocks: the assignment of the next round.
    rounds: the `round_report` dicts so far.
    last_saved_step: step of the last checkpoint (or of the start).
    assign: the configured balancer.
    watch: the collapse check.
  """
  exp: context.Experiment
  plan: BlockPlan
  num_workers: int
  total_rounds: int
  checkpointer: checkpointing.Checkpointer | None
  first_round: int
  blocks: np.ndarray
  rounds: list[dict[str, Any]]
  last_saved_step: int
  assign: Callable[..., np.ndarray] = dataclasses.field(repr=False)
  watch: checks.CollapseWatch = dataclasses.field(repr=False)

  @classmethod
  def start(cls, exp: context.Experiment, plan: BlockPlan, num_workers: int, *, step: int,
            checkpointer: checkpointing.Checkpointer | None) -> Rounds:
    """The bookkeeping of a run starting at training step ``step`` (resuming where told)."""
    config = exp.config
    total_rounds = int(round(config.num_epochs * plan.rounds_per_epoch))
    first, blocks, rounds = _resume_point(exp, num_workers, plan.blocks_per_round,
                                          total_rounds)
    if blocks is None:
      blocks = balancers.equal(plan.blocks_per_round,
                               balancers.WorkerStats(np.ones(num_workers)))
    watch = checks.CollapseWatch.of(
        exp, examples_per_epoch=exp.dataset.num_examples['train'],
        warmup_steps=checks.warmup_steps(config, exp.steps_per_epoch), phase='mapreduce')
    return cls(exp, plan, num_workers, total_rounds, checkpointer, first, blocks, rounds,
               step, balancers.balancer_from_config(config.parallel), watch)

  def round_indices(self, round_index: int) -> tuple[int, int, np.ndarray]:
    """(epoch, round in epoch, [blocks_per_round, block_size] example indices)."""
    epoch, round_in_epoch = divmod(round_index, self.plan.rounds_per_epoch)
    return epoch, round_in_epoch, self.plan.round_blocks(self.exp.config.seed, epoch,
                                                         round_in_epoch)

  def close(self, round_index: int, gathered: np.ndarray, *, first_step: int, step: int,
            global_state: Callable[[], state_lib.TrainState],
            extra: dict[str, Any] | None = None) -> bool:
    """Ends a round after its Reduce; returns whether training stops here.

    Args:
      round_index: the round.
      gathered: [K, len(VECTOR_FIELDS) + len(EXTRA_FIELDS)] rows of every worker.
      first_step: training step before the round.
      step: training step after the Reduce.
      global_state: returns the averaged state on ``exp.mesh`` (called only to evaluate or
        save).
      extra: engine-specific figures added to the round's report.
    """
    exp, config = self.exp, self.exp.config
    epoch, round_in_epoch = divmod(round_index, self.plan.rounds_per_epoch)
    figures = round_report(round_index, epoch, self.blocks, gathered)
    figures.update(extra or {})
    stats = balancers.WorkerStats.from_vectors(gathered[:, :len(balancers.VECTOR_FIELDS)])
    self.blocks = self.assign(self.plan.blocks_per_round, stats, self.blocks)
    figures['next_blocks'] = [int(b) for b in self.blocks]
    self.rounds.append(figures)
    log_round(exp, step, figures)
    last_good = self.checkpointer.last_good_step() if self.checkpointer else None
    checks.check_finite_loss(figures['loss'], where=f'MapReduce round {round_index}',
                             last_good=last_good, workdir=exp.workdir)
    self.watch.observe(figures['loss'], figures['accuracy'], first_step=first_step, step=step,
                       examples=int(sum(figures['samples'])), epoch=epoch,
                       last_good=last_good)
    stop = 0 < config.max_steps <= step
    last = round_index == self.total_rounds - 1 or stop
    epoch_end = round_in_epoch == self.plan.rounds_per_epoch - 1
    state = None
    if (epoch_end and periodic.every(epoch + 1, config.eval_every_epochs, last=False)) or last:
      state = global_state()
      figures[exp.eval_split] = evaluation.evaluate_and_log(
          exp, state, exp.eval_split, step=step, label=f'[mapreduce] epoch {epoch + 1}')
    due = periodic.crossed(self.last_saved_step, step, config.checkpoint_every_steps)
    if self.checkpointer is not None and (due or epoch_end or last):
      exp.mode_resume = {
          'next_round': round_index + 1, 'blocks': [int(b) for b in self.blocks],
          'num_workers': self.num_workers, 'blocks_per_round': self.plan.blocks_per_round,
          'rounds': self.rounds}
      saving.save(exp, self.checkpointer, state or global_state(), phase='mapreduce',
                  loss=figures['loss'])
      self.last_saved_step = step
    return stop

  def final_report(self, local_batch_size: int) -> dict[str, Any]:
    """The ``mapreduce`` section of report.json; clears ``exp.mode_resume``."""
    self.exp.mode_resume = {}
    parallel, rounds = self.exp.config.parallel, self.rounds
    return {
        'workers': self.num_workers, 'balancer': parallel.balancer,
        'slowdown': [float(f) for f in slowdown_lib.parse_slowdown(parallel.slowdown,
                                                                    self.num_workers)],
        'num_blocks': self.plan.num_blocks, 'block_size': self.plan.block_size,
        'rounds_per_epoch': self.plan.rounds_per_epoch, 'local_batch_size': local_batch_size,
        'rounds': rounds, 'speedup': speedup_report(rounds),
        'mean_makespan_s': (float(np.mean([r['makespan_s'] for r in rounds]))
                            if rounds else 0.0),
    }

  def log_start(self, engine: str, local_batch_size: int) -> None:
    parallel = self.exp.config.parallel
    metrics_lib.log_line(
        f'[mapreduce] {self.num_workers} workers ({engine}), {self.plan.num_blocks} blocks of '
        f'{self.plan.block_size} examples, {self.plan.rounds_per_epoch} rounds/epoch, local '
        f'batch {local_batch_size}, balancer {parallel.balancer}, slowdowns '
        f'{list(slowdown_lib.parse_slowdown(parallel.slowdown, self.num_workers))}; starting '
        f'at round {self.first_round}/{self.total_rounds}.')


def _resume_point(exp: context.Experiment, num_workers: int, blocks_per_round: int,
                  total_rounds: int) -> tuple[int, np.ndarray | None, list[dict[str, Any]]]:
  """(next round, its assignment or None for an equal split, rounds reported so far)."""
  resume = exp.mode_resume
  if not resume:
    return 0, None, []
  next_round = min(int(resume['next_round']), total_rounds)
  blocks = np.asarray(resume['blocks'], np.int64)
  if (int(resume['num_workers']) != num_workers
      or int(resume['blocks_per_round']) != blocks_per_round):
    logging.warning('MapReduce resume: the checkpoint was written with %s workers and %s '
                    'blocks per round; now %d and %d. Continuing at round %d with an equal '
                    'split.', resume['num_workers'], resume['blocks_per_round'],
                    num_workers, blocks_per_round, next_round)
    blocks = None
  return next_round, blocks, list(resume['rounds'])


def log_round(exp: context.Experiment, step: int, figures: dict[str, Any]) -> None:
  metrics_lib.log_line(
      f'[mapreduce] round {figures["round"]} (epoch {figures["epoch"]}) step {step} '
      f'blocks={figures["blocks"]} busy_s=[{", ".join(f"{b:.2f}" for b in figures["busy_s"])}] '
      f'makespan={figures["makespan_s"]:.2f}s H={figures["entropy"]:.4f} '
      f'reduce={figures["reduce_s"]:.3f}s loss={figures["loss"]:.4f} '
      f'accuracy={figures["accuracy"]:.4f} next={figures["next_blocks"]}')
  if exp.writer:
    exp.writer.write(step, {'loss': figures['loss'], 'accuracy': figures['accuracy'],
                            'makespan_s': figures['makespan_s'],
                            'entropy': figures['entropy'], 'reduce_s': figures['reduce_s']},
                     prefix='mapreduce')
