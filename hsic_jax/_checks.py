"""Validation at the public boundary: shapes, finiteness, ranges and dtypes, with errors that name the argument."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds values (not a tracer inside ``jit``/``vmap``), so it can be inspected on the host."""
  return not isinstance(x, jax.core.Tracer)


def resolve_dtype(dtype: Any) -> jnp.dtype:
  """Returns the floating dtype to compute in, refusing float64 when JAX has 64-bit types disabled."""
  dt = jnp.dtype(dtype)
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"dtype must be a floating type such as float32 or float64, got {dt}.")
  if dt == jnp.float64 and not jax.config.read("jax_enable_x64"):
    raise ValueError(
        "dtype=float64 needs 64-bit types enabled in JAX: wrap the call in `with jax.enable_x64(True):` or set "
        "JAX_ENABLE_X64=1 before importing jax.")
  return dt


def compute_dtype(dtype: Any) -> jnp.dtype:
  """:func:`resolve_dtype`, with float16 and bfloat16 widened to float32.

  Sums of products of Gram entries overflow float16 (largest value 65504) at ordinary feature scales, bfloat16 keeps
  8 bits of mantissa, and LAPACK (the solver's Cholesky factorisations) has neither, so functions that take these
  compute in float32.
  """
  dt = resolve_dtype(dtype)
  return jnp.dtype(jnp.float32) if dt.itemsize < 4 else dt


def check_count(name: str, value: Any, low: int) -> int:
  """Returns ``value`` as an int, raising ValueError unless it is an integer ``>= low``.

  The library's one contract for "an integer": an ``int``, a NumPy integer, or an integral float such as ``1e4``
  (people write iteration counts so); booleans, non-integral floats (``2.5``), NaN and infinities are refused.

  >>> check_count("max_iter", 1e4, 1)
  10000
  """
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
  if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
    ok = True
  if not ok or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  return int(value)


def as_float_array(name: str, x: Any, dtype: jnp.dtype, *, ndim: int | tuple[int, ...],
                   finite: bool = True) -> jax.Array:
  """Converts ``x`` to a float array of the given rank, checking rank and (when concrete and ``finite``)
  finiteness."""
  if x is None:
    raise ValueError(f"{name} is required, got None.")
  if isinstance(x, jax.Array):
    arr = x
  else:
    try:
      arr = np.asarray(x)
    except Exception as err:  # noqa: BLE001 - anything that is not array-like
      raise ValueError(f"{name} must be an array, got {type(x).__name__}.") from err
    if arr.dtype == object:
      raise ValueError(f"{name} must be a numeric array, got an object array.")
  ndims = (ndim,) if isinstance(ndim, int) else ndim
  if arr.ndim not in ndims:
    want = " or ".join(str(d) for d in ndims)
    raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(arr.shape)}.")
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
          or jnp.issubdtype(arr.dtype, jnp.bool_)):
    raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}.")
  if finite:
    check_finite(name, arr)
  return jnp.asarray(arr, dtype=dtype)


def check_finite(name: str, x: Any) -> None:
  """Raises ValueError if a concrete array holds NaN or Inf; tracers pass (they cannot be inspected).

  A device array is checked where it lives (one reduction, a scalar comes back); it is copied to the host only to
  locate the first bad entry when there is one.
  """
  if not is_concrete(x):
    return
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return
  if isinstance(x, jax.Array):
    if bool(jnp.all(jnp.isfinite(x))):
      return
  host = np.asarray(x)
  bad = ~np.isfinite(host)
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{name} contains {int(bad.sum())} NaN or Inf value(s) out of {host.size} (first at index {idx}). "
        "Check the features for overflow or a diverged model; non-finite values would make every kernel NaN.")


def gram_stats(rows, cols, diag):
  """Traceable: ``[all finite, max |mean rows - mean cols|, max |G v - v^T G|, scale]`` of square matrices ``G``,
  as one float array.

  ``rows`` and ``cols`` are ``(..., n, 2)``: ``[row mean, G v]`` and ``[column mean, v^T G]`` for a fixed random
  unit vector ``v``, which centering computes in the same two passes, so validation costs no pass over the data. A
  NaN or Inf anywhere makes its row's entries non-finite, and a symmetric matrix has equal row and column means and
  ``G v = v^T G`` (necessary conditions; the random ``v`` fails for almost every asymmetric ``G``). The scale is the
  largest absolute diagonal entry or row mean; a positive semidefinite Gram's largest entry is on its diagonal.
  """
  finite = jnp.all(jnp.isfinite(rows)) & jnp.all(jnp.isfinite(cols))
  asym = jnp.max(jnp.abs(rows - cols).reshape(-1, 2), axis=0)
  scale = jnp.maximum(jnp.max(jnp.abs(diag)), jnp.max(jnp.abs(rows[..., 0])))
  return jnp.stack([finite.astype(rows.dtype), asym[0], asym[1], scale])


