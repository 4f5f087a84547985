"""python -m pdcnno_jax.perfmodel --calibrate | --validate | --predict [--quick].

  --calibrate  runs `calibration.calibration_runs` as real local jobs (sync and MapReduce:
               1, 2, 4 processes, one core each; SSP: one Ray driver with 1, 2, 4 worker
               actors) and writes the fitted inputs to --calibration_file.
  --validate   runs `calibration.validation_runs` and prints predicted vs measured wall time
               per run, then `max relative error: X`.
  --repeats N  runs every configuration N times (all of them once, then again): calibration
               fits the median repeat of each, validation compares the median and prints
               every repeat and their spread.
  --from_saved re-uses the raw runs a previous --calibrate / --validate saved in --workdir
               (calibration_runs.json, validation_runs.json) instead of running them again.
  --predict    speed-up tables (2, 4, 8, 16 nodes; 1-16 in the JSON) for each paper's setting
               and mode, pruned and dense, from the calibration; written to --predictions_file.

Default files live under --workdir (default workdirs/perfmodel). Jobs run at nice 10.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import zlib
from typing import Any, Sequence

from pdcnno_jax import launch_local
from pdcnno_jax.perfmodel import calibration
from pdcnno_jax.perfmodel import model
from pdcnno_jax.perfmodel import predict

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load() -> str:
  return '/'.join(f'{v:.2f}' for v in os.getloadavg())


# XLA on one thread: what a process pinned to one core (a one-core node) runs. With XLA's
# default thread pool, two processes time-sharing a core each run a pool sized for the
# machine, and the core serves them far below its single-process rate.
SINGLE_THREAD_XLA = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def _ssp_job(workers: int, args: list[str], *, timeout_s: float, stdout) -> int:
  """One SSP driver process starting ``workers`` Ray actors; its exit code.

  Each actor's XLA runs single-threaded, as a pinned process does (`SINGLE_THREAD_XLA`):
  ``workers`` actors time-share the machine's cores the way ``workers`` pinned processes do.
  """
  env = launch_local.process_env(1)
  env['XLA_FLAGS'] += ' ' + SINGLE_THREAD_XLA
  cmd = [sys.executable, '-m', 'pdcnno_jax.perfmodel.runs', *args, f'--ssp_workers={workers}']
  try:
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout_s, check=False, text=True)
  except subprocess.TimeoutExpired as e:
    stdout.write(e.stdout.decode(errors='replace') if isinstance(e.stdout, bytes)
                 else e.stdout or '')
    return 124
  stdout.write(done.stdout)
  return done.returncode


def _collective_job(processes: int, args: list[str], *, timeout_s: float, stdout) -> int:
  """A sync / MapReduce job of ``processes`` processes pinned one core each, XLA on one
  thread (`SINGLE_THREAD_XLA`); its exit code."""
  flags = os.environ.get('XLA_FLAGS')
  os.environ['XLA_FLAGS'] = f'{flags or ""} {SINGLE_THREAD_XLA}'.strip()
  try:
    return launch_local.launch(processes, args, module='pdcnno_jax.perfmodel.runs',
                               timeout_s=timeout_s, stdout=stdout, cores_per_process=1)
  finally:
    if flags is None:
      del os.environ['XLA_FLAGS']
    else:
      os.environ['XLA_FLAGS'] = flags


def run_jobs(specs: list[dict[str, Any]], *, data_dir: str, timeout_s: float,
             jobs_dir: str, cache_dir: str = '') -> list[dict]:
  """Runs the specs as local jobs, one per (process count, collective or SSP); results in order.

  Each job's results go to `jobs_dir`; a job whose results are already there (all of its runs)
  is not run again, so a job that fails does not cost the ones before it.
  """
  groups: dict[tuple[int, bool], list[dict]] = {}
  for spec in specs:
    groups.setdefault((spec['processes'], spec['mode'] == 'ssp'), []).append(spec)
  results = {}
  os.environ['PYTHONPATH'] = os.pathsep.join(
      p for p in (_REPO, os.environ.get('PYTHONPATH')) if p)
  os.makedirs(jobs_dir, exist_ok=True)
  for (processes, ssp), group in sorted(groups.items()):
    names = [s['name'] for s in group]
    tag = f'{processes}_{"ssp" if ssp else "collective"}_{zlib.crc32(",".join(names).encode())}'
    spec_path = os.path.join(jobs_dir, f'spec_{tag}.json')
    out = os.path.join(jobs_dir, f'out_{tag}.json')
    done = _read(out)
    if sorted(r['name'] for r in done) != sorted(names):
      with open(spec_path, 'w') as f:
        json.dump(group, f)
      log = io.StringIO()
      before, start = _load(), time.perf_counter()
      args = [f'--spec={spec_path}', f'--out={out}', f'--data_dir={data_dir}',
              f'--cache_dir={cache_dir}']
      if ssp:
        code = _ssp_job(processes, args, timeout_s=timeout_s, stdout=log)
      else:
        code = _collective_job(processes, args, timeout_s=timeout_s, stdout=log)
      done = _read(out)
      complete = sorted(r['name'] for r in done) == sorted(names)
      what = 'Ray SSP worker(s)' if ssp else 'process(es), sync/MapReduce'
      print(f'  job: {processes} {what}, '
            f'{len(group)} runs, {time.perf_counter() - start:.0f} s, exit {code}; load average '
            f'{before} -> {_load()}', flush=True)
      with open(os.path.join(jobs_dir, f'log_{tag}.txt'), 'w') as f:
        f.write(log.getvalue())
      if not complete:
        sys.stdout.write(log.getvalue()[-6000:])
        raise SystemExit(f'Job with {processes} processes failed (exit {code}); its runs so '
                         f'far are in {out}.')
    for result in done:
      results[result['name']] = result
  return [results[s['name']] for s in specs]


def _read(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def _results(args, phase: str, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Runs the specs --repeats times (`calibration.repeated`: every configuration once, then
  again), or with --from_saved reads the results a previous run saved; every repeat's run."""
  path = os.path.join(args.workdir, f'{phase}_runs.json')
  if args.from_saved:
    with open(path) as f:
      return json.load(f)
  results = []
  for k, repeat in enumerate(calibration.repeated(specs, args.repeats)):
    if args.repeats > 1:
      print(f'{phase}: repeat {k + 1} of {args.repeats}', flush=True)
    results += run_jobs(repeat, data_dir=args.data_dir, timeout_s=args.timeout_s,
                        jobs_dir=os.path.abspath(os.path.join(args.workdir, 'jobs')),
                        cache_dir=os.path.abspath(os.path.join(args.workdir, 'jax_cache')))
  os.makedirs(args.workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f)
  return results


