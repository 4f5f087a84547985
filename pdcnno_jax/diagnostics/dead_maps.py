"""Dead and near-dead feature maps of every prunable conv layer, measured on fixed batches.

A feature map r of a conv layer is *dead* when its post-activation output F[n, :, :, r] is
zero on every example n of the measured batches (its ReLU never fires), and *near-dead* when
its mean activation is below ``near_dead_ratio`` times the mean over the layer's kept maps.
Dead maps carry no signal: a pruning criterion that removes them changes no prediction, so a
model used as a pruning baseline should have few of them. Pruned maps (mask 0) are neither
counted nor used in the layer's mean. The maps come from ``scorers.feature_maps`` (the same
post-activation, pre-mask tensors the FMP / FMPTL scorers read).

References:
  DESIGN.md, "Diagnostics"; Lu et al. 2019, "Dying ReLU and initialization" (dead units).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.models import factory
from pdcnno_jax.optim import factory as optim_factory
from pdcnno_jax.pruning import masking, scorers
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib

Batch = Mapping[str, Any]
Preprocess = Callable[[jax.Array], jax.Array]


@functools.lru_cache(maxsize=32)
def _jitted_statistics(graphdef: nnx.GraphDef, preprocess: Preprocess) -> Callable[..., Any]:
  """``(acc, params, model_state, images, weights) -> acc`` with per-channel peak and sum."""

  def step(acc, params, model_state, images, weights):
    model = nnx.merge(graphdef, params, model_state)
    _, maps = scorers.feature_maps(model, preprocess(images))
    out = {}
    for name in sorted(set(acc) - {'count'}):  # Conv layers (maps may hold masked denses).
      value = maps[name]
      spatial = tuple(range(1, value.ndim - 1))
      per_example = value.mean(axis=spatial)  # (N, C), >= 0 after the ReLU.
      peak = jnp.max(jnp.abs(value).max(axis=spatial) * (weights[:, None] > 0), axis=0)
      out[name] = {'peak': jnp.maximum(acc[name]['peak'], peak),
                   'sum': acc[name]['sum'] + weights @ per_example}
    out['count'] = acc['count'] + weights.sum()
    return out

  return jax.jit(step)


def _weights(batch: Batch) -> np.ndarray | jax.Array:
  if 'mask' in batch:
    return batch['mask'].astype(jnp.float32)
  return jnp.ones(np.shape(batch['label'] if 'label' in batch else batch['image'])[:1],
                  jnp.float32)


def count_dead_maps(graphdef: nnx.GraphDef, state: state_lib.TrainState,
                    batches: Iterable[Batch], preprocess: Preprocess, *,
                    near_dead_ratio: float = 1e-6) -> dict[str, Any]:
  """Counts dead and near-dead feature maps per prunable conv layer.

  Args:
    graphdef: the model's graph definition.
    state: TrainState (or any object with ``params`` and ``model_state``).
    batches: a fixed, finite iterable of ``{'image'[, 'label', 'mask']}`` batches, e.g. the
      first ``diagnostics.dead_map_examples`` held-out examples; ``mask`` (1 real, 0 padding)
      weights padding examples out. Arrays may be NumPy or (sharded) jax.Arrays.
    preprocess: uint8 images -> model input, traced inside jit.
    near_dead_ratio: a kept map is near-dead when its mean activation is below this times
      the mean activation of the layer's kept maps (dead maps are near-dead too).

  Returns:
    A JSON-serialisable dict: ``examples``; ``near_dead_ratio``; ``layers``: ``{name:
    {'channels', 'kept', 'dead', 'dead_fraction', 'near_dead', 'near_dead_fraction',
    'dead_indices'}}`` (fractions of the kept maps; indices into the layer's channels) for
    every prunable conv layer (none: ``layers`` is empty); ``max_dead_fraction`` over the
    layers (0 without any).

  Raises:
    ValueError: when ``batches`` holds no example.
  """
  model = state_lib.merge_model(graphdef, state)
  specs = [s for s in masking.prunable_specs(model) if s.kind == 'conv']
  masks = {s.name: np.asarray(jax.device_get(masking.get_submodule(model, s.out_mask_path)[...]))
           for s in specs}
  acc = {s.name: {'peak': jnp.zeros((s.out_channels,), jnp.float32),
                  'sum': jnp.zeros((s.out_channels,), jnp.float32)} for s in specs}
  acc['count'] = jnp.zeros((), jnp.float32)
  step = _jitted_statistics(graphdef, preprocess)
  for batch in batches:
    acc = step(acc, state.params, state.model_state, batch['image'], _weights(batch))
  acc = jax.device_get(acc)
  count = float(acc.pop('count'))
  if count <= 0:
    raise ValueError('count_dead_maps: no examples; pass a non-empty iterable of batches '
                     '(diagnostics.dead_map_examples > 0).')
  result = {'examples': int(round(count)), 'near_dead_ratio': float(near_dead_ratio),
            'layers': {}}
  for name, stats in acc.items():
    kept = masks[name] != 0
    mean = np.asarray(stats['sum'], np.float64) / count
    dead = kept & (np.asarray(stats['peak']) <= 0)
    layer_mean = float(mean[kept].mean()) if kept.any() else 0.0
    near_dead = kept & (mean < near_dead_ratio * layer_mean) if layer_mean > 0 else dead
    num_kept = int(kept.sum())
    result['layers'][name] = {
        'channels': int(kept.size), 'kept': num_kept, 'dead': int(dead.sum()),
        'dead_fraction': float(dead.sum()) / max(num_kept, 1),
        'near_dead': int(near_dead.sum()),
        'near_dead_fraction': float(near_dead.sum()) / max(num_kept, 1),
        'dead_indices': [int(i) for i in np.flatnonzero(dead)]}
  result['max_dead_fraction'] = max(
      [v['dead_fraction'] for v in result['layers'].values()], default=0.0)
  return result


def held_out_batches(dataset: input_pipeline.Dataset, num_examples: int, *, batch_size: int,
                     sharding: jax.sharding.Sharding) -> list[Batch]:
  """The first ``num_examples`` held-out examples (validation, else test), in padded batches.

  The same examples every time for a given data set, so counts taken at different points of
  a run (before pruning, end of training) are comparable. Examples past ``num_examples`` in
  the last batch get ``mask`` 0.

  Args:
    dataset: from ``input_pipeline.load_dataset``.
    num_examples: examples wanted (``diagnostics.dead_map_examples``), > 0.
    batch_size: global batch size (``data.eval_batch_size``).
    sharding: batch sharding, as for ``input_pipeline.eval_batches``.

  Returns:
    Batches ``{'image', 'label', 'mask'}`` holding ``min(num_examples, split size)`` real
    examples.
  """
  if num_examples <= 0:
    raise ValueError(f'diagnostics.dead_map_examples must be > 0 here, got {num_examples}.')
  split = 'validation' if 'validation' in dataset.splits else 'test'
  taken, count = [], 0
  for batch in input_pipeline.eval_batches(dataset, split, global_batch_size=batch_size,
                                           sharding=sharding, prefetch=0):
    mask = batch['mask']
    keep = (jnp.cumsum(mask) <= num_examples - count).astype(mask.dtype)
    batch = {**batch, 'mask': mask * keep}
    taken.append(batch)
    count += int(round(float(jnp.sum(batch['mask']))))
    if count >= num_examples:
      break
  return taken


def removed_dead(dead_maps: Mapping[str, Any],
                 kept_after: Mapping[str, np.ndarray]) -> dict[str, dict[str, int]]:
  """How many of the maps a pruning step removed were dead before it.

  Args:
    dead_maps: :func:`count_dead_maps` of the model before pruning.
    kept_after: ``{layer name: (C,) mask}`` after pruning (nonzero = kept), e.g.
      ``masking.read_masks(model)``, indexed like the model before pruning.

  Returns:
    ``{layer name: {'removed': maps removed, 'removed_dead': of which dead}}`` per conv layer.
  """
  out = {}
  for name, layer in dead_maps['layers'].items():
    kept = np.asarray(kept_after[name]) != 0
    dead = np.zeros(kept.shape, bool)
    dead[layer['dead_indices']] = True
    removed = ~kept
    out[name] = {'removed': int(removed.sum()) - (layer['channels'] - layer['kept']),
                 'removed_dead': int((removed & dead).sum())}
  return out


def summary_line(dead_maps: Mapping[str, Any]) -> str:
  """One log line, e.g. ``dead maps (1000 examples): conv1 0/6 (0.0%, near-dead 0.0%), ...``."""
  parts = [f'{name} {v["dead"]}/{v["kept"]} ({100 * v["dead_fraction"]:.1f}%, near-dead '
           f'{100 * v["near_dead_fraction"]:.1f}%)' for name, v in dead_maps['layers'].items()]
  return f'dead maps ({dead_maps["examples"]} examples): ' + ', '.join(parts)


def scalars(dead_maps: Mapping[str, Any]) -> dict[str, float]:
  """Flat ``{'<layer>/dead_fraction': f, '<layer>/near_dead_fraction': f}`` for a writer."""
  out = {}
  for name, v in dead_maps['layers'].items():
    out[f'{name}/dead_fraction'] = float(v['dead_fraction'])
    out[f'{name}/near_dead_fraction'] = float(v['near_dead_fraction'])
  return out


def count_dead_maps_in_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                                  model_overrides: Mapping[str, Any] | None = None
                                  ) -> dict[str, Any]:
  """:func:`count_dead_maps` of the latest checkpoint of a finished run (tools, benchmarks).

  Args:
    config: the run's config (data, model, optimizer and diagnostics sections are read).
    workdir: the run directory (``<workdir>/checkpoints``).
    model_overrides: constructor arguments of a compacted model
      (``report['prune']['architecture']['constructor_kwargs']``); None for the dense one.
  """
  dataset = input_pipeline.load_dataset(config.data, seed=config.seed)
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in (model_overrides or {}).items()}
  model = factory.build_model(config.model, num_classes=dataset.num_classes,
                              input_shape=dataset.image_shape, rngs=nnx.Rngs(0), **overrides)
  tx = optim_factory.build_optimizer(config.optimizer, total_steps=1, steps_per_epoch=1)
  graphdef, state = state_lib.create_train_state(model, tx)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, _ = checkpointer.restore(state)
  checkpointer.close()
  mesh = sharding_lib.make_mesh()
  batches = held_out_batches(dataset, int(config.diagnostics.dead_map_examples),
                             batch_size=int(config.data.eval_batch_size),
                             sharding=sharding_lib.batch_sharded(mesh))
  preprocess = functools.partial(input_pipeline.normalize, dataset=dataset)
  return count_dead_maps(graphdef, state, batches, preprocess,
                         near_dead_ratio=float(config.diagnostics.near_dead_ratio))
