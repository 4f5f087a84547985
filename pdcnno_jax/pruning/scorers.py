"""Channel importance scores for feature-map pruning: FMP, FMPTL, and two baselines.

Every scorer has the signature ``scorer(graphdef, state, batches, preprocess, **options)`` and
returns ``{layer name: np.ndarray of shape (C,)}`` for the model's prunable layers
(``LayerSpec.prunable``; never the classifier). Higher means more important. Channels that
are already pruned (mask 0) score 0.

* ``fmp``: S_r = mean_n ||F[n, :, :, r]||_a, the mean L_a-norm of each feature map.
* ``fmptl``: Theta_r = |mean_n (-<g, x> + 0.5 <g, x>^2)|, with x = F[n, :, :, r],
  g = dL/dx and L the *sum* of per-sample cross-entropies, normalised by the layer's L2 norm.
  The per-sample inner products <g, x> of every channel of every layer come from ONE backward
  pass: each mask is replaced by a per-sample copy of shape (N, 1, 1, C) and differentiated,
  since d(sum_n L_n) / d(mask[n, r]) = <dL_n/dF[n, :, :, r], F[n, :, :, r]>.
* ``l1``: the L1 norm of each output channel's kernel (data-free baseline).
* ``random``: uniform random scores (baseline).

The data-driven scorers run a jitted function per batch that adds the batch's per-channel sums
to device-resident accumulators; parameters are replicated and batches sharded over the
``'data'`` axis of the mesh, as in training. Scoring uses the model in inference mode
(BatchNorm running statistics), so every sample's score depends on that sample only.

References:
  PDCNNO paper (papers/pdcnno_mapreduce_cgmse.txt), section "FMP"; MR-FPDCNN paper
  (papers/mr_fpdcnn_taylor_glowworm_zh.txt), FMPTL; Molchanov et al. 2017, "Pruning
  convolutional neural networks for resource efficient inference" (Taylor criterion, layer
  L2 normalisation). DESIGN.md, "FMP" and "FMPTL".
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from pdcnno_jax.pruning import masking
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib

Batch = Mapping[str, Any]
Preprocess = Callable[[jax.Array], jax.Array]
Scores = dict[str, np.ndarray]

_COUNT = '__count__'


def _example_weights(batch: Batch) -> jax.Array:
  """Per-example weights: ``batch['mask']`` (1 real, 0 padding) or ones."""
  if 'mask' in batch:
    return batch['mask'].astype(jnp.float32)
  return jnp.ones(batch['label'].shape[:1], jnp.float32)


def _lp_norms(maps: jax.Array, order: float) -> jax.Array:
  """||maps[n, ..., c]||_order over the spatial axes, shape ``(N, C)``."""
  values = jnp.abs(maps).reshape(maps.shape[0], -1, maps.shape[-1])
  if np.isinf(order):
    return values.max(axis=1)
  if order == 1:
    return values.sum(axis=1)
  # Scale by the max so that high orders neither overflow nor underflow.
  peak = jnp.maximum(values.max(axis=1, keepdims=True), jnp.finfo(values.dtype).tiny)
  return peak[:, 0] * ((values / peak) ** order).sum(axis=1) ** (1.0 / order)


def _forward_inference(model: nnx.Module, images: jax.Array) -> jax.Array:
  return model(images, train=False)


def feature_maps(model: nnx.Module, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits and the feature maps F (post-activation, pre-mask) of every prunable layer.

  ``MaskedConv.activation`` returns F; ``nnx.capture(method_outputs=...)`` records every
  method's output during one inference-mode forward pass (unused ones are removed by XLA).

  Returns:
    ``(logits, {layer name: F})``.
  """
  capture = nnx.capture(_forward_inference, nnx.Intermediate,
                        method_outputs=nnx.Intermediate)
  logits, captured = capture(model, images)
  maps = {}
  for spec in masking.prunable_specs(model):
    node = masking.get_submodule(captured, spec.out_mask_path[:-1])
    maps[spec.name] = node['activation'].get_value()[0]
  return logits, maps