def calibrate(args) -> None:
  specs = calibration.calibration_runs(args.quick)
  results = calibration.median_runs(_results(args, 'calibration', specs))
  calib = calibration.fit(results, len(os.sched_getaffinity(0)))
  calib['runs'] = [{k: r[k] for k in ('name', 'mode', 'measured_s', 'param_bytes',
                                      'repeats_measured_s')} for r in results]
  calib['load_average_at_end'] = _load()
  os.makedirs(os.path.dirname(os.path.abspath(args.calibration_file)), exist_ok=True)
  with open(args.calibration_file, 'w') as f:
    json.dump(calib, f, indent=2)
  print(json.dumps({k: calib[k] for k in ('costs', 'pruned_sync_cost', 'param_bytes',
                                           'pruned_param_bytes', 'overhead_s', 'run_overhead_s',
                                           'transfer_s')}, indent=1))
  print(f'calibration written to {args.calibration_file}')


def validate(args) -> float:
  calib = calibration.load(args.calibration_file)
  specs = calibration.validation_runs(args.quick)
  results = calibration.median_runs(_results(args, 'validation', specs))
  worst, widest = 0.0, 0.0
  print(f'{"run":40s} {"predicted_s":>11s} {"measured_s":>10s} {"rel_err":>8s} '
        f'{"core_share":>10s} {"startup_s":>10s} {"repeats_s":>18s} {"spread":>7s}')
  for result in results:
    spec = result['spec']
    share = calibration.capacity(result, calib['num_cores'])
    predicted = calibration.predict_run(spec, calib, capacity=share)
    measured = calibration.measured_s(result)  # The median repeat's.
    error = abs(predicted - measured) / measured
    worst = max(worst, error)
    repeats = result['repeats_measured_s']
    spread = calibration.spread(repeats)
    widest = max(widest, spread)
    print(f'{spec["name"]:40s} {predicted:11.2f} {measured:10.2f} {error:8.3f} '
          f'{share:10.2f} {calibration.startup_s(result):10.2f} '
          f'{"/".join(f"{t:.2f}" for t in repeats):>18s} {spread:7.3f}')
  print(f'framework constants (calibrated, per step or round): {calib["overhead_s"]}; per '
        f'local example and step: {calib.get("overhead_per_example_s", {})}; per run: '
        f'{calib.get("run_overhead_s", {})}; SSP transfer per clock: '
        f'{calib.get("transfer_s", {})}; sharing efficiency of a time-shared core: '
        f'{calib.get("sharing_efficiency", {})}')
  if results and len(results[0]['repeats_measured_s']) > 1:
    print(f'measured_s is the median of {len(results[0]["repeats_measured_s"])} repeats; '
          f'widest run-to-run spread (max - min) / median: {widest:.3f}')
  print(f'max relative error: {worst:.3f}')
  return worst


