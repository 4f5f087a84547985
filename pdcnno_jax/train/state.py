"""Training state: the pure-pytree view of an NNX model plus optimizer state.

An NNX model is split once into a static ``graphdef`` and three state partitions:
``params`` (``nnx.Param``, the only thing optimizers see), and ``model_state`` (feature
masks, BatchNorm statistics, RNG streams). Jitted steps are pure functions of
:class:`TrainState`, which checkpoints as an ordinary pytree.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: number of optimizer updates applied so far (int32 scalar).
    params: ``nnx.State`` of the model's ``nnx.Param`` variables.
    model_state: ``nnx.State`` of every other variable (masks, batch stats, RNG).
    opt_state: optax state over ``params``.
  """
  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: optax.OptState


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """Splits ``model`` into ``(graphdef, params, model_state)``."""
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, params, model_state


def create_train_state(model: nnx.Module,
                       tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` and initialises ``tx`` on its parameters.

  Returns:
    ``(graphdef, state)``; ``nnx.merge(graphdef, state.params, state.model_state)``
    rebuilds the model.
  """
  graphdef, params, model_state = split_model(model)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state=tx.init(params))
  return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """Rebuilds the NNX model held by ``state``."""
  return nnx.merge(graphdef, state.params, state.model_state)


def num_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
