"""Tests of the cluster model on cases with known answers (pure NumPy, no JAX)."""

import math
import subprocess
import sys

import numpy as np
import pytest

from pdcnno_jax.parallel import balancers
from pdcnno_jax.perfmodel import calibration
from pdcnno_jax.perfmodel import cli
from pdcnno_jax.perfmodel import engine
from pdcnno_jax.perfmodel import model
from pdcnno_jax.perfmodel import predict

COST = model.StepCost(per_example_s=1e-3, fixed_s=2e-3, host_s=1e-3)
NET = model.Network(latency_s=1e-4, bandwidth_bytes_per_s=1e8)


def test_engine_processor_sharing():
  # Two workers of 1 s of CPU on one core finish together at 2 s; a sleeper frees the core.
  def cpu(work):
    yield ('cpu', work)

  traces = engine.run([cpu(1.0), cpu(1.0)], [0, 0], [1.0])
  assert [t.finish_s for t in traces] == pytest.approx([2.0, 2.0])

  def sleeper():
    yield ('sleep', 1.0)
    yield ('cpu', 1.0)

  traces = engine.run([cpu(1.0), sleeper()], [0, 0], [1.0])
  assert [t.finish_s for t in traces] == pytest.approx([1.0, 2.0])


def _cpu(work):
  yield ('cpu', work)


def _duty(compute, sleep, steps):
  for _ in range(steps):
    yield ('cpu', compute)
    yield ('sleep', sleep)


@pytest.mark.parametrize('credit', [None, 0.0, 0.5, math.inf])
def test_engine_sleep_is_wall_time_not_core_time(credit):
  # A sleeping worker leaves the core to the other under every policy; two computing workers
  # share it equally.
  traces = engine.run([_cpu(4.0), _duty(0.0, 10.0, 1)], [0, 0], [1.0], sleeper_credit_s=credit)
  assert [t.finish_s for t in traces] == pytest.approx([4.0, 10.0])
  traces = engine.run([_cpu(1.0), _cpu(1.0)], [0, 0], [1.0], sleeper_credit_s=credit)
  assert [t.finish_s for t in traces] == pytest.approx([2.0, 2.0])


@pytest.mark.parametrize('credit, finish', [(None, 15.0), (0.0, 15.0), (0.5, 14.0),
                                            (math.inf, 13.0)])
def test_engine_fair_sharing_gives_a_waking_sleeper_its_credit(credit, finish):
  # A computes 12 s; B computes 1 s and sleeps 3 s, three times, on the same core. Processor
  # sharing halves B's compute every time (2 s each); fair sharing with unbounded credit runs
  # B at full speed after its first (shared) step: 2 + 3 + (1 + 3) x 2 = 13 s. With 0.5 s of
  # credit B runs 0.5 s alone, then shares: 2 + 3 + (1.5 + 3) x 2 = 14 s. The core never
  # idles while A computes: A ends at 15 s either way.
  traces = engine.run([_cpu(12.0), _duty(1.0, 3.0, 3)], [0, 0], [1.0],
                      sleeper_credit_s=credit)
  assert [t.finish_s for t in traces] == pytest.approx([15.0, finish])
  assert traces[1].cpu_s == pytest.approx(finish - 9.0)


def test_local_runs_share_cores_as_measured_and_cluster_predictions_carry_no_local_constant():
  spec = calibration.validation_runs(quick=True)[-3]
  assert calibration.local_cluster(spec, 2).sleeper_credit_s == (
      calibration.LOCAL_SLEEPER_CREDIT_S)
  cost = {'per_example_s': 2e-4, 'fixed_s': 1e-3, 'host_s': 0.0}
  calib = {'costs': {m: cost for m in model.MODES}, 'pruned_sync_cost': cost,
           'param_bytes': 2.5e5, 'pruned_param_bytes': 1e5,
           'overhead_s': {m: {'1': 0.0, '2': 0.0, '4': 0.0} for m in model.MODES},
           'run_overhead_s': {}}
  heavy = {**calib, 'overhead_s': {m: {'1': 5.0, '2': 5.0, '4': 5.0} for m in model.MODES},
           'run_overhead_s': {'sync': {'2': 9.0, '4': 9.0}}}
  kw = dict(num_examples=2048, device_speedups=(1.0,))
  assert cli.predictions(heavy, **kw) == cli.predictions(calib, **kw)


