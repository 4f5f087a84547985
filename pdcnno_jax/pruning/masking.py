"""Feature-map masks in a model or TrainState: read, write, keep pruned weights at zero.

A pruned channel r of layer l has ``mask[r] == 0``. The mask multiplies the activation, so the
channel's output is exactly zero whatever its weights are, and no gradient reaches its kernel,
bias or BatchNorm parameters (nor the next layer's input slice, whose input is zero). To keep
the model clean we also zero those weights, and the matching entries of every parameter-shaped
tree in the optimizer state (momentum, Adam moments): with a zero gradient, a zero weight and a
zero momentum, SGD with momentum and (coupled or decoupled) weight decay leaves the weight at
exactly zero, so a masked model and its compacted form stay identical through training.

Masks are ``FeatureMask`` variables in ``TrainState.model_state``, so they are saved with
checkpoints and restored on resume.

Weight entries are addressed by a *slicing plan*: for each variable path, a list of
``(axis, kept indices)``. The same plan slices a model into its compacted form
(:mod:`pdcnno_jax.pruning.compaction`).

References:
  DESIGN.md, "Masks and compaction".
"""

from __future__ import annotations

import collections
import collections.abc
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdcnno_jax.models import layers
from pdcnno_jax.train import state as state_lib

Masks = dict[str, np.ndarray]
Path = tuple[str | int, ...]
# Variable path -> ((axis, kept indices), ...).
SlicingPlan = dict[Path, tuple[tuple[int, np.ndarray], ...]]

_NORM_VARIABLES = ('scale', 'bias', 'mean', 'var')


def get_submodule(module: Any, path: Path) -> Any:
  """The attribute / item of ``module`` (or ``nnx.State``) at ``path``."""
  for key in path:
    if isinstance(key, int) or isinstance(module, collections.abc.Mapping):
      module = module[key]
    else:
      module = getattr(module, key)
  return module


def prunable_specs(model: nnx.Module) -> tuple[layers.LayerSpec, ...]:
  """LayerSpecs of the layers whose output channels may be pruned, in forward order."""
  specs = tuple(s for s in model.layer_specs() if s.prunable)
  for spec in specs:
    if spec.out_mask_path is None:
      raise ValueError(f'Layer {spec.name!r} is marked prunable but has no FeatureMask.')
  return specs


def read_masks(model: nnx.Module) -> Masks:
  """Host copies of the masks of the prunable layers, by layer name."""
  return {spec.name: np.asarray(jax.device_get(
      get_submodule(model, spec.out_mask_path)[...]), np.float32)
          for spec in prunable_specs(model)}


def read_state_masks(graphdef: nnx.GraphDef, state: state_lib.TrainState) -> Masks:
  """:func:`read_masks` of the model held by a TrainState."""
  return read_masks(state_lib.merge_model(graphdef, state))


