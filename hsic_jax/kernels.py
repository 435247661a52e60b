"""Gram matrices and HSIC statistics: Gaussian, linear and delta kernels, centering, HSIC and CKA.

Conventions. ``n`` is the number of samples. ``H = I - 11^T / n`` is the centering matrix and ``K̄ = H K H`` a
centered Gram matrix; it is computed by subtracting row, column and grand means, never by forming ``H``. Squared
distances use ``||a||^2 + ||b||^2 - 2<a, b>`` (a matrix product, fast on accelerators) and are clamped at 0, so
rounding can never push a Gaussian kernel entry above 1.

Bandwidths of the Gaussian kernel ``K_ij = exp(-gamma ||x_i - x_j||^2)`` for a sample of dimension ``d``:

- ``"apib"``: ``gamma = 1/d`` on the raw features (APIB's choice, scikit-learn's ``rbf_kernel`` default);
- ``"pyhsiclasso"``: divide the features by their global standard deviation (over all ``n*d`` entries, no mean
  removal), then ``sigma = sqrt(d)``, i.e. ``gamma = 1 / (2 d std^2)`` (pyHSICLasso's convention);
- ``"median"``: ``sigma`` = median pairwise distance, ``gamma = 1 / (2 sigma^2)``;
- a positive float: ``gamma`` itself.
"""

from __future__ import annotations

import functools
from typing import Literal, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from jax.sharding import PartitionSpec as P

from hsic_jax import _checks, _sharding

Bandwidth = Union[Literal["apib", "pyhsiclasso", "median"], float]
BANDWIDTHS = ("apib", "pyhsiclasso", "median")
# Full float32 precision for products whose results are differenced (distances, Gram inner products): the default
# on TPU (bfloat16 passes) and TF32 on GPUs would lose the small differences that HSIC measures.
_HIGHEST = jax.lax.Precision.HIGHEST


def validate_bandwidth(bandwidth: Bandwidth, name: str = "bandwidth") -> Bandwidth:
  """Checks a bandwidth rule name or an explicit positive gamma."""
  if isinstance(bandwidth, str):
    if bandwidth not in BANDWIDTHS:
      raise ValueError(f"{name} must be one of {BANDWIDTHS} or a positive float gamma, got {bandwidth!r}.")
    return bandwidth
  try:
    gamma = float(bandwidth)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be one of {BANDWIDTHS} or a positive float gamma, got {bandwidth!r}.") from err
  if not gamma > 0 or gamma == float("inf"):
    raise ValueError(f"{name} as an explicit gamma must be a positive finite float, got {bandwidth!r}.")
  return gamma


# An explicit gamma enters jitted functions as a traced value (``rule`` static, ``gamma`` traced), so that a sweep
# over gamma compiles once; a rule name is static.
EXPLICIT = "explicit"


def jit_bandwidth(bandwidth: Bandwidth) -> tuple[str, np.ndarray]:
  """``(rule, gamma)`` for a jitted function: a rule name and a dummy, or ``"explicit"`` and the gamma."""
  if isinstance(bandwidth, str):
    return bandwidth, np.zeros((), np.float64)
  return EXPLICIT, np.asarray(bandwidth, np.float64)


def from_jit(rule: str, gamma: jax.Array) -> Bandwidth | jax.Array:
  """Inverse of :func:`jit_bandwidth` inside the jitted function: the rule name or the traced gamma."""
  return gamma if rule == EXPLICIT else rule


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (traceable; no validation).


def sq_distances(x: Float[Array, "n d"], z: Float[Array, "m d"] | None = None) -> Float[Array, "n m"]:
  """Squared Euclidean distances ``||x_i - z_j||^2`` by one matrix product, clamped at 0.

  Both sets are first shifted by ``x``'s mean over samples, which leaves the distances unchanged: the expansion
  would otherwise cancel away, in float32, the differences between samples that share a large offset (features
  around 1000 that differ by 1).
  """
  mean = jnp.mean(x, axis=0, keepdims=True)
  x = x - mean
  sx = jnp.sum(x * x, axis=-1)
  if z is None:
    d2 = sx[:, None] + sx[None, :] - 2.0 * jnp.matmul(x, x.T, precision=_HIGHEST)
    # The diagonal is exactly zero; rounding of the expansion would otherwise leave noise there.
    d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)
  else:
    z = z - mean
    sz = jnp.sum(z * z, axis=-1)
    d2 = sx[:, None] + sz[None, :] - 2.0 * jnp.matmul(x, z.T, precision=_HIGHEST)
  return jnp.maximum(d2, 0.0)


