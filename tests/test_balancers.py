"""Invariants of the MapReduce block balancers (equal, proportional, LBRLA, DLBPCE)."""

import itertools

import ml_collections
import numpy as np
import pytest

from pdcnno_jax.parallel import balancers

NAMES = sorted(balancers.BALANCERS)
SPEED_BALANCERS = ('proportional', 'lbrla', 'dlbpce')  # Those that follow the speeds.
NUM_CASES = 150


def random_cases(seed, num_cases=NUM_CASES, max_workers=8):
  """Seeded random (num_blocks, stats, previous) with distinct speeds spanning 1x-10x."""
  rng = np.random.default_rng(seed)
  for _ in range(num_cases):
    num_workers = int(rng.integers(1, max_workers + 1))
    num_blocks = int(rng.integers(num_workers, 12 * num_workers + 1))
    speed = np.exp(rng.uniform(0, np.log(10), num_workers))
    previous = rng.multinomial(num_blocks - num_workers, np.ones(num_workers) / num_workers) + 1
    yield num_blocks, balancers.WorkerStats(speed), previous


def dlbpce_full(num_blocks, stats, previous=None):
  """DLBPCE run until no move helps (H_b = 1)."""
  return balancers.dlbpce(num_blocks, stats, previous, entropy_target=1.0)


@pytest.mark.parametrize('name', NAMES)
def test_blocks_conserved_and_min_blocks_kept(name):
  assign = balancers.get_balancer(name)
  for num_blocks, stats, previous in random_cases(0):
    for min_blocks in (0, 1):
      blocks = assign(num_blocks, stats, previous, min_blocks=min_blocks)
      assert blocks.dtype == np.int64 and blocks.shape == (stats.num_workers,)
      assert blocks.sum() == num_blocks
      assert blocks.min() >= min(min_blocks, previous.min())


@pytest.mark.parametrize('name', ['equal', 'proportional', 'lbrla'])
def test_equal_workers_get_equal_shares_within_one_block(name):
  rng = np.random.default_rng(1)
  assign = balancers.get_balancer(name)
  for _ in range(NUM_CASES):
    groups = rng.integers(1, 4, size=int(rng.integers(1, 4)))  # Group sizes.
    speed = np.repeat(rng.uniform(0.1, 10, groups.size), groups)
    num_blocks = int(rng.integers(speed.size, 20 * speed.size))
    blocks = assign(num_blocks, balancers.WorkerStats(speed))
    for value in np.unique(speed):
      same = blocks[speed == value]
      assert same.max() - same.min() <= 1, (speed, blocks)


def test_dlbpce_equal_workers_within_one_block_when_run_to_the_end():
  rng = np.random.default_rng(2)
  for _ in range(NUM_CASES):
    groups = rng.integers(1, 4, size=int(rng.integers(1, 4)))
    speed = np.repeat(rng.uniform(0.1, 10, groups.size), groups)
    num_blocks = int(rng.integers(speed.size, 20 * speed.size))
    previous = rng.multinomial(num_blocks - speed.size, np.ones(speed.size) / speed.size) + 1
    blocks = dlbpce_full(num_blocks, balancers.WorkerStats(speed), previous)
    for value in np.unique(speed):
      same = blocks[speed == value]
      assert same.max() - same.min() <= 1, (speed, previous, blocks)


@pytest.mark.parametrize('name', SPEED_BALANCERS)
def test_faster_worker_never_gets_fewer_blocks(name):
  assign = balancers.get_balancer(name)
  for num_blocks, stats, _ in random_cases(3):
    blocks = assign(num_blocks, stats)  # From scratch (DLBPCE: from the equal split).
    order = np.argsort(stats.speed)
    assert np.all(np.diff(blocks[order]) >= 0), (stats.speed, blocks)


def test_equal_split_gives_remainder_to_fastest():
  stats = balancers.WorkerStats(np.array([1.0, 3.0, 2.0]))
  np.testing.assert_array_equal(balancers.equal(8, stats), [2, 3, 3])


@pytest.mark.parametrize('name', NAMES)
def test_relabelling_workers_relabels_the_output(name):
  assign = balancers.get_balancer(name)
  rng = np.random.default_rng(4)
  for num_blocks, stats, previous in random_cases(5):
    perm = rng.permutation(stats.num_workers)
    permuted = balancers.WorkerStats(stats.speed[perm])
    np.testing.assert_array_equal(
        assign(num_blocks, permuted, previous[perm]), assign(num_blocks, stats, previous)[perm])


