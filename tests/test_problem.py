"""The HSIC Lasso problem builders (from Grams, from features, whole, in tiles, streamed, batched, combined) against
the explicit n^2-row design and the float64 reference; and their checks of bad inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsic_jax as hj
from hsic_jax import _lasso
from hsic_jax._lasso import make_problem
from tests._lasso_data import OVERFLOW_MESSAGE, design, overflowing_outputs, random_problem, sklearn_lasso
from tests._lasso_data import small_grams


def test_normalized_problem_matches_normalized_design():
  x, y = random_problem(3)
  with jax.enable_x64(True):
    gx = hj.channel_grams(x, dtype=jnp.float64)
    gy = hj.gaussian_gram(y, dtype=jnp.float64)
    a, b = design(gx, gy, normalized=True)
    p = hj.problem_from_grams(gx, gy, normalized=True, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(p.quad), a.T @ a, atol=1e-10)
    np.testing.assert_allclose(np.asarray(p.lin), a.T @ b, atol=1e-10)
    assert float(p.const) == pytest.approx(1.0)


def test_row_blocks_and_streaming_equal_direct():
  x, y = random_problem(4, n=37, c=6)  # 37 is prime: tiles of 13 (Grams) and 10 (streamed) overlap at the end
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
  x, y = random_problem(n, n=n, c=c)
  with jax.enable_x64(True):
    gx = np.asarray(hj.channel_grams(x, dtype=jnp.float64))
    gy = np.asarray(hj.gaussian_gram(y, dtype=jnp.float64))
    a, b = design(gx, gy)
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
  # On a CPU a tile of every channel stays within _STREAM_TILE_BYTES (cache); on an accelerator it takes what
  # max_block_bytes allows (fewer loop steps), three live copies within it either way.
  from hsic_jax import problem  # pylint: disable=import-outside-toplevel
  c, n, budget = 512, 1024, problem.DEFAULT_BLOCK_BYTES
  cpu = problem._tile_side(c, n, 4, budget, "loop")  # pylint: disable=protected-access
  assert c * cpu * cpu * 4 <= problem._STREAM_TILE_BYTES  # pylint: disable=protected-access
  accel = problem._tile_side(c, n, 4, budget, "vmap")  # pylint: disable=protected-access
  assert accel > 2 * cpu and 3 * c * accel * accel * 4 <= budget
  assert problem._tile_side(c, n, 4, 3 * c * 4 * 16 * 16, "loop") == 16  # pylint: disable=protected-access


def test_combined_batches_match_sklearn_on_stacked_design():
  x, y = random_problem(5, n=60)
  with jax.enable_x64(True):
    parts, designs = [], []
    for sl in (slice(0, 30), slice(30, 60)):
      gx = hj.channel_grams(x[sl], dtype=jnp.float64)
      gy = hj.gaussian_gram(y[sl], dtype=jnp.float64)
      parts.append(hj.problem_from_grams(gx, gy, dtype=jnp.float64))
      designs.append(design(gx, gy))
    p = hj.combine_problems(parts)
    a = np.concatenate([d[0] for d in designs])
    b = np.concatenate([d[1] for d in designs])
    assert float(p.rows) == a.shape[0]
    lam = 0.1 * float(hj.lambda_max(p))
    res = hj.solve(p, lam, tol=1e-10, max_iter=200_000)
    _, f_sk = sklearn_lasso(a, b, lam, True)
    assert (float(res.objective) - f_sk) / f_sk <= 1e-5


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


def test_lipschitz_estimate_bounds_the_top_eigenvalue():
  for seed in range(3):
    x, y = random_problem(12 + seed, c=30)
    p = hj.problem_from_features(x, y)
    top = float(np.linalg.eigvalsh(np.asarray(p.quad, np.float64))[-1])
    assert top * (1 - 1e-5) <= float(p.lipschitz) <= 1.05 * top * (1 + 1e-5)
  # A flat spectrum: Q = I (orthogonal channels) has ||Q||_F = sqrt(c), but the estimate stays at 1.05.
  p = make_problem(jnp.eye(20), jnp.ones(20), 1.0, 1.0)
  assert 1.0 <= float(p.lipschitz) <= 1.05 + 1e-6


def test_batched_build_equals_single_builds():
  rng = np.random.default_rng(13)
  layers = [random_problem(20 + i, n=24, c=10) for i in range(3)]
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


@pytest.mark.parametrize("normalized", [False, True])
def test_every_build_path_equals_the_reference_problem(normalized):
  """Whole Grams, tiles of Grams, features in memory, features streamed in tiles, and a batch: each against
  _lasso.reference_problem (the stated math in float64 numpy)."""
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


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features(value):
  x = np.random.default_rng(1).normal(size=(8, 3, 2))
  x[4, 1, 0] = value
  with pytest.raises(ValueError, match=r"x contains 1 NaN or Inf .* index \(4, 1, 0\)"):
    hj.problem_from_features(x, np.ones((8, 2)))


def test_mismatched_samples():
  with pytest.raises(ValueError, match="x and y must have the same number of samples"):
    hj.problem_from_features(np.ones((6, 2, 2)), np.ones((5, 3)))


def test_zero_channels():
  with pytest.raises(ValueError, match="x must have at least one channel"):
    hj.problem_from_features(np.zeros((6, 0, 2)), np.ones((6, 1)))


def test_too_few_samples():
  with pytest.raises(ValueError, match="x must hold at least 2 samples"):
    hj.problem_from_features(np.ones((1, 2, 2)), np.ones((1, 1)))


def test_bad_options_and_problem_lists():
  gx, gy = small_grams()
  p = hj.problem_from_grams(gx, gy)
  with pytest.raises(ValueError, match="y_kernel|kernel must be"):
    hj.problem_from_features(np.ones((6, 2, 2)), np.ones((6, 1)), y_kernel="laplace")
  with pytest.raises(ValueError, match="problems\\[1\\] has Q of shape"):
    hj.combine_problems([p, hj.problem_from_grams(gx[:2], gy)])
  with pytest.raises(ValueError, match=r"problems\[1\] must be a LassoProblem"):
    hj.combine_problems([p, None])
  stacked, _ = hj.stack_problems([p, p])
  with pytest.raises(ValueError, match=r"problems\[0\] is a batch of problems"):
    hj.stack_problems([stacked])
  with pytest.raises(ValueError, match=r"^x must hold at least one value per sample"):
    hj.problem_from_features(np.ones((6, 2, 0)), np.ones((6, 1)))
  with pytest.raises(ValueError, match=r"^y must hold at least one value per sample"):
    hj.problem_from_features(np.ones((6, 2, 2)), np.ones((6, 0)))
  with pytest.raises(ValueError, match="^y must hold integer class ids"):  # named as the caller's argument
    hj.problem_from_features(np.ones((6, 2, 2)), np.linspace(0, 1, 6), y_kernel="delta")


@pytest.mark.parametrize("max_block_bytes", [None, 512])  # 512: streamed from x in tiles
def test_gaussian_outputs_whose_squares_overflow_are_refused(max_block_bytes):
  # The output features' squared distances overflow float32: the problem is never built from a NaN output Gram.
  x, y = overflowing_outputs()
  msg = OVERFLOW_MESSAGE
  rng = np.random.default_rng(11)
  with pytest.raises(ValueError, match="^y " + msg):
    hj.output_gram(y)
  kw = {} if max_block_bytes is None else {"max_block_bytes": max_block_bytes}
  with pytest.raises(ValueError, match="^y " + msg):
    hj.problem_from_features(x, y, **kw)
  nan_y = rng.normal(size=(64, 16))
  nan_y[3, 2] = np.nan
  with pytest.raises(ValueError, match=r"^y contains 1 NaN or Inf .* index \(3, 2\)"):
    hj.problem_from_features(x, nan_y, **kw)


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
  gx, gy = small_grams()
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
  gx, gy = small_grams()
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
  gx, gy = small_grams()
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


def test_check_false_skips_value_checks_only():
  """``check=False`` returns without reading the build's validation back (a caller validates once for many), and
  computes the same thing; structural errors are raised either way."""
  x = np.random.default_rng(1).normal(size=(8, 3, 2)).astype(np.float32)
  y = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
  gx, gy = small_grams()
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
  gx, gy = small_grams()
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