def test_time_shared_cores_lose_the_sharing_efficiency_only_while_shared():
  # Two workers of 1 s on one core at efficiency 0.5: each gets a quarter core, both end at
  # 4 s. Alone (or one a core) nothing is lost, under either scheduling policy.
  for credit in (None, calibration.LOCAL_SLEEPER_CREDIT_S):
    traces = engine.run([_cpu(1.0), _cpu(1.0)], [0, 0], [1.0], sleeper_credit_s=credit,
                        sharing_efficiency=0.5)
    assert [t.finish_s for t in traces] == pytest.approx([4.0, 4.0])
    traces = engine.run([_cpu(1.0), _cpu(3.0)], [0, 1], [1.0, 1.0], sleeper_credit_s=credit,
                        sharing_efficiency=0.5)
    assert [t.finish_s for t in traces] == pytest.approx([1.0, 3.0])
  # Shared for the first 4 s (1 s of work each), then the second runs alone: 4 + 2 s.
  traces = engine.run([_cpu(1.0), _cpu(3.0)], [0, 0], [1.0], sharing_efficiency=0.5)
  assert [t.finish_s for t in traces] == pytest.approx([4.0, 6.0])


def test_engine_deadlock_is_an_error():
  def stuck():
    yield ('until', lambda: False)

  with pytest.raises(RuntimeError, match='Deadlock'):
    engine.run([stuck()], [0], [1.0])


@pytest.mark.parametrize('topology', model.TOPOLOGIES)
@pytest.mark.parametrize('n', [1, 2, 5])
def test_homogeneous_bsp_is_compute_plus_communication(topology, n):
  network = model.Network(NET.latency_s, NET.bandwidth_bytes_per_s, topology)
  cluster = model.Cluster((1.0,) * n, network)
  kwargs = dict(local_batch=16, steps=7, param_bytes=4e5, overhead_s=3e-4)
  sim = model.simulate_sync(COST, cluster, **kwargs)
  if topology == 'ring':
    comm = 2 * (n - 1) * (1e-4 + 4e5 / n / 1e8)
  else:  # One server: n pushes and n pulls of 4e5 bytes through its link.
    comm = 2 * (1e-4 + n * 4e5 / 1e8)
  expected = 7 * (COST.host_s + COST.device_s(16) + (comm if n > 1 else 0.0) + 3e-4)
  assert sim.wall_s == pytest.approx(expected)
  assert model.sync_closed_form(COST, cluster, **kwargs) == pytest.approx(sim.wall_s)


def test_ssp_s0_equals_sync_with_the_same_communication():
  cluster = model.Cluster((1.0, 0.5, 2.0), NET,
                          model.Stragglers((1.0, 1.0, 1.0), 0.2, 4.0, seed=3))
  ssp = model.simulate_ssp(COST, cluster, local_batch=8, clocks=20, staleness=0,
                           param_bytes=1e5)
  sync = model.simulate_sync(COST, cluster, local_batch=8, steps=20, param_bytes=1e5)
  assert ssp.wall_s == pytest.approx(sync.wall_s)


def test_asp_without_communication_runs_at_the_fastest_pace():
  speeds = (1.0, 0.5, 0.25)
  cluster = model.Cluster(speeds, model.Network(0.0, 1e30))
  result = model.simulate_ssp(COST, cluster, local_batch=8, clocks=50, staleness=None,
                              param_bytes=0.0)
  per_step = COST.host_s + COST.device_s(8)
  assert result.wall_s == pytest.approx(50 * per_step / min(speeds))
  assert result.wait_s == pytest.approx([0.0, 0.0, 0.0])
  # The fastest worker never waits: its 50 clocks take 50 of its own steps.
  assert result.busy_s[0] == pytest.approx(50 * per_step)


