"""Real training runs for calibration and validation (and the MapReduce / SSP benchmarks).

Synchronous and MapReduce runs: one process of a local multi-process job (`launch_local`),

  python -m pdcnno_jax.perfmodel.runs --spec=runs.json --out=results.json \
      --coordinator_address=... --num_processes=N --process_id=i

SSP runs: one driver process on Ray, ``--ssp_workers=N`` (``parallel.num_workers`` actors with
one CPU device each, time-sharing the machine's cores, one parameter-server shard).
runs.json lists runs {name, mode: sync | mapreduce | ssp, overrides: {config key: value},
train_subset, conv_widths}; every run starts from a fresh model and reports its training wall
time (`measured_s`: sync and MapReduce without compilation and evaluation; SSP at the steady
rate, `ssp_steady_wall_s`), its parameter bytes and the mode's report, and the share of a core
the process got right after it (`core_share`: the machine may be shared). `train_mapreduce_once`,
`train_ssp_once` and `subset_train` are shared with benchmarks/bench_mapreduce.py and
bench_ssp_training.py. This module imports JAX (inside its functions); the rest of `perfmodel`
does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subset_train(dataset, num_train: int):
  """The data set with only its first `num_train` training examples."""
  from pdcnno_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  split = dataset.host_splits['train']
  small = input_pipeline.HostSplit(split.images[:num_train], split.labels[:num_train])
  return dataclasses.replace(dataset, host_splits={**dataset.host_splits, 'train': small},
                             num_examples={**dataset.num_examples, 'train': num_train})


def _fresh_state(exp):
  from pdcnno_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  tx = exp.build_optimizer()
  exp.graphdef, state = state_lib.create_train_state(exp.build_model(), tx)
  return tx, sharding_lib.replicate(state, exp.mesh)


def train_mapreduce_once(exp, config) -> dict[str, Any]:
  """Fresh model, MapReduce training; the report with train_wall_s and the final test figures."""
  from pdcnno_jax.parallel import mapreduce  # pylint: disable=g-import-not-at-top
  exp.config = config
  exp.stage_reports = {}
  tx, state = _fresh_state(exp)
  start = time.perf_counter()
  _, report = mapreduce.train(exp, state, tx=tx)
  report['train_wall_s'] = time.perf_counter() - start
  report['test'] = report['rounds'][-1]['test']
  return report


def train_ssp_once(exp, config, *, workdir: str, dataset=None) -> dict[str, Any]:
  """Fresh model, SSP training on Ray in its own workdir; the SSP report."""
  from pdcnno_jax.parallel.ssp import training  # pylint: disable=g-import-not-at-top
  run = dataclasses.replace(exp, config=config, workdir=workdir,
                            dataset=exp.dataset if dataset is None else dataset,
                            graphdef=None, writer=None,
                            stage_reports={}, mode_resume={})
  tx, state = _fresh_state(run)
  _, report = training.train(run, state, tx=tx)
  return report


def _train_sync_once(exp, config) -> dict[str, Any]:
  from pdcnno_jax.parallel import sync  # pylint: disable=g-import-not-at-top
  exp.config = config
  tx, state = _fresh_state(exp)
  start = time.perf_counter()
  sync.train_epochs(exp, state, tx=tx, num_epochs=config.num_epochs)
  return {'train_wall_s': time.perf_counter() - start, 'steps': int(
      round(config.num_epochs * exp.steps_per_epoch))}


def _param_bytes(exp) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = exp.build_model()
  params = nnx.state(model, nnx.Param)
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def _configure(base, overrides: dict[str, Any]):
  config = base.copy_and_resolve_references()
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    node = config
    for part in section.split('.') if section else ():
      node = node[part]
    with node.ignore_type():  # e.g. a fractional num_epochs for an int default.
      node[field] = value
  return config


def core_share(seconds: float = 0.3) -> float:
  """Share of a core this process gets now: CPU seconds of a busy loop per wall second.

  On a shared machine other jobs take part of every core; the model charges its CPU work at
  this rate. Called in every process of a job at the same moment (right after a run, which
  ends in step), so processes pinned to one core split it between them.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  while time.perf_counter() - wall < seconds:
    pass
  return (time.process_time() - cpu) / (time.perf_counter() - wall)


