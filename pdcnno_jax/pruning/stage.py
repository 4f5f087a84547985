"""The pruning stage of the pipeline: score -> select -> mask, one-shot or iterative, compact.

``run_pruning`` is a plain function of (config.prune, state) -> state like every stage: the
trainer pre-trains the dense model (``prune.pretrain_fraction`` / ``prune.pretrain_epochs``),
calls it, then trains the returned model for ``config.num_epochs``. With
``prune.iterations = k > 1`` the stage runs k rounds of (score, select, mask) and calls the
trainer's ``finetune_fn`` for ``prune.finetune_epochs`` between rounds; the per-round targets
follow :func:`selection.round_schedule`. With ``prune.compact`` the masked model is finally
rebuilt as a narrower dense model (new graphdef: compile new steps for it).

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt), model compression phase (pre-train on
  random data, FMP, "this pruning strategy can be repeated"); MR-FPDCNN paper, FMPTL;
  DESIGN.md, "FMP", "FMPTL", "Masks and compaction".
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from pdcnno_jax.models import counting
from pdcnno_jax.pruning import compaction, masking, scorers, selection
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps

Batch = Mapping[str, Any]
FinetuneFn = Callable[[nnx.GraphDef, state_lib.TrainState, int], state_lib.TrainState]
METHODS = ('none',) + tuple(sorted(scorers.SCORERS))
_DATA_METHODS = ('fmp', 'fmptl')


def _batch_examples(batch: Batch) -> int:
  """Real examples in a batch (``batch['mask']`` marks padding), global arrays included."""
  if 'mask' in batch:
    return int(round(float(jnp.sum(batch['mask']))))
  return int(np.shape(batch['label'])[0])


def take_scoring_batches(batches: Iterable[Batch] | Callable[[], Iterable[Batch]],
                         num_examples: int) -> list[Batch]:
  """Whole batches from ``batches`` until at least ``num_examples`` real examples.

  Args:
    batches: an iterable of batches, or a callable returning one.
    num_examples: examples wanted (``prune.score_examples``); <= 0 takes every batch (the
      iterable must then be finite).

  Returns:
    The batches, kept so every round of an iterative schedule scores the same examples.

  Raises:
    ValueError: when no batch is available.
  """
  taken, count = [], 0
  for batch in (batches() if callable(batches) else batches):
    taken.append(batch)
    count += _batch_examples(batch)
    if 0 < num_examples <= count:
      break
  if not taken:
    raise ValueError('The scoring set is empty: pass training batches to run_pruning.')
  return taken


def _counts(model: nnx.Module) -> dict[str, Any]:
  totals = counting.totals(model)
  return {'channels': {k: int(v) for k, v in counting.kept_channels(model).items()},
          'params': int(totals['params']), 'macs': int(totals['macs'])}


def compare_latency(models: Mapping[str, tuple[nnx.GraphDef, state_lib.TrainState]],
                    batch: Batch, preprocess: Callable[[Any], Any], mesh: Mesh | None, *,
                    tx: optax.GradientTransformation | None = None,
                    reps: int = 10) -> dict[str, Any]:
  """Median latency of the jitted inference pass (and training step) of several models.

  The models are timed in turn, ``reps`` times each after two warm-up calls, so that load
  changes on a shared machine affect them alike.

  Args:
    models: name -> ``(graphdef, state)``, e.g. ``{'masked': ..., 'compacted': ...}``.
    batch: one batch ``{'image', 'label'}`` with a size divisible by the mesh's devices.
    preprocess: uint8 images -> model input.
    mesh: device mesh (None: every device).
    tx: when given, also time ``steps.make_train_step(graphdef, tx, ...)`` (not donating,
      the states are left unchanged).
    reps: timed calls per model.

  Returns:
    ``{'batch_size', 'inference_ms': {name: ms}, 'train_step_ms': {name: ms}}`` (the last only
    with ``tx``).
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  data = sharding_lib.batch_sharded(mesh)
  batch = {k: batch[k] for k in ('image', 'label')}
  batch = {k: jax.make_array_from_callback(np.shape(v), data, lambda i, v=v: np.asarray(v)[i])
           if not isinstance(v, jax.Array) else v for k, v in batch.items()}
  calls = {'inference_ms': {}, 'train_step_ms': {}}
  for name, (graphdef, state) in models.items():
    eval_step = steps.make_eval_step(graphdef, preprocess, mesh)
    calls['inference_ms'][name] = functools.partial(eval_step, state, batch)
    if tx is not None:
      train_step = steps.make_train_step(graphdef, tx, preprocess, mesh, donate=False)
      calls['train_step_ms'][name] = functools.partial(train_step, state, batch)
  result: dict[str, Any] = {'batch_size': int(np.shape(batch['label'])[0])}
  for kind, fns in calls.items():
    if not fns:
      continue
    times = {name: [] for name in fns}
    for rep in range(reps + 2):
      for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        if rep >= 2:
          times[name].append(time.perf_counter() - start)
    result[kind] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
  return result


