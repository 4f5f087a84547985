"""The MapReduce worker actor of the Ray engine: one Map task per call, on its own JAX.

Each actor process runs JAX on its own devices (one CPU device, or the GPUs Ray gives it; the
driver sets JAX_PLATFORMS and XLA_FLAGS through the actor's runtime environment). It is built
once per run from a `WorkerSpec` (graphdef, optimizer, preprocessing, slowdown settings) and the
training arrays, which the driver puts in Ray's object store once and every actor maps
zero-copy. A call to `MapWorker.map` receives the round's averaged state (a reference to the
one object the driver broadcast) and the example indices of its blocks, runs
`mapreduce_core.map_phase` on them and returns the trained host state with its figures.
A map call is a pure function of (state, indices): re-running it on a restarted actor, or on
another one, gives the same state, which is what makes re-executing a failed Map exact.

Fault injection for the tests: ``PDCNNO_MAPREDUCE_FAULT_KILL_MAP=<round>:<worker>`` SIGKILLs
worker ``<worker>``'s actor inside its first attempt at the Map of round ``<round>``, after it
received the round's state.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pdcnno_jax.parallel import mapreduce_core as core
from pdcnno_jax.parallel import monitor as monitor_lib
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.parallel.ssp import serialization
from pdcnno_jax.train import sharding as sharding_lib

KILL_MAP_ENV = 'PDCNNO_MAPREDUCE_FAULT_KILL_MAP'


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
  """What a worker actor needs to build its Map machinery (pickled once per actor).

  Attributes:
    index: worker index k.
    num_workers: K.
    parallel: config.parallel (slowdown, straggler settings).
    seed: config.seed (the slowdown's draws).
    graphdef: the model's static structure.
    tx: the optimizer.
    preprocess: uint8 images -> model inputs (runs inside the jitted step).
    batch: examples per local step.
  """
  index: int
  num_workers: int
  parallel: ml_collections.ConfigDict
  seed: int
  graphdef: Any
  tx: Any
  preprocess: Callable[[jax.Array], jax.Array]
  batch: int


def portable_preprocess(preprocess: Callable[[jax.Array], jax.Array]) -> Callable[..., Any]:
  """``preprocess`` without the host arrays a bound data set carries (they travel once, apart).

  The experiment binds the whole `Dataset` to its normalisation; the actors only need its
  statistics, so a bound ``dataset`` keyword is replaced by a copy without host splits.
  """
  if isinstance(preprocess, functools.partial) and 'dataset' in preprocess.keywords:
    light = dataclasses.replace(preprocess.keywords['dataset'], host_splits={}, stream=None)
    return functools.partial(preprocess.func, *preprocess.args,
                             **{**preprocess.keywords, 'dataset': light})
  return preprocess


class MapWorker:
  """One MapReduce worker (wrapped with ``ray.remote`` by the driver)."""

  def __init__(self, box: list[Any]):
    """Builds the Map machinery.

    Args:
      box: ``[spec_ref, images_ref, labels_ref]``: the `WorkerSpec` and the training arrays in
        the object store, which the driver holds for the whole run, so that an actor Ray
        restarts fetches the same objects again (Ray logs that it relies on this).
    """
    import ray  # pylint: disable=g-import-not-at-top  # Only ever imported in an actor.
    spec, images, labels = ray.get(box)
    mesh = sharding_lib.make_mesh(jax.local_devices())
    self._spec = spec
    self._replicated = sharding_lib.replicated(mesh)
    self._worker = core.Worker(
        data_sharding=sharding_lib.batch_sharded(mesh),
        step_fn=core.local_train_step(spec.graphdef, spec.tx, spec.preprocess, mesh),
        slow=slowdown_lib.Slowdown.from_config(spec.parallel, spec.index, spec.num_workers,
                                               seed=spec.seed),
        monitor=monitor_lib.WorkerMonitor(devices=list(mesh.devices.flat)),
        images=images, labels=labels, batch=spec.batch)

  def info(self) -> dict[str, Any]:
    """This actor's process id, JAX backend and device count."""
    return {'pid': os.getpid(), 'backend': jax.default_backend(),
            'devices': jax.local_device_count()}

  def map(self, state_box: list[Any], indices: np.ndarray, round_index: int,
          attempt: int) -> dict[str, Any]:
    """Map: trains the broadcast state on ``indices``.

    Args:
      state_box: ``[ref]``, the round's host state in the object store (boxed so that the
        transfer is timed here).
      indices: example indices of this worker's blocks, in order.
      round_index: the round (for fault injection and the report).
      attempt: 0 for the first execution of this Map, > 0 for a re-execution.

    Returns:
      ``state`` (host arrays), ``figures`` (`map_phase`'s), ``trained`` (the example indices
      the local steps consumed), ``received`` (bytes, seconds of fetching the state),
      ``slept_s`` (the slowdown's sleep in this Map), ``pid``.
    """
    import ray  # pylint: disable=g-import-not-at-top  # Only ever imported in an actor.
    start = time.perf_counter()
    host_state = ray.get(state_box[0])
    received_s = time.perf_counter() - start
    _maybe_kill(round_index, self._spec.index, attempt)
    state = jax.device_put(host_state, self._replicated)
    if not self._worker.warm:  # A restarted actor compiles inside the round it re-runs.
      self._warm_up(state, indices)
    slept_before = self._worker.slow.slept_s
    state, figures = core.map_phase(self._worker, state, indices)
    trained = np.asarray(indices[:figures['steps'] * self._spec.batch])
    return {'state': jax.device_get(state), 'figures': figures, 'trained': trained,
            'received': (serialization.payload_nbytes(jax.tree.leaves(host_state)), received_s),
            'slept_s': self._worker.slow.slept_s - slept_before, 'pid': os.getpid()}

  def warm_up(self, state_box: list[Any], indices: np.ndarray) -> None:
    """Compiles the step on the given state (a copy), so that no round times a compile."""
    import ray  # pylint: disable=g-import-not-at-top  # Only ever imported in an actor.
    self._warm_up(jax.device_put(ray.get(state_box[0]), self._replicated), indices)

  def _warm_up(self, state: Any, indices: np.ndarray) -> None:
    scratch = jax.tree.map(jnp.copy, state)
    jax.block_until_ready(self._worker.step_fn(scratch, next(self._worker.batches(indices))))
    self._worker.warm = True


def _maybe_kill(round_index: int, worker: int, attempt: int) -> None:
  target = os.environ.get(KILL_MAP_ENV)
  if target and attempt == 0 and target == f'{round_index}:{worker}':
    os.kill(os.getpid(), signal.SIGKILL)