def gamma_of(x: Float[Array, "n d"], bandwidth: Bandwidth, d2: Float[Array, "n n"] | None = None) -> jax.Array:
  """The Gaussian ``gamma`` that a bandwidth rule gives for one feature matrix (see the module docstring)."""
  n, d = x.shape
  if not isinstance(bandwidth, str):
    return jnp.asarray(bandwidth, x.dtype)
  if bandwidth == "apib":
    return jnp.asarray(1.0 / d, x.dtype)
  if bandwidth == "pyhsiclasso":
    var = jnp.var(x)
    # A constant feature has a constant kernel whatever gamma is; any finite value will do.
    return jnp.where(var > 0, 1.0 / (2.0 * d * jnp.where(var > 0, var, 1.0)), 1.0)
  # Median heuristic over the n(n-1)/2 distinct pairs.
  if d2 is None:
    d2 = sq_distances(x)
  iu = jnp.triu_indices(n, k=1)
  med = jnp.median(d2[iu])
  mean = jnp.mean(d2[iu])
  scale = jnp.where(med > 0, med, jnp.where(mean > 0, mean, 1.0))
  return 1.0 / (2.0 * scale)


def gaussian_from_features(x: Float[Array, "n d"], bandwidth: Bandwidth) -> Float[Array, "n n"]:
  d2 = sq_distances(x)
  return jnp.exp(-gamma_of(x, bandwidth, d2) * d2)


def center(k: Float[Array, "... n m"]) -> Float[Array, "... n m"]:
  """Double centering ``K̄ = H K H`` by subtracting row, column and grand means (no ``H`` is formed)."""
  row = jnp.mean(k, axis=-1, keepdims=True)
  col = jnp.mean(k, axis=-2, keepdims=True)
  grand = jnp.mean(row, axis=-2, keepdims=True)
  return k - row - col + grand


def frobenius_normalize(k: Float[Array, "... n n"]) -> Float[Array, "... n n"]:
  """``K / ||K||_F``; an all-zero matrix stays zero (never NaN)."""
  norm = jnp.sqrt(jnp.sum(k * k, axis=(-2, -1), keepdims=True))
  return jnp.where(norm > 0, k / jnp.where(norm > 0, norm, 1.0), 0.0)


def finite_norms(x: Float[Array, "n d"]) -> jax.Array:
  """Whether every sample's squared deviation from the mean sample is finite: false for a NaN or Inf anywhere, or
  finite values whose squares overflow. Beside :func:`sq_distances`, which computes the same expressions (XLA
  computes them once), this validation of the features costs no extra pass."""
  xm = x - jnp.mean(x, axis=0, keepdims=True)
  return jnp.all(jnp.isfinite(jnp.sum(xm * xm, axis=-1)))


def _pow2(k: jax.Array, dtype) -> jax.Array:
  """``2**k`` exactly, built from its bits, for integer ``k`` in the normal exponent range of ``dtype``."""
  info = jnp.finfo(dtype)
  itype = jnp.int32 if jnp.dtype(dtype).itemsize == 4 else jnp.int64
  return jax.lax.bitcast_convert_type((k.astype(itype) + (info.maxexp - 1)) << info.nmant, dtype)


def binary_exponent(x: Float[Array, "..."]) -> Int[Array, ""]:
  """The exponent ``e`` of ``max |x|`` (``2**(e-1) <= max |x| < 2**e``), read from its bits; 0 for an all-zero
  ``x``, and the smallest normal exponent for subnormal values."""
  info = jnp.finfo(x.dtype)
  itype = jnp.int32 if x.dtype.itemsize == 4 else jnp.int64
  bits = jax.lax.bitcast_convert_type(jnp.max(jnp.abs(x)), itype)
  biased = (bits >> info.nmant) & ((1 << info.nexp) - 1)
  e = jnp.maximum(biased, 1) - (info.maxexp - 2)
  return jnp.where(bits == 0, 0, e).astype(jnp.int32)