@pytest.mark.parametrize('name', SPEED_BALANCERS)
def test_three_times_slower_worker_gets_a_third(name):
  stats = balancers.WorkerStats(np.array([3.0, 3.0, 1.0]))
  assign = balancers.get_balancer(name)
  previous = None
  for _ in range(2):  # Two rounds; DLBPCE starts from the equal split.
    previous = assign(70, stats, previous)
  fast, slow = previous[0], previous[2]
  assert abs(slow - fast / 3) <= 1, previous


def test_proportional_quotas_within_one_block():
  for num_blocks, stats, _ in random_cases(6):
    quota = num_blocks * stats.speed / stats.speed.sum()
    blocks = balancers.proportional(num_blocks, stats, min_blocks=0)
    assert np.all(np.abs(blocks - quota) < 1), (quota, blocks)


def test_lbrla_without_utilisations_minimises_the_makespan():
  """Greedy by earliest finish is optimal for equal blocks: never worse than proportional."""
  for num_blocks, stats, _ in random_cases(11):
    for min_blocks in (0, 1):
      assert balancers.makespan(
          balancers.lbrla(num_blocks, stats, min_blocks=min_blocks), stats.speed) <= (
              balancers.makespan(balancers.proportional(
                  num_blocks, stats, min_blocks=min_blocks), stats.speed) + 1e-12)


def test_dlbpce_makespan_within_one_slowest_block_of_ideal():
  for num_blocks, stats, previous in random_cases(12):
    blocks = dlbpce_full(num_blocks, stats, previous)
    ideal = num_blocks / stats.speed.sum()
    assert balancers.makespan(blocks, stats.speed) <= ideal + 1 / stats.speed.min() + 1e-9


def test_proportional_pins_tiny_quotas_to_min_blocks():
  stats = balancers.WorkerStats(np.array([100.0, 100.0, 1.0]))
  np.testing.assert_array_equal(balancers.proportional(20, stats, min_blocks=2), [9, 9, 2])


# --- LBRLA -------------------------------------------------------------------------------------


def random_utilised_stats(rng, num_workers):
  utilisation = {key: rng.uniform(0, 1, num_workers) for key in balancers.UTILISATION_KEYS}
  return balancers.WorkerStats(np.exp(rng.uniform(0, np.log(10), num_workers)), utilisation)


def test_lbrla_respects_the_ceiling_when_feasible():
  rng = np.random.default_rng(7)
  feasible_seen = infeasible_seen = 0
  for _ in range(NUM_CASES):
    num_workers = int(rng.integers(1, 8))
    stats = random_utilised_stats(rng, num_workers)
    num_blocks = int(rng.integers(num_workers, 10 * num_workers))
    ceiling = rng.uniform(0.4, 0.97)
    # Most blocks each worker can hold at or below the ceiling.
    base = balancers.lbrla_rates(np.zeros(num_workers), stats, num_blocks=num_blocks)
    per_block = balancers.lbrla_rates(np.ones(num_workers), stats, num_blocks=num_blocks) - base
    room = np.floor((ceiling - base) / per_block + 1e-9)
    blocks = balancers.lbrla(num_blocks, stats, ceiling=ceiling)
    assert blocks.sum() == num_blocks
    rates = balancers.lbrla_rates(blocks, stats)
    if np.all(room >= 1) and room.sum() >= num_blocks:
      feasible_seen += 1
      assert np.all(rates <= ceiling + 1e-12), (ceiling, rates)
      np.testing.assert_array_equal(
          balancers.lbrla(num_blocks, stats, ceiling=ceiling, strict=True), blocks)
    elif np.maximum(room, 1).sum() < num_blocks:  # Every worker keeps min_blocks=1 anyway.
      infeasible_seen += 1
      with pytest.raises(ValueError, match='ceiling'):
        balancers.lbrla(num_blocks, stats, ceiling=ceiling, strict=True)
  assert feasible_seen > 20 and infeasible_seen > 5  # The loop exercised both branches.


def test_lbrla_gives_fewer_blocks_to_a_busier_node():
  stats = balancers.WorkerStats(
      np.ones(2), {'memory': np.array([0.9, 0.1]), 'node': np.array([0.9, 0.1])})
  blocks = balancers.lbrla(40, stats)
  assert blocks[0] < blocks[1]


