"""``train_and_evaluate(config, workdir)``: one experiment, start to finish, as a function.

The only layer that knows every other one::

  setup (data, mesh for the mode) -> model -> stages (init, prune) -> mode.train
        -> final evaluation -> report.json

The workdir alone decides whether to resume: if it holds a checkpoint, the run continues from
it (a compacted architecture and the stage reports are restored from the checkpoint's metadata
and the stages are not repeated). The batch order is a pure function of ``(seed, epoch,
step)``, so a killed and resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from pdcnno_jax import config_validation
from pdcnno_jax import modes
from pdcnno_jax import stages
from pdcnno_jax.data import input_pipeline
from pdcnno_jax.loop import context
from pdcnno_jax.loop import evaluation
from pdcnno_jax.loop import saving
from pdcnno_jax.models import conv as conv_lib
from pdcnno_jax.models import counting
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import report as report_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib


def setup(config: ml_collections.ConfigDict, workdir: str) -> context.Experiment:
  """Resolves the config, builds the mesh the mode needs and loads the data."""
  timer = report_lib.PhaseTimer()
  config = config.copy_and_resolve_references()
  with config.unlocked():  # Loop-friendly convolution gradients for line searches.
    config.model.conv_gradients = conv_lib.resolve_conv_gradients(
        config.model.conv_gradients, config.optimizer.name)
  mode = modes.get_mode(config.parallel.mode)
  # A 'local' mode never meets the other processes in a collective (a worker may die and
  # rejoin alone): every process runs the stages and the evaluation on its own devices.
  mesh = sharding_lib.make_mesh(jax.local_devices() if mode.MESH == 'local' else None)
  sharding_lib.check_global_batch(config.data.batch_size, mesh)
  with timer.phase('data_load'):
    dataset = input_pipeline.load_dataset(config.data, seed=config.seed)
  mode.validate(config, dataset)
  preprocess = functools.partial(input_pipeline.normalize, dataset=dataset)
  return context.Experiment(config=config, workdir=workdir, dataset=dataset, mesh=mesh,
                            preprocess=preprocess, timer=timer,
                            writer=metrics_lib.MetricWriter(workdir))


def model_report(model: nnx.Module) -> dict[str, Any]:
  """Parameters and MACs of ``model``, in total and per layer."""
  rows = counting.count_layers(model)
  return {'params': sum(r.params for r in rows), 'macs': sum(r.macs for r in rows),
          'macs_note': 'FLOPs counted as multiply-accumulates (MACs) per example',
          'layers': [dataclasses.asdict(r) for r in rows]}


def _final_report(exp: context.Experiment, state: state_lib.TrainState,
                  test: dict[str, float], resumed_from: int | None,
                  start: float) -> dict[str, Any]:
  final_model = state_lib.merge_model(exp.graphdef, jax.device_get(state))
  return {
      'config': exp.config.to_dict(),
      'test': test,
      'resumed_from_step': resumed_from,
      'steps': int(jax.device_get(state.step)),
      'wall_time_s': {'total': time.perf_counter() - start, **exp.timer.seconds},
      'peak_host_rss_bytes': report_lib.peak_host_rss_bytes(),
      'peak_device_memory_bytes': report_lib.peak_device_memory_bytes(),
      'model': model_report(final_model),
      'devices': {'count': jax.device_count(), 'processes': jax.process_count(),
                  'platform': jax.default_backend()},
      'diagnostics': {'dead_maps': evaluation.dead_map_report(exp, state, label='final')},
      **exp.stage_reports,
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the experiment described by ``config`` in ``workdir``; returns the report.

  Args:
    config: experiment config (see configs/default.py for every key).
    workdir: run directory; if it holds a checkpoint the run resumes from it.

  Returns:
    The report also written to ``<workdir>/report.json``.

  Raises:
    config_validation.ConfigError: an invalid config (before any data loads).
    config_validation.WorkdirError: a workdir that cannot hold the run (before any work).
  """
  start = time.perf_counter()
  config_validation.preflight(config, workdir)
  config_validation.check_devices(config, jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  exp = setup(config, workdir)
  mode = modes.get_mode(exp.config.parallel.mode)
  checkpointer = checkpointing.Checkpointer.from_config(
      os.path.join(workdir, 'checkpoints'), exp.config) if mode.USES_CHECKPOINTER else None
  resumed_from = checkpointer.latest_step() if checkpointer else None
  if resumed_from is not None:
    saving.restore_meta(exp, checkpointer.read_meta())

  tx = exp.build_optimizer()
  exp.graphdef, state = state_lib.create_train_state(exp.build_model(), tx)
  state = sharding_lib.replicate(state, exp.mesh)
  if resumed_from is not None:
    state, _ = checkpointer.restore(state)
    metrics_lib.log_line(f'Resuming from step {resumed_from} in {workdir}.')
  else:
    state = stages.run_stages(exp, state, tx, checkpointer)
    if checkpointer:
      checkpointer.set_norm_reference(state.params)

  state, mode_report = mode.train(exp, state, tx=tx, checkpointer=checkpointer)
  if mode_report:
    exp.stage_reports[exp.config.parallel.mode] = mode_report
  if checkpointer:
    checkpointer.close()

  with exp.timer.phase('eval'):
    test = evaluation.evaluate(exp, state, 'test')
  metrics_lib.log_line(f'Test accuracy {test["accuracy"]:.4f}, loss {test["loss"]:.4f}.')
  report = _final_report(exp, state, test, resumed_from, start)
  if exp.writer:
    exp.writer.write(report['steps'], {f'test_{k}': v for k, v in test.items()})
    exp.writer.close()
  report_lib.write_report(workdir, report)
  return report