def scale_pow2(x: jax.Array, k: Int[ArrayLike, "..."]) -> jax.Array:
  """``x * 2**k`` (``k`` broadcast against ``x``), exact unless the result leaves the range of ``x``'s dtype: five
  factors of at most ``|k| / 5 + 4`` each, so that none overflows for any ``k`` a product of Gram scales reaches."""
  k = jnp.asarray(k, jnp.int32)
  q = jnp.floor_divide(k, 5)
  for _ in range(4):
    x = x * _pow2(q, x.dtype)
  return x * _pow2(k - 4 * q, x.dtype)


def _centered_linear_gram(x: Float[Array, "n ..."], center_features: bool = True
                          ) -> tuple[Float[Array, "n n"], Int[Array, ""]]:
  """``(K̄, e)``: the centered linear Gram ``H X' X'^T H`` of ``X' = X 2**-e``, the features scaled (exactly, by a
  power of two) to a largest magnitude in ``[0.5, 1)``, so that its products neither overflow (features of 1e9 and
  more) nor underflow (1e-10 and less) whatever the scale of ``X``. The Gram of ``X`` itself is ``K̄ 4**e``.

  With ``center_features`` it is ``(HX')(HX')^T``: centering the features first keeps the differences that a large
  offset would cancel (centering the product too removes what the rounding of the mean leaves), at the cost of one
  more pass over them.
  """
  x = x.reshape(x.shape[0], -1)
  e = binary_exponent(x)
  x = scale_pow2(x, -e)
  if center_features:
    x = x - jnp.mean(x, axis=0, keepdims=True)
  return center(jnp.matmul(x, x.T, precision=_HIGHEST)), e


def delta_from_labels(labels: Int[Array, " n"]) -> Float[Array, "n n"]:
  same = labels[:, None] == labels[None, :]
  counts = jnp.sum(same, axis=1, keepdims=True)
  return same / counts


# ----------------------------------------------------------------------------------------------------------------
# Public Gram matrices.


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized"))
def _gaussian_gram(x, rule, gamma, centered, normalized):
  k = gaussian_from_features(x, from_jit(rule, gamma))
  if centered:
    k = center(k)
  if normalized:
    k = frobenius_normalize(k)
  return k


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized"))
def _gaussian_gram_checked(x, rule, gamma, centered, normalized):
  """:func:`_gaussian_gram` and whether ``x``'s squared norms are finite (its validation, see :func:`finite_norms`)."""
  return _gaussian_gram(x, rule, gamma, centered, normalized), finite_norms(x)


def gaussian_gram(
    x: Float[ArrayLike, "n d"] | Float[ArrayLike, " n"],
    *,
    bandwidth: Bandwidth = "apib",
    centered: bool = False,
    normalized: bool = False,
    dtype=jnp.float32,
) -> Float[Array, "n n"]:
  """Gaussian Gram matrix ``K_ij = exp(-gamma ||x_i - x_j||^2)`` of ``n`` samples.

  Args:
    x: features, shape ``(n, d)``; a 1-D array is taken as ``(n, 1)``.
    bandwidth: ``"apib"``, ``"pyhsiclasso"``, ``"median"`` or an explicit ``gamma`` (see module docstring).
    centered: return ``K̄ = H K H``.
    normalized: divide by the Frobenius norm (after centering, if both).
    dtype: float32 (default) or float64 (needs ``jax.enable_x64``).

  Returns:
    The ``(n, n)`` Gram matrix.

  Raises:
    ValueError: for a bad shape or argument, or (after the computation, which does the check) for NaN/Inf in ``x``
      or values whose deviations from their mean overflow its dtype when squared.

  >>> import numpy as np
  >>> k = gaussian_gram(np.array([[0.0], [1.0]]), bandwidth=1.0)
  >>> round(float(k[0, 1]), 4)  # exp(-1)
  0.3679
  """
  return _named_gaussian_gram("x", x, bandwidth, centered, normalized, _checks.resolve_dtype(dtype))


