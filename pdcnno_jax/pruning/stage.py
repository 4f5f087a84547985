"""The pruning stage of the pipeline: score -> select -> mask, one-shot or iterative, compact.

``run_pruning(target, config.prune, ...)`` is a plain function like every stage: the trainer
pre-trains the dense model (``prune.pretrain_fraction`` / ``prune.pretrain_epochs``), calls it
on a :class:`PruningTarget`, then trains the returned model for ``config.num_epochs``. With
``prune.iterations = k > 1`` the stage runs k rounds of (score, select, mask) and calls the
trainer's ``finetune_fn`` for ``prune.finetune_epochs`` between rounds; the per-round targets
follow :func:`selection.round_schedule`. ``prune.selection = 'latency'`` selects by measured
latency (:mod:`latency`). With ``prune.compact`` the masked model is finally rebuilt as a
narrower dense model (new graphdef: compile new steps for it).

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt), model compression phase (pre-train on
  random data, FMP, "this pruning strategy can be repeated"); MR-FPDCNN paper, FMPTL;
  Yang et al. 2018 (NetAdapt); DESIGN.md, "FMP", "FMPTL", "Masks and compaction",
  "Latency-aware selection".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pdcnno_jax.models import counting
from pdcnno_jax.pruning import compaction, latency, masking, scorers, selection
from pdcnno_jax.train import state as state_lib

Batch = Mapping[str, Any]
Batches = Iterable[Batch] | Callable[[], Iterable[Batch]]
FinetuneFn = Callable[[nnx.GraphDef, state_lib.TrainState, int], state_lib.TrainState]
METHODS = ('none',) + tuple(sorted(scorers.SCORERS))
_DATA_METHODS = ('fmp', 'fmptl')


@dataclasses.dataclass(frozen=True)
class PruningTarget:
  """The model to prune and what is needed to run, rebuild and time it.

  Attributes:
    graphdef: the model's graph definition.
    state: the (pre-trained) TrainState.
    model_config: the ``config.model`` section (its ``name`` names the compacted model).
    num_classes: classifier outputs.
    input_shape: ``(H, W, C)`` of the images.
    preprocess: uint8 images -> model input, traced inside jit.
    mesh: device mesh with a ``'data'`` axis (None: every device).
    tx: the training optimizer; needed to time training steps (the masked vs compacted
      comparison, ``prune.latency_target='train_step'``).
  """

  graphdef: nnx.GraphDef
  state: state_lib.TrainState
  model_config: ml_collections.ConfigDict
  num_classes: int
  input_shape: tuple[int, int, int]
  preprocess: Callable[[Any], Any]
  mesh: Mesh | None = None
  tx: optax.GradientTransformation | None = None

  def model(self, state: state_lib.TrainState | None = None) -> nnx.Module:
    return state_lib.merge_model(self.graphdef, self.state if state is None else state)

  def compact(self, graphdef: nnx.GraphDef, state: state_lib.TrainState
              ) -> tuple[nnx.GraphDef, state_lib.TrainState]:
    return compaction.compact(graphdef, state, self.model_config, self.num_classes,
                              self.input_shape)


def _batch_examples(batch: Batch) -> int:
  """Real examples in a batch (``batch['mask']`` marks padding), global arrays included."""
  if 'mask' in batch:
    return int(round(float(jnp.sum(batch['mask']))))
  return int(np.shape(batch['label'])[0])


def take_scoring_batches(batches: Batches, num_examples: int) -> list[Batch]:
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


def _validate(prune_config: ml_collections.ConfigDict) -> None:
  if prune_config.method not in METHODS:
    raise ValueError(f'Unknown prune.method {prune_config.method!r}; choose from {METHODS}.')
  if prune_config.selection not in selection.SELECTIONS:
    raise ValueError(f'Unknown prune.selection {prune_config.selection!r}; choose from '
                     f'{tuple(selection.SELECTIONS)}.')
  if int(prune_config.iterations) < 1:
    raise ValueError(f'prune.iterations must be >= 1, got {prune_config.iterations}.')
  if int(prune_config.finetune_epochs) < 0:
    raise ValueError(f'prune.finetune_epochs must be >= 0, got {prune_config.finetune_epochs}.')
  if prune_config.selection == 'latency':
    if prune_config.latency_target not in latency.TARGETS:
      raise ValueError(f'Unknown prune.latency_target {prune_config.latency_target!r}; '
                       f'choose from {latency.TARGETS}.')
    if not float(prune_config.target_speedup) >= 1:
      raise ValueError(f'prune.target_speedup must be >= 1 (dense / pruned latency), got '
                       f'{prune_config.target_speedup}.')
    if int(prune_config.latency_repeats) < 1 or int(prune_config.latency_measurements) < 1:
      raise ValueError('prune.latency_repeats and prune.latency_measurements must be >= 1 '
                       "with prune.selection='latency'.")


@dataclasses.dataclass(frozen=True)
class LatencyTimers:
  """Injectable network timer of latency selection (None: measure with jax on this backend)."""

  end_to_end: latency.EndToEndTimer | None = None


def _timing_batch(batches: list[Batch], scoring_batches: Batches) -> Batch | None:
  if batches:
    return batches[0]
  return next(iter(scoring_batches() if callable(scoring_batches) else scoring_batches), None)


def _latency_selector(target: PruningTarget, state: state_lib.TrainState,
                      prune_config: ml_collections.ConfigDict, batch: Batch | None,
                      timers: LatencyTimers) -> latency.LatencySelector:
  """The latency selector of ``state``, timing whole networks on ``batch``."""
  if batch is None and timers.end_to_end is None:
    raise ValueError("prune.selection='latency' times the model on a training batch: pass "
                     'scoring batches to run_pruning.')
  mesh = target.mesh
  devices = 1 if mesh is None else mesh.devices.size
  batch_size = int(np.shape(batch['label'])[0]) if batch is not None else 0
  end_to_end = timers.end_to_end or latency.end_to_end_timer(
      batch, target.preprocess, mesh, prune_config.latency_target, tx=target.tx,
      reps=int(prune_config.latency_repeats))
  return latency.build_selector(
      target.graphdef, state, end_to_end=end_to_end, compact=target.compact,
      cache_path=latency.cache_file(prune_config.latency_cache_dir),
      context=f'batch={batch_size}/{devices}|{prune_config.latency_target}',
      max_measurements=int(prune_config.latency_measurements),
      step_fraction=float(prune_config.latency_step),
      confirmations=int(prune_config.latency_confirmations))


def _prune_round(target: PruningTarget, state: state_lib.TrainState,
                 prune_config: ml_collections.ConfigDict, batches: list[Batch], *,
                 round_index: int, seed: int, reference_macs: int,
                 selector: latency.LatencySelector | None
                 ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """One (score, select, mask) round; returns the masked state and the round's record."""
  rounds = int(prune_config.iterations)
  ratio, reduction = selection.round_schedule(
      round_index, rounds, float(prune_config.ratio), float(prune_config.target_mac_reduction))
  _, speedup = selection.round_schedule(round_index, rounds, 0.0,
                                        float(prune_config.target_speedup))
  start = time.perf_counter()
  scores = scorers.get_scorer(prune_config.method)(
      target.graphdef, state, batches, target.preprocess, mesh=target.mesh,
      norm_order=float(prune_config.norm_order), seed=seed + round_index)
  scoring_seconds = time.perf_counter() - start
  model = target.model(state)
  options = selection.SelectionOptions(
      min_channels=int(prune_config.min_channels), threshold=float(prune_config.threshold),
      ratio=ratio, target_reduction=reduction, target_speedup=speedup,
      reference_macs=reference_macs, latency=selector)
  masks = selection.select(prune_config.selection, scores, masking.read_masks(model), model,
                           options)
  if jax.process_count() > 1:  # Every process applies process 0's choice.
    masks = multihost_utils.broadcast_one_to_all(masks)
  state = masking.apply_masks(target.graphdef, state, masks)
  record = {'round': round_index, 'scoring_seconds': scoring_seconds,
            **_counts(target.model(state))}
  if selector is not None:
    record['latency'] = selector.report()
  logging.info('Pruning round %d/%d (%s, %s): %d MACs, channels %s', round_index, rounds,
               prune_config.method, prune_config.selection, record['macs'],
               record['channels'])
  return state, record