# Gram matrices computed in floating point are symmetric only up to rounding. Relative to the largest entry, the
# row and column means may differ by SYMMETRY_RTOL and G v and v^T G (|v| = 1) by PROBE_RTOL. An independent
# relative error e per entry (float32 rounding: about 1e-7) moves a mean by about e sqrt(2 / n) and G v by about
# e sqrt(2), the largest of n such differences being about 3x that: the probe accepts e up to about 2e-4 at any n, the
# means up to about 2e-5 sqrt(n) (6e-5 at n = 8, 2e-4 from n = 64 on). A transposed or corrupted block of entries
# fails both.
SYMMETRY_RTOL = 1e-4
PROBE_RTOL = 1e-3


def raise_for_gram_stats(name: str, x: Any, stats: Any, *, batched: bool = False) -> None:
  """Raises ValueError for NaN/Inf (locating the first one), entries whose sums overflow, or asymmetry, given
  :func:`gram_stats` of ``x``: one row, or ``(b, 4)`` for a batch of ``b`` layers (``batched``), each judged against
  its own scale and named by its index in the error."""
  stats = np.asarray(stats, dtype=np.float64).reshape(-1, 4)
  where = lambda b: f" (layer {b} of the batch)" if batched else ""  # noqa: E731
  bad = np.flatnonzero(stats[:, 0] == 0)
  if bad.size:
    check_finite(name, x)  # locates a NaN or Inf entry
    b = int(bad[0])
    top = float(jnp.max(jnp.abs(x[b] if batched else x)))
    raise ValueError(f"{name}{where(b)} holds entries up to {top:.3g} whose sums overflow {jnp.result_type(x)}: "
                     + gram_rescale_hint(jnp.result_type(x)))
  scale = np.maximum(stats[:, 3], np.finfo(np.float32).tiny)
  ratio = np.maximum(stats[:, 1] / (SYMMETRY_RTOL * scale), stats[:, 2] / (PROBE_RTOL * scale))
  b = int(np.argmax(ratio))
  if not ratio[b] <= 1.0:
    raise ValueError(
        f"{name} must hold symmetric Gram matrices{where(b)}: their row and column means differ by up to "
        f"{stats[b, 1]:.3g} and G v and v^T G by up to {stats[b, 2]:.3g} for a random unit v, at scale "
        f"{stats[b, 3]:.3g} (rounding is accepted up to {SYMMETRY_RTOL:g} and {PROBE_RTOL:g} of the scale). A kernel "
        "Gram matrix K[i, j] = k(x_i, x_j) is symmetric; only one triangle of it enters Q.")


def or_wider(dtype) -> str:
  """The advice to compute in float64 (with a leading space), unless ``dtype`` is float64 already."""
  return "" if jnp.dtype(dtype) == jnp.float64 else " or compute in float64"


def gram_rescale_hint(dtype) -> str:
  """The advice for Gram entries too large for ``dtype``."""
  return f"rescale the Gram matrices (a Gaussian kernel's entries are at most 1){or_wider(dtype)}."