def predictions(calib: dict[str, Any], *, num_examples: int = 60000,
                local_batch: int = 32, device_speedups: Sequence[float] = (1.0, 30.0)) -> dict:
  """Speed-up curves for every paper setting, mode and pruning choice (1..16 nodes).

  Only the measured step costs and parameter bytes are carried over from the calibration; its
  framework constants (gloo on loopback, Ray's calls to the parameter server, this runtime's
  per-round host work) belong to the local runtime, so a cluster's communication is the
  network model's alone.
  """
  dense = calibration.cost_of(calib, 'sync')
  pruned = model.StepCost(**calib['pruned_sync_cost'])
  nodes = tuple(range(1, 17))
  out = {'nodes': list(nodes), 'num_examples': num_examples, 'local_batch': local_batch,
         'network': '1 Gb/s, 50 us latency', 'curves': [],
         'framework_constants': 'not applied: local runtime only (network model instead)',
         'superlinear': predict.superlinear_conditions(dense, pruned, local_batch)}
  for setting, s in predict.SETTINGS.items():
    network = model.Network(topology=s['topology'])
    for mode in s['modes']:
      for device in device_speedups:
        for label, serial, parallel, nbytes in (
            ('dense', dense, dense, calib['param_bytes']),
            ('pruned', pruned, pruned, calib['pruned_param_bytes']),
            ('dense_serial_vs_pruned_parallel', dense, pruned, calib['pruned_param_bytes'])):
          options = dict(balancer=s['balancer'], staleness=3)
          curve = predict.speedup_curve(
              mode, serial.scaled(device), parallel.scaled(device),
              speeds=predict.paper_speeds(setting), network=network, nodes=nodes,
              param_bytes=nbytes, num_examples=num_examples, local_batch=local_batch,
              **options)
          out['curves'].append({'setting': setting, 'mode': mode, 'pruning': label,
                                'device_speedup': device, 'speedup': curve})
  return out


def print_predictions(pred: dict[str, Any]) -> None:
  show = (2, 4, 8, 16)
  print(f'Speed-up T_1 / T_N, {pred["num_examples"]} examples, {pred["local_batch"]} per node '
        f'per step, {pred["network"]}; device_speedup = reference device x (1: the measured '
        'CPU core; 30: an assumed accelerator, sensitivity only)')
  print(f'{"setting":11s} {"mode":9s} {"pruning":32s} {"dev":>4s} ' +
        ' '.join(f'{"N=" + str(n):>6s}' for n in show))
  for c in pred['curves']:
    row = ' '.join(f'{c["speedup"][n - 1]:6.2f}' for n in show)
    print(f'{c["setting"]:11s} {c["mode"]:9s} {c["pruning"]:32s} {c["device_speedup"]:4g} {row}')
  s = pred['superlinear']
  print(f'S(8) = {s["reported_speedup"]} (MR-FPDCNN) needs a per-example cost ratio serial / '
        f'parallel >= {s["needed_cost_ratio"]:.3f} with 8 training nodes, '
        f'{s["needed_cost_ratio_task_nodes"]:.3f} with its 7 task nodes; measured dense / pruned '
        f'LeNet-5 (conv widths halved, batch {pred["local_batch"]}): '
        f'{s["measured_cost_ratio_dense_over_pruned"]:.3f}, so an unpruned serial baseline '
        f'allows up to {s["bound_with_pruned_parallel_task_nodes"]:.2f} on 7 task nodes; fits: '
        f'{s["fits"]}. With a pruned serial baseline S(N) <= N: it does not fit.')


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--calibrate', action='store_true')
  parser.add_argument('--validate', action='store_true')
  parser.add_argument('--predict', action='store_true')
  parser.add_argument('--quick', action='store_true', help='small runs (a few minutes in all)')
  parser.add_argument('--workdir', default=os.path.join('workdirs', 'perfmodel'))
  parser.add_argument('--calibration_file', default=None,
                      help='default: <workdir>/calibration.json')
  parser.add_argument('--predictions_file', default=None,
                      help='default: <workdir>/predictions.json')
  parser.add_argument('--data_dir', default=os.path.join('data', 'tfds'))
  parser.add_argument('--repeats', type=int, default=1,
                      help='run every calibration and validation configuration this many times, '
                      'one repeat after another, and compare at the median')
  parser.add_argument('--timeout_s', type=float, default=1800)
  parser.add_argument('--from_saved', action='store_true',
                      help='refit / re-predict from the runs a previous call saved in --workdir')
  args = parser.parse_args(argv)
  if not (args.calibrate or args.validate or args.predict):
    parser.error('give at least one of --calibrate, --validate, --predict')
  args.calibration_file = args.calibration_file or os.path.join(args.workdir,
                                                                'calibration.json')
  args.predictions_file = args.predictions_file or os.path.join(args.workdir,
                                                                'predictions.json')
  args.data_dir = os.path.abspath(args.data_dir)
  print(f'perfmodel: {len(os.sched_getaffinity(0))} cores, load average {_load()}', flush=True)
  if args.calibrate:
    calibrate(args)
  if args.validate:
    validate(args)
  if args.predict:
    pred = predictions(calibration.load(args.calibration_file))
    os.makedirs(os.path.dirname(os.path.abspath(args.predictions_file)), exist_ok=True)
    with open(args.predictions_file, 'w') as f:
      json.dump(pred, f, indent=1)
    print_predictions(pred)
    print(f'predictions written to {args.predictions_file}')
