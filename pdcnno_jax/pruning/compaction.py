"""Physical channel removal: a masked model becomes a narrower dense model, same logits.

The narrower architecture is the original one (``model.constructor_kwargs()``) with the
prunable layers' widths replaced by their kept channel counts, built by
``factory.build_model``. Its variables are the original ones sliced by the masking module's
slicing plan: conv kernel HWIO -> ``[:, :, keep_in, keep_out]``; bias, BatchNorm scale / bias /
mean / var and the mask -> ``[keep_out]``; a dense layer reading a flattened NHWC map keeps the
rows ``(h * W + w) * C + c`` of its kept channels c, i.e.
``kernel.reshape(H, W, C, out)[:, :, keep].reshape(-1, out)``. ResNet residual-stream channels
are excluded from pruning (see models/resnet.py), so only each block's inner channels (conv1
outputs, conv1's BatchNorm, conv2 inputs) are sliced; a stream mask with zeros is an error.

Parameter-shaped optimizer state (momentum, Adam moments) is sliced the same way, so training
the compacted model continues exactly where the masked one was.

A compacted model is saved as an orbax checkpoint of its variables next to
``architecture.json`` (model name, constructor arguments, classes, input shape), so it can be
rebuilt and restored without the experiment's config.

References:
  DESIGN.md, "Masks and compaction"; VainF/Torch-Pruning (physical channel removal).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pdcnno_jax.models import factory, layers, lenet, resnet, vgg
from pdcnno_jax.pruning import masking
from pdcnno_jax.train import state as state_lib

ARCHITECTURE_FILE = 'architecture.json'
STATE_DIR = 'state'
_FORMAT_VERSION = 1

# Constructor argument that holds the widths of the prunable layers, in forward order.
_WIDTH_ARGUMENT = {lenet.LeNet5: 'conv_widths', vgg.VGG: 'conv_widths',
                   resnet.ResNet: 'inner_widths'}


def kept_channels(model: nnx.Module) -> dict[str, np.ndarray]:
  """Indices of the kept channels of every prunable layer.

  Raises:
    ValueError: when a mask that compaction cannot remove (an unprunable layer's, e.g. a
      ResNet stream mask) contains zeros, or a prunable layer keeps no channel.
  """
  prunable_paths = {spec.out_mask_path for spec in masking.prunable_specs(model)}
  for path, variable in nnx.to_flat_state(nnx.state(model, layers.FeatureMask)):
    if tuple(path) not in prunable_paths and not np.all(np.asarray(variable.get_value()) != 0):
      raise ValueError(f'The mask at {"/".join(map(str, path))} is not prunable (classifier or '
                       'residual-stream channels) but has zeros; compaction only removes '
                       'channels of prunable layers.')
  keep = masking.kept_indices(masking.read_masks(model))
  for name, indices in keep.items():
    if indices.size == 0:
      raise ValueError(f'Layer {name!r} keeps no channel; it cannot be compacted.')
  return keep


def compacted_kwargs(model: nnx.Module, keep: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """``model.constructor_kwargs()`` with the prunable layers' widths set to the kept counts."""
  argument = _WIDTH_ARGUMENT.get(type(model))
  if argument is None:
    raise TypeError(f'Compaction does not know which constructor argument of '
                    f'{type(model).__name__} holds its prunable widths; add it to '
                    'compaction._WIDTH_ARGUMENT.')
  kwargs = dict(model.constructor_kwargs())
  specs = masking.prunable_specs(model)
  if tuple(kwargs[argument]) != tuple(spec.out_channels for spec in specs):
    raise ValueError(f'{type(model).__name__}.constructor_kwargs()[{argument!r}] does not list '
                     'the prunable layers\' widths in forward order.')
  kwargs[argument] = tuple(int(keep[spec.name].size) for spec in specs)
  return kwargs


def _take(tree: Any, plan: masking.SlicingPlan) -> Any:
  """Slices every variable of ``tree`` named in ``plan`` to its kept indices."""

  def take(path, leaf):
    for axis, indices in plan.get(path, ()):
      if len(indices) != np.shape(leaf)[axis]:
        leaf = jnp.take(leaf, jnp.asarray(indices), axis=axis)
    return leaf

  return masking.map_with_paths(take, tree)


