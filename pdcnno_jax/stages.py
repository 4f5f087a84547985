"""The stages that run before training: weight initialisation and feature-map pruning.

Each stage is a plain function of (experiment, state) so that tests, Colab and the benchmarks
call the same code as ``main.py``. Both are deterministic: after a kill before their result is
saved they run again and produce the same state.

References:
  MR-FPDCNN paper (papers/mr_fpdcnn_taylor_glowworm_zh.txt): IFAS initialisation, FMPTL.
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt): FMP after pre-training on a random subset.
  DESIGN.md, "IFAS", "FMP", "FMPTL", "Masks and compaction".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.diagnostics import dead_maps
from pdcnno_jax.init import methods as init_methods
from pdcnno_jax.loop import context
from pdcnno_jax.loop import evaluation
from pdcnno_jax.loop import saving
from pdcnno_jax.optim import factory as optim_factory
from pdcnno_jax.parallel import sync
from pdcnno_jax.pruning import compaction, stage
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib


def fresh_opt_state(tx, params):
  """``tx.init(params)`` in buffers of its own.

  Some optimizer states start as the parameters themselves (CGMSE keeps the previous
  iterate); the training step donates both, and XLA refuses one buffer donated twice.
  """
  return jax.tree.map(jnp.copy, tx.init(params))


def first_batches(exp: context.Experiment, count: int, *,
                  seed_offset: int) -> list[dict[str, Any]]:
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


def initialise(exp: context.Experiment, state: state_lib.TrainState,
               tx) -> state_lib.TrainState:
  """IFAS / GSO / LSUV starting point; its cost in gradient steps goes in the report."""
  method = exp.config.init.method
  module = init_methods.module_for(method)
  batches = first_batches(exp, max(1, module.num_batches_needed(exp.config.init)),
                          seed_offset=1)
  params, init_report = module.initialize(
      exp.config.init, exp.graphdef, state, batches, exp.preprocess, exp.mesh,
      jax.random.key(exp.config.seed))
  exp.stage_reports['init'] = init_report
  metrics_lib.log_line(f'[init] {method}: {init_report.get("gradient_steps", 0)} gradient '
                       f'steps charged, {init_report.get("wall_time_s", 0):.1f} s.')
  return state.replace(params=params, opt_state=fresh_opt_state(tx, params))


def pretraining_subset(exp: context.Experiment) -> input_pipeline.Dataset:
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


def _pretrain(exp: context.Experiment, state: state_lib.TrainState,
              subset: input_pipeline.Dataset) -> state_lib.TrainState:
  """PDCNNO's short pre-training on the subset, with its own optimizer and schedule."""
  config = exp.config
  pretrain_steps = config.prune.pretrain_epochs * input_pipeline.steps_per_epoch(
      subset, 'train', exp.global_batch_size)
  pretrain_tx = optim_factory.build_optimizer(
      config.optimizer, total_steps=max(1, pretrain_steps),
      steps_per_epoch=max(1, pretrain_steps // max(1, config.prune.pretrain_epochs)))
  state = state.replace(opt_state=fresh_opt_state(pretrain_tx, state.params))
  return sync.train_epochs(exp, state, tx=pretrain_tx, num_epochs=config.prune.pretrain_epochs,
                           dataset=subset, phase='prune_pretrain', log_prefix='pretrain')


def _finetune_fn(exp: context.Experiment):
  """Fine-tuning between the rounds of an iterative pruning schedule."""

  def finetune(graphdef, pruned_state, epochs):
    exp.graphdef = graphdef
    finetune_tx = exp.build_optimizer(num_epochs=epochs)
    pruned_state = pruned_state.replace(step=jnp.zeros((), jnp.int32),
                                        opt_state=fresh_opt_state(finetune_tx, pruned_state.params))
    return sync.train_epochs(exp, sharding_lib.replicate(pruned_state, exp.mesh),
                             tx=finetune_tx, num_epochs=epochs, phase='prune_finetune',
                             log_prefix='finetune')

  return finetune


def prune(exp: context.Experiment, state: state_lib.TrainState) -> state_lib.TrainState:
  """Pre-train on a random subset, score, mask, optionally compact (FMP / FMPTL / l1 / random).

  The dead maps of the pre-trained model are counted before scoring, and the report says how
  many of the removed maps were dead (a criterion that removes only dead maps changes no
  prediction).
  """
  config = exp.config
  eval_split = exp.eval_split
  subset = pretraining_subset(exp)
  start = time.perf_counter()
  state = _pretrain(exp, state, subset)
  pretrain_seconds = time.perf_counter() - start
  dense_eval = evaluation.evaluate(exp, state, eval_split)
  dead_before = evaluation.dead_map_report(exp, state, label='prune')
  scoring = lambda: input_pipeline.train_batches(
      exp.dataset, global_batch_size=exp.global_batch_size, epoch=0, seed=config.seed + 2,
      sharding=sharding_lib.batch_sharded(exp.mesh))
  target = stage.PruningTarget(exp.graphdef, state, config.model, exp.dataset.num_classes,
                               exp.dataset.image_shape, exp.preprocess, exp.mesh,
                               tx=exp.build_optimizer())
  graphdef, state, prune_report = stage.run_pruning(
      target, config.prune, scoring_batches=scoring, finetune_fn=_finetune_fn(exp),
      seed=config.seed)
  exp.graphdef = graphdef
  state = sharding_lib.replicate(state, exp.mesh)
  model = state_lib.merge_model(graphdef, jax.device_get(state))
  if prune_report['compacted']:
    exp.model_overrides = saving.architecture_overrides(compaction.architecture_kwargs(model))
  pruned_eval = evaluation.evaluate(exp, state, eval_split)
  prune_report.update({
      'pretrain_seconds': pretrain_seconds,
      'pretrain_examples': subset.num_examples['train'],
      f'{eval_split}_before_pruning': dense_eval,
      f'{eval_split}_after_pruning_before_finetuning': pruned_eval,
  })
  if dead_before is not None:
    prune_report['dead_maps_before'] = dead_before
    prune_report['removed_dead'] = dead_maps.removed_dead(
        dead_before, _kept_masks(prune_report['kept_indices'], dead_before))
  exp.stage_reports['prune'] = prune_report
  removed = prune_report.get('removed_dead', {})
  metrics_lib.log_line(
      f'[prune] {config.prune.method}: MACs {prune_report["macs_before"]} -> '
      f'{prune_report["macs_after"]}; {eval_split} accuracy {dense_eval["accuracy"]:.4f}'
      f' -> {pruned_eval["accuracy"]:.4f} before fine-tuning; removed (dead of them): '
      + ', '.join(f'{k} {v["removed"]} ({v["removed_dead"]})' for k, v in removed.items()))
  return state


def _kept_masks(kept_indices: dict[str, list[int]],
                dead_before: dict[str, Any]) -> dict[str, np.ndarray]:
  """0/1 masks over each conv layer's unpruned channels, from the kept indices."""
  masks = {}
  for name, layer in dead_before['layers'].items():
    masks[name] = np.zeros(layer['channels'], np.int8)
    masks[name][kept_indices[name]] = 1
  return masks


def run_stages(exp: context.Experiment, state: state_lib.TrainState, tx, checkpointer):
  """Init and pruning stages of a fresh run; returns the state to train.

  The stages never checkpoint mid-way (they are deterministic and re-run after a kill);
  their result is saved at step 0 with the architecture and the stage reports, so a resume
  after that point skips them.
  """
  config = exp.config
  if config.init.method != 'he':
    with exp.timer.phase('init'):
      state = initialise(exp, state, tx)
  if config.prune.method != 'none':
    with exp.timer.phase('prune'):
      state = prune(exp, state)
    # The compacted model is a new parameter tree: fresh optimizer state, step 0.
    state = state.replace(step=jnp.zeros((), jnp.int32),
                          opt_state=fresh_opt_state(tx, state.params))
    state = sharding_lib.replicate(state, exp.mesh)
  if checkpointer and (config.init.method != 'he' or config.prune.method != 'none'):
    saving.save(exp, checkpointer, state, phase='stages')
  return state
