"""Latency-aware channel selection: measured per-layer latency tables and a greedy search.

Fewer MACs is not fewer milliseconds: XLA's convolutions for small layers run at very different
speeds for neighbouring channel counts. Following NetAdapt, each layer that a pruned width
touches (a prunable conv, and every layer reading one) gets a latency table: the time of the
layer alone (conv, bias or BatchNorm, activation, mask and a following pool; forward, or
forward + backward + an update for a training step) as a function of its (input, output)
widths, jitted, timed after warm-up, median of repeats, measured lazily on the widths the
search visits and cached on disk by backend, device kind, jax version, layer shape and batch.

The network latency is predicted as ``a * sum(layer times) + b``, calibrated on end-to-end
measurements (first the dense model: a = 1, b = the rest). The search removes, at each step,
the lowest-scoring channels of the layer with the least score lost per predicted millisecond
saved, never stopping at a width that is no faster than a wider one, until the predicted
speed-up reaches the target; the compacted network is then measured end to end and, when it
misses the target, the calibration takes the measured point and the search continues.

Timers are injectable (:class:`LayerTimer`, :class:`EndToEndTimer`) so that tests use fake
tables.

References:
  Yang et al. 2018, "NetAdapt: platform-aware neural network adaptation for mobile
  applications" (ECCV), per-layer latency look-up tables, greedy resource-constrained
  adaptation. DESIGN.md, "Latency-aware selection".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from pdcnno_jax.models import layers
from pdcnno_jax.pruning import masking
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps

TARGETS = ('inference', 'train_step')
Masks = dict[str, np.ndarray]
Widths = dict[str, int]
Model = tuple[nnx.GraphDef, state_lib.TrainState]
# Channels removed per candidate step of the greedy search.
_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# Wider widths examined when the result is polished (free widening).
_POLISH_WINDOW = 8
_CACHE_VERSION = 1


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


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """What a layer's time depends on besides its widths (the latency-table key).

  Attributes:
    kind: ``'conv'`` (a ``MaskedConv`` or ``ConvNorm`` block) or ``'dense'``.
    masked: conv with ReLU and a feature mask (``MaskedConv``) rather than ``ConvNorm``.
    in_hw: spatial size of the conv input; for dense, the ``(H, W)`` of a flattened map
      (input features = H * W * input width), else ``(1, 1)``.
    kernel_size, strides, padding, batch_norm: of the conv.
    pool: a 2x2 max-pool follows the block.
    input_grad: a training step differentiates the layer's input (it is not the image).
  """

  kind: str
  masked: bool
  in_hw: tuple[int, int]
  kernel_size: int = 1
  strides: int = 1
  padding: str = 'SAME'
  batch_norm: bool = False
  pool: bool = False
  input_grad: bool = True

  def key(self) -> str:
    return ','.join(f'{f.name}={getattr(self, f.name)}' for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class LayerEntry:
  """One timed layer of a model: its shape and where its widths come from.

  ``in_layer`` / ``out_layer`` name the prunable layer whose kept width is this layer's
  input / output width; None means the fixed ``in_width`` / ``out_width``.
  """

  name: str
  shape: LayerShape
  in_layer: str | None
  out_layer: str | None
  in_width: int
  out_width: int

  def widths(self, kept: Mapping[str, int]) -> tuple[int, int]:
    return (kept[self.in_layer] if self.in_layer else self.in_width,
            kept[self.out_layer] if self.out_layer else self.out_width)


def _stride(block: Any) -> int:
  stride = block.conv.strides
  return int(stride[0] if isinstance(stride, (tuple, list)) else stride)


def _conv_input_hw(block: Any, output_hw: tuple[int, int]) -> tuple[int, int]:
  """The input size of a conv from its output size (exact for stride 1)."""
  kernel, stride = block.conv.kernel_size[0], _stride(block)
  if block.conv.padding == 'VALID':
    return tuple((o - 1) * stride + kernel for o in output_hw)
  return tuple(o * stride for o in output_hw)


def layer_entries(model: nnx.Module) -> tuple[LayerEntry, ...]:
  """The layers whose time changes with the prunable widths, with their table keys."""
  specs = model.layer_specs()
  prunable = {spec.name for spec in masking.prunable_specs(model)}
  blocks, inputs = {}, {}
  for spec in specs:
    if spec.kind == 'conv':
      blocks[spec.name] = masking.get_submodule(model, spec.param_path[:-1])
      inputs[spec.name] = _conv_input_hw(blocks[spec.name], spec.output_hw)
    elif spec.flatten_hw is not None:
      inputs[spec.name] = tuple(spec.flatten_hw)
  entries = []
  for spec in specs:
    in_layer = spec.in_mask if spec.in_mask in prunable else None
    out_layer = spec.name if spec.name in prunable else None
    if in_layer is None and out_layer is None:
      continue
    if spec.kind == 'conv':
      block = blocks[spec.name]
      readers = [inputs[s.name] for s in specs if s.in_mask == spec.name and s.name in inputs]
      pool = bool(readers) and readers[0] == tuple(o // 2 for o in spec.output_hw)
      shape = LayerShape('conv', isinstance(block, layers.MaskedConv), inputs[spec.name],
                         block.conv.kernel_size[0], _stride(block),
                         block.conv.padding, block.norm is not None, pool,
                         spec.in_mask is not None)
      in_width = spec.in_channels
    else:
      hw = inputs.get(spec.name, (1, 1))
      shape = LayerShape('dense', False, hw)
      in_width = spec.in_channels // (hw[0] * hw[1])
    entries.append(LayerEntry(spec.name, shape, in_layer, out_layer, in_width,
                              spec.out_channels))
  return tuple(entries)


class LayerTimer(Protocol):
  """Milliseconds of one layer of ``shape`` at input / output widths ``(c_in, c_out)``."""

  def __call__(self, shape: LayerShape, c_in: int, c_out: int) -> float:
    ...


class EndToEndTimer(Protocol):
  """Milliseconds of each whole model (name -> ``(graphdef, state)``), measured together."""

  def __call__(self, models: Mapping[str, Model]) -> dict[str, float]:
    ...


def _layer_function(shape: LayerShape, c_in: int, c_out: int, train: bool):
  """``(fn, args)``: the layer's jitted forward (or forward + backward + SGD update)."""
  rngs = nnx.Rngs(0)
  if shape.kind == 'conv':
    block_type = layers.MaskedConv if shape.masked else layers.ConvNorm
    module = block_type(c_in, c_out, shape.kernel_size, rngs=rngs, padding=shape.padding,
                        strides=shape.strides, batch_norm=shape.batch_norm)
    x_shape = shape.in_hw + (c_in,)
  else:
    module = nnx.Linear(c_in * shape.in_hw[0] * shape.in_hw[1], c_out, rngs=rngs)
    x_shape = (c_in * shape.in_hw[0] * shape.in_hw[1],)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def forward(params, rest, x):
    layer = nnx.merge(graphdef, params, rest)
    y = layer(x, train=train) if shape.kind == 'conv' else nnx.relu(layer(x))
    if shape.pool:
      y = nnx.max_pool(y, (2, 2), strides=(2, 2))
    return y

  if not train:
    return jax.jit(forward), (params, rest), x_shape

  def step(params, rest, x):
    loss = lambda p, x: jnp.sum(forward(p, rest, x))
    if shape.input_grad:
      grads, x_grad = jax.grad(loss, argnums=(0, 1))(params, x)
    else:
      grads, x_grad = jax.grad(loss)(params, x), None
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), x_grad

  return jax.jit(step), (params, rest), x_shape