def _check_like(tree: Any, template: Any, what: str) -> None:
  got = jax.tree.map(np.shape, tree)
  want = jax.tree.map(np.shape, template)
  if jax.tree.structure(tree) != jax.tree.structure(template) or got != want:
    raise AssertionError(f'Compacted {what} do not match the narrower model: {got} vs {want}.')


def _model_name(model_config: ml_collections.ConfigDict | str) -> str:
  return model_config if isinstance(model_config, str) else model_config.name


def build_narrow_abstract(model_name: str, kwargs: Mapping[str, Any], num_classes: int,
                          input_shape: tuple[int, int, int]) -> nnx.Module:
  """The architecture ``model_name(**kwargs)`` as an abstract model (shapes only)."""
  return nnx.eval_shape(lambda: factory.build_architecture(
      model_name, num_classes=num_classes, input_shape=tuple(input_shape), rngs=nnx.Rngs(0),
      **kwargs))


def compact_parts(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                  model_config: ml_collections.ConfigDict | str, num_classes: int,
                  input_shape: tuple[int, int, int]
                  ) -> tuple[nnx.GraphDef, nnx.State, nnx.State, masking.SlicingPlan]:
  """Compacts a split model; returns the narrower ``(graphdef, params, model_state, plan)``.

  Args:
    graphdef, params, model_state: the masked model, as split by ``state.split_model``.
    model_config: the ``config.model`` section (only ``name`` is used: every architecture
      argument comes from ``model.constructor_kwargs()``), or the model name.
    num_classes: classifier outputs.
    input_shape: ``(H, W, C)`` of the images.

  References:
    DESIGN.md, "Masks and compaction".
  """
  model = nnx.merge(graphdef, params, model_state)
  keep = kept_channels(model)
  plan = masking.slicing_plan(model.layer_specs(), keep)
  narrow = build_narrow_abstract(_model_name(model_config), compacted_kwargs(model, keep),
                                 num_classes, input_shape)
  new_graphdef, params_template, state_template = state_lib.split_model(narrow)
  new_params, new_model_state = _take(params, plan), _take(model_state, plan)
  _check_like(new_params, params_template, 'parameters')
  _check_like(new_model_state, state_template, 'model state')
  return new_graphdef, new_params, new_model_state, plan


def _unshared(tree: Any, original: Any) -> Any:
  """``tree`` with copies of the arrays it shares with ``original`` (safe to donate either)."""
  shared = {id(x) for x in jax.tree.leaves(original)}
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if id(x) in shared else x, tree)


def compact(graphdef: nnx.GraphDef, state: state_lib.TrainState,
            model_config: ml_collections.ConfigDict | str, num_classes: int,
            input_shape: tuple[int, int, int]) -> tuple[nnx.GraphDef, state_lib.TrainState]:
  """Turns a masked TrainState into the TrainState of the narrower dense model.

  The step count is kept and every parameter-shaped tree of the optimizer state is sliced
  like the parameters, so the same optax transformation continues on the new state (compile
  a new train step for the returned graphdef). The new state shares no buffer with
  ``state``, so a train step may donate either.

  Returns:
    ``(new_graphdef, new_state)``.
  """
  new_graphdef, params, model_state, plan = compact_parts(
      graphdef, state.params, state.model_state, model_config, num_classes, input_shape)
  opt_state = masking.map_param_trees(lambda tree: _take(tree, plan), state.opt_state,
                                      state.params)
  new_state = state.replace(params=params, model_state=model_state, opt_state=opt_state)
  return new_graphdef, _unshared(new_state, state)


def compact_model(model: nnx.Module, model_config: ml_collections.ConfigDict | str,
                  num_classes: int, input_shape: tuple[int, int, int]) -> nnx.Module:
  """Returns the narrower dense model equivalent to the masked ``model``."""
  graphdef, params, model_state = state_lib.split_model(model)
  new_graphdef, params, model_state, _ = compact_parts(
      graphdef, params, model_state, model_config, num_classes, input_shape)
  return nnx.merge(new_graphdef, params, model_state)