@pytest.mark.parametrize('staleness', [0, 1, 3])
def test_persistent_straggler_sets_the_ssp_pace(staleness):
  # A worker 4x slower than the others: the fast ones block, so every worker ends within s
  # clocks of it, and the job's time is the straggler's own time (the SSP bound).
  per_step = COST.host_s + COST.device_s(8)
  factors = (1.0, 1.0, 1.0, 4.0)
  cluster = model.Cluster((1.0,) * 4, model.Network(0.0, 1e30), model.Stragglers(factors))
  clocks = 40
  result = model.simulate_ssp(COST, cluster, local_batch=8, clocks=clocks,
                              staleness=staleness, param_bytes=0.0)
  slow_step = COST.host_s + 4 * COST.device_s(8)
  assert result.wall_s == pytest.approx(clocks * slow_step)
  # The fast workers spend the difference waiting, minus at most s clocks of slack.
  fast_wait = result.wait_s[0]
  assert fast_wait == pytest.approx(clocks * slow_step - clocks * per_step, rel=0, abs=(
      (staleness + 1) * slow_step + 1e-9))
  assert fast_wait > 0


def test_transient_stragglers_follow_slowdown_draws():
  # Same generator and one draw per step as parallel/slowdown.py's Slowdown.next_factor.
  strag = model.Stragglers((1.0, 2.0), 0.3, 4.0, seed=7)
  rng = np.random.default_rng(np.random.SeedSequence([7, 1]))
  expected = [2.0 * (4.0 if rng.random() < 0.3 else 1.0) for _ in range(50)]
  draws = strag.draws(1)
  assert [next(draws) for _ in range(50)] == expected


@pytest.mark.parametrize('name', sorted(balancers.BALANCERS))
def test_mapreduce_makespan_is_the_balancers_own_figure(name):
  # Device work only: a worker's busy time for b blocks is b * block_time_k, so each round's
  # simulated makespan must equal balancers.makespan(blocks, speed in blocks per second).
  cost = model.StepCost(per_example_s=1e-3)
  speeds = (1.0, 1.0, 0.5, 0.25)
  cluster = model.Cluster(speeds, model.Network(0.0, 1e30))
  result = model.simulate_mapreduce(cost, cluster, num_examples=64 * 32, num_blocks=64,
                                    rounds_per_epoch=2, epochs=2, local_batch=16,
                                    param_bytes=0.0, balancer=name)
  block_speed = np.asarray(speeds) / (32 * 1e-3)  # blocks per second
  for r in result.rounds:
    assert r['makespan_s'] == pytest.approx(balancers.makespan(r['blocks'], block_speed))
    assert r['map_s'] == pytest.approx(r['makespan_s'])
  assert result.wall_s == pytest.approx(sum(r['round_s'] for r in result.rounds))
  # From round 1 on the balancer sees the true speeds; the proportional optimum is the bar.
  if name != 'equal':
    best = balancers.makespan(balancers.proportional(32, balancers.WorkerStats(block_speed)),
                              block_speed)
    assert result.rounds[-1]['makespan_s'] <= 1.1 * best


def test_mapreduce_reduce_is_one_transfer_per_round():
  cluster = model.Cluster((1.0, 1.0), NET)
  kw = dict(num_examples=1024, num_blocks=8, rounds_per_epoch=4, epochs=1, local_batch=32)
  with_net = model.simulate_mapreduce(COST, cluster, param_bytes=1e6, overhead_s=0.01, **kw)
  without = model.simulate_mapreduce(COST, model.Cluster((1.0, 1.0), model.Network(0.0, 1e30)),
                                     param_bytes=0.0, **kw)
  assert with_net.wall_s - without.wall_s == pytest.approx(
      4 * (NET.allreduce_s(1e6, 2) + 0.01))


def test_time_shared_cores_halve_the_speed():
  cost = model.StepCost(per_example_s=1e-3)
  shared = model.Cluster((1.0,) * 4, model.Network(0.0, 1e30), groups=(0, 1, 0, 1),
                         cores=(1.0, 1.0))
  own = model.Cluster((1.0,) * 4, model.Network(0.0, 1e30))
  kw = dict(local_batch=8, steps=10, param_bytes=0.0)
  assert model.simulate_sync(cost, shared, **kw).wall_s == pytest.approx(
      2 * model.simulate_sync(cost, own, **kw).wall_s)


