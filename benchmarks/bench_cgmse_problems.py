r"""CGMSE vs jaxopt's nonlinear CG and optax L-BFGS on deterministic problems.

Counts iterations and gradient evaluations until the iterate is within 1e-5
(max-norm) of the nearest known minimiser, for every problem of
``pdcnno_jax.testing.problems.suite()``, all solvers side by side in one run
and in float64. Gradient evaluations are value-and-gradient calls, the
starting point's included:

* CGMSE: ``1 + state.num_evals`` (full-batch mode, the value and gradient at
  the accepted step are reused through ``optax.value_and_grad_from_state``).
* CGMSE rho=0: the same with ``secant_weight=0`` (Dai-Liao+ on the plain
  secant ``z = y``), an ablation of the modified secant equation.
* jaxopt.NonlinearCG, ``hestenes-stiefel`` (HS+) and ``polak-ribiere`` (PR+),
  with jaxopt's default settings and with CGMSE's line-search constants
  (``c2=.1``, see ``_jaxopt_runner``): ``state.num_grad_eval``.
* optax.lbfgs (default settings): ``1 + sum of num_linesearch_steps``.

The bar: on the median problem, CGMSE needs no more gradient
evaluations than jaxopt's best CG; "best" is the configuration with the
lowest median, over jaxopt's defaults alone and over all four. Run as
``python benchmarks/bench_cgmse_problems.py [--max_iterations=2000]``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import optax

from pdcnno_jax.optim import cgmse as cgmse_lib
from pdcnno_jax.testing import problems

_MAX_ITERATIONS = flags.DEFINE_integer(
    'max_iterations', 2000, 'Iteration cap per solver and problem.')
_TOLERANCE = flags.DEFINE_float(
    'tolerance', 1e-5, 'Max-norm distance to the nearest known minimiser.')

Result = tuple[int, int, bool]  # (iterations, gradient evaluations, converged)


def _run_until(problem: problems.Problem, init: Callable, step: Callable,
               evals: Callable, max_iterations: int, tol: float) -> Result:
  """Iterates ``step`` until the problem's distance to a minimiser <= tol."""
  params, state = init(jnp.asarray(problem.x0))
  iterations = 0
  while problem.distance(params) > tol and iterations < max_iterations:
    params, state = step(params, state)
    iterations += 1
  return iterations, int(evals(state)), problem.distance(params) <= tol


def _optax_runner(opt: optax.GradientTransformationExtraArgs,
                  step_evals: Optional[Callable] = None):
  """(init, step, evals) for an optax optimiser with its own line search.

  Args:
    opt: the optimiser.
    step_evals: evaluations made by one update, read from the new state; by
      default the optimiser's own counter ``state.num_evals`` (CGMSE) is used.
  """

  def make(problem):
    value_and_grad = optax.value_and_grad_from_state(problem.fn)

    @jax.jit
    def step(params, carry):
      state, num_evals = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                  value_fn=problem.fn)
      if step_evals is not None:
        num_evals = num_evals + step_evals(state)
      return optax.apply_updates(params, updates), (state, num_evals)

    init = lambda x0: (x0, (opt.init(x0), jnp.zeros((), jnp.int32)))
    if step_evals is None:
      evals = lambda carry: 1 + carry[0].num_evals  # + the starting point.
    else:
      evals = lambda carry: 1 + carry[1]
    return init, step, evals

  return make


def _jaxopt_runner(method: str, tuned: bool):
  """(init, step, evals) for jaxopt.NonlinearCG.

  Args:
    method: jaxopt's ``method`` (its beta rule, truncated at 0).
    tuned: ``False``: jaxopt's defaults (zoom line search with c2 = 0.9,
      step sizes capped at 1, 'increase' initialisation). ``True``: the same
      line-search constants as CGMSE (c2 = 0.1) with a step cap of 1e3 and
      the previous step as first guess ('current').
  """

  def make(problem):
    if tuned:
      linesearch = jaxopt.ZoomLineSearch(
          fun=problem.fn, c2=0.1, max_stepsize=1e3, maxiter=30)
      solver = jaxopt.NonlinearCG(
          problem.fn, method=method, tol=0.0, maxiter=10**9,
          linesearch=linesearch, max_stepsize=1e3, linesearch_init='current')
    else:
      solver = jaxopt.NonlinearCG(problem.fn, method=method, tol=0.0,
                                  maxiter=10**9)
    step = jax.jit(lambda params, state: tuple(solver.update(params, state)))
    init = lambda x0: (x0, solver.init_state(x0))
    return init, step, lambda state: state.num_grad_eval

  return make