def _to_json(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_to_json(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value


def _from_json(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  if isinstance(value, dict):
    return {k: _from_json(v) for k, v in value.items()}
  return value


def architecture_kwargs(model: nnx.Module) -> dict[str, Any]:
  """``model.constructor_kwargs()`` in JSON form (tuples as lists)."""
  return _to_json(dict(model.constructor_kwargs()))


def _saved_state(model: nnx.Module) -> nnx.State:
  """Every variable except RNG streams (re-seeded on load)."""
  return nnx.state(model, nnx.Not(nnx.RngState))


def save_compacted(path: str | os.PathLike, model: nnx.Module,
                   metadata: Mapping[str, Any]) -> None:
  """Saves ``model`` so that :func:`load_compacted` can rebuild it without any config.

  Writes ``path/architecture.json`` and an orbax checkpoint ``path/state`` (overwritten if
  present).

  Args:
    path: directory to write.
    model: the (compacted) model.
    metadata: must hold ``model_name``, ``num_classes`` and ``input_shape``; any other
      JSON-serialisable entries (e.g. the pruning report) are stored under ``"metadata"``.

  Raises:
    ValueError: when a required metadata entry is missing.
  """
  missing = {'model_name', 'num_classes', 'input_shape'} - set(metadata)
  if missing:
    raise ValueError(f'save_compacted metadata lacks {sorted(missing)}; pass model_name '
                     '(config.model.name), num_classes and input_shape.')
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  extra = {k: v for k, v in metadata.items()
           if k not in ('model_name', 'num_classes', 'input_shape')}
  architecture = {
      'format_version': _FORMAT_VERSION,
      'model_name': str(metadata['model_name']),
      'num_classes': int(metadata['num_classes']),
      'input_shape': [int(d) for d in metadata['input_shape']],
      'constructor_kwargs': architecture_kwargs(model),
      'metadata': _to_json(extra),
  }
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, STATE_DIR), nnx.to_pure_dict(_saved_state(model)),
                    force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(path, ARCHITECTURE_FILE), 'w') as f:
    json.dump(architecture, f, indent=2, sort_keys=True)


def load_architecture(path: str | os.PathLike) -> dict[str, Any]:
  """The ``architecture.json`` written by :func:`save_compacted` (lists as tuples)."""
  file = os.path.join(os.fspath(path), ARCHITECTURE_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f'{file} not found: {path} was not written by save_compacted.')
  with open(file) as f:
    architecture = json.load(f)
  if architecture.get('format_version') != _FORMAT_VERSION:
    raise ValueError(f'{file} has format_version {architecture.get("format_version")}, '
                     f'this code reads {_FORMAT_VERSION}.')
  architecture['constructor_kwargs'] = _from_json(architecture['constructor_kwargs'])
  architecture['input_shape'] = tuple(architecture['input_shape'])
  return architecture


def build_architecture(model_name: str, constructor_kwargs: Mapping[str, Any],
                       num_classes: int, input_shape: tuple[int, int, int], *,
                       seed: int = 0) -> nnx.Module:
  """Rebuilds an architecture from its name and (JSON) constructor arguments.

  This is how to recreate a compacted model's graph when resuming from a checkpoint of its
  TrainState: pass ``report['architecture']`` of :func:`stage.run_pruning`.
  """
  kwargs = _from_json(dict(constructor_kwargs))
  return factory.build_architecture(
      model_name, num_classes=int(num_classes), input_shape=tuple(input_shape),
      rngs=nnx.Rngs(seed), **kwargs)


def load_compacted(path: str | os.PathLike, *, seed: int = 0) -> nnx.Module:
  """Rebuilds and restores a model saved by :func:`save_compacted`.

  Args:
    path: directory written by :func:`save_compacted`.
    seed: seeds the model's RNG streams (e.g. dropout), which are not saved.

  Returns:
    The model, with parameters, BatchNorm statistics and masks restored.
  """
  architecture = load_architecture(path)
  model = build_architecture(architecture['model_name'], architecture['constructor_kwargs'],
                             architecture['num_classes'], architecture['input_shape'],
                             seed=seed)
  abstract = _saved_state(model)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                        nnx.to_pure_dict(abstract))
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(os.fspath(path)), STATE_DIR), target)
  nnx.replace_by_pure_dict(abstract, restored)
  nnx.update(model, abstract)
  return model