@pytest.mark.parametrize('mode', model.MODES)
def test_speedup_above_n_needs_a_heavier_baseline(mode):
  nodes = (1, 2, 4, 8)
  free = model.Network(0.0, 1e30)
  kw = dict(speeds=lambda n: (1.0,) * n, nodes=nodes, num_examples=8192, local_batch=32,
            balancer='proportional', staleness=2)
  # Same model on both sides, free network: exactly N; a real network: at most N.
  assert predict.speedup_curve(mode, COST, COST, network=free, param_bytes=0.0,
                               **kw) == pytest.approx(nodes)
  curve = predict.speedup_curve(mode, COST, COST, network=NET, param_bytes=1e5, **kw)
  assert all(s <= n + 1e-9 for n, s in zip(nodes, curve))
  assert curve[-1] < nodes[-1]
  # A serial baseline twice as expensive per example (unpruned vs pruned) allows up to 2N.
  heavy = model.StepCost(2 * COST.per_example_s, 2 * COST.fixed_s, 2 * COST.host_s)
  assert predict.speedup_curve(mode, heavy, COST, network=free, param_bytes=0.0,
                               **kw) == pytest.approx([2 * n for n in nodes])


def test_perfmodel_imports_no_jax():
  code = ('import sys; import pdcnno_jax.perfmodel.model, pdcnno_jax.perfmodel.predict, '
          'pdcnno_jax.perfmodel.calibration, pdcnno_jax.perfmodel.cli; '
          'assert "jax" not in sys.modules, sorted(m for m in sys.modules if "jax" in m)')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match='topology'):
    model.Network(topology='mesh')
  with pytest.raises(ValueError, match='speeds'):
    model.Cluster(())
  with pytest.raises(ValueError, match='slowdown factors'):
    model.Cluster((1.0, 1.0), stragglers=model.Stragglers((1.0,)))
  assert math.isfinite(NET.allreduce_s(1.0, 3))


def test_superlinear_check_uses_the_cost_ratio():
  pruned = model.StepCost(per_example_s=1e-3)
  fits = predict.superlinear_conditions(model.StepCost(per_example_s=1.5e-3), pruned, 32)
  assert fits['measured_cost_ratio_dense_over_pruned'] == pytest.approx(1.5)
  assert fits['fits']  # 7 task nodes x 1.5 = 10.5 >= 9.3.
  same = predict.superlinear_conditions(pruned, pruned, 32)
  assert not same['fits'] and same['bound_with_pruned_parallel'] == pytest.approx(8.0)