@dataclasses.dataclass
class JaxLayerTimer:
  """:class:`LayerTimer` that times the layer alone with jax (jit, warm-up, median).

  The first width pair timed for a layer shape is its reference; every later pair is timed
  interleaved with the reference and scaled by the reference's first time, so that load
  changes on a shared machine between measurements cancel.

  Attributes:
    batch_size: per-device batch.
    target: ``'inference'`` or ``'train_step'``.
    repeats: timed calls per median.
  """

  batch_size: int
  target: str
  repeats: int
  references: dict[LayerShape, tuple[int, int, float]] = dataclasses.field(
      default_factory=dict)

  def _call(self, shape: LayerShape, c_in: int, c_out: int):
    fn, args, x_shape = _compiled_layer(shape, c_in, c_out, self.target == 'train_step')
    x = jnp.asarray(np.random.default_rng(0).random((self.batch_size,) + x_shape, np.float32))
    return fn, args + (x,)

  def __call__(self, shape: LayerShape, c_in: int, c_out: int) -> float:
    if shape not in self.references:
      ms = median_ms({0: self._call(shape, c_in, c_out)}, self.repeats, warmup=2)[0]
      self.references[shape] = (c_in, c_out, ms)
      return ms
    ref_in, ref_out, ref_ms = self.references[shape]
    times = median_ms({'entry': self._call(shape, c_in, c_out),
                       'reference': self._call(shape, ref_in, ref_out)}, self.repeats, warmup=2)
    return ref_ms * times['entry'] / times['reference']