@jax.jit
def all_finite(*arrays) -> jax.Array:
  """Whether every entry of every array is finite, as one device scalar."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def raise_unless_finite_norms(name: str, x: Any, finite: Any) -> None:
  """Raises ValueError when a kernel computation reports (``finite`` false) that a squared norm of ``x`` is not
  finite: a NaN or Inf in ``x`` (located by :func:`check_finite`) or finite values whose deviations from their
  mean overflow when squared.

  Reading the flag waits for the computation that produced it; a traced flag (inside ``jit``) is not checked.
  """
  if not is_concrete(finite) or bool(finite):
    return
  check_finite(name, x)
  top = float(jnp.max(jnp.abs(x)))
  raise ValueError(
      f"{name} holds values up to {top:.3g} whose squared deviations from their mean overflow {jnp.result_type(x)}: "
      f"rescale the features (e.g. divide by their largest magnitude){or_wider(jnp.result_type(x))}.")


def check_samples(name: str, n: int) -> None:
  if n < 2:
    raise ValueError(f"{name} must hold at least 2 samples (HSIC needs pairs of samples), got n={n}.")


def check_values_per_sample(name: str, shape: tuple[int, ...]) -> None:
  """Raises ValueError when the samples of features of ``shape`` (samples on axis 0, values after the channel axis
  for ``(n, c, d)``) hold no values: a kernel of empty vectors is meaningless and its bandwidth undefined."""
  if 0 in shape[1:]:
    raise ValueError(f"{name} must hold at least one value per sample (and per channel), got shape {tuple(shape)}.")


def check_square(name: str, shape: tuple[int, ...]) -> None:
  if shape[-1] != shape[-2]:
    raise ValueError(f"{name} must hold square (n, n) Gram matrices, got shape {tuple(shape)}.")


def check_nonnegative_scalar(name: str, value: Any) -> None:
  """Raises ValueError for a negative or non-finite concrete scalar (or any negative entry of an array)."""
  if value is None:
    raise ValueError(f"{name} is required, got None.")
  if not is_concrete(value):
    return
  try:
    host = np.asarray(value)
  except Exception as err:  # noqa: BLE001 - anything that is not array-like
    raise ValueError(f"{name} must be a number or an array of numbers, got {type(value).__name__}.") from err
  # jnp.issubdtype knows bfloat16 and the other ml_dtypes floats, which np.issubdtype does not call floating.
  if not (jnp.issubdtype(host.dtype, jnp.floating) or jnp.issubdtype(host.dtype, jnp.integer)):
    raise ValueError(f"{name} must be a number or an array of numbers, got {value!r} (dtype {host.dtype}).")
  host = host.astype(np.float64)
  if not np.all(np.isfinite(host)):
    raise ValueError(f"{name} must be finite, got {host}.")
  if np.any(host < 0):
    raise ValueError(f"{name} must be >= 0, got {host}.")


def highest_precision(fn):
  """Traces ``fn`` with every float32 matrix product at full precision: the default on TPUs (bfloat16 passes) and
  TF32 on GPUs would stall a solver whose gradients are differences of nearly equal products."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return wrapped


STRATEGIES = ("loop", "vmap")


def _platform_of(x: Any) -> str | None:
  """The platform of the devices a concrete JAX array lives on (``None`` for anything else)."""
  if isinstance(x, jax.Array) and is_concrete(x):
    try:
      return next(iter(x.devices())).platform
    except Exception:  # pylint: disable=broad-except  # e.g. a deleted buffer: let the computation say so
      return None
  return None


def default_platform() -> str:
  """The platform a computation on uncommitted inputs runs on: ``jax.default_device`` where one is set (e.g. the
  CPU of a GPU host), else the default backend."""
  dev = jax.config.jax_default_device
  if dev is None:
    return jax.default_backend()
  return dev if isinstance(dev, str) else dev.platform


def strategy_for(*arrays: Any, strategy: str | None = None) -> str:
  """How batches of problems (and channels of long features) run: ``"loop"`` (``lax.map``, one at a time) or
  ``"vmap"``, decided at the public boundary and passed to the jitted code as a static argument.

  On XLA:CPU a vmapped while loop runs until its slowest problem converges, and batched Cholesky factorisations,
  gathers and products are no faster per problem than single ones, so a loop is faster there; accelerators vmap.
  The choice follows where the inputs live: the first concrete JAX array's platform, else (numpy inputs, tracers
  inside a caller's ``jit``) :func:`default_platform`. An explicit ``strategy`` wins.
  """
  if strategy is not None:
    if strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {list(STRATEGIES)} or None, got {strategy!r}.")
    return strategy
  for a in arrays:
    for leaf in jax.tree.leaves(a):
      platform = _platform_of(leaf)
      if platform is not None:
        return "loop" if platform == "cpu" else "vmap"
  return "loop" if default_platform() == "cpu" else "vmap"


def map_batch(fn, args: tuple, strategy: str):
  """``fn`` over the leading axis of every array in ``args``: ``lax.map`` for ``"loop"``, else ``vmap``."""
  if strategy == "loop":
    return jax.lax.map(lambda a: fn(*a), args)
  return jax.vmap(fn)(*args)
