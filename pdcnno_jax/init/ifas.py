"""IFAS: choose a model's starting weights with a glowworm swarm (MR-FPDCNN).

A candidate starting point is a low-dimensional vector ``x`` in the box ``[-r, r]^d``
(``r = init.log_scale_range``), mapped to full parameters by a search space
(:func:`make_decoder`): ``'layer_scales'`` multiplies each conv/dense kernel of the model's
own initial draw by ``exp(x_l)``; ``'subspace'`` adds ``sum_j x_j direction_j`` along random
directions drawn on the fly. ``x = 0`` is the unchanged draw and is always glowworm 0 of the
first generation, so the result is never worse (by the fitness) than plain He init.

Fitness of ``x`` (minimised, :func:`make_fitness_fn`): the held-out cross-entropy after
``k = init.sgd_steps`` plain SGD steps from ``params(x)`` on ``k`` fixed training batches.
The whole search (``generations`` rounds of ask, evaluate, tell with ``gso.py``) is one
``jax.jit``. Cost: ``generations * swarm_size * sgd_steps`` gradient steps plus
``generations * swarm_size`` held-out forward passes; the report says so and the trainer
charges them (``benchmarks/bench_ifas.py``).

References:
  DESIGN.md, "IFAS" (the authority for this implementation).
  MR-FPDCNN paper (``papers/mr_fpdcnn_taylor_glowworm_zh.txt``), Section 2.2: IFAS
  initialises the DCNN weights with GSO + ISS before the Map-phase training.
  Li et al., "Measuring the intrinsic dimension of objective landscapes", ICLR 2018 (random
  subspaces generated on the fly).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pdcnno_jax.init import gso
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import steps
from pdcnno_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Preprocess = Callable[[jax.Array], jax.Array]

SWARM_METHODS = ('ifas', 'gso')  # Glowworm swarm with / without the information sharing.
SEARCH_SPACES = ('layer_scales', 'subspace')
METHODS = ('he',) + SWARM_METHODS  # The methods this module runs (see methods.METHODS).


# --------------------------------------------------------------------------------------
# Search spaces.
# --------------------------------------------------------------------------------------


def kernel_layer_index(graphdef: nnx.GraphDef, params: nnx.State,
                       model_state: nnx.State) -> list[int]:
  """For every leaf of ``params`` (``jax.tree.leaves`` order): its layer's index or -1.

  Layer ``l`` is ``model.layer_specs()[l]``; only the layer's ``kernel`` leaf is assigned.

  Raises:
    ValueError: when the model has no ``layer_specs()`` or a spec's kernel is missing.
  """
  model = nnx.merge(graphdef, params, model_state)
  if not hasattr(model, 'layer_specs'):
    raise ValueError(f'{type(model).__name__} has no layer_specs(); IFAS needs a model of '
                     'pdcnno_jax.models.')
  kernel_paths = {tuple(spec.param_path) + ('kernel',): i
                  for i, spec in enumerate(model.layer_specs())}
  index = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path
                 if not isinstance(k, jax.tree_util.GetAttrKey))
    index.append(kernel_paths.pop(keys, -1))
  if kernel_paths:
    raise ValueError(f'No kernel parameter found for layers {sorted(kernel_paths.values())}'
                     f' at paths {sorted(kernel_paths)}.')
  return index


def apply_layer_scales(params: Any, log_scales: jax.Array,
                       layer_index: Sequence[int]) -> Any:
  """Multiplies layer ``l``'s kernel by ``exp(log_scales[l])``; other leaves unchanged."""
  leaves, treedef = jax.tree.flatten(params)
  scaled = [leaf if i < 0 else leaf * jnp.exp(log_scales[i]).astype(leaf.dtype)
            for leaf, i in zip(leaves, layer_index)]
  return jax.tree.unflatten(treedef, scaled)