@functools.lru_cache(maxsize=16)
def _compiled_layer(shape: LayerShape, c_in: int, c_out: int, train: bool):
  return _layer_function(shape, c_in, c_out, train)


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


class LatencyTable:
  """Per-layer latencies, measured lazily by a :class:`LayerTimer` and cached on disk.

  Args:
    timer: measures an entry that is neither in memory nor in the cache.
    path: JSON cache file (None: no disk cache); see :func:`cache_file`.
    context: what else the times depend on (batch size, target), part of every key.
  """

  def __init__(self, timer: LayerTimer, path: str | None, context: str):
    self.timer, self.path, self.context = timer, path, context
    self.entries: dict[str, float] = {}
    self.measured, self.seconds = 0, 0.0
    self._disk: dict[str, float] = {}
    if path and os.path.exists(path):
      try:
        with open(path) as f:
          stored = json.load(f)
        if stored.get('version') == _CACHE_VERSION:
          self._disk = {k: float(v) for k, v in stored['entries'].items()}
      except (OSError, ValueError, KeyError) as e:
        logging.warning('Ignoring the unreadable latency cache %s: %s', path, e)

  def _key(self, shape: LayerShape, c_in: int, c_out: int) -> str:
    return f'{self.context}|{shape.key()}|{int(c_in)}x{int(c_out)}'

  def has(self, shape: LayerShape, c_in: int, c_out: int) -> bool:
    key = self._key(shape, c_in, c_out)
    return key in self.entries or key in self._disk

  def ms(self, shape: LayerShape, c_in: int, c_out: int) -> float:
    key = self._key(shape, c_in, c_out)
    if key not in self.entries:
      if key in self._disk:
        self.entries[key] = self._disk[key]
      else:
        start = time.perf_counter()
        self.entries[key] = self._disk[key] = float(self.timer(shape, int(c_in), int(c_out)))
        self.seconds += time.perf_counter() - start
        self.measured += 1
        self._save()
    return self.entries[key]

  def _save(self) -> None:
    if not self.path:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix='.tmp')
    with os.fdopen(handle, 'w') as f:
      json.dump({'version': _CACHE_VERSION, 'entries': self._disk}, f, sort_keys=True)
    os.replace(temporary, self.path)


