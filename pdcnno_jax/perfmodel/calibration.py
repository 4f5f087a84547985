"""Calibration and validation runs of the cluster model on this machine (pure Python).

Every run is compared at its steady state (`measured_s`; `startup_s` is the rest): sync, the
training steps without compilation; MapReduce, the rounds after the first; SSP, the rate of
its second half (`runs.ssp_steady_wall_s`, predicted the same way: `second_half_rate_s`).

Calibration (`calibration_runs`, `fit`; homogeneous: no slowdown, equal split, SSP s = 0):
per mode the step cost on one core at two batch sizes (affine: fixed + per example x batch;
MapReduce and SSP from the workers' busy time, i.e. the jitted step), dense and pruned; the
`sharing_efficiency` of a core two processes time-share (4-process runs: their busy time per
step against two single-core steps); and the framework constants per mode and process count,
the measured wall time minus the model's prediction without them: sync, per step (gloo's
all-reduce and the loop's host work), split with a half-length run into a constant per run
(gloo's set-up) and with a run at another batch into a part per local example; SSP, per
clock (host work outside step and transfers) plus each worker's measured transfer
(report.json ``transport``); MapReduce, measured directly as the median time a round spends
outside its Map (`round_overhead`: the Reduce, the all-gather, the balancer).

Validation (`validation_runs`, `predict_run`) uses other conditions: other batch sizes,
MapReduce with every balancer under slowdowns 1, 1, 2, 4, SSP with s = 0 and 3 under transient
stragglers (p = 0.1, 4x). Sync and MapReduce processes are pinned one core each
(launch_local --cores_per_process=1) and run XLA on one thread, as the SSP actors do: 1 and
2 processes are one and two real nodes; 4 share the 2 cores two by two, which the model
simulates (processor sharing, `LOCAL_SLEEPER_CREDIT_S`: a slowdown's sleep is wall time, not
core time; `engine.pinned`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pdcnno_jax.perfmodel import engine
from pdcnno_jax.perfmodel import model

PRUNED_WIDTHS = (3, 8)  # LeNet-5 conv widths (6, 16) with half of every layer's maps pruned.
LOCAL_NETWORK = model.Network(latency_s=0.0, bandwidth_bytes_per_s=1e30)
# How two processes pinned to one core share it (`engine.run`'s ``sleeper_credit_s``): None,
# processor sharing. Linux's EEVDF scheduler (6.6 on; this machine runs 6.18) places a waking
# task at the lag it slept with, without CFS's sleeper bonus, so a worker waking from a
# slowdown's sleep shares the core equally with a computing partner. Measured (`--validate
# --repeats=3`, median): a 6 ms credit under-predicted the 4-process MapReduce runs under
# slowdowns 1,1,2,4 by 4-26% and SSP s = 3 by 30%; processor sharing is within 7% of all five.
LOCAL_SLEEPER_CREDIT_S = None
TRANSIENT = {'parallel.straggler_probability': 0.1, 'parallel.straggler_factor': 4.0}
BALANCER_NAMES = ('equal', 'proportional', 'lbrla', 'dlbpce')
# Multi-process sync calibration at a second global batch (batch, epochs), so the step's
# framework cost is split into a part per step and one per local example.
OTHER_SYNC_BATCH = {2: (32, 0.25), 4: (512, 1)}
STARTUP_ROUNDS = 1  # MapReduce rounds left out of the compared wall time (`measured_s`).


def _sizes(quick: bool) -> dict[str, int]:
  return {'train_subset': 8192 if quick else 32768, 'num_blocks': 32 if quick else 64}


def _run(name, mode, processes, batch, sizes, epochs=1, **overrides):
  spec = {'name': name, 'mode': mode, 'processes': processes,
          'train_subset': sizes['train_subset'],
          'overrides': {'num_epochs': epochs, 'data.batch_size': batch, **overrides}}
  if mode == 'mapreduce':
    spec['overrides'].update({'parallel.mode': 'mapreduce', 'parallel.num_blocks':
                              sizes['num_blocks'], 'parallel.rounds_per_epoch': 4})
  if mode == 'ssp':
    spec['overrides'].setdefault('parallel.staleness', 0)
  return spec


def calibration_runs(quick: bool) -> list[dict[str, Any]]:
  """The calibration runs (see the module docstring)."""
  z = _sizes(quick)
  runs = []
  for mode in ('sync', 'mapreduce', 'ssp'):
    for batch in (32, 128):
      runs.append(_run(f'cal_{mode}_p1_b{batch}', mode, 1, batch, z))
  for batch in (32, 128):
    pruned = _run(f'cal_sync_p1_b{batch}_pruned', 'sync', 1, batch, z)
    pruned['conv_widths'] = list(PRUNED_WIDTHS)
    runs.append(pruned)
  for p in (2, 4):
    for mode in ('sync', 'mapreduce', 'ssp'):
      runs.append(_run(f'cal_{mode}_p{p}', mode, p, 128, z))
    runs.append(_run(f'cal_sync_p{p}_half', 'sync', p, 128, z, epochs=0.5))
    batch, epochs = OTHER_SYNC_BATCH[p]
    runs.append(_run(f'cal_sync_p{p}_b{batch}', 'sync', p, batch, z, epochs=epochs))
  return runs


def validation_runs(quick: bool) -> list[dict[str, Any]]:
  """The validation runs (see the module docstring)."""
  z = _sizes(quick)
  runs = [_run('val_sync_p1_b64', 'sync', 1, 64, z),
          _run('val_mapreduce_p1_b64', 'mapreduce', 1, 64, z),
          _run('val_ssp_p1_s0_transient', 'ssp', 1, 128, z, **TRANSIENT),
          _run('val_sync_p2_b64', 'sync', 2, 64, z),
          _run('val_mapreduce_p2_proportional_1_2', 'mapreduce', 2, 128, z,
               **{'parallel.balancer': 'proportional', 'parallel.slowdown': '1,2'})]
  for s in (0, 3):
    runs.append(_run(f'val_ssp_p2_s{s}_transient', 'ssp', 2, 128, z,
                     **{'parallel.staleness': s, **TRANSIENT}))
  runs.append(_run('val_sync_p4_b256', 'sync', 4, 256, z))
  for balancer in BALANCER_NAMES:
    runs.append(_run(f'val_mapreduce_p4_{balancer}_1_1_2_4', 'mapreduce', 4, 128, z, epochs=2,
                     **{'parallel.balancer': balancer, 'parallel.slowdown': '1,1,2,4'}))
  for s in (0, 3):
    runs.append(_run(f'val_ssp_p4_s{s}_transient', 'ssp', 4, 128, z,
                     **{'parallel.staleness': s, **TRANSIENT}))
  return runs


REPEAT_SEPARATOR = '~r'  # A repeat's run name: '<name>~r<k>' (k >= 1; repeat 0 keeps '<name>').


def repeated(specs: list[dict[str, Any]], repeats: int) -> list[list[dict[str, Any]]]:
  """``repeats`` copies of ``specs``, one list per repeat, each run named apart.

  The copies run one repeat after another (every configuration once, then again), so a slow
  spell of the machine falls on all configurations of a repeat rather than on all repeats of
  one configuration.
  """
  if repeats < 1:
    raise ValueError(f'--repeats={repeats}: give at least 1.')
  return [[dict(s, name=s['name'] + (f'{REPEAT_SEPARATOR}{k}' if k else '')) for s in specs]
          for k in range(repeats)]


def base_name(name: str) -> str:
  """The configuration's name of a repeat's run name (`repeated`)."""
  return name.split(REPEAT_SEPARATOR)[0]


def median_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per configuration, its repeat of median `measured_s` (the lower median of an even count).

  Each returned run carries its configuration's name and ``repeats_measured_s``, the measured
  seconds of every repeat, in the order of the configurations' first appearance.
  """
  groups: dict[str, list[dict[str, Any]]] = {}
  for result in results:
    groups.setdefault(base_name(result['name']), []).append(result)
  chosen = []
  for name, group in groups.items():
    median = _lower_median(sorted(group, key=measured_s))
    chosen.append({**median, 'name': name, 'spec': {**median['spec'], 'name': name},
                   'repeats_measured_s': [measured_s(r) for r in group]})
  return chosen


