"""Tests for pdcnno_jax.optim.cgmse (DESIGN.md "CGMSE")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdcnno_jax.optim import cgmse as cgmse_lib
from pdcnno_jax.testing import problems as test_problems


@pytest.fixture(name='x64')
def fixture_x64():
  """Runs a test in float64 and restores the previous setting."""
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


def _run(opt, fn, x0, num_steps):
  """Runs `num_steps` full-batch updates under one jit; returns a trace.

  Returns:
    (final params, final state, per-step (value, state.info)).
  """
  value_and_grad = optax.value_and_grad_from_state(fn)

  def body(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=fn)
    return (optax.apply_updates(params, updates), state), (value, state.info)

  @jax.jit
  def run(x0):
    (params, state), trace = jax.lax.scan(
        body, (x0, opt.init(x0)), None, length=num_steps)
    return params, state, trace

  return run(x0)


def _random_spd(rng, dim, condition=50.0):
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  return (q * np.logspace(0, np.log10(condition), dim)) @ q.T


def _direction_fn(fn, **kwargs):
  """Jitted cgmse_direction for a step x_prev -> x of objective fn."""
  value_and_grad = jax.value_and_grad(fn)

  @jax.jit
  def direction(x_prev, x):
    f_prev, g_prev = value_and_grad(x_prev)
    f, g = value_and_grad(x)
    return cgmse_lib.cgmse_direction(
        g, f, g_prev, f_prev, x - x_prev, -g_prev, first=False, **kwargs)

  return direction


# --- The modified secant equation -------------------------------------------


def test_theta_is_zero_on_a_quadratic(x64):
  rng = np.random.default_rng(0)
  a = jnp.asarray(_random_spd(rng, 6))
  b = jnp.asarray(rng.normal(size=6))
  fn = lambda x: 0.5 * x @ a @ x - b @ x
  direction = _direction_fn(fn)
  for _ in range(5):
    x_prev, x = (jnp.asarray(rng.normal(size=6)) for _ in range(2))
    out = direction(x_prev, x)
    scale = abs(float(fn(x))) + abs(float(fn(x_prev))) + 1.0
    assert abs(float(out.theta)) < 1e-12 * scale
    s = x - x_prev
    np.testing.assert_allclose(out.curvature, s @ a @ s, rtol=1e-12)


def test_secant_curvature_equals_hessian_curvature_on_a_cubic(x64):
  rng = np.random.default_rng(1)
  dim = 4
  a = jnp.asarray(_random_spd(rng, dim))
  tensor = jnp.asarray(rng.normal(size=(dim, dim, dim)))
  fn = lambda x: 0.5 * x @ a @ x + jnp.einsum('ijk,i,j,k->', tensor, x, x, x)
  direction, hessian = _direction_fn(fn), jax.jit(jax.hessian(fn))
  checked = 0
  for _ in range(10):
    x_prev, x = (jnp.asarray(rng.normal(size=dim)) for _ in range(2))
    out = direction(x_prev, x)
    if out.theta <= 0:  # max(theta, 0) in z: only theta > 0 corrects y.
      x_prev, x = x, x_prev
      out = direction(x_prev, x)
    assert out.theta > 0
    s = x - x_prev
    s_hess_s = s @ hessian(x) @ s
    np.testing.assert_allclose(out.curvature, s_hess_s, rtol=1e-10)
    checked += 1
  assert checked == 10


def test_secant_weight_zero_gives_plain_secant(x64):
  rng = np.random.default_rng(2)
  fn = lambda x: jnp.sum(x**4) + jnp.sum(x**2)
  x_prev, x = jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=3))
  out = _direction_fn(fn, secant_weight=0.0)(x_prev, x)
  y = jax.grad(fn)(x) - jax.grad(fn)(x_prev)
  np.testing.assert_allclose(out.curvature, (x - x_prev) @ y, rtol=1e-12)


# --- Linear CG as a special case ---------------------------------------------


def test_t0_exact_linesearch_on_quadratic_is_linear_cg(x64):
  dim = 8
  rng = np.random.default_rng(3)
  a = _random_spd(rng, dim, condition=100.0)
  b = rng.normal(size=dim)
  fn = lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x
  opt = cgmse_lib.cgmse(t=0.0, curv_rtol=1e-9, approx_dec_rtol=None,
                        stepsize_precision=1e-14, max_linesearch_steps=60)
  x0 = np.zeros(dim)

  # Textbook linear CG (Nocedal-Wright Algorithm 5.2).
  x, r = x0.copy(), a @ x0 - b
  p = -r
  cg_iterates, cg_directions = [], []
  for _ in range(dim):
    alpha = (r @ r) / (p @ a @ p)
    cg_directions.append(p)
    x = x + alpha * p
    r_new = r + alpha * a @ p
    p = -r_new + (r_new @ r_new) / (r @ r) * p
    r = r_new
    cg_iterates.append(x)

  params, state = jnp.asarray(x0), opt.init(jnp.asarray(x0))
  directions, iterates = [], []
  value_and_grad = jax.jit(jax.value_and_grad(fn))
  update = jax.jit(functools.partial(opt.update, value_fn=fn))
  for _ in range(dim):
    value, grad = value_and_grad(params)
    updates, state = update(grad, state, params, value=value, grad=grad)
    params = optax.apply_updates(params, updates)
    directions.append(np.asarray(state.prev_direction))
    iterates.append(np.asarray(params))

  x_star = np.linalg.solve(a, b)
  np.testing.assert_allclose(params, x_star, atol=1e-7)
  for mine, textbook in zip(iterates, cg_iterates):
    np.testing.assert_allclose(mine, textbook, atol=1e-6)
  d = np.stack(directions)
  gram = d @ a @ d.T
  norms = np.sqrt(np.diag(gram))
  off_diagonal = gram / np.outer(norms, norms) - np.eye(dim)
  assert np.max(np.abs(off_diagonal)) < 1e-5


# --- Convergence on the deterministic suite ----------------------------------


@pytest.mark.parametrize('name', test_problems.CORE_PROBLEMS)
def test_reaches_known_minimum(x64, name):
  problem = {p.name: p for p in test_problems.suite()}[name]
  params, state, (values, info) = _run(
      cgmse_lib.cgmse(), problem.fn, jnp.asarray(problem.x0), 60)
  assert problem.distance(params) < 1e-5
  assert np.all(np.isfinite(params))
  # Every accepted step is a sufficient descent direction and lowers f.
  slopes, restarted = np.asarray(info.slope), np.asarray(info.restarted)
  assert np.all(slopes <= 0.0)
  values = np.asarray(values)
  assert np.all(np.diff(values) <= 1e-6 * np.abs(values[:-1]))
  assert restarted[0]
  assert int(state.num_restarts) == int(restarted.sum())


def _logistic_data(num=300, dim=4):
  rng = np.random.default_rng(4)
  features = rng.normal(size=(num, dim))
  logits = features @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.3
  labels = (rng.uniform(size=num) < 1 / (1 + np.exp(-logits))).astype(float)
  return features, labels


@pytest.mark.parametrize('lam, tol', [(1e-8, 5e-2), (1e-2, 1e-4)])
def test_logistic_regression_matches_sklearn(x64, lam, tol):
  linear_model = pytest.importorskip('sklearn.linear_model')
  features, labels = _logistic_data()
  num = len(labels)
  x, y = jnp.asarray(features), jnp.asarray(labels)

  def loss(params):
    logits = x @ params['w'] + params['b']
    data_loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
    return data_loss + 0.5 * lam * params['w'] @ params['w']

  params0 = {'w': jnp.zeros(4), 'b': jnp.zeros(())}
  params, _, _ = _run(cgmse_lib.cgmse(), loss, params0, 100)
  # sklearn minimises C * sum(loss) + 0.5 |w|^2, i.e. lam = 1 / (C num).
  reference = linear_model.LogisticRegression(
      C=1.0 / (lam * num), tol=1e-12, max_iter=10_000).fit(features, labels)
  np.testing.assert_allclose(params['w'], reference.coef_[0], atol=tol)
  np.testing.assert_allclose(params['b'], reference.intercept_[0], atol=tol)


# --- Restarts -----------------------------------------------------------------


def _direction_args(**overrides):
  """A consistent non-restarting configuration; override one piece."""
  args = dict(
      grad=jnp.array([0.5, 0.5]), value=jnp.asarray(0.0),
      prev_grad=jnp.array([-1.0, 0.0]), prev_value=jnp.asarray(0.0),
      step=jnp.array([1.0, 0.0]), prev_direction=jnp.array([1.0, 0.0]),
      first=jnp.asarray(False))
  args.update(overrides)
  return args


def test_direction_without_restart_is_conjugate_update():
  args = _direction_args()
  out = cgmse_lib.cgmse_direction(**args, t=0.1)
  assert not out.restarted
  assert out.beta > 0
  np.testing.assert_allclose(
      out.direction, -args['grad'] + out.beta * args['prev_direction'],
      rtol=1e-6)
  np.testing.assert_allclose(out.slope, args['grad'] @ out.direction,
                             rtol=1e-6)


@pytest.mark.parametrize('trigger, overrides, kwargs', [
    ('first iteration', dict(first=jnp.asarray(True)), {}),
    ('zero step', dict(step=jnp.zeros(2)), {}),
    ('non-finite step', dict(step=jnp.array([jnp.nan, 1.0])), {}),
    # Concave along s: y = -2 s, theta = 0, so s^T z < 0.
    ('negative curvature',
     dict(prev_grad=jnp.array([2.5, 0.5]), value=jnp.asarray(1.5)), {}),
    # t = 0 and g parallel to d_{k-1}: beta g^T d = |g|^2, so g^T d = 0.
    ('not a descent direction', dict(grad=jnp.array([1.0, 0.0])),
     dict(t=0.0)),
])
def test_restart_fires(trigger, overrides, kwargs):
  args = _direction_args(**overrides)
  out = cgmse_lib.cgmse_direction(**args, **kwargs)
  assert out.restarted, trigger
  assert out.beta == 0
  np.testing.assert_array_equal(out.direction, -args['grad'])
  assert np.all(np.isfinite(out.direction))


def test_restart_fires_in_the_transform_on_a_repeated_point():
  fn = test_problems.rosenbrock
  opt = cgmse_lib.cgmse()
  update = jax.jit(functools.partial(opt.update, value_fn=fn))
  params = jnp.array([-1.2, 1.0])
  state = opt.init(params)
  value, grad = jax.value_and_grad(fn)(params)
  _, state = update(grad, state, params, value=value, grad=grad)
  # Same params again: the step s is zero, so CGMSE restarts.
  _, state = update(grad, state, params, value=value, grad=grad)
  assert state.info.restarted
  assert int(state.num_restarts) == 2


# --- Robustness ------------------------------------------------------------


def test_zero_update_and_no_nan_at_the_minimum(x64):
  problem = test_problems.suite()[0]  # Rosenbrock.
  x_star = jnp.asarray(problem.minima[0])
  params, state, (values, info) = _run(cgmse_lib.cgmse(), problem.fn, x_star,
                                       5)
  np.testing.assert_array_equal(params, x_star)
  for leaf in jax.tree.leaves(state):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      assert not np.any(np.isnan(leaf))
  assert np.all(np.asarray(values) == 0.0)


def test_non_finite_gradient_gives_zero_update():
  opt = cgmse_lib.cgmse()
  params = jnp.ones(3)
  state = opt.init(params)
  fn = lambda p: jnp.sum(p**2)
  grad = jnp.array([1.0, jnp.nan, 0.0])
  updates, state = opt.update(grad, state, params, value=jnp.asarray(3.0),
                              grad=grad, value_fn=fn)
  np.testing.assert_array_equal(updates, jnp.zeros(3))
  assert not state.info.accepted


def test_pytree_and_flat_parameters_agree(x64):
  fn_flat = test_problems.extended_rosenbrock
  x0 = jnp.asarray(np.tile([-1.2, 1.0], 5))
  fn_tree = lambda p: fn_flat(jnp.concatenate([p['a'], p['b'].ravel()]))
  tree0 = {'a': x0[:4], 'b': x0[4:].reshape(2, 3)}
  flat, _, _ = _run(cgmse_lib.cgmse(), fn_flat, x0, 15)
  tree, _, _ = _run(cgmse_lib.cgmse(), fn_tree, tree0, 15)
  np.testing.assert_allclose(
      jnp.concatenate([tree['a'], tree['b'].ravel()]), flat, rtol=1e-9,
      atol=1e-12)


def test_float32_under_jit_keeps_dtypes_and_converges():
  problem = test_problems.suite()[0]  # Rosenbrock.
  x0 = jnp.asarray(problem.x0, jnp.float32)
  params, state, _ = _run(cgmse_lib.cgmse(), problem.fn, x0, 80)
  assert params.dtype == jnp.float32
  for leaf in jax.tree.leaves(state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert problem.distance(params) < 1e-2


def test_fixed_learning_rate_skips_the_linesearch(x64):
  a = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
  fn = lambda x: 0.5 * x @ a @ x
  opt = cgmse_lib.cgmse(learning_rate=0.1)
  params, state, (_, info) = _run(opt, fn, jnp.ones(3), 200)
  assert int(state.num_evals) == 0
  np.testing.assert_allclose(info.stepsize, 0.1)
  assert float(fn(params)) < 1e-10


# --- Modes and counters ------------------------------------------------------


def _batched_quartic(params, batch):
  return jnp.mean((batch @ params - 1.0)**2) + 0.1 * jnp.sum(params**4)


def test_minibatch_mode_on_a_fixed_batch_equals_full_batch(x64):
  batch = jnp.asarray(np.random.default_rng(5).normal(size=(16, 3)))
  results = {}
  for mode in ('full_batch', 'minibatch'):
    opt = cgmse_lib.cgmse(mode=mode, curv_rtol=0.1)  # Same line search.
    params = jnp.zeros(3)
    state = opt.init(params)
    update = jax.jit(functools.partial(opt.update, value_fn=_batched_quartic))
    value_and_grad = jax.jit(jax.value_and_grad(_batched_quartic))
    for _ in range(6):
      value, grad = value_and_grad(params, batch)
      updates, state = update(grad, state, params, value=value, grad=grad,
                              batch=batch)
      params = optax.apply_updates(params, updates)
    results[mode] = (params, state)
  (p_full, s_full), (p_mini, s_mini) = results['full_batch'], results[
      'minibatch']
  np.testing.assert_allclose(p_mini, p_full, rtol=1e-10)
  # Mini-batch mode re-evaluates at x_{k-1} once per step after the first.
  assert int(s_mini.num_evals) == int(s_full.num_evals) + 5


def test_minibatch_curvature_uses_the_current_batch(x64):
  rng = np.random.default_rng(6)
  batches = [jnp.asarray(rng.normal(size=(8, 3))) for _ in range(2)]
  opt = cgmse_lib.cgmse(mode='minibatch')
  update = jax.jit(functools.partial(opt.update, value_fn=_batched_quartic))
  params0 = jnp.array([0.3, -0.2, 0.1])
  state = opt.init(params0)
  value_and_grad = jax.jit(jax.value_and_grad(_batched_quartic))
  value, grad = value_and_grad(params0, batches[0])
  updates, state = update(grad, state, params0, value=value, grad=grad,
                          batch=batches[0])
  params1 = optax.apply_updates(params0, updates)
  value, grad = value_and_grad(params1, batches[1])
  _, state = update(grad, state, params1, value=value, grad=grad,
                    batch=batches[1])
  f_prev, g_prev = value_and_grad(params0, batches[1])
  s = params1 - params0
  theta = 6 * (f_prev - value) + 3 * (g_prev + grad) @ s
  np.testing.assert_allclose(state.info.theta, theta, rtol=1e-10)
  assert not jnp.isfinite(state.value)  # Never reused across batches.


def test_full_batch_counts_linesearch_evaluations(x64):
  problem = test_problems.suite()[0]
  _, state, (_, info) = _run(cgmse_lib.cgmse(), problem.fn,
                             jnp.asarray(problem.x0), 10)
  assert int(state.num_evals) == int(np.sum(info.num_linesearch_steps))
  assert int(state.count) == 10


# --- Integration: checkpointing, sharding, errors ---------------------------


def test_state_checkpoints_and_resumes(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  fn = test_problems.rosenbrock
  opt = cgmse_lib.cgmse()
  params = jnp.array([-1.2, 1.0])
  state = opt.init(params)
  value, grad = jax.value_and_grad(fn)(params)
  updates, state = jax.jit(functools.partial(opt.update, value_fn=fn))(
      grad, state, params, value=value, grad=grad)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / 'state', state)
  assert isinstance(restored, cgmse_lib.ScaleByCgmseState)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  del updates


def test_replicated_params_on_a_mesh_under_jit():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = test_problems.rosenbrock
  opt = cgmse_lib.cgmse()
  params = jax.device_put(jnp.array([-1.2, 1.0]), replicated)
  state = jax.device_put(opt.init(params), replicated)

  @jax.jit
  def step(params, state):
    value, grad = jax.value_and_grad(fn)(params)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=fn)
    return optax.apply_updates(params, updates), state

  new_params, new_state = step(params, state)
  assert new_params.sharding.is_equivalent_to(replicated, new_params.ndim)
  assert fn(new_params) < fn(params)
  del new_state


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='mode'):
    cgmse_lib.cgmse(mode='stochastic')
  with pytest.raises(ValueError, match='initial_guess'):
    cgmse_lib.cgmse(initial_guess='two')
  with pytest.raises(ValueError, match='t must be'):
    cgmse_lib.cgmse(t=-1.0)
  opt = cgmse_lib.cgmse()
  params = jnp.ones(2)
  state = opt.init(params)
  with pytest.raises(ValueError, match='value_fn'):
    opt.update(params, state, params, value=jnp.asarray(1.0), grad=params)
  with pytest.raises(ValueError, match='value='):
    opt.update(params, state, params, grad=params, value_fn=jnp.sum)
  with pytest.raises(TypeError, match='batch'):
    opt.update(params, state, params, value=jnp.asarray(1.0), grad=params,
               value_fn=lambda p: jnp.sum(p), batch=params)


def test_start_new_objective_restarts_and_reevaluates(x64):
  rng = np.random.default_rng(7)
  batches = [jnp.asarray(rng.normal(size=(8, 3))) for _ in range(2)]
  opt = cgmse_lib.cgmse()
  value_and_grad = optax.value_and_grad_from_state(_batched_quartic)
  update = jax.jit(functools.partial(opt.update, value_fn=_batched_quartic))
  params = jnp.array([0.3, -0.2, 0.1])
  state = opt.init(params)
  for batch in (batches[0], batches[0], batches[1]):
    if batch is batches[1]:
      state = cgmse_lib.start_new_objective(state, params)
      assert not jnp.isfinite(state.value)
    value, grad = value_and_grad(params, batch, state=state)
    updates, state = update(grad, state, params, value=value, grad=grad,
                            batch=batch)
    params = optax.apply_updates(params, updates)
  assert state.info.restarted
  np.testing.assert_allclose(state.prev_value,
                             _batched_quartic(state.prev_params, batches[1]))
  assert int(state.num_restarts) == 2