class LatencyModel:
  """Predicted network latency ``a * sum(layer times) + b`` over the kept widths.

  ``a`` and ``b`` are fitted (least squares) to the end-to-end measurements added by
  :meth:`calibrate`; with one measurement (the dense model) ``a = 1`` and ``b`` is the time
  of everything outside the tables (classifier, input, dispatch). When that would make
  ``b < 0`` (tables timed under heavier load than the network), ``b = 0`` and ``a`` is fitted.
  """

  def __init__(self, entries: tuple[LayerEntry, ...], table: LatencyTable):
    self.entries, self.table = entries, table
    self.points: list[tuple[float, float]] = []
    self.scale, self.rest = 1.0, 0.0
    self.dense_ms: float | None = None

  def layer_sum(self, kept: Mapping[str, int]) -> float:
    return sum(self.table.ms(e.shape, *e.widths(kept)) for e in self.entries)

  def known(self, kept: Mapping[str, int]) -> bool:
    """Whether the table holds every entry the prediction at ``kept`` needs."""
    return all(self.table.has(e.shape, *e.widths(kept)) for e in self.entries)

  def predict_ms(self, kept: Mapping[str, int]) -> float:
    return max(self.scale * self.layer_sum(kept) + self.rest, 1e-9)

  def predicted_speedup(self, kept: Mapping[str, int]) -> float:
    return self.dense_ms / self.predict_ms(kept)

  def calibrate(self, kept: Mapping[str, int], measured_ms: float) -> None:
    """Adds an end-to-end measurement (ms, in the units of the first one) and refits."""
    if self.dense_ms is None:
      self.dense_ms = float(measured_ms)
    self.points.append((self.layer_sum(kept), float(measured_ms)))
    sums, times = np.array(self.points).T
    scale, rest = 1.0, float(times[-1] - sums[-1])
    if len(self.points) > 1 and np.ptp(sums) > 0:
      scale, rest = np.polyfit(sums, times, 1)
    if scale <= 0 or rest < 0:  # Tables slower than the network (e.g. load): proportional.
      scale, rest = float(np.dot(sums, times) / np.dot(sums, sums)), 0.0
    self.scale, self.rest = float(scale), float(rest)


@dataclasses.dataclass(frozen=True)
class _Costs:
  """Score lost by removing the lowest-scoring kept channels of each layer."""

  order: dict[str, np.ndarray]  # Kept channels, lowest normalised score first.
  cumulative: dict[str, np.ndarray]  # [k]: score of the k lowest.
  start: dict[str, int]  # Kept widths before the search.

  def of(self, name: str, width: int) -> float:
    return float(self.cumulative[name][self.start[name] - width])


def _costs(scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> _Costs:
  order, cumulative, start = {}, {}, {}
  for name, mask in masks.items():
    kept = np.flatnonzero(mask)
    score = np.asarray(scores[name], np.float64)
    norm = np.linalg.norm(score[kept])
    normalized = score / norm if norm > 0 else score
    order[name] = kept[np.argsort(normalized[kept], kind='stable')]
    cumulative[name] = np.concatenate([[0.0], np.cumsum(normalized[order[name]])])
    start[name] = int(kept.size)
  return _Costs(order, cumulative, start)


def _candidates(width: int, min_channels: int) -> list[int]:
  """Narrower widths tried for a layer, widest first: 1 to half the width fewer, then a
  halving ladder down to ``min_channels`` (small layers can be slow at every nearby width)."""
  if width <= min_channels:
    return []
  steps = {1, 2, 4} | {max(1, round(width * f)) for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2)}
  ladder = {width >> k for k in range(2, max(2, width.bit_length()))}
  widths = {width - d for d in steps} | ladder | {min_channels}
  return sorted({w for w in widths if min_channels <= w < width}, reverse=True)


def _greedy_step(model: LatencyModel, costs: _Costs, kept: Widths, current: float,
                 min_channels: int) -> tuple[str, int, float] | None:
  """The removal with the least score lost per predicted ms saved (None: nothing saves)."""
  best = None
  for name, width in kept.items():
    fastest = current
    for narrower in _candidates(width, min_channels):
      predicted = model.predict_ms({**kept, name: narrower})
      if predicted >= fastest:  # No faster than a wider width: never a stopping point.
        continue
      fastest = predicted
      ratio = (costs.of(name, narrower) - costs.of(name, width)) / (current - predicted)
      if best is None or ratio < best[0]:
        best = (ratio, name, narrower, predicted)
  return None if best is None else best[1:]


