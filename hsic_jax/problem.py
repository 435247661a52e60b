"""The nonnegative HSIC Lasso problem in its c x c quadratic form, built blockwise from Grams or features.

For one layer with ``c`` input channels, centered Gram matrices ``K̄_k`` (one per channel) and a centered output Gram
``L̄``, HSIC Lasso solves::

  minimise_beta  1/2 || vec(L̄) - sum_k beta_k vec(K̄_k) ||^2 + lam * sum_k beta_k    subject to beta >= 0.

Expanding the square gives ``1/2 beta' Q beta - q' beta + 1/2 ||L̄||^2 + lam 1' beta`` with

  ``Q_ij = <K̄_i, K̄_j>_F``,   ``q_i = <K̄_i, L̄>_F``,   ``const = ||L̄||_F^2``,

so the solver only ever sees ``c x c`` numbers, never the ``n^2 x c`` design. :class:`LassoProblem` holds
``(Q, q, const)``, the Lipschitz constant of the gradient (largest eigenvalue of ``Q``) and the number of design rows.
Problems from several calibration batches add up (:func:`combine_problems`): the sum is block HSIC Lasso with one
block per batch. Problems of different widths stack, zero-padded, into one batch (:func:`stack_problems`).

Memory: the builders never hold more than ``max_block_bytes`` of Gram entries at once. Grams that fit are centered
whole and multiplied over their packed upper triangles. Larger ones are taken in square tiles ``(I, J)`` of every
channel's Gram, ``Q += K̄[:, I, J] K̄[:, I, J]^T`` over the upper triangle of tiles, each tile small enough to stay
in a CPU's cache between its construction and its product (:data:`_STREAM_TILE_BYTES`). From Grams, each tile is
centered exactly from the row and column means. When the per-channel Grams do not fit in the budget at all they are
streamed from the features, each kernel entry of the upper triangle computed once: the products are taken of
``K - mu`` (a constant shift) and centered at the end from the row sums (:func:`_centered_quad`).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from hsic_jax import _checks, _gram, _lasso
from hsic_jax._gram import Bandwidth
from hsic_jax._lasso import LassoProblem

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "LassoProblem",
    "combine_problems",
    "output_gram",
    "problem_from_features",
    "problem_from_grams",
    "stack_problems",
]


_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_BLOCK_BYTES = 256 * 2**20


def _normalize(quad, lin, const):
  """Frobenius-normalises every ``K̄_k`` and ``L̄`` in Q-space: ``||K̄_k||^2 = Q_kk`` and ``||L̄||^2 = const``."""
  diag = jnp.diagonal(quad, axis1=-2, axis2=-1)
  inv = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 0.0)
  inv_l = jnp.where(const > 0, jax.lax.rsqrt(jnp.where(const > 0, const, 1.0)), 0.0)
  quad = quad * inv[..., :, None] * inv[..., None, :]
  lin = lin * inv * inv_l[..., None]
  return quad, lin, jnp.where(const > 0, 1.0, 0.0).astype(quad.dtype)


def _packed_rows(rows, start: int):
  """Rows ``[start, start+m)``'s upper-triangle entries (``j >= i``) of symmetric matrices, packed and weighted.

  ``rows`` is ``(..., m, n)``, ``m`` even. The packing is weighted (1 on the diagonal, sqrt(2) off it) so that inner
  products of the packed vectors, summed over all row blocks, equal the Frobenius products of the full matrices,
  at ``m (m + 1) / 2 + m (n - start - m)`` entries per block instead of ``m n``: the minimum.

  The block's diagonal square ``[[A, B], [B', C]]`` (``A``, ``C`` of side ``h = m / 2``) goes in two rectangles:
  ``B``, and the two triangles of ``A`` and ``C`` side by side in one ``h x (h + 1)`` array, ``M[r, j] = A[r, j]``
  for ``j <= r`` (``A``'s lower triangle, its upper one by symmetry) and ``C[r, j - 1]`` for ``j > r`` (``C``'s
  upper triangle, shifted one column right). Both are selects between equal-shape slices, so the packing fuses
  with the centering into one vectorised pass; the columns right of the square are one more slice.
  """
  *lead, m, n = rows.shape
  h = m // 2
  sqrt2 = math.sqrt(2.0)
  r = jnp.arange(h)[:, None]
  j = jnp.arange(h + 1)[None, :]
  weight = jnp.where((j == r) | (j == r + 1), 1.0, sqrt2).astype(rows.dtype)
  tri = jnp.where(j > r, rows[..., h:m, start + h - 1:start + m], rows[..., 0:h, start:start + h + 1]) * weight
  parts = [tri, rows[..., 0:h, start + h:start + m] * sqrt2]
  if start + m < n:
    parts.append(rows[..., :, start + m:] * sqrt2)
  return jnp.concatenate([p.reshape(*lead, -1) for p in parts], axis=-1)


# From this many channels on, ``P P'`` is computed as three products of half-height blocks (its two diagonal blocks
# and one off-diagonal block, mirrored): 3/4 of the FLOPs of the full product, which wins on CPUs from c = 256 on;
# below, the smaller products lose more than they save.
_SYMMETRIC_SPLIT_MIN_CHANNELS = 256


def _self_products(p):
  """``P P'`` for ``p`` of shape (c, k), exploiting its symmetry when ``c`` is large enough."""
  c = p.shape[0]
  if c < _SYMMETRIC_SPLIT_MIN_CHANNELS:
    return jnp.einsum("ck,dk->cd", p, p, precision=_HIGHEST)
  top, bottom = p[:c // 2], p[c // 2:]
  upper = jnp.einsum("ck,dk->cd", top, bottom, precision=_HIGHEST)
  return jnp.block([[jnp.einsum("ck,dk->cd", top, top, precision=_HIGHEST), upper],
                    [upper.T, jnp.einsum("ck,dk->cd", bottom, bottom, precision=_HIGHEST)]])


def _one_block(kbar, lbar):
  """``(Q, q)`` from whole centered Grams ``kbar`` ``(c, n, n)`` and ``lbar`` ``(n, n)``, ``n`` even: products of
  the packed upper triangles (:func:`_packed_rows`), about half the FLOPs of full ``n^2``-long products."""
  kp = _packed_rows(kbar, 0)
  return _self_products(kp), jnp.einsum("ck,k->c", kp, _packed_rows(lbar, 0), precision=_HIGHEST)


def _centered_quad(quad, row_sums, n: int):
  """``Q_ij = <K̄_i, K̄_j>`` from ``P_ij = <K'_i, K'_j>`` and the row sums ``r`` of symmetric ``K'`` (``n x n``).

  With ``H = I - 11'/n``, ``<H A H, H B H> = tr(A H B H) = <A, B> - (2/n) (A1)'(B1) + (1'A1)(1'B1)/n^2`` for
  symmetric ``A``, ``B``, so streamed Grams are centered without a second pass. A constant shift ``K' = K - mu``
  leaves ``K̄`` unchanged and keeps the terms small: for a Gaussian Gram (translation-invariant) ``||K'||`` and
  ``||K̄||`` are of the same order. In float32 the result is accurate to a few 1e-6 of ``max |Q|`` (exact centering
  of each entry, as :func:`_from_grams_one` does, to a few 1e-7).
  """
  total = jnp.sum(row_sums, axis=1)
  return (quad - (2.0 / n) * jnp.einsum("ci,di->cd", row_sums, row_sums, precision=_HIGHEST)
          + jnp.outer(total, total) / (n * n))


# Rounding noise, in float epsilons, that tells a constant Gram (K̄ = 0 up to rounding) from a weak one: exact
# centering leaves about eps * |K| on each entry (noise energy (RTOL eps n |K|)^2, 16x that of one-ulp errors), the
# streamed one-pass correction about eps * P_kk on Q_kk (noise RTOL eps P_kk). A weak but real channel, with centered
# entries of a few ulps of |K| and up, is kept (tested).
_CONSTANT_CHANNEL_RTOL = 4.0


def _without_constant_channels(quad, lin, noise):
  """Zeroes the ``Q`` row and column and the ``q`` entry of every channel whose centered energy ``Q_kk`` is at most
  ``noise`` (its rounding noise): such a Gram is constant up to rounding (``K̄_k = 0``), and gets ``beta_k = 0``
  (or, normalised, stays 0) rather than the ratio of two rounding errors."""
  keep = (jnp.diagonal(quad) > noise).astype(quad.dtype)
  return quad * keep[:, None] * keep[None, :], lin * keep


# The shift ``mu_k`` is the mean of this many leading rows of each Gram (a constant shift leaves the centered Gram
# unchanged; any value is exact, one near the Gram's mean keeps float32 cancellation small).
_SHIFT_PROBE_ROWS = 8


# On CPUs, large Grams are taken in square tiles of every channel's Gram, ``c * t * t`` entries of about this many
# bytes: small enough to stay in cache from the kernel evaluation (or centering) to the product that consumes it.
# Row blocks of the whole width, tens of MB each, go through memory several times instead (about 3x slower to stream
# from features, measured on an x86 CPU). Accelerators, whose kernels do not keep a tile in a cache between XLA ops
# and pay per loop step, take the largest tiles ``max_block_bytes`` allows.
_STREAM_TILE_BYTES = 8 * 2**20


def _tile_side(c: int, n: int, itemsize: int, max_block_bytes: int, strategy: str) -> int:
  """Side ``t`` of the tiles: three live ``(c, t, t)`` arrays (e.g. distances, kernel, shifted) within
  ``max_block_bytes`` and, on CPUs, one within :data:`_STREAM_TILE_BYTES`, evened out so that the overlap of the last
  tile with the one before it stays small, and a multiple of 8 when that costs no extra tile."""
  budget = max_block_bytes // 3
  if strategy == "loop":  # a CPU
    budget = min(_STREAM_TILE_BYTES, budget)
  most = max(1, min(n, math.isqrt(max(1, budget // max(1, c * itemsize)))))
  tiles = -(-n // most)
  t = -(-n // tiles)
  rounded = -(-t // 8) * 8
  return rounded if t >= 16 and rounded <= most else t


def _tiles_for(c: int, n: int, itemsize: int, max_block_bytes: int, strategy: str) -> int:
  """0 when the centered Grams (three live copies: raw, centered, packed) fit in ``max_block_bytes`` at once, else
  the side of the tiles they are taken in."""
  if 3 * c * (n + n % 2)**2 * itemsize <= max_block_bytes:
    return 0
  return _tile_side(c, n, itemsize, max_block_bytes, strategy)


def _accumulate_tiles(tile, lbar, *, c: int, n: int, t: int, row_sums: bool):
  """Sums products over the upper triangle of ``t x t`` tiles of symmetric ``n x n`` matrices.

  ``tile(i0, j0)`` gives ``K'_k[i0:i0+t, j0:j0+t]`` for every channel, ``(c, t, t)``. Returns ``(P, q, r)``:
  ``P_ij = <K'_i, K'_j>``, ``q_i = <K'_i, L̄>`` and, when ``row_sums``, the row sums ``r`` of every ``K'_k``,
  ``(c, n)`` (else None). An off-diagonal tile stands for its transpose too (weight 2 in the products; its column
  sums are the row sums of the transposed tile). When ``t`` does not divide ``n`` the last tile row and column
  start at ``n - t`` and mask the entries the tiles before them already cover, so nothing is padded or copied.
  """
  dtype = lbar.dtype
  tiles = -(-n // t)
  owned = np.arange(tiles) * t  # first row owned by each tile
  starts = np.minimum(owned, n - t)
  ti, tj = np.triu_indices(tiles)
  steps = tuple(jnp.asarray(a, jnp.int32) for a in (starts[ti], starts[tj], owned[ti] - starts[ti],
                                                     owned[tj] - starts[tj], ti == tj))
  local = jnp.arange(t)

  def body(carry, step):
    quad, lin, sums = carry
    i0, j0, skip_i, skip_j, diagonal = step
    k = tile(i0, j0)
    if n % t:
      k = k * ((local >= skip_i)[:, None] & (local >= skip_j)[None, :]).astype(dtype)[None]
    weight = jnp.where(diagonal != 0, 1.0, 2.0).astype(dtype)
    flat = k.reshape(c, t * t)
    quad = quad + weight * jnp.einsum("ck,dk->cd", flat, flat, precision=_HIGHEST)
    lt = jax.lax.dynamic_slice(lbar, (i0, j0), (t, t)).reshape(t * t)
    lin = lin + weight * jnp.einsum("ck,k->c", flat, lt, precision=_HIGHEST)
    if row_sums:
      rs = jax.lax.dynamic_slice_in_dim(sums, i0, t, axis=1) + jnp.sum(k, axis=2)
      sums = jax.lax.dynamic_update_slice_in_dim(sums, rs, i0, axis=1)
      rs = jax.lax.dynamic_slice_in_dim(sums, j0, t, axis=1) + (weight - 1.0) * jnp.sum(k, axis=1)
      sums = jax.lax.dynamic_update_slice_in_dim(sums, rs, j0, axis=1)
    return (quad, lin, sums), None

  init = (jnp.zeros((c, c), dtype), jnp.zeros((c,), dtype), jnp.zeros((c, n) if row_sums else (0,), dtype))
  (quad, lin, sums), _ = jax.lax.scan(body, init, steps)
  return quad, lin, (sums if row_sums else None)


@functools.partial(jax.jit, static_argnames=("t", "normalized", "validate", "strategy"))
def _from_grams(gram_x, gram_y, t, normalized, validate=True, strategy="loop"):
  """The problem (batched when ``gram_x`` has a leading batch axis) and, when ``validate``, the inputs'
  :func:`_checks.gram_stats` (one row per layer of a batch), computed in the same call so that validation costs no
  extra pass over the data nor an extra host round trip."""
  one = lambda gx, gy: _from_grams_one(gx, gy, t, normalized, validate)  # noqa: E731
  if gram_x.ndim == 3:
    return one(gram_x, gram_y)
  return _checks.map_batch(one, (gram_x, gram_y), strategy)


def _symmetry_probe(n: int, dtype) -> jax.Array:
  """A fixed random unit vector ``v`` of length ``n``. ``G v`` and ``v^T G`` differ for almost every asymmetric
  ``G``; row and column means alone miss, e.g., ``G + A`` for an antisymmetric ``A`` with zero row sums."""
  v = np.random.default_rng(20261122).standard_normal(n)
  return jnp.asarray(v / np.linalg.norm(v), dtype)


def _means_and_stats(gram, validate):
  """Row means, column means (``(..., n)`` each) and, when ``validate``, :func:`_checks.gram_stats` of square
  matrices ``gram`` ``(..., n, n)``: the reductions centering needs plus a weighted one on each side, read in the
  same pass over the Grams."""
  if not validate:
    return jnp.mean(gram, axis=-1), jnp.mean(gram, axis=-2), None
  v = _symmetry_probe(gram.shape[-1], gram.dtype)
  # Reductions rather than products with an (n, 2) matrix [1/n, v] or one variadic reduction: XLA fuses the two
  # of each side into one pass (the alternatives took about 2x longer on CPU).
  row_mean, col_mean = jnp.mean(gram, axis=-1), jnp.mean(gram, axis=-2)
  rows = jnp.stack([row_mean, jnp.sum(gram * v, axis=-1)], axis=-1)
  cols = jnp.stack([col_mean, jnp.sum(gram * v[:, None], axis=-2)], axis=-1)
  stats = _checks.gram_stats(rows, cols, jnp.diagonal(gram, axis1=-2, axis2=-1))
  return row_mean, col_mean, stats


def _from_grams_one(gram_x, gram_y, t, normalized, validate):
  """One layer's problem, every Gram centered exactly from its row and column means: the whole Grams at once when
  ``t`` is 0, else ``t x t`` tiles of them."""
  c, n, _ = gram_x.shape
  row_mean, col_mean, stats_x = _means_and_stats(gram_x, validate)  # (c, n) each
  grand = jnp.mean(row_mean, axis=1)  # (c,)
  diag = jnp.diagonal(gram_x, axis1=1, axis2=2)
  stats = (stats_x, _means_and_stats(gram_y, validate)[2]) if validate else None
  lbar = _gram.center(gram_y)
  if t:
    def kbar_tile(i0, j0):
      block = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(gram_x, i0, t, axis=1), j0, t, axis=2)
      rm = jax.lax.dynamic_slice_in_dim(row_mean, i0, t, axis=1)
      cm = jax.lax.dynamic_slice_in_dim(col_mean, j0, t, axis=1)
      return block - rm[:, :, None] - cm[:, None, :] + grand[:, None, None]

    quad, lin, _ = _accumulate_tiles(kbar_tile, lbar, c=c, n=n, t=t, row_sums=False)
  else:
    kbar = gram_x - row_mean[:, :, None] - col_mean[:, None, :] + grand[:, None, None]
    pad = n % 2  # the packing takes an even side: one zero row and column
    quad, lin = _one_block(jnp.pad(kbar, ((0, 0), (0, pad), (0, pad))), jnp.pad(lbar, ((0, pad), (0, pad))))
  # A Gram whose centered entries are all at the level of their rounding errors is constant.
  entry_noise = _CONSTANT_CHANNEL_RTOL * jnp.finfo(quad.dtype).eps * jnp.max(jnp.abs(diag), axis=1)
  quad, lin = _without_constant_channels(quad, lin, (n * entry_noise)**2)
  const = jnp.sum(lbar * lbar)
  if normalized:
    quad, lin, const = _normalize(quad, lin, const)
  return _lasso.make_problem(quad, lin, const, float(n * n)), stats


def problem_from_grams(
    gram_x: Float[ArrayLike, "*b c n n"],
    gram_y: Float[ArrayLike, "*b n n"],
    *,
    normalized: bool = False,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    dtype=jnp.float32,
    check: bool = True,
) -> LassoProblem:
  """Builds the quadratic form from raw (uncentered) per-channel Grams and an output Gram.

  Centering is done here, from each Gram's row and column means (the whole Grams at once when three copies fit in
  ``max_block_bytes``, else tile by tile, so that no centered copy of ``gram_x`` is formed). Already centered Grams
  may be passed too: centering is idempotent. Gram matrices are symmetric (a ValueError says so
  otherwise), and only their upper triangles enter the products.

  Args:
    gram_x: ``(c, n, n)`` Gram matrices, one per input channel; or ``(b, c, n, n)`` for ``b`` layers of the same
      shape, built in one call into a batched problem (as :func:`stack_problems` would give).
    gram_y: ``(n, n)`` Gram matrix of the output; ``(b, n, n)`` with a batch.
    normalized: Frobenius-normalise every centered Gram first (pyHSICLasso's convention); APIB does not.
    max_block_bytes: memory budget for the centered Gram entries processed at once (for the whole batch where it
      is vmapped, on accelerators; CPU builds one layer at a time).
    dtype: float32 (default) or float64; float16 and bfloat16 are computed in float32 (the problem is float32):
      sums of products of Gram entries overflow float16, and the solver's factorisations support neither.
    check: validate the values (finiteness, overflow, symmetry) once the computation is done, which waits for it;
      ``False`` returns at once, for a caller that dispatches many builds and validates the results itself.

  Returns:
    A :class:`LassoProblem`, with a leading batch axis when the Grams have one.
  """
  dtype = _checks.compute_dtype(dtype)
  gram_x = _checks.as_float_array("gram_x", gram_x, dtype, ndim=(3, 4), finite=False)
  batched = gram_x.ndim == 4
  gram_y = _checks.as_float_array("gram_y", gram_y, dtype, ndim=3 if batched else 2, finite=False)
  _checks.check_square("gram_x", gram_x.shape)
  _checks.check_square("gram_y", gram_y.shape)
  if gram_x.shape[-3] < 1:
    raise ValueError(f"gram_x must hold at least one channel's Gram matrix, got shape {tuple(gram_x.shape)}.")
  if gram_x.shape[-1] != gram_y.shape[-1] or (batched and gram_x.shape[0] != gram_y.shape[0]):
    raise ValueError(f"gram_x and gram_y must have the same number of samples n (and batch size): gram_x has shape "
                     f"{tuple(gram_x.shape)} ([b,] c, n, n), gram_y has {tuple(gram_y.shape)} ([b,] n, n).")
  c, n = gram_x.shape[-3], gram_x.shape[-1]
  _checks.check_samples("gram_y", n)
  batch = gram_x.shape[0] if batched else 1
  if batch < 1:
    raise ValueError(f"gram_x must hold at least one layer on its batch axis, got shape {tuple(gram_x.shape)}.")
  strategy = _checks.strategy_for(gram_x, gram_y)
  if strategy == "vmap":
    max_block_bytes = max(1, max_block_bytes // batch)  # a vmapped batch holds every layer's block at once
  t = _tiles_for(c, n, dtype.itemsize, max_block_bytes, strategy)
  if not check:
    return _from_grams(gram_x, gram_y, t, normalized, False, strategy)[0]
  problem, (stats_x, stats_y) = _from_grams(gram_x, gram_y, t, normalized, strategy=strategy)
  if not (_checks.is_concrete(gram_x) and _checks.is_concrete(gram_y)):
    return problem
  _checks.raise_for_gram_stats("gram_x", gram_x, stats_x, batched=batched)
  _checks.raise_for_gram_stats("gram_y", gram_y, stats_y, batched=batched)
  # Finite entries up to about sqrt(max float / n^2) have finite sums but products Q, q, const that overflow.
  if not bool(_checks.all_finite(problem.quad, problem.lin, problem.const)):
    raise ValueError(
        f"the products of the Gram matrices overflow {dtype} (gram_x holds entries up to "
        f"{float(jnp.max(jnp.abs(gram_x))):.3g}, gram_y up to {float(jnp.max(jnp.abs(gram_y))):.3g}): "
        + _checks.gram_rescale_hint(dtype))
  return problem


def _channel_gammas(x, bandwidth):
  """Per-channel gamma for ``x`` of shape (n, c, d); the median rule needs each channel's distances in turn."""
  if isinstance(bandwidth, str) and bandwidth == "median":
    return jax.lax.map(lambda xc: _gram.gamma_of(xc, "median"), jnp.swapaxes(x, 0, 1))
  return jax.vmap(lambda xc: _gram.gamma_of(xc, bandwidth), in_axes=1)(x)


@functools.partial(jax.jit, static_argnames=("rule", "t", "normalized"))
def _from_features_streaming(x, lbar, rule, gamma, t, normalized):
  """The problem from features, one ``t x t`` tile of every channel's Gram at a time.

  Only the upper triangle of tiles is computed (the Grams are symmetric): each kernel entry once, and an
  off-diagonal tile counts twice in the products. Tiles hold ``K - mu`` (a constant shift per channel, see
  :func:`_centered_quad`); their row and column sums accumulate the row sums that center ``Q`` at the end.
  """
  n, c, _ = x.shape
  gammas = _channel_gammas(x, _gram.from_jit(rule, gamma))  # (c,)
  xt = jnp.swapaxes(x, 0, 1)  # (c, n, d): transposed once, not in every tile
  xt = xt - jnp.mean(xt, axis=1, keepdims=True)  # distances do not change; see _gram.sq_distances
  # (c, n); also the validation of x (see _gram.jit_channel_grams)
  sq = jnp.einsum("cnd,cnd->cn", xt, xt, precision=_HIGHEST)

  def kernel_block(r0, rows, c0, cols):
    """``K_k[r0:r0+rows, c0:c0+cols]`` for every channel ``k``, ``(c, rows, cols)``."""
    xr = jax.lax.dynamic_slice_in_dim(xt, r0, rows, axis=1)
    xc = jax.lax.dynamic_slice_in_dim(xt, c0, cols, axis=1)
    sr = jax.lax.dynamic_slice_in_dim(sq, r0, rows, axis=1)
    sc = jax.lax.dynamic_slice_in_dim(sq, c0, cols, axis=1)
    d2 = sr[:, :, None] + sc[:, None, :] - 2.0 * jnp.einsum("cmd,cnd->cmn", xr, xc, precision=_HIGHEST)
    same = (r0 + jnp.arange(rows))[:, None] == (c0 + jnp.arange(cols))[None, :]
    d2 = jnp.where(same[None], 0.0, jnp.maximum(d2, 0.0))
    return jnp.exp(-gammas[:, None, None] * d2)

  mu = jnp.mean(kernel_block(0, min(_SHIFT_PROBE_ROWS, n), 0, n), axis=(1, 2))
  quad, lin, row_sums = _accumulate_tiles(lambda i0, j0: kernel_block(i0, t, j0, t) - mu[:, None, None], lbar,
                                          c=c, n=n, t=t, row_sums=True)
  centered = _centered_quad(quad, row_sums, n)
  # The correction's cancellation leaves a rounding error of about eps * P_kk on Q_kk.
  quad, lin = _without_constant_channels(centered, lin, _CONSTANT_CHANNEL_RTOL * jnp.finfo(quad.dtype).eps
                                         * jnp.diagonal(quad))
  const = jnp.sum(lbar * lbar)
  if normalized:
    quad, lin, const = _normalize(quad, lin, const)
  return _lasso.make_problem(quad, lin, const, float(n * n)), jnp.all(jnp.isfinite(sq))


@functools.partial(jax.jit, static_argnames=("rule",))
def _output_gram(y, rule, gamma):
  """``L̄`` of features ``y`` and whether their squared norms are finite (their validation, as for ``x``)."""
  y = y.reshape(y.shape[0], -1)
  return _gram.center(_gram.gaussian_from_features(y, _gram.from_jit(rule, gamma))), _gram.finite_norms(y)


def _output_gram_unchecked(y, kernel, bandwidth, dtype):
  """``(L̄, y, finite)``: the centered output Gram, ``y`` as an array and the flag that validates it (``None`` for
  labels, validated here); ``raise_unless_finite_norms("y", y, finite)`` completes the check once the flag is
  wanted, so that a build can launch before waiting for it."""
  if kernel == "delta":
    return _gram.labels_gram("y", y, centered=True, dtype=dtype), y, None
  if kernel != "gaussian":
    raise ValueError(f"kernel must be 'gaussian' or 'delta', got {kernel!r}.")
  y = _checks.as_float_array("y", y, dtype, ndim=tuple(range(1, 9)), finite=False)  # checked by the computation
  _checks.check_samples("y", y.shape[0])
  _checks.check_values_per_sample("y", y.shape)
  lbar, finite = _output_gram(y, *_gram.jit_bandwidth(_gram.validate_bandwidth(bandwidth)))
  return lbar, y, finite


def output_gram(
    y: ArrayLike,
    *,
    kernel: str = "gaussian",
    bandwidth: Bandwidth = "apib",
    dtype=jnp.float32,
) -> Float[Array, "n n"]:
  """Centered Gram ``L̄`` of a layer's output: ``(n, ...)`` features (flattened) or ``(n,)`` class labels.

  Args:
    y: the output features (any trailing shape, flattened per sample) or integer labels for ``kernel="delta"``.
    kernel: ``"gaussian"`` or ``"delta"`` (class labels, pyHSICLasso's classification kernel).
    bandwidth: rule for the Gaussian kernel; ``"apib"`` gives ``gamma = 1 / (number of output values)``.
    dtype: float32 or float64.

  Raises:
    ValueError: for a bad shape or argument, or (after the computation, which does the check) for NaN/Inf in ``y``
      or values whose deviations from their mean overflow its dtype when squared.
  """
  lbar, y, finite = _output_gram_unchecked(y, kernel, bandwidth, _checks.resolve_dtype(dtype))
  if finite is not None:
    _checks.raise_unless_finite_norms("y", y, finite)
  return lbar


def problem_from_features(
    x: Float[ArrayLike, "n c d"],
    y: ArrayLike,
    *,
    bandwidth: Bandwidth = "apib",
    y_kernel: str = "gaussian",
    y_bandwidth: Bandwidth | None = None,
    normalized: bool = False,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    dtype=jnp.float32,
    check: bool = True,
) -> LassoProblem:
  """Builds the quadratic form straight from a layer's features, never holding more than a block of Gram entries.

  Args:
    x: per-channel inputs, ``(n, c, d)`` (for a conv: its input as ``(n, channels, height*width)``).
    y: the target: output features ``(n, ...)`` (flattened) or class labels ``(n,)`` with ``y_kernel="delta"``.
    bandwidth: Gaussian bandwidth rule for every channel of ``x``.
    y_kernel: ``"gaussian"`` or ``"delta"``.
    y_bandwidth: bandwidth rule for ``y`` (defaults to ``bandwidth``).
    normalized: Frobenius-normalise every centered Gram (pyHSICLasso) or not (APIB).
    max_block_bytes: memory budget for Gram entries held at once. When all ``c`` Grams fit, they are built in one
      vmapped call; otherwise they are streamed from ``x`` in tiles (each entry of the upper triangle computed
      once).
    dtype: float32 (default) or float64; float16 and bfloat16 are computed in float32 (the problem is float32):
      sums of products of Gram entries overflow float16, and the solver's factorisations support neither.
    check: validate the values (finiteness, overflow) once the computation is done, which waits for it;
      ``False`` returns at once, for a caller that dispatches many builds and validates the results itself.

  Returns:
    A :class:`LassoProblem`.

  Raises:
    ValueError: for a bad shape or argument, or (after the build, which computes the check) for NaN/Inf in ``x``
      or ``y`` or values whose deviations from their mean overflow its dtype when squared.
  """
  dtype = _checks.compute_dtype(dtype)
  bandwidth = _gram.validate_bandwidth(bandwidth)
  y_bandwidth = _gram.validate_bandwidth(bandwidth if y_bandwidth is None else y_bandwidth, "y_bandwidth")
  x = _checks.as_float_array("x", x, dtype, ndim=3, finite=False)  # checked by the computation itself
  n, c, _ = x.shape
  _checks.check_samples("x", n)
  if c < 1:
    raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)} (n, c, d).")
  _checks.check_values_per_sample("x", x.shape)
  y_n = jnp.shape(y)[0] if jnp.ndim(y) > 0 else None
  if y_n != n:
    raise ValueError(f"x and y must have the same number of samples n on axis 0: x has shape {tuple(x.shape)}, "
                     f"y has shape {tuple(jnp.shape(y))}.")
  lbar, y, finite_y = _output_gram_unchecked(y, y_kernel, y_bandwidth, dtype)
  strategy = _checks.strategy_for(x)
  if c * n * n * dtype.itemsize <= max_block_bytes:
    grams, finite = _gram.jit_channel_grams(
        x, *_gram.jit_bandwidth(bandwidth), False, False, None, strategy)
    problem = _from_grams(grams, lbar, _tiles_for(c, n, dtype.itemsize, max_block_bytes, strategy), normalized,
                          False, strategy)[0]
  else:
    problem, finite = _from_features_streaming(x, lbar, *_gram.jit_bandwidth(bandwidth),
                                               _tile_side(c, n, dtype.itemsize, max_block_bytes, strategy),
                                               normalized)
  # x and y are validated by the build (their squared norms), not by passes of their own; see
  # _gram.jit_channel_grams.
  if not check:
    return problem
  _checks.raise_unless_finite_norms("x", x, finite)
  if finite_y is not None:
    _checks.raise_unless_finite_norms("y", y, finite_y)
  return problem


def combine_problems(problems: Sequence[LassoProblem]) -> LassoProblem:
  """Sums problems built on different calibration batches of the same layer (block HSIC Lasso, one block a batch).

  ``Q``, ``q``, ``||L̄||^2`` and the row counts add; the Lipschitz constant is recomputed.
  """
  _lasso.check_unbatched(problems, "combine_problems")
  c = problems[0].num_channels
  for i, p in enumerate(problems):
    if p.quad.shape != (c, c):
      raise ValueError(f"problems[{i}] has Q of shape {tuple(p.quad.shape)}, expected ({c}, {c}) like problems[0].")
  total = jax.tree.map(lambda *a: sum(a[1:], a[0]), *problems)
  return _lasso.make_problem(total.quad, total.lin, total.const, total.rows)


def stack_problems(problems: Sequence[LassoProblem]) -> tuple[LassoProblem, Int[Array, " b"]]:
  """Stacks problems of different widths into one batch, zero-padded to the widest.

  A padded channel has ``Q`` row/column and ``q`` entry 0, so its coefficient stays 0 for any ``lam >= 0`` and it is
  never selected. Returns the batched problem and the true width of each (for :func:`~hsic_jax.select_k`).
  """
  _lasso.check_unbatched(problems, "stack_problems")
  widths = [p.num_channels for p in problems]
  cmax = max(widths)

  def pad(p, c):
    d = cmax - c
    return p._replace(quad=jnp.pad(p.quad, ((0, d), (0, d))), lin=jnp.pad(p.lin, (0, d)))

  padded = [pad(p, c) for p, c in zip(problems, widths)]
  return jax.tree.map(lambda *a: jnp.stack(a), *padded), jnp.asarray(widths)