def test_lbrla_drops_unmeasured_utilisations():
  speed = np.array([1.0, 2.0])
  nan_memory = balancers.WorkerStats(speed, {'memory': np.array([np.nan, 0.9])})
  np.testing.assert_array_equal(
      balancers.lbrla(30, nan_memory), balancers.lbrla(30, balancers.WorkerStats(speed)))


def test_lbrla_rates_equalise_times_without_utilisations():
  stats = balancers.WorkerStats(np.array([4.0, 2.0, 1.0]))
  rates = balancers.lbrla_rates(np.array([40, 20, 10]), stats)
  np.testing.assert_allclose(rates, rates[0])
  assert np.all((rates >= 0) & (rates <= 1))


# --- DLBPCE ------------------------------------------------------------------------------------


def test_dlbpce_moves_raise_entropy_and_never_raise_makespan():
  rng = np.random.default_rng(8)
  total_moves = 0
  for num_blocks, stats, previous in random_cases(9):
    target = float(rng.choice([0.99, 0.999, 1.0]))
    entropy = balancers.parallel_computing_entropy(balancers.node_loads(previous, stats.speed))
    span = balancers.makespan(previous, stats.speed)
    for blocks in balancers.dlbpce_moves(num_blocks, stats, previous, entropy_target=target):
      new_entropy = balancers.parallel_computing_entropy(
          balancers.node_loads(blocks, stats.speed))
      new_span = balancers.makespan(blocks, stats.speed)
      assert new_entropy > entropy and new_span <= span + 1e-12
      assert blocks.sum() == num_blocks and blocks.min() >= 1
      entropy, span = new_entropy, new_span
      total_moves += 1
    # Stops once balanced, or when no further single move helps.
    final = balancers.dlbpce(num_blocks, stats, previous, entropy_target=target)
    if entropy < target:
      assert not list(balancers.dlbpce_moves(num_blocks, stats, final, entropy_target=target))
  assert total_moves > NUM_CASES  # The property was exercised.


def test_dlbpce_makes_no_move_when_already_balanced():
  stats = balancers.WorkerStats(np.array([4.0, 2.0, 1.0, 1.0]))
  balanced = np.array([32, 16, 8, 8])
  assert not list(balancers.dlbpce_moves(64, stats, balanced, entropy_target=1.0))
  # Above the entropy target nothing moves even if a move would help.
  slightly_off = np.array([31, 17, 8, 8])
  entropy = balancers.parallel_computing_entropy(balancers.node_loads(slightly_off, stats.speed))
  np.testing.assert_array_equal(
      balancers.dlbpce(64, stats, slightly_off, entropy_target=entropy), slightly_off)


def test_dlbpce_is_idempotent():
  for num_blocks, stats, previous in random_cases(10, num_cases=50):
    once = balancers.dlbpce(num_blocks, stats, previous)
    np.testing.assert_array_equal(balancers.dlbpce(num_blocks, stats, once), once)


def test_dlbpce_balances_two_workers():
  """With two workers the DLTF band is empty on both sides; the fallback still balances."""
  stats = balancers.WorkerStats(np.array([2.0, 1.0]))
  np.testing.assert_array_equal(balancers.dlbpce(30, stats), [20, 10])


def test_dlbpce_does_not_move_blocks_of_a_min_blocks_donor():
  stats = balancers.WorkerStats(np.array([10.0, 10.0, 0.1]))
  blocks = balancers.dlbpce(12, stats, np.array([5, 5, 2]), min_blocks=2, entropy_target=1.0)
  assert blocks[2] == 2


# --- Figures of merit, stats, registry ---------------------------------------------------------


def test_parallel_computing_entropy():
  assert balancers.parallel_computing_entropy(np.ones(5)) == pytest.approx(1.0)
  assert balancers.parallel_computing_entropy(np.array([0.0, 0.0, 3.0])) == pytest.approx(0.0)
  assert balancers.parallel_computing_entropy(np.array([2.0])) == 1.0
  assert balancers.parallel_computing_entropy(np.zeros(3)) == 1.0
  loads = np.array([1.0, 2.0, 3.0])
  assert balancers.parallel_computing_entropy(7 * loads) == pytest.approx(
      balancers.parallel_computing_entropy(loads))
  p = loads / loads.sum()
  assert balancers.parallel_computing_entropy(loads) == pytest.approx(
      -np.sum(p * np.log(p)) / np.log(3))
  with pytest.raises(ValueError, match='>= 0'):
    balancers.parallel_computing_entropy(np.array([1.0, -1.0]))