def fmp_norm_sums(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                  batch: Batch, preprocess: Preprocess, *,
                  norm_order: float = 1.0) -> dict[str, jax.Array]:
  """Weighted sums over the batch of ||F[n, :, :, r] * mask_r||_a, per prunable layer.

  Returns:
    ``{layer name: (C,)}`` plus ``'__count__'``: the batch's total example weight.
  """
  model = nnx.merge(graphdef, params, model_state)
  weights = _example_weights(batch)
  _, maps = feature_maps(model, preprocess(batch['image']))
  sums = {}
  for spec in masking.prunable_specs(model):
    mask = masking.get_submodule(model, spec.out_mask_path)[...]
    sums[spec.name] = weights @ _lp_norms(maps[spec.name] * mask, norm_order)
  sums[_COUNT] = weights.sum()
  return sums


def taylor_inner_products(graphdef: nnx.GraphDef, params: nnx.State,
                          model_state: nnx.State, batch: Batch,
                          preprocess: Preprocess) -> dict[str, jax.Array]:
  """Per-sample <g, x> of every channel of every prunable layer, from one backward pass.

  x = F[n, :, :, r] * mask_r is the map the network actually uses and g = dL/dx with L the
  sum of the (weighted) per-sample cross-entropies. Replacing mask (C,) by a per-sample copy
  P of shape (N, 1, 1, C) leaves the forward pass unchanged and
  dL/dP[n, r] = <dL/d(F * P)[n, :, :, r], F[n, :, :, r]>, which times mask_r is <g, x>.

  Returns:
    ``{layer name: (N, C)}``.

  References:
    DESIGN.md, "FMPTL"; Molchanov et al. 2017, eq. 7.
  """
  model = nnx.merge(graphdef, params, model_state)
  specs = masking.prunable_specs(model)
  images = preprocess(batch['image'])
  weights = _example_weights(batch)
  num = images.shape[0]
  masks, probes = {}, {}
  for spec in specs:
    mask = masking.get_submodule(model, spec.out_mask_path)[...]
    ndim = 4 if spec.kind == 'conv' else 2
    masks[spec.name] = mask
    probes[spec.name] = jnp.broadcast_to(mask, (num,) + (1,) * (ndim - 2) + mask.shape)

  by_path = {spec.out_mask_path: spec.name for spec in specs}

  def summed_loss(probes):
    probed_state = masking.map_with_paths(
        lambda path, leaf: probes[by_path[path]] if path in by_path else leaf, model_state)
    logits = nnx.merge(graphdef, params, probed_state)(images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return (losses * weights).sum()

  grads = jax.grad(summed_loss)(probes)
  return {name: grads[name].reshape(num, -1) * masks[name] for name in probes}


def taylor_loss_sums(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                     batch: Batch, preprocess: Preprocess) -> dict[str, jax.Array]:
  """Weighted sums over the batch of dL_{n,r} = -<g, x> + 0.5 <g, x>^2, per prunable layer.

  Returns:
    ``{layer name: (C,)}`` plus ``'__count__'``.

  References:
    DESIGN.md, "FMPTL" (second-order Taylor expansion with Hessian ~ g g^T).
  """
  weights = _example_weights(batch)
  products = taylor_inner_products(graphdef, params, model_state, batch, preprocess)
  sums = {name: weights @ (-z + 0.5 * z * z) for name, z in products.items()}
  sums[_COUNT] = weights.sum()
  return sums


@functools.lru_cache(maxsize=32)
def _jitted_accumulator(sums_fn: Callable[..., dict[str, jax.Array]], graphdef: nnx.GraphDef,
                        preprocess: Preprocess, mesh: Mesh,
                        options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
  """``acc + sums_fn(batch)``, jitted with replicated state and a batch-sharded input."""

  def step(acc, params, model_state, batch):
    sums = sums_fn(graphdef, params, model_state, batch, preprocess, **dict(options))
    return jax.tree.map(jnp.add, acc, sums)

  replicated = sharding_lib.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, replicated,
                                     sharding_lib.batch_sharded(mesh)),
                 out_shardings=replicated)


