"""SSP training: ``config.parallel.mode = 'ssp'``, run on Ray by one driver process.

The driver (`parallel/ray_engine/ssp_driver`) starts ``parallel.num_workers`` worker actors and
``parallel.ps_shards`` parameter-server shards. Worker k at clock c reads parameters holding
every update through clock c - s - 1 (s = ``parallel.staleness``; 0 is BSP, -1 ASP), takes one
step on its piece b_k of global batch c and pushes ``delta_k = (b_k / B) u_k``, so that for
optimizers linear in the gradients the deltas of one clock sum to one synchronous step on B and
s = 0 reproduces synchronous training. Pieces are equal, or proportional to the speeds measured
over the first ``ssp_warmup_steps`` clocks (``ssp_batch_balancer='proportional'``);
`slowdown.Slowdown` injects persistent and transient stragglers. This module is the mode's
interface (`modes.Mode`): the checks that need the data set, then the job.

References:
  Ho et al., "More effective distributed ML via a stale synchronous parallel parameter
    server", NIPS 2013 (SSP, section 2).
  papers/delay_sync_parallel.txt: delay synchronization = SSP with threshold s.
  DESIGN.md, "SSP".
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import context
from pdcnno_jax.parallel.ray_engine import ssp_driver
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import state as state_lib

MESH = 'local'  # Workers never meet in a collective: each actor trains on its own devices.
USES_CHECKPOINTER = False  # Per-worker checkpoints and server snapshots instead.
BATCH_BALANCERS = ('equal', 'proportional')


def validate(config: ml_collections.ConfigDict, dataset: input_pipeline.Dataset) -> None:
  """SSP needs an in-memory data set (each worker reads its own rows) and sane Ray keys."""
  if not dataset.in_memory:
    raise ValueError(
        f'parallel.mode=ssp needs an in-memory data set (each worker reads its own rows); '
        f'{dataset.name} is streamed. Set config.data.in_memory=True or use parallel.mode='
        "'sync'.")
  ssp_driver.validate(config)


def train(exp: context.Experiment, state: state_lib.TrainState, *, tx,
          checkpointer: checkpointing.Checkpointer | None = None
          ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """SSP training on Ray for ``config.num_epochs`` epochs (``config.max_steps`` caps clocks).

  Args:
    exp: the experiment (config, workdir, dataset, mesh, preprocess, graphdef, timer, writer).
    state: the starting `TrainState`.
    tx: the optimizer whose state is ``state.opt_state``.
    checkpointer: must be None: SSP keeps per-worker checkpoints (`USES_CHECKPOINTER`).

  Returns:
    ``(state, report)``: the final state replicated on ``exp.mesh`` and report.json's ``ssp``.

  Raises:
    ValueError: a streamed data set, bad ``config.parallel`` SSP keys, or a job of several
      jax.distributed processes (the driver is one process).
  """
  if checkpointer is not None:
    raise ValueError('SSP training keeps per-worker checkpoints; pass checkpointer=None.')
  validate(exp.config, exp.dataset)
  if jax.process_count() > 1:
    raise ValueError(
        'parallel.mode=ssp runs from one driver process that starts parallel.num_workers Ray '
        f'actors, but this job has {jax.process_count()} processes: drop the launcher and '
        '--num_processes.')
  return ssp_driver.train(exp, state, tx=tx)
