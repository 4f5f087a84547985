"""Latency-aware channel selection: candidate networks measured end to end, NetAdapt-style.

Fewer MACs is not fewer milliseconds: XLA's convolutions for small layers run at very different
speeds for neighbouring channel counts, and a layer timed alone does not predict its time in
the network (on XLA:CPU a LeNet conv1 cut to 2 maps is fast alone, the network is not). So the
search (:mod:`latency_search`) measures every candidate it considers as a whole network: the
model compacted to the candidate widths, its jitted inference pass (or training step), timed
after warm-up as the median of repeats interleaved with the dense network and the search's
current point, so that load changes cancel. Measurements are cached on disk by backend,
device kind, jax version, architecture, widths, batch and target, and budgeted
(``prune.latency_measurements``); the chosen network is measured once more against the dense
one for the report.

Timers are injectable (:class:`EndToEndTimer`) so that tests use fake network latencies.

References:
  Yang et al. 2018, "NetAdapt: platform-aware neural network adaptation for mobile
  applications" (ECCV), greedy adaptation driven by empirical measurements.
  DESIGN.md, "Latency-aware selection".
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from pdcnno_jax.pruning import latency_search
from pdcnno_jax.pruning import masking
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps

TARGETS = ('inference', 'train_step')
Masks = dict[str, np.ndarray]
Widths = dict[str, int]
Model = tuple[nnx.GraphDef, state_lib.TrainState]
_CACHE_VERSION = 2
# Compiled steps a JaxEndToEndTimer keeps (dense, current, candidates of one step).
_COMPILED = 4


def median_ms(calls: Mapping[Any, tuple[Callable[..., Any], tuple[Any, ...]]], reps: int, *,
              warmup: int = 1, inner: int = 1) -> dict[Any, float]:
  """Median milliseconds per call of each ``name -> (fn, args)``, calls interleaved.

  Each function is called ``warmup`` times first (compilation), then the functions take turns
  ``reps`` times, so that load changes on a shared machine affect them alike. ``inner`` calls
  are timed together (tiny calls).
  """
  for _ in range(warmup):
    for fn, args in calls.values():
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(max(1, reps)):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      for _ in range(inner):
        jax.block_until_ready(fn(*args))
      times[name].append((time.perf_counter() - start) / inner)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _global_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  data = sharding_lib.batch_sharded(mesh)
  return {k: v if isinstance(v, jax.Array) else jax.make_array_from_callback(
      np.shape(v), data, lambda i, v=v: np.asarray(v)[i]) for k, v in batch.items()
          if k in ('image', 'label')}


def compare_latency(models: Mapping[str, Model], batch: Mapping[str, Any],
                    preprocess: Callable[[Any], Any], mesh: Mesh | None, *,
                    tx: optax.GradientTransformation | None = None, reps: int = 10,
                    train_only: bool = False) -> dict[str, Any]:
  """Median latency of the jitted inference pass (and training step) of several models.

  Args:
    models: name -> ``(graphdef, state)``, e.g. ``{'masked': ..., 'compacted': ...}``.
    batch: one batch ``{'image', 'label'}`` with a size divisible by the mesh's devices.
    preprocess: uint8 images -> model input.
    mesh: device mesh (None: every device).
    tx: when given, also time ``steps.make_train_step(graphdef, tx, ...)`` (not donating).
    reps: timed calls per model, after two warm-up calls.
    train_only: time the training step only (needs ``tx``).

  Returns:
    ``{'batch_size', 'inference_ms': {name: ms}, 'train_step_ms': {name: ms}}`` (the first
    without ``train_only``, the last only with ``tx``).
  """
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  batch = _global_batch(batch, mesh)
  calls = {'inference_ms': {}, 'train_step_ms': {}}
  for name, (graphdef, state) in models.items():
    if not train_only:
      calls['inference_ms'][name] = (steps.make_eval_step(graphdef, preprocess, mesh),
                                     (state, batch))
    if tx is not None:
      calls['train_step_ms'][name] = (
          steps.make_train_step(graphdef, tx, preprocess, mesh, donate=False), (state, batch))
  result: dict[str, Any] = {'batch_size': int(np.shape(batch['label'])[0])}
  for kind, fns in calls.items():
    if fns:
      result[kind] = median_ms(fns, reps, warmup=2)
  return result



class EndToEndTimer(Protocol):
  """Milliseconds of each whole model (name -> ``(graphdef, state)``), measured together."""

  def __call__(self, models: Mapping[str, Model]) -> dict[str, float]:
    ...


@dataclasses.dataclass
class JaxEndToEndTimer:
  """:class:`EndToEndTimer` of the jitted eval step or training step, calls interleaved.

  Compiled steps are kept for the last few graph definitions, so that the dense network and
  the search's current point compile once.

  Attributes:
    batch: one batch ``{'image', 'label'}`` with a size divisible by the mesh's devices.
    preprocess: uint8 images -> model input.
    mesh: device mesh (None: every device).
    target: ``'inference'`` or ``'train_step'``.
    tx: the optimizer (``'train_step'``: the step applies it, not donating).
    repeats: timed calls per model, after two warm-up calls.
  """

  batch: Mapping[str, Any]
  preprocess: Callable[[Any], Any]
  mesh: Mesh | None
  target: str
  tx: optax.GradientTransformation | None
  repeats: int
  compiled: collections.OrderedDict = dataclasses.field(
      default_factory=collections.OrderedDict, repr=False)

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f'Unknown prune.latency_target {self.target!r}; choose from {TARGETS}.')
    if self.target == 'train_step' and self.tx is None:
      raise ValueError("prune.latency_target='train_step' times the training step: pass the "
                       'optimizer (PruningTarget.tx) to run_pruning.')
    self.mesh = sharding_lib.make_mesh() if self.mesh is None else self.mesh
    self.batch = _global_batch(self.batch, self.mesh)

  def step(self, graphdef: nnx.GraphDef) -> Callable[..., Any]:
    if graphdef in self.compiled:
      self.compiled.move_to_end(graphdef)
      return self.compiled[graphdef]
    if self.target == 'train_step':
      fn = steps.make_train_step(graphdef, self.tx, self.preprocess, self.mesh, donate=False)
    else:
      fn = steps.make_eval_step(graphdef, self.preprocess, self.mesh)
    self.compiled[graphdef] = fn
    while len(self.compiled) > _COMPILED:
      self.compiled.popitem(last=False)
    return fn

  def __call__(self, models: Mapping[str, Model]) -> dict[str, float]:
    calls = {name: (self.step(graphdef), (state, self.batch))
             for name, (graphdef, state) in models.items()}
    return median_ms(calls, self.repeats, warmup=2)


def end_to_end_timer(batch: Mapping[str, Any], preprocess: Callable[[Any], Any],
                     mesh: Mesh | None, target: str, *,
                     tx: optax.GradientTransformation | None, reps: int) -> EndToEndTimer:
  """A :class:`JaxEndToEndTimer` of ``target`` on ``batch``."""
  return JaxEndToEndTimer(batch, preprocess, mesh, target, tx, reps)


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/pdcnno_jax/latency`` (``~/.cache`` when unset)."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'pdcnno_jax', 'latency')


def cache_file(cache_dir: str) -> str:
  """The cache file of this backend, device kind and jax version under ``cache_dir``."""
  device = jax.devices()[0]
  name = f'{jax.default_backend()}_{device.device_kind}_jax{jax.__version__}'
  return os.path.join(cache_dir or default_cache_dir(),
                      re.sub(r'[^A-Za-z0-9._-]+', '-', name) + '.json')



def architecture_key(model: nnx.Module) -> str:
  """The model class and a digest of its layer specs (widths, kernels, spatial sizes)."""
  digest = hashlib.sha1(repr(model.layer_specs()).encode()).hexdigest()[:16]
  return f'{type(model).__name__}:{digest}'


class MeasurementCache:
  """Measured network latencies by key, in memory and in a JSON file.

  Args:
    path: JSON cache file (None: memory only); see :func:`cache_file`.
  """

  def __init__(self, path: str | None):
    self.path = path
    self.records: dict[str, dict[str, Any]] = {}
    if path and os.path.exists(path):
      try:
        with open(path) as f:
          stored = json.load(f)
        if stored.get('version') == _CACHE_VERSION:
          self.records = dict(stored['entries'])
      except (OSError, ValueError, KeyError) as e:
        logging.warning('Ignoring the unreadable latency cache %s: %s', path, e)

  def get(self, key: str) -> dict[str, Any] | None:
    return self.records.get(key)

  def put(self, key: str, record: dict[str, Any]) -> None:
    self.records[key] = record
    if not self.path:
      return
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(self.path) or '.', suffix='.tmp')
    with os.fdopen(handle, 'w') as f:
      json.dump({'version': _CACHE_VERSION, 'entries': self.records}, f, sort_keys=True)
    os.replace(temporary, self.path)


@dataclasses.dataclass
class NetworkLatency:
  """:class:`latency_search.Measure` of compacted networks, relative to the dense one.

  A fresh measurement times the dense network, the candidate and (when given and not the
  dense network) the current point side by side; the candidate's latency is its median over
  the dense network's. Known candidates (this run, or the cache) cost nothing.
  :meth:`confirm` measures a chosen network ``confirmations`` times more, afresh, and its
  latency becomes the median of those (the cache keeps them, so a second run confirms free).

  Attributes:
    build: widths -> the compacted ``(graphdef, state)`` at those widths.
    timer: times models side by side.
    dense: the unpruned network, and ``full`` its widths (latency 1 by definition).
    cache: where measurements are kept; ``prefix`` (context and architecture) starts each key.
    budget: fresh measurements allowed.
    confirmations: fresh measurements of a confirmed network.
    measured, seconds: fresh measurements made so far (``confirmation_measurements`` of
      them confirmations) and the seconds they took.
    log: one record per network looked up (widths, speed-up, whether from the cache).
  """

  build: Callable[[Widths], Model]
  timer: EndToEndTimer
  dense: Model
  full: Widths
  cache: MeasurementCache
  prefix: str
  budget: int
  confirmations: int = 2
  measured: int = 0
  confirmation_measurements: int = 0
  seconds: float = 0.0
  log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  fresh: set[str] = dataclasses.field(default_factory=set)
  seen: set[str] = dataclasses.field(default_factory=set)
  built: collections.OrderedDict = dataclasses.field(
      default_factory=collections.OrderedDict, repr=False)

  def model(self, widths: Widths) -> Model:
    key = latency_search.widths_key(widths)
    if key not in self.built:
      self.built[key] = self.build(widths)
      while len(self.built) > _COMPILED - 1:
        self.built.popitem(last=False)
    return self.built[key]

  def __call__(self, candidate: Widths,
               current: Widths | None = None) -> latency_search.Measurement | None:
    if candidate == self.full:
      return latency_search.Measurement(1.0, None if current is None else 1.0)
    key = latency_search.widths_key(candidate)
    reference = None if current is None else latency_search.widths_key(current)
    record = self.cache.get(f'{self.prefix}|{key}')
    if record is None:
      if self.measured >= self.budget:
        return None
      record = self._measure(candidate, current)
      self.cache.put(f'{self.prefix}|{key}', record)
      self.fresh.add(key)
    if key not in self.seen:  # One entry per network looked up in this run.
      self.seen.add(key)
      self.log.append({'widths': dict(candidate), 'speedup': 1.0 / record['latency'],
                       'cached': key not in self.fresh})
    same = reference is not None and record.get('reference') == reference
    return latency_search.Measurement(record['latency'],
                                      record.get('reference_latency') if same else None)

  def _measure(self, candidate: Widths, current: Widths | None) -> dict[str, Any]:
    models = {'dense': self.dense, 'candidate': self.model(candidate)}
    if current is not None and current != self.full:
      models['current'] = self.model(current)
    start = time.perf_counter()
    times = self.timer(models)
    self.seconds += time.perf_counter() - start
    self.measured += 1
    reference_latency = None
    if current is not None:
      reference_latency = times['current'] / times['dense'] if 'current' in models else 1.0
    return {'latency': float(times['candidate'] / times['dense']),
            'reference': None if current is None else latency_search.widths_key(current),
            'reference_latency': reference_latency, 'dense_ms': float(times['dense']),
            'candidate_ms': float(times['candidate'])}

  def confirm(self, widths: Widths) -> float | None:
    """The median latency of ``confirmations`` fresh measurements of ``widths`` (with the
    dense network alongside), or None when the budget allows none."""
    if widths == self.full:
      return 1.0
    key = latency_search.widths_key(widths)
    record = dict(self.cache.get(f'{self.prefix}|{key}') or {})
    samples = list(record.get('confirmations', ()))
    while len(samples) < self.confirmations and self.measured < self.budget:
      dense_ms, candidate_ms = self.verify(widths)
      self.measured += 1
      self.confirmation_measurements += 1
      samples.append(candidate_ms / dense_ms)
    if not samples:
      return None
    if samples != record.get('confirmations'):
      record.setdefault('first_latency', record.get('latency'))
      record.update(confirmations=samples, latency=float(statistics.median(samples)))
      self.cache.put(f'{self.prefix}|{key}', record)
    for entry in self.log:
      if entry['widths'] == widths:
        entry.update(speedup=1.0 / record['latency'], confirmed=True)
    return record['latency']

  def verify(self, widths: Widths) -> tuple[float, float]:
    """``(dense_ms, compacted_ms)`` of the network at ``widths``, measured now."""
    start = time.perf_counter()
    times = self.timer({'dense': self.dense, 'compacted': self.model(widths)})
    self.seconds += time.perf_counter() - start
    return float(times['dense']), float(times['compacted'])


@dataclasses.dataclass
class LatencySelector:
  """Latency-targeted selection: greedy search on measured networks, then one check.

  Attributes:
    graphdef, state: the model to prune (its masks may already prune some channels).
    compact: ``compact(graphdef, masked_state) -> (graphdef, state)`` of the narrower model.
    timer: times whole networks side by side.
    cache: measured latencies; ``prefix`` (context and architecture) starts each key.
    max_measurements: fresh end-to-end measurements the search may make.
    step_fraction: channels cut per proposal, as a fraction of the layer's width.
    confirmations: fresh measurements of the chosen network that replace its search
      measurement (0: none; see :func:`latency_search.greedy_search`).
  """

  graphdef: nnx.GraphDef
  state: state_lib.TrainState
  compact: Callable[[nnx.GraphDef, state_lib.TrainState], Model]
  timer: EndToEndTimer
  cache: MeasurementCache
  prefix: str
  max_measurements: int
  step_fraction: float
  confirmations: int = 2
  target_speedup: float = 1.0
  network: NetworkLatency | None = None
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def _network(self, costs: latency_search.ScoreCosts, masks: Masks) -> NetworkLatency:
    graphdef, state = self.graphdef, self.state

    def build(widths: Widths) -> Model:
      return self.compact(graphdef, masking.apply_masks(graphdef, state,
                                                        costs.masks(masks, widths)))

    full = {spec.name: spec.out_channels
            for spec in masking.prunable_specs(state_lib.merge_model(graphdef, state))}
    return NetworkLatency(build, self.timer, (graphdef, state), full, self.cache,
                          self.prefix, int(self.max_measurements), int(self.confirmations))

  def select(self, scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], *,
             target_speedup: float, min_channels: int) -> Masks:
    """New masks whose measured speed-up over the dense model reaches ``target_speedup``.

    The search's choice is confirmed by fresh measurements (``confirmations``); when the
    chosen network, measured once more for the report, misses the target, the search
    continues from that measured point once. Short of the target (budget spent, or no
    narrower width measures faster), the fastest measured point is kept and
    ``report()['target_reached']`` is False (logged).
    """
    if not target_speedup >= 1:
      raise ValueError(f'prune.target_speedup must be >= 1 (dense / pruned latency), got '
                       f'{target_speedup}.')
    self.target_speedup = float(target_speedup)
    costs = latency_search.ScoreCosts.from_scores(scores, masks)
    self.network = network = self._network(costs, masks)
    start = dict(costs.start)
    first = network(start)
    start_latency = 1.0 if first is None else first.latency
    for _ in range(2):
      result = latency_search.greedy_search(
          costs, network, target_speedup=target_speedup, min_channels=min_channels,
          step_fraction=self.step_fraction, start=start, start_latency=start_latency,
          confirm=network.confirm if self.confirmations > 0 else None)
      dense_ms, compacted_ms = network.verify(result.widths)
      self.history.append({'widths': dict(result.widths), 'predicted_speedup':
                           1.0 / result.latency, 'measured_speedup': dense_ms / compacted_ms,
                           'dense_ms': dense_ms, 'compacted_ms': compacted_ms,
                           'stopped': result.stopped, 'confirmed': list(result.confirmed)})
      logging.info('Latency selection: widths %s, searched %.3gx, measured %.3gx (target '
                   '%.3gx), %d networks measured', result.widths, 1.0 / result.latency,
                   dense_ms / compacted_ms, target_speedup, network.measured)
      if dense_ms / compacted_ms >= target_speedup or result.stopped not in (
          'target', 'confirmation'):
        break
      start, start_latency = result.widths, compacted_ms / dense_ms
    reached = [h for h in self.history if h['measured_speedup'] >= target_speedup]
    chosen = reached[0] if reached else max(self.history, key=lambda h: h['measured_speedup'])
    chosen['chosen'] = True
    if chosen['measured_speedup'] < target_speedup:
      logging.warning('Latency selection stopped at a measured %.3gx (%s, %d of %d '
                      'measurements), short of prune.target_speedup=%s.',
                      chosen['measured_speedup'], chosen['stopped'], network.measured,
                      self.max_measurements, target_speedup)
    return costs.masks(masks, chosen['widths'])

  def report(self) -> dict[str, Any]:
    chosen = next((h for h in self.history if h.get('chosen')), {})
    network = self.network
    return {'predicted_speedup': chosen.get('predicted_speedup'),
            'measured_speedup': chosen.get('measured_speedup'),
            'dense_ms': chosen.get('dense_ms'), 'compacted_ms': chosen.get('compacted_ms'),
            'widths': chosen.get('widths'), 'stopped': chosen.get('stopped'),
            'checks': [{k: v for k, v in h.items() if k != 'chosen'} for h in self.history],
            'target_reached': bool(chosen) and chosen['measured_speedup'] >= self.target_speedup,
            'measurements': [] if network is None else list(network.log),
            'table_entries': 0 if network is None else len(network.log),
            'table_measured': 0 if network is None else (
                network.measured - network.confirmation_measurements),
            'confirmation_measurements': 0 if network is None else (
                network.confirmation_measurements),
            'table_seconds': 0.0 if network is None else network.seconds,
            'max_measurements': int(self.max_measurements),
            'step_fraction': float(self.step_fraction)}


def build_selector(graphdef: nnx.GraphDef, state: state_lib.TrainState, *,
                   end_to_end: EndToEndTimer,
                   compact: Callable[[nnx.GraphDef, state_lib.TrainState], Model],
                   cache_path: str | None, context: str, max_measurements: int,
                   step_fraction: float, confirmations: int = 2) -> LatencySelector:
  """A :class:`LatencySelector` for the model; measurements are keyed by ``context`` (batch,
  target), the model's :func:`architecture_key` and the widths, in ``cache_path``."""
  if not 0 < float(step_fraction) <= 1:
    raise ValueError(f'prune.latency_step must be in (0, 1], got {step_fraction}.')
  if int(confirmations) < 0:
    raise ValueError(f'prune.latency_confirmations must be >= 0, got {confirmations}.')
  prefix = f'{context}|{architecture_key(state_lib.merge_model(graphdef, state))}'
  return LatencySelector(graphdef, state, compact, end_to_end, MeasurementCache(cache_path),
                         prefix, int(max_measurements), float(step_fraction), int(confirmations))