def test_makespan():
  assert balancers.makespan(np.array([6, 3]), np.array([2.0, 0.5])) == pytest.approx(6.0)


def test_worker_stats_vectors_round_trip():
  stats = balancers.WorkerStats(
      np.array([1.0, 2.0]), {'memory': np.array([0.5, np.nan])}, busy_s=np.array([3.0, 4.0]))
  vectors = stats.to_vectors()
  assert vectors.shape == (2, len(balancers.VECTOR_FIELDS))
  back = balancers.WorkerStats.from_vectors(vectors)
  np.testing.assert_array_equal(back.speed, stats.speed)
  np.testing.assert_array_equal(back.utilisation['memory'], stats.utilisation['memory'])
  assert set(back.utilisation) == {'memory'} and back.wall_s is None
  np.testing.assert_array_equal(back.busy_s, stats.busy_s)
  both = balancers.WorkerStats.concatenate([stats, stats])
  np.testing.assert_array_equal(both.speed, [1.0, 2.0, 1.0, 2.0])


@pytest.mark.parametrize('speed, utilisation, match', [
    (np.array([1.0, 0.0]), {}, 'finite and > 0'),
    (np.array([[1.0]]), {}, '1-D'),
    (np.array([1.0]), {'gpu': np.array([0.5])}, 'Unknown utilisation'),
    (np.array([1.0]), {'memory': np.array([1.5])}, r'\[0, 1\]'),
    (np.array([1.0, 2.0]), {'memory': np.array([0.5])}, '2 workers'),
])
def test_worker_stats_rejects_bad_figures(speed, utilisation, match):
  with pytest.raises(ValueError, match=match):
    balancers.WorkerStats(speed, utilisation)


@pytest.mark.parametrize('name', NAMES)
def test_bad_requests_raise_clear_errors(name):
  stats = balancers.WorkerStats(np.ones(4))
  assign = balancers.get_balancer(name)
  with pytest.raises(ValueError, match='num_blocks'):
    assign(3, stats)  # Fewer blocks than workers x min_blocks.
  if name == 'dlbpce':
    with pytest.raises(ValueError, match='sum to num_blocks'):
      assign(8, stats, np.array([2, 2, 2, 1]))
    with pytest.raises(ValueError, match='shape'):
      assign(8, stats, np.array([4, 4]))


def test_get_balancer_and_config_binding():
  assert balancers.get_balancer('lbrla') is balancers.lbrla
  with pytest.raises(ValueError, match='config.parallel.balancer'):
    balancers.get_balancer('round_robin')
  config = ml_collections.ConfigDict(dict(
      balancer='lbrla', lbrla_ceiling=0.5, lbrla_weights='load=1,memory=3',
      dlbpce_entropy_target=0.9))
  stats = balancers.WorkerStats(np.ones(2), {'memory': np.array([0.2, 0.6])})
  np.testing.assert_array_equal(
      balancers.balancer_from_config(config)(10, stats),
      balancers.lbrla(10, stats, ceiling=0.5, weights={'load': 1.0, 'memory': 3.0}))
  for name in NAMES:
    config.balancer = name
    assert balancers.balancer_from_config(config)(10, stats).sum() == 10


def test_all_balancers_agree_on_identical_workers():
  stats = balancers.WorkerStats(np.full(4, 2.5))
  for name, previous in itertools.product(NAMES, (None,)):
    np.testing.assert_array_equal(balancers.get_balancer(name)(20, stats, previous), [5] * 4)


def test_parse_lbrla_weights():
  assert balancers.parse_lbrla_weights('') == balancers.DEFAULT_LBRLA_WEIGHTS
  assert balancers.parse_lbrla_weights(' load=1, node = 0.5') == {'load': 1.0, 'node': 0.5}
  for bad in ('load', 'load=x', 'gpu=1', 'load=1,load=2'):
    with pytest.raises(ValueError, match='bad entry'):
      balancers.parse_lbrla_weights(bad)
  with pytest.raises(ValueError, match='>= 0'):
    balancers.parse_lbrla_weights('load=-1')
  with pytest.raises(ValueError, match='"load" weight must be > 0'):
    balancers.lbrla(4, balancers.WorkerStats(np.ones(2)), weights={'node': 1.0})
