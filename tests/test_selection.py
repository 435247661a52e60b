"""The selection primitives (lasso_select, lasso_path, lambda_grid, select_k) against single solves, and their
checks of bad inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsic_jax as hj
from tests._lasso_data import OVERFLOW_MESSAGE, overflowing_outputs, random_problem, small_grams


def test_path_and_batch_equal_single_solves():
  x, y = random_problem(6)
  p = hj.problem_from_features(x, y)
  path = hj.lasso_path(p, num=6)
  assert path.beta.shape == (6, 12)
  assert int(np.asarray(path.selected)[0].sum()) == 0  # lambda_max first
  for i in range(6):
    single = hj.solve(p, path.lam[i])
    np.testing.assert_allclose(np.asarray(path.beta[i]), np.asarray(single.beta), atol=1e-5)
  # A batch of layers of different widths, padded, solved in one call.
  x2, y2 = random_problem(7, c=5)
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
  x, y = random_problem(8)
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
  x, y = random_problem(8)
  x2, y2 = random_problem(9, c=5)
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


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_gram_is_refused(value):
  gx, gy = small_grams()
  gy[0, 0] = value
  with pytest.raises(ValueError, match="^gram_y contains"):
    hj.lasso_select(gx, gy, 0.1)


def test_mismatched_samples():
  gx, gy = small_grams(n=6)
  with pytest.raises(ValueError, match="gram_x and gram_y must have the same number of samples"):
    hj.lasso_select(gx, gy[:5, :5], 0.1)


def test_non_square_and_wrong_rank():
  gx, gy = small_grams()
  with pytest.raises(ValueError, match="gram_x must hold square"):
    hj.lasso_select(gx[:, :, :5], gy, 0.1)
  with pytest.raises(ValueError, match="gram_y must hold square"):
    hj.lasso_select(gx, gy[:, :5], 0.1)
  with pytest.raises(ValueError, match=r"gram_x must have 3 or 4 dimensions, got shape \(6, 6\)"):
    hj.lasso_select(gy, gy, 0.1)


def test_zero_channels():
  _, gy = small_grams()
  with pytest.raises(ValueError, match="gram_x must hold at least one channel"):
    hj.lasso_select(np.zeros((0, 6, 6)), gy, 0.1)


def test_too_few_samples():
  with pytest.raises(ValueError, match="gram_y must hold at least 2 samples"):
    hj.lasso_select(np.ones((2, 1, 1)), np.ones((1, 1)), 0.1)


def test_bad_k_and_unbatched_grid():
  gx, gy = small_grams()
  p = hj.problem_from_grams(gx, gy)
  for k in (0, 4, -1):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
      hj.select_k(p, k)
  stacked, _ = hj.stack_problems([p, p])
  with pytest.raises(ValueError, match="lambda_grid takes one unbatched problem"):
    hj.lambda_grid(stacked)


def test_gaussian_outputs_whose_squares_overflow_are_refused():
  x, y = overflowing_outputs()
  msg = OVERFLOW_MESSAGE
  with pytest.raises(ValueError, match="^y " + msg):
    hj.lasso_select_features(x, y, 0.1)


@pytest.mark.parametrize("lam", [-1e-3, np.nan, np.inf])
def test_bad_lambda(lam):
  gx, gy = small_grams()
  with pytest.raises(ValueError, match="^lam must be"):
    hj.lasso_select(gx, gy, lam)


def _one_channel_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3, 1)).astype(np.float32)
  y = x[:, 0] ** 2  # depends on channel 0 only
  return hj.channel_grams(x, bandwidth=1.0), hj.gaussian_gram(y, bandwidth=1.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_problems_are_solved_in_float32(dtype):
  # LAPACK has no float16 or bfloat16 Cholesky (NotImplementedError); such problems are solved in float32.
  gx, gy = _one_channel_problem()
  res = hj.lasso_select(gx, gy, 50.0, dtype=dtype)
  assert res.beta.dtype == jnp.float32 and res.indices().tolist() == [0]
  ref = hj.lasso_select(gx, gy, 50.0)
  np.testing.assert_allclose(np.asarray(res.beta), np.asarray(ref.beta), rtol=1e-6)
  half = jax.tree.map(lambda a: a.astype(dtype), hj.problem_from_grams(gx, gy))
  as32 = jax.tree.map(lambda a: a.astype(jnp.float32), half)
  sel = hj.select_k(half, 1)
  assert np.asarray(sel.selected).tolist() == [True, False, False] and sel.lam.dtype == jnp.float32
  path = hj.lasso_path(half, num=4)
  assert path.beta.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(path.beta), np.asarray(hj.lasso_path(as32, num=4).beta))
  np.testing.assert_array_equal(np.asarray(hj.solve(half, 1.0).beta), np.asarray(hj.solve(as32, 1.0).beta))


def test_select_k_refuses_bad_solver_settings():
  gx, gy = small_grams()
  p = hj.problem_from_grams(gx, gy)
  for kw, msg in (({"max_iter": 0}, r"^max_iter must be an integer >= 1, got 0"),
                  ({"max_iter": -5}, r"^max_iter must be an integer >= 1, got -5"),
                  ({"max_iter": 2.5}, r"^max_iter must be an integer >= 1, got 2.5"),
                  ({"max_steps": -1}, r"^max_steps must be an integer >= 0, got -1"),
                  ({"tol": np.nan}, r"^tol must be > 0 .*got nan"),
                  ({"tol": -1e-5}, r"^tol must be > 0 .*got -1e-05"),
                  ({"tol": 0.0}, r"^tol must be > 0"),
                  ({"tol": "small"}, r"^tol must be > 0 .*got 'small'")):
    with pytest.raises(ValueError, match=msg):
      hj.select_k(p, 2, **kw)
  # Valid settings as before: an integral float max_iter, max_steps=0 (no bisection: the top k at lambda_max / 2).
  assert int(np.sum(np.asarray(hj.select_k(p, 2, max_iter=1e4, max_steps=0).selected))) == 2


def test_lasso_path_refuses_bad_arguments():
  gx, gy = small_grams()
  p = hj.problem_from_grams(gx, gy)
  for problem in (None, {"quad": 1}, (1, 2)):
    with pytest.raises(ValueError, match=r"^problem must be a LassoProblem"):
      hj.lasso_path(problem)
  for kw, msg in (({"num": 2.5}, r"^num must be an integer >= 1, got 2.5"),
                  ({"num": 0}, r"^num must be an integer >= 1, got 0"),
                  ({"ratio": "small"}, r"^ratio must be a number in \(0, 1\), got 'small'"),
                  ({"ratio": 1.5}, r"^ratio must be a number in \(0, 1\), got 1.5"),
                  ({"lams": "abc"}, r"^lams must be a 1-D array of penalties >= 0, got 'abc'"),
                  ({"lams": [[0.1, 0.2]]}, r"^lams must be a 1-D array .*got shape \(1, 2\)"),
                  ({"lams": []}, r"^lams must be a 1-D array of penalties >= 0 holding at least one"),
                  ({"lams": [0.1, -1.0]}, r"^lams must be >= 0"),
                  ({"lams": [0.1, np.nan]}, r"^lams must be finite")):
    with pytest.raises(ValueError, match=msg):
      hj.lasso_path(p, **kw)
  with pytest.raises(ValueError, match=r"^num must be an integer >= 1, got 2.5"):
    hj.lambda_grid(p, num=2.5)
  assert hj.lasso_path(p, [0.0, 0.1]).beta.shape == (2, 3)