def _named_gaussian_gram(name, x, bandwidth, centered, normalized, dtype):
  """:func:`gaussian_gram` with errors that name the argument ``name``."""
  x = _checks.as_float_array(name, x, dtype, ndim=(1, 2), finite=False)  # checked by the computation itself
  if x.ndim == 1:
    x = x[:, None]
  _checks.check_samples(name, x.shape[0])
  _checks.check_values_per_sample(name, x.shape)
  k, finite = _gaussian_gram_checked(x, *jit_bandwidth(validate_bandwidth(bandwidth)), centered, normalized)
  _checks.raise_unless_finite_norms(name, x, finite)
  return k


# On CPU, channels with at least this many values per sample are computed one at a time (see _channel_grams).
SLICED_CHANNELS_MIN_DIM = 512


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized", "batch_size", "strategy"))
def _channel_grams(x, rule, gamma, centered, normalized, batch_size, strategy):
  """The ``(c, n, n)`` Grams and whether every sample's squared norm in every channel is finite.

  The flag is the validation of ``x``: a NaN or Inf anywhere (or values whose deviations from their channel's mean
  overflow when squared) makes its squared norm non-finite. Those norms are what the distances need anyway, so
  checking costs no extra pass over ``x``.
  """
  def one(xc):
    return _gaussian_gram(xc, rule, gamma, centered, normalized), finite_norms(xc)

  if batch_size is None and x.shape[2] >= SLICED_CHANNELS_MIN_DIM and strategy == "loop":
    # Long rows: one channel at a time, each read straight out of (n, c, d) (its rows are contiguous d-vectors),
    # rather than a (c, n, d) transposed copy of the whole input first, which costs a pass over long rows.
    grams, finite = jax.lax.map(lambda k: one(jax.lax.dynamic_index_in_dim(x, k, axis=1, keepdims=False)),
                                jnp.arange(x.shape[1]))
  elif batch_size is None and strategy == "vmap":
    # Accelerators: every channel side by side (the (c, n, n) intermediates are the size of the result).
    grams, finite = jax.vmap(one)(jnp.swapaxes(x, 0, 1))
  else:
    # One channel at a time on CPUs (each (n, n) Gram stays in cache from its distances to its kernel); with a
    # batch size, `batch_size` channels side by side at a time, bounding the live (n, n) intermediates.
    grams, finite = jax.lax.map(one, jnp.swapaxes(x, 0, 1), batch_size=batch_size)
  return grams, jnp.all(finite)


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized", "batch_size", "strategy", "mesh",
                                             "axes"))
def _channel_grams_split(x, rule, gamma, centered, normalized, batch_size, strategy, mesh, axes):
  """:func:`_channel_grams` on each device's channels of ``x`` split over ``axes``: Grams split the same way."""
  def local(xl, g):
    grams, finite = _channel_grams(xl, rule, g, centered, normalized, batch_size, strategy)
    return grams, finite[None]

  grams, finite = jax.shard_map(local, mesh=mesh, in_specs=(P(None, axes, None), P()),
                                out_specs=(P(axes, None, None), P(axes)), check_vma=False)(x, gamma)
  return grams, jnp.all(finite)


