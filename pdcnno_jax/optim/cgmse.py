"""CGMSE: conjugate gradients on a modified secant equation, as an optax transform.

PDCNNO's Map-phase optimizer. With ``s = x_k - x_{k-1}`` and ``y = g_k - g_{k-1}``
(both gradients on the same data)::

  theta = 6 (f_{k-1} - f_k) + 3 (g_{k-1} + g_k)^T s                 (Zhang-Deng-Chen)
  z     = y + rho * max(theta, 0) / ||s||^2 * s
  beta  = max(g_k^T z / d_{k-1}^T z, 0) - t g_k^T s / d_{k-1}^T z   (Dai-Liao+, Yabe-Takano)
  d_k   = -g_k + beta d_{k-1}

The step size comes from optax's strong-Wolfe zoom line search, called inside the
transform. The direction restarts (``d_k = -g_k``) at ``k = 0``, after a zero or non-finite
step, when ``s^T z <= 1e-12 ||s|| ||z||`` and when ``g_k^T d_k > -1e-4 ||g_k||^2``. Two
modes (see :func:`scale_by_cgmse`): ``'full_batch'`` (one fixed objective, e.g. a data
shard; call :func:`start_new_objective` when it changes) and ``'minibatch'`` (``f_{k-1}``
and ``g_{k-1}`` re-evaluated on each new batch).

References:
  DESIGN.md, "CGMSE" (the authority for this implementation); PDCNNO
  (``papers/pdcnno_mapreduce_cgmse.txt``), Section 4.2.
  Zhang, Deng and Chen, JOTA 102, 1999 (theta). Yabe and Takano, COAP 28, 2004 (z, beta).
  Dai and Liao, AMO 43, 2001 (the t term and the truncation).
  Nocedal and Wright, Numerical Optimization, 2nd ed., eq. (3.60) (initial step guess).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

MODES = ('full_batch', 'minibatch')  # config.optimizer.mode
INITIAL_GUESSES = ('scaled', 'interpolate', 'keep', 'one')

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class CgmseInfo(NamedTuple):
  """What the last CGMSE step did (for logging and tests).

  Attributes:
    accepted: whether the last step was taken. ``False`` when the line search
      returned a step that raised the objective (or a non-finite one) or the
      input value/gradient was not finite; the update is then zero.
    restarted: whether the last direction was the steepest descent ``-g``.
    theta: the Zhang-Deng-Chen correction ``theta`` of the last step.
    beta: the conjugacy parameter used (0 on a restart).
    stepsize: the step size taken along the direction.
    slope: ``g_k^T d_k``, negative for a descent direction.
    num_linesearch_steps: line-search trials of the last step (0 with a fixed
      learning rate).
  """

  accepted: jax.Array
  restarted: jax.Array
  theta: jax.Array
  beta: jax.Array
  stepsize: jax.Array
  slope: jax.Array
  num_linesearch_steps: jax.Array


class ScaleByCgmseState(NamedTuple):
  """State of :func:`scale_by_cgmse`; a pytree of arrays (orbax-checkpointable).

  Attributes:
    count: number of updates done (``k``).
    prev_params: ``x_{k-1}``, the parameters at the previous call.
    prev_value: ``f_{k-1}`` as passed at the previous call.
    prev_grad: ``g_{k-1}`` as passed at the previous call.
    prev_direction: ``d_{k-1}``.
    value: objective at the accepted step, reused by
      :func:`optax.value_and_grad_from_state` in full-batch mode; ``inf`` when
      it must not be reused (mini-batch mode, fixed learning rate).
    grad: gradient at the accepted step (see ``value``).
    num_evals: value-and-gradient evaluations made *inside* the transform (line
      search trials and, in mini-batch mode, the re-evaluation at ``x_{k-1}``).
      The caller's own evaluations are not included.
    num_restarts: number of steepest-descent restarts so far.
    info: diagnostics of the last step.
  """

  count: jax.Array
  prev_params: optax.Params
  prev_value: jax.Array
  prev_grad: optax.Updates
  prev_direction: optax.Updates
  value: jax.Array
  grad: optax.Updates
  num_evals: jax.Array
  num_restarts: jax.Array
  info: CgmseInfo


class CgmseDirection(NamedTuple):
  """Output of :func:`cgmse_direction`.

  Attributes:
    direction: the new search direction ``d_k``.
    restarted: whether ``d_k = -g_k`` was used.
    theta: Zhang-Deng-Chen ``theta``.
    beta: conjugacy parameter used (0 on a restart).
    slope: ``g_k^T d_k``.
    curvature: ``s^T z``, the modified-secant curvature along the step.
  """

  direction: optax.Updates
  restarted: jax.Array
  theta: jax.Array
  beta: jax.Array
  slope: jax.Array
  curvature: jax.Array


def _vdot(a: Any, b: Any) -> jax.Array:
  """Real inner product of two pytrees with the same structure."""
  leaves = jax.tree.leaves(jax.tree.map(
      lambda u, v: jnp.vdot(u, v).real, a, b))
  return sum(leaves[1:], leaves[0]) if leaves else jnp.zeros(())


def _all_finite(tree: Any) -> jax.Array:
  """Whether every entry of a pytree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _real_dtype(tree: Any) -> jnp.dtype:
  """Real floating dtype of the first leaf of ``tree``."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError('CGMSE needs at least one parameter array; got an empty '
                     'pytree.')
  return jnp.real(jnp.empty((), leaves[0].dtype)).dtype


def cgmse_direction(
    grad: optax.Updates,
    value: jax.Array,
    prev_grad: optax.Updates,
    prev_value: jax.Array,
    step: optax.Updates,
    prev_direction: optax.Updates,
    *,
    first: jax.Array,
    t: float = 0.1,
    secant_weight: float = 1.0,
    curvature_rtol: float = 1e-12,
    descent_rtol: float = 1e-4,
) -> CgmseDirection:
  r"""The CGMSE search direction ``d_k`` and its restart decision.

  Args:
    grad: ``g_k``, gradient at the current parameters.
    value: ``f_k``, objective at the current parameters.
    prev_grad: ``g_{k-1}``, gradient at the previous parameters, on the same
      data as ``grad``.
    prev_value: ``f_{k-1}``, on the same data as ``value``.
    step: ``s = x_k - x_{k-1}``.
    prev_direction: ``d_{k-1}``.
    first: boolean scalar; ``True`` forces a restart (``k = 0``).
    t: Dai-Liao parameter ``t >= 0`` (``t = 0`` gives Hestenes-Stiefel+ on the
      modified secant).
    secant_weight: ``rho >= 0``, the weight of the Zhang-Deng-Chen correction
      in ``z`` (``rho = 0`` gives plain ``z = y``).
    curvature_rtol: restart when ``s^T z <= curvature_rtol ||s|| ||z||``.
    descent_rtol: restart when ``g^T d > -descent_rtol ||g||^2``.

  Returns:
    A :class:`CgmseDirection`.

  References:
    DESIGN.md "CGMSE" (z, beta, restarts); Zhang, Deng and Chen (1999) eq. for
    theta; Yabe and Takano (2004) eq. (1.9)-(1.10).
  """
  # Inner products only: z = y + c s is never materialised.
  y = jax.tree.map(jnp.subtract, grad, prev_grad)
  ss = _vdot(step, step)
  sy = _vdot(step, y)
  yy = _vdot(y, y)
  gs = _vdot(grad, step)
  gy = _vdot(grad, y)
  dy = _vdot(prev_direction, y)
  ds = _vdot(prev_direction, step)
  gd_prev = _vdot(grad, prev_direction)
  gg = _vdot(grad, grad)

  theta = 6.0 * (prev_value - value) + 3.0 * (_vdot(prev_grad, step) + gs)
  zero_step = ss <= 0.0
  safe_ss = jnp.where(zero_step, 1.0, ss)
  coef = secant_weight * jnp.maximum(theta, 0.0) / safe_ss
  sz = sy + coef * ss
  zz = jnp.maximum(yy + 2.0 * coef * sy + coef**2 * ss, 0.0)
  dz = dy + coef * ds
  gz = gy + coef * gs

  bad_curvature = ~(sz > curvature_rtol * jnp.sqrt(ss) * jnp.sqrt(zz))
  safe_dz = jnp.where(dz == 0.0, 1.0, dz)
  beta = jnp.maximum(gz / safe_dz, 0.0) - t * gs / safe_dz
  slope = -gg + beta * gd_prev
  not_descent = slope > -descent_rtol * gg
  restarted = (jnp.asarray(first) | zero_step | ~jnp.isfinite(ss)
               | ~jnp.isfinite(theta) | bad_curvature | (dz == 0.0)
               | ~jnp.isfinite(beta) | not_descent)
  beta = jnp.where(restarted, jnp.zeros_like(beta), beta)
  slope = jnp.where(restarted, -gg, slope)
  direction = jax.tree.map(
      lambda g, d: jnp.where(restarted, -g, -g + beta.astype(g.dtype) * d),
      grad, prev_direction)
  return CgmseDirection(direction, restarted, theta, beta, slope, sz)


class _Settings(NamedTuple):
  """The static choices of one :func:`scale_by_cgmse` (validated)."""

  minibatch: bool
  t: float
  secant_weight: float
  learning_rate: Optional[ScalarOrSchedule]
  max_learning_rate: Optional[float]
  approx_dec_rtol: Optional[float]
  initial_guess: str
  max_guess_growth: float
  curvature_rtol: float
  descent_rtol: float

  @property
  def use_linesearch(self) -> bool:
    return self.learning_rate is None


def _validate_settings(mode: str, t: float, secant_weight: float,
                       learning_rate: Optional[ScalarOrSchedule], max_linesearch_steps: int,
                       initial_guess: str, max_guess_growth: float) -> None:
  """Raises ValueError on an unusable :func:`scale_by_cgmse` argument."""
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
  if initial_guess not in INITIAL_GUESSES:
    raise ValueError(
        f'initial_guess must be one of {INITIAL_GUESSES}, got '
        f'{initial_guess!r}.')
  if t < 0:
    raise ValueError(f't must be >= 0 (Dai-Liao parameter), got {t}.')
  if secant_weight < 0:
    raise ValueError(f'secant_weight must be >= 0, got {secant_weight}.')
  if not max_guess_growth > 0:
    raise ValueError(
        f'max_guess_growth must be > 0, got {max_guess_growth}.')
  if learning_rate is None and max_linesearch_steps < 1:
    raise ValueError('max_linesearch_steps must be >= 1 when the line search '
                     f'is used, got {max_linesearch_steps}.')


def _split_fn_kwargs(
    value_fn: Callable[..., Any], extra_args: dict[str, Any]
) -> dict[str, Any]:
  """Returns the keyword arguments of ``extra_args`` that ``value_fn`` takes.

  Raises:
    TypeError: if some keyword argument is not taken by ``value_fn``.
  """
  params = inspect.signature(value_fn).parameters
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return dict(extra_args)
  unused = sorted(k for k in extra_args if k not in params)
  if unused:
    raise TypeError(
        f'cgmse.update got keyword arguments {unused} that value_fn does not '
        f'accept (its parameters: {list(params)}). Pass only the extra inputs '
        'of value_fn (e.g. the batch) as keywords.')
  return dict(extra_args)


def _update_inputs(settings: _Settings, params: Optional[optax.Params],
                   value: Optional[jax.Array], value_fn: Optional[Callable[..., jax.Array]],
                   extra_args: dict[str, Any]) -> dict[str, Any]:
  """Checks the arguments of ``update``; returns the keyword arguments of ``value_fn``."""
  if params is None:
    raise ValueError('cgmse.update needs params (the current parameters).')
  if value is None:
    raise ValueError('cgmse.update needs value=, the objective at params on '
                     'the current data (theta uses f_{k-1} - f_k).')
  if value_fn is None and (settings.use_linesearch or settings.minibatch):
    raise ValueError(
        'cgmse.update needs value_fn=, the objective as a function of params '
        '(and of the keyword arguments passed to update): the line search '
        'and mini-batch mode evaluate it.')
  fn_kwargs = (_split_fn_kwargs(value_fn, extra_args)
               if value_fn is not None else {})
  if value_fn is None and extra_args:
    raise TypeError(f'Unexpected keyword arguments {sorted(extra_args)}: '
                    'without value_fn nothing consumes them.')
  return fn_kwargs


def _init_state(params: optax.Params) -> ScaleByCgmseState:
  """The state before the first step: ``k = 0``, nothing to reuse (``value = inf``)."""
  dtype = _real_dtype(params)
  zero = jnp.zeros((), dtype)
  return ScaleByCgmseState(
      count=jnp.zeros((), jnp.int32),
      prev_params=jax.tree.map(jnp.asarray, params),
      prev_value=zero,
      prev_grad=jax.tree.map(jnp.zeros_like, params),
      prev_direction=jax.tree.map(jnp.zeros_like, params),
      value=jnp.asarray(jnp.inf, dtype),
      grad=jax.tree.map(jnp.zeros_like, params),
      num_evals=jnp.zeros((), jnp.int32),
      num_restarts=jnp.zeros((), jnp.int32),
      info=CgmseInfo(
          accepted=jnp.asarray(True),
          restarted=jnp.asarray(False),
          theta=zero,
          beta=zero,
          stepsize=zero,
          slope=zero,
          num_linesearch_steps=jnp.zeros((), jnp.int32),
      ),
  )


def _previous_point(settings: _Settings, state: ScaleByCgmseState, value: jax.Array,
                    grad: optax.Updates, value_fn: Optional[Callable[..., jax.Array]],
                    fn_kwargs: dict[str, Any], dtype: jnp.dtype
                    ) -> tuple[jax.Array, optax.Updates, jax.Array]:
  """``(f_{k-1}, g_{k-1}, num_evals)`` on the data of the current call.

  Full batch: the values passed at the previous call. Mini-batch: the curvature pair must
  not mix batches, so ``value_and_grad(value_fn)`` is evaluated at ``x_{k-1}`` on this
  batch (one evaluation, none at ``k = 0``).
  """
  first = state.count == 0
  num_evals = state.num_evals
  if settings.minibatch:
    value_and_grad_fn = jax.value_and_grad(value_fn)

    def _at_prev_params():
      prev_v, prev_g = value_and_grad_fn(state.prev_params, **fn_kwargs)
      return (jnp.asarray(prev_v, dtype),
              jax.tree.map(lambda a, b: a.astype(b.dtype), prev_g, grad))

    prev_value, prev_grad = jax.lax.cond(
        first, lambda: (value, grad), _at_prev_params)
    num_evals = num_evals + jnp.where(first, 0, 1).astype(jnp.int32)
  else:
    prev_value, prev_grad = state.prev_value, state.prev_grad
  return jnp.asarray(prev_value, dtype), prev_grad, num_evals


def _initial_stepsize(settings: _Settings, state: ScaleByCgmseState, slope: jax.Array,
                      grad: optax.Updates, value: jax.Array, prev_value: jax.Array,
                      dtype: jnp.dtype) -> jax.Array:
  """First trial step of the line search (Nocedal-Wright Sec. 3.5)."""
  initial_guess = settings.initial_guess
  grad_norm = jnp.sqrt(_vdot(grad, grad))
  fallback = jnp.minimum(1.0, 1.0 / jnp.maximum(grad_norm, 1e-30))
  prev_step = state.info.stepsize
  safe_slope = jnp.where(slope == 0, -1.0, slope)
  if initial_guess == 'one':
    guess = jnp.ones((), dtype)
  elif initial_guess == 'keep':
    guess = prev_step
  elif initial_guess == 'interpolate':
    # eq. (3.60), second form: 1.01 x the minimiser of the quadratic through
    # f_{k-1}, f_k and the slope g_k^T d_k.
    guess = 2.02 * (value - prev_value) / safe_slope
  else:  # 'scaled', eq. (3.60): alpha_{k-1} g_{k-1}^T d_{k-1} / g_k^T d_k.
    guess = prev_step * state.info.slope / safe_slope
  if initial_guess in ('scaled', 'interpolate'):
    # An overshoot costs a halving per line-search trial, an undershoot a
    # doubling: bound the growth over the last accepted step.
    guess = jnp.minimum(guess, settings.max_guess_growth * prev_step)
  # First step, or after a refused step: a step of length at most 1.
  valid = (state.count > 0) & jnp.isfinite(guess) & (guess > 0)
  guess = jnp.where(valid, guess, fallback)
  if settings.max_learning_rate is not None:
    guess = jnp.minimum(guess, settings.max_learning_rate)
  return jnp.asarray(guess, dtype)


class _Step(NamedTuple):
  """A step along ``d_k``: its size, cost and the objective where it lands."""

  stepsize: jax.Array
  num_linesearch_steps: jax.Array
  new_value: jax.Array
  new_grad: optax.Updates
  accepted: jax.Array


def _line_search_step(settings: _Settings, linesearch: optax.GradientTransformationExtraArgs,
                      state: ScaleByCgmseState, out: CgmseDirection, params: optax.Params,
                      value: jax.Array, grad: optax.Updates, prev_value: jax.Array,
                      value_fn: Callable[..., jax.Array], fn_kwargs: dict[str, Any],
                      dtype: jnp.dtype) -> _Step:
  """The strong-Wolfe zoom line search along ``out.direction`` from our initial guess."""
  guess = _initial_stepsize(settings, state, out.slope, grad, value, prev_value, dtype)
  ls_state = linesearch.init(params)._replace(learning_rate=guess)
  _, ls_state = linesearch.update(
      out.direction, ls_state, params, value=value, grad=grad,
      value_fn=value_fn, **fn_kwargs)
  new_value = jnp.asarray(ls_state.value, dtype)
  # When the zoom search fails it may return an "unsafe" step that raises
  # the objective; refuse it (zero step, hence a restart next time).
  slack = 0.0 if settings.approx_dec_rtol is None else settings.approx_dec_rtol * jnp.abs(
      value)
  return _Step(
      stepsize=jnp.asarray(ls_state.learning_rate, dtype),
      num_linesearch_steps=jnp.asarray(ls_state.info.num_linesearch_steps, jnp.int32),
      new_value=new_value,
      new_grad=ls_state.grad,
      accepted=jnp.isfinite(new_value) & (new_value <= value + slack))


def _fixed_step(settings: _Settings, state: ScaleByCgmseState, grad: optax.Updates,
                dtype: jnp.dtype) -> _Step:
  """A fixed step (or schedule of the step count) along ``d_k``; nothing evaluated."""
  learning_rate = settings.learning_rate
  lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
  return _Step(
      stepsize=jnp.asarray(lr, dtype),
      num_linesearch_steps=jnp.zeros((), jnp.int32),
      new_value=jnp.asarray(jnp.inf, dtype),
      new_grad=grad,
      accepted=jnp.asarray(True))


def _next_state(settings: _Settings, state: ScaleByCgmseState, out: CgmseDirection,
                step: _Step, params: optax.Params, value: jax.Array, grad: optax.Updates,
                num_evals: jax.Array, dtype: jnp.dtype
                ) -> tuple[optax.Updates, ScaleByCgmseState]:
  """The updates ``alpha_k d_k`` (zero if refused) and the state for the next call."""
  # A non-finite value or gradient gives no usable direction: skip the step.
  accepted = step.accepted & jnp.isfinite(value) & _all_finite(grad)
  stepsize = jnp.where(accepted, step.stepsize, jnp.zeros_like(step.stepsize))
  new_updates = jax.tree.map(
      lambda d: jnp.where(accepted, stepsize.astype(d.dtype) * d,
                          jnp.zeros_like(d)), out.direction)
  if settings.minibatch or not settings.use_linesearch:
    # Nothing reusable: the caller must evaluate at the new params.
    new_value, new_grad = jnp.asarray(jnp.inf, dtype), step.new_grad
  else:
    new_value, new_grad = jax.lax.cond(
        accepted, lambda: (step.new_value, step.new_grad), lambda: (value, grad))
  new_state = ScaleByCgmseState(
      count=optax.safe_int32_increment(state.count),
      prev_params=params,
      prev_value=value,
      prev_grad=grad,
      prev_direction=out.direction,
      value=new_value,
      grad=new_grad,
      num_evals=num_evals + step.num_linesearch_steps,
      num_restarts=state.num_restarts + out.restarted.astype(jnp.int32),
      info=CgmseInfo(
          accepted=accepted,
          restarted=out.restarted,
          theta=jnp.asarray(out.theta, dtype),
          beta=jnp.asarray(out.beta, dtype),
          stepsize=stepsize,
          slope=jnp.asarray(out.slope, dtype),
          num_linesearch_steps=step.num_linesearch_steps,
      ),
  )
  return new_updates, new_state


def scale_by_cgmse(
    mode: str = 'full_batch',
    t: float = 0.1,
    secant_weight: float = 1.0,
    learning_rate: Optional[ScalarOrSchedule] = None,
    max_linesearch_steps: int = 20,
    max_learning_rate: Optional[float] = None,
    slope_rtol: float = 1e-4,
    curv_rtol: Optional[float] = None,
    approx_dec_rtol: Optional[float] = 1e-6,
    increase_factor: float = 2.0,
    stepsize_precision: float = 1e-5,
    initial_guess: str = 'scaled',
    max_guess_growth: float = 4.0,
    curvature_rtol: float = 1e-12,
    descent_rtol: float = 1e-4,
    verbose: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""CGMSE search direction times a strong-Wolfe step (or a fixed step).

  The updates are the full step ``alpha_k d_k`` (apply with :func:`optax.apply_updates`).
  ``update(updates, state, params, *, value, grad=None, value_fn=None, **fn_kwargs)``:
  ``updates``/``grad`` is ``g_k``, ``value`` is ``f_k`` on the current data, and
  ``value_fn(params, **fn_kwargs)`` is the objective on that data (e.g. ``batch=...``).

  Args:
    mode: ``'full_batch'`` (fixed objective, curvature from the previous
      call's value and gradient) or ``'minibatch'`` (each call may see a new
      batch; ``f_{k-1}``, ``g_{k-1}`` are recomputed on it, one extra
      value-and-gradient evaluation per step).
    t: Dai-Liao parameter, ``t >= 0``.
    secant_weight: ``rho >= 0``, weight of the modified-secant term in ``z``.
    learning_rate: ``None`` (default) uses the zoom line search; a float or
      an optax schedule (of the step count) takes that fixed step along
      ``d_k`` instead, with no line search.
    max_linesearch_steps: most line-search trials per step.
    max_learning_rate: optional upper bound on the step size.
    slope_rtol: Armijo constant ``c_1`` of the line search.
    curv_rtol: strong-Wolfe curvature constant ``c_2``. ``None`` picks 0.1 in
      full-batch mode, the usual choice for conjugate gradients
      (Nocedal-Wright Sec. 5.2; small values approach an exact line search),
      and 0.9 in mini-batch mode, where a near-exact minimisation along ``d``
      on one small batch overfits that batch.
    approx_dec_rtol: Hager-Zhang approximate-Wolfe switch of optax's zoom line
      search; ``None`` disables it.
    increase_factor: growth of the trial step while bracketing.
    stepsize_precision: zoom stops when its interval is shorter than this.
    initial_guess: first trial step of each line search. ``'scaled'``:
      ``alpha_{k-1} g_{k-1}^T d_{k-1} / g_k^T d_k`` (Nocedal-Wright (3.60));
      ``'interpolate'``: ``1.01 * 2 (f_k - f_{k-1}) / g_k^T d_k`` (the other
      form of (3.60)); ``'keep'``: ``alpha_{k-1}``; ``'one'``: 1. The very
      first step tries ``min(1, 1 / ||g_0||)``; a non-finite or non-positive
      guess falls back to 1.
    max_guess_growth: the 'scaled' and 'interpolate' guesses are capped at
      this multiple of the last step size: an overshoot costs one halving per
      trial, an undershoot one doubling (Hager and Zhang's CG_DESCENT starts
      from 2 alpha_{k-1}); ``benchmarks/bench_cgmse_problems.py`` measures it.
    curvature_rtol: restart when ``s^T z <= curvature_rtol ||s|| ||z||``.
    descent_rtol: restart when ``g^T d > -descent_rtol ||g||^2``.
    verbose: let the zoom line search print diagnostics when it fails.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByCgmseState`.

  Raises:
    ValueError: on an unknown ``mode`` or ``initial_guess``, a negative ``t``
      or ``secant_weight``, or a non-positive ``max_guess_growth`` or
      ``max_linesearch_steps``.

  References:
    DESIGN.md "CGMSE"; PDCNNO paper Sec. 4.2; Yabe and Takano (2004).
  """
  _validate_settings(mode, t, secant_weight, learning_rate, max_linesearch_steps,
                     initial_guess, max_guess_growth)
  minibatch = mode == 'minibatch'
  if curv_rtol is None:
    curv_rtol = 0.9 if minibatch else 0.1
  settings = _Settings(
      minibatch=minibatch, t=t, secant_weight=secant_weight, learning_rate=learning_rate,
      max_learning_rate=max_learning_rate, approx_dec_rtol=approx_dec_rtol,
      initial_guess=initial_guess, max_guess_growth=max_guess_growth,
      curvature_rtol=curvature_rtol, descent_rtol=descent_rtol)
  linesearch = optax.scale_by_zoom_linesearch(
      max_linesearch_steps=max_linesearch_steps, max_learning_rate=max_learning_rate,
      slope_rtol=slope_rtol, curv_rtol=curv_rtol, approx_dec_rtol=approx_dec_rtol,
      increase_factor=increase_factor, stepsize_precision=stepsize_precision,
      initial_guess_strategy='keep', verbose=verbose)  # We hand it our own guess.

  def update_fn(
      updates: optax.Updates,
      state: ScaleByCgmseState,
      params: Optional[optax.Params] = None,
      *,
      value: Optional[jax.Array] = None,
      grad: Optional[optax.Updates] = None,
      value_fn: Optional[Callable[..., jax.Array]] = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, ScaleByCgmseState]:
    fn_kwargs = _update_inputs(settings, params, value, value_fn, extra_args)
    if grad is None:
      grad = updates
    dtype = _real_dtype(params)
    value = jnp.asarray(value, dtype)
    prev_value, prev_grad, num_evals = _previous_point(
        settings, state, value, grad, value_fn, fn_kwargs, dtype)
    out = cgmse_direction(
        grad, value, prev_grad, prev_value,
        jax.tree.map(jnp.subtract, params, state.prev_params), state.prev_direction,
        first=state.count == 0, t=t, secant_weight=secant_weight,
        curvature_rtol=curvature_rtol, descent_rtol=descent_rtol)
    if settings.use_linesearch:
      step = _line_search_step(settings, linesearch, state, out, params, value, grad,
                               prev_value, value_fn, fn_kwargs, dtype)
    else:
      step = _fixed_step(settings, state, grad, dtype)
    return _next_state(settings, state, out, step, params, value, grad, num_evals, dtype)

  return optax.GradientTransformationExtraArgs(_init_state, update_fn)


