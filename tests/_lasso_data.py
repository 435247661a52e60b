"""Problems and oracles shared by the tests of the problem builders, the solver and the selection primitives."""

import numpy as np
from sklearn.linear_model import Lasso

import hsic_jax as hj


def design(gram_x, gram_y, normalized=False):
  """The explicit design A (n^2 x c) and target b, centered with H K H (numpy, float64)."""
  n = gram_y.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  cols = [h @ g @ h for g in np.asarray(gram_x, np.float64)]
  lbar = h @ np.asarray(gram_y, np.float64) @ h
  if normalized:
    cols = [c / np.linalg.norm(c) if np.linalg.norm(c) > 0 else c for c in cols]
    lbar = lbar / np.linalg.norm(lbar)
  return np.stack([c.ravel() for c in cols], 1), lbar.ravel()


def sklearn_lasso(a, b, lam, positive):
  """scikit-learn's Lasso on the design: the coefficients and the objective on the solver's scale."""
  model = Lasso(alpha=lam / a.shape[0], positive=positive, fit_intercept=False, tol=1e-12, max_iter=200_000)
  model.fit(a, b)
  w = model.coef_
  return w, 0.5 * np.sum((b - a @ w) ** 2) + lam * np.sum(np.abs(w))


def random_problem(seed, n=40, c=12, d=4):
  """Features ``(n, c, d)`` and a target that depends on channels 0 and 3."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, c, d))
  y = np.tanh(x[:, 0] @ rng.normal(size=(d, 3))) + x[:, 3] ** 2 @ rng.normal(size=(d, 3)) * 0.3
  y = y + 0.1 * rng.normal(size=y.shape)
  return x, y


def small_grams(c=3, n=6):
  """``c`` channel Grams and an output Gram of ``n`` samples (float32 numpy), for the checks of bad inputs."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, c, 2)).astype(np.float32)
  return np.array(hj.channel_grams(x)), np.array(hj.gaussian_gram(x[:, 0]))


# The error for features whose squared distances overflow float32, after the name of the argument.
OVERFLOW_MESSAGE = r"holds values up to .*e\+20 whose squared deviations from their mean overflow float32: rescale"


def overflowing_outputs():
  """Features ``x`` ``(64, 3, 4)`` and outputs ``y`` ``(64, 16)`` of about 1e20: finite in float32, but their
  squared distances overflow it (a Gaussian Gram of them came out NaN)."""
  rng = np.random.default_rng(10)
  x = rng.normal(size=(64, 3, 4)).astype(np.float32)
  y = rng.normal(size=(64, 16)).astype(np.float32) * np.float32(1e20)
  return x, y