def _lower_median(ordered: list[Any]) -> Any:
  return ordered[(len(ordered) - 1) // 2]


def spread(values: list[float]) -> float:
  """(max - min) / median of a configuration's repeated measurements (0 for one)."""
  values = sorted(values)
  return (values[-1] - values[0]) / _lower_median(values)


# ----------------------------------------------------------------------------------------------
# Fitting.


def _affine(points: list[tuple[int, float]]) -> tuple[float, float]:
  """(fixed, per_example) of seconds = fixed + per_example * batch through the points."""
  b = np.array([p[0] for p in points], np.float64)
  t = np.array([p[1] for p in points], np.float64)
  per_example, fixed = np.polyfit(b, t, 1)
  if fixed < 0 or per_example <= 0:  # Noise: least squares through the origin instead.
    return 0.0, max(float(np.dot(b, t) / np.dot(b, b)), 1e-12)
  return float(fixed), float(per_example)


def measured_s(result: dict[str, Any]) -> float:
  """The wall time a run is compared on: its steady state, start-up left out.

  MapReduce: the rounds after the first (the first one runs each jitted piece for the first
  time after its warm-up); SSP: the rate of the second half (`runs.ssp_steady_wall_s`); sync:
  the job's training steps without compilation. `startup_s` is the rest.
  """
  if result['mode'] == 'mapreduce':
    rounds = result['report']['rounds']
    return float(sum(r['round_s'] for r in rounds[STARTUP_ROUNDS:] or rounds))
  return float(result['measured_s'])


def startup_s(result: dict[str, Any]) -> float:
  """Seconds of a run's training loop that `measured_s` leaves out (start-up, first round)."""
  if result['mode'] == 'ssp':
    return float(result['report']['per_worker'][0]['loop_s'] - measured_s(result))
  return float(result['measured_s'] - measured_s(result))


def _step_seconds(result: dict[str, Any]) -> tuple[int, float]:
  """(local batch, seconds per step) of a single-process calibration run."""
  spec, report = result['spec'], result['report']
  batch = spec['overrides']['data.batch_size']
  if result['mode'] == 'sync':
    return batch, measured_s(result) / report['steps']
  if result['mode'] == 'mapreduce':
    rounds = report['rounds']
    return batch, sum(sum(r['busy_s']) for r in rounds) / sum(sum(r['steps']) for r in rounds)
  row = report['per_worker'][0]
  return batch, row['busy_s'] / max(row['steps'], 1)


def units(result: dict[str, Any]) -> int:
  """Steps (sync, SSP clocks) or rounds (MapReduce) the per-mode constant is charged on."""
  report = result['report']
  if result['mode'] == 'sync':
    return report['steps']
  if result['mode'] == 'mapreduce':
    return len(report['rounds'])
  return report['clocks']


def capacity(result: dict[str, Any], num_cores: int) -> float:
  """Cores' worth of one core this run had: process 0's `core_share` times the processes
  pinned with it (they probed at the same moment and split the core), at most 1. An SSP run's
  probe is its one driver process, after the actors ended."""
  share = result.get('core_share')
  if share is None:
    return 1.0
  on_core = (1 if result['mode'] == 'ssp'
             else len(range(0, result['spec']['processes'], num_cores)))
  return float(min(1.0, max(share * on_core, 1e-3)))


def _normalised_step(result: dict[str, Any], num_cores: int) -> tuple[int, float]:
  batch, seconds = _step_seconds(result)
  return batch, seconds * capacity(result, num_cores)


def fit(results: list[dict[str, Any]], num_cores: int) -> dict[str, Any]:
  """Calibration figures from the results of `calibration_runs`.

  Seconds are normalised to a whole core: a run that had a share c of its core (`capacity`)
  counts its step and framework seconds times c; `predict_run` divides by the share of the run
  it predicts.
  """
  by_name = {r['name']: r for r in results}
  costs = {}
  for mode in ('sync', 'mapreduce', 'ssp'):
    fixed, per_example = _affine([_normalised_step(by_name[f'cal_{mode}_p1_b{b}'], num_cores)
                                  for b in (32, 128)])
    costs[mode] = {'per_example_s': per_example, 'fixed_s': fixed, 'host_s': 0.0}
  fixed, per_example = _affine([_normalised_step(by_name[f'cal_sync_p1_b{b}_pruned'],
                                                 num_cores) for b in (32, 128)])
  calib = {'num_cores': num_cores, 'costs': costs,
           'pruned_sync_cost': {'per_example_s': per_example, 'fixed_s': fixed, 'host_s': 0.0},
           'param_bytes': by_name['cal_sync_p1_b128']['param_bytes'],
           'pruned_param_bytes': by_name['cal_sync_p1_b128_pruned']['param_bytes'],
           'pruned_conv_widths': list(PRUNED_WIDTHS), 'overhead_s': {},
           'overhead_per_example_s': {}, 'run_overhead_s': {}, 'transfer_s': {'ssp': {}}}
  calib['sharing_efficiency'] = {
      mode: sharing_efficiency(by_name[f'cal_{mode}_p4'], cost_of(calib, mode), num_cores)
      for mode in ('mapreduce', 'ssp')}
  # Sync reports no per-worker busy time; its processes are MapReduce's (same launch, XLA).
  calib['sharing_efficiency']['sync'] = calib['sharing_efficiency']['mapreduce']
  for p in (1, 2, 4):
    result = by_name[f'cal_ssp_p{p}' if p > 1 else 'cal_ssp_p1_b128']
    calib['transfer_s']['ssp'][str(p)] = transfer_per_clock(result) * capacity(result,
                                                                                num_cores)
  for mode in ('sync', 'mapreduce', 'ssp'):
    calib['overhead_s'][mode] = {}
    for p in (1, 2, 4):
      name = f'cal_{mode}_p{p}' if p > 1 else f'cal_{mode}_p1_b128'
      result = by_name[name]
      share = capacity(result, num_cores)
      if mode == 'mapreduce':  # The rounds time their own Reduce, gather and balancer.
        calib['overhead_s'][mode][str(p)] = round_overhead(result) * share
        continue
      others = [by_name.get(f'{name}_half')]
      if mode == 'sync' and p in OTHER_SYNC_BATCH:
        others.append(by_name.get(f'{name}_b{OTHER_SYNC_BATCH[p][0]}'))
      per_unit, per_example, per_run = _residual_fit(
          [r for r in (result, *others) if r is not None], calib, share)
      calib['overhead_s'][mode][str(p)] = per_unit * share
      if per_example:
        calib['overhead_per_example_s'].setdefault(mode, {})[str(p)] = per_example * share
      if per_run:
        calib['run_overhead_s'].setdefault(mode, {})[str(p)] = per_run * share
  return calib


def sharing_efficiency(result: dict[str, Any], cost: model.StepCost, num_cores: int) -> float:
  """Share of a core that workers time-sharing it get in all (`engine.run`), from a
  homogeneous run of more workers than cores that compute together (no slowdown, SSP s = 0).

  k workers on a core each take k x cost.device_s(local batch) per step if sharing lost
  nothing; the efficiency is that over their measured busy seconds per step (MapReduce: the
  rounds after the first; SSP: every clock), at most 1.
  """
  p = result['spec']['processes']
  per_core = p / num_cores
  if per_core <= 1:
    return 1.0
  local = result['spec']['overrides']['data.batch_size'] // p
  report = result['report']
  if result['mode'] == 'mapreduce':
    rounds = report['rounds'][STARTUP_ROUNDS:] or report['rounds']
    busy = sum(sum(r['busy_s']) for r in rounds) / sum(sum(r['steps']) for r in rounds)
  else:
    busy = (sum(w['busy_s'] for w in report['per_worker'])
            / sum(max(w['steps'], 1) for w in report['per_worker']))
  busy *= capacity(result, num_cores)
  return float(min(1.0, per_core * cost.device_s(local) / max(busy, 1e-12)))


def _residual_fit(results: list[dict[str, Any]], calib: dict[str, Any],
                  share: float) -> tuple[float, float, float]:
  """(per step, per local example and step, per run) seconds of measured wall time the model
  does not explain.

  One run gives a per-step constant; with a second run of another length (``_half``) the
  residual is split into a constant per run (e.g. gloo's connection set-up on the first
  collective) and one per step; with a third of another local batch, the per-step part is
  split again into a constant and a part per local example (least squares, parts >= 0).
  """
  rows, residuals = [], []
  for result in results:
    bare = predict_run(result['spec'], {**calib, 'overhead_s': {}, 'run_overhead_s': {},
                                        'overhead_per_example_s': {}},
                       overhead=False, capacity=share)
    o = result['spec']['overrides']
    steps = max(units(result), 1)
    rows.append([steps, steps * (o['data.batch_size'] // result['spec']['processes']), 1.0])
    residuals.append(measured_s(result) - bare)
  a, r = np.array(rows, np.float64), np.array(residuals, np.float64)
  keep = [0]  # Unknowns the runs tell apart: per step always, per example, per run.
  if len({row[1] / row[0] for row in rows}) > 1:
    keep.append(1)
  if len({row[0] for row in rows}) > 1 and len(rows) > len(keep):
    keep.append(2)
  while True:
    x = np.zeros(3)
    x[keep] = np.linalg.lstsq(a[:, keep], r, rcond=None)[0]
    negative = [k for k in keep[1:] if x[k] < 0]
    if not negative:
      return max(float(x[0]), 0.0), float(x[1]), float(x[2])
    keep.remove(negative[0])


def transfer_per_clock(result: dict[str, Any]) -> float:
  """Mean seconds per clock a worker of an SSP run spent in transfers (report.json
  ``ssp.transport``: each worker's ``transfer_seconds``, its waits excluded, over the clocks)."""
  transport = result['report']['transport']
  return float(np.mean([w['transfer_seconds'] for w in transport['workers']])
               / max(transport['clocks'], 1))


def round_overhead(result: dict[str, Any]) -> float:
  """Median seconds a MapReduce round spends outside its Map (round time - makespan).

  Measured round by round, this excludes what a whole-run residual would wrongly charge per
  round: the first round's warm-up and the extra time processes sharing a core take when none
  of them sleeps (a slowdown's sleep leaves the core to the others).
  """
  rounds = result['report']['rounds']
  return float(np.median([max(r['round_s'] - r['makespan_s'], 0.0) for r in rounds]))


# ----------------------------------------------------------------------------------------------
# Prediction of a local run.


def second_half_rate_s(clock_s: list[float], half: int) -> float:
  """Wall time of a run at the rate of its second half, as `runs.ssp_steady_wall_s` times
  the real one: worker 0's clocks ``half`` .. the last, scaled to every clock."""
  clocks = len(clock_s)
  if clocks <= half:
    return clock_s[-1] if clock_s else 0.0
  return clocks * (clock_s[-1] - clock_s[half - 1]) / (clocks - half)


def cost_of(calib: dict[str, Any], mode: str) -> model.StepCost:
  return model.StepCost(**calib['costs'][mode])


def local_cluster(spec: dict[str, Any], num_cores: int, share: float = 1.0,
                  efficiency: float = 1.0) -> model.Cluster:
  """The cluster a local run stands for: pinned processes, slowdown.py's stragglers,
  `share` of every core (the rest taken by other jobs on a shared machine), and the
  `sharing_efficiency` of a time-shared core."""
  o = spec['overrides']
  p = spec['processes']
  spec_text = o.get('parallel.slowdown', '')
  factors = tuple(float(f) for f in spec_text.split(',')) if spec_text else (1.0,) * p
  strag = model.Stragglers(factors, o.get('parallel.straggler_probability', 0.0),
                           o.get('parallel.straggler_factor', 1.0), seed=0)
  groups, cores = engine.pinned(p, num_cores)
  return model.Cluster((1.0,) * p, LOCAL_NETWORK, strag, tuple(groups),
                       tuple(c * share for c in cores), LOCAL_SLEEPER_CREDIT_S, efficiency)


def predict_run(spec: dict[str, Any], calib: dict[str, Any], *, overhead: bool = True,
                capacity: float = 1.0) -> float:
  """The model's wall time of one local run (calibration or validation spec).

  Args:
    spec: the run.
    calib: `fit`'s figures.
    overhead: add the per-mode framework constants (the measured SSP transfer is always
      charged).
    capacity: share of each core the run had (`capacity`; 1 on a quiet machine).
  """
  o = spec['overrides']
  p, mode = spec['processes'], spec['mode']
  cluster = local_cluster(spec, calib['num_cores'], capacity,
                          calib.get('sharing_efficiency', {}).get(mode, 1.0))
  cost = cost_of(calib, mode)
  local = o['data.batch_size'] // p
  extra = (calib['overhead_s'].get(mode, {}).get(str(p), 0.0)
           + local * calib.get('overhead_per_example_s', {}).get(mode, {}).get(str(p), 0.0)
           ) / capacity if overhead else 0.0
  once = (calib.get('run_overhead_s', {}).get(mode, {}).get(str(p), 0.0) / capacity
          if overhead else 0.0)
  n = spec['train_subset']
  steps = int(round(o['num_epochs'] * (n // o['data.batch_size'])))
  if mode == 'sync':
    return once + model.simulate_sync(cost, cluster, local_batch=local, steps=steps,
                                      param_bytes=0.0, overhead_s=extra).wall_s
  if mode == 'ssp':
    staleness = o.get('parallel.staleness', 0)
    extra += calib.get('transfer_s', {}).get('ssp', {}).get(str(p), 0.0) / capacity
    result = model.simulate_ssp(cost, cluster, local_batch=local, clocks=steps,
                                staleness=None if staleness < 0 else staleness,
                                param_bytes=0.0, overhead_s=extra)
    return once + second_half_rate_s(result.clock_s[0], (steps + 1) // 2)
  rounds = model.simulate_mapreduce(
      cost, cluster, num_examples=n, num_blocks=o['parallel.num_blocks'],
      rounds_per_epoch=o['parallel.rounds_per_epoch'], epochs=o['num_epochs'],
      local_batch=local, param_bytes=0.0, balancer=o.get('parallel.balancer', 'equal'),
      overhead_s=extra).rounds
  return sum(r['round_s'] for r in rounds[STARTUP_ROUNDS:] or rounds)


def load(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(
        f'No calibration at {path}; run `python -m pdcnno_jax.perfmodel --calibrate '
        f'--calibration_file={path}` first.') from None
