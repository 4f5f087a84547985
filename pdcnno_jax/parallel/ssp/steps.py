"""The SSP worker step (run by the Ray worker actors) and the accuracy-vs-time evaluation.

``delta_k = (b_k / B) u_k``: worker k's optimizer update on its piece b_k of global batch B,
scaled so that the deltas of one clock sum to one synchronous step on B for optimizers linear
in the gradients (`ssp_train_step`). `evaluate_snapshots` gives worker 0's test accuracy
against wall time (report.json ``ssp.accuracy_vs_time``).

References:
  Ho et al., NIPS 2013 (SSP); DESIGN.md, "SSP".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import optax

from pdcnno_jax.loop import context
from pdcnno_jax.loop import evaluation
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib


def ssp_train_step(state: state_lib.TrainState, batch: steps_lib.Batch, weight: jax.Array, *,
                   graphdef, tx: optax.GradientTransformation, preprocess: steps_lib.Preprocess,
                   pass_value_fn: bool) -> tuple[state_lib.TrainState, Any, dict[str, jax.Array]]:
  """One local optimizer step whose parameter change is scaled by ``weight`` = b_k / B.

  Returns:
    ``(new_state, delta, metrics)``: ``delta`` is what was added to the parameters, the
    update this worker publishes.
  """
  updates, opt_state, new_model_state, metrics = steps_lib.optimizer_update(
      state, batch, graphdef=graphdef, tx=tx, preprocess=preprocess,
      pass_value_fn=pass_value_fn)
  delta = jax.tree.map(lambda u: (weight * u).astype(u.dtype), updates)
  params = optax.apply_updates(state.params, delta)
  new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state,
                            opt_state=opt_state)
  return new_state, delta, metrics


def make_ssp_train_step(graphdef, tx: optax.GradientTransformation,
                        preprocess: steps_lib.Preprocess, mesh: jax.sharding.Mesh) -> Callable:
  """`ssp_train_step` jitted on ``mesh`` (state replicated, batch sharded, state donated)."""
  step = functools.partial(ssp_train_step, graphdef=graphdef, tx=tx, preprocess=preprocess,
                           pass_value_fn=steps_lib.needs_value_fn(tx))
  rep, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=(rep, rep, rep),
                 donate_argnums=(0,))


def evaluate_snapshots(exp: context.Experiment, local_mesh: jax.sharding.Mesh,
                       like: state_lib.TrainState,
                       snapshots: list[tuple[float, int, Any]]) -> list[dict[str, float]]:
  """Test accuracy of worker 0's ``(wall_s, clock, (params, model_state))`` snapshots."""
  local_exp = dataclasses.replace(exp, mesh=local_mesh, writer=None)
  eval_step = steps_lib.make_eval_step(exp.graphdef, exp.preprocess, local_mesh)
  rep = sharding_lib.replicated(local_mesh)
  split = exp.eval_split
  curve = []
  with exp.timer.phase('eval'):
    for wall_s, clock, (params, model_state) in snapshots:
      state = like.replace(params=jax.device_put(params, rep),
                           model_state=jax.device_put(model_state, rep))
      result = evaluation.evaluate(local_exp, state, split, eval_step)
      curve.append({'wall_s': wall_s, 'clock': clock, 'split': split, **result})
      if exp.writer:
        exp.writer.write(clock, {'accuracy': result['accuracy'], 'wall_s': wall_s},
                         prefix=f'ssp_{split}')
  return curve
