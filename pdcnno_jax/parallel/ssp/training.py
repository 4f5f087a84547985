"""SSP training: ``config.parallel.mode = 'ssp'``, one model replica per worker process.

Every process is one worker with its own replica of the `TrainState` on its own devices (a
local mesh over ``jax.local_devices()``; no cross-process collective runs during training).
Worker k at clock c (the number of steps it has done):

  1. pulls the other workers' updates through the SSP protocol (`protocol.SSPWorker.pull`):
     it blocks until every live worker's updates through clock c - s - 1 are there, and takes
     any newer ones already published. Under BSP (s = 0) updates stamped c or later, which a
     faster worker may already have published, are held back until step c + 1, so that step c
     sees exactly the updates through clock c - 1, as a synchronous step would;
  2. computes one step of the configured optax optimizer on its share of global batch c and
     applies it to its own replica (read-my-writes);
  3. publishes the change of its parameters, ``delta_k = (b_k / B) * u_k``, stamped (k, c),
     where u_k is the optimizer's update, b_k the worker's batch and B = config.data.batch_size.
     The optimizer state (momentum, Adam moments) stays local to the worker.

Why the factor b_k / B: the parameters of every worker are the initial ones plus the sum of all
published deltas. For an optimizer that is linear in the gradients (SGD, heavy-ball and
Nesterov momentum, with any step-count schedule) the deltas of one clock then sum to exactly one
synchronous step on the global batch B, so that s = 0 reproduces synchronous data-parallel
training step for step (up to float summation order; tests/test_ssp_training.py checks it), and
``config.optimizer.learning_rate`` means the same in every parallel mode.

Data. Each epoch has ``steps_per_epoch`` = N // B clocks; epoch e's order is
``input_pipeline.epoch_permutation(N, seed, e)`` (the order of synchronous training). At clock c
the workers cut global batch c (rows ``[i * B, (i + 1) * B)`` of the order, i = c mod
steps_per_epoch) into consecutive, disjoint pieces of sizes ``b_0, ..., b_{K-1}`` (worker 0
first); each worker reads only its own piece, at its own pace. Equal batches are B // K each
(``parallel.ssp_batch_balancer = 'equal'``). With ``'proportional'`` every worker measures its
speed (equal batch / median busy seconds of a step, simulated slowdown included) over the first
``parallel.ssp_warmup_steps`` clocks, publishes it, and from that clock on every worker sizes its
piece with the proportional balancer (`balancers.proportional`, blocks_k ~ speed_k) in units of
its local device count; all workers compute the same sizes from the same published speeds, so
the pieces stay disjoint and cover the batch. A slow worker then takes a small piece, and the
clocks of all workers advance at about the same rate.

Heterogeneous workers use `slowdown.Slowdown` (the one mechanism shared with MapReduce):
``parallel.slowdown`` (persistent factors per worker) and ``parallel.straggler_probability`` /
``straggler_factor`` (a transient per-step slowdown: the paper's "unrelated load").

End of training. After its last step every worker drains the remaining updates of every worker
(`SSPWorker.drain`); each then holds the initial parameters plus the sum of all updates, equal
on all workers up to float summation order (the report gives the largest difference,
``final_params_max_abs_diff``). Worker 0 then publishes its whole `TrainState` through the store
and every worker adopts it, so all processes return bitwise identical states, replicated on the
global mesh for the trainer's final evaluation.

Checkpoints (``worker_checkpoints``, on in the trainer): each worker writes its own replica and its SSP protocol state
every ``checkpoint_every_steps`` clocks to ``<workdir>/ssp_worker_<k>/clock_<c>.ssp`` (the
project's pickle-free payload format, written atomically; the trainer's orbax checkpointer is
process-coordinated with barriers, which a lone restarting worker cannot pass), then
acknowledges (`SSPWorker.commit`) what the checkpoint holds. A killed worker that is started
again with the same process id loads its newest checkpoint, rejoins the running job at its last
published clock (re-applying its own updates published after the checkpoint, which the store
keeps for it; its optimizer state resumes as checkpointed) and continues; a worker killed before
its first checkpoint rejoins from the initial state. Meanwhile the survivors drop it from the
staleness bound after ``parallel.heartbeat_timeout_s`` and keep going. The store holds the
updates not yet acknowledged by every worker, up to about K * checkpoint_every_steps payloads:
keep the interval modest. In ``train_and_evaluate`` SSP mode meets no collective at all: the
experiment's mesh is the process's own devices, there is no orbax checkpointer, and the stages
and the final evaluation run on every process alike, so a restarted ``python -m
pdcnno_jax.main`` process rejoins a running job (tests/test_ssp_main.py). When the whole job
starts again (e.g.
after process 0, which hosts the store, died), the store is empty and the workers' checkpoints
are at different clocks with no consistent cut, so SSP training starts again from the trainer's
state (the per-worker checkpoints are discarded with a warning).

Report (``report.json`` under ``'ssp'``): per worker its clock, steps, examples, busy (compute
plus simulated slowdown) and wait seconds, throughput, publish/pull times, payload bytes and
the dead workers it dropped; the histogram of applied-update staleness (for each other-worker
update applied before step c: c - 1 - its clock; BSP gives only 0, negative means the update was
newer than the step before) and of view staleness (per pull, the largest lag of a live worker;
the SSP bound keeps it <= s); the per-step coordination overhead (publish + pull outside
blocking waits) as a fraction of the step time; and worker 0's test accuracy against wall time,
from snapshots of its replica taken every ``parallel.ssp_eval_every_steps`` clocks, plus the
final (drained) state, evaluated after training on its local devices (so evaluation does not
perturb the timing).

References:
  Ho et al., "More effective distributed ML via a stale synchronous parallel parameter server",
    NIPS 2013 (SSP, section 2; updates are summed into the shared parameters).
  delay_sync_parallel.txt (papers/): delay synchronization = SSP with staleness threshold s,
    heterogeneous workers, unrelated load.
  DESIGN.md, "SSP".
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import json
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from pdcnno_jax.data import input_pipeline
from pdcnno_jax.parallel import balancers
from pdcnno_jax.parallel import slowdown as slowdown_lib
from pdcnno_jax.parallel.ssp import protocol
from pdcnno_jax.parallel.ssp import serialization
from pdcnno_jax.parallel.ssp import store as store_lib
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import metrics as metrics_lib
from pdcnno_jax.train import sharding as sharding_lib
from pdcnno_jax.train import state as state_lib
from pdcnno_jax.train import steps as steps_lib

REPORT_KEY = 'ssp'
RUN_ID = 'train'
BATCH_BALANCERS = ('equal', 'proportional')
_TRAIN_ROOT = 'pdcnno_ssp_train'
_CHECKPOINT_PATTERN = re.compile(r'clock_(\d+)\.ssp$')
_KEEP_CHECKPOINTS = 2
_FAULT_ENV = 'PDCNNO_SSP_FAULT_KILL_AT_CLOCK'


# ---------------------------------------------------------------------------------------
# Data: each worker's piece of every global batch (pure numpy).
# ---------------------------------------------------------------------------------------


def equal_batch_sizes(global_batch_size: int, num_workers: int, granularity: int = 1) -> np.ndarray:
  """[K] equal per-worker batches: B // K each.

  Args:
    global_batch_size: B = config.data.batch_size.
    num_workers: K worker processes.
    granularity: every worker's batch must be a multiple of this (its local device count).

  Raises:
    ValueError: when B does not split evenly; the message says what to change.
  """
  if global_batch_size % num_workers:
    raise ValueError(
        f'config.data.batch_size={global_batch_size} must be divisible by the {num_workers} '
        'SSP workers (each reads batch_size // workers examples per step).')
  local = global_batch_size // num_workers
  if local % granularity:
    raise ValueError(
        f'The per-worker batch {local} (config.data.batch_size // {num_workers} workers) must '
        f'be divisible by the {granularity} devices of each worker.')
  return np.full(num_workers, local, np.int64)


def proportional_batch_sizes(global_batch_size: int, speed: np.ndarray,
                             granularity: int = 1) -> np.ndarray:
  """[K] per-worker batches ~ measured speed, summing to B, each >= one unit.

  The batch is cut into B // granularity units handed out by `balancers.proportional`.

  Args:
    global_batch_size: B.
    speed: [K] examples per busy second of each worker (> 0).
    granularity: unit of a worker's batch (its local device count).

  Raises:
    ValueError: when B is not a multiple of the granularity or too small for K workers.

  References:
    DESIGN.md "DLBPCE" (the proportional rule blocks_k ~ speed_k), reused for SSP batches.
  """
  if global_batch_size % granularity:
    raise ValueError(f'config.data.batch_size={global_batch_size} must be a multiple of the '
                     f'{granularity} devices of each worker.')
  units = balancers.proportional(global_batch_size // granularity,
                                 balancers.WorkerStats(speed=np.asarray(speed, np.float64)))
  return units.astype(np.int64) * granularity


def worker_rows(order: np.ndarray, batch_in_epoch: int, sizes: np.ndarray,
                worker: int) -> np.ndarray:
  """Rows of `order` that `worker` trains at a clock: its piece of the global batch.

  Args:
    order: the epoch's permutation of the training examples.
    batch_in_epoch: index i of the global batch in the epoch (clock mod steps per epoch).
    sizes: [K] per-worker batches; the global batch is their sum.
    worker: worker index.
  """
  sizes = np.asarray(sizes, np.int64)
  start = batch_in_epoch * int(sizes.sum()) + int(sizes[:worker].sum())
  return order[start:start + int(sizes[worker])]


# ---------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------


def ssp_train_step(state: state_lib.TrainState, batch: steps_lib.Batch, weight: jax.Array, *,
                   graphdef, tx: optax.GradientTransformation, preprocess: steps_lib.Preprocess,
                   pass_value_fn: bool) -> tuple[state_lib.TrainState, Any, dict[str, jax.Array]]:
  """One local optimizer step whose parameter change is scaled by ``weight`` = b_k / B.

  Returns:
    ``(new_state, delta, metrics)``: ``delta`` is what was added to the parameters, the
    update this worker publishes.
  """
  updates, opt_state, new_model_state, metrics = steps_lib.optimizer_update(
      state, batch, graphdef=graphdef, tx=tx, preprocess=preprocess,
      pass_value_fn=pass_value_fn)
  delta = jax.tree.map(lambda u: (weight * u).astype(u.dtype), updates)
  params = optax.apply_updates(state.params, delta)
  new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state,
                            opt_state=opt_state)
  return new_state, delta, metrics


def make_ssp_train_step(graphdef, tx: optax.GradientTransformation,
                        preprocess: steps_lib.Preprocess, mesh: jax.sharding.Mesh) -> Callable:
  """`ssp_train_step` jitted on ``mesh`` (state replicated, batch sharded, state donated)."""
  step = functools.partial(ssp_train_step, graphdef=graphdef, tx=tx, preprocess=preprocess,
                           pass_value_fn=steps_lib.needs_value_fn(tx))
  rep, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=(rep, rep, rep),
                 donate_argnums=(0,))


@functools.partial(jax.jit, donate_argnums=(0,))
def _add_to_params(state: state_lib.TrainState, delta: Any) -> state_lib.TrainState:
  return state.replace(params=optax.apply_updates(state.params, delta))


# ---------------------------------------------------------------------------------------
# Per-worker checkpoints (host-local files; no cross-process barrier).
# ---------------------------------------------------------------------------------------


def _to_host(tree: Any) -> Any:
  """Host numpy copy; PRNG key leaves become their raw key data."""

  def get(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return np.asarray(jax.random.key_data(x))
    return np.asarray(x)

  return jax.tree.map(get, jax.device_get(tree))


def _from_host(host: Any, like: Any) -> Any:
  """Inverse of `_to_host`, using ``like`` for key leaves' implementation."""

  def put(x, ref):
    if isinstance(ref, jax.Array) and jax.dtypes.issubdtype(ref.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
    return np.asarray(x)

  return jax.tree.map(put, host, like)


def worker_checkpoint_dir(workdir: str, worker: int) -> str:
  """``<workdir>/ssp_worker_<worker>``."""
  return os.path.join(workdir, f'ssp_worker_{worker}')


def save_worker_checkpoint(directory: str, clock: int, state: Any,
                           ssp_state: dict[str, np.ndarray], keep: int = _KEEP_CHECKPOINTS) -> str:
  """Writes one worker's replica and SSP state atomically; keeps the newest ``keep``.

  Args:
    directory: the worker's checkpoint directory.
    clock: the worker's next clock (steps done).
    state: the worker's `TrainState` (device or host arrays).
    ssp_state: `SSPWorker.state()`.
    keep: checkpoints kept.

  Returns:
    The file written.
  """
  os.makedirs(directory, exist_ok=True)
  payload = serialization.encode({'state': _to_host(state),
                                  'ssp': {k: np.asarray(v) for k, v in ssp_state.items()}})
  path = os.path.join(directory, f'clock_{clock:010d}.ssp')
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  for old in list_worker_checkpoints(directory)[:-keep]:
    os.remove(old)
  return path


def list_worker_checkpoints(directory: str) -> list[str]:
  """Complete checkpoint files in ``directory``, oldest first."""
  paths = [p for p in glob.glob(os.path.join(directory, 'clock_*.ssp'))
           if _CHECKPOINT_PATTERN.search(p)]
  return sorted(paths, key=lambda p: int(_CHECKPOINT_PATTERN.search(p).group(1)))


def load_worker_checkpoint(directory: str, like: Any) -> tuple[Any, dict[str, np.ndarray]] | None:
  """Newest checkpoint of ``directory`` as ``(host state like ``like``, SSP state)``, or None.

  Raises:
    serialization.PayloadError: when the checkpoint does not match ``like`` (a different model).
  """
  paths = list_worker_checkpoints(directory)
  if not paths:
    return None
  with open(paths[-1], 'rb') as f:
    payload = f.read()
  flat = serialization.decode_flat(payload)
  ssp_state = {'next_clock': flat.pop("['ssp']['next_clock']"),
               'applied': flat.pop("['ssp']['applied']")}
  host_like = _to_host(like)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(host_like)
  paths_expected = ["['state']" + jax.tree_util.keystr(p) for p, _ in leaves]
  if set(paths_expected) != set(flat):
    raise serialization.PayloadError(
        f'SSP checkpoint {paths[-1]} does not match the current model/optimizer; delete '
        f'{directory} (or use a new workdir) to start this worker afresh.')
  host = jax.tree_util.tree_unflatten(treedef, [np.array(flat[p]) for p in paths_expected])
  return _from_host(host, like), ssp_state


# ---------------------------------------------------------------------------------------
# Report figures (pure).
# ---------------------------------------------------------------------------------------


def merge_histograms(histograms: list[dict[Any, int]]) -> dict[int, int]:
  """Sums {value: count} histograms (keys may be strings after JSON)."""
  total = collections.Counter()
  for histogram in histograms:
    for key, count in histogram.items():
      total[int(key)] += int(count)
  return {k: total[k] for k in sorted(total)}


def job_report(worker_reports: list[dict[str, Any]], *, staleness: int | None,
               global_batch_size: int) -> dict[str, Any]:
  """Combines the per-worker reports into the job's figures.

  Args:
    worker_reports: one dict per worker (see `_Worker.report`), index = worker.
    staleness: s (None = infinite).
    global_batch_size: B.

  Returns:
    JSON-able dict: per-worker rows, wall_s (the slowest worker's loop time), throughput
    (examples per second over the job), the merged staleness histograms, and the coordination
    overhead: per step, (publish + pull - blocked wait) seconds, and that as a fraction of the
    step time (busy + coordination).
  """
  wall = max(r['loop_s'] for r in worker_reports)
  examples = sum(r['examples'] for r in worker_reports)
  steps = sum(r['steps'] for r in worker_reports)
  coordination = sum(r['publish_s'] + r['pull_s'] - r['wait_s'] for r in worker_reports)
  busy = sum(r['busy_s'] for r in worker_reports)
  per_step = coordination / max(steps, 1)
  step_s = (busy + coordination) / max(steps, 1)
  return {
      'workers': len(worker_reports),
      'staleness': 'inf' if staleness is None else staleness,
      'global_batch_size': global_batch_size,
      'wall_s': wall,
      'examples': examples,
      'throughput_examples_per_s': examples / wall if wall > 0 else float('nan'),
      'applied_staleness_histogram': merge_histograms(
          [r['applied_staleness'] for r in worker_reports]),
      'view_staleness_histogram': merge_histograms(
          [r['view_staleness'] for r in worker_reports]),
      'max_view_staleness': max((int(k) for r in worker_reports for k in r['view_staleness']),
                                default=0),
      'wait_s': [r['wait_s'] for r in worker_reports],
      'coordination_s_per_step': per_step,
      'step_s': step_s,
      'coordination_fraction': per_step / step_s if step_s > 0 else float('nan'),
      'per_worker': worker_reports,
  }


def time_to_accuracy(curve: list[dict[str, float]], threshold: float) -> float | None:
  """First wall time at which ``curve``'s accuracy reaches ``threshold`` (None: never)."""
  for point in curve:
    if point['accuracy'] >= threshold:
      return point['wall_s']
  return None


# ---------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------


def _key(run_id: str, *parts: Any) -> str:
  return '/'.join([_TRAIN_ROOT, run_id, *map(str, parts)])


def _default_store(num_workers: int) -> store_lib.Store:
  """JAX's coordination-service store in a multi-process job; in memory for one process."""
  if num_workers == 1:
    return store_lib.InMemoryStore()
  from pdcnno_jax.parallel.ssp import coordination  # pylint: disable=g-import-not-at-top
  return coordination.CoordinationStore()


def _local_devices(mesh: jax.sharding.Mesh) -> list[jax.Device]:
  devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if not devices:
    raise ValueError('The mesh holds no device of this process.')
  return devices


def _to_local(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """This process's copy of a (globally) replicated pytree, replicated on its local mesh."""

  def put(x):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return jnp.copy(x)
      x = x.addressable_data(0)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def _to_global(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Identical per-process local copies as one array replicated on ``mesh`` (no transfer)."""
  sharding = sharding_lib.replicated(mesh)

  def put(x):
    shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
    return jax.make_array_from_single_device_arrays(x.shape, sharding, [s.data for s in shards])

  return jax.tree.map(put, tree)


def _max_abs_diff(a: Any, b: Any) -> float:
  return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.size(x)),
             default=0.0)


def _maybe_inject_kill(clock: int) -> None:
  """Fault injection for tests: SIGKILL this process after publishing ``clock``.

  Set ``PDCNNO_SSP_FAULT_KILL_AT_CLOCK=<clock>`` in one worker's environment.
  """
  target = os.environ.get(_FAULT_ENV)
  if target and int(target) == clock:
    os.kill(os.getpid(), 9)


@dataclasses.dataclass
class _Counters:
  """What one worker measures in its loop."""
  busy_s: float = 0.0
  examples: int = 0
  steps: int = 0
  applied_staleness: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  warmup_step_s: list[float] = dataclasses.field(default_factory=list)


class _Worker:
  """One process's SSP training machinery (data, compiled steps, slowdown, counters)."""

  def __init__(self, exp, tx, local_mesh: jax.sharding.Mesh, me: int, num_workers: int):
    config = exp.config
    self.exp = exp
    self.me = me
    self.num_workers = num_workers
    self.granularity = local_mesh.devices.size
    self.split = exp.dataset.host_splits['train']
    self.global_batch = int(config.data.batch_size)
    self.steps_per_epoch = input_pipeline.steps_per_epoch(exp.dataset, 'train',
                                                          self.global_batch)
    self.seed = int(config.seed)
    self.data_sharding = sharding_lib.batch_sharded(local_mesh)
    self.replicated = sharding_lib.replicated(local_mesh)
    self.step_fn = make_ssp_train_step(exp.graphdef, tx, exp.preprocess, local_mesh)
    self.compiled: dict[int, Any] = {}
    self.slow = slowdown_lib.Slowdown.from_config(config.parallel, me, num_workers,
                                                  seed=config.seed)
    self.equal_sizes = equal_batch_sizes(self.global_batch, num_workers, self.granularity)
    self.balanced_sizes: np.ndarray | None = None
    self.counters = _Counters()
    self._order_epoch = -1
    self._order = None

  def sizes(self, clock: int, warmup_steps: int) -> np.ndarray:
    if self.balanced_sizes is not None and clock >= warmup_steps:
      return self.balanced_sizes
    return self.equal_sizes

  def batch(self, clock: int, sizes: np.ndarray) -> dict[str, jax.Array]:
    epoch, index = divmod(clock, self.steps_per_epoch)
    if epoch != self._order_epoch:
      self._order = input_pipeline.epoch_permutation(len(self.split.labels), self.seed, epoch)
      self._order_epoch = epoch
    rows = worker_rows(self._order, index, sizes, self.me)
    return jax.device_put({'image': self.split.images[rows], 'label': self.split.labels[rows]},
                          self.data_sharding)

  def compile_for(self, state, batch, weight) -> Any:
    """The step compiled for this batch shape (compiled once, on first use of the shape)."""
    size = int(batch['label'].shape[0])
    if size not in self.compiled:
      with self.exp.timer.phase('compile'):
        self.compiled[size] = self.step_fn.lower(state, batch, weight).compile()
    return self.compiled[size]


def _rendezvous(store: store_lib.Store, run_id: str, me: int, num_workers: int,
                timeout_s: float) -> None:
  """Every worker waits until all have compiled, so the clocks start together.

  A worker that restarts into a running job finds the start key and goes straight on.
  """
  store.set(_key(run_id, 'ready', me), b'1', overwrite=True)
  if me == 0:
    deadline = time.monotonic() + timeout_s
    while len(store.dir_get(_key(run_id, 'ready'))) < num_workers:
      if time.monotonic() > deadline:
        raise protocol.SSPTimeoutError(
            f'SSP start: only {len(store.dir_get(_key(run_id, "ready")))} of {num_workers} '
            f'workers were ready after {timeout_s:.3g} s (config.parallel.ssp_timeout_s).')
      time.sleep(0.02)
    store.set(_key(run_id, 'start'), b'1', overwrite=True)
  else:
    store.get(_key(run_id, 'start'), timeout_s)


def _balance_batches(worker: _Worker, store: store_lib.Store, run_id: str,
                     timeout_s: float) -> np.ndarray:
  """Publishes this worker's warm-up speed; returns the proportional sizes from all speeds."""
  key = _key(run_id, 'speed', worker.me)
  if store.try_get(key) is None:  # A restarted worker keeps the speed it published.
    # Median step time: robust to the odd step that a busy host descheduled.
    step_s = np.median(worker.counters.warmup_step_s or [1.0])
    speed = worker.equal_sizes[worker.me] / max(float(step_s), 1e-9)
    store.set(key, json.dumps(speed).encode())
  speeds = [float(json.loads(store.get(_key(run_id, 'speed', k), timeout_s)))
            for k in range(worker.num_workers)]
  return proportional_batch_sizes(worker.global_batch, np.asarray(speeds), worker.granularity)


def _validate(config, dataset) -> tuple[str, int, int]:
  parallel = config.parallel
  if not dataset.in_memory:
    raise ValueError(
        f'parallel.mode=ssp needs an in-memory data set (each worker reads its own rows); '
        f'{dataset.name} is streamed. Set config.data.in_memory=True or use parallel.mode='
        "'sync'.")
  balancer = parallel.get('ssp_batch_balancer', 'equal')
  if balancer not in BATCH_BALANCERS:
    raise ValueError(f'config.parallel.ssp_batch_balancer={balancer!r}; use one of '
                     f'{BATCH_BALANCERS}.')
  warmup = int(parallel.get('ssp_warmup_steps', 20))
  if warmup < 2:
    raise ValueError(f'config.parallel.ssp_warmup_steps={warmup} must be >= 2 (speeds are '
                     'measured on clocks 1 .. warmup - 1; clock 0 may include first-touch costs).')
  eval_every = int(parallel.get('ssp_eval_every_steps', 0))
  if eval_every < 0:
    raise ValueError(f'config.parallel.ssp_eval_every_steps={eval_every} must be >= 0 '
                     '(0: at the end of every eval_every_epochs epochs).')
  return balancer, warmup, eval_every


def train(exp, state: state_lib.TrainState, *, tx,
          worker_checkpoints: bool = False,
          store: store_lib.Store | None = None,
          run_id: str = RUN_ID) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """SSP training for ``config.num_epochs`` epochs (see the module docstring).

  Every process of the job calls this; the processes never meet in a collective, only
  through the store.

  Args:
    exp: the `trainer.Experiment` (config, workdir, dataset, global mesh, preprocess,
      graphdef, timer, writer).
    state: the starting `TrainState`, replicated on ``exp.mesh`` (the same on every process).
    tx: the optimizer whose state is ``state.opt_state``.
    worker_checkpoints: each worker checkpoints its own replica every
      ``checkpoint_every_steps`` clocks under ``<workdir>/ssp_worker_<k>/`` and rejoins from
      there after a restart (the trainer turns this on; orbax's checkpointer is not used: it
      synchronises all processes, which a lone restarting worker cannot do).
    store: the key-value store; default: JAX's coordination service (multi-process job,
      initialised with `coordination.initialize`) or an in-memory store (one process).
    run_id: namespace of this run's keys in the store; consecutive runs in one job (e.g. a
      benchmark) need distinct ids.

  Returns:
    ``(state, report)``: worker 0's final state (every worker holds the same), replicated on
    ``exp.mesh``, and the JSON-able report.

  Raises:
    ValueError: a streamed data set or bad ``config.parallel`` SSP settings.
    protocol.SSPTimeoutError: a live worker's required update, the start or the end of the
      job did not arrive within ``parallel.ssp_timeout_s``.
    trainer.NonFiniteLossError: the training loss became NaN/inf.
  """
  from pdcnno_jax.train import trainer  # pylint: disable=g-import-not-at-top  # Import cycle.

  config = exp.config
  parallel = config.parallel
  balancer, warmup_steps, eval_every = _validate(config, exp.dataset)
  num_workers, me = jax.process_count(), jax.process_index()
  timeout_s = float(parallel.ssp_timeout_s)
  store = _default_store(num_workers) if store is None else store
  local_mesh = sharding_lib.make_mesh(_local_devices(exp.mesh))
  worker = _Worker(exp, tx, local_mesh, me, num_workers)
  total_steps = int(round(config.num_epochs * worker.steps_per_epoch))
  if eval_every == 0:
    eval_every = max(1, int(config.eval_every_epochs) * worker.steps_per_epoch)

  local = _to_local(state, worker.replicated)
  like = jax.device_get(local.params)
  ssp = protocol.SSPWorker(store, me, num_workers, parallel.staleness, timeout_s, run_id=run_id,
                           like=like, heartbeat_timeout_s=float(parallel.heartbeat_timeout_s),
                           commit_on_pull=not worker_checkpoints)
  staleness = ssp.staleness
  ckpt_dir = worker_checkpoint_dir(exp.workdir, me)
  restored = load_worker_checkpoint(ckpt_dir, local) if worker_checkpoints else None
  if restored is not None and ssp.published_clock() < 0:
    logging.warning('SSP worker %d: the store holds no clock of this worker, so this is a new '
                    'job, not a rejoin; its checkpoints in %s have no consistent cut with the '
                    "other workers'. Starting SSP training from the trainer's state.", me,
                    ckpt_dir)
    for path in list_worker_checkpoints(ckpt_dir):
      os.remove(path)
    restored = None
  if restored is not None:
    host_state, ssp_state = restored
    local = _to_local(host_state, worker.replicated)
  else:  # A worker killed before its first checkpoint rejoins from the initial state.
    ssp_state = {'next_clock': np.asarray(0, np.int64),
                 'applied': np.full(num_workers, -1, np.int64)}
  joined = ssp.join(ssp_state)
  first_clock = joined.next_clock
  if joined.updates:
    own = protocol.sum_updates(joined.updates)
    local = _add_to_params(local, own)
    local = local.replace(step=local.step + len(joined.updates))
  if first_clock > warmup_steps and balancer == 'proportional':
    worker.balanced_sizes = _balance_batches(worker, store, run_id, timeout_s)

  sizes = worker.sizes(first_clock, warmup_steps)
  weight = jnp.asarray(sizes[me] / worker.global_batch, jnp.float32)
  scratch = jax.tree.map(jnp.copy, local)
  worker.compile_for(scratch, worker.batch(min(first_clock, total_steps - 1), sizes), weight)
  del scratch
  _rendezvous(store, run_id, me, num_workers, timeout_s)
  metrics_lib.log_line(
      f'[ssp] {num_workers} workers, staleness {"inf" if staleness is None else staleness}, '
      f'global batch {worker.global_batch} ({balancer} per-worker batches, {sizes.tolist()} '
      f'now), {total_steps} clocks, slowdown {worker.slow.factor:g} / transient p='
      f'{worker.slow.straggler_probability:g} x{worker.slow.straggler_factor:g}; worker {me} '
      f'starts at clock {first_clock}.')

  snapshots: list[tuple[float, int, Any]] = []
  pending: list[protocol.Update] = []
  metrics_pending = []
  loop_start = time.perf_counter()
  for clock in range(first_clock, total_steps):
    updates = ssp.pull(clock)
    pending.extend(updates)
    # BSP: exactly the updates through clock - 1 (a faster worker's clock-c update waits).
    visible = clock - 1 if staleness == 0 else math.inf
    ready = [u for u in pending if u.clock <= visible]
    pending = [u for u in pending if u.clock > visible]
    if ready:
      local = _add_to_params(local, protocol.sum_updates(ready))
      for u in ready:
        worker.counters.applied_staleness[clock - 1 - u.clock] += 1

    if clock == warmup_steps and balancer == 'proportional':
      worker.balanced_sizes = _balance_batches(worker, store, run_id, timeout_s)
    sizes = worker.sizes(clock, warmup_steps)
    weight = jnp.asarray(sizes[me] / worker.global_batch, jnp.float32)
    batch = worker.batch(clock, sizes)
    compiled = worker.compile_for(local, batch, weight)
    with exp.timer.phase('train'):
      (local, delta, step_metrics), seconds = worker.slow.run(compiled, local, batch, weight)
    ssp.publish(clock, jax.device_get(delta))
    _maybe_inject_kill(clock)
    c = worker.counters
    c.busy_s += seconds
    c.examples += int(sizes[me])
    c.steps += 1
    if 0 < clock < warmup_steps:  # Clock 0 may include first-touch costs.
      c.warmup_step_s.append(seconds)
    metrics_pending.append(step_metrics)

    done = clock + 1
    if me == 0 and done % eval_every == 0 and done < total_steps:
      snapshots.append((time.perf_counter() - loop_start, done,
                        jax.device_get((local.params, local.model_state))))
    if done % config.log_every_steps == 0 or done == total_steps:
      values = jax.device_get(metrics_pending)
      metrics_pending = []
      mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
      if not np.isfinite(mean['loss']):
        ssp.abandon()
        raise trainer.NonFiniteLossError(
            f'SSP worker {me}: training loss is {mean["loss"]} at clock {done}. Lower '
            'config.optimizer.learning_rate or set config.optimizer.grad_clip_norm.')
      stats = ssp.stats()
      metrics_lib.log_line(
          f'[ssp] worker 0 clock {done}/{total_steps} loss={mean["loss"]:.4f} '
          f'accuracy={mean["accuracy"]:.4f} wait={stats.wait_s:.2f}s '
          f'steps/s={(done - first_clock) / max(time.perf_counter() - loop_start, 1e-9):.2f}')
      if exp.writer:
        exp.writer.write(done, {**mean, 'wait_s': stats.wait_s}, prefix='ssp')
    if worker_checkpoints and done % config.checkpoint_every_steps == 0:
      with exp.timer.phase('checkpoint'):
        if checkpointing.is_finite(local.params):
          save_worker_checkpoint(ckpt_dir, done, local, ssp.state())
          ssp.commit()

  loop_s = time.perf_counter() - loop_start
  with exp.timer.phase('ssp_drain'):
    rest = ssp.drain(total_steps - 1) + pending
    if rest:
      local = _add_to_params(local, protocol.sum_updates(rest))
    drained = _to_host(local)
    report_row = _worker_report(worker, ssp, loop_s, first_clock)
    store.set(_key(run_id, 'report', me), json.dumps(report_row).encode(), overwrite=True)
    if me == 0:
      store.set(_key(run_id, 'final'), serialization.encode(drained), overwrite=True)
      final = drained
    else:
      final = serialization.decode(store.get(_key(run_id, 'final'), timeout_s), like=drained)
    diff = _max_abs_diff(drained.params, final.params)
    store.set(_key(run_id, 'diff', me), json.dumps(diff).encode(), overwrite=True)
    rows = [json.loads(store.get(_key(run_id, 'report', k), timeout_s))
            for k in range(num_workers)]
    diffs = [float(json.loads(store.get(_key(run_id, 'diff', k), timeout_s)))
             for k in range(num_workers)]
    ssp.close()
    drain_end = time.perf_counter()
    if me == 0:
      store.delete(f'{_TRAIN_ROOT}/{run_id}')

  report = job_report(rows, staleness=staleness, global_batch_size=worker.global_batch)
  report.update({
      'batch_balancer': balancer, 'warmup_steps': warmup_steps,
      'batch_sizes': [r['batch_size'] for r in rows],
      'slowdown': [float(f) for f in slowdown_lib.parse_slowdown(parallel.slowdown,
                                                                  num_workers)],
      'straggler_probability': float(parallel.straggler_probability),
      'straggler_factor': float(parallel.straggler_factor),
      'clocks': total_steps,
      'final_params_max_abs_diff': diffs,
      'final_state_from': 'worker 0 (after drain every worker holds the initial parameters '
                          'plus every update; worker 0 sends its state so all are bitwise '
                          'equal)',
  })
  final_local = _to_local(_from_host(final, local), worker.replicated)
  if me == 0:  # The last point is the final state, after the drain.
    snapshots.append((drain_end - loop_start, total_steps,
                      (final_local.params, final_local.model_state)))
    report['accuracy_vs_time'] = _evaluate_snapshots(exp, local_mesh, final_local, snapshots)
  metrics_lib.log_line(
      f'[ssp] done: wall {report["wall_s"]:.1f}s, {report["throughput_examples_per_s"]:.0f} '
      f'examples/s, waits {[round(w, 2) for w in report["wait_s"]]} s, applied staleness '
      f'{report["applied_staleness_histogram"]}, coordination '
      f'{100 * report["coordination_fraction"]:.1f}% of a step.')
  return _to_global(final_local, exp.mesh), report


def _worker_report(worker: _Worker, ssp: protocol.SSPWorker, loop_s: float,
                   first_clock: int) -> dict[str, Any]:
  stats = ssp.stats().as_dict()
  c = worker.counters
  return {
      'worker': worker.me,
      'first_clock': first_clock,
      'clock': stats['clock'],
      'steps': c.steps,
      'examples': c.examples,
      'batch_size': int(worker.sizes(stats['clock'], 0)[worker.me]),
      'loop_s': loop_s,
      'busy_s': c.busy_s,
      'slept_s': worker.slow.slept_s,
      'transient_steps': worker.slow.transient_steps,
      'examples_per_s': c.examples / loop_s if loop_s > 0 else float('nan'),
      'steps_per_s': c.steps / loop_s if loop_s > 0 else float('nan'),
      'wait_s': stats['wait_s'],
      'blocked_pulls': stats['blocked_pulls'],
      'pull_s': stats['pull_s'],
      'publish_s': stats['publish_s'],
      'encode_s': stats['encode_s'],
      'decode_s': stats['decode_s'],
      'bytes_published': stats['bytes_published'],
      'payload_bytes': stats['bytes_published'] // max(c.steps, 1),
      'bytes_received': stats['bytes_received'],
      'applied_staleness': {k: c.applied_staleness[k] for k in sorted(c.applied_staleness)},
      'view_staleness': stats['view_staleness'],
      'update_age_at_pull': stats['update_age'],
      'dropped': stats['dropped'],
      'gc_deleted': stats['gc_deleted'],
  }


def _evaluate_snapshots(exp, local_mesh: jax.sharding.Mesh, like: state_lib.TrainState,
                        snapshots: list[tuple[float, int, Any]]) -> list[dict[str, float]]:
  """Test accuracy of worker 0's snapshots, on its local devices."""
  from pdcnno_jax.train import trainer  # pylint: disable=g-import-not-at-top

  local_exp = dataclasses.replace(exp, mesh=local_mesh, writer=None)
  eval_step = steps_lib.make_eval_step(exp.graphdef, exp.preprocess, local_mesh)
  rep = sharding_lib.replicated(local_mesh)
  split = 'validation' if 'validation' in exp.dataset.splits else 'test'
  curve = []
  with exp.timer.phase('eval'):
    for wall_s, clock, (params, model_state) in snapshots:
      state = like.replace(params=jax.device_put(params, rep),
                           model_state=jax.device_put(model_state, rep))
      result = trainer.evaluate(local_exp, state, split, eval_step)
      curve.append({'wall_s': wall_s, 'clock': clock, 'split': split, **result})
      if exp.writer:
        exp.writer.write(clock, {'accuracy': result['accuracy'], 'wall_s': wall_s},
                         prefix=f'ssp_{split}')
  return curve
