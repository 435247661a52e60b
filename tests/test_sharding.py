"""Sharded (8 simulated CPU devices, channels or layers split across the mesh) equals unsharded, and channel Grams and
stacked solves stay split (each device computes its own shard, no collective)."""

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


def _split_on_leading(x, mesh):
  spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  return isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh and spec[0] == "c" and \
      all(e is None for e in spec[1:]) and len(x.sharding.device_set) == 8


def test_layer_sharded_solve_and_select_k_stay_sharded(mesh):
  problems = [hj.problem_from_features(*_data(seed, c=6)) for seed in range(16)]
  stacked, widths = hj.stack_problems(problems)
  sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("c", *([None] * (a.ndim - 1))))),
                         stacked)
  lams = 0.1 * np.asarray(hj.lambda_max(stacked))
  ref, got = hj.solve(stacked, lams), hj.solve(sharded, lams)
  for leaf in jax.tree.leaves(got):
    assert _split_on_leading(leaf, mesh), leaf.sharding
  np.testing.assert_array_equal(np.asarray(got.selected), np.asarray(ref.selected))
  np.testing.assert_allclose(np.asarray(got.beta), np.asarray(ref.beta), rtol=1e-5, atol=1e-7)
  # Each device solves its own problems: the compiled solve holds no collective at all.
  from hsic_jax import solver  # pylint: disable=import-outside-toplevel
  place = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P("c", *spec)))  # noqa: E731
  hlo = solver._solve_split.lower(  # pylint: disable=protected-access
      sharded, place(lams), place(np.zeros((16, 6), np.float32), None), 1e-5, 1000, 10, True, "loop", mesh,
      "c").compile().as_text()
  assert [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo] == []
  # One penalty for all, and a warm start, keep the split too.
  warm = hj.solve(sharded, 0.05, init=np.asarray(ref.beta))
  assert _split_on_leading(warm.beta, mesh)
  np.testing.assert_allclose(np.asarray(warm.beta), np.asarray(hj.solve(stacked, 0.05, init=ref.beta).beta),
                             rtol=1e-5, atol=1e-7)
  k = np.array([1 + i % 4 for i in range(16)])
  ref_k, got_k = hj.select_k(stacked, k, widths=widths), hj.select_k(sharded, k, widths=widths)
  for leaf in jax.tree.leaves(got_k):
    assert _split_on_leading(leaf, mesh), leaf.sharding
  np.testing.assert_array_equal(np.asarray(got_k.selected), np.asarray(ref_k.selected))
  assert (np.asarray(got_k.selected).sum(1) == k).all()


def test_channel_sharded_grams_stay_sharded(mesh):
  x, _ = _data(c=16)
  xs = jax.device_put(x, NamedSharding(mesh, P(None, "c", None)))
  got = hj.channel_grams(xs, bandwidth="median")
  assert _split_on_leading(got, mesh), got.sharding
  np.testing.assert_allclose(np.asarray(got), np.asarray(hj.channel_grams(x, bandwidth="median")), rtol=1e-6,
                             atol=1e-7)
  bad = np.array(x)
  bad[3, 9, 1] = np.nan  # a channel of the 5th device's shard
  with pytest.raises(ValueError, match=r"x contains 1 NaN or Inf .* index \(3, 9, 1\)"):
    hj.channel_grams(jax.device_put(bad, NamedSharding(mesh, P(None, "c", None))))


def test_path_with_penalties_split_stays_split(mesh):
  p = hj.problem_from_features(*_data(3, c=10))
  lams = np.linspace(0.02, 0.6, 16) * float(hj.lambda_max(p))
  ref = hj.lasso_path(p, lams=lams)
  got = hj.lasso_path(p, lams=jax.device_put(lams.astype(np.float32), NamedSharding(mesh, P("c"))))
  for leaf in jax.tree.leaves(got):
    assert _split_on_leading(leaf, mesh), leaf.sharding
  np.testing.assert_array_equal(np.asarray(got.selected), np.asarray(ref.selected))
  np.testing.assert_allclose(np.asarray(got.beta), np.asarray(ref.beta), rtol=1e-5, atol=1e-7)
