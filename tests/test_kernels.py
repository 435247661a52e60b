"""Kernels, centering, HSIC and CKA against hand-derived values and independent formulas."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsic_jax as hj
from hsic_jax import _gram, kernels
from tests._lasso_data import OVERFLOW_MESSAGE, overflowing_outputs


def _h(n):
  return np.eye(n) - np.ones((n, n)) / n


def test_gaussian_gram_explicit_gamma_by_hand():
  k = np.asarray(hj.gaussian_gram(np.array([[0.0], [1.0], [3.0]]), bandwidth=0.5))
  want = np.exp(-0.5 * np.array([[0, 1, 9], [1, 0, 4], [9, 4, 0]], float))
  np.testing.assert_allclose(k, want, rtol=1e-6)


def test_apib_bandwidth_is_one_over_dim():
  x = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
  k = np.asarray(hj.gaussian_gram(x, bandwidth="apib"))
  assert k[0, 1] == pytest.approx(np.exp(-2.0 / 4.0), rel=1e-6)


def test_median_bandwidth_by_hand():
  # Squared distances 1, 9, 4 -> median 4 -> gamma = 1 / (2 * 4).
  k = np.asarray(hj.gaussian_gram(np.array([0.0, 1.0, 3.0]), bandwidth="median"))
  assert k[0, 1] == pytest.approx(np.exp(-1.0 / 8.0), rel=1e-6)
  assert k[0, 2] == pytest.approx(np.exp(-9.0 / 8.0), rel=1e-6)


def test_pyhsiclasso_convention_matches_its_compute_kernel():
  compute_kernel = pytest.importorskip("pyHSICLasso.hsic_lasso").compute_kernel
  rng = np.random.default_rng(0)
  n, d = 30, 5
  x = (rng.normal(size=(n, d)) * 3.0 + 1.0).astype(np.float32)
  theirs = compute_kernel(x.T, "Gaussian", B=n, M=1, discarded=0).reshape(n, n)
  ours = np.asarray(hj.gaussian_gram(x, bandwidth="pyhsiclasso", centered=True, normalized=True))
  # compute_kernel returns rows and columns in the order of the permutation drawn under seed 0.
  np.random.seed(0)
  p = np.random.permutation(np.arange(n))
  np.testing.assert_allclose(ours[p][:, p], theirs, atol=2e-6)


def test_distances_clamped_and_diagonal_exact():
  x = np.full((4, 64), 1e3, np.float32) + np.arange(4, dtype=np.float32)[:, None] * 1e-4
  k = np.asarray(hj.gaussian_gram(x, bandwidth=1e-3))
  assert np.all(k <= 1.0) and np.all(np.diag(k) == 1.0)


def test_center_equals_hkh():
  rng = np.random.default_rng(1)
  k = rng.normal(size=(7, 7))
  with jax.enable_x64(True):
    np.testing.assert_allclose(np.asarray(hj.kernels.center(k)), _h(7) @ k @ _h(7), atol=1e-12)


def test_channel_grams_equal_per_channel_loop_and_batching():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(12, 5, 3)).astype(np.float32)
  g = np.asarray(hj.channel_grams(x, bandwidth="median"))
  g2 = np.asarray(hj.channel_grams(x, bandwidth="median", batch_size=2))
  for c in range(5):
    np.testing.assert_allclose(g[c], np.asarray(hj.gaussian_gram(x[:, c], bandwidth="median")), rtol=1e-5)
  np.testing.assert_allclose(g, g2, rtol=1e-6)
  gc = np.asarray(hj.channel_grams(x, centered=True, normalized=True))
  np.testing.assert_allclose(np.sqrt((gc ** 2).sum((1, 2))), 1.0, rtol=1e-5)


def _has_loop(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("scan", "while"):
      return True
    for value in eqn.params.values():
      if isinstance(value, jax.extend.core.ClosedJaxpr) and _has_loop(value.jaxpr):
        return True
  return False


def test_channel_grams_vmap_channels_for_accelerators_and_loop_on_cpus():
  x = np.random.default_rng(3).normal(size=(10, 6, 4)).astype(np.float32)
  args = (*_gram.jit_bandwidth("apib"), False, False, None)
  # pylint: disable=protected-access
  vmapped = jax.make_jaxpr(lambda v: _gram.jit_channel_grams(v, *args, "vmap"))(x)
  looped = jax.make_jaxpr(lambda v: _gram.jit_channel_grams(v, *args, "loop"))(x)
  assert not _has_loop(vmapped.jaxpr) and _has_loop(looped.jaxpr)
  np.testing.assert_allclose(np.asarray(_gram.jit_channel_grams(x, *args, "vmap")[0]),
                             np.asarray(_gram.jit_channel_grams(x, *args, "loop")[0]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("d", [3, 600])  # 600 >= SLICED_CHANNELS_MIN_DIM: one channel at a time on CPU
def test_channel_grams_of_long_rows_equal_numpy(d):
  rng = np.random.default_rng(d)
  x = rng.normal(size=(10, 4, d))
  g = np.asarray(hj.channel_grams(x.astype(np.float32), bandwidth="median"))
  for c in range(4):
    d2 = np.sum((x[:, None, c] - x[None, :, c]) ** 2, -1)
    gamma = 1.0 / (2.0 * np.median(d2[np.triu_indices(10, 1)]))
    np.testing.assert_allclose(g[c], np.exp(-gamma * d2), rtol=2e-5, atol=1e-6)


def test_delta_kernel():
  np.testing.assert_allclose(np.asarray(hj.delta_gram([2, 0, 2, 2])),
                             [[1 / 3, 0, 1 / 3, 1 / 3], [0, 1, 0, 0], [1 / 3, 0, 1 / 3, 1 / 3],
                              [1 / 3, 0, 1 / 3, 1 / 3]], rtol=1e-6)


def test_hsic_biased_by_hand():
  # K = L = I_2: K̄ = [[.5,-.5],[-.5,.5]], tr(K̄ K̄) = 1, (n-1)^2 = 1.
  assert float(hj.hsic(np.eye(2), np.eye(2))) == pytest.approx(1.0)
  # K = 11' (constant) is independent of anything: HSIC 0.
  assert float(hj.hsic(np.ones((3, 3)), np.eye(3))) == pytest.approx(0.0, abs=1e-7)
  # A 3-sample case: K̄ = H K H with K = diag(1, 0, 0) + 0 ...
  k = np.diag([1.0, 0.0, 0.0])
  l = np.eye(3)
  # tr(H K H H L H) = tr(K H) = K_00 * H_00 = 2/3, over (n-1)^2 = 4.
  assert float(hj.hsic(k, l)) == pytest.approx((2 / 3) / 4, rel=1e-6)


def _hsic_u_statistic(k, l):
  """Unbiased HSIC as the U-statistic over distinct 4-tuples (Song et al. 2012, Theorem 2)."""
  n = k.shape[0]
  total = 0.0
  count = 0
  for i, j, q, r in itertools.permutations(range(n), 4):
    h = 0.0
    for t, u, v, w in itertools.permutations((i, j, q, r)):
      h += k[t, u] * l[t, u] + k[t, u] * l[v, w] - 2 * k[t, u] * l[t, v]
    total += h / 24
    count += 1
  return total / count


def test_unbiased_hsic_equals_u_statistic():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(6, 2))
  b = a[:, :1] ** 2 + rng.normal(size=(6, 1))
  with jax.enable_x64(True):
    k = np.asarray(hj.gaussian_gram(a, bandwidth=0.5, dtype=np.float64))
    l = np.asarray(hj.gaussian_gram(b, bandwidth=0.5, dtype=np.float64))
    got = float(hj.hsic(k, l, unbiased=True, dtype=np.float64))
  assert got == pytest.approx(_hsic_u_statistic(k, l), rel=1e-9)


def test_linear_cka_matches_feature_space_formula():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(20, 6))
  y = x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(20, 4))
  xc, yc = x - x.mean(0), y - y.mean(0)
  want = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
  with jax.enable_x64(True):
    assert float(hj.linear_cka(x, y, dtype=np.float64)) == pytest.approx(want, rel=1e-10)


def test_hsic_matrix_is_pairwise_cka():
  rng = np.random.default_rng(5)
  feats = [rng.normal(size=(16, 4, 4, 3)), rng.normal(size=(16, 10)), rng.normal(size=(16, 2, 5))]
  feats.append(feats[1] * 2.0 + 1.0)  # a rescaled, shifted copy: linear CKA 1 with layer 1
  s = np.asarray(hj.hsic_matrix(feats))
  np.testing.assert_allclose(s, s.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(s), 1.0, rtol=1e-5)
  assert s[1, 3] == pytest.approx(1.0, rel=1e-5)
  for i in range(4):
    for j in range(4):
      assert s[i, j] == pytest.approx(float(hj.linear_cka(feats[i], feats[j])), abs=1e-5)
  raw = np.asarray(hj.hsic_matrix(feats[:2], normalized=False))
  k0 = feats[0].reshape(16, -1) @ feats[0].reshape(16, -1).T
  k1 = feats[1] @ feats[1].T
  assert raw[0, 1] == pytest.approx(float(hj.hsic(k0, k1)), rel=1e-4)


def test_constant_feature_gives_zero_not_nan():
  const = np.ones((8, 3))
  other = np.random.default_rng(6).normal(size=(8, 3))
  for bw in ("apib", "pyhsiclasso", "median"):
    assert float(hj.gaussian_cka(const, other, bandwidth=bw)) == 0.0
  assert np.all(np.isfinite(np.asarray(hj.hsic_matrix([const, other], kernel="gaussian"))))


def test_float64_requires_x64():
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match="jax.enable_x64"):
      hj.gaussian_gram(np.ones((3, 2)), dtype=np.float64)


@pytest.mark.parametrize("bad", ["gaussian", -1.0, 0.0, float("inf")])
def test_bad_bandwidth(bad):
  with pytest.raises(ValueError, match="bandwidth"):
    hj.gaussian_gram(np.ones((3, 2)), bandwidth=bad)


def test_sq_distances_nonnegative_under_cancellation():
  x = np.full((5, 300), 1e4, np.float32)
  assert float(np.min(np.asarray(_gram.sq_distances(x)))) >= 0.0


def test_a_large_common_offset_does_not_cancel_the_differences():
  # Features around 1000 that differ by about 1: ||a||^2 + ||b||^2 - 2<a, b> in float32 loses the differences to
  # rounding (entries of 1e6 * d carry errors of 0.1 * d). Distances, and so every kernel, are translation invariant:
  # float32 on the offset features must agree with float64 on the differences alone.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(24, 3, 16))
  shifted = (x + 1000.0).astype(np.float32)
  xr = shifted.astype(np.float64) - 1000.0  # what float32 holds, offset removed exactly
  gamma = 1.0 / 16
  d2 = ((xr[:, None] - xr[None, :]) ** 2).sum(-1)  # (n, n, c)
  want = np.exp(-gamma * np.moveaxis(d2, -1, 0))
  np.testing.assert_allclose(np.asarray(hj.channel_grams(shifted)), want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(hj.gaussian_gram(shifted[:, 0], bandwidth=gamma)), want[0], atol=2e-5)
  flat = xr.reshape(24, -1)
  lin = _h(24) @ flat @ flat.T @ _h(24)
  np.testing.assert_allclose(np.asarray(hj.linear_gram(shifted, centered=True)), lin, rtol=1e-4, atol=1e-3)
  # The problem, whole and streamed in tiles, equals the one from the float64 differences.
  y = np.tanh(xr[:, 0])
  ref = hj.problem_from_features(xr.astype(np.float32), y)
  for kw in ({}, {"max_block_bytes": 4096}):
    p = hj.problem_from_features(shifted, y, **kw)
    np.testing.assert_allclose(np.asarray(p.quad), np.asarray(ref.quad), rtol=1e-4, atol=1e-4 * float(ref.quad.max()))
    np.testing.assert_allclose(np.asarray(p.lin), np.asarray(ref.lin), rtol=1e-4, atol=1e-4 * float(ref.lin.max()))
  cka = hj.hsic_matrix([shifted, shifted[:, :1] * 2.0 - 5.0])
  want_cka = np.trace(lin @ _h(24) @ (flat[:, :16] @ flat[:, :16].T) @ _h(24)) / np.sqrt(
      np.sum(lin * lin) * np.sum((_h(24) @ flat[:, :16] @ flat[:, :16].T @ _h(24)) ** 2))
  np.testing.assert_allclose(np.asarray(cka)[0, 1], want_cka, rtol=1e-4)


def test_a_sweep_over_explicit_gammas_compiles_once():
  # An explicit gamma is a traced value: each new value reuses the compiled kernel (a rule name is static).
  from hsic_jax import problem as problem_lib  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  x = np.array([[0.0], [1.0], [3.0]], np.float32)
  feats = np.random.default_rng(0).normal(size=(12, 3, 2)).astype(np.float32)
  quads = []
  for gamma in (0.5, 0.25, 2.0):
    k = np.asarray(hj.gaussian_gram(x, bandwidth=gamma))
    np.testing.assert_allclose(k[0, 1:], np.exp(-gamma * np.array([1.0, 9.0])), rtol=1e-6)
    quads.append(np.asarray(hj.problem_from_features(feats, feats[:, 0], bandwidth=gamma, y_bandwidth=1.0,
                                                     max_block_bytes=1024).quad))
  assert not np.allclose(quads[0], quads[1])  # the gamma did reach the kernels
  # pylint: disable=protected-access
  assert kernels._gaussian_gram_checked._cache_size() == 1  # the compiled entry of gaussian_gram
  assert problem_lib._from_features_streaming._cache_size() == 1


@pytest.mark.parametrize("empty", [(6, 0), (6, 3, 0)])
def test_layer_without_values_is_refused_by_name(empty):
  # An empty layer has no Gram to measure; it was refused inside a NumPy reduction that named nothing.
  a = np.random.default_rng(0).normal(size=(6, 3))
  with pytest.raises(ValueError, match=r"^features\[1\] must hold at least one value per sample"):
    hj.hsic_matrix([a, np.zeros(empty)])
  with pytest.raises(ValueError, match=r"^features\[1\] must hold at least one value per sample"):
    hj.hsic_matrix([a, np.zeros(empty)], kernel="gaussian")
  with pytest.raises(ValueError, match=r"^y must hold at least one value per sample"):
    hj.linear_cka(a, np.zeros(empty))


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs; features at any scale and half-precision dtypes.


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(value):
  x = np.random.default_rng(1).normal(size=(8, 3, 2))
  x[4, 1, 0] = value
  with pytest.raises(ValueError, match="^x contains"):
    hj.channel_grams(x)


def test_mismatched_samples_are_refused():
  with pytest.raises(ValueError, match="features\\[1\\] has 5 samples"):
    hj.hsic_matrix([np.ones((6, 2)), np.ones((5, 2))])
  with pytest.raises(ValueError, match="k and l must have the same shape"):
    hj.hsic(np.eye(3), np.eye(4))


def test_wrong_rank_is_refused():
  with pytest.raises(ValueError, match="x must have 3 dimensions"):
    hj.channel_grams(np.ones((4, 3)))


def test_too_few_samples_for_the_unbiased_estimator():
  with pytest.raises(ValueError, match="unbiased HSIC estimator needs n >= 4"):
    hj.hsic(np.eye(3), np.eye(3), unbiased=True)


def test_bad_labels_values_and_batch_sizes_are_refused():
  with pytest.raises(ValueError, match="labels must hold integer class ids"):
    hj.delta_gram(np.array([0.5, 1.0, 2.0]))
  with pytest.raises(ValueError, match=r"^x must hold at least one value per sample"):
    hj.channel_grams(np.ones((6, 2, 0)))
  for batch_size in (0, -1, 1.5):
    with pytest.raises(ValueError, match="batch_size must be a positive number of channels"):
      hj.channel_grams(np.ones((6, 2, 2)), batch_size=batch_size)


def test_gaussian_features_whose_squares_overflow_are_refused():
  # Finite features from about 1e19 have squared distances that overflow float32 (the Gram came out NaN); the error
  # names the argument.
  x, y = overflowing_outputs()
  msg = OVERFLOW_MESSAGE
  with pytest.raises(ValueError, match="^x " + msg):
    hj.gaussian_gram(y)
  with pytest.raises(ValueError, match="^x " + msg):
    hj.gaussian_cka(y, x[:, 0])
  with pytest.raises(ValueError, match="^y " + msg):
    hj.gaussian_cka(x[:, 0], y)
  with pytest.raises(ValueError, match="^features\\[1\\] " + msg):
    hj.hsic_matrix([x, y], kernel="gaussian")


def _linear_cka64(x, y):
  """Linear CKA in float64 numpy: the oracle."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  x, y = x - x.mean(0), y - y.mean(0)
  kx, ky = x @ x.T, y @ y.T
  return float(np.sum(kx * ky) / np.sqrt(np.sum(kx * kx) * np.sum(ky * ky)))