def channel_grams(
    x: Float[ArrayLike, "n c d"],
    *,
    bandwidth: Bandwidth = "apib",
    centered: bool = False,
    normalized: bool = False,
    batch_size: int | None = None,
    dtype=jnp.float32,
) -> Float[Array, "c n n"]:
  """Per-channel Gaussian Gram matrices: ``(n, c, d)`` features -> ``(c, n, n)``, in one compiled call.

  Channel ``k`` gets ``K_k[i, j] = exp(-gamma_k ||x[i, k] - x[j, k]||^2)``, with ``gamma_k`` from the bandwidth rule
  applied to that channel's ``(n, d)`` slice. For APIB, ``x`` is a conv layer's input reshaped to
  ``(n, channels, height*width)``.

  Args:
    x: features, shape ``(n, c, d)``.
    bandwidth: rule or explicit gamma, as in :func:`gaussian_gram`.
    centered: return centered Grams ``H K_k H``.
    normalized: Frobenius-normalise each Gram (a constant channel stays all-zero).
    batch_size: channels computed side by side at a time (bounds memory); ``None``: all of them at once where the
      input lives on an accelerator, one at a time on a CPU.
    dtype: float32 (default) or float64.

  Returns:
    Array of shape ``(c, n, n)``.

  Raises:
    ValueError: for a bad shape or argument, or (after the computation, which does the check) for NaN/Inf in ``x``
      or values whose deviations from their mean overflow its dtype when squared.
  """
  dtype = _checks.resolve_dtype(dtype)
  x = _checks.as_float_array("x", x, dtype, ndim=3, finite=False)  # checked by the computation itself
  _checks.check_samples("x", x.shape[0])
  if x.shape[1] < 1:
    raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}.")
  _checks.check_values_per_sample("x", x.shape)
  if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)
                                 or batch_size < 1):
    raise ValueError(f"batch_size must be a positive number of channels or None, got {batch_size!r}.")
  rule, gamma = jit_bandwidth(validate_bandwidth(bandwidth))
  strategy = _checks.strategy_for(x)
  split = _sharding.split_axis(x, 1)
  if split is not None and np.ndim(gamma) == 0:
    # Channels split over a mesh: each device computes its own channels' Grams, which stay split.
    grams, finite = _channel_grams_split(x, rule, gamma, centered, normalized, batch_size, strategy, *split)
  else:
    grams, finite = _channel_grams(x, rule, gamma, centered, normalized, batch_size, strategy)
  _checks.raise_unless_finite_norms("x", x, finite)
  return grams


def linear_gram(x: Float[ArrayLike, "n d"], *, centered: bool = False, dtype=jnp.float32) -> Float[Array, "n n"]:
  """Linear-kernel Gram ``K = X X^T`` (``x`` of any rank is flattened to ``(n, -1)``)."""
  dtype = _checks.resolve_dtype(dtype)
  x = _checks.as_float_array("x", x, dtype, ndim=tuple(range(1, 9)))
  x = x.reshape(x.shape[0], -1)
  _checks.check_samples("x", x.shape[0])
  if not centered:
    return jnp.matmul(x, x.T, precision=_HIGHEST)
  # H X X^T H = (HX)(HX)^T: centering the features first keeps the differences that a large offset would cancel;
  # centering the product too removes what the rounding of the mean leaves.
  x = x - jnp.mean(x, axis=0, keepdims=True)
  return center(jnp.matmul(x, x.T, precision=_HIGHEST))


def delta_gram(labels: Int[ArrayLike, " n"], *, centered: bool = False, dtype=jnp.float32) -> Float[Array, "n n"]:
  """Delta kernel for class labels (pyHSICLasso's classification kernel).

  ``L_ij = 1/n_c`` when samples ``i`` and ``j`` both have class ``c`` (with ``n_c`` samples), else 0.

  >>> delta_gram([0, 0, 1]).tolist()
  [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
  """
  return labels_gram("labels", labels, centered=centered, dtype=_checks.resolve_dtype(dtype))


def labels_gram(name: str, labels: ArrayLike, *, centered: bool, dtype: jnp.dtype) -> Float[Array, "n n"]:
  """:func:`delta_gram` with errors that name the argument ``name`` (``labels``, or ``y`` of the problem builders)."""
  if labels is None:
    raise ValueError(f"{name} is required, got None.")
  if not isinstance(labels, jax.Array):
    try:
      labels = np.asarray(labels)
    except Exception as err:  # noqa: BLE001 - anything that is not array-like
      raise ValueError(f"{name} must be an array of class ids, got {type(labels).__name__}.") from err
  if labels.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of class ids, got shape {tuple(labels.shape)}.")
  if not (jnp.issubdtype(labels.dtype, jnp.integer) or jnp.issubdtype(labels.dtype, jnp.bool_)):
    raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}.")
  _checks.check_samples(name, labels.shape[0])
  k = delta_from_labels(jnp.asarray(labels)).astype(dtype)
  return center(k) if centered else k