def _widen(model: LatencyModel, costs: _Costs, kept: Widths, goal: float) -> Widths:
  """Gives back channels while the prediction stays within ``goal``.

  First the single channel that regains most score, repeatedly; then each layer moves to the
  widest width no slower than its own among the next ``_POLISH_WINDOW`` and those the table
  already holds, until nothing moves: no chosen width is slower than such a wider one.
  """
  kept = dict(kept)
  while True:
    best = None
    for name, width in kept.items():
      if width < costs.start[name]:
        wider = {**kept, name: width + 1}
        if model.predict_ms(wider) <= goal:
          regained = costs.of(name, width) - costs.of(name, width + 1)
          if best is None or regained > best[0]:
            best = (regained, wider)
    if best is None:
      break
    kept = best[1]
  moved = True
  while moved:
    moved = False
    for name in kept:
      current = model.predict_ms(kept)
      for wider in range(costs.start[name], kept[name], -1):
        candidate = {**kept, name: wider}
        if wider > kept[name] + _POLISH_WINDOW and not model.known(candidate):
          continue
        if model.predict_ms(candidate) <= current:
          kept, moved = candidate, True
          break
  return kept


def search_widths(model: LatencyModel, costs: _Costs, kept: Mapping[str, int], *,
                  target_speedup: float, min_channels: int) -> tuple[Widths, bool]:
  """Greedy NetAdapt-style removal from ``kept`` until the predicted speed-up is reached.

  Returns:
    ``(widths, reached)``; when no removal allowed by ``min_channels`` is predicted to be
    faster, the widths where the search stopped and False.
  """
  kept = dict(kept)
  goal = model.dense_ms / float(target_speedup)
  current = model.predict_ms(kept)
  while current > goal:
    step = _greedy_step(model, costs, kept, current, min_channels)
    if step is None:
      return kept, False
    name, width, current = step
    kept[name] = width
  return _widen(model, costs, kept, goal), True


def widths_to_masks(costs: _Costs, masks: Mapping[str, np.ndarray],
                    kept: Mapping[str, int]) -> Masks:
  """Masks keeping the ``kept[name]`` best-scoring of each layer's kept channels."""
  new = {name: np.asarray(mask, np.float32).copy() for name, mask in masks.items()}
  for name, mask in new.items():
    mask[costs.order[name][:costs.start[name] - kept[name]]] = 0.0
  return new


MeasureFn = Callable[[Masks], tuple[float, float]]


@dataclasses.dataclass
class LatencySelector:
  """Latency-targeted selection: search, measure the compacted network, continue if short.

  Attributes:
    model: the latency model, calibrated on the dense network.
    measure: ``measure(masks) -> (dense_ms, compacted_ms)``, measured side by side.
    max_measurements: end-to-end measurements (searches) at most.
    history: one record per measurement (widths, predicted and measured speed-ups).
  """

  model: LatencyModel
  measure: MeasureFn
  max_measurements: int
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  target_speedup: float = 1.0

  def select(self, scores: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], *,
             target_speedup: float, min_channels: int) -> Masks:
    """New masks whose measured speed-up over the dense model reaches ``target_speedup``.

    Stops short of the target (logged; ``report()['target_reached']`` is False) after
    ``max_measurements`` measurements, or when no narrower width is predicted to be faster;
    it then returns the fastest measured point (repeated last in ``history`` with
    ``chosen=True``).
    """
    if not target_speedup >= 1:
      raise ValueError(f'prune.target_speedup must be >= 1 (dense / pruned latency), got '
                       f'{target_speedup}.')
    self.target_speedup = float(target_speedup)
    costs = _costs(scores, masks)
    kept = dict(costs.start)
    chosen = []  # (measured speed-up, measurement number, masks).
    for _ in range(max(1, self.max_measurements)):
      kept, reached = search_widths(self.model, costs, kept, target_speedup=target_speedup,
                                    min_channels=min_channels)
      selected = widths_to_masks(costs, masks, kept)
      predicted = self.model.predicted_speedup(kept)
      dense_ms, compacted_ms = self.measure(selected)
      measured = dense_ms / compacted_ms
      self.history.append({'widths': dict(kept), 'predicted_speedup': predicted,
                           'measured_speedup': measured, 'dense_ms': dense_ms,
                           'compacted_ms': compacted_ms})
      chosen.append((measured, len(self.history), selected))
      logging.info('Latency selection: widths %s, predicted %.3gx, measured %.3gx (target '
                   '%.3gx)', kept, predicted, measured, target_speedup)
      if measured >= target_speedup:
        break
      if not reached:  # No narrower width is predicted faster: recalibrating cannot help.
        logging.warning('prune.target_speedup=%s is out of reach with prune.min_channels=%d: '
                        'no narrower width is predicted to be faster than %s, measured '
                        '%.3gx.', target_speedup, min_channels, kept, measured)
        break
      self.model.calibrate(kept, self.model.dense_ms / measured)
    else:
      logging.warning('Latency selection stopped at a measured %.3gx after %d measurements, '
                      'short of prune.target_speedup=%s.', measured, len(self.history),
                      target_speedup)
    if measured < target_speedup:  # Short of the target: the fastest measured point.
      _, number, selected = max(chosen, key=lambda c: (c[0], -c[1]))
      self.history.append(dict(self.history[number - 1], chosen=True))
    return selected

  def report(self) -> dict[str, Any]:
    last = self.history[-1] if self.history else {}
    return {'predicted_speedup': last.get('predicted_speedup'),
            'measured_speedup': last.get('measured_speedup'),
            'dense_ms': last.get('dense_ms'), 'compacted_ms': last.get('compacted_ms'),
            'widths': last.get('widths'),
            'measurements': [h for h in self.history if not h.get('chosen')],
            'target_reached': bool(last) and last['measured_speedup'] >= self.target_speedup,
            'table_entries': len(self.model.table.entries),
            'table_measured': self.model.table.measured,
            'table_seconds': self.model.table.seconds}