def _prune_rounds(target: PruningTarget, prune_config: ml_collections.ConfigDict,
                  batches: list[Batch], timing_batch: Batch | None, report: dict[str, Any], *,
                  finetune_fn: FinetuneFn | None, seed: int,
                  timers: LatencyTimers) -> state_lib.TrainState:
  """Every round of the schedule, fine-tuning between rounds; fills ``report``."""
  state = target.state
  reference_macs = selection.dense_macs(target.model())
  rounds = int(prune_config.iterations)
  for round_index in range(1, rounds + 1):
    selector = None
    if prune_config.selection == 'latency':
      selector = _latency_selector(target, state, prune_config, timing_batch, timers)
    state, record = _prune_round(target, state, prune_config, batches,
                                 round_index=round_index, seed=seed,
                                 reference_macs=reference_macs, selector=selector)
    report['scoring_seconds'] += record['scoring_seconds']
    report['rounds'].append(record)
    if selector is not None:
      report['latency'] = {**record['latency'], 'target_speedup': float(
          prune_config.target_speedup), 'latency_target': prune_config.latency_target,
                           'batch_size': (int(np.shape(timing_batch['label'])[0])
                                          if timing_batch is not None else None)}
    if (round_index < rounds and finetune_fn is not None
        and int(prune_config.finetune_epochs) > 0):
      start = time.perf_counter()
      state = finetune_fn(target.graphdef, state, int(prune_config.finetune_epochs))
      report['finetune_seconds'] += time.perf_counter() - start
  return state