def _validate(prune_config: ml_collections.ConfigDict) -> None:
  if prune_config.method not in METHODS:
    raise ValueError(f'Unknown prune.method {prune_config.method!r}; choose from {METHODS}.')
  if prune_config.selection not in selection.SELECTIONS:
    raise ValueError(f'Unknown prune.selection {prune_config.selection!r}; choose from '
                     f'{selection.SELECTIONS}.')
  if int(prune_config.iterations) < 1:
    raise ValueError(f'prune.iterations must be >= 1, got {prune_config.iterations}.')
  if int(prune_config.finetune_epochs) < 0:
    raise ValueError(f'prune.finetune_epochs must be >= 0, got {prune_config.finetune_epochs}.')


def run_pruning(prune_config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                state: state_lib.TrainState,
                scoring_batches: Iterable[Batch] | Callable[[], Iterable[Batch]],
                preprocess: Callable[[Any], Any], mesh: Mesh | None,
                model_config: ml_collections.ConfigDict, num_classes: int,
                input_shape: tuple[int, int, int], finetune_fn: FinetuneFn | None = None, *,
                seed: int = 0, tx: optax.GradientTransformation | None = None,
                latency_reps: int = 10
                ) -> tuple[nnx.GraphDef, state_lib.TrainState, dict[str, Any]]:
  """Prunes feature maps of a (pre-trained) model; optionally compacts it.

  Args:
    prune_config: the ``config.prune`` section (method, score_examples, norm_order,
      selection, threshold, ratio, target_mac_reduction, min_channels, iterations,
      finetune_epochs, compact).
    graphdef: the model's graph definition.
    state: the pre-trained TrainState.
    scoring_batches: training batches ``{'image', 'label'[, 'mask']}`` (an iterable or a
      callable returning one); the first ``prune.score_examples`` examples are scored, the
      same ones in every round. Unused by ``random`` and ``l1``.
    preprocess: uint8 images -> model input, traced inside jit.
    mesh: device mesh with a ``'data'`` axis (None: every device).
    model_config: the ``config.model`` section (its ``name`` names the compacted model).
    num_classes: classifier outputs.
    input_shape: ``(H, W, C)`` of the images.
    finetune_fn: ``finetune_fn(graphdef, state, epochs) -> state``, called between the rounds
      of an iterative schedule (not after the last round: the trainer then trains for
      ``config.num_epochs``).
    seed: seed of the ``random`` scorer (round i uses ``seed + i``).
    tx: the training optimizer; with compaction, the masked and compacted training steps are
      timed too.
    latency_reps: with compaction, time the masked and compacted models this many times on
      the first scoring batch (:func:`compare_latency`); 0 skips the measurement.

  Returns:
    ``(graphdef, state, report)``: the pruned (and, with ``prune.compact``, compacted) model
    and a JSON-serialisable report: method, selection, channels kept per layer before/after,
    params and MACs (multiply-accumulates per example) before/after and their ratios, the
    per-round figures, the scored example count, scoring / fine-tuning / compaction seconds,
    the compacted ``architecture`` (model name and constructor arguments: see
    ``compaction.build_architecture``) and, with compaction, ``latency`` (masked vs
    compacted inference and training-step milliseconds, and their ratios).

  Raises:
    ValueError: for an invalid config, an empty scoring set, or an unreachable MAC target.
  """
  _validate(prune_config)
  before = _counts(state_lib.merge_model(graphdef, state))
  report: dict[str, Any] = {
      'method': prune_config.method, 'selection': prune_config.selection,
      'iterations': int(prune_config.iterations), 'min_channels': int(prune_config.min_channels),
      'channels_before': before['channels'], 'params_before': before['params'],
      'macs_before': before['macs'], 'rounds': [], 'scored_examples': 0,
      'scoring_seconds': 0.0, 'finetune_seconds': 0.0, 'compacted': False,
      'compaction_seconds': 0.0}
  if prune_config.method == 'none':
    report.update(channels_after=before['channels'], params_after=before['params'],
                  macs_after=before['macs'], mac_reduction=1.0, param_reduction=1.0)
    return graphdef, state, report

  scorer = scorers.get_scorer(prune_config.method)
  batches: list[Batch] = []
  if prune_config.method in _DATA_METHODS:
    batches = take_scoring_batches(scoring_batches, int(prune_config.score_examples))
    report['scored_examples'] = sum(_batch_examples(b) for b in batches)
  reference_macs = selection.dense_macs(state_lib.merge_model(graphdef, state))
  rounds = int(prune_config.iterations)
  for round_index in range(1, rounds + 1):
    ratio, reduction = selection.round_schedule(
        round_index, rounds, float(prune_config.ratio),
        float(prune_config.target_mac_reduction))
    start = time.perf_counter()
    scores = scorer(graphdef, state, batches, preprocess, mesh=mesh,
                    norm_order=float(prune_config.norm_order), seed=seed + round_index)
    scoring_seconds = time.perf_counter() - start
    model = state_lib.merge_model(graphdef, state)
    masks = selection.select(
        prune_config.selection, scores, masking.read_masks(model), model,
        threshold=float(prune_config.threshold), ratio=ratio, target_reduction=reduction,
        min_channels=int(prune_config.min_channels), reference_macs=reference_macs)
    state = masking.apply_masks(graphdef, state, masks)
    counts = _counts(state_lib.merge_model(graphdef, state))
    report['scoring_seconds'] += scoring_seconds
    report['rounds'].append({'round': round_index, 'scoring_seconds': scoring_seconds,
                             **counts})
    logging.info('Pruning round %d/%d (%s, %s): %d -> %d MACs, channels %s', round_index,
                 rounds, prune_config.method, prune_config.selection, before['macs'],
                 counts['macs'], counts['channels'])
    if (round_index < rounds and finetune_fn is not None
        and int(prune_config.finetune_epochs) > 0):
      start = time.perf_counter()
      state = finetune_fn(graphdef, state, int(prune_config.finetune_epochs))
      report['finetune_seconds'] += time.perf_counter() - start

  after = _counts(state_lib.merge_model(graphdef, state))
  if prune_config.compact:
    masked = (graphdef, state)
    start = time.perf_counter()
    graphdef, state = compaction.compact(graphdef, state, model_config, num_classes,
                                         input_shape)
    report['compaction_seconds'] = time.perf_counter() - start
    report['compacted'] = True
    compacted = _counts(state_lib.merge_model(graphdef, state))
    if (compacted['params'], compacted['macs']) != (after['params'], after['macs']):
      raise AssertionError(f'Compaction changed the counts: {after} -> {compacted}.')
    batch = batches[0] if batches else next(
        iter(scoring_batches() if callable(scoring_batches) else scoring_batches), None)
    if latency_reps > 0 and batch is not None:
      latency = compare_latency({'masked': masked, 'compacted': (graphdef, state)}, batch,
                                preprocess, mesh, tx=tx, reps=latency_reps)
      for kind in ('inference_ms', 'train_step_ms'):
        if kind in latency:
          times = latency[kind]
          latency[kind.replace('_ms', '_speedup')] = times['masked'] / times['compacted']
      report['latency'] = latency
  model = state_lib.merge_model(graphdef, state)
  report.update(
      channels_after=after['channels'], params_after=after['params'],
      macs_after=after['macs'], mac_reduction=before['macs'] / after['macs'],
      param_reduction=before['params'] / after['params'],
      architecture={'model_name': model_config.name,
                    'constructor_kwargs': compaction.architecture_kwargs(model)})
  return graphdef, state, report
