"""Bad input gets a ValueError that names the argument; nothing returns NaN silently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsic_jax as hj


def _grams(c=3, n=6):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, c, 2)).astype(np.float32)
  return np.array(hj.channel_grams(x)), np.array(hj.gaussian_gram(x[:, 0]))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features(value):
  x = np.random.default_rng(1).normal(size=(8, 3, 2))
  x[4, 1, 0] = value
  with pytest.raises(ValueError, match=r"x contains 1 NaN or Inf .* index \(4, 1, 0\)"):
    hj.problem_from_features(x, np.ones((8, 2)))
  with pytest.raises(ValueError, match="^x contains"):
    hj.channel_grams(x)
  gx, gy = _grams()
  gy[0, 0] = value
  with pytest.raises(ValueError, match="^gram_y contains"):
    hj.lasso_select(gx, gy, 0.1)


@pytest.mark.parametrize("d", [2, 600])  # 600: the one-channel-at-a-time path for long rows
@pytest.mark.parametrize("max_block_bytes", [None, 512])  # 512: streamed from x in 3 x 3 tiles
def test_non_finite_features_on_every_build_path(d, max_block_bytes):
  # The build validates x from the squared norms it computes anyway. This Inf is one a check of the Grams would
  # miss: every other sample is negative where it is +Inf, so its distances are +Inf and its kernel row exp(-Inf) = 0
  # is finite.
  x = np.abs(np.random.default_rng(2).normal(size=(8, 3, d))).astype(np.float32) * -1.0
  x[5, 2, 0] = np.inf
  kw = {} if max_block_bytes is None else {"max_block_bytes": max_block_bytes}
  with pytest.raises(ValueError, match=r"x contains 1 NaN or Inf .* index \(5, 2, 0\)"):
    hj.problem_from_features(x, np.ones((8, 2)), **kw)
  with pytest.raises(ValueError, match=r"x contains 1 NaN or Inf .* index \(5, 2, 0\)"):
    hj.channel_grams(x)


@pytest.mark.parametrize("max_block_bytes", [None, 512])
def test_features_whose_squares_overflow_are_refused(max_block_bytes):
  x = np.random.default_rng(3).normal(size=(8, 3, 4)).astype(np.float32)
  x[1, 0, 2] = 3e19  # finite in float32, its square is not
  kw = {} if max_block_bytes is None else {"max_block_bytes": max_block_bytes}
  msg = r"x holds values up to 3e\+19 whose squared deviations from their mean overflow float32: rescale"
  with pytest.raises(ValueError, match=msg):
    hj.problem_from_features(x, np.ones((8, 2)), **kw)
  with pytest.raises(ValueError, match=msg):
    hj.channel_grams(x)


def test_mismatched_samples():
  gx, gy = _grams(n=6)
  with pytest.raises(ValueError, match="gram_x and gram_y must have the same number of samples"):
    hj.lasso_select(gx, gy[:5, :5], 0.1)
  with pytest.raises(ValueError, match="x and y must have the same number of samples"):
    hj.problem_from_features(np.ones((6, 2, 2)), np.ones((5, 3)))
  with pytest.raises(ValueError, match="features\\[1\\] has 5 samples"):
    hj.hsic_matrix([np.ones((6, 2)), np.ones((5, 2))])
  with pytest.raises(ValueError, match="k and l must have the same shape"):
    hj.hsic(np.eye(3), np.eye(4))


def test_non_square_and_wrong_rank():
  gx, gy = _grams()
  with pytest.raises(ValueError, match="gram_x must hold square"):
    hj.lasso_select(gx[:, :, :5], gy, 0.1)
  with pytest.raises(ValueError, match="gram_y must hold square"):
    hj.lasso_select(gx, gy[:, :5], 0.1)
  with pytest.raises(ValueError, match=r"gram_x must have 3 or 4 dimensions, got shape \(6, 6\)"):
    hj.lasso_select(gy, gy, 0.1)
  with pytest.raises(ValueError, match="x must have 3 dimensions"):
    hj.channel_grams(np.ones((4, 3)))


@pytest.mark.parametrize("lam", [-1e-3, np.nan, np.inf])
def test_bad_lambda(lam):
  gx, gy = _grams()
  with pytest.raises(ValueError, match="^lam must be"):
    hj.lasso_select(gx, gy, lam)


def test_zero_channels():
  _, gy = _grams()
  with pytest.raises(ValueError, match="gram_x must hold at least one channel"):
    hj.lasso_select(np.zeros((0, 6, 6)), gy, 0.1)
  with pytest.raises(ValueError, match="x must have at least one channel"):
    hj.problem_from_features(np.zeros((6, 0, 2)), np.ones((6, 1)))


def test_too_few_samples():
  with pytest.raises(ValueError, match="gram_y must hold at least 2 samples"):
    hj.lasso_select(np.ones((2, 1, 1)), np.ones((1, 1)), 0.1)
  with pytest.raises(ValueError, match="x must hold at least 2 samples"):
    hj.problem_from_features(np.ones((1, 2, 2)), np.ones((1, 1)))
  with pytest.raises(ValueError, match="unbiased HSIC estimator needs n >= 4"):
    hj.hsic(np.eye(3), np.eye(3), unbiased=True)


def test_bad_k_and_options():
  gx, gy = _grams()
  p = hj.problem_from_grams(gx, gy)
  for k in (0, 4, -1):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
      hj.select_k(p, k)
  with pytest.raises(ValueError, match="tol must be > 0"):
    hj.solve(p, 0.1, tol=0.0)
  with pytest.raises(ValueError, match="init must have 3 coefficients"):
    hj.solve(p, 0.1, init=np.zeros(4))
  with pytest.raises(ValueError, match="y_kernel|kernel must be"):
    hj.problem_from_features(np.ones((6, 2, 2)), np.ones((6, 1)), y_kernel="laplace")
  with pytest.raises(ValueError, match="labels must hold integer class ids"):
    hj.delta_gram(np.array([0.5, 1.0, 2.0]))
  with pytest.raises(ValueError, match="problem must be a LassoProblem"):
    hj.solve((1, 2), 0.1)
  with pytest.raises(ValueError, match="problems\\[1\\] has Q of shape"):
    hj.combine_problems([p, hj.problem_from_grams(gx[:2], gy)])
  with pytest.raises(ValueError, match=r"problems\[1\] must be a LassoProblem"):
    hj.combine_problems([p, None])
  stacked, widths = hj.stack_problems([p, p])
  with pytest.raises(ValueError, match=r"problems\[0\] is a batch of problems"):
    hj.stack_problems([stacked])
  with pytest.raises(ValueError, match="lambda_grid takes one unbatched problem"):
    hj.lambda_grid(stacked)
  with pytest.raises(ValueError, match=r"lam of shape \(3,\) does not broadcast against the problem's batch shape"):
    hj.solve(stacked, np.ones(3))
  for lam, msg in ((None, "lam is required"), ("a", "lam must be a number")):
    with pytest.raises(ValueError, match=msg):
      hj.solve(p, lam)
  # A (g, 1) grid solves g penalties for each problem of a batch, as the error above suggests.
  assert hj.solve(stacked, np.array([[0.1], [0.2], [0.3]])).beta.shape == (3, 2, 3)
  # Penalties in any float type JAX has, bfloat16 included, are numbers (and a negative one is refused).
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  np.testing.assert_allclose(np.asarray(hj.solve(p, jnp.bfloat16(0.125)).beta), np.asarray(hj.solve(p, 0.125).beta))
  with pytest.raises(ValueError, match="lam must be >= 0"):
    hj.solve(p, jnp.asarray([-0.5, 0.1], jnp.bfloat16))
  with pytest.raises(ValueError, match=r"^x must hold at least one value per sample"):
    hj.problem_from_features(np.ones((6, 2, 0)), np.ones((6, 1)))
  with pytest.raises(ValueError, match=r"^x must hold at least one value per sample"):
    hj.channel_grams(np.ones((6, 2, 0)))
  with pytest.raises(ValueError, match=r"^y must hold at least one value per sample"):
    hj.problem_from_features(np.ones((6, 2, 2)), np.ones((6, 0)))
  for batch_size in (0, -1, 1.5):
    with pytest.raises(ValueError, match="batch_size must be a positive number of channels"):
      hj.channel_grams(np.ones((6, 2, 2)), batch_size=batch_size)
  with pytest.raises(ValueError, match="^y must hold integer class ids"):  # named as the caller's argument
    hj.problem_from_features(np.ones((6, 2, 2)), np.linspace(0, 1, 6), y_kernel="delta")


def test_large_layer_peak_memory_under_2gb(tmp_path):
  """n = 1024 samples, c = 512 channels: building the solver's inputs stays well under 2 GB (fresh process)."""
  import os
  import subprocess
  if not os.path.exists("/proc/self/status"):
    pytest.skip("peak memory is read from /proc/self/status (Linux)")
  import sys
  import textwrap
  script = textwrap.dedent("""
      import numpy as np, jax, hsic_jax as hj
      rng = np.random.default_rng(0)
      x = rng.normal(size=(1024, 512, 4)).astype(np.float32)
      y = rng.normal(size=(1024, 32)).astype(np.float32)
      p = hj.problem_from_features(x, y)
      assert np.all(np.isfinite(np.asarray(p.quad)))
      # VmHWM (peak RSS of this address space); ru_maxrss would include the parent's peak inherited across exec.
      hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
      print(int(hwm.split()[1]) * 1024)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={"PATH": "", "JAX_PLATFORMS": "cpu"})
  peak = int(out.stdout.strip().splitlines()[-1])
  assert peak < 2 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"


def test_non_finite_device_array():
  import jax.numpy as jnp
  x = jnp.ones((6, 2, 3)).at[2, 1, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"x contains 1 NaN or Inf .* index \(2, 1, 0\)"):
    hj.problem_from_features(x, np.ones((6, 2)))


def test_asymmetric_gram_is_refused():
  gx, gy = _grams()
  bad = gx.copy()
  bad[1, 0, 3] += 0.5  # no longer a kernel Gram matrix
  with pytest.raises(ValueError, match="gram_x must hold symmetric Gram matrices"):
    hj.lasso_select(bad, gy, 0.1)
  with pytest.raises(ValueError, match="gram_y must hold symmetric"):
    hj.lasso_select(gx, np.triu(gy), 0.1)
  # An antisymmetric perturbation with zero row and column sums (a cyclic shift minus its transpose) leaves the row
  # and column means equal; it is still refused, in the whole and the tiled build.
  shift = np.roll(np.eye(gx.shape[1], dtype=np.float32), 1, axis=1)
  for kw in ({}, {"max_block_bytes": 200}):
    with pytest.raises(ValueError, match="gram_x must hold symmetric Gram matrices"):
      hj.problem_from_grams(gx + 0.05 * (shift - shift.T), gy, **kw)
    with pytest.raises(ValueError, match="gram_y must hold symmetric"):
      hj.problem_from_grams(gx, gy + 0.05 * (shift - shift.T), **kw)
  # Rounding-level asymmetry (a Gram computed as X X^T in float32) is accepted.
  noisy = gx + 1e-7 * np.random.default_rng(0).normal(size=gx.shape).astype(np.float32)
  assert np.isfinite(float(hj.lasso_select(noisy, gy, 0.1).objective))


def test_asymmetry_far_above_rounding_is_accepted_at_large_n():
  # Independent relative errors of 1e-4 per entry (far above float32 rounding, e.g. a Gram assembled from blocks
  # computed in a different order) in Grams whose entries are all near 1: the random-vector probe moves by about
  # 1e-4 per row there, which a tolerance of 1e-4 of the scale refused at n = 256.
  rng = np.random.default_rng(3)
  n = 256
  x = rng.normal(size=(n, 2, 4)).astype(np.float32)
  gx = np.asarray(hj.channel_grams(x, bandwidth=0.01))  # entries near 1
  gy = np.asarray(hj.gaussian_gram(x[:, 0], bandwidth=0.01))
  noisy = gx * (1 + 1e-4 * rng.standard_normal(gx.shape)).astype(np.float32)
  assert np.abs(noisy - np.swapaxes(noisy, 1, 2)).max() > 1e-4  # really asymmetric at that level
  p = hj.problem_from_grams(noisy, gy)
  assert np.isfinite(np.asarray(p.quad)).all()
  # At small n the means bound is the stricter one (about 2e-5 sqrt(n) per entry): 1e-5, still 100x float32
  # rounding, passes at n = 8 for every seed tried here.
  for seed in range(10):
    small = np.random.default_rng(seed)
    x8 = small.normal(size=(8, 2, 4)).astype(np.float32)
    g8 = np.asarray(hj.channel_grams(x8, bandwidth=0.01))
    hj.problem_from_grams(g8 * (1 + 1e-5 * small.standard_normal(g8.shape)).astype(np.float32),
                          np.asarray(hj.gaussian_gram(x8[:, 0], bandwidth=0.01)))
  # An asymmetry that is not rounding is still refused at this n: one row of the transposed triangle off by 1%.
  bad = gx.copy()
  bad[0, 7, 8:] *= 1.01
  with pytest.raises(ValueError, match="gram_x must hold symmetric Gram matrices"):
    hj.problem_from_grams(bad, gy)


def test_bad_layer_of_a_batch_is_named():
  gx, gy = _grams()
  gxs, gys = np.stack([gx, gx, gx]), np.stack([gy, gy, gy])
  bad = gxs.copy()
  bad[2, 1, 0, 3] += 0.5
  with pytest.raises(ValueError, match=r"gram_x must hold symmetric Gram matrices \(layer 2 of the batch\)"):
    hj.problem_from_grams(bad, gys)
  bad = gys.copy()
  bad[1, 0, 3] += 0.5
  with pytest.raises(ValueError, match=r"gram_y must hold symmetric Gram matrices \(layer 1 of the batch\)"):
    hj.problem_from_grams(gxs, bad)


def test_gram_entries_whose_sums_overflow_are_refused():
  # Finite entries whose row sums overflow float32 would make the problem Inf/NaN; the error says so and names the
  # layer, and an asymmetric layer beside it is not let through either.
  gx, gy = _grams()
  with pytest.raises(ValueError, match=r"^gram_x holds entries up to 3e\+38 whose sums overflow float32"):
    hj.problem_from_grams(gx * np.float32(3e38), gy)
  gxs, gys = np.stack([gx, gx, gx]), np.stack([gy, gy, gy])
  gxs[0] *= np.float32(3e38)
  gxs[2, 1, 0, 3] += 0.5
  with pytest.raises(ValueError, match=r"^gram_x \(layer 0 of the batch\) holds entries up to 3e\+38"):
    hj.problem_from_grams(gxs, gys)
  # Smaller entries whose sums are finite but whose products Q, q, const are not.
  with pytest.raises(ValueError, match=r"^the products of the Gram matrices overflow float32 \(gram_x holds entries "
                     r"up to 1e\+19, gram_y up to 1\): rescale the Gram matrices .* or compute in float64\.$"):
    hj.problem_from_grams(gx * np.float32(1e19), gy)
  with jax.enable_x64(True):  # already float64: no advice to compute in float64
    with pytest.raises(ValueError, match=r"products of the Gram matrices overflow float64 .*at most 1\)\.$"):
      hj.problem_from_grams(gx.astype(np.float64) * 1e307, gy, dtype=jnp.float64)


def test_non_finite_problem_is_refused():
  gx, gy = _grams()
  p = hj.problem_from_grams(gx, gy)
  bad = p._replace(lin=p.lin.at[1].set(np.nan))
  with pytest.raises(ValueError, match=r"problem\.lin contains 1 NaN or Inf"):
    hj.solve(bad, 0.1)
  assert np.isfinite(float(hj.solve(p, 0.1).objective))


def test_check_false_skips_value_checks_only():
  """``check=False`` returns without reading the build's validation back (a caller validates once for many), and
  computes the same thing; structural errors are raised either way."""
  x = np.random.default_rng(1).normal(size=(8, 3, 2)).astype(np.float32)
  y = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
  gx, gy = _grams()
  checked, unchecked = hj.problem_from_features(x, y), hj.problem_from_features(x, y, check=False)
  for a, b in zip(checked, unchecked):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(hj.problem_from_grams(gx, gy), hj.problem_from_grams(gx, gy, check=False)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(hj.solve(checked, 0.1).beta),
                                np.asarray(hj.solve(checked, 0.1, check=False).beta))
  np.testing.assert_array_equal(np.asarray(hj.select_k(checked, 2).selected),
                                np.asarray(hj.select_k(checked, 2, check=False).selected))
  x[3, 0, 1] = np.nan
  bad = hj.problem_from_features(x, y, check=False)  # no error: the caller checks
  assert not np.isfinite(np.asarray(bad.quad)).all()
  with pytest.raises(ValueError, match="x contains 1 NaN"):
    hj.problem_from_features(x, y)
  with pytest.raises(ValueError, match="same number of samples"):
    hj.problem_from_features(x, y[:5], check=False)
  with pytest.raises(ValueError, match="LassoProblem"):
    hj.solve({"quad": 1}, 0.1, check=False)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_gram_in_one_layer_of_a_batch(value):
  # A batch of layers is validated as a whole: one bad layer among good ones is found, and named as non-finite
  # (not as asymmetric, which a NaN row mean would also look like).
  gx, gy = _grams()
  gxs, gys = np.stack([gx, gx, gx]), np.stack([gy, gy, gy])
  bad = gxs.copy()
  bad[1, 2, 3, 4] = value
  with pytest.raises(ValueError, match=r"^gram_x contains 1 NaN or Inf .* index \(1, 2, 3, 4\)"):
    hj.problem_from_grams(bad, gys)
  bad = gys.copy()
  bad[2, 0, 5] = value
  with pytest.raises(ValueError, match=r"^gram_y contains 1 NaN or Inf .* index \(2, 0, 5\)"):
    hj.problem_from_grams(gxs, bad)
  # The asymmetry of a small-scale layer is judged against its own scale, not the largest one in the batch.
  big = gxs.copy()
  big[0] *= 1e4
  big[2, 1, 0, 3] += 0.5
  with pytest.raises(ValueError, match="gram_x must hold symmetric"):
    hj.problem_from_grams(big, gys)


# ----------------------------------------------------------------------------------------------------------------
# Features at any scale, half-precision dtypes and argument types.


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


@pytest.mark.parametrize("max_block_bytes", [None, 512])  # 512: streamed from x in tiles
def test_gaussian_features_whose_squares_overflow_are_refused(max_block_bytes):
  # Finite features from about 1e19 have squared distances that overflow float32 (the Gram came out NaN); the error
  # names the argument, as channel_grams does, and the problem is never built from a NaN output Gram.
  rng = np.random.default_rng(10)
  x = rng.normal(size=(64, 3, 4)).astype(np.float32)
  y = rng.normal(size=(64, 16)).astype(np.float32) * np.float32(1e20)
  msg = r"holds values up to .*e\+20 whose squared deviations from their mean overflow float32: rescale"
  with pytest.raises(ValueError, match="^x " + msg):
    hj.gaussian_gram(y)
  with pytest.raises(ValueError, match="^x " + msg):
    hj.gaussian_cka(y, x[:, 0])
  with pytest.raises(ValueError, match="^y " + msg):
    hj.gaussian_cka(x[:, 0], y)
  with pytest.raises(ValueError, match="^features\\[1\\] " + msg):
    hj.hsic_matrix([x, y], kernel="gaussian")
  with pytest.raises(ValueError, match="^y " + msg):
    hj.output_gram(y)
  kw = {} if max_block_bytes is None else {"max_block_bytes": max_block_bytes}
  with pytest.raises(ValueError, match="^y " + msg):
    hj.problem_from_features(x, y, **kw)
  with pytest.raises(ValueError, match="^y " + msg):
    hj.lasso_select_features(x, y, 0.1)
  nan_y = rng.normal(size=(64, 16))
  nan_y[3, 2] = np.nan
  with pytest.raises(ValueError, match=r"^y contains 1 NaN or Inf .* index \(3, 2\)"):
    hj.problem_from_features(x, nan_y, **kw)


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
  gx, gy = _grams()
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
  with pytest.raises(ValueError, match=r"^tol must be > 0 .*got nan"):
    hj.solve(p, 0.1, tol=np.nan)
  with pytest.raises(ValueError, match=r"^check_every must be an integer >= 1, got 0"):
    hj.solve(p, 0.1, check_every=0)
  # Valid settings as before: an integral float max_iter, max_steps=0 (no bisection: the top k at lambda_max / 2).
  assert int(np.sum(np.asarray(hj.select_k(p, 2, max_iter=1e4, max_steps=0).selected))) == 2


def test_lasso_path_refuses_bad_arguments():
  gx, gy = _grams()
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
