"""The HSIC Lasso solver against scikit-learn's Lasso on the explicit n^2-row design."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import Lasso

import hsic_jax as hj
from hsic_jax import _checks, _fista, _lasso, solver
from hsic_jax._lasso import make_problem


def _design(gram_x, gram_y, normalized=False):
  """The explicit design A (n^2 x c) and target b, centered with H K H (numpy, float64)."""
  n = gram_y.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  cols = [h @ g @ h for g in np.asarray(gram_x, np.float64)]
  lbar = h @ np.asarray(gram_y, np.float64) @ h
  if normalized:
    cols = [c / np.linalg.norm(c) if np.linalg.norm(c) > 0 else c for c in cols]
    lbar = lbar / np.linalg.norm(lbar)
  return np.stack([c.ravel() for c in cols], 1), lbar.ravel()


def _sklearn(a, b, lam, positive):
  model = Lasso(alpha=lam / a.shape[0], positive=positive, fit_intercept=False, tol=1e-12, max_iter=200_000)
  model.fit(a, b)
  w = model.coef_
  return w, 0.5 * np.sum((b - a @ w) ** 2) + lam * np.sum(np.abs(w))


def _random_problem(seed, n=40, c=12, d=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, c, d))
  y = np.tanh(x[:, 0] @ rng.normal(size=(d, 3))) + x[:, 3] ** 2 @ rng.normal(size=(d, 3)) * 0.3
  y = y + 0.1 * rng.normal(size=y.shape)
  return x, y


def _digits_problem(n=60):
  data = load_digits()
  x = data.data[:n].reshape(n, 8, 8) / 16.0  # channels = image rows, 8 pixels each
  y = np.eye(10)[data.target[:n]]
  return x, y


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("source", ["random", "digits"])
def test_matches_sklearn_lasso(positive, source):
  x, y = _random_problem(0) if source == "random" else _digits_problem()
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, bandwidth="apib", dtype=jnp.float64)
    gy = hj.gaussian_gram(y, bandwidth="apib", dtype=jnp.float64)
    problem = hj.problem_from_grams(gx, gy, dtype=jnp.float64)
    a, b = _design(gx, gy)
    for frac in (0.5, 0.1, 0.02):
      lam = frac * float(hj.lambda_max(problem, positive=positive))
      res = hj.solve(problem, lam, positive=positive, tol=1e-10, max_iter=200_000)
      w, f_sk = _sklearn(a, b, lam, positive)
      f_ours = 0.5 * np.sum((b - a @ np.asarray(res.beta)) ** 2) + lam * np.sum(np.abs(np.asarray(res.beta)))
      assert bool(res.converged)
      assert (f_ours - f_sk) / f_sk <= 1e-5, (frac, f_ours, f_sk)
      assert float(res.objective) == pytest.approx(f_ours, rel=1e-8)  # reported objective is the design objective
      assert float(res.gap) <= 1e-8 * f_ours
      np.testing.assert_array_equal(np.asarray(res.selected), (w > 1e-9) if positive else (np.abs(w) > 1e-9))


def test_float32_default_reaches_tolerance():
  x, y = _random_problem(1)
  p = hj.problem_from_features(x, y)
  res = hj.lasso_select_features(x, y, lam=0.0, tol=1e-4)  # least squares: converged on the KKT residual
  assert bool(res.converged) and float(res.objective) < 0.5 * float(p.const)
  lam = 0.05 * float(hj.lambda_max(p))
  res = hj.solve(p, lam, tol=1e-5)
  assert res.beta.dtype == jnp.float32 and bool(res.converged)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y, dtype=jnp.float64)
    a, b = _design(gx, gy)
  _, f_sk = _sklearn(a, b, lam, True)
  f32 = 0.5 * np.sum((b - a @ np.asarray(res.beta, np.float64)) ** 2) + lam * np.sum(np.asarray(res.beta))
  assert (f32 - f_sk) / f_sk <= 1e-4


def test_lambda_max_closed_form():
  x, y = _random_problem(2)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y, dtype=jnp.float64)
    a, b = _design(gx, gy)
    p = hj.problem_from_grams(gx, gy, dtype=jnp.float64)
    top = float(hj.lambda_max(p))
    assert top == pytest.approx(np.max(a.T @ b), rel=1e-10)  # max_k <K̄_k, L̄>
    assert float(hj.lambda_max(p, positive=False)) == pytest.approx(np.max(np.abs(a.T @ b)), rel=1e-10)
    assert not np.any(np.asarray(hj.solve(p, top * (1 + 1e-9)).selected))
    assert np.any(np.asarray(hj.solve(p, top * (1 - 1e-3)).selected))
    # scikit-learn's own alpha_max identity: alpha >= max|A'b| / rows zeroes the signed Lasso.
    w, _ = _sklearn(a, b, float(hj.lambda_max(p, positive=False)) * (1 + 1e-9), False)
    assert not np.any(w)


def test_normalized_problem_matches_normalized_design():
  x, y = _random_problem(3)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y, dtype=jnp.float64)
    a, b = _design(gx, gy, normalized=True)
    p = hj.problem_from_grams(gx, gy, normalized=True, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(p.quad), a.T @ a, atol=1e-10)
    np.testing.assert_allclose(np.asarray(p.lin), a.T @ b, atol=1e-10)
    assert float(p.const) == pytest.approx(1.0)


def test_row_blocks_and_streaming_equal_direct():
  x, y = _random_problem(4, n=37, c=6)  # 37 is prime: tiles of 13 (Grams) and 10 (streamed) overlap at the end
  with jax.enable_x64(True):
    direct = hj.problem_from_features(x, y, bandwidth="median", dtype=jnp.float64)
    blocked = hj.problem_from_grams(hj.channel_grams(x, bandwidth="median", dtype=jnp.float64),
                                    hj.gaussian_gram(y, bandwidth="median", dtype=jnp.float64),
                                    max_block_bytes=6 * 37 * 8 * 3 * 5, dtype=jnp.float64)
    streamed = hj.problem_from_features(x, y, bandwidth="median", max_block_bytes=6 * 37 * 8 * 3 * 4,
                                        dtype=jnp.float64)
    for p in (blocked, streamed):
      np.testing.assert_allclose(np.asarray(p.quad), np.asarray(direct.quad), rtol=1e-10, atol=1e-10)
      np.testing.assert_allclose(np.asarray(p.lin), np.asarray(direct.lin), rtol=1e-10, atol=1e-10)
      assert float(p.const) == pytest.approx(float(direct.const), rel=1e-12)


@pytest.mark.parametrize("n, expected_sides", [(14, {0, 1, 2, 3, 5, 7}), (37, {0, 1, 2, 3, 5, 19, 37})])
def test_tiles_of_every_side_equal_the_explicit_design(n, expected_sides):
  # Budgets that take the Grams whole (t = 0), in one tile, in tiles dividing n, and in tiles that do not (the last
  # tile row and column overlap the ones before and mask what those cover), down to 1 x 1 tiles; from Grams
  # (exact centering) and streamed from features (shifted kernels, centered at the end).
  from hsic_jax import problem  # pylint: disable=import-outside-toplevel
  c = 5
  x, y = _random_problem(n, n=n, c=c)
  with jax.enable_x64(True):
    gx = np.asarray(hj.channel_grams(x, dtype=jnp.float64))
    gy = np.asarray(hj.gaussian_gram(y, dtype=jnp.float64))
    a, b = _design(gx, gy)
    sides = set()
    for k in (1, 2, 3, 5, n // 2 + 1, n, 2 * n):
      budget = 3 * c * 8 * k * k
      sides.add(problem._tiles_for(c, n, 8, budget, "loop"))  # pylint: disable=protected-access
      built = [hj.problem_from_grams(gx, gy, max_block_bytes=budget, dtype=jnp.float64)]
      if c * n * n * 8 > budget:  # streamed from the features
        built.append(hj.problem_from_features(x, y, max_block_bytes=budget, dtype=jnp.float64))
      for p in built:
        np.testing.assert_allclose(np.asarray(p.quad), a.T @ a, rtol=1e-10, atol=1e-12 * np.abs(a.T @ a).max())
        np.testing.assert_allclose(np.asarray(p.lin), a.T @ b, rtol=1e-10, atol=1e-12 * np.abs(a.T @ b).max())
    assert sides == expected_sides  # 5 and 3 do not divide 14, nor 2, 3, 5, 19 37; 37 is one tile (odd n)


def test_tiles_fit_the_cpu_cache_only_on_cpus():
  # On a CPU a tile of every channel stays within STREAM_TILE_BYTES (cache); on an accelerator it takes what
  # max_block_bytes allows (fewer loop steps), three live copies within it either way.
  from hsic_jax import problem  # pylint: disable=import-outside-toplevel
  c, n, budget = 512, 1024, problem.DEFAULT_BLOCK_BYTES
  cpu = problem._tile_side(c, n, 4, budget, "loop")  # pylint: disable=protected-access
  assert c * cpu * cpu * 4 <= problem._STREAM_TILE_BYTES  # pylint: disable=protected-access
  accel = problem._tile_side(c, n, 4, budget, "vmap")  # pylint: disable=protected-access
  assert accel > 2 * cpu and 3 * c * accel * accel * 4 <= budget
  assert problem._tile_side(c, n, 4, 3 * c * 4 * 16 * 16, "loop") == 16  # pylint: disable=protected-access


def test_combined_batches_match_sklearn_on_stacked_design():
  x, y = _random_problem(5, n=60)
  with jax.enable_x64(True):
    parts, designs = [], []
    for sl in (slice(0, 30), slice(30, 60)):
      gx = hj.channel_grams(x[sl], dtype=jnp.float64)
      gy = hj.gaussian_gram(y[sl], dtype=jnp.float64)
      parts.append(hj.problem_from_grams(gx, gy, dtype=jnp.float64))
      designs.append(_design(gx, gy))
    p = hj.combine_problems(parts)
    a = np.concatenate([d[0] for d in designs])
    b = np.concatenate([d[1] for d in designs])
    assert float(p.rows) == a.shape[0]
    lam = 0.1 * float(hj.lambda_max(p))
    res = hj.solve(p, lam, tol=1e-10, max_iter=200_000)
    _, f_sk = _sklearn(a, b, lam, True)
    assert (float(res.objective) - f_sk) / f_sk <= 1e-5


def test_path_and_batch_equal_single_solves():
  x, y = _random_problem(6)
  p = hj.problem_from_features(x, y)
  path = hj.lasso_path(p, num=6)
  assert path.beta.shape == (6, 12)
  assert int(np.asarray(path.selected)[0].sum()) == 0  # lambda_max first
  for i in range(6):
    single = hj.solve(p, path.lam[i])
    np.testing.assert_allclose(np.asarray(path.beta[i]), np.asarray(single.beta), atol=1e-5)
  # A batch of layers of different widths, padded, solved in one call.
  x2, y2 = _random_problem(7, c=5)
  p2 = hj.problem_from_features(x2, y2)
  stacked, widths = hj.stack_problems([p, p2])
  assert widths.tolist() == [12, 5]
  lams = jnp.array([0.1 * float(hj.lambda_max(p)), 0.1 * float(hj.lambda_max(p2))])
  batch = hj.solve(stacked, lams)
  chex.assert_shape(batch.beta, (2, 12))
  assert not np.any(np.asarray(batch.selected[1, 5:]))
  for i, (prob, w) in enumerate(((p, 12), (p2, 5))):
    np.testing.assert_allclose(np.asarray(batch.beta[i, :w]), np.asarray(hj.solve(prob, lams[i]).beta), atol=1e-5)


def test_select_k_keeps_exactly_k():
  x, y = _random_problem(8)
  p = hj.problem_from_features(x, y)
  for k in (1, 3, 6):
    sel = hj.select_k(p, k)
    assert int(np.asarray(sel.selected).sum()) == k
    if bool(sel.exact):
      np.testing.assert_array_equal(np.asarray(sel.selected), np.asarray(hj.solve(p, sel.lam).selected))
  stacked, _ = hj.stack_problems([p, p])
  sel = hj.select_k(stacked, np.array([2, 4]))
  assert np.asarray(sel.selected).sum(1).tolist() == [2, 4]
  # k = c may exceed any Lasso support: the fallback still returns exactly c channels.
  assert int(np.asarray(hj.select_k(p, 12).selected).sum()) == 12


def test_select_k_never_keeps_padding_of_a_stacked_batch():
  # A layer of 5 channels stacked with one of 12 is padded with 7 channels of zero Q and q. Keeping all 5 needs
  # the fallback (k beyond the Lasso support), whose top-k ranking must put the padding last.
  x, y = _random_problem(8)
  x2, y2 = _random_problem(9, c=5)
  p2 = hj.problem_from_features(x2, y2)
  stacked, widths = hj.stack_problems([hj.problem_from_features(x, y), p2])
  sel = hj.select_k(stacked, np.array([12, 5]), widths=widths)
  mask = np.asarray(sel.selected)
  assert mask[0].all() and mask[1, :5].all() and not mask[1, 5:].any()
  np.testing.assert_array_equal(mask[1, :5], np.asarray(hj.select_k(p2, 5).selected))
  sel3 = hj.select_k(stacked, np.array([4, 3]), widths=widths)
  np.testing.assert_array_equal(np.asarray(sel3.selected[1, :5]), np.asarray(hj.select_k(p2, 3).selected))
  with pytest.raises(ValueError, match=r"than it has\), got k=\[12, 6\] for widths \[12, 5\]"):
    hj.select_k(stacked, np.array([12, 6]), widths=widths)
  with pytest.raises(ValueError, match="widths must be integers in"):
    hj.select_k(stacked, np.array([2, 2]), widths=[12, 13])


def test_constant_channel_gets_zero_never_nan():
  x, y = _random_problem(9, c=4)
  x[:, 2] = 5.0
  for bw in ("apib", "pyhsiclasso", "median"):
    for normalized in (False, True):
      p = hj.problem_from_features(x, y, bandwidth=bw, normalized=normalized)
      res = hj.solve(p, 0.0)
      assert np.all(np.isfinite(np.asarray(res.beta)))
      assert float(res.beta[2]) == 0.0 and not bool(res.selected[2])


@pytest.mark.parametrize("n", [9, 64, 100])
def test_constant_gram_is_exactly_zero_not_rounding_noise(n):
  # A constant Gram centers to 0; in float32 its centered energy is rounding noise, which must not become a
  # coefficient (the ratio of two rounding errors) nor, normalised, a unit-norm channel.
  rng = np.random.default_rng(n)
  grams = np.asarray(hj.channel_grams(rng.normal(size=(n, 3, 4)).astype(np.float32)))
  gram_y = grams[0] + 0.05 * np.eye(n, dtype=np.float32)
  for value in (0.1, 0.37, 1 / 3, 0.7123):
    gx = grams.copy()
    gx[1] = value
    for normalized in (False, True):
      p = hj.problem_from_grams(gx, gram_y, normalized=normalized)
      assert np.all(np.asarray(p.quad)[1] == 0) and np.all(np.asarray(p.quad)[:, 1] == 0)
      assert float(p.lin[1]) == 0.0 and float(p.quad[0, 0]) > 0
      assert float(hj.solve(p, 0.0).beta[1]) == 0.0


def test_float32_centering_is_accurate_when_the_first_rows_are_unrepresentative():
  # The centering shift comes from the leading rows; here they are a tight cluster far from the rest, so the
  # shift is far from the Gram's mean. Q and q must still match a float64 H K H reference.
  rng = np.random.default_rng(3)
  n, c, d = 96, 6, 5
  x = rng.normal(size=(n, c, d))
  x[:16] = 4.0 + 0.01 * rng.normal(size=(16, c, d))
  y = x[:, 0] @ rng.normal(size=(d, 2))
  h = np.eye(n) - 1.0 / n
  gx = np.stack([np.exp(-np.sum((x[:, k, None] - x[None, :, k]) ** 2, -1) / d) for k in range(c)])
  gy = np.exp(-np.sum((y[:, None] - y[None]) ** 2, -1) / 2)
  kbar = np.einsum("ij,cjk,kl->cil", h, gx, h)
  lbar = h @ gy @ h
  quad_ref = np.einsum("cij,dij->cd", kbar, kbar)
  lin_ref = np.einsum("cij,ij->c", kbar, lbar)
  exact = (hj.problem_from_grams(gx.astype(np.float32), gy.astype(np.float32)),
           hj.problem_from_features(x.astype(np.float32), y.astype(np.float32), y_bandwidth=0.5))
  streamed = tuple(hj.problem_from_features(x.astype(np.float32), y.astype(np.float32), y_bandwidth=0.5,
                                            max_block_bytes=c * n * rows * 4 * 3) for rows in (8, 4))  # tiles of 24, 16
  for problems, rtol in ((exact, 2e-6), (streamed, 5e-6)):
    for p in problems:
      np.testing.assert_allclose(np.asarray(p.quad), quad_ref, rtol=0, atol=rtol * np.abs(quad_ref).max())
      np.testing.assert_allclose(np.asarray(p.lin), lin_ref, rtol=0, atol=rtol * np.abs(lin_ref).max())


def test_weak_channel_is_not_mistaken_for_a_constant_one():
  # Features scaled by 1e-2: centered Gram entries around 1e-5, a few hundred float32 ulps of the kernel's 1.
  rng = np.random.default_rng(4)
  n, c, d = 64, 3, 4
  x = rng.normal(size=(n, c, d)).astype(np.float32)
  x[:, 1] *= 1e-2
  y = x[:, 1] @ rng.normal(size=(d, 2)).astype(np.float32)
  for p in (hj.problem_from_features(x, y, bandwidth=0.25, y_bandwidth=1e4),
            hj.problem_from_features(x, y, bandwidth=0.25, y_bandwidth=1e4, max_block_bytes=c * n * 4 * 4 * 3)):
    with jax.enable_x64(True):
      p64 = hj.problem_from_features(x.astype(np.float64), y.astype(np.float64), bandwidth=0.25, y_bandwidth=1e4,
                                     dtype=jnp.float64)
    assert float(p.quad[1, 1]) == pytest.approx(float(p64.quad[1, 1]), rel=0.05)
    assert float(p.lin[1]) == pytest.approx(float(p64.lin[1]), rel=0.05)


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
  x, y = _random_problem(10)
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
  x, y = _random_problem(11, n=32, c=64, d=3)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y.reshape(len(y), -1), dtype=jnp.float64)
    a, b = _design(gx, gy)
    p = hj.problem_from_grams(gx, gy, dtype=jnp.float64)
    for frac in (0.3, 0.05, 0.005):
      lam = frac * float(hj.lambda_max(p, positive=positive))
      res = hj.solve(p, lam, positive=positive)
      _, f_ref = _sklearn(a, b, lam, positive)
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


def test_lipschitz_estimate_bounds_the_top_eigenvalue():
  for seed in range(3):
    x, y = _random_problem(12 + seed, c=30)
    p = hj.problem_from_features(x, y)
    top = float(np.linalg.eigvalsh(np.asarray(p.quad, np.float64))[-1])
    assert top * (1 - 1e-5) <= float(p.lipschitz) <= 1.05 * top * (1 + 1e-5)
  # A flat spectrum: Q = I (orthogonal channels) has ||Q||_F = sqrt(c), but the estimate stays at 1.05.
  p = make_problem(jnp.eye(20), jnp.ones(20), 1.0, 1.0)
  assert 1.0 <= float(p.lipschitz) <= 1.05 + 1e-6


def test_batched_build_equals_single_builds():
  rng = np.random.default_rng(13)
  layers = [_random_problem(20 + i, n=24, c=10) for i in range(3)]
  gx = np.stack([np.asarray(hj.channel_grams(x)) for x, _ in layers])
  gy = np.stack([np.asarray(hj.gaussian_gram(y)) for _, y in layers])
  batched = hj.problem_from_grams(gx, gy)
  chex.assert_shape(batched.quad, (3, 10, 10))
  for i in range(3):
    single = hj.problem_from_grams(gx[i], gy[i])
    for field in ("quad", "lin", "const", "lipschitz"):
      np.testing.assert_allclose(np.asarray(getattr(batched, field)[i]), np.asarray(getattr(single, field)),
                                 rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="same number of samples n"):
    hj.problem_from_grams(gx, gy[:2])
  gx[1, 4, 0, 5] = rng.normal() + 3.0  # one corrupt layer in the batch
  with pytest.raises(ValueError, match="gram_x must hold symmetric"):
    hj.problem_from_grams(gx, gy)


@pytest.mark.parametrize("n, m", [(50, 50), (52, 26), (64, 64), (40, 20), (6, 2)])
def test_packed_triangles_give_frobenius_products(n, m):
  from hsic_jax.problem import _packed_rows  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(n + m)
  a = rng.normal(size=(3, n, n))
  a = (a + np.swapaxes(a, 1, 2)).astype(np.float32)  # three symmetric matrices
  l = rng.normal(size=(n, n))
  l = (l + l.T).astype(np.float32)
  quad, lin, length = np.zeros((3, 3)), np.zeros(3), 0
  for start in range(0, n, m):
    kp, lp = (np.asarray(_packed_rows(a[:, start:start + m], start)),
              np.asarray(_packed_rows(l[start:start + m], start)))
    quad += kp @ kp.T
    lin += kp @ lp
    length += kp.shape[1]
  np.testing.assert_allclose(quad, np.einsum("aij,bij->ab", a, a), rtol=1e-5)
  np.testing.assert_allclose(lin, np.einsum("aij,ij->a", a, l), rtol=1e-5)
  assert length == n * (n + 1) // 2  # the upper triangle, nothing more


@pytest.mark.parametrize("n", [7, 33])
def test_odd_sample_counts_pad_correctly(n):
  # Odd n: whole Grams are padded with a zero row and column after centering (the packing takes an even side);
  # tiles whose side does not divide n overlap the one before them at the end and mask what it covers.
  rng = np.random.default_rng(n)
  x, y = rng.normal(size=(n, 5, 3)), rng.normal(size=(n, 4))
  gauss = lambda f: np.exp(-((f[:, None] - f[None]) ** 2).sum(-1) / f.shape[1])  # noqa: E731  (APIB: gamma = 1/d)
  gx = np.stack([gauss(x[:, k]) for k in range(5)])
  gy = gauss(y)
  h = np.eye(n) - 1.0 / n
  kb = np.einsum("ij,cjk,kl->cil", h, gx, h)
  lb = h @ gy @ h
  # Whole Grams; tiles of 4 and 3 rows for n = 7, of 11 and 7 rows for n = 33 (from Grams and streamed from x).
  for block in (None, 3 * 5 * n * 8 * 5, 3 * 5 * n * 8 * 2):
    kwargs = {} if block is None else {"max_block_bytes": block}
    with jax.enable_x64(True):
      p = hj.problem_from_grams(gx, gy, dtype=jnp.float64, **kwargs)
      np.testing.assert_allclose(np.asarray(p.quad), np.einsum("aij,bij->ab", kb, kb), rtol=1e-10)
      np.testing.assert_allclose(np.asarray(p.lin), np.einsum("aij,ij->a", kb, lb), rtol=1e-10)
      np.testing.assert_allclose(float(p.const), np.sum(lb * lb), rtol=1e-10)
      pf = hj.problem_from_features(x, y, dtype=jnp.float64, **kwargs)
      np.testing.assert_allclose(np.asarray(pf.quad), np.asarray(p.quad), rtol=1e-10)
      np.testing.assert_allclose(np.asarray(pf.lin), np.asarray(p.lin), rtol=1e-10)


def test_vmapped_batches_equal_one_at_a_time():
  # Accelerators vmap batches and solve full-size masked systems; CPU loops over problems with compact solves.
  x, y = _random_problem(30, c=40)
  p = hj.problem_from_features(x, y)
  x2, y2 = _random_problem(31, c=40)
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
  x, y = _random_problem(3, n=16, c=4)
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


@pytest.mark.parametrize("normalized", [False, True])
def test_every_build_path_equals_the_reference_problem(normalized):
  """Whole Grams, tiles of Grams, features in memory, features streamed in tiles, and a batch: each against
  _lasso.reference_problem (the stated math in float64 numpy)."""
  from hsic_jax import problem  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(11)
  n, c = 20, 5
  x = rng.normal(size=(n, c, 3))
  y = np.tanh(x[:, 1, :2]) + 0.1 * rng.normal(size=(n, 2))
  with jax.enable_x64(True):
    gx = np.asarray(hj.channel_grams(x, dtype=jnp.float64))
    gy = np.asarray(hj.gaussian_gram(y, dtype=jnp.float64))
    ref = _lasso.reference_problem(gx, gy, normalized=normalized)
    small = 3 * c * 8 * 6 * 6  # tiles of 6 x 6
    built = {
        "grams": hj.problem_from_grams(gx, gy, normalized=normalized, dtype=jnp.float64),
        "grams in tiles": hj.problem_from_grams(gx, gy, normalized=normalized, max_block_bytes=small,
                                                dtype=jnp.float64),
        "features": hj.problem_from_features(x, y, normalized=normalized, dtype=jnp.float64),
        "features streamed": hj.problem_from_features(x, y, normalized=normalized, max_block_bytes=c * 8 * 8 * 8,
                                                      dtype=jnp.float64),
        "batch": jax.tree.map(lambda a: a[1], hj.problem_from_grams(np.stack([gx[::-1], gx]), np.stack([gy, gy]),
                                                                    normalized=normalized, dtype=jnp.float64)),
    }
  for name, p in built.items():
    for field in ("quad", "lin", "const", "rows"):
      np.testing.assert_allclose(np.asarray(getattr(p, field)), np.asarray(getattr(ref, field)), rtol=1e-9,
                                 atol=1e-9 * float(np.max(np.abs(np.asarray(ref.quad)))), err_msg=f"{name}: {field}")
