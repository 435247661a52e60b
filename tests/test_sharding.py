"""Sharded (8 simulated CPU devices, channels or layers split across the mesh) equals unsharded."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hsic_jax as hj


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax")
  return jax.make_mesh((8,), ("c",), axis_types=(jax.sharding.AxisType.Auto,))


def _data(seed=0, n=24, c=16, d=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, c, d)).astype(np.float32)
  y = np.sin(x[:, 0]) + x[:, 3] ** 2
  return x, y


def test_channel_sharded_problem_equals_unsharded(mesh):
  x, y = _data()
  xs = jax.device_put(x, NamedSharding(mesh, P(None, "c", None)))
  assert len(xs.sharding.device_set) == 8
  ref = hj.problem_from_features(x, y)
  got = hj.problem_from_features(xs, y)
  np.testing.assert_allclose(np.asarray(got.quad), np.asarray(ref.quad), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got.lin), np.asarray(ref.lin), rtol=1e-5, atol=1e-4)
  # Grams sharded over channels, then the solve.
  gx = hj.channel_grams(x)
  gxs = jax.device_put(gx, NamedSharding(mesh, P("c", None, None)))
  gy = hj.gaussian_gram(y)
  lam = 0.05 * float(hj.lambda_max(ref))
  a = hj.lasso_select(gx, gy, lam)
  b = hj.lasso_select(gxs, gy, lam)
  np.testing.assert_array_equal(np.asarray(a.selected), np.asarray(b.selected))
  np.testing.assert_allclose(np.asarray(a.beta), np.asarray(b.beta), rtol=1e-4, atol=1e-6)


def test_layer_sharded_batch_solve_equals_unsharded(mesh):
  problems = [hj.problem_from_features(*_data(seed, c=4 + seed)) for seed in range(8)]
  stacked, _ = hj.stack_problems(problems)
  lams = 0.1 * hj.lambda_max(stacked)
  sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("c", *([None] * (a.ndim - 1))))),
                         stacked)
  ref = hj.solve(stacked, lams)
  got = hj.solve(sharded, jax.device_put(lams, NamedSharding(mesh, P("c"))))
  np.testing.assert_array_equal(np.asarray(got.selected), np.asarray(ref.selected))
  np.testing.assert_allclose(np.asarray(got.beta), np.asarray(ref.beta), rtol=1e-4, atol=1e-6)
