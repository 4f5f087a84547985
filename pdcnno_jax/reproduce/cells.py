"""Running one cell of a grid in its own sub-workdir; a cell with a report.json is complete.

train      `python -m pdcnno_jax.main` on the cell's config (`cell_config.py`) in a child
           process (a crash fails one cell): MapReduce and SSP as one driver with Ray worker
           actors, synchronous cells with processes > 1 through the local launcher
           (`pdcnno_jax.launch_local`, loopback JAX job). Its memory is the peak of the summed
           RSS of its training processes (driver or launched processes, and Ray actors).
balancer   makespan max_k blocks_k / speed_k and entropy of every balancer of
           parallel/balancers.py on one drawn set of node speeds (deterministic).
model      cluster-model predictions (pdcnno_jax.perfmodel) from the per-example training
           seconds the paper's train cells measured: speed-up on 1..16 nodes of the paper's
           hardware (1 Gb/s), and for SSP the time per example of SSP and synchronous training
           with and without transient stragglers. Marked `source=model` everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np
import psutil

from pdcnno_jax import launch_local
from pdcnno_jax.parallel import balancers
from pdcnno_jax.perfmodel import model as perf_model
from pdcnno_jax.perfmodel import predict
from pdcnno_jax.reproduce import grids

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CELL_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cell_config.py')
BALANCER_NAMES = ('equal', 'proportional', 'lbrla', 'dlbpce')
MODEL_EXAMPLES, MODEL_LOCAL_BATCH = 60000, 32  # Fashion-MNIST epoch, 32 examples per node.


def cell_dir(workdir: str, cell: grids.Cell) -> str:
  return os.path.join(workdir, 'cells', cell.key())


def read_report(workdir: str, cell: grids.Cell) -> dict[str, Any] | None:
  """The cell's report.json, or None while it is not complete."""
  path = os.path.join(cell_dir(workdir, cell), 'report.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  measured = os.path.join(cell_dir(workdir, cell), 'cell.json')
  if os.path.exists(measured):  # The runner's own measurements of a train cell.
    with open(measured) as f:
      report['cell'] = json.load(f)
  return report


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(tmp, path)


def _last_error_line(text: str) -> str:
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  errors = [l for l in lines if 'Error' in l or 'error' in l]
  return (errors or lines or ['no output'])[-1][:300]


class PeakMemory:
  """Peak over time of the summed RSS of this process's descendants (the running cell).

  A cell's training processes are its driver (or its launcher's processes) and the Ray actors
  the driver starts (workers and parameter-server shards), which are separate processes: the
  sum over them is the cell's memory. Ray's own daemons (GCS, raylet, idle workers) count
  only in `peak_all_bytes`. Sampled every `every_s` seconds, so a shorter spike is missed.
  """

  def __init__(self, every_s: float = 0.2):
    self.every_s = every_s
    self.peak_bytes = self.peak_all_bytes = self.samples = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  @staticmethod
  def is_training(cmdline: Sequence[str]) -> bool:
    """Whether a process with `cmdline` trains (driver, launched process, Ray actor)."""
    head = cmdline[0] if cmdline else ''
    return ((head.startswith('ray::') and not head.startswith('ray::IDLE'))
            or any('pdcnno_jax.main' in part for part in cmdline))

  def sample(self) -> None:
    total = everything = 0
    for proc in psutil.Process().children(recursive=True):
      try:
        rss, cmdline = proc.memory_info().rss, proc.cmdline()
      except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        continue
      everything += rss
      total += rss if self.is_training(cmdline) else 0
    self.peak_bytes = max(self.peak_bytes, total)
    self.peak_all_bytes = max(self.peak_all_bytes, everything)
    self.samples += 1

  def _run(self) -> None:
    while not self._stop.wait(self.every_s):
      self.sample()

  def __enter__(self) -> 'PeakMemory':
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


def cell_env(cache_dir: str | None) -> dict[str, str]:
  """Environment of a cell's processes: this package first; a shared compilation cache."""
  env = {'PYTHONPATH': os.pathsep.join(p for p in (_REPO, os.environ.get('PYTHONPATH')) if p)}
  if cache_dir:  # Cells of one shape compile once (JAX's persistent compilation cache).
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
  """`env` set in this process's environment (the launcher's processes inherit it)."""
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def run_train(cell: grids.Cell, directory: str, *, timeout_s: float,
              cache_dir: str | None = None) -> None:
  """Runs a train cell's experiment in `directory` (resumes from its checkpoints).

  Writes `directory/cell.json`: the cell's wall seconds as the runner saw them (start-up
  included) and its peak memory (`PeakMemory`).
  """
  config_path = os.path.join(directory, 'config.json')
  _write_json(config_path, cell.config().to_dict())
  args = [f'--config={_CELL_CONFIG}:{config_path}', f'--workdir={directory}']
  log_path = os.path.join(directory, 'log.txt')
  start = time.perf_counter()
  with _environ(cell_env(cache_dir)), PeakMemory() as memory:
    if cell.launched():
      log = io.StringIO()
      code = launch_local.launch(cell.processes, args, module='pdcnno_jax.main',
                                 timeout_s=timeout_s, stdout=log)
      text = log.getvalue()
      with open(log_path, 'w') as f:
        f.write(text)
    else:
      with open(log_path, 'w') as log:
        try:
          code = subprocess.run([sys.executable, '-m', 'pdcnno_jax.main', *args],
                                env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
          code = 'timeout'
      with open(log_path) as log:
        text = log.read()
  _write_json(os.path.join(directory, 'cell.json'), {
      'wall_s': time.perf_counter() - start, 'peak_rss_bytes': memory.peak_bytes,
      'peak_rss_all_bytes': memory.peak_all_bytes, 'memory_samples': memory.samples})
  if code != 0 or not os.path.exists(os.path.join(directory, 'report.json')):
    raise RuntimeError(f'exit {code}: {_last_error_line(text)}')


def run_balancer(cell: grids.Cell) -> dict[str, Any]:
  """Makespans and entropies of every balancer on one random set of node speeds."""
  p = cell.params
  rng = np.random.default_rng(cell.seed)
  speed = rng.uniform(*p['speed_range'], size=p['workers'])
  stats = balancers.WorkerStats(speed=speed)
  out = {'kind': 'balancer', 'speed': speed.tolist(), 'num_blocks': p['num_blocks'],
         'balancers': {}}
  for name in BALANCER_NAMES:
    blocks = np.asarray(balancers.get_balancer(name)(p['num_blocks'], stats))
    out['balancers'][name] = {
        'blocks': blocks.tolist(), 'makespan': balancers.makespan(blocks, speed),
        'entropy': balancers.parallel_computing_entropy(balancers.node_loads(blocks, speed))}
  return out


def step_cost(reports: Sequence[dict[str, Any]]) -> tuple[perf_model.StepCost, float]:
  """(per-example cost, parameter bytes) from measured train reports (median over seeds)."""
  if not reports:
    raise ValueError('no measured train cell to take the step cost from')
  per_example = [r['wall_time_s']['train'] / max(r['steps'] * r['config']['data']['batch_size'],
                                                 1) for r in reports]
  return (perf_model.StepCost(per_example_s=statistics.median(per_example)),
          4.0 * statistics.median(r['model']['params'] for r in reports))


def run_model(cell: grids.Cell, measured: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """Cluster-model predictions from the step costs of the measured cells named in params."""
  p = cell.params
  serial, _ = step_cost(measured.get(p['serial_from'], []))
  parallel, nbytes = step_cost(measured.get(p['parallel_from'], []))
  setting = predict.SETTINGS[p['setting']]
  network = perf_model.Network(topology=setting['topology'])
  options = dict(balancer=setting['balancer'], staleness=p.get('staleness', 3))
  curve = predict.speedup_curve(
      p['mode'], serial, parallel, speeds=predict.paper_speeds(p['setting']), network=network,
      nodes=p['nodes'], param_bytes=nbytes, num_examples=MODEL_EXAMPLES,
      local_batch=MODEL_LOCAL_BATCH, **options)
  out = {'kind': 'model', 'source': 'model', 'setting': p['setting'], 'mode': p['mode'],
         'hardware': setting['hardware'], 'nodes': p['nodes'], 'speedup': curve,
         'serial_cost': serial.__dict__, 'parallel_cost': parallel.__dict__,
         'param_bytes': nbytes, 'superlinear': predict.superlinear_conditions(
             serial, parallel, MODEL_LOCAL_BATCH)}
  if 'straggler_probability' in p:
    out['per_example_s'] = _ssp_vs_sync(parallel, nbytes, p, network)
  return out


def _ssp_vs_sync(cost, nbytes, p, network) -> dict[str, dict[str, float]]:
  """Seconds per example trained on the paper's 4 nodes, SSP and sync, with and without load."""
  speeds = predict.paper_speeds(p['setting'])(4)
  out = {}
  for load, prob in (('noload', 0.0), ('load', p['straggler_probability'])):
    strag = perf_model.Stragglers((1.0,) * 4, prob, p['straggler_factor'], 0)
    cluster = perf_model.Cluster(speeds, network, strag)
    for mode in ('sync', 'ssp'):
      wall, trained = predict.parallel_time(
          mode, cost, cluster, num_examples=MODEL_EXAMPLES, local_batch=MODEL_LOCAL_BATCH,
          param_bytes=nbytes, staleness=p['staleness'])
      out[f'{mode}_{load}'] = wall / trained
  return out


def run_cell(cell: grids.Cell, workdir: str, *, timeout_s: float,
             measured: dict[str, list[dict[str, Any]]],
             cache_dir: str | None = None) -> dict[str, Any]:
  """Runs `cell` unless complete; returns its report. Raises on failure (one-line message)."""
  report = read_report(workdir, cell)
  if report is not None:
    return report
  directory = cell_dir(workdir, cell)
  os.makedirs(directory, exist_ok=True)
  if cell.kind == 'train':
    run_train(cell, directory, timeout_s=timeout_s, cache_dir=cache_dir)
    return read_report(workdir, cell)
  report = run_balancer(cell) if cell.kind == 'balancer' else run_model(cell, measured)
  _write_json(os.path.join(directory, 'report.json'), report)
  return report
