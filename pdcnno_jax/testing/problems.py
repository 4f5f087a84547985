"""Deterministic unconstrained test problems with known minimisers.

Shared by ``tests/test_cgmse.py`` and ``benchmarks/bench_cgmse_problems.py``.
Every objective is a pure ``jnp`` function of a flat vector, so it runs in
float32 or float64 and under ``jit``.

References:
  More, Garbow and Hillstrom, "Testing unconstrained optimization software",
  ACM TOMS 7(1), 1981 (Rosenbrock, extended Rosenbrock, Beale starting points).
  Jamil and Yang, "A literature survey of benchmark functions for global
  optimisation problems", 2013 (Himmelblau, Matyas, Zakharov, Booth).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Problem(NamedTuple):
  """One test problem.

  Attributes:
    name: short name used in tables.
    fn: objective ``fn(x) -> scalar`` for a flat vector ``x``.
    x0: starting point (float64 numpy array).
    minima: known minimisers, shape ``(num_minima, dim)``; convergence is
      measured to the nearest one.
  """

  name: str
  fn: Callable[[jax.Array], jax.Array]
  x0: np.ndarray
  minima: np.ndarray

  def distance(self, x) -> float:
    """Max-norm distance from ``x`` to the nearest known minimiser."""
    x = np.asarray(x, np.float64).reshape(1, -1)
    return float(np.min(np.max(np.abs(self.minima - x), axis=1)))


def rosenbrock(x: jax.Array) -> jax.Array:
  """Rosenbrock's valley, minimum 0 at (1, 1)."""
  return 100.0 * (x[1] - x[0]**2)**2 + (1.0 - x[0])**2


def extended_rosenbrock(x: jax.Array) -> jax.Array:
  """Sum of independent Rosenbrock pairs (More et al. 1981, problem 21)."""
  odd, even = x[0::2], x[1::2]
  return jnp.sum(100.0 * (even - odd**2)**2 + (1.0 - odd)**2)


def himmelblau(x: jax.Array) -> jax.Array:
  """Himmelblau's function, four minima of value 0."""
  return (x[0]**2 + x[1] - 11.0)**2 + (x[0] + x[1]**2 - 7.0)**2


def matyas(x: jax.Array) -> jax.Array:
  """Matyas function (a quadratic, condition number 25), minimum 0 at 0."""
  return 0.26 * (x[0]**2 + x[1]**2) - 0.48 * x[0] * x[1]


def zakharov(x: jax.Array) -> jax.Array:
  """Zakharov function, minimum 0 at 0."""
  weighted = jnp.sum(0.5 * jnp.arange(1, x.shape[0] + 1, dtype=x.dtype) * x)
  return jnp.sum(x**2) + weighted**2 + weighted**4


def beale(x: jax.Array) -> jax.Array:
  """Beale's function, minimum 0 at (3, 0.5)."""
  return ((1.5 - x[0] + x[0] * x[1])**2 + (2.25 - x[0] + x[0] * x[1]**2)**2
          + (2.625 - x[0] + x[0] * x[1]**3)**2)


def ill_conditioned_quadratic(dim: int = 20, condition: float = 1e3):
  """A rotated quadratic with log-spaced eigenvalues; minimiser all-ones.

  Args:
    dim: dimension.
    condition: ratio of the largest to the smallest eigenvalue.

  Returns:
    ``(fn, hessian)``: the objective and its Hessian (float64 numpy).
  """
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  eig = np.logspace(0.0, np.log10(condition), dim)
  hessian = (q * eig) @ q.T
  hessian = 0.5 * (hessian + hessian.T)
  x_star = np.ones(dim)

  def fn(x):
    diff = x - jnp.asarray(x_star, x.dtype)
    return 0.5 * diff @ (jnp.asarray(hessian, x.dtype) @ diff)

  return fn, hessian


HIMMELBLAU_MINIMA = np.array([
    [3.0, 2.0],
    [-2.805118086952745, 3.131312518250573],
    [-3.779310253377747, -3.283185991286170],
    [3.584428340330492, -1.848126526964404],
])


def suite() -> list[Problem]:
  """The benchmark suite: the five ``CORE_PROBLEMS`` plus two extras."""
  quad_fn, _ = ill_conditioned_quadratic()
  return [
      Problem('rosenbrock', rosenbrock, np.array([-1.2, 1.0]),
              np.ones((1, 2))),
      Problem('himmelblau', himmelblau, np.array([0.0, 0.0]),
              HIMMELBLAU_MINIMA),
      Problem('matyas', matyas, np.array([3.0, -1.0]), np.zeros((1, 2))),
      Problem('zakharov', zakharov, np.array([1.0, -0.5, 0.8, 0.3, -1.0]),
              np.zeros((1, 5))),
      Problem('ext_rosenbrock_10', extended_rosenbrock,
              np.tile([-1.2, 1.0], 5), np.ones((1, 10))),
      Problem('beale', beale, np.array([1.0, 1.0]), np.array([[3.0, 0.5]])),
      Problem('quadratic_20_cond1e3', quad_fn, np.zeros(20),
              np.ones((1, 20))),
  ]


CORE_PROBLEMS = ('rosenbrock', 'himmelblau', 'matyas', 'zakharov',
                 'ext_rosenbrock_10')
