"""The HSIC Lasso solver against scikit-learn's Lasso on the explicit n^2-row design."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import hsic_jax as hj
from hsic_jax import _checks, _fista, solver
from tests._lasso_data import design, random_problem, sklearn_lasso, small_grams


def _digits_problem(n=60):
  data = load_digits()
  x = data.data[:n].reshape(n, 8, 8) / 16.0  # channels = image rows, 8 pixels each
  y = np.eye(10)[data.target[:n]]
  return x, y


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("source", ["random", "digits"])
def test_matches_sklearn_lasso(positive, source):
  x, y = random_problem(0) if source == "random" else _digits_problem()
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, bandwidth="apib", dtype=jnp.float64)
    gy = hj.gaussian_gram(y, bandwidth="apib", dtype=jnp.float64)
    problem = hj.problem_from_grams(gx, gy, dtype=jnp.float64)
    a, b = design(gx, gy)
    for frac in (0.5, 0.1, 0.02):
      lam = frac * float(hj.lambda_max(problem, positive=positive))
      res = hj.solve(problem, lam, positive=positive, tol=1e-10, max_iter=200_000)
      w, f_sk = sklearn_lasso(a, b, lam, positive)
      f_ours = 0.5 * np.sum((b - a @ np.asarray(res.beta)) ** 2) + lam * np.sum(np.abs(np.asarray(res.beta)))
      assert bool(res.converged)
      assert (f_ours - f_sk) / f_sk <= 1e-5, (frac, f_ours, f_sk)
      assert float(res.objective) == pytest.approx(f_ours, rel=1e-8)  # reported objective is the design objective
      assert float(res.gap) <= 1e-8 * f_ours
      np.testing.assert_array_equal(np.asarray(res.selected), (w > 1e-9) if positive else (np.abs(w) > 1e-9))


def test_float32_default_reaches_tolerance():
  x, y = random_problem(1)
  p = hj.problem_from_features(x, y)
  res = hj.lasso_select_features(x, y, lam=0.0, tol=1e-4)  # least squares: converged on the KKT residual
  assert bool(res.converged) and float(res.objective) < 0.5 * float(p.const)
  lam = 0.05 * float(hj.lambda_max(p))
  res = hj.solve(p, lam, tol=1e-5)
  assert res.beta.dtype == jnp.float32 and bool(res.converged)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y, dtype=jnp.float64)
    a, b = design(gx, gy)
  _, f_sk = sklearn_lasso(a, b, lam, True)
  f32 = 0.5 * np.sum((b - a @ np.asarray(res.beta, np.float64)) ** 2) + lam * np.sum(np.asarray(res.beta))
  assert (f32 - f_sk) / f_sk <= 1e-4


def test_lambda_max_closed_form():
  x, y = random_problem(2)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y, dtype=jnp.float64)
    a, b = design(gx, gy)
    p = hj.problem_from_grams(gx, gy, dtype=jnp.float64)
    top = float(hj.lambda_max(p))
    assert top == pytest.approx(np.max(a.T @ b), rel=1e-10)  # max_k <K̄_k, L̄>
    assert float(hj.lambda_max(p, positive=False)) == pytest.approx(np.max(np.abs(a.T @ b)), rel=1e-10)
    assert not np.any(np.asarray(hj.solve(p, top * (1 + 1e-9)).selected))
    assert np.any(np.asarray(hj.solve(p, top * (1 - 1e-3)).selected))
    # scikit-learn's own alpha_max identity: alpha >= max|A'b| / rows zeroes the signed Lasso.
    w, _ = sklearn_lasso(a, b, float(hj.lambda_max(p, positive=False)) * (1 + 1e-9), False)
    assert not np.any(w)


def test_constant_channel_gets_zero_never_nan():
  x, y = random_problem(9, c=4)
  x[:, 2] = 5.0
  for bw in ("apib", "pyhsiclasso", "median"):
    for normalized in (False, True):
      p = hj.problem_from_features(x, y, bandwidth=bw, normalized=normalized)
      res = hj.solve(p, 0.0)
      assert np.all(np.isfinite(np.asarray(res.beta)))
      assert float(res.beta[2]) == 0.0 and not bool(res.selected[2])


def test_all_constant_problem_is_finite():
  # Every centered Gram is zero: Q = 0, q = 0, so beta = 0 and the objective is ||L̄||^2 / 2, from any start.
  lbar = np.eye(5) - 1.0 / 5
  for init in (None, np.ones(3, np.float32)):
    res = hj.solve(hj.problem_from_grams(np.ones((3, 5, 5)), np.eye(5)), 0.1, init=init)
    np.testing.assert_array_equal(np.asarray(res.beta), 0.0)
    np.testing.assert_allclose(float(res.objective), 0.5 * np.sum(lbar * lbar), rtol=1e-6)
    assert bool(res.converged)


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_solution_does_not_depend_on_the_scale_of_the_features(scale):
  # Linear Grams of features times s are the Grams times s^2, so Q and q scale by s^4 and so does lambda_max: at the
  # same fraction of lambda_max the coefficients are the same. At s = 1e-6, Q's entries are about 1e-21 and their
  # squares underflow float32, which the step size must survive.
  rng = np.random.default_rng(7)
  x = rng.normal(size=(32, 4, 3))
  def solved(s):
    xs = (x * s).astype(np.float32)
    gx = np.einsum("nkd,mkd->knm", xs, xs)
    p = hj.problem_from_grams(gx, gx[0] + 0.5 * gx[2])
    return hj.solve(p, 0.01 * float(hj.lambda_max(p)))
  ref, res = solved(1.0), solved(scale)
  assert bool(res.converged)
  np.testing.assert_allclose(np.asarray(res.beta), np.asarray(ref.beta), rtol=1e-3, atol=1e-4)
  np.testing.assert_array_equal(res.indices(), [0, 2])


def test_repeated_calls_do_not_retrace(monkeypatch):
  x, y = random_problem(10)
  p = hj.problem_from_features(x, y)
  jax.clear_caches()
  monkeypatch.setattr(_fista, "solve_one", chex.assert_max_traces(_fista.solve_one, n=1))
  for lam in (1.0, 2.0, 3.0):
    hj.solve(p, lam)
  hj.solve(p, 4.0, tol=1e-3)  # tolerance is a traced argument too
  p2 = hj.problem_from_features(x[:, :5], y)
  with pytest.raises(AssertionError, match="traced"):
    hj.solve(p2, 1.0)  # a new shape must trace again, which the guard catches


@pytest.mark.parametrize("positive", [True, False])
def test_wide_layer_matches_sklearn(positive):
  # c = 64: the active-set solves gather supports into 16/32/64-wide blocks (the compact path on CPU).
  x, y = random_problem(11, n=32, c=64, d=3)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y.reshape(len(y), -1), dtype=jnp.float64)
    a, b = design(gx, gy)
    p = hj.problem_from_grams(gx, gy, dtype=jnp.float64)
    for frac in (0.3, 0.05, 0.005):
      lam = frac * float(hj.lambda_max(p, positive=positive))
      res = hj.solve(p, lam, positive=positive)
      _, f_ref = sklearn_lasso(a, b, lam, positive)
      assert bool(res.converged)
      assert (float(res.objective) - f_ref) / f_ref <= 1e-7


@pytest.mark.parametrize("size", [1, 5, 16, 17, 40, 64])
def test_compact_face_solve_equals_full(size):
  rng = np.random.default_rng(size)
  a = rng.normal(size=(64, 80))
  quad = jnp.asarray(a @ a.T / 80 + 0.1 * np.eye(64))
  rhs = jnp.asarray(rng.normal(size=64))
  mask = jnp.asarray(rng.permutation(64) < size)
  full = _fista.face_solve(quad, rhs, mask, compact=False)
  compact_solve = jax.jit(_fista.face_solve, static_argnames="compact")
  np.testing.assert_allclose(np.asarray(compact_solve(quad, rhs, mask, compact=True)), np.asarray(full),
                             rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(full)[~np.asarray(mask)] == 0)
  # Channel 0 in the set: the compact path pads its gathered rows with copies of index 0, which must not touch it.
  mask0 = mask.at[0].set(True)
  np.testing.assert_allclose(np.asarray(compact_solve(quad, rhs, mask0, compact=True)),
                             np.asarray(_fista.face_solve(quad, rhs, mask0, compact=False)), rtol=1e-4, atol=1e-5)
  # The face minimiser solves Q_SS b_S = rhs_S.
  s = np.flatnonzero(np.asarray(mask))
  np.testing.assert_allclose(np.asarray(full)[s], np.linalg.solve(np.asarray(quad)[np.ix_(s, s)], np.asarray(rhs)[s]),
                             rtol=1e-4, atol=1e-5)


def test_vmapped_batches_equal_one_at_a_time():
  # Accelerators vmap batches and solve full-size masked systems; CPU loops over problems with compact solves.
  x, y = random_problem(30, c=40)
  p = hj.problem_from_features(x, y)
  x2, y2 = random_problem(31, c=40)
  stacked, _ = hj.stack_problems([p, hj.problem_from_features(x2, y2)])
  lams = jnp.array([0.05, 0.2]) * hj.lambda_max(stacked)
  looped = hj.solve(stacked, lams)
  looped_k = hj.select_k(stacked, np.array([3, 7]))
  vmapped = hj.solve(stacked, lams, strategy="vmap")
  vmapped_k = hj.select_k(stacked, np.array([3, 7]), strategy="vmap")
  np.testing.assert_allclose(np.asarray(vmapped.beta), np.asarray(looped.beta), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(vmapped_k.selected), np.asarray(looped_k.selected))
  assert np.asarray(vmapped.converged).all()
  # The choice is a static argument of the compiled solver, so each strategy has its own compiled code.
  jaxpr_loop = jax.make_jaxpr(lambda p: solver._solve(  # pylint: disable=protected-access
      p, lams, None, 1e-5, 100, 10, True, "loop"))(stacked)
  jaxpr_vmap = jax.make_jaxpr(lambda p: solver._solve(  # pylint: disable=protected-access
      p, lams, None, 1e-5, 100, 10, True, "vmap"))(stacked)
  assert str(jaxpr_loop) != str(jaxpr_vmap)
  with pytest.raises(ValueError, match="strategy"):
    hj.solve(stacked, lams, strategy="pmap")


def test_strategy_follows_where_the_inputs_live():
  cpu = jax.devices("cpu")[0]
  assert _checks.strategy_for(jax.device_put(np.ones(3), cpu)) == "loop"
  assert _checks.strategy_for(np.ones(3)) == ("loop" if jax.default_backend() == "cpu" else "vmap")
  with jax.default_device(cpu):  # a GPU host computing on its CPU loops too
    assert _checks.strategy_for(np.ones(3)) == "loop"
  assert _checks.strategy_for(jax.device_put(np.ones(3), cpu), strategy="vmap") == "vmap"


def _dot_precisions(jaxpr):
  """Every dot_general's precision in a closed jaxpr, sub-jaxprs (jit, loops, conds, maps) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((eqn.params["precision"], str(eqn.source_info.traceback).splitlines()[-1:]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _dot_precisions(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _dot_precisions(sub)
  return found