# ----------------------------------------------------------------------------------------------------------------
# HSIC and CKA from Gram matrices.


def _check_pair(k, l, dtype):
  k = _checks.as_float_array("k", k, dtype, ndim=2)
  l = _checks.as_float_array("l", l, dtype, ndim=2)
  _checks.check_square("k", k.shape)
  _checks.check_square("l", l.shape)
  if k.shape != l.shape:
    raise ValueError(f"k and l must have the same shape (n, n), got {tuple(k.shape)} and {tuple(l.shape)}.")
  _checks.check_samples("k", k.shape[0])
  return k, l


@jax.jit
def _hsic_biased(k, l):
  n = k.shape[0]
  return jnp.sum(center(k) * center(l)) / (n - 1) ** 2


@jax.jit
def _hsic_unbiased(k, l):
  n = k.shape[0]
  off = 1.0 - jnp.eye(n, dtype=k.dtype)
  kt, lt = k * off, l * off
  term1 = jnp.sum(kt * lt.T)
  term2 = jnp.sum(kt) * jnp.sum(lt) / ((n - 1) * (n - 2))
  term3 = 2.0 / (n - 2) * jnp.sum(kt.sum(0) * lt.sum(1))
  return (term1 + term2 - term3) / (n * (n - 3))


def hsic(
    k: Float[ArrayLike, "n n"], l: Float[ArrayLike, "n n"], *, unbiased: bool = False, dtype=jnp.float32
) -> Float[Array, ""]:
  """Hilbert-Schmidt independence criterion of two raw (uncentered) Gram matrices.

  Biased (default, Gretton et al. 2005): ``HSIC(K, L) = tr(K̄ L̄) / (n-1)^2`` with ``K̄ = H K H``.
  Unbiased (Song et al. 2012), with ``K~, L~`` the Grams with zeroed diagonals, ``n >= 4``::

    HSIC_u = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3))

  >>> k = [[1.0, 0.0], [0.0, 1.0]]
  >>> float(hsic(k, k))  # K̄ = [[.5, -.5], [-.5, .5]], tr(K̄K̄) = 1, (n-1)^2 = 1
  1.0
  """
  dtype = _checks.resolve_dtype(dtype)
  k, l = _check_pair(k, l, dtype)
  if unbiased:
    if k.shape[0] < 4:
      raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got n={k.shape[0]}.")
    return _hsic_unbiased(k, l)
  return _hsic_biased(k, l)


def _alignment(kc, lc):
  """``<K̄, L̄>_F / (||K̄||_F ||L̄||_F)`` of centered Grams; 0 when either is all zero. The norms are taken apart
  (never the product of the squared norms, which overflows first)."""
  num = jnp.sum(kc * lc)
  den = jnp.sqrt(jnp.sum(kc * kc)) * jnp.sqrt(jnp.sum(lc * lc))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


@jax.jit
def _cka(k, l):
  return _alignment(center(k), center(l))


def cka(k: Float[ArrayLike, "n n"], l: Float[ArrayLike, "n n"], *, dtype=jnp.float32) -> Float[Array, ""]:
  """Normalised HSIC (centered kernel alignment) of two raw Gram matrices.

  ``CKA(K, L) = <K̄, L̄>_F / (||K̄||_F ||L̄||_F)``; 0 when either centered Gram is all zero (a constant feature).
  float16 and bfloat16 are computed (and returned) in float32: their sums of squared Gram entries overflow.
  """
  dtype = _checks.compute_dtype(dtype)
  k, l = _check_pair(k, l, dtype)
  return _cka(k, l)


def _flat_features(name: str, x: ArrayLike, dtype) -> jax.Array:
  """Features with the samples on axis 0 (rank 1 to 8), as ``(n, -1)``; ValueErrors name ``name``."""
  x = _checks.as_float_array(name, x, dtype, ndim=tuple(range(1, 9)))
  _checks.check_samples(name, x.shape[0])
  _checks.check_values_per_sample(name, x.shape)
  return x.reshape(x.shape[0], -1)


