"""Jitted train and eval steps over :class:`~pdcnno_jax.train.state.TrainState`.

The loss is the mean softmax cross-entropy of the global batch. Steps are pure functions of
``(state, batch)`` compiled once with ``jax.jit`` and explicit shardings (parameters
replicated, batch sharded over the mesh's ``'data'`` axis), so the same code runs on one
CPU, eight fake devices or many hosts.

Optimizers that need the loss function itself (``optax.GradientTransformationExtraArgs``
with a line search, e.g. CGMSE or L-BFGS) receive ``value``, ``grad`` and ``value_fn`` of the
*current* batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Preprocess = Callable[[jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy over the examples with nonzero ``weights``."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if weights is None:
    return losses.mean()
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def apply_model(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State,
                images: jax.Array, *, train: bool) -> tuple[jax.Array, nnx.State]:
  """Runs the model; returns logits and the updated non-param state (BatchNorm stats)."""
  # copy=True: the model owns fresh variables, so training-mode BatchNorm may update its
  # statistics even when params / model_state are tracers from an enclosing jax.grad.
  model = nnx.merge(graphdef, params, model_state, copy=True)
  logits = model(images, train=train)
  _, _, new_model_state = nnx.split(model, nnx.Param, ...)
  return logits, new_model_state


def batch_loss(params: nnx.State, model_state: nnx.State, batch: Batch, *,
               graphdef: nnx.GraphDef, preprocess: Preprocess,
               train: bool = True) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
  """Mean cross-entropy of ``batch``; aux is ``(logits, new_model_state)``."""
  images = preprocess(batch['image'])
  logits, new_model_state = apply_model(graphdef, params, model_state, images, train=train)
  return cross_entropy(logits, batch['label']), (logits, new_model_state)


def chunked_loss(params: nnx.State, model_state: nnx.State, batch: Batch, *,
                 graphdef: nnx.GraphDef, preprocess: Preprocess, num_chunks: int,
                 train: bool = True) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
  """Mean cross-entropy of a large batch, evaluated ``num_chunks`` examples-chunks at a time.

  CGMSE's full-batch mode differentiates the loss of a whole training split. Evaluated in one
  piece, the backward pass keeps every activation of every example alive (about 13 GB for
  LeNet-5 Caffe on the 60k Fashion-MNIST images). Here a ``lax.scan`` walks over equal chunks
  and each chunk's forward pass is rematerialised (``jax.checkpoint``) in the backward pass,
  so peak memory holds one chunk's activations plus the running sums: the value and the
  gradient are the same as the one-piece loss (sums of per-chunk sums), at the price of one
  extra forward pass.

  Chunk ``k`` takes rows ``k, k + num_chunks, k + 2 num_chunks, ...``, so a batch sharded over
  the mesh's data axis stays sharded inside every chunk (no data moves between devices).
  BatchNorm in training mode normalises with each chunk's statistics (ghost batch norm) and
  updates its running averages once per chunk.

  Args:
    params: model parameters.
    model_state: non-parameter model state (masks, BatchNorm statistics).
    batch: {'image', 'label'} whose leading size is a multiple of ``num_chunks`` (and, when
      sharded, of ``num_chunks`` times the number of devices).
    graphdef: the model's graph definition.
    preprocess: image normalisation.
    num_chunks: number of chunks (1: one piece, same as :func:`batch_loss`).
    train: model mode.

  Returns:
    ``(loss, (accuracy, new_model_state))``.

  Raises:
    ValueError: the batch size is not a multiple of ``num_chunks``.
  """
  size = batch['label'].shape[0]
  if num_chunks < 1 or size % num_chunks:
    raise ValueError(f'A batch of {size} examples cannot be split into {num_chunks} equal '
                     'chunks; use a batch size that is a multiple of the chunk count.')
  if num_chunks == 1:
    loss, (logits, new_model_state) = batch_loss(
        params, model_state, batch, graphdef=graphdef, preprocess=preprocess, train=train)
    return loss, ((logits.argmax(-1) == batch['label']).mean(), new_model_state)
  rows = size // num_chunks
  chunks = jax.tree.map(
      lambda x: x.reshape((rows, num_chunks) + x.shape[1:]).swapaxes(0, 1), batch)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_sums(params, model_state, chunk):
    images = preprocess(chunk['image'])
    logits, new_model_state = apply_model(graphdef, params, model_state, images, train=train)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, chunk['label'])
    correct = (logits.argmax(-1) == chunk['label']).sum()
    return losses.sum(), correct, new_model_state

  def body(carry, chunk):
    loss_sum, correct_sum, current_state = carry
    loss, correct, new_state = chunk_sums(params, current_state, chunk)
    return (loss_sum + loss, correct_sum + correct, new_state), None

  zero = jnp.zeros((), jnp.float32)
  (loss_sum, correct_sum, new_model_state), _ = jax.lax.scan(
      body, (zero, jnp.zeros((), jnp.int32), model_state), chunks)
  return loss_sum / size, (correct_sum / size, new_model_state)


def needs_value_fn(tx: optax.GradientTransformation) -> bool:
  """Whether ``tx.update`` takes ``value`` / ``grad`` / ``value_fn`` (line searches)."""
  return isinstance(tx, optax.GradientTransformationExtraArgs)


def optimizer_update(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
                     tx: optax.GradientTransformation, preprocess: Preprocess,
                     pass_value_fn: bool,
                     num_chunks: int = 1) -> tuple[Any, Any, nnx.State, dict[str, jax.Array]]:
  """Loss, gradients and the optimizer's update on ``batch``, not yet applied.

  ``num_chunks > 1`` evaluates the loss (also inside line searches) chunk by chunk with
  :func:`chunked_loss`: the same values and gradients, for a fraction of the memory.

  Returns:
    ``(updates, opt_state, new_model_state, metrics)``; the train steps of every mode
    (sync here, SSP in ``parallel/ssp/steps.py``) apply ``updates`` their own way.
  """
  loss_fn = functools.partial(chunked_loss, model_state=state.model_state, batch=batch,
                              graphdef=graphdef, preprocess=preprocess, num_chunks=num_chunks,
                              train=True)
  (loss, (accuracy, new_model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  if pass_value_fn:
    updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss,
                                   grad=grads, value_fn=lambda p: loss_fn(p)[0])
  else:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
  metrics = {'loss': loss, 'accuracy': accuracy,
             'grad_norm': optax.tree.norm(grads)}
  return updates, opt_state, new_model_state, metrics


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, preprocess: Preprocess,
               pass_value_fn: bool,
               num_chunks: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on ``batch`` (not jitted; see :func:`make_train_step`)."""
  updates, opt_state, new_model_state, metrics = optimizer_update(
      state, batch, graphdef=graphdef, tx=tx, preprocess=preprocess,
      pass_value_fn=pass_value_fn, num_chunks=num_chunks)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            model_state=new_model_state, opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef,
              preprocess: Preprocess) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the real (``batch['mask']``) examples."""
  images = preprocess(batch['image'])
  logits, _ = apply_model(graphdef, state.params, state.model_state, images, train=False)
  weights = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  correct = (logits.argmax(-1) == batch['label']).astype(jnp.float32)
  return {'loss_sum': (losses * weights).sum(), 'correct': (correct * weights).sum(),
          'count': weights.sum()}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    preprocess: Preprocess, mesh: Mesh, donate: bool = True,
                    num_chunks: int = 1) -> Callable[[TrainState, Batch], Any]:
  """``jax.jit``-compiled :func:`train_step` with replicated state and sharded batches.

  ``num_chunks > 1``: the loss is evaluated in chunks (:func:`chunked_loss`), for full-batch
  optimisation of a whole split.
  """
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, preprocess=preprocess,
                           pass_value_fn=needs_value_fn(tx), num_chunks=num_chunks)
  rep, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef, preprocess: Preprocess,
                   mesh: Mesh) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """``jax.jit``-compiled :func:`eval_step`."""
  step = functools.partial(eval_step, graphdef=graphdef, preprocess=preprocess)
  rep, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=rep)