def _scoring_batch(batch: Batch, mesh: Mesh) -> dict[str, Any]:
  missing = {'image', 'label'} - set(batch)
  if missing:
    raise ValueError(f'Scoring batches need keys image and label; missing {sorted(missing)}.')
  size, devices = np.shape(batch['image'])[0], mesh.devices.size
  if size % devices:
    raise ValueError(f'A scoring batch of {size} examples does not split over the {devices} '
                     f'devices of the mesh; use a batch size divisible by {devices} (pad with '
                     "batch['mask'] = 0 for the padding examples).")
  batch = {key: batch[key] for key in ('image', 'label', 'mask') if key in batch}
  if 'mask' not in batch:  # One batch structure, one compilation, padded or not.
    labels = batch['label']
    batch['mask'] = (jnp.ones_like(labels, jnp.float32) if isinstance(labels, jax.Array)
                     else np.ones(np.shape(labels), np.float32))
  return batch


def _accumulate(sums_fn: Callable[..., dict[str, jax.Array]], graphdef: nnx.GraphDef,
                state: state_lib.TrainState, batches: Iterable[Batch],
                preprocess: Preprocess, mesh: Mesh | None,
                **options: Any) -> tuple[dict[str, np.ndarray], float]:
  """Sums of ``sums_fn`` over ``batches``, and the total example weight."""
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  model = state_lib.merge_model(graphdef, state)
  acc = {spec.name: np.zeros((spec.out_channels,), np.float32)
         for spec in masking.prunable_specs(model)}
  acc[_COUNT] = np.zeros((), np.float32)
  acc = sharding_lib.replicate(acc, mesh)
  params = sharding_lib.replicate(state.params, mesh)
  model_state = sharding_lib.replicate(state.model_state, mesh)
  step = _jitted_accumulator(sums_fn, graphdef, preprocess, mesh,
                             tuple(sorted(options.items())))
  for batch in batches:
    acc = step(acc, params, model_state, _scoring_batch(batch, mesh))
  acc = jax.device_get(acc)
  count = float(acc.pop(_COUNT))
  if count <= 0:
    raise ValueError('No scoring examples: pass a non-empty iterable of batches.')
  return {name: np.asarray(value, np.float64) for name, value in acc.items()}, count


def normalize_per_layer(scores: Mapping[str, np.ndarray]) -> Scores:
  """Each layer's scores divided by their L2 norm (layers of all-zero scores stay zero).

  References:
    Molchanov et al. 2017, section 2.2 (layer-wise L2 normalisation); DESIGN.md, "FMPTL".
  """
  normalized = {}
  for name, values in scores.items():
    values = np.asarray(values, np.float64)
    norm = np.linalg.norm(values)
    normalized[name] = values / norm if norm > 0 else values.copy()
  return normalized


def fmp(graphdef: nnx.GraphDef, state: state_lib.TrainState, batches: Iterable[Batch],
        preprocess: Preprocess, *, mesh: Mesh | None = None,
        norm_order: float = 1.0, **unused: Any) -> Scores:
  """FMP scores S_r = mean_n ||F[n, :, :, r]||_a over the scoring examples.

  Args:
    graphdef: the model's graph definition.
    state: TrainState holding parameters and masks.
    batches: iterable of ``{'image', 'label'[, 'mask']}`` batches (``mask`` weights padding
      examples out); every batch size must be divisible by the mesh's device count.
    preprocess: turns the uint8 images into the model's float input (traced inside jit).
    mesh: device mesh with a ``'data'`` axis (default: all devices).
    norm_order: a > 0 (``inf`` allowed) of the L_a-norm.

  Returns:
    ``{prunable layer name: (C,) float64 scores}``; pruned channels score 0.

  Raises:
    ValueError: for a non-positive ``norm_order``, no examples, or a batch that does not
      split over the mesh.

  References:
    PDCNNO paper, FMP (L_a-norm mean of the feature maps); DESIGN.md, "FMP".
  """
  del unused
  norm_order = float(norm_order)
  if not norm_order > 0:
    raise ValueError(f'prune.norm_order must be > 0 (1 = L1, 2 = L2, inf), got {norm_order}.')
  sums, count = _accumulate(fmp_norm_sums, graphdef, state, batches, preprocess, mesh,
                            norm_order=norm_order)
  return {name: value / count for name, value in sums.items()}


