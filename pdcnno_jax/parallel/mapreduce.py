"""MapReduce training: ``config.parallel.mode = 'mapreduce'``.

``config.parallel.engine`` says how the workers run: ``'ray'``, worker actors of one driver
process (`parallel.ray_engine.mapreduce`), or ``'jax'``, one worker per process joined by
jax.distributed (this module). Split, Map and the round bookkeeping are the same for both
(`mapreduce_core`).

The jax engine. Map: every process trains its own copy on its blocks of the round, in local
batches of ``batch_size // K`` examples, data parallel over its own devices.
Reduce: parameters, model state and the floating optimizer state are averaged over the workers
weighted by the examples each trained (`collectives.TreeAverager`, one all-reduce); integer
counters become the mean, the synchronous-equivalent step.
Balance: each worker's monitor measures its busy time (device work plus simulated slowdown);
the rows are all-gathered and the balancer assigns the next round's blocks from the measured
speeds. Round 0 is the equal split.
Checkpoints at round boundaries hold the next round and its assignment in ``exp.mode_resume``,
so a killed run resumes at the round after the last one saved, with the same assignment.
The report has per-round blocks, examples, busy/idle seconds, makespan, entropy, Reduce time
and the speed-up T_1 / T_p (`speedup_report`).

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt): Split / Map / Reduce, LBRLA, speed-up.
  MR-FPDCNN paper (papers/mr_fpdcnn_taylor_glowworm_zh.txt): DLBPCE, computing entropy.
  DESIGN.md, "MapReduce training", "LBRLA", "DLBPCE".
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import batching
from pdcnno_jax.loop import context
from pdcnno_jax.loop import placement
from pdcnno_jax.parallel import balancers
from pdcnno_jax.parallel import collectives
from pdcnno_jax.parallel import mapreduce_core as core
from pdcnno_jax.parallel import monitor as monitor_lib
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.parallel.ray_engine import mapreduce as ray_mapreduce
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib

MESH = 'global'  # Collectives span every process (the Ray driver is a single process).
USES_CHECKPOINTER = True

# The Split and report helpers of the mode, whichever engine runs it.
BlockPlan = core.BlockPlan
make_block_plan = core.make_block_plan
worker_share = core.worker_share
local_steps = core.local_steps
round_report = core.round_report
speedup_report = core.speedup_report
map_phase = core.map_phase


def validate(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> None:
  """MapReduce needs blocks of an in-memory data set and mini-batch local training."""
  core.validate(config, dataset)
  if config.parallel.engine == 'ray':
    ray_mapreduce.validate(config, dataset)


def _warm_up(worker: core.Worker, averager: collectives.TreeAverager,
             proc_mesh: jax.sharding.Mesh, state: state_lib.TrainState,
             batch: dict[str, jax.Array]) -> None:
  """Compiles and runs once every jitted piece (on a copy), so no round times a compile.

  Every process calls it at the same point: it runs one Reduce and one all-gather.
  """
  scratch = jax.tree.map(jnp.copy, state)
  scratch, _ = jax.block_until_ready(worker.step_fn(scratch, batch))
  jax.block_until_ready(averager(scratch, 1.0 / jax.process_count()))
  collectives.allgather_rows(
      np.zeros(len(balancers.VECTOR_FIELDS) + len(core.EXTRA_FIELDS)), proc_mesh)
  worker.warm = True


@functools.lru_cache(maxsize=8)
def _averager(out_sharding, process_mesh) -> collectives.TreeAverager:
  return collectives.TreeAverager(out_sharding, process_mesh)


def _make_worker(exp: context.Experiment, tx, local_mesh: jax.sharding.Mesh,
                 batch: int) -> core.Worker:
  parallel = exp.config.parallel
  split = exp.dataset.host_splits['train']
  return core.Worker(
      data_sharding=sharding_lib.batch_sharded(local_mesh),
      step_fn=core.local_train_step(exp.graphdef, tx, exp.preprocess, local_mesh),
      slow=slowdown_lib.Slowdown.from_config(parallel, jax.process_index(),
                                             jax.process_count(), seed=exp.config.seed),
      monitor=monitor_lib.WorkerMonitor(devices=list(local_mesh.devices.flat)),
      images=split.images, labels=split.labels, batch=batch)


def _reduce(averager: collectives.TreeAverager, proc_mesh: jax.sharding.Mesh,
            state: state_lib.TrainState, figures: dict[str, Any], trained: np.ndarray,
            round_start: float) -> tuple[state_lib.TrainState, np.ndarray]:
  """Reduce: the sample-weighted average, then every worker's round figures all-gathered."""
  start = time.perf_counter()
  state = averager(state, figures['samples'] / trained.sum())
  jax.block_until_ready(state)
  reduce_s = time.perf_counter() - start
  row = core.figures_row(figures, reduce_s, time.perf_counter() - round_start)
  return state, collectives.allgather_rows(row, proc_mesh).astype(np.float64)


