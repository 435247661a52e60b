"""hsic_jax.limit_lapack_threads: it caps SciPy's LAPACK (the one JAX's CPU kernels call) and leaves NumPy's alone."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy
import threadpoolctl

import hsic_jax as hj


@pytest.fixture
def restore_blas_threads():
  import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's BLAS so that its count is saved below)
  saved = {lib.filepath: lib.num_threads for lib in threadpoolctl.ThreadpoolController().lib_controllers}
  yield
  for lib in threadpoolctl.ThreadpoolController().lib_controllers:
    if lib.filepath in saved:
      lib.set_num_threads(saved[lib.filepath])


def _counts() -> dict[str, int]:
  return {info["filepath"]: info["num_threads"] for info in threadpoolctl.threadpool_info()
          if info["user_api"] == "blas"}


def _inside(path: str, pkg) -> bool:
  root = pathlib.Path(pkg.__file__).resolve().parent
  return any(pathlib.Path(path).resolve().is_relative_to(d) for d in (root, root.parent / f"{root.name}.libs"))


@pytest.mark.usefixtures("restore_blas_threads")
def test_caps_scipys_blas_and_not_numpys():
  before = _counts()
  scipy_libs = [p for p in before if _inside(p, scipy)]
  numpy_libs = [p for p in before if _inside(p, np)]
  if not scipy_libs or not numpy_libs:
    pytest.skip("SciPy and NumPy do not each bundle their own BLAS in this installation")
  previous = hj.limit_lapack_threads(1)
  after = _counts()
  assert sorted(previous) == sorted(scipy_libs)
  assert all(previous[p] == before[p] for p in scipy_libs)
  assert all(after[p] == 1 for p in scipy_libs)
  assert all(after[p] == before[p] for p in numpy_libs)
  # JAX's CPU factorisations still run (and agree with NumPy) with the cap in place.
  a = np.random.default_rng(0).normal(size=(40, 40))
  a = a @ a.T + 40 * np.eye(40)
  chol = jax.jit(jnp.linalg.cholesky)(jnp.asarray(a, jnp.float32))
  np.testing.assert_allclose(np.asarray(chol), np.linalg.cholesky(a), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("restore_blas_threads")
def test_cap_changes_and_reports_the_previous_count():
  first = hj.limit_lapack_threads(1)
  second = hj.limit_lapack_threads(3)
  after = _counts()
  assert first and sorted(second) == sorted(first)
  assert all(second[p] == 1 for p in second)
  assert all(after[p] == 3 for p in second)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_thread_count(bad):
  with pytest.raises(ValueError, match="threads"):
    hj.limit_lapack_threads(bad)
