"""MapReduce training on LeNet-5 / Fashion-MNIST: balancers side by side, and speed-up.

  python benchmarks/bench_mapreduce.py [--epochs=2] [--rounds_per_epoch=4] \
      [--data_dir=data/tfds] [--save_json=figures.json] [--engine=jax|ray] [--num_train=N]

With ``--engine=jax`` (default) two measurements, each in one run:

1. Balancers. One job of 4 local worker processes with slowdowns [1, 1, 2, 4]
   (configs/mapreduce_lenet.py) trains the same initial LeNet-5 with each balancer in turn
   (equal, proportional, lbrla, dlbpce) for the same number of epochs. Per balancer it prints
   the measured makespan of every round (the longest Map, i.e. busy time of the slowest worker),
   the mean makespan over rounds 1.. (round 0 is always the equal split), its ratio to the
   proportional rule's and the equal split's, the mean parallel computing entropy and the final
   test accuracy. Bars (issue #6): lbrla and dlbpce within 10% of proportional and >= 1.8x
   better than equal; accuracy within 0.5 pp of equal. One such job per ``--slowdown_scales``
   entry: scale 1 takes the factors literally, but four single-core workers at factors
   1, 1, 2, 4 need 2.75 cores once balanced, more than this machine has, so the fast workers
   slow each other down and the measured speeds flatten (e.g. 1, 1.05, 1.06, 2.17); scale 2
   (factors 2, 2, 4, 8, the same ratios) needs 1.4 cores and emulates the cluster faithfully.
2. Speed-up. The same job without slowdown (equal split) with 1 process and with 2 processes
   on this machine: T_1 / T_2 from the measured training wall time (sum of round times), next
   to the in-run estimate of `mapreduce.speedup_report`.

With ``--engine=ray``: the same training (no slowdown, equal split) on 2 Ray worker actors of
this driver process, then on 2 jax.distributed processes; per engine the mean round time
(Map + Reduce, rounds 1..), and for Ray the mean driver wait for the slowest Map, Reduce and
broadcast times and the transport figures of report.json (MiB/s = bytes moved / seconds).
Quick form: ``--engine=ray --epochs=1 --rounds_per_epoch=4 --num_train=8192``.

The machine is shared, so the load average is printed before and after every job.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
_BALANCERS = ('equal', 'proportional', 'lbrla', 'dlbpce')


def _config(args):
  path = os.path.join(_REPO, 'configs', 'mapreduce_lenet.py')
  spec = importlib.util.spec_from_file_location('mapreduce_lenet_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.num_epochs = args.epochs
  config.data.data_dir = args.data_dir
  config.parallel.rounds_per_epoch = args.rounds_per_epoch
  if args.num_train:  # Keep about 234 examples per block, as the full set does.
    config.parallel.num_blocks = max(8, args.num_train // 234 // args.rounds_per_epoch *
                                     args.rounds_per_epoch)
  config.eval_every_epochs = 10**6  # Evaluate once, after the last round.
  config.log_every_steps = 10**6
  config.parallel.engine = 'jax'  # The process jobs; _ray_job sets 'ray'.
  return config


# --- Worker (one per process) -------------------------------------------------------------------


def _worker(argv):
  parser = argparse.ArgumentParser()
  for name in ('mode', 'out', 'data_dir', 'coordinator_address'):
    parser.add_argument(f'--{name}', required=True)
  parser.add_argument('--slowdown', default='1,1,2,4')
  for name in ('epochs', 'rounds_per_epoch', 'num_processes', 'process_id'):
    parser.add_argument(f'--{name}', type=int, required=True)
  parser.add_argument('--num_train', type=int, default=0)
  args = parser.parse_args(argv)
  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.perfmodel import runs  # pylint: disable=g-import-not-at-top
  from pdcnno_jax import experiment  # pylint: disable=g-import-not-at-top

  config = _config(args)
  config.parallel.slowdown = args.slowdown
  results = {}
  with tempfile.TemporaryDirectory() as workdir:
    if args.mode == 'balancers':
      exp = experiment.setup(config, workdir)
      for balancer in _BALANCERS:
        run = config.copy_and_resolve_references()
        run.parallel.balancer = balancer
        results[balancer] = runs.train_mapreduce_once(exp, run)
    else:
      config.parallel.slowdown = ''
      config.parallel.balancer = 'equal'
      exp = experiment.setup(config, workdir)
      if args.num_train:
        exp.dataset = runs.subset_train(exp.dataset, args.num_train)
      results['equal'] = runs.train_mapreduce_once(exp, config)
    if exp.writer:
      exp.writer.close()
  if jax.process_index() == 0:
    with open(args.out, 'w') as f:
      json.dump(results, f)


# --- Driver ------------------------------------------------------------------------------------


def _launch(num_processes, mode, args, out_dir, slowdown='', cores_per_process=0):
  from pdcnno_jax import launch_local  # pylint: disable=g-import-not-at-top
  out = os.path.join(out_dir, f'{mode}_{num_processes}_{slowdown.replace(",", "_")}_'
                     f'{cores_per_process}.json')
  log = io.StringIO()
  load_before = os.getloadavg()
  start = time.perf_counter()
  code = launch_local.launch(
      num_processes,
      [f'--mode={mode}', f'--out={out}', f'--data_dir={args.data_dir}',
       f'--epochs={args.epochs}', f'--rounds_per_epoch={args.rounds_per_epoch}',
       f'--slowdown={slowdown}', f'--num_train={args.num_train}'],
      module='bench_mapreduce', devices_per_process=1, timeout_s=1800, stdout=log,
      cores_per_process=cores_per_process)
  wall = time.perf_counter() - start
  if code:
    sys.stdout.write(log.getvalue()[-8000:])
    raise SystemExit(f'{mode} job with {num_processes} processes failed (exit {code}).')
  pinning = f', {cores_per_process} core(s) each' if cores_per_process else ''
  print(f'  {mode} x{num_processes} (slowdown {slowdown or "none"}{pinning}): {wall:.0f} s end '
        'to end; '
        f'load average '
        f'{_load(load_before)} -> {_load(os.getloadavg())}', flush=True)
  with open(out) as f:
    return json.load(f)


def _load(values):
  return '/'.join(f'{v:.1f}' for v in values)


def _balancer_table(results, slowdown):
  import numpy as np  # pylint: disable=g-import-not-at-top
  mean_makespan = {b: float(np.mean([r['makespan_s'] for r in results[b]['rounds'][1:]]))
                   for b in _BALANCERS}
  print(f'\nBalancers, 4 workers with slowdowns [{slowdown}] (makespan = busy time of the '
        'slowest worker in a round; rounds 1.. averaged, round 0 is always equal):')
  # What the machine delivered: with the CPU shared, a sleeping (slowed) worker computes
  # faster when it runs, so the measured speeds can be closer together than the factors.
  speeds = np.array([r['speed'] for r in results['equal']['rounds']]).mean(axis=0)
  print(f'  measured slowdown of each worker under the equal split: '
        f'{np.round(speeds.max() / speeds, 2).tolist()}; the best makespan gain over equal '
        f'these speeds allow: {speeds.sum() / (len(speeds) * speeds.min()):.2f}x')
  print(f'{"balancer":>13} {"makespan_s":>10} {"vs prop":>8} {"equal/x":>8} {"entropy":>8} '
        f'{"test_acc":>8} {"d_acc_pp":>8} {"train_s":>8}  final blocks; makespan per round')
  for b in _BALANCERS:
    rounds = results[b]['rounds']
    acc = results[b]['test']['accuracy']
    print(f'{b:>13} {mean_makespan[b]:10.2f} '
          f'{mean_makespan[b] / mean_makespan["proportional"]:8.3f} '
          f'{mean_makespan["equal"] / mean_makespan[b]:8.2f} '
          f'{np.mean([r["entropy"] for r in rounds[1:]]):8.4f} {acc:8.4f} '
          f'{100 * (acc - results["equal"]["test"]["accuracy"]):+8.2f} '
          f'{results[b]["train_wall_s"]:8.1f}  {rounds[-1]["blocks"]}; '
          f'{[round(r["makespan_s"], 2) for r in rounds]}')
  return mean_makespan


def _ray_job(args) -> dict:
  """2 Ray worker actors of this process, no slowdown, equal split: the MapReduce report."""
  from pdcnno_jax import experiment  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.perfmodel import runs  # pylint: disable=g-import-not-at-top
  config = _config(args)
  config.parallel.update(engine='ray', num_workers=2, slowdown='', balancer='equal')
  load_before, start = os.getloadavg(), time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    exp = experiment.setup(config, workdir)
    if args.num_train:
      exp.dataset = runs.subset_train(exp.dataset, args.num_train)
    report = runs.train_mapreduce_once(exp, exp.config)
    exp.writer.close()
  print(f'  ray x2 actors: {time.perf_counter() - start:.0f} s end to end; load average '
        f'{_load(load_before)} -> {_load(os.getloadavg())}', flush=True)
  return report


def _engines_table(on_ray, on_jax):
  import numpy as np  # pylint: disable=g-import-not-at-top
  print('\nMapReduce engines, 2 workers, no slowdown, equal split (rounds 1.. averaged):')
  for name, report in (('ray', on_ray), ('jax', on_jax)):
    rounds = report['rounds'][1:] or report['rounds']
    line = (f'  {name}: round {np.mean([r["round_s"] for r in rounds]):.3f} s, makespan '
            f'{np.mean([r["makespan_s"] for r in rounds]):.3f} s, reduce '
            f'{np.mean([r["reduce_s"] for r in rounds]):.4f} s')
    if name == 'ray':
      transport = report['transport']
      line += (f', wait for the slowest Map {np.mean([r["wait_seconds"] for r in rounds]):.3f}'
               f' s, broadcast {np.mean([r["broadcast_s"] for r in rounds]):.4f} s; transport '
               f'{(transport["bytes_sent"] + transport["bytes_received"]) / 2**20:.1f} MiB in '
               f'{transport["transfer_seconds"]:.3f} s = {transport["mib_per_s"]:.0f} MiB/s '
               f'(per worker {[round(w["mib_per_s"]) for w in transport["workers"]]})')
    print(line + f'; test accuracy {report["test"]["accuracy"]:.4f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--rounds_per_epoch', type=int, default=4)
  parser.add_argument('--data_dir', default=os.path.join(_REPO, 'data', 'tfds'))
  parser.add_argument('--save_json', default='', help='also write every figure here')
  parser.add_argument('--slowdown', default='1,1,2,4', help='relative worker speeds')
  parser.add_argument(
      '--slowdown_scales', default='1,2',
      help='one balancers job per scale, with every factor multiplied by it: scale 1 is the '
      'issue\'s setting literally; on 2 cores four workers with factors 1, 1, 2, 4 need '
      '2.75 cores when balanced, so the fast workers share a core and the measured speeds '
      'flatten; scale 2 (2, 2, 4, 8: the same ratios) needs 1.4 cores and emulates the '
      'heterogeneous cluster faithfully')
  parser.add_argument('--engine', default='jax', choices=('jax', 'ray'),
                      help='ray: Ray actors next to the jax engine, 2 workers (see above)')
  parser.add_argument('--num_train', type=int, default=0,
                      help='train on the first N examples only (0: all)')
  parser.add_argument('--skip_balancers', action='store_true',
                      help='speed-up only (no balancer jobs)')
  parser.add_argument('--skip_speedup', action='store_true',
                      help='balancers only (no 1 vs 2 process speed-up)')
  args = parser.parse_args()
  os.environ['PYTHONPATH'] = os.pathsep.join(
      p for p in (_HERE, _REPO, os.environ.get('PYTHONPATH')) if p)
  print(f'bench_mapreduce: LeNet-5 / Fashion-MNIST, {args.epochs} epochs x '
        f'{args.rounds_per_epoch} rounds, {os.cpu_count()} CPU cores, load average '
        f'{_load(os.getloadavg())}', flush=True)
  if args.engine == 'ray':
    on_ray = _ray_job(args)
    with tempfile.TemporaryDirectory() as out_dir:
      on_jax = _launch(2, 'speedup', args, out_dir)['equal']
    _engines_table(on_ray, on_jax)
    print(f'load average at the end: {_load(os.getloadavg())}')
    return
  base = [float(f) for f in args.slowdown.split(',')]
  specs = [','.join(f'{f * float(scale):g}' for f in base)
           for scale in args.slowdown_scales.split(',')]
  with tempfile.TemporaryDirectory() as out_dir:
    balancers = {} if args.skip_balancers else {
        spec: _launch(4, 'balancers', args, out_dir, spec) for spec in specs}
    if not args.skip_speedup:
      single = _launch(1, 'speedup', args, out_dir)['equal']
      double = _launch(2, 'speedup', args, out_dir)['equal']
      single_pinned = _launch(1, 'speedup', args, out_dir, cores_per_process=1)['equal']
      double_pinned = _launch(2, 'speedup', args, out_dir, cores_per_process=1)['equal']
  if args.save_json:
    with open(args.save_json, 'w') as f:
      json.dump({'balancers': balancers,
                 **({} if args.skip_speedup else {
                     'single': single, 'double': double, 'single_pinned': single_pinned,
                     'double_pinned': double_pinned})}, f)
  for spec, results in balancers.items():
    _balancer_table(results, spec)
  if args.skip_speedup:
    print(f'load average at the end: {_load(os.getloadavg())}')
    return
  print('\nSpeed-up, no slowdown, equal split, same epochs (T = sum of round wall times):')
  for label, one, two in (
      ('unpinned (one process already uses both cores through XLA\'s thread pool)',
       single, double),
      ('pinned, 1 core per process (a process stands for a 1-core node)',
       single_pinned, double_pinned)):
    t1 = sum(r['round_s'] for r in one['rounds'])
    t2 = sum(r['round_s'] for r in two['rounds'])
    print(f'  {label}:')
    print(f'    T_1 = {t1:.1f} s (1 process), T_2 = {t2:.1f} s (2 processes): '
          f'T_1 / T_2 = {t1 / t2:.2f}; in-run estimate (2 processes) '
          f'{two["speedup"]["speedup"]:.2f} (T_1 from the fastest worker\'s throughput); test '
          f'accuracy {one["test"]["accuracy"]:.4f} vs {two["test"]["accuracy"]:.4f}')
  print(f'load average at the end: {_load(os.getloadavg())}')


if __name__ == '__main__':
  if '--mode' in ' '.join(sys.argv):
    _worker(sys.argv[1:])
  else:
    main()