def _compact_and_time(target: PruningTarget, state: state_lib.TrainState,
                      prune_config: ml_collections.ConfigDict, timing_batch: Batch | None,
                      report: dict[str, Any]) -> tuple[nnx.GraphDef, state_lib.TrainState]:
  """Compaction (counts checked); without latency selection, masked vs compacted timing."""
  after = _counts(target.model(state))
  start = time.perf_counter()
  graphdef, compacted = target.compact(target.graphdef, state)
  report['compaction_seconds'] = time.perf_counter() - start
  report['compacted'] = True
  counts = _counts(state_lib.merge_model(graphdef, compacted))
  if (counts['params'], counts['macs']) != (after['params'], after['macs']):
    raise AssertionError(f'Compaction changed the counts: {after} -> {counts}.')
  reps = int(prune_config.latency_repeats)
  if prune_config.selection != 'latency' and reps > 0 and timing_batch is not None:
    timed = latency.compare_latency(
        {'masked': (target.graphdef, state), 'compacted': (graphdef, compacted)},
        timing_batch, target.preprocess, target.mesh, tx=target.tx, reps=reps)
    for kind in ('inference_ms', 'train_step_ms'):
      if kind in timed:
        timed[kind.replace('_ms', '_speedup')] = (timed[kind]['masked']
                                                  / timed[kind]['compacted'])
    report['latency'] = timed
  return graphdef, compacted


def run_pruning(target: PruningTarget, prune_config: ml_collections.ConfigDict, *,
                scoring_batches: Batches = (), finetune_fn: FinetuneFn | None = None,
                seed: int = 0, timers: LatencyTimers = LatencyTimers()
                ) -> tuple[nnx.GraphDef, state_lib.TrainState, dict[str, Any]]:
  """Prunes feature maps of a (pre-trained) model; optionally compacts it.

  Args:
    target: the model and what is needed to rebuild and time it.
    prune_config: the ``config.prune`` section.
    scoring_batches: training batches ``{'image', 'label'[, 'mask']}`` (an iterable or a
      callable returning one); the first ``prune.score_examples`` examples are scored, the
      same ones in every round; the first batch also times the model. Unused by ``random``
      and ``l1`` except for timing.
    finetune_fn: ``finetune_fn(graphdef, state, epochs) -> state``, called between the rounds
      of an iterative schedule (not after the last round: the trainer then trains for
      ``config.num_epochs``).
    seed: seed of the ``random`` scorer (round i uses ``seed + i``).
    timers: injected latency timer (tests); by default networks are timed with jax.

  Returns:
    ``(graphdef, state, report)``: the pruned (and, with ``prune.compact``, compacted) model
    and a JSON-serialisable report: method, selection, channels, params and MACs
    before/after and their ratios, the per-round figures, the scored example count, scoring /
    fine-tuning / compaction seconds, ``kept_indices`` (per layer, indices of the kept channels
    in the unpruned layer), the compacted ``architecture`` (see
    ``compaction.build_architecture``) and ``latency``: with latency selection the searched
    and measured (dense vs compacted) speed-ups, chosen widths and measurement counts; else,
    with compaction, masked vs compacted inference and training-step milliseconds.

  Raises:
    ValueError: for an invalid config, an empty scoring set, or an unreachable target.
  """
  _validate(prune_config)
  before = _counts(target.model())
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
    return target.graphdef, target.state, report
  batches: list[Batch] = []
  if prune_config.method in _DATA_METHODS:
    batches = take_scoring_batches(scoring_batches, int(prune_config.score_examples))
    report['scored_examples'] = sum(_batch_examples(b) for b in batches)
  timing_batch = _timing_batch(batches, scoring_batches)
  state = _prune_rounds(target, prune_config, batches, timing_batch, report,
                        finetune_fn=finetune_fn, seed=seed, timers=timers)
  after = _counts(target.model(state))
  report['kept_indices'] = {name: np.flatnonzero(mask).tolist() for name, mask in
                            masking.read_masks(target.model(state)).items()}
  graphdef = target.graphdef
  if prune_config.compact:
    graphdef, state = _compact_and_time(target, state, prune_config, timing_batch, report)
  model = state_lib.merge_model(graphdef, state)
  report.update(
      channels_after=after['channels'], params_after=after['params'],
      macs_after=after['macs'], mac_reduction=before['macs'] / after['macs'],
      param_reduction=before['params'] / after['params'],
      architecture={'model_name': target.model_config.name,
                    'constructor_kwargs': compaction.architecture_kwargs(model)})
  if 'widths' in report.get('latency', {}):
    report['latency']['mac_reduction'] = report['mac_reduction']
  return graphdef, state, report
