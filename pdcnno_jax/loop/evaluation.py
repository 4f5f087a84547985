"""Exact evaluation over a whole split, evaluate-and-log, and dead-map counts, for every mode."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.diagnostics import dead_maps
from pdcnno_jax.loop import context
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib


def evaluate(exp: context.Experiment, state: state_lib.TrainState, split: str,
             eval_step: Callable | None = None) -> dict[str, float]:
  """Exact loss and accuracy over every example of ``split`` (padded batches are masked)."""
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


def evaluate_and_log(exp: context.Experiment, state: state_lib.TrainState, split: str,
                     eval_step: Callable | None = None, *, step: int,
                     label: str) -> dict[str, float]:
  """Evaluates on ``split``, logs one line and writes the metrics at ``step``."""
  with exp.timer.phase('eval'):
    result = evaluate(exp, state, split, eval_step)
  metrics_lib.log_line(f'{label} {split}: loss={result["loss"]:.4f} '
                       f'accuracy={result["accuracy"]:.4f}')
  if exp.writer:
    exp.writer.write(step, result, prefix=split)
  return result


def dead_map_report(exp: context.Experiment, state: state_lib.TrainState, *,
                    label: str) -> dict[str, Any] | None:
  """Dead and near-dead maps of every conv layer on the fixed held-out examples (logged)."""
  diagnostics = exp.config.diagnostics
  if diagnostics.dead_map_examples <= 0:
    return None
  batches = dead_maps.held_out_batches(
      exp.dataset, diagnostics.dead_map_examples, batch_size=exp.config.data.eval_batch_size,
      sharding=sharding_lib.batch_sharded(exp.mesh))
  with exp.timer.phase('eval'):
    counts = dead_maps.count_dead_maps(exp.graphdef, state, batches, exp.preprocess,
                                       near_dead_ratio=diagnostics.near_dead_ratio)
  metrics_lib.log_line(f'[{label}] {dead_maps.summary_line(counts)}')
  if exp.writer:
    exp.writer.write(int(jax.device_get(state.step)), dead_maps.scalars(counts),
                     prefix=f'{label}_dead_maps')
  return counts