def kept_indices(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Indices of the kept (nonzero) channels of each mask."""
  return {name: np.flatnonzero(np.asarray(m)) for name, m in masks.items()}


def validate_masks(model: nnx.Module, masks: Mapping[str, Any]) -> Masks:
  """Checks ``masks`` against the model's prunable layers and returns float32 copies.

  Args:
    model: a model of this package.
    masks: layer name -> 0/1 vector over the layer's output channels; layers not named keep
      their current mask.

  Returns:
    The masks as float32 NumPy arrays.

  Raises:
    ValueError: for an unknown or unprunable layer, a wrong shape, values other than 0/1,
      or a mask that would remove every channel of a layer.
  """
  specs = {spec.name: spec for spec in prunable_specs(model)}
  checked = {}
  for name, mask in masks.items():
    if name not in specs:
      raise ValueError(f'Cannot mask layer {name!r}: the prunable layers of this model are '
                       f'{sorted(specs)} (classifiers and residual-stream channels are never '
                       'pruned).')
    mask = np.asarray(jax.device_get(mask), np.float32)
    width = specs[name].out_channels
    if mask.shape != (width,):
      raise ValueError(f'Mask of {name!r} has shape {mask.shape}, expected ({width},).')
    if not np.all((mask == 0) | (mask == 1)):
      raise ValueError(f'Mask of {name!r} must contain only 0 and 1.')
    if not mask.any():
      raise ValueError(f'Mask of {name!r} removes all {width} channels; keep at least one.')
    checked[name] = mask
  return checked


def slicing_plan(specs: tuple[layers.LayerSpec, ...],
                 keep: Mapping[str, np.ndarray]) -> SlicingPlan:
  """Which entries of which variables belong to the kept channels.

  For each layer whose output channels are in ``keep``: conv kernel (HWIO) axis 3 or dense
  kernel axis 1, bias, BatchNorm scale/bias/mean/var and the mask itself along axis 0; for each
  layer reading such a layer: the conv kernel's input axis 2, or the dense kernel's rows, where
  a dense layer reading a flattened ``(H, W, C)`` map keeps rows ``(h * W + w) * C + c``.

  Args:
    specs: every LayerSpec of the model (``model.layer_specs()``).
    keep: layer name -> sorted indices of kept output channels, for prunable layers.

  Returns:
    Variable path -> ``((axis, indices), ...)``.

  References:
    DESIGN.md, "Masks and compaction" (kernel HWIO -> [:, :, keep_in, keep_out];
    conv -> flatten -> dense index mapping).
  """
  plan = collections.defaultdict(list)
  for spec in specs:
    out_keep = keep.get(spec.name) if spec.prunable else None
    in_keep = keep.get(spec.in_mask) if spec.in_mask is not None else None
    out_axis = 3 if spec.kind == 'conv' else 1
    kernel = spec.param_path + ('kernel',)
    if in_keep is not None:
      if spec.kind == 'conv':
        plan[kernel].append((2, in_keep))
      elif spec.flatten_hw is not None:
        height, width = spec.flatten_hw
        channels = spec.in_channels // (height * width)
        rows = np.add.outer(np.arange(height * width) * channels, in_keep).reshape(-1)
        plan[kernel].append((0, rows))
      else:
        plan[kernel].append((0, in_keep))
    if out_keep is not None:
      plan[kernel].append((out_axis, out_keep))
      plan[spec.param_path + ('bias',)].append((0, out_keep))
      if spec.norm_path is not None:
        for variable in _NORM_VARIABLES:
          plan[spec.norm_path + (variable,)].append((0, out_keep))
      plan[spec.out_mask_path].append((0, out_keep))
  return {path: tuple(entries) for path, entries in plan.items()}


def _key_path(path: tuple[Any, ...]) -> Path:
  """A jax key path inside an ``nnx.State`` as a tuple of plain keys."""
  keys = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      keys.append(key.key)
    elif isinstance(key, jax.tree_util.SequenceKey):
      keys.append(key.idx)
    elif isinstance(key, jax.tree_util.GetAttrKey):
      keys.append(key.name)
    else:
      keys.append(str(key))
  # nnx.Variable nodes flatten to a single child named 'value'.
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == 'value':
    keys.pop()
  return tuple(keys)


def map_with_paths(fn: Callable[[Path, jax.Array], jax.Array], tree: Any) -> Any:
  """``jax.tree.map`` over an ``nnx.State`` (or any pytree) with plain-key paths."""
  return jax.tree.map_with_path(lambda path, leaf: fn(_key_path(path), leaf), tree)


def map_param_trees(fn: Callable[[Any], Any], opt_state: Any, params: Any) -> Any:
  """Applies ``fn`` to every subtree of ``opt_state`` that is shaped like ``params``.

  Optax states hold parameter-shaped trees (momentum, Adam moments, line-search directions)
  next to scalars (step counts); only the former are touched.
  """
  treedef = jax.tree.structure(params)
  shapes = [np.shape(x) for x in jax.tree.leaves(params)]

  def is_param_tree(node: Any) -> bool:
    if not isinstance(node, nnx.State):
      return False
    if jax.tree.structure(node) != treedef:
      return False
    return [np.shape(x) for x in jax.tree.leaves(node)] == shapes

  return jax.tree.map(lambda node: fn(node) if is_param_tree(node) else node, opt_state,
                      is_leaf=is_param_tree)


def zero_pruned(tree: Any, plan: SlicingPlan) -> Any:
  """Zeros the entries of a parameter-shaped tree outside the plan's kept indices."""

  def zero(path: Path, leaf: jax.Array) -> jax.Array:
    if path not in plan:
      return leaf
    factor = np.ones(np.shape(leaf), np.float32)
    for axis, indices in plan[path]:
      keep = np.zeros(np.shape(leaf)[axis], np.float32)
      keep[indices] = 1.0
      shape = [1] * np.ndim(leaf)
      shape[axis] = -1
      factor = factor * keep.reshape(shape)
    if factor.all():
      return leaf
    return leaf * jnp.asarray(factor, dtype=leaf.dtype)

  return map_with_paths(zero, tree)


def _put_like(value: np.ndarray, like: Any) -> Any:
  """``value`` laid out like ``like`` (same sharding when ``like`` is a jax.Array)."""
  if isinstance(like, jax.Array):
    return jax.make_array_from_callback(value.shape, like.sharding,
                                        lambda index: value[index])
  return jnp.asarray(value)


def apply_masks(graphdef: nnx.GraphDef, state: state_lib.TrainState,
                masks: Mapping[str, Any], *,
                zero_pruned_weights: bool = True) -> state_lib.TrainState:
  """Writes feature-map masks into ``state.model_state``.

  Args:
    graphdef: the model's graph definition.
    state: the TrainState to update (not modified in place).
    masks: layer name -> 0/1 vector over that prunable layer's output channels; layers not
      named keep their current mask.
    zero_pruned_weights: also zero the weights that belong to pruned channels (the layer's
      kernel slice, bias, BatchNorm scale/offset, and the next layer's input slice) in the
      parameters and in every parameter-shaped tree of the optimizer state, so that they stay
      exactly zero during training.

  Returns:
    The updated TrainState.

  Raises:
    ValueError: see :func:`validate_masks`.
  """
  model = state_lib.merge_model(graphdef, state)
  masks = validate_masks(model, masks)
  specs = model.layer_specs()
  by_path = {spec.out_mask_path: masks[spec.name] for spec in specs if spec.name in masks}
  model_state = map_with_paths(
      lambda path, leaf: _put_like(by_path[path], leaf) if path in by_path else leaf,
      state.model_state)
  state = state.replace(model_state=model_state)
  if zero_pruned_weights:
    all_masks = read_masks(state_lib.merge_model(graphdef, state))
    plan = slicing_plan(specs, kept_indices(all_masks))
    state = state.replace(
        params=zero_pruned(state.params, plan),
        opt_state=map_param_trees(lambda tree: zero_pruned(tree, plan), state.opt_state,
                                  state.params))
  return state


def apply_masks_to_model(model: nnx.Module, masks: Mapping[str, Any], *,
                         zero_pruned_weights: bool = True) -> None:
  """In-place :func:`apply_masks` for an ``nnx.Module`` (no optimizer state)."""
  masks = validate_masks(model, masks)
  specs = model.layer_specs()
  for spec in specs:
    if spec.name in masks:
      variable = get_submodule(model, spec.out_mask_path)
      variable.set_value(_put_like(masks[spec.name], variable.get_value()))
  if zero_pruned_weights:
    plan = slicing_plan(specs, kept_indices(read_masks(model)))
    nnx.update(model, zero_pruned(nnx.state(model, nnx.Param), plan))
