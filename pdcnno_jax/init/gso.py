"""Glowworm swarm optimisation (GSO) with the information-sharing search (ISS).

An ask/tell strategy in the style of evosax, for *minimisation* of any objective on a box::

  strategy = GlowwormSwarm(num_dims=5, swarm_size=50)
  params = strategy.default_params(lower_bound=-5.12, upper_bound=5.12)
  state = strategy.init(key, params)
  for _ in range(generations):
    x = strategy.ask(state)                     # (swarm_size, num_dims)
    state = strategy.tell(state, f(x), params)  # f: loss to minimise, (swarm_size,)

or ``strategy.run(f, key, generations, params)``, which does the same with ``lax.scan``.
Every method is a pure, traceable function of pytrees; wrap the caller in ``jax.jit``.

``tell`` runs one generation: luciferin, neighbours, GSO move, ISS move, decision radius
(its docstring gives the rules). Lengths are measured in box units ``u = (x - lower) /
(upper - lower)``: ``step_size=0.03`` moves 3% of the box width per step in every dimension
("s scaled to the box"); positions in the state and from ``ask`` are in the problem's
coordinates.

References:
  DESIGN.md, "IFAS" (the authority for this implementation).
  MR-FPDCNN paper (``papers/mr_fpdcnn_taylor_glowworm_zh.txt``): GSO steps (1)-(3),
  eqs. (2)-(4), and Definition 3 (ISS), eq. (11).
  Krishnanand and Ghose, "Glowworm swarm optimization for simultaneous capture of multiple
  local optima of multimodal functions", Swarm Intelligence 3, 2009 (luciferin, neighbour
  probabilities and the decision-radius rule).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

Objective = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class GSOParams:
  """Hyper-parameters of :class:`GlowwormSwarm` (a pytree; ``information_sharing`` is static).

  Attributes:
    lower_bound: ``(num_dims,)`` lower corner of the search box.
    upper_bound: ``(num_dims,)`` upper corner of the search box.
    luciferin_decay: ``rho``, the fraction of luciferin that decays per generation.
    luciferin_gain: ``gamma``, the weight of the new fitness in the luciferin.
    radius_gain: ``beta``, the decision-radius adaptation rate.
    desired_neighbours: ``n_t``, the neighbour count the decision radius aims at.
    step_size: ``s``, the GSO step length in box units (fraction of the box width).
    initial_luciferin: ``l0``.
    sensing_radius: ``r_s``, the upper limit of the decision radius, in box units.
    initial_radius: the decision radius at initialisation, in box units.
    information_sharing: whether the ISS term is added (GSO-ISS) or not (plain GSO).
  """
  lower_bound: jax.Array
  upper_bound: jax.Array
  luciferin_decay: float = 0.4
  luciferin_gain: float = 0.6
  radius_gain: float = 0.08
  desired_neighbours: float = 5.0
  step_size: float = 0.03
  initial_luciferin: float = 5.0
  sensing_radius: float = 0.5
  initial_radius: float = 0.5
  information_sharing: bool = flax.struct.field(pytree_node=False, default=True)


@flax.struct.dataclass
class GSOState:
  """State of a glowworm swarm between generations.

  Attributes:
    positions: ``(swarm_size, num_dims)`` positions that ``ask`` returns next, in the
      problem's coordinates.
    luciferin: ``(swarm_size,)`` luciferin levels.
    radii: ``(swarm_size,)`` decision radii, in box units.
    fitness: ``(swarm_size,)`` fitness (loss) of the previous generation's positions
      (``+inf`` before the first ``tell``).
    num_neighbours: ``(swarm_size,)`` ``|N_i|`` at the previous generation.
    best_position: ``(num_dims,)`` best position evaluated so far.
    best_fitness: its fitness (``+inf`` before the first ``tell``).
    key: PRNG key for the next generation.
    generation: number of ``tell`` calls so far.
  """
  positions: jax.Array
  luciferin: jax.Array
  radii: jax.Array
  fitness: jax.Array
  num_neighbours: jax.Array
  best_position: jax.Array
  best_fitness: jax.Array
  key: jax.Array
  generation: jax.Array


def to_box_units(positions: jax.Array, params: GSOParams) -> jax.Array:
  """Maps problem coordinates to box units (the box becomes the unit cube)."""
  return (positions - params.lower_bound) / (params.upper_bound - params.lower_bound)


def from_box_units(units: jax.Array, params: GSOParams) -> jax.Array:
  """Inverse of :func:`to_box_units`."""
  return params.lower_bound + units * (params.upper_bound - params.lower_bound)


def sanitize_fitness(fitness: jax.Array) -> jax.Array:
  """Replaces non-finite values by the worst finite fitness (0 when none is finite)."""
  finite = jnp.isfinite(fitness)
  worst = jnp.max(jnp.where(finite, fitness, -jnp.inf))
  worst = jnp.where(jnp.isfinite(worst), worst, 0.0)
  return jnp.where(finite, fitness, worst)


def update_luciferin(luciferin: jax.Array, fitness: jax.Array,
                     params: GSOParams) -> jax.Array:
  """``l = (1 - rho) l + gamma J`` with ``J = -fitness`` (DESIGN.md "IFAS"; paper eq. (2))."""
  return ((1.0 - params.luciferin_decay) * luciferin
          - params.luciferin_gain * fitness)


def neighbour_mask(units: jax.Array, luciferin: jax.Array, radii: jax.Array) -> jax.Array:
  """``mask[i, j]``: whether ``j`` is in ``N_i`` (brighter than ``i``, within ``r_d[i]``).

  Args:
    units: ``(n, d)`` positions in box units.
    luciferin: ``(n,)`` luciferin levels.
    radii: ``(n,)`` decision radii in box units.

  Returns:
    ``(n, n)`` boolean mask; the diagonal is always False.
  """
  def row(x_i, l_i, r_i):
    distance = jnp.linalg.norm(units - x_i, axis=-1)
    return (distance < r_i) & (luciferin > l_i)
  return jax.vmap(row)(units, luciferin, radii)


def iss_probabilities(fitness: jax.Array) -> jax.Array:
  """``p_i = (f_i - f_best) / sum_k (f_k - f_best)`` (paper Definition 3); 0 if all equal."""
  gaps = fitness - jnp.min(fitness)
  total = jnp.sum(gaps)
  return jnp.where(total > 0, gaps / jnp.where(total > 0, total, 1.0), 0.0)


def _gso_move(gumbel_i: jax.Array, x_i: jax.Array, l_i: jax.Array, neighbours_i: jax.Array,
              units: jax.Array, luciferin: jax.Array, step_size: float) -> jax.Array:
  """Displacement of one glowworm toward a neighbour drawn with prob. ~ (l_j - l_i).

  The draw is the Gumbel-max trick (what ``jax.random.categorical`` does), with the
  ``(n,)`` Gumbel noise passed in so that the swarm's noise comes from one RNG call.
  """
  gain = jnp.where(neighbours_i, luciferin - l_i, 1.0)
  scores = jnp.where(neighbours_i, jnp.log(gain) + gumbel_i, -jnp.inf)
  j = jnp.argmax(scores)
  direction = units[j] - x_i
  norm = jnp.linalg.norm(direction)
  unit = direction / jnp.where(norm > 0, norm, 1.0)
  return jnp.where(jnp.any(neighbours_i), step_size * unit, 0.0)


class GlowwormSwarm:
  """GSO / GSO-ISS ask-tell strategy (see the module docstring).

  Args:
    num_dims: dimension ``d`` of the search space.
    swarm_size: number of glowworms ``n``.

  Raises:
    ValueError: for a non-positive ``num_dims`` or a ``swarm_size`` below 2.
  """

  def __init__(self, num_dims: int, swarm_size: int):
    if num_dims < 1:
      raise ValueError(f'num_dims must be >= 1, got {num_dims}.')
    if swarm_size < 2:
      raise ValueError(f'A swarm needs at least 2 glowworms, got swarm_size={swarm_size}.')
    self.num_dims = int(num_dims)
    self.swarm_size = int(swarm_size)

  def default_params(self, lower_bound=-1.0, upper_bound=1.0, *,
                     information_sharing: bool = True, **overrides) -> GSOParams:
    """Default hyper-parameters (DESIGN.md "IFAS") on the box ``[lower, upper]^d``.

    The sensing radius and the initial decision radius default to half the box's diagonal
    (``0.5 sqrt(d)`` box units), so that at the start most of the swarm is in sight.

    Args:
      lower_bound: scalar or ``(num_dims,)`` lower corner.
      upper_bound: scalar or ``(num_dims,)`` upper corner.
      information_sharing: GSO-ISS (True) or plain GSO (False).
      **overrides: any other :class:`GSOParams` field.

    Raises:
      ValueError: when the box is empty or mis-shaped, or a field is unknown.
    """
    lower, upper = self._box_corner(lower_bound), self._box_corner(upper_bound)
    if (isinstance(lower, np.ndarray) and isinstance(upper, np.ndarray)
        and not np.all(upper > lower)):
      raise ValueError(f'Need upper_bound > lower_bound in every dimension, got '
                       f'{lower_bound} and {upper_bound}.')
    radius = 0.5 * math.sqrt(self.num_dims)
    fields = dict(sensing_radius=radius, initial_radius=radius)
    fields.update(overrides)
    known = set(GSOParams.__dataclass_fields__)
    unknown = set(fields) - known
    if unknown:
      raise ValueError(f'Unknown GSOParams fields {sorted(unknown)}; known: {sorted(known)}.')
    return GSOParams(lower_bound=lower, upper_bound=upper,
                     information_sharing=information_sharing, **fields)

  def _box_corner(self, bound) -> np.ndarray | jax.Array:
    """A ``(num_dims,)`` float32 corner; numpy when concrete (checked), jnp when traced."""
    if isinstance(bound, jax.core.Tracer):
      return jnp.broadcast_to(jnp.asarray(bound, jnp.float32), (self.num_dims,))
    corner = np.asarray(bound, np.float32)
    if corner.shape not in ((), (self.num_dims,)):
      raise ValueError(f'A box corner must be a scalar or have shape ({self.num_dims},), '
                       f'got shape {corner.shape}.')
    return np.broadcast_to(corner, (self.num_dims,)).copy()

  def init(self, key: jax.Array, params: GSOParams,
           seed_positions: Optional[jax.Array] = None) -> GSOState:
    """Scatters the swarm uniformly in the box.

    Args:
      key: PRNG key.
      params: hyper-parameters.
      seed_positions: optional ``(m, d)`` positions (``m <= swarm_size``) given to the first
        ``m`` glowworms instead of random ones, e.g. a known good default.

    Returns:
      The initial :class:`GSOState` (``l = l0``, ``r_d = initial_radius``).

    Raises:
      ValueError: when ``seed_positions`` has the wrong shape.
    """
    key, init_key = jax.random.split(key)
    units = jax.random.uniform(init_key, (self.swarm_size, self.num_dims))
    positions = from_box_units(units, params)
    if seed_positions is not None:
      seed_positions = jnp.asarray(seed_positions, positions.dtype)
      if (seed_positions.ndim != 2 or seed_positions.shape[1] != self.num_dims
          or seed_positions.shape[0] > self.swarm_size):
        raise ValueError(f'seed_positions must have shape (m <= {self.swarm_size}, '
                         f'{self.num_dims}), got {seed_positions.shape}.')
      seeds = jnp.clip(seed_positions, params.lower_bound, params.upper_bound)
      positions = positions.at[:seeds.shape[0]].set(seeds)
    n = self.swarm_size
    return GSOState(
        positions=positions,
        luciferin=jnp.full((n,), params.initial_luciferin, jnp.float32),
        radii=jnp.full((n,), params.initial_radius, jnp.float32),
        fitness=jnp.full((n,), jnp.inf, jnp.float32),
        num_neighbours=jnp.zeros((n,), jnp.int32),
        best_position=positions[0],
        best_fitness=jnp.asarray(jnp.inf, jnp.float32),
        key=key,
        generation=jnp.zeros((), jnp.int32))

  def ask(self, state: GSOState) -> jax.Array:
    """Positions to evaluate next, ``(swarm_size, num_dims)`` in problem coordinates."""
    return state.positions

  def tell(self, state: GSOState, fitness: jax.Array,
           params: GSOParams) -> GSOState:
    """One GSO(-ISS) generation from the fitness (loss) of ``ask(state)``.

    With fitness ``f_i`` (a loss, minimised) of the positions that ``ask`` returned:

    1. Luciferin: ``l_i = (1 - rho) l_i + gamma J_i`` with ``J_i = -f_i``, the fitness to
       *maximise* is the negated loss (an affine, order-reversing map; it leaves the move
       probabilities and neighbour sets of GSO exactly as for ``-f``). For a constant fitness
       ``l`` converges to ``-gamma f / rho``.
    2. Neighbours of ``i``: ``N_i = {j : ||x_j - x_i|| < r_d[i] and l_j > l_i}`` (strictly
       brighter glowworms inside ``i``'s decision radius; ``i`` itself is never included).
    3. GSO move: pick ``j`` in ``N_i`` with probability ``(l_j - l_i) / sum_{k in N_i}(l_k - l_i)``
       and step ``s * (x_j - x_i) / ||x_j - x_i||``; no move when ``N_i`` is empty.
    4. ISS move (``information_sharing=True``): add ``p_i * z_i * (x_best - x_i)`` with
       ``z_i ~ N(0, 1)`` (one scalar per glowworm: the paper's "normally distributed random
       real"), ``p_i = (f_i - f_best) / sum_k (f_k - f_best)``; ``x_best``/``f_best`` are the
       best glowworm of the *current* generation, so ``p`` is a distribution over the swarm
       (``p = 0`` when every fitness is equal) and the best glowworm is never moved by ISS.
    5. Both moves use the positions of step 2; the sum is clipped to the box.
    6. Decision radius: ``r_d = min(r_s, max(0, r_d + beta (n_t - |N_i|)))``.

    Non-finite fitness values (a diverged candidate) are treated as equal to the worst finite
    fitness of the generation (0 if none is finite) for luciferin and ISS, and never become the
    best.

    Args:
      state: the state whose positions were evaluated.
      fitness: ``(swarm_size,)`` losses to minimise.
      params: hyper-parameters.

    Returns:
      The next state: updated luciferin, moved positions, adapted radii, running best.
    """
    fitness = jnp.asarray(fitness, jnp.float32).reshape(self.swarm_size)
    key, move_key, iss_key = jax.random.split(state.key, 3)

    # Running best over every evaluated position (non-finite values never win).
    ranked = jnp.where(jnp.isfinite(fitness), fitness, jnp.inf)
    i_best = jnp.argmin(ranked)
    improved = ranked[i_best] < state.best_fitness
    best_fitness = jnp.where(improved, ranked[i_best], state.best_fitness)
    best_position = jnp.where(improved, state.positions[i_best], state.best_position)

    clean = sanitize_fitness(fitness)
    luciferin = update_luciferin(state.luciferin, clean, params)
    units = to_box_units(state.positions, params)
    neighbours = neighbour_mask(units, luciferin, state.radii)

    move = functools.partial(_gso_move, units=units, luciferin=luciferin,
                             step_size=params.step_size)
    gumbel = jax.random.gumbel(move_key, (self.swarm_size, self.swarm_size))
    displacement = jax.vmap(move)(gumbel, units, luciferin, neighbours)
    if params.information_sharing:
      displacement = displacement + iss_displacement(iss_key, units, clean)
    # Moving in problem coordinates keeps a glowworm that does not move bit-identical.
    width = params.upper_bound - params.lower_bound
    positions = jnp.clip(state.positions + displacement * width, params.lower_bound,
                         params.upper_bound)

    count = neighbours.sum(axis=1)
    radii = jnp.clip(state.radii + params.radius_gain * (params.desired_neighbours - count),
                     0.0, params.sensing_radius)
    return GSOState(
        positions=positions, luciferin=luciferin, radii=radii,
        fitness=fitness, num_neighbours=count.astype(jnp.int32),
        best_position=best_position, best_fitness=best_fitness, key=key,
        generation=state.generation + 1)

  def run(self, objective: Objective, key: jax.Array, generations: int,
          params: GSOParams, seed_positions: Optional[jax.Array] = None
          ) -> tuple[GSOState, dict[str, jax.Array]]:
    """``generations`` ask/evaluate/tell rounds under ``lax.scan`` (traceable; jit the caller).

    Args:
      objective: maps ``(swarm_size, num_dims)`` positions to ``(swarm_size,)`` losses;
        must be traceable. It is called exactly ``generations`` times.
      key: PRNG key.
      generations: number of generations (a Python int).
      params: hyper-parameters.
      seed_positions: see :meth:`init`.

    Returns:
      ``(final_state, trace)``; ``trace`` holds, per generation, the evaluated ``fitness``
      ``(generations, swarm_size)``, the running ``best_fitness`` and the ``mean_fitness``
      of the finite values ``(generations,)``.
    """
    state = self.init(key, params, seed_positions)

    def generation(state, _):
      fitness = objective(self.ask(state))
      state = self.tell(state, fitness, params)
      finite = jnp.isfinite(fitness)
      mean = jnp.sum(jnp.where(finite, fitness, 0.0)) / jnp.maximum(finite.sum(), 1)
      return state, {'fitness': fitness, 'best_fitness': state.best_fitness,
                     'mean_fitness': mean}

    return jax.lax.scan(generation, state, None, length=generations)


def iss_displacement(key: jax.Array, units: jax.Array, fitness: jax.Array) -> jax.Array:
  """ISS term ``p_i * z_i * (x_best - x_i)``, ``z_i ~ N(0, 1)`` (paper Definition 3).

  Args:
    key: PRNG key for the ``z_i``.
    units: ``(n, d)`` positions (box units; the term is equivariant under the box map).
    fitness: ``(n,)`` finite losses of these positions.

  Returns:
    ``(n, d)`` displacements; zero for the best glowworm.
  """
  p = iss_probabilities(fitness)
  noise = jax.random.normal(key, p.shape)
  best = units[jnp.argmin(fitness)]
  return (p * noise)[:, None] * (best - units)
