"""Tests for the GSO / GSO-ISS ask-tell strategy (pdcnno_jax/init/gso.py).

Invariants of one generation (DESIGN.md "IFAS"), search quality on sphere and Rastrigin, and
a paired statistical comparison of GSO-ISS against plain GSO over fixed seeds. Every test
uses one 50-glowworm swarm in 5-d and the module-level jitted functions below, so the whole
file compiles a handful of programs.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdcnno_jax.init import gso

BOX = 5.12  # Rastrigin's usual box [-5.12, 5.12]^d.
N, D = 50, 5
STRATEGY = gso.GlowwormSwarm(num_dims=D, swarm_size=N)


def sphere(x):
  return jnp.sum(x ** 2, axis=-1)


def rastrigin(x):
  return 10.0 * x.shape[-1] + jnp.sum(x ** 2 - 10.0 * jnp.cos(2 * jnp.pi * x), axis=-1)


tell = jax.jit(STRATEGY.tell)
init = jax.jit(STRATEGY.init)
objective = {'sphere': jax.jit(sphere), 'rastrigin': jax.jit(rastrigin)}


@functools.partial(jax.jit, static_argnums=(0, 2))
def run(objective_name, key, generations, params):
  return STRATEGY.run({'sphere': sphere, 'rastrigin': rastrigin}[objective_name], key,
                      generations, params)


def _best_over_seeds(objective_name, params, generations, num_seeds, seed=0):
  """Best fitness and position of ``num_seeds`` independent runs (one compilation)."""
  results = [run(objective_name, key, generations, params)[0]
             for key in map(jax.random.key, range(seed, seed + num_seeds))]
  return (np.asarray([r.best_fitness for r in results]),
          np.asarray([r.best_position for r in results]))


def _sign_test_p_value(wins: int, trials: int) -> float:
  """One-sided exact sign test: P(Binomial(trials, 1/2) >= wins)."""
  return sum(math.comb(trials, k) for k in range(wins, trials + 1)) / 2.0 ** trials


def test_luciferin_converges_to_gamma_fitness_over_rho():
  params = STRATEGY.default_params()
  state = init(jax.random.key(0), params)
  constant = 2.0  # A loss; the luciferin uses J = -loss.
  for _ in range(80):
    state = tell(state, jnp.full((N,), constant), params)
  expected = params.luciferin_gain * (-constant) / params.luciferin_decay
  np.testing.assert_allclose(state.luciferin, expected, rtol=1e-5)


def test_neighbour_mask_is_brighter_glowworms_within_radius():
  rng = np.random.default_rng(0)
  n = 40
  units = rng.uniform(size=(n, 3)).astype(np.float32)
  luciferin = rng.normal(size=n).astype(np.float32)
  luciferin[:5] = luciferin[5]  # Ties are not neighbours.
  radii = rng.uniform(0.0, 0.8, size=n).astype(np.float32)
  mask = np.asarray(jax.jit(gso.neighbour_mask)(units, luciferin, radii))
  distance = np.linalg.norm(units[:, None] - units[None], axis=-1)
  expected = (distance < radii[:, None]) & (luciferin[None] > luciferin[:, None])
  np.testing.assert_array_equal(mask, expected)
  assert not mask.diagonal().any()
  assert 0 < mask.sum() < n * (n - 1) / 2  # Both outcomes occur: the check is not vacuous.


def test_tell_counts_neighbours_with_updated_luciferin():
  params = STRATEGY.default_params()
  state = init(jax.random.key(1), params)
  state = tell(state, objective['sphere'](state.positions), params)  # Luciferin differs.
  fitness = objective['sphere'](state.positions)
  new = tell(state, fitness, params)
  luciferin = gso.update_luciferin(state.luciferin, fitness, params)
  np.testing.assert_allclose(new.luciferin, luciferin, rtol=1e-6, atol=1e-6)
  mask = gso.neighbour_mask(gso.to_box_units(state.positions, params), new.luciferin,
                            state.radii)
  np.testing.assert_array_equal(new.num_neighbours, mask.sum(axis=1))
  assert 0 < int(new.num_neighbours.sum()) < N * (N - 1) / 2


def test_glowworms_without_neighbours_do_not_move_without_iss():
  params = STRATEGY.default_params(information_sharing=False)
  state = init(jax.random.key(2), params)
  isolated = state.replace(radii=jnp.zeros_like(state.radii))
  new = tell(isolated, objective['sphere'](state.positions), params)
  np.testing.assert_array_equal(new.positions, state.positions)
  # The brightest glowworm has no brighter neighbour even when it sees everybody.
  state = tell(state, objective['sphere'](state.positions), params)  # Luciferin differs.
  new = tell(state, objective['sphere'](state.positions), params)
  brightest = int(jnp.argmax(new.luciferin))
  np.testing.assert_array_equal(new.positions[brightest], state.positions[brightest])
  assert not np.array_equal(new.positions, state.positions)


def test_glowworms_without_neighbours_move_only_by_the_iss_term():
  params = STRATEGY.default_params(0.0, 1.0, information_sharing=True)
  rng = np.random.default_rng(0)
  zs = []
  for seed in range(8):  # 8 generations of 49 moving glowworms.
    state = init(jax.random.key(100 + seed), params)
    # Positions well inside the box so that no ISS jump is clipped.
    positions = (0.45 + 0.1 * rng.uniform(size=(N, D))).astype(np.float32)
    fitness = rng.uniform(size=N).astype(np.float32)
    state = state.replace(positions=jnp.asarray(positions), radii=jnp.zeros((N,)))
    new = tell(state, fitness, params)

    moved = np.asarray(new.positions, np.float64) - positions
    best = int(np.argmin(fitness))
    to_best = (positions[best] - positions).astype(np.float64)
    np.testing.assert_array_equal(moved[best], 0.0)
    others = np.arange(N) != best
    # Each move is c_i (x_best - x_i): along the direction of the best glowworm ...
    coeff = (moved * to_best).sum(-1)[others] / (to_best ** 2).sum(-1)[others]
    np.testing.assert_allclose(moved[others], coeff[:, None] * to_best[others], atol=2e-6)
    zs.append(coeff / np.asarray(gso.iss_probabilities(fitness))[others])
  # ... with c_i = p_i z_i, z_i ~ N(0, 1) (392 draws: standard errors 0.05 and 0.04).
  z = np.concatenate(zs)
  assert abs(z.mean()) < 0.2 and abs(z.std() - 1.0) < 0.15, (z.mean(), z.std())


def test_gso_steps_have_norm_at_most_step_size_and_radii_stay_in_range():
  params = STRATEGY.default_params(-BOX, BOX, information_sharing=False)
  state = init(jax.random.key(6), params)
  norms, radii = [], []
  for _ in range(40):
    new = tell(state, objective['rastrigin'](state.positions), params)
    step = gso.to_box_units(new.positions, params) - gso.to_box_units(state.positions, params)
    norms.append(np.linalg.norm(np.asarray(step), axis=-1))
    radii.append(np.asarray(new.radii))
    state = new
  norms, radii = np.asarray(norms), np.asarray(radii)
  assert norms.max() <= params.step_size + 1e-5
  assert np.isclose(norms, params.step_size, atol=1e-5).mean() > 0.2  # Full steps happen.
  r_s = np.float32(params.sensing_radius)
  assert radii.min() >= 0.0 and radii.max() <= r_s
  assert radii.min() == 0.0 and radii.max() == r_s  # Both limits are reached.


def test_finds_the_sphere_optimum():
  params = STRATEGY.default_params(-BOX, BOX)
  best_fitness, best_position = _best_over_seeds('sphere', params, 200, num_seeds=8)
  # Tolerance: within a third of one GSO step (0.03 of the box width = 0.31) of the
  # optimum.
  step = params.step_size * 2 * BOX
  assert np.linalg.norm(best_position, axis=-1).max() < step / 3
  assert best_fitness.max() < (step / 3) ** 2


def test_gets_near_the_rastrigin_optimum_and_beats_random_search():
  params = STRATEGY.default_params(-BOX, BOX)
  generations, num_seeds = 200, 16
  best_fitness, _ = _best_over_seeds('rastrigin', params, generations, num_seeds)
  # Rastrigin (0 at the origin, about 90 on average over the box) has a local minimum near
  # every integer point, f ~ number of nonzero coordinates and more. GSO is a
  # multimodal-capture method and does not reliably reach the global basin in 10,000
  # evaluations; the stated tolerance is "a few local-minimum levels above 0": median best
  # <= 8 over the seeds (measured 5.1-6.3 over four seed sets) ...
  assert np.median(best_fitness) <= 8.0, best_fitness
  # ... and better than random search with the same evaluations (median about 17) on at
  # least 14 of 16 seeds (measured 15-16).
  samples = np.random.default_rng(8).uniform(-BOX, BOX, (num_seeds, generations * N, D))
  random_best = (10.0 * D + (samples ** 2 - 10.0 * np.cos(2 * np.pi * samples)).sum(-1)
                 ).min(axis=1)
  assert (best_fitness < random_best).sum() >= 14, (best_fitness, random_best)


def test_iss_beats_plain_gso_on_rastrigin_over_seeds():
  """Paired one-sided sign test over 30 seeds at significance 0.01.

  In GSO's local (multimodal) regime, sensing radius 0.3 box units, plain GSO splits into
  isolated clusters stuck in local minima; the ISS pull toward the swarm's best lets the
  clusters share what the best found (the paper's claim). The pairs share their key, hence
  their initial swarm. Measured with the default wide radius (half the box diagonal) the
  difference is not significant (sign-test p of 0.2 to 0.9 over 30-40 seeds): there plain
  GSO already sees the whole swarm.
  """
  local = dict(sensing_radius=0.3, initial_radius=0.3)
  results = {}
  for iss in (False, True):
    params = STRATEGY.default_params(-BOX, BOX, information_sharing=iss, **local)
    results[iss], _ = _best_over_seeds('rastrigin', params, 200, num_seeds=30, seed=100)
  wins = int((results[True] < results[False]).sum())
  assert _sign_test_p_value(wins, 30) < 0.01, (wins, results)
  assert np.median(results[True]) < np.median(results[False])


def test_same_seed_same_result():
  params = STRATEGY.default_params(-BOX, BOX)
  first, trace_a = run('rastrigin', jax.random.key(42), 200, params)
  second, trace_b = run('rastrigin', jax.random.key(42), 200, params)
  other, _ = run('rastrigin', jax.random.key(43), 200, params)
  for a, b in zip(jax.tree.leaves((first, trace_a)), jax.tree.leaves((second, trace_b))):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first.positions, other.positions)
  assert first.generation == 200
  assert np.all(np.diff(np.asarray(trace_a['best_fitness'])) <= 0)  # A running best.


def test_seed_positions_and_non_finite_fitness():
  params = STRATEGY.default_params(-1.0, 1.0)
  seed = jnp.asarray([[0.0] * D, [0.5, -0.5, 0.25, 0.0, 1.0]])
  state = STRATEGY.init(jax.random.key(9), params, seed_positions=seed)
  np.testing.assert_array_equal(state.positions[:2], seed)
  fitness = jnp.arange(N, dtype=jnp.float32) + 1.0  # Worst finite value: N.
  fitness = fitness.at[0].set(jnp.nan).at[2].set(jnp.inf).at[3].set(0.5)
  new = tell(state, fitness, params)
  assert float(new.best_fitness) == 0.5
  np.testing.assert_array_equal(new.best_position, state.positions[3])
  assert np.all(np.isfinite(new.luciferin)) and np.all(np.isfinite(new.positions))
  # Non-finite values count as the worst finite one for the luciferin.
  luciferin = np.asarray(new.luciferin)
  np.testing.assert_allclose(luciferin[[0, 2]], luciferin[N - 1])


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='at least 2 glowworms'):
    gso.GlowwormSwarm(num_dims=2, swarm_size=1)
  with pytest.raises(ValueError, match='num_dims'):
    gso.GlowwormSwarm(num_dims=0, swarm_size=4)
  with pytest.raises(ValueError, match='upper_bound > lower_bound'):
    STRATEGY.default_params(1.0, -1.0)
  with pytest.raises(ValueError, match='shape'):
    STRATEGY.default_params(np.zeros(3), np.ones(3))
  with pytest.raises(ValueError, match='Unknown GSOParams'):
    STRATEGY.default_params(step=0.1)
  with pytest.raises(ValueError, match='seed_positions'):
    STRATEGY.init(jax.random.key(0), STRATEGY.default_params(), jnp.zeros((N + 1, D)))