def end_to_end_timer(batch: Mapping[str, Any], preprocess: Callable[[Any], Any],
                     mesh: Mesh | None, target: str, *,
                     tx: optax.GradientTransformation | None, reps: int) -> EndToEndTimer:
  """:class:`EndToEndTimer` of the jitted eval step or training step (:func:`compare_latency`)."""
  if target not in TARGETS:
    raise ValueError(f'Unknown prune.latency_target {target!r}; choose from {TARGETS}.')
  if target == 'train_step' and tx is None:
    raise ValueError("prune.latency_target='train_step' times the training step: pass the "
                     'optimizer (PruningTarget.tx) to run_pruning.')
  kind = 'train_step_ms' if target == 'train_step' else 'inference_ms'

  def timer(models: Mapping[str, Model]) -> dict[str, float]:
    return compare_latency(models, batch, preprocess, mesh, reps=reps,
                           tx=tx if target == 'train_step' else None,
                           train_only=target == 'train_step')[kind]

  return timer


def make_measure(graphdef: nnx.GraphDef, state: state_lib.TrainState,
                 compact: Callable[[nnx.GraphDef, state_lib.TrainState], Model],
                 timer: EndToEndTimer) -> MeasureFn:
  """``measure(masks) -> (dense_ms, compacted_ms)`` of ``(graphdef, state)`` and its
  compacted form under ``masks``, timed side by side by ``timer``."""

  def measure(masks: Masks) -> tuple[float, float]:
    compacted = compact(graphdef, masking.apply_masks(graphdef, state, masks))
    times = timer({'dense': (graphdef, state), 'compacted': compacted})
    return float(times['dense']), float(times['compacted'])

  return measure


def build_selector(graphdef: nnx.GraphDef, state: state_lib.TrainState, *,
                   layer_timer: LayerTimer, end_to_end: EndToEndTimer,
                   compact: Callable[[nnx.GraphDef, state_lib.TrainState], Model],
                   cache_path: str | None, context: str,
                   max_measurements: int) -> LatencySelector:
  """A :class:`LatencySelector` for the model, calibrated on one dense measurement."""
  model = state_lib.merge_model(graphdef, state)
  latency_model = LatencyModel(layer_entries(model), LatencyTable(layer_timer, cache_path,
                                                                  context))
  dense_ms = end_to_end({'dense': (graphdef, state)})['dense']
  latency_model.calibrate({s.name: s.out_channels for s in masking.prunable_specs(model)},
                          dense_ms)
  return LatencySelector(latency_model, make_measure(graphdef, state, compact, end_to_end),
                         int(max_measurements))
