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
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from jax.sharding import PartitionSpec as P

from hsic_jax import _checks, _gram, _sharding
from hsic_jax._gram import Bandwidth, center

__all__ = [
    "Bandwidth",
    "center",
    "channel_grams",
    "cka",
    "delta_gram",
    "gaussian_cka",
    "gaussian_gram",
    "hsic",
    "hsic_matrix",
    "linear_cka",
    "linear_gram",
]


# ----------------------------------------------------------------------------------------------------------------
# Public Gram matrices.


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized"))
def _gaussian_gram_checked(x, rule, gamma, centered, normalized):
  """The Gaussian Gram and whether ``x``'s squared norms are finite (its validation, see ``_gram.finite_norms``)."""
  return _gram.jit_gaussian_gram(x, rule, gamma, centered, normalized), _gram.finite_norms(x)


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
  rule, gamma = _gram.jit_bandwidth(_gram.validate_bandwidth(bandwidth))
  k, finite = _gaussian_gram_checked(x, rule, gamma, centered, normalized)
  _checks.raise_unless_finite_norms(name, x, finite)
  return k


@functools.partial(jax.jit, static_argnames=("rule", "centered", "normalized", "batch_size", "strategy", "mesh",
                                             "axes"))
def _channel_grams_split(x, rule, gamma, centered, normalized, batch_size, strategy, mesh, axes):
  """``_gram.jit_channel_grams`` on each device's channels of ``x`` split over ``axes``: Grams split the same way."""
  def local(xl, g):
    grams, finite = _gram.jit_channel_grams(xl, rule, g, centered, normalized, batch_size, strategy)
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
  rule, gamma = _gram.jit_bandwidth(_gram.validate_bandwidth(bandwidth))
  strategy = _checks.strategy_for(x)
  split = _sharding.split_axis(x, 1)
  if split is not None and np.ndim(gamma) == 0:
    # Channels split over a mesh: each device computes its own channels' Grams, which stay split.
    grams, finite = _channel_grams_split(x, rule, gamma, centered, normalized, batch_size, strategy, *split)
  else:
    grams, finite = _gram.jit_channel_grams(x, rule, gamma, centered, normalized, batch_size, strategy)
  _checks.raise_unless_finite_norms("x", x, finite)
  return grams


def linear_gram(x: Float[ArrayLike, "n d"], *, centered: bool = False, dtype=jnp.float32) -> Float[Array, "n n"]:
  """Linear-kernel Gram ``K = X X^T`` (``x`` of any rank is flattened to ``(n, -1)``)."""
  dtype = _checks.resolve_dtype(dtype)
  x = _checks.as_float_array("x", x, dtype, ndim=tuple(range(1, 9)))
  x = x.reshape(x.shape[0], -1)
  _checks.check_samples("x", x.shape[0])
  if not centered:
    return jnp.matmul(x, x.T, precision=_gram.HIGHEST)
  # H X X^T H = (HX)(HX)^T: centering the features first keeps the differences that a large offset would cancel;
  # centering the product too removes what the rounding of the mean leaves.
  x = x - jnp.mean(x, axis=0, keepdims=True)
  return center(jnp.matmul(x, x.T, precision=_gram.HIGHEST))


def delta_gram(labels: Int[ArrayLike, " n"], *, centered: bool = False, dtype=jnp.float32) -> Float[Array, "n n"]:
  """Delta kernel for class labels (pyHSICLasso's classification kernel).

  ``L_ij = 1/n_c`` when samples ``i`` and ``j`` both have class ``c`` (with ``n_c`` samples), else 0.

  >>> delta_gram([0, 0, 1]).tolist()
  [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
  """
  return _gram.labels_gram("labels", labels, centered=centered, dtype=_checks.resolve_dtype(dtype))


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
  return _alignment(_gram.centered_linear_gram(x, False)[0], _gram.centered_linear_gram(y, False)[0])


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

  The linear kernel's Gram is that of the features scaled to unit magnitude (see ``_gram.centered_linear_gram``):
  the layer's own centered Gram is the result times ``4**e`` (``e = 0`` for the Gaussian kernel, whose entries are
  at most 1). The flag validates the Gaussian kernel's input (see ``_gram.finite_norms``); the scaled linear one
  cannot overflow.
  """
  x = x.reshape(x.shape[0], -1)
  if kernel == "linear":
    k, e = _gram.centered_linear_gram(x)
    finite = jnp.ones((), bool)
  else:
    k, e = center(_gram.gaussian_from_features(x, _gram.from_jit(rule, gamma))), jnp.zeros((), jnp.int32)
    finite = _gram.finite_norms(x)
  return (_gram.frobenius_normalize(k) if normalized else k), e, finite


@functools.partial(jax.jit, static_argnames=("normalized",))
def _gram_products(grams, exps, normalized):
  """The ``(l, l)`` matrix from the layers' Grams and their exponents (see :func:`_layer_gram`), and per layer
  whether its row holds the true values (finite, and, unnormalised, its positive diagonal entry not flushed to 0 by
  the unscaling)."""
  g = jnp.stack(grams)
  s = jnp.einsum("inm,jnm->ij", g, g, precision=_gram.HIGHEST)
  if normalized:
    return s, jnp.ones(s.shape[:1], bool)
  n = g.shape[-1]
  e = jnp.stack(exps)
  unit = s / (n - 1) ** 2
  s = _gram.scale_pow2(unit, 2 * (e[:, None] + e[None, :]))
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
  bandwidth = _gram.validate_bandwidth(bandwidth)
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
    g, e, finite = _layer_gram(f, kernel, *_gram.jit_bandwidth(bandwidth), normalized)
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