@pytest.fixture(scope="module")
def wide_layers():
  rng = np.random.default_rng(7)
  a = rng.normal(size=(256, 4096)).astype(np.float32)
  b = (a[:, :2048] + rng.normal(size=(256, 2048))).astype(np.float32)
  return a, b


@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e9, 1e20])
def test_linear_cka_and_hsic_matrix_are_right_at_any_scale(wide_layers, scale):
  # Gram products of features of 1e9 at n = 256, d = 4096 overflow float32 (and those of 1e-10 underflow): CKA
  # does not depend on the scale, and the features are scaled to unit magnitude before their products.
  a, b = wide_layers
  a, b = (a * np.float32(scale)), (b * np.float32(scale))
  want = _linear_cka64(a, b)
  assert float(hj.linear_cka(a, b)) == pytest.approx(want, abs=1e-5)
  s = np.asarray(hj.hsic_matrix([a, b]))
  np.testing.assert_allclose(s, [[1.0, want], [want, 1.0]], atol=1e-5)
  assert np.all(np.diag(s) <= 1.0 + 1e-6)


def test_raw_hsic_is_right_at_any_scale_or_refused():
  rng = np.random.default_rng(8)
  a = rng.normal(size=(32, 64)).astype(np.float32)
  b = (a[:, :16] + rng.normal(size=(32, 16))).astype(np.float32)

  def raw64(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    return np.sum((x @ x.T) * (y @ y.T)) / (len(x) - 1) ** 2

  for scale in (1e-6, 1e8):  # raw HSIC near 1e-23 and 1e33: inside float32's range, though the Gram sums are not
    x, y = a * np.float32(scale), b * np.float32(scale)
    s = np.asarray(hj.hsic_matrix([x, y], normalized=False))
    np.testing.assert_allclose(s, [[raw64(x, x), raw64(x, y)], [raw64(x, y), raw64(y, y)]], rtol=1e-5)
  for bad, layers in ((0, [a * np.float32(1e15), b]), (1, [a, b * np.float32(1e-30)])):  # beyond float32 either way
    with pytest.raises(ValueError, match=rf"^features\[{bad}\] holds values up to .* whose raw HSIC "
                       r"\(normalized=False\) is outside the range of float32: pass normalized=True"):
      hj.hsic_matrix(layers, normalized=False)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_cka_in_half_precision_is_computed_in_float32(dtype):
  # float16 sums of Gram products overflow at ordinary scale (CKA came out 0 or NaN); they are taken in float32.
  rng = np.random.default_rng(9)
  a = rng.normal(size=(64, 32)).astype(np.float16)
  b = (a[:, :16] + rng.normal(size=(64, 16))).astype(np.float16)
  want = _linear_cka64(a, b)
  got = hj.linear_cka(a, b, dtype=dtype)
  assert got.dtype == jnp.float32 and float(got) == pytest.approx(want, abs=1e-5)
  s = hj.hsic_matrix([a, b], dtype=dtype)
  assert s.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(s), [[1.0, want], [want, 1.0]], atol=1e-5)
  k, l = (a.astype(np.float64) @ a.T.astype(np.float64)), (b.astype(np.float64) @ b.T.astype(np.float64))
  assert float(hj.cka(k, l, dtype=dtype)) == pytest.approx(want, abs=1e-5)