def apply_subspace(params: Any, coords: jax.Array, key: jax.Array,
                   layer_index: Sequence[int]) -> Any:
  """``params + sum_j coords[j] * direction_j`` with directions drawn from ``fold_in(key, j)``.

  Args:
    params: the base parameters (the initial draw).
    coords: ``(d,)`` subspace coordinates.
    key: PRNG key that defines the subspace (fixed for a search).
    layer_index: from :func:`kernel_layer_index`; only kernels (index >= 0) are moved.

  Returns:
    The moved parameters. Memory is O(params): the directions are regenerated inside a
    ``fori_loop`` and never stored together.
  """
  leaves, treedef = jax.tree.flatten(params)
  dim = coords.shape[0]
  movable = [k for k, i in enumerate(layer_index) if i >= 0]
  sizes = [leaves[k].size for k in movable]
  offsets = np.cumsum([0] + sizes)
  # Per-entry scale: the RMS of the entry's initial kernel, over sqrt(d).
  scale = jnp.concatenate([
      jnp.full((n,), jnp.sqrt(jnp.mean(jnp.square(leaves[k]))) / math.sqrt(dim))
      for k, n in zip(movable, sizes)])
  flat = jnp.concatenate([leaves[k].reshape(-1) for k in movable])

  def add_direction(j, moved):
    # One draw for every kernel at once: a single RNG op compiles much faster than one
    # per leaf.
    noise = jax.random.normal(jax.random.fold_in(key, j), moved.shape, moved.dtype)
    return moved + coords[j].astype(moved.dtype) * scale * noise

  moved = jax.lax.fori_loop(0, dim, add_direction, flat)
  leaves = list(leaves)
  for k, lo, hi in zip(movable, offsets[:-1], offsets[1:]):
    leaves[k] = moved[lo:hi].reshape(leaves[k].shape).astype(leaves[k].dtype)
  return jax.tree.unflatten(treedef, leaves)


def make_decoder(search_space: str, layer_index: Sequence[int],
                 subspace_key: jax.Array | None = None) -> Callable[[Any, jax.Array], Any]:
  """``decode(base_params, x) -> params`` for a search space.

  * ``'layer_scales'``: ``x`` has one entry per conv/dense layer of the model
    (``model.layer_specs()``, ``d = len(specs)``) and multiplies that layer's kernel of the
    model's own initial draw (He-normal for hidden layers, LeCun-normal for the classifier,
    see ``models/layers.py``) by ``exp(x_l)``. Biases and BatchNorm parameters are kept.
  * ``'subspace'``: ``params = base + sum_j x_j * direction_j`` for ``j < subspace_dim``. Each
    direction is drawn on the fly from ``fold_in(key, j)`` (never stored as a dense
    projection matrix): per kernel an i.i.d. normal tensor scaled by the RMS of the initial
    kernel and by ``1 / sqrt(subspace_dim)``, so that a uniform ``x`` in ``[-r, r]^d``
    perturbs every kernel by about ``r / sqrt(3)`` of its own scale. Biases and BatchNorm
    parameters are kept.

  Raises:
    ValueError: for an unknown search space or a subspace without a key.
  """
  if search_space == 'layer_scales':
    return functools.partial(_decode_scales, layer_index=tuple(layer_index))
  if search_space == 'subspace':
    if subspace_key is None:
      raise ValueError('The subspace search space needs a PRNG key.')
    return lambda base, x: apply_subspace(base, x, subspace_key, layer_index)
  raise ValueError(f'Unknown init.search_space {search_space!r}; choose from {SEARCH_SPACES}.')


def _decode_scales(base, x, *, layer_index):
  return apply_layer_scales(base, x, layer_index)


# --------------------------------------------------------------------------------------
# Fitness.
# --------------------------------------------------------------------------------------


