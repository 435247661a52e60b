"""Building blocks of the Gram matrices (traceable, no validation): bandwidth rules, distances, centering, exact
scaling by powers of two, and the jitted Gaussian Grams that :mod:`hsic_jax.kernels` and :mod:`hsic_jax.problem`
share.

Conventions. ``n`` is the number of samples. ``H = I - 11^T / n`` is the centering matrix and ``K̄ = H K H`` a
centered Gram matrix; it is computed by subtracting row, column and grand means, never by forming ``H``. Squared
distances use ``||a||^2 + ||b||^2 - 2<a, b>`` (a matrix product, fast on accelerators) and are clamped at 0, so
rounding can never push a Gaussian kernel entry above 1. The bandwidth rules are stated in :mod:`hsic_jax.kernels`.
"""

from __future__ import annotations

import functools
from typing import Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from hsic_jax import _checks


Bandwidth = Union[Literal["apib", "pyhsiclasso", "median"], float]


BANDWIDTHS = ("apib", "pyhsiclasso", "median")


# Full float32 precision for products whose results are differenced (distances, Gram inner products): the default
# on TPU (bfloat16 passes) and TF32 on GPUs would lose the small differences that HSIC measures.
HIGHEST = jax.lax.Precision.HIGHEST


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
    d2 = sx[:, None] + sx[None, :] - 2.0 * jnp.matmul(x, x.T, precision=HIGHEST)
    # The diagonal is exactly zero; rounding of the expansion would otherwise leave noise there.
    d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)
  else:
    z = z - mean
    sz = jnp.sum(z * z, axis=-1)
    d2 = sx[:, None] + sz[None, :] - 2.0 * jnp.matmul(x, z.T, precision=HIGHEST)
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


def centered_linear_gram(x: Float[Array, "n ..."], center_features: bool = True
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
  return center(jnp.matmul(x, x.T, precision=HIGHEST)), e


def delta_from_labels(labels: Int[Array, " n"]) -> Float[Array, "n n"]:
  same = labels[:, None] == labels[None, :]
  counts = jnp.sum(same, axis=1, keepdims=True)
  return same / counts


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized"))
def jit_gaussian_gram(x, rule, gamma, centered, normalized):
  k = gaussian_from_features(x, from_jit(rule, gamma))
  if centered:
    k = center(k)
  if normalized:
    k = frobenius_normalize(k)
  return k


# On CPU, channels with at least this many values per sample are computed one at a time (see jit_channel_grams).
SLICED_CHANNELS_MIN_DIM = 512


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized", "batch_size", "strategy"))
def jit_channel_grams(x, rule, gamma, centered, normalized, batch_size, strategy):
  """The ``(c, n, n)`` Grams and whether every sample's squared norm in every channel is finite.

  The flag is the validation of ``x``: a NaN or Inf anywhere (or values whose deviations from their channel's mean
  overflow when squared) makes its squared norm non-finite. Those norms are what the distances need anyway, so
  checking costs no extra pass over ``x``.
  """
  def one(xc):
    return jit_gaussian_gram(xc, rule, gamma, centered, normalized), finite_norms(xc)

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