def ssp_steady_wall_s(report: dict[str, Any], half: int) -> float:
  """An SSP job's wall time at the rate of its second half: clocks x seconds per clock.

  Ray brings the actors up seconds apart and each compiles its step inside its loop, so the
  first clocks hold start-up, not training. Worker 0's snapshot after clock ``half`` (report
  ``accuracy_vs_time``) and the end of its loop time clocks ``half`` .. the last; the
  staleness bound keeps every worker within s clocks of it.
  """
  clocks = report['clocks']
  at_half = next(p['wall_s'] for p in report['accuracy_vs_time'] if p['clock'] == half)
  return clocks * (report['per_worker'][0]['loop_s'] - at_half) / (clocks - half)


def run_one(exp, base, spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
  """Runs one entry of the spec list; returns its figures."""
  config = _configure(base, spec.get('overrides', {}))
  n = spec.get('train_subset') or len(exp.dataset.host_splits['train'].labels)
  half = (int(round(config.num_epochs * (n // config.data.batch_size))) + 1) // 2
  config.parallel.ssp_eval_every_steps = half  # One snapshot: after clock `half`.
  widths = spec.get('conv_widths')
  exp.model_overrides = {'conv_widths': tuple(widths)} if widths else {}
  full = exp.dataset
  exp.dataset = subset_train(full, spec['train_subset']) if spec.get('train_subset') else full
  timer_before = dict(exp.timer.seconds)
  try:
    if spec['mode'] == 'sync':
      report = _train_sync_once(exp, config)
    elif spec['mode'] == 'mapreduce':
      report = train_mapreduce_once(exp, config)
    elif spec['mode'] == 'ssp':
      report = train_ssp_once(exp, config, workdir=os.path.join(out_dir, spec['name']))
    else:
      raise ValueError(f'Unknown mode {spec["mode"]!r} in run {spec["name"]}.')
  finally:
    exp.dataset = full
  spent = {k: v - timer_before.get(k, 0.0) for k, v in exp.timer.seconds.items()}
  if spec['mode'] == 'ssp':
    measured = ssp_steady_wall_s(report, half)
  else:
    measured = report['train_wall_s'] - spent.get('compile', 0.0) - spent.get('eval', 0.0)
  return {'name': spec['name'], 'mode': spec['mode'], 'measured_s': measured,
          'core_share': core_share(), 'param_bytes': _param_bytes(exp), 'report': report,
          'spec': spec}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for name in ('spec', 'out'):
    parser.add_argument(f'--{name}', required=True)
  parser.add_argument('--coordinator_address', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--ssp_workers', type=int, default=0,
                      help='SSP runs: this one driver starts that many Ray worker actors')
  parser.add_argument('--data_dir', default=os.path.join(_REPO, 'data', 'tfds'))
  parser.add_argument('--cache_dir', default='',
                      help='persistent compilation cache (runs of one shape compile once)')
  args = parser.parse_args(argv)
  if args.cache_dir:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           heartbeat_timeout_s=60)
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax import config_lib  # pylint: disable=g-import-not-at-top
  from pdcnno_jax import experiment  # pylint: disable=g-import-not-at-top

  with open(args.spec) as f:
    specs = json.load(f)
  base = config_lib.load_config(os.path.join(_REPO, 'configs', 'default.py'))
  base.data.data_dir = args.data_dir
  base.parallel.mode = 'ssp' if args.ssp_workers else 'sync'
  base.parallel.engine = 'ray' if args.ssp_workers else 'jax'  # MapReduce: the process job.
  base.parallel.num_workers = max(args.ssp_workers, 1)
  base.parallel.ray_worker_cpu_devices = 1
  base.parallel.ssp_timeout_s = 600.0
  base.parallel.ps_snapshot_every_clocks = 0  # No snapshots or worker checkpoints: the runs
  base.checkpoint_every_steps = 10**6  # time training and its transport alone.
  base.log_every_steps = 10**6
  base.eval_every_epochs = 10**6
  out_dir = os.path.dirname(os.path.abspath(args.out))
  exp = experiment.setup(base, os.path.join(out_dir, f'setup_{args.process_id}'))
  results = []
  for spec in specs:
    results.append(run_one(exp, base, spec, out_dir))
    if jax.process_index() == 0:  # After every run, so that a cut-short job still reports.
      with open(args.out, 'w') as f:
        json.dump(results, f)
  if args.ssp_workers:
    from pdcnno_jax.parallel.ray_engine import runtime  # pylint: disable=g-import-not-at-top
    runtime.stop()
  elif jax.process_count() > 1:  # Reach the runtime's shutdown barrier together.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('perfmodel_runs_done')


if __name__ == '__main__':
  main()