def make_fitness_fn(graphdef: nnx.GraphDef, preprocess: Preprocess, learning_rate: float
                    ) -> Callable[[Any, nnx.State, Batch, Batch], jax.Array]:
  """``fitness(params, model_state, sgd_batches, heldout) -> loss`` (traceable).

  ``sgd_batches`` holds the ``k`` SGD batches stacked on a new leading axis. The result is
  the held-out cross-entropy after ``k`` plain SGD steps from ``params``. Every step and the
  held-out loss use the model in training mode (``train=True``): with BatchNorm, running
  averages after ``k`` steps still mostly hold their initial values, so an eval-mode loss
  would rank candidates by statistics the trainer never uses; the held-out pass is the loss
  the optimizer's next step sees. The model state (BatchNorm statistics, RNG counters) is
  threaded through the SGD steps of each candidate from the same starting value, so every
  candidate sees the same dropout masks, and is discarded afterwards.
  """
  loss_fn = functools.partial(steps.batch_loss, graphdef=graphdef, preprocess=preprocess,
                              train=True)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def fitness(params, model_state, sgd_batches, heldout):
    def sgd_step(carry, batch):
      params, model_state = carry
      grads, (_, model_state) = grad_fn(params, model_state, batch)
      params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
      return (params, model_state), None

    (params, model_state), _ = jax.lax.scan(sgd_step, (params, model_state), sgd_batches)
    loss, _ = loss_fn(params, model_state, heldout)
    return loss

  return fitness


# --------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------


def num_batches_needed(init_config: ml_collections.ConfigDict) -> int:
  """Batches :func:`initialize` needs: ``sgd_steps + 1`` for ifas/gso, 0 for he."""
  return 0 if init_config.method == 'he' else int(init_config.sgd_steps) + 1


def _validate(init_config: ml_collections.ConfigDict, batches: Sequence[Batch]) -> None:
  method = init_config.method
  if method not in METHODS:
    raise ValueError(f'Unknown init.method {method!r}; choose from {METHODS} '
                     '(LSUV lives in pdcnno_jax.init.lsuv).')
  if method == 'he':
    return
  for name in ('swarm_size', 'generations', 'sgd_steps'):
    if int(init_config[name]) < 1:
      raise ValueError(f'init.{name} must be >= 1, got {init_config[name]}.')
  if int(init_config.swarm_size) < 2:
    raise ValueError(f'init.swarm_size must be >= 2, got {init_config.swarm_size}.')
  if init_config.search_space not in SEARCH_SPACES:
    raise ValueError(f'Unknown init.search_space {init_config.search_space!r}; choose from '
                     f'{SEARCH_SPACES}.')
  if init_config.search_space == 'subspace' and int(init_config.subspace_dim) < 1:
    raise ValueError(f'init.subspace_dim must be >= 1, got {init_config.subspace_dim}.')
  if float(init_config.log_scale_range) <= 0:
    raise ValueError(f'init.log_scale_range must be > 0, got {init_config.log_scale_range}.')
  needed = num_batches_needed(init_config)
  if len(batches) < needed:
    raise ValueError(f'init.method={method!r} needs {needed} batches (init.sgd_steps='
                     f'{init_config.sgd_steps} for SGD + 1 held out), got {len(batches)}.')
  shapes = {jax.tree.map(lambda a: tuple(a.shape), dict(b)).__repr__() for b in batches}
  if len(shapes) != 1:
    raise ValueError(f'All IFAS batches must have the same shapes, got {sorted(shapes)}.')


@dataclasses.dataclass(frozen=True)
class SearchSpec:
  """Static description of one swarm search (hashable: it keys the compilation cache).

  Attributes:
    search_space: ``'layer_scales'`` or ``'subspace'``.
    num_dims: dimension of the search space.
    layer_index: from :func:`kernel_layer_index`.
    swarm_size: glowworms.
    generations: GSO generations (fitness evaluations per glowworm).
    sgd_steps: ``k``, SGD steps per fitness evaluation.
    learning_rate: SGD learning rate of the fitness.
    bound: half-width ``r`` of the search box ``[-r, r]^d``.
    chunk_size: candidates evaluated at once (vmapped).
    information_sharing: GSO-ISS (IFAS) or plain GSO.
  """
  search_space: str
  num_dims: int
  layer_index: tuple[int, ...]
  swarm_size: int
  generations: int
  sgd_steps: int
  learning_rate: float
  bound: float
  chunk_size: int
  information_sharing: bool