def _synthetic_results(truth, share):
  """What calibration_runs would measure if the machine were exactly the model `truth`."""
  results = []
  for spec in calibration.calibration_runs(quick=True):
    o, p = spec['overrides'], spec['processes']
    steps = int(o['num_epochs'] * (spec['train_subset'] // o['data.batch_size']))
    cost = model.StepCost(**(truth['pruned_sync_cost'] if spec.get('conv_widths')
                             else truth['costs'][spec['mode']]))
    busy = cost.device_s(o['data.batch_size'] // p) / share
    if p > 2:  # Two workers a core: each step takes two steps' core time, over the efficiency.
      busy *= (p / 2) / truth['sharing_efficiency'][spec['mode']]
    report = {'steps': steps, 'clocks': steps,
              'per_worker': [{'busy_s': steps * busy, 'steps': steps}]}
    if spec['mode'] == 'mapreduce':  # Rounds time themselves; the first one warms up.
      rounds = int(o['num_epochs'] * o['parallel.rounds_per_epoch'])
      outside = truth['overhead_s']['mapreduce'][str(p)] / share
      report['rounds'] = [{'busy_s': [busy * steps / rounds], 'steps': [steps / rounds],
                           'makespan_s': 1.0, 'round_s': 1.0 + outside + (0.5 if r == 0 else 0)}
                          for r in range(rounds)]
    if spec['mode'] == 'ssp':  # Each worker's transfers, as report.json's transport has them.
      per_clock = truth['transfer_s']['ssp'][str(p)] / share
      report['transport'] = {'clocks': steps,
                             'workers': [{'transfer_seconds': steps * per_clock}] * p}
    if spec.get('conv_widths'):
      measured = steps * busy
    else:
      measured = calibration.predict_run(spec, truth, capacity=share)
    results.append({'name': spec['name'], 'mode': spec['mode'], 'spec': spec,
                    'measured_s': measured, 'report': report, 'param_bytes': 1000,
                    # Process 0's probe: the processes pinned to its core split the share;
                    # SSP's probe is its one driver.
                    'core_share': (share if spec['mode'] == 'ssp'
                                   else share / len(range(0, p, 2)))})
  return results


@pytest.mark.parametrize('share', [1.0, 0.5])
def test_calibration_fit_recovers_the_model_it_was_measured_on(share):
  cost = {'per_example_s': 4e-4, 'fixed_s': 5e-3, 'host_s': 0.0}
  truth = {'num_cores': 2, 'costs': {m: cost for m in model.MODES},
           'pruned_sync_cost': {'per_example_s': 2e-4, 'fixed_s': 3e-3, 'host_s': 0.0},
           'overhead_s': {m: {'1': 0.0, '2': 0.01, '4': 0.03} for m in model.MODES},
           # gloo's set-up: once per sync run, told apart by the half-length runs.
           'run_overhead_s': {'sync': {'2': 0.4, '4': 0.7}},
           # The collective step's cost per local example, told apart by a second batch.
           'overhead_per_example_s': {'sync': {'2': 1e-4, '4': 3e-4}},
           'transfer_s': {'ssp': {'1': 0.002, '2': 0.003, '4': 0.005}},
           'sharing_efficiency': {'sync': 0.8, 'mapreduce': 0.8, 'ssp': 0.9}}
  calib = calibration.fit(_synthetic_results(truth, share), num_cores=2)
  assert calib['sharing_efficiency'] == pytest.approx(truth['sharing_efficiency'])
  for mode in model.MODES:
    assert calib['costs'][mode]['per_example_s'] == pytest.approx(4e-4)
    assert calib['costs'][mode]['fixed_s'] == pytest.approx(5e-3)
    for p in ('2', '4'):
      assert calib['overhead_s'][mode][p] == pytest.approx(truth['overhead_s'][mode][p],
                                                           abs=1e-9)
  for p in ('2', '4'):
    assert calib['run_overhead_s']['sync'][p] == pytest.approx(
        truth['run_overhead_s']['sync'][p])
  assert set(calib['run_overhead_s']) == {'sync'}
  assert calib['overhead_per_example_s'] == {
      'sync': pytest.approx(truth['overhead_per_example_s']['sync'])}
  assert calib['transfer_s']['ssp'] == pytest.approx(truth['transfer_s']['ssp'])
  assert calib['pruned_sync_cost']['per_example_s'] == pytest.approx(2e-4)
  for spec in calibration.validation_runs(quick=True):
    assert calibration.predict_run(spec, calib, capacity=share) == pytest.approx(
        calibration.predict_run(spec, truth, capacity=share))


def test_ssp_runs_are_timed_at_the_rate_of_their_second_half():
  from pdcnno_jax.perfmodel import runs  # pylint: disable=g-import-not-at-top
  # Worker 0 took 3 s to clock 5 (actor start-up, compilation), then 0.4 s per clock.
  report = {'clocks': 10, 'per_worker': [{'loop_s': 5.0}, {'loop_s': 4.0}],
            'accuracy_vs_time': [{'clock': 5, 'wall_s': 3.0}, {'clock': 10, 'wall_s': 5.2}]}
  assert runs.ssp_steady_wall_s(report, 5) == pytest.approx(4.0)


def test_ssp_prediction_is_timed_like_the_run_at_its_second_half_rate():
  # Worker 0 publishes its clocks at these times; the second half (clocks 4..6) runs at
  # 2.5 s per clock, so the steady wall time of 6 clocks is 15 s, whatever the first half took.
  assert calibration.second_half_rate_s([1.0, 2.0, 3.0, 4.0, 6.0, 8.5], 3) == pytest.approx(
      6 * (8.5 - 3.0) / 3)
  # A lone worker without communication publishes clock c + 1 at (c + 1) x its step time.
  cluster = model.Cluster((1.0,))
  result = model.simulate_ssp(COST, cluster, local_batch=8, clocks=6, staleness=0,
                              param_bytes=0.0)
  step = COST.host_s + COST.device_s(8)
  assert result.clock_s[0] == pytest.approx([step * (c + 1) for c in range(6)])
  # With stragglers it is the second half's own steps, slowdown.py's draws, scaled to 6 clocks.
  strag = model.Stragglers((1.0,), 0.5, 3.0, seed=1)
  draws = [f for f, _ in zip(strag.draws(0), range(6))]
  result = model.simulate_ssp(COST, model.Cluster((1.0,), stragglers=strag), local_batch=8,
                              clocks=6, staleness=0, param_bytes=0.0)
  seconds = [COST.host_s + COST.device_s(8) * f for f in draws]
  assert sum(draws[:3]) != sum(draws[3:])  # The halves straggle differently.
  assert calibration.second_half_rate_s(result.clock_s[0], 3) == pytest.approx(
      6 * sum(seconds[3:]) / 3)


def test_mapreduce_is_compared_without_its_first_round():
  rounds = [{'round_s': 5.0}, {'round_s': 1.0}, {'round_s': 1.5}, {'round_s': 1.0}]
  result = {'mode': 'mapreduce', 'measured_s': 8.75, 'report': {'rounds': rounds}}
  assert calibration.measured_s(result) == pytest.approx(3.5)
  assert calibration.startup_s(result) == pytest.approx(5.25)
  spec = calibration.validation_runs(quick=True)[1]
  cost = {'per_example_s': 2e-4, 'fixed_s': 1e-3, 'host_s': 0.0}
  calib = {'num_cores': 2, 'costs': {m: cost for m in model.MODES},
           'overhead_s': {'mapreduce': {'1': 0.01}}}
  o = spec['overrides']
  sim = model.simulate_mapreduce(
      model.StepCost(**cost), calibration.local_cluster(spec, 2),
      num_examples=spec['train_subset'], num_blocks=o['parallel.num_blocks'],
      rounds_per_epoch=o['parallel.rounds_per_epoch'], epochs=o['num_epochs'],
      local_batch=o['data.batch_size'], param_bytes=0.0, overhead_s=0.01)
  assert len(sim.rounds) > 1
  assert calibration.predict_run(spec, calib) == pytest.approx(
      sum(r['round_s'] for r in sim.rounds[1:]))


def _rescaled(result, factor, name):
  """``result`` as if measured ``factor`` times slower, under the run name ``name``."""
  report = dict(result['report'])
  if 'rounds' in report:
    report['rounds'] = [{**r, 'round_s': r['round_s'] * factor} for r in report['rounds']]
  return {**result, 'name': name, 'spec': {**result['spec'], 'name': name},
          'measured_s': result['measured_s'] * factor, 'report': report}


def test_repeats_run_every_configuration_once_per_repeat_and_fit_their_medians():
  specs = calibration.calibration_runs(quick=True)
  repeats = calibration.repeated(specs, 3)
  assert [s['name'] for s in repeats[0]] == [s['name'] for s in specs]
  assert [calibration.base_name(s['name']) for s in repeats[2]] == [s['name'] for s in specs]
  assert len({s['name'] for r in repeats for s in r}) == 3 * len(specs)
  with pytest.raises(ValueError, match='repeats'):
    calibration.repeated(specs, 0)
  cost = {'per_example_s': 4e-4, 'fixed_s': 5e-3, 'host_s': 0.0}
  truth = {'num_cores': 2, 'costs': {m: cost for m in model.MODES},
           'pruned_sync_cost': {'per_example_s': 2e-4, 'fixed_s': 3e-3, 'host_s': 0.0},
           'overhead_s': {m: {'1': 0.0, '2': 0.01, '4': 0.03} for m in model.MODES},
           'run_overhead_s': {}, 'transfer_s': {'ssp': {'1': 0.002, '2': 0.003, '4': 0.005}},
           'sharing_efficiency': {'sync': 0.8, 'mapreduce': 0.8, 'ssp': 0.9}}
  exact = _synthetic_results(truth, 1.0)
  # Repeat 0 ran in a slow spell, repeat 2 in a fast one: the median is the exact machine.
  results = ([_rescaled(r, 1.4, s['name']) for r, s in zip(exact, repeats[0])]
             + [_rescaled(r, 1.0, s['name']) for r, s in zip(exact, repeats[1])]
             + [_rescaled(r, 0.7, s['name']) for r, s in zip(exact, repeats[2])])
  medians = calibration.median_runs(results)
  assert [r['name'] for r in medians] == [s['name'] for s in specs]
  for median, r in zip(medians, exact):
    assert calibration.measured_s(median) == pytest.approx(calibration.measured_s(r))
    assert median['repeats_measured_s'] == pytest.approx(
        [calibration.measured_s(r) * f for f in (1.4, 1.0, 0.7)])
  assert calibration.fit(medians, 2) == calibration.fit(exact, 2)
  assert calibration.spread([1.4, 1.0, 0.7]) == pytest.approx(0.7)
  assert calibration.spread([2.0]) == 0.0
