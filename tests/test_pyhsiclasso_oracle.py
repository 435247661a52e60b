"""Nonnegative HSIC Lasso with pyHSICLasso's conventions selects what pyHSICLasso selects, on real data."""

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

import hsic_jax as hj

pyhsic = pytest.importorskip("pyHSICLasso")


def _pyhsiclasso_select(x, y, k, task):
  h = pyhsic.HSICLasso()
  h.input(x, y)
  getattr(h, task)(k, B=0, M=1, n_jobs=1, max_neighbors=0)
  return sorted(h.get_index()), h


def _ours(x, y, k, y_kernel):
  # pyHSICLasso's convention: scalar features standardised by their std, sigma = sqrt(d); Frobenius-normalised
  # centered Grams; delta kernel for class labels.
  p = hj.problem_from_features(x[:, :, None], y, bandwidth="pyhsiclasso", y_kernel=y_kernel, normalized=True)
  return hj.select_k(p, k), p


@pytest.mark.parametrize("k", [5, 10])
def test_digits_classification_same_features(k, capsys):
  data = load_digits()
  n = 200
  x = data.data[:n].astype(np.float64)
  keep = x.std(0) > 0  # pyHSICLasso divides by each feature's std: constant pixels would give NaN there
  x = x[:, keep]
  y = data.target[:n]
  theirs, _ = _pyhsiclasso_select(x, y, k, "classification")
  sel, _ = _ours(x, y, k, "delta")
  assert bool(sel.exact)
  assert sorted(np.flatnonzero(np.asarray(sel.selected)).tolist()) == theirs


def test_breast_cancer_regression_same_features_and_scores(capsys):
  data = load_breast_cancer()
  n = 150
  x = data.data[:n]
  y = data.target[:n].astype(np.float64) + 10.0 * x[:, 5]  # a continuous target
  theirs, h = _pyhsiclasso_select(x, y, 6, "regression")
  p = hj.problem_from_features(x[:, :, None], y, bandwidth="pyhsiclasso", y_bandwidth="pyhsiclasso",
                               normalized=True)
  sel = hj.select_k(p, 6)
  assert sorted(np.flatnonzero(np.asarray(sel.selected)).tolist()) == theirs
  # At pyHSICLasso's final lambda (where the next feature would enter), the coefficients agree.
  # h.lam holds the correlation level at each LARS step; entry len(A) is where the path stopped.
  lam = float(np.asarray(h.lam).ravel()[len(h.A)])
  assert lam > 0
  res = hj.solve(p, lam, tol=1e-7)  # as tight as float32 allows (the solver stops when it stalls)
  # Both sides are float32: agreement to a few 1e-6 on coefficients of order 0.1.
  np.testing.assert_allclose(np.asarray(res.beta)[h.A], np.asarray(h.beta).ravel()[h.A], rtol=1e-4, atol=5e-6)