def _check_same_samples(x: jax.Array, y: jax.Array) -> None:
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x and y must have the same number of samples on axis 0, got {x.shape[0]} and {y.shape[0]} "
                     f"(shapes {tuple(x.shape)} and {tuple(y.shape)}, other axes flattened).")


@jax.jit
def _linear_cka(x, y):
  # The Grams of the features, centered (as :func:`cka` does): centering the features first would cost a pass.
  return _alignment(_centered_linear_gram(x, False)[0], _centered_linear_gram(y, False)[0])


def linear_cka(x: ArrayLike, y: ArrayLike, *, dtype=jnp.float32) -> Float[Array, ""]:
  """Linear CKA of two feature arrays with the same first (sample) axis; other axes are flattened.

  The features are scaled by a power of two (exactly) to a largest magnitude near 1 first, so that any finite scale
  gives the same value (CKA does not depend on it) without overflow or underflow. float16 and bfloat16 are computed
  (and returned) in float32.

  >>> import numpy as np
  >>> x = np.arange(12.0).reshape(4, 3) ** 2
  >>> round(float(linear_cka(x, 3.0 * x + 1.0)), 6), round(float(linear_cka(1e20 * x, x)), 6)
  (1.0, 1.0)
  """
  dtype = _checks.compute_dtype(dtype)
  x, y = _flat_features("x", x, dtype), _flat_features("y", y, dtype)
  _check_same_samples(x, y)
  return _linear_cka(x, y)


def gaussian_cka(x: ArrayLike, y: ArrayLike, *, bandwidth: Bandwidth = "median", dtype=jnp.float32) -> Float[Array, ""]:
  """Gaussian-kernel CKA of two feature arrays (other axes flattened), bandwidth per feature set.

  float16 and bfloat16 are computed (and returned) in float32.
  """
  dtype = _checks.compute_dtype(dtype)
  x, y = _flat_features("x", x, dtype), _flat_features("y", y, dtype)
  _check_same_samples(x, y)
  return _cka(_named_gaussian_gram("x", x, bandwidth, False, False, dtype),
              _named_gaussian_gram("y", y, bandwidth, False, False, dtype))


@functools.partial(jax.jit, static_argnames=("kernel", "rule", "normalized"))
def _layer_gram(x, kernel, rule, gamma, normalized):
  """One layer's centered Gram (Frobenius-normalised when ``normalized``), the binary exponent ``e`` it is scaled
  by and whether ``x``'s squared norms are finite.

  The linear kernel's Gram is that of the features scaled to unit magnitude (see :func:`_centered_linear_gram`):
  the layer's own centered Gram is the result times ``4**e`` (``e = 0`` for the Gaussian kernel, whose entries are
  at most 1). The flag validates the Gaussian kernel's input (see :func:`finite_norms`); the scaled linear one
  cannot overflow.
  """
  x = x.reshape(x.shape[0], -1)
  if kernel == "linear":
    k, e = _centered_linear_gram(x)
    finite = jnp.ones((), bool)
  else:
    k, e = center(gaussian_from_features(x, from_jit(rule, gamma))), jnp.zeros((), jnp.int32)
    finite = finite_norms(x)
  return (frobenius_normalize(k) if normalized else k), e, finite


@functools.partial(jax.jit, static_argnames=("normalized",))
def _gram_products(grams, exps, normalized):
  """The ``(l, l)`` matrix from the layers' Grams and their exponents (see :func:`_layer_gram`), and per layer
  whether its row holds the true values (finite, and, unnormalised, its positive diagonal entry not flushed to 0 by
  the unscaling)."""
  g = jnp.stack(grams)
  s = jnp.einsum("inm,jnm->ij", g, g, precision=_HIGHEST)
  if normalized:
    return s, jnp.ones(s.shape[:1], bool)
  n = g.shape[-1]
  e = jnp.stack(exps)
  unit = s / (n - 1) ** 2
  s = scale_pow2(unit, 2 * (e[:, None] + e[None, :]))
  lost = (jnp.diagonal(s) == 0) & (jnp.diagonal(unit) > 0)
  return s, jnp.all(jnp.isfinite(s), axis=1) & ~lost


