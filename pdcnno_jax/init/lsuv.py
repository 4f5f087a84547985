"""LSUV-style data-driven variance scaling (baseline for IFAS).

Layer-sequential unit-variance initialisation (Mishkin and Matas 2016, Algorithm 1) without
its orthonormal pre-initialisation: starting from the model's own initial draw (He-normal,
LeCun-normal for the classifier), for each conv/dense layer in forward order
(``model.layer_specs()``), measure the variance of the layer's output (the conv / dense
output, before BatchNorm and the activation) on one batch and divide the layer's kernel by
its standard deviation, until ``|Var - 1| < tolerance`` or ``max_iterations`` forward passes
for that layer. Biases (zero at initialisation) and BatchNorm parameters are not changed.

The variance is over every entry of the output (batch, positions and channels together, as
in the paper's Caffe code). The network runs in inference mode (``train=False``: no dropout,
BatchNorm with its initial running statistics).

References:
  Mishkin and Matas, "All you need is a good init", ICLR 2016, Algorithm 1
  (Tol_var = 0.1, T_max = 10).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pdcnno_jax.init import ifas
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Preprocess = Callable[[jax.Array], jax.Array]

TOLERANCE = 0.1
MAX_ITERATIONS = 10


def _intermediate(tree: Any, path: Sequence[Any]) -> jax.Array:
  for key in path:
    tree = tree[key]
  return tree['__call__'][0]


@functools.partial(jax.jit, static_argnames=('graphdef', 'preprocess', 'layer_index'))
def layer_output_variances(base_params: nnx.State, model_state: nnx.State, images: jax.Array,
                           log_scales: jax.Array, *, graphdef: nnx.GraphDef,
                           preprocess: Preprocess, layer_index: tuple[int, ...]) -> jax.Array:
  """Output variance of every layer of ``layer_specs()`` with kernels scaled by ``exp(s)``.

  Args:
    base_params: the initial draw.
    model_state: the model's non-parameter state.
    images: a uint8 NHWC batch (sharded over the mesh or not).
    log_scales: ``(num_layers,)`` per-layer log-scales applied to the kernels.
    graphdef: the model's graph definition.
    preprocess: maps uint8 images to the model's input.
    layer_index: from :func:`pdcnno_jax.init.ifas.kernel_layer_index`.

  Returns:
    ``(num_layers,)`` variances of the conv/dense outputs, in forward order.
  """
  params = ifas.apply_layer_scales(base_params, log_scales, layer_index)
  model = nnx.merge(graphdef, params, model_state)
  forward = nnx.capture(lambda m, x: m(x, train=False), nnx.Intermediate,
                        method_outputs=nnx.Intermediate)
  _, intermediates = forward(model, preprocess(images))
  return jnp.stack([jnp.var(_intermediate(intermediates, spec.param_path))
                    for spec in model.layer_specs()])


def num_batches_needed(init_config: ml_collections.ConfigDict | None = None) -> int:
  """LSUV needs one batch."""
  del init_config
  return 1


def initialize(init_config: ml_collections.ConfigDict | None, graphdef: nnx.GraphDef,
               state: TrainState, batches: Sequence[Batch], preprocess: Preprocess,
               mesh: Mesh, key: jax.Array | None = None, *, tolerance: float = TOLERANCE,
               max_iterations: int = MAX_ITERATIONS) -> tuple[nnx.State, dict[str, Any]]:
  """LSUV-scaled starting parameters (same call shape as :func:`ifas.initialize`).

  Args:
    init_config: unused (kept for the common entry-point shape).
    graphdef: the model's graph definition.
    state: the freshly initialised train state (its params are the draw to scale).
    batches: at least one batch; the first one's images measure the variances.
    preprocess: maps uint8 images to the model's input.
    mesh: the data-parallel mesh; params replicated, the batch sharded over ``'data'``.
    key: unused (LSUV is deterministic given the batch).
    tolerance: stop scaling a layer once ``|Var - 1| < tolerance``.
    max_iterations: forward passes allowed per layer.

  Returns:
    ``(params, report)``; the report holds ``method``, ``gradient_steps`` (0),
    ``forward_passes``, ``log_scales`` (applied per layer), ``variances_before`` /
    ``variances_after`` and ``wall_time_s``.

  Raises:
    ValueError: without a batch, or for a non-positive tolerance / iteration count.
  """
  del init_config, key
  if not batches:
    raise ValueError('LSUV needs one batch of training images; got none.')
  if tolerance <= 0 or max_iterations < 1:
    raise ValueError(f'Need tolerance > 0 and max_iterations >= 1, got {tolerance} and '
                     f'{max_iterations}.')
  start = time.perf_counter()
  layer_index = tuple(ifas.kernel_layer_index(graphdef, state.params, state.model_state))
  num_layers = max(layer_index) + 1
  base = sharding_lib.replicate(state.params, mesh)
  model_state = sharding_lib.replicate(state.model_state, mesh)
  images = jax.device_put(batches[0]['image'], sharding_lib.batch_sharded(mesh))
  variances = functools.partial(layer_output_variances, base, model_state, images,
                                graphdef=graphdef, preprocess=preprocess,
                                layer_index=layer_index)

  log_scales = np.zeros((num_layers,), np.float32)
  before = np.asarray(variances(jnp.asarray(log_scales)))
  current, passes = before, 1
  for layer in range(num_layers):
    for _ in range(max_iterations):
      v = float(current[layer])
      if not np.isfinite(v) or v <= 0 or abs(v - 1.0) < tolerance:
        break
      log_scales[layer] -= 0.5 * np.log(v)
      current = np.asarray(variances(jnp.asarray(log_scales)))
      passes += 1
  params = jax.jit(ifas.apply_layer_scales, static_argnums=2)(
      base, jnp.asarray(log_scales), layer_index)
  report = {
      'method': 'lsuv',
      'gradient_steps': 0,
      'forward_passes': passes,
      'log_scales': log_scales.tolist(),
      'variances_before': before.tolist(),
      'variances_after': current.tolist(),
      'wall_time_s': time.perf_counter() - start,
  }
  return params, report