def test_every_matrix_product_runs_at_full_precision():
  # On TPUs float32 products default to bfloat16 passes and on GPUs to TF32; the Gram builds and the solver need
  # full float32. The CPU computes full precision whatever is asked, so the request itself is what is checked.
  x, y = random_problem(3, n=16, c=4)
  x, y = x.astype(np.float32), y.astype(np.float32)
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  calls = {
      "problem_from_features": lambda x, y: hj.problem_from_features(x, y),
      "problem_from_features (tiles)": lambda x, y: hj.problem_from_features(x, y, max_block_bytes=2048),
      "problem_from_grams + solve": lambda x, y: hj.solve(
          hj.problem_from_grams(hj.channel_grams(x), hj.gaussian_gram(y)), 0.1),
      "select_k": lambda x, y: hj.select_k(hj.problem_from_features(x, y), 2).selected,
      "lasso_path": lambda x, y: hj.lasso_path(hj.problem_from_features(x, y), jnp.array([0.1, 0.2])).beta,
      "hsic_matrix": lambda x, y: (hj.hsic_matrix([x, y]), hj.hsic_matrix([x, y], kernel="gaussian")),
      "linear_gram": lambda x, y: (hj.linear_gram(x), hj.linear_gram(x, centered=True)),
  }
  for name, fn in calls.items():
    dots = _dot_precisions(jax.make_jaxpr(fn)(x, y).jaxpr)
    assert dots, name
    low = [where for precision, where in dots if precision != highest]
    assert not low, f"{name}: products below full precision at {low}"


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_options_penalties_and_problems():
  gx, gy = small_grams()
  p = hj.problem_from_grams(gx, gy)
  with pytest.raises(ValueError, match="tol must be > 0"):
    hj.solve(p, 0.1, tol=0.0)
  with pytest.raises(ValueError, match="init must have 3 coefficients"):
    hj.solve(p, 0.1, init=np.zeros(4))
  with pytest.raises(ValueError, match="problem must be a LassoProblem"):
    hj.solve((1, 2), 0.1)
  stacked, _ = hj.stack_problems([p, p])
  with pytest.raises(ValueError, match=r"lam of shape \(3,\) does not broadcast against the problem's batch shape"):
    hj.solve(stacked, np.ones(3))
  for lam, msg in ((None, "lam is required"), ("a", "lam must be a number")):
    with pytest.raises(ValueError, match=msg):
      hj.solve(p, lam)
  # A (g, 1) grid solves g penalties for each problem of a batch, as the error above suggests.
  assert hj.solve(stacked, np.array([[0.1], [0.2], [0.3]])).beta.shape == (3, 2, 3)
  # Penalties in any float type JAX has, bfloat16 included, are numbers (and a negative one is refused).
  np.testing.assert_allclose(np.asarray(hj.solve(p, jnp.bfloat16(0.125)).beta), np.asarray(hj.solve(p, 0.125).beta))
  with pytest.raises(ValueError, match="lam must be >= 0"):
    hj.solve(p, jnp.asarray([-0.5, 0.1], jnp.bfloat16))


def test_bad_solver_settings_are_refused():
  gx, gy = small_grams()
  p = hj.problem_from_grams(gx, gy)
  with pytest.raises(ValueError, match=r"^tol must be > 0 .*got nan"):
    hj.solve(p, 0.1, tol=np.nan)
  with pytest.raises(ValueError, match=r"^check_every must be an integer >= 1, got 0"):
    hj.solve(p, 0.1, check_every=0)


def test_non_finite_problem_is_refused():
  gx, gy = small_grams()
  p = hj.problem_from_grams(gx, gy)
  bad = p._replace(lin=p.lin.at[1].set(np.nan))
  with pytest.raises(ValueError, match=r"problem\.lin contains 1 NaN or Inf"):
    hj.solve(bad, 0.1)
  assert np.isfinite(float(hj.solve(p, 0.1).objective))