def start_new_objective(
    state: ScaleByCgmseState, params: optax.Params
) -> ScaleByCgmseState:
  """Prepares a full-batch CGMSE state for a new objective (e.g. a new shard).

  In full-batch mode the state carries ``f_{k-1}``, ``g_{k-1}`` and the value
  and gradient at the last accepted step, all of the old objective. Call this
  when the data changes: the stored value is invalidated (so
  :func:`optax.value_and_grad_from_state` re-evaluates) and the previous point
  is moved to ``params`` (a zero step, so the next direction restarts at
  ``-g``). Counters and the last step size (the next initial guess) are kept.

  Args:
    state: a :class:`ScaleByCgmseState`.
    params: the parameters the next update will be called with.

  Returns:
    The updated state.

  References:
    DESIGN.md "CGMSE" (restart on a zero step; full batch per data shard).
  """
  return state._replace(
      prev_params=jax.tree.map(jnp.asarray, params),
      value=jnp.full_like(state.value, jnp.inf))


def cgmse(
    learning_rate: Optional[ScalarOrSchedule] = None,
    *,
    mode: str = 'full_batch',
    t: float = 0.1,
    secant_weight: float = 1.0,
    max_linesearch_steps: int = 20,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""The CGMSE optimizer (PDCNNO's Map-phase optimizer), optax alias style.

  Same as :func:`scale_by_cgmse`; the updates it returns already include the
  step size, so ``params = optax.apply_updates(params, updates)``.

  ``value_fn`` must return a scalar only (no aux) and be deterministic for given keyword
  arguments (pass a dropout key as one of them). In mini-batch training::

    updates, opt_state = opt.update(grads, opt_state, params, value=loss,
                                    grad=grads, value_fn=loss_fn, batch=batch)

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from pdcnno_jax.optim import cgmse
    >>> def f(x):
    ...   return jnp.sum((x - jnp.arange(3.0)) ** 2) + 0.5 * x[0] * x[1]
    >>> opt = cgmse.cgmse()
    >>> params = jnp.zeros(3)
    >>> state = opt.init(params)
    >>> value_and_grad = optax.value_and_grad_from_state(f)
    >>> for _ in range(3):
    ...   value, grad = value_and_grad(params, state=state)
    ...   updates, state = opt.update(grad, state, params, value=value, grad=grad,
    ...                               value_fn=f)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{f(params):.4f}')
    -0.0667

  Args:
    learning_rate: ``None`` for the strong-Wolfe zoom line search (default),
      or a fixed step / schedule that replaces it.
    mode: ``'full_batch'`` or ``'minibatch'`` (see :func:`scale_by_cgmse`).
    t: Dai-Liao parameter (DESIGN.md default 0.1).
    secant_weight: weight ``rho`` of the modified-secant correction.
    max_linesearch_steps: most line-search trials per step.
    **kwargs: any other argument of :func:`scale_by_cgmse`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    DESIGN.md "CGMSE"; PDCNNO paper Sec. 4.2.
  """
  return scale_by_cgmse(
      mode=mode, t=t, secant_weight=secant_weight, learning_rate=learning_rate,
      max_linesearch_steps=max_linesearch_steps, **kwargs)