@functools.partial(jax.jit, static_argnames=('spec', 'graphdef', 'preprocess'))
def swarm_search(base_params: nnx.State, model_state: nnx.State,
                 sgd_batches: Sequence[Batch], heldout: Batch, key_data: jax.Array, *,
                 spec: SearchSpec, graphdef: nnx.GraphDef, preprocess: Preprocess
                 ) -> tuple[nnx.State, gso.GSOState, dict[str, jax.Array]]:
  """The jitted IFAS / GSO search (compiled once per ``spec``, model and preprocess).

  A ``lax.scan`` over generations; the swarm is evaluated with ``lax.map`` over chunks of
  ``spec.chunk_size`` candidates (each chunk vmapped), parameters replicated and batches
  sharded over the mesh's ``'data'`` axis like training.

  Args:
    base_params: the initial draw (``x = 0``), replicated.
    model_state: the model's non-parameter state, replicated.
    sgd_batches: ``spec.sgd_steps`` batches, sharded over the batch dimension.
    heldout: the held-out batch, sharded likewise.
    key_data: ``jax.random.key_data`` of the search's PRNG key (replicated).
    spec: static description of the search.
    graphdef: the model's graph definition.
    preprocess: maps uint8 images to the model's input.

  Returns:
    ``(best_params, final_gso_state, trace)`` (trace from :meth:`GlowwormSwarm.run`).
  """
  swarm_key, subspace_key = jax.random.split(jax.random.wrap_key_data(key_data))
  decode = make_decoder(spec.search_space, spec.layer_index, subspace_key)
  fitness_fn = make_fitness_fn(graphdef, preprocess, spec.learning_rate)
  strategy = gso.GlowwormSwarm(spec.num_dims, spec.swarm_size)
  params = strategy.default_params(-spec.bound, spec.bound,
                                   information_sharing=spec.information_sharing)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *sgd_batches)

  def candidate_fitness(x):
    return fitness_fn(decode(base_params, x), model_state, stacked, heldout)

  def objective(positions):
    if spec.chunk_size >= spec.swarm_size:
      return jax.vmap(candidate_fitness)(positions)
    return jax.lax.map(candidate_fitness, positions, batch_size=spec.chunk_size)

  seed = jnp.zeros((1, spec.num_dims), jnp.float32)  # Glowworm 0 starts at the draw.
  final, trace = strategy.run(objective, swarm_key, spec.generations, params,
                              seed_positions=seed)
  return decode(base_params, final.best_position), final, trace