def train(exp: context.Experiment, state: state_lib.TrainState, *, tx,
          checkpointer: checkpointing.Checkpointer | None = None
          ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """MapReduce training for ``config.num_epochs`` epochs (see the module docstring).

  With ``parallel.engine='jax'`` every process must call this at the same point (it runs
  collectives); with ``'ray'`` the one driver process calls it. ``config.max_steps`` ends
  training after the first round that reaches it.

  Args:
    exp: the experiment (config, dataset, global mesh, preprocess, graphdef, timer, writer,
      mode_resume).
    state: the `TrainState`, replicated on ``exp.mesh``.
    tx: the optimizer whose state is ``state.opt_state``.
    checkpointer: saves at round boundaries (None: no checkpoints).

  Returns:
    ``(state, report)``: the averaged state replicated on ``exp.mesh`` and the JSON-able report
    (per-round figures, speed-up).

  Raises:
    ValueError: a streamed data set, full-batch CGMSE, or Split settings that do not fit.
    checks.NonFiniteLossError: the averaged loss of a round is NaN/inf.
  """
  config = exp.config
  if config.parallel.engine == 'ray':
    return ray_mapreduce.train(exp, state, tx=tx, checkpointer=checkpointer)
  core.validate(config, exp.dataset)
  num_workers, me = jax.process_count(), jax.process_index()
  local_mesh = sharding_lib.make_mesh(placement.local_devices(exp.mesh))
  batch = batching.local_batch_size(config.data.batch_size, num_workers,
                                    local_mesh.devices.size)
  plan = make_block_plan(exp.dataset.num_examples['train'], int(config.parallel.num_blocks),
                         int(config.parallel.rounds_per_epoch), num_workers=num_workers,
                         local_batch_size=batch)
  worker = _make_worker(exp, tx, local_mesh, batch)
  proc_mesh = collectives.process_mesh(list(exp.mesh.devices.flat))
  averager = _averager(sharding_lib.replicated(local_mesh), proc_mesh)
  local_state = placement.to_local(state, sharding_lib.replicated(local_mesh))
  rounds = core.Rounds.start(exp, plan, num_workers, checkpointer=checkpointer,
                             step=int(jax.device_get(local_state.step)))
  rounds.log_start('jax.distributed', batch)

  for round_index in range(rounds.first_round, rounds.total_rounds):
    _, _, round_blocks = rounds.round_indices(round_index)
    indices = worker_share(round_blocks, rounds.blocks, me)
    if not worker.warm:
      with exp.timer.phase('compile'):
        _warm_up(worker, averager, proc_mesh, local_state, next(worker.batches(indices)))
    round_start = time.perf_counter()
    step_before = int(jax.device_get(local_state.step))
    with exp.timer.phase('train'):
      local_state, figures = map_phase(worker, local_state, indices)
    with exp.timer.phase('reduce'):
      local_state, gathered = _reduce(
          averager, proc_mesh, local_state, figures,
          local_steps(rounds.blocks, plan.block_size, batch) * batch, round_start)
    if rounds.close(round_index, gathered, first_step=step_before,
                    step=int(jax.device_get(local_state.step)),
                    global_state=lambda: placement.to_global(local_state, exp.mesh)):
      break

  return placement.to_global(local_state, exp.mesh), rounds.final_report(batch)