SOLVERS = {
    'CGMSE': _optax_runner(cgmse_lib.cgmse()),
    'CGMSE rho=0': _optax_runner(cgmse_lib.cgmse(secant_weight=0.0)),
    'jaxopt HS+': _jaxopt_runner('hestenes-stiefel', tuned=False),
    'jaxopt PR+': _jaxopt_runner('polak-ribiere', tuned=False),
    'jaxopt HS+ c2=.1': _jaxopt_runner('hestenes-stiefel', tuned=True),
    'jaxopt PR+ c2=.1': _jaxopt_runner('polak-ribiere', tuned=True),
    'optax L-BFGS': _optax_runner(
        optax.lbfgs(), lambda s: optax.tree.get(s, 'num_linesearch_steps')),
}


def _cell(result: Result) -> str:
  iterations, evals, converged = result
  mark = '' if converged else '>'
  return f'{mark}{iterations:>5d} /{mark}{evals:>5d}'


def main(argv):
  del argv
  jax.config.update('jax_enable_x64', True)
  print(f'os.getloadavg() = {os.getloadavg()} (machine shared)')
  print(f'JAX {jax.__version__}, optax {optax.__version__}, float64, '
        f'stop at max-norm distance to the nearest minimiser <= '
        f'{_TOLERANCE.value:g}, cap {_MAX_ITERATIONS.value} iterations.')
  print('cells: iterations / gradient evaluations (">": not converged by the '
        'cap, a lower bound)\n')

  suite = problems.suite()
  results = {}
  header = f'{"problem":24s}' + ''.join(f'{name:>17s}' for name in SOLVERS)
  print(header)
  print('-' * len(header))
  for problem in suite:
    row = f'{problem.name:24s}'
    for name, make in SOLVERS.items():
      init, step, evals = make(problem)
      results[problem.name, name] = _run_until(
          problem, init, step, evals, _MAX_ITERATIONS.value, _TOLERANCE.value)
      row += f'{_cell(results[problem.name, name]):>17s}'
    print(row, flush=True)

  jaxopt_groups = {
      'jaxopt defaults': ('jaxopt HS+', 'jaxopt PR+'),
      'all four jaxopt configurations': tuple(
          k for k in SOLVERS if k.startswith('jaxopt')),
  }
  for title, names in (
      ('the five core problems', problems.CORE_PROBLEMS),
      ('all problems', [p.name for p in suite])):
    medians = {
        solver: float(np.median([results[p, solver][1] for p in names]))
        for solver in SOLVERS}
    print(f'\nMedian gradient evaluations over {title} ({len(names)}):')
    print('  ' + ', '.join(f'{k}: {v:g}' for k, v in medians.items()))
    for group, cgs in jaxopt_groups.items():
      best = min(cgs, key=medians.get)
      per_problem = [
          results[p, 'CGMSE'][1] / min(results[p, cg][1] for cg in cgs)
          for p in names]
      holds = medians['CGMSE'] <= medians[best]
      print(f'  vs {group}: best is {best} ({medians[best]:g}); CGMSE / best '
            f'= {medians["CGMSE"] / medians[best]:.3f}; median over problems '
            f'of CGMSE / per-problem best = {np.median(per_problem):.3f}')
      print(f'    "CGMSE needs no more gradient evaluations than jaxopt\'s '
            f'best CG on the median problem": '
            f'{"HOLDS" if holds else "DOES NOT HOLD"}')
    print(f'  CGMSE / optax L-BFGS, ratio of medians: '
          f'{medians["CGMSE"] / medians["optax L-BFGS"]:.3f}')


if __name__ == '__main__':
  app.run(main)