def initialize(init_config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
               state: TrainState, batches: Sequence[Batch], preprocess: Preprocess,
               mesh: Mesh, key: jax.Array) -> tuple[nnx.State, dict[str, Any]]:
  """Starting parameters chosen by ``init.method`` (he | ifas | gso) and a cost report.

  Args:
    init_config: the ``config.init`` section (method, swarm_size, generations, sgd_steps,
      sgd_learning_rate, search_space, subspace_dim, log_scale_range, swarm_chunk_size).
    graphdef: the model's graph definition.
    state: the freshly initialised train state; ``state.params`` is the He draw that the
      search starts from, ``state.model_state`` the masks / BatchNorm / RNG state.
    batches: at least :func:`num_batches_needed` training batches
      (``{'image': uint8 NHWC, 'label': int32}``, all the same shape, global batch divisible
      by the mesh size; host arrays in a single process, or global ``jax.Array`` s as the
      input pipeline yields them): the first ``sgd_steps`` for the SGD steps, the next one
      held out for the fitness. Extra batches are ignored. Not used by ``'he'``.
    preprocess: maps uint8 images to the model's float input (runs inside jit). Pass the
      same function object on every call to reuse the compilation.
    mesh: the data-parallel mesh (``'data'`` axis); parameters are replicated and batches
      sharded over it.
    key: PRNG key of the search (same key, same result).

  Returns:
    ``(params, report)``: ``params`` an ``nnx.State`` with the structure of ``state.params``
    (replicated on ``mesh``); ``report`` a dict with ``method``, ``search_space``,
    ``num_dims``, ``swarm_size``, ``generations``, ``sgd_steps``, ``gradient_steps``
    (``generations * swarm_size * sgd_steps``), ``forward_passes`` (held-out evaluations,
    ``generations * swarm_size``), ``examples_per_batch``, ``he_fitness`` (fitness of the
    unchanged draw, evaluated as glowworm 0 of generation 0), ``best_fitness``,
    ``best_position``, ``best_fitness_per_generation``, ``compile_time_s`` (about 0 when
    the compilation is cached) and ``wall_time_s`` (total, compilation included).

  Raises:
    ValueError: for unknown methods / search spaces, bad sizes or too few batches.
  """
  _validate(init_config, batches)
  method = init_config.method
  if method == 'he':
    return state.params, {'method': 'he', 'gradient_steps': 0, 'forward_passes': 0,
                          'wall_time_s': 0.0}

  start = time.perf_counter()
  swarm_size = int(init_config.swarm_size)
  layer_index = kernel_layer_index(graphdef, state.params, state.model_state)
  search_space = init_config.search_space
  num_dims = (max(layer_index) + 1 if search_space == 'layer_scales'
              else int(init_config.subspace_dim))
  spec = SearchSpec(
      search_space=search_space, num_dims=num_dims, layer_index=tuple(layer_index),
      swarm_size=swarm_size, generations=int(init_config.generations),
      sgd_steps=int(init_config.sgd_steps),
      learning_rate=float(init_config.sgd_learning_rate),
      bound=float(init_config.log_scale_range),
      chunk_size=int(init_config.swarm_chunk_size) or swarm_size,
      information_sharing=(method == 'ifas'))
  k = spec.sgd_steps
  data = sharding_lib.batch_sharded(mesh)
  place = lambda tree: jax.device_put(tree, data)
  args = (sharding_lib.replicate(state.params, mesh),
          sharding_lib.replicate(state.model_state, mesh),
          [place(dict(b)) for b in batches[:k]], place(dict(batches[k])),
          sharding_lib.replicate(jax.random.key_data(key), mesh))
  # Ahead-of-time compilation (cached in memory: a second call with the same spec, model,
  # preprocess and shapes does not recompile) so that compile time is reported apart.
  compiled = swarm_search.lower(*args, spec=spec, graphdef=graphdef,
                                preprocess=preprocess).compile()
  compile_time = time.perf_counter() - start
  params, final, trace = compiled(*args)
  jax.block_until_ready(params)
  wall_time = time.perf_counter() - start
  report = {
      'method': method,
      'search_space': search_space,
      'num_dims': num_dims,
      'swarm_size': swarm_size,
      'generations': spec.generations,
      'sgd_steps': k,
      'gradient_steps': spec.generations * swarm_size * k,
      'forward_passes': spec.generations * swarm_size,
      'examples_per_batch': int(batches[0]['label'].shape[0]),
      'he_fitness': float(trace['fitness'][0, 0]),
      'best_fitness': float(final.best_fitness),
      'best_position': np.asarray(final.best_position).tolist(),
      'best_fitness_per_generation': np.asarray(trace['best_fitness']).tolist(),
      'compile_time_s': compile_time,
      'wall_time_s': wall_time,
  }
  return params, report