def fmptl(graphdef: nnx.GraphDef, state: state_lib.TrainState, batches: Iterable[Batch],
          preprocess: Preprocess, *, mesh: Mesh | None = None, normalize: bool = True,
          **unused: Any) -> Scores:
  """FMPTL scores Theta_r = |mean_n (-<g, x> + 0.5 <g, x>^2)|, L2-normalised per layer.

  Args:
    graphdef, state, batches, preprocess, mesh: as for :func:`fmp`.
    normalize: divide each layer's scores by their L2 norm (the design's rule); False gives
      the raw |mean_n dL_{n,r}| (an estimate of the loss change per example).

  Returns:
    ``{prunable layer name: (C,) float64 scores}``; pruned channels score 0.

  References:
    MR-FPDCNN paper, FMPTL; DESIGN.md, "FMPTL"; Molchanov et al. 2017.
  """
  del unused
  sums, count = _accumulate(taylor_loss_sums, graphdef, state, batches, preprocess, mesh)
  scores = {name: np.abs(value / count) for name, value in sums.items()}
  return normalize_per_layer(scores) if normalize else scores


def l1(graphdef: nnx.GraphDef, state: state_lib.TrainState,
       batches: Iterable[Batch] | None = None, preprocess: Preprocess | None = None,
       **unused: Any) -> Scores:
  """Weight-L1 baseline: sum of |kernel| of each output channel (no data needed).

  References:
    Li et al. 2017, "Pruning filters for efficient ConvNets" (filter L1 norm).
  """
  del batches, preprocess, unused
  model = state_lib.merge_model(graphdef, state)
  scores = {}
  for spec in masking.prunable_specs(model):
    kernel = np.asarray(jax.device_get(
        masking.get_submodule(model, spec.param_path).kernel[...]), np.float64)
    mask = np.asarray(jax.device_get(masking.get_submodule(model, spec.out_mask_path)[...]))
    per_channel = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
    scores[spec.name] = per_channel * (mask != 0)
  return scores


def random(graphdef: nnx.GraphDef, state: state_lib.TrainState,
           batches: Iterable[Batch] | None = None, preprocess: Preprocess | None = None, *,
           seed: int = 0, **unused: Any) -> Scores:
  """Random baseline: i.i.d. uniform(0, 1] scores from ``seed`` (no data needed)."""
  del batches, preprocess, unused
  model = state_lib.merge_model(graphdef, state)
  rng = np.random.default_rng(seed)
  scores = {}
  for spec in masking.prunable_specs(model):
    mask = np.asarray(jax.device_get(masking.get_submodule(model, spec.out_mask_path)[...]))
    scores[spec.name] = (1.0 - rng.random(spec.out_channels)) * (mask != 0)
  return scores


SCORERS: dict[str, Callable[..., Scores]] = {
    'fmp': fmp, 'fmptl': fmptl, 'l1': l1, 'random': random}


def get_scorer(method: str) -> Callable[..., Scores]:
  """The scorer named ``method`` (``prune.method``)."""
  if method not in SCORERS:
    raise ValueError(f'Unknown pruning method {method!r}; set prune.method to one of '
                     f'{sorted(SCORERS)} (or none).')
  return SCORERS[method]