def hsic_matrix(
    features: Sequence[ArrayLike],
    *,
    kernel: Literal["linear", "gaussian"] = "linear",
    bandwidth: Bandwidth = "median",
    normalized: bool = True,
    dtype=jnp.float32,
) -> Float[Array, "l l"]:
  """HSIC between every pair of layers' activations (what ITPruner needs).

  With ``normalized=True`` (default) entry ``(i, j)`` is ``CKA(K_i, K_j)``, so the diagonal is 1 (0 for a constant
  layer); otherwise it is the biased ``HSIC(K_i, K_j) = tr(K̄_i K̄_j) / (n-1)^2``. Each layer's activations are
  flattened to ``(n, -1)``; layers may have different sizes. One centered Gram per layer is kept (``l`` of
  ``(n, n)``), then the matrix is one contraction. For the linear kernel each layer's features are scaled by a power
  of two (exactly) to a largest magnitude near 1 first, so that any finite scale works (CKA does not depend on it;
  raw HSIC is scaled back at the end).

  Args:
    features: ``l`` arrays, each with the ``n`` samples on axis 0.
    kernel: ``"linear"`` (``K = F F^T``, ITPruner's choice) or ``"gaussian"``.
    bandwidth: Gaussian bandwidth rule (ignored for linear).
    normalized: CKA (True) or raw biased HSIC (False).
    dtype: float32 or float64; float16 and bfloat16 are computed (and returned) in float32, since their sums of
      products of Gram entries overflow or lose every digit.

  Returns:
    Symmetric ``(l, l)`` matrix.

  Raises:
    ValueError: for a bad shape or argument, NaN/Inf in a layer, values whose squared deviations overflow (Gaussian
      kernel), or raw HSIC values (``normalized=False``) outside the range of the dtype.
  """
  dtype = _checks.compute_dtype(dtype)
  if kernel not in ("linear", "gaussian"):
    raise ValueError(f"kernel must be 'linear' or 'gaussian', got {kernel!r}.")
  bandwidth = validate_bandwidth(bandwidth)
  if features is None or isinstance(features, (str, bytes)) or not hasattr(features, "__len__"):
    raise ValueError(f"features must be a sequence (e.g. a list) of layers' activations, got "
                     f"{type(features).__name__}.")
  if len(features) < 1:
    raise ValueError("features must hold at least one layer's activations, got an empty sequence.")
  grams, exps, flags = [], [], []
  n = None
  for i, f in enumerate(features):
    f = _checks.as_float_array(f"features[{i}]", f, dtype, ndim=tuple(range(1, 9)))
    if n is None:
      n = f.shape[0]
      _checks.check_samples("features[0]", n)
    elif f.shape[0] != n:
      raise ValueError(f"features[{i}] has {f.shape[0]} samples on axis 0, but features[0] has {n}.")
    _checks.check_values_per_sample(f"features[{i}]", f.shape)
    g, e, finite = _layer_gram(f, kernel, *jit_bandwidth(bandwidth), normalized)
    grams.append(g)
    exps.append(e)
    flags.append(finite)
  s, exact = _gram_products(grams, exps, normalized)
  if kernel == "gaussian" and all(_checks.is_concrete(f) for f in flags):
    finite = np.asarray(jnp.stack(flags))
    if not finite.all():
      i = int(np.argmin(finite))
      _checks.raise_unless_finite_norms(
          f"features[{i}]", _checks.as_float_array(f"features[{i}]", features[i], dtype, ndim=tuple(range(1, 9))),
          False)
  if not normalized and _checks.is_concrete(exact):
    exact = np.asarray(exact)
    if not exact.all():
      i = int(np.argmin(exact))
      top = float(jnp.max(jnp.abs(jnp.asarray(features[i], dtype))))
      raise ValueError(f"features[{i}] holds values up to {top:.3g} whose raw HSIC (normalized=False) is outside the "
                       f"range of {dtype}: pass normalized=True (CKA does not depend on the scale of the features), "
                       f"rescale the features{_checks.or_wider(dtype)}.")
  return s
