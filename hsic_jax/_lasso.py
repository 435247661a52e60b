"""The HSIC Lasso problem type shared by the builders, the solver and the searches: its fields, its assembly (with
the Lipschitz bound of its gradient), its float64 reference and the checks of problems passed in.

The math of ``(Q, q, const)`` is stated in :mod:`hsic_jax.problem`; :class:`LassoProblem` is re-exported there.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from hsic_jax import _checks


class LassoProblem(NamedTuple):
  """One (or a batch of) HSIC Lasso problems in quadratic form; leading axes are batch axes.

  Attributes:
    quad: ``Q``, shape ``(..., c, c)``, ``Q_ij = <K̄_i, K̄_j>``.
    lin: ``q``, shape ``(..., c)``, ``q_i = <K̄_i, L̄>``.
    const: ``||L̄||_F^2``, shape ``(...)``.
    lipschitz: the gradient's Lipschitz constant (largest eigenvalue of ``Q``) estimated from above, shape
      ``(...)``; see :func:`_lipschitz_bound`.
    rows: number of rows of the equivalent ``n^2 x c`` design (``n^2`` per batch), shape ``(...)``.
      scikit-learn's ``Lasso(alpha)`` on that design solves this problem with ``lam = alpha * rows``.
  """

  quad: Float[Array, "*b c c"]
  lin: Float[Array, "*b c"]
  const: Float[Array, "*b"]
  lipschitz: Float[Array, "*b"]
  rows: Float[Array, "*b"]

  @property
  def num_channels(self) -> int:
    return self.lin.shape[-1]


POWER_ITERATIONS = 30


LIPSCHITZ_MARGIN = 1.05


@jax.jit
@_checks.highest_precision
def _lipschitz_bound(quad):
  """An estimate of ``Q``'s largest eigenvalue from above, for the proximal-gradient step.

  A full eigendecomposition costs more than the whole solve on CPU for ``c`` in the hundreds, so: power iteration
  from the channels' norms (``sqrt(Q_kk)``, a nonnegative start suited to the mostly positive entries of kernel
  Grams' ``Q``), its Rayleigh quotient (a lower bound; on real layers one eigenvalue dominates and 30 iterations
  reach it to about 1e-7) times a 5% margin, and never more than ``||Q||_F``, which bounds the top eigenvalue from
  above. The step only sets the speed of the
  gradient phase; convergence is judged by the duality gap.
  """
  # Everything is computed on Q / max|Q|: Q's entries scale with the fourth power of the features, and squares of
  # tiny ones (features around 1e-6) would underflow to zero.
  scale = jnp.max(jnp.abs(quad), axis=(-2, -1))
  scale = jnp.where(scale > 0, scale, 1.0)
  unit = quad / scale[..., None, None]
  # The start is never zero (an all-zero Q, every channel constant, would leave it so).
  start = jnp.sqrt(jnp.maximum(jnp.diagonal(unit, axis1=-2, axis2=-1), 0.0)) + jnp.finfo(quad.dtype).eps

  def body(_, v):
    w = jnp.einsum("...ij,...j->...i", unit, v)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), jnp.finfo(quad.dtype).eps)

  v = jax.lax.fori_loop(0, POWER_ITERATIONS, body, start / jnp.linalg.norm(start, axis=-1, keepdims=True))
  rayleigh = jnp.einsum("...i,...ij,...j->...", v, unit, v)
  frobenius = jnp.sqrt(jnp.sum(unit * unit, axis=(-2, -1)))
  top = jnp.minimum(LIPSCHITZ_MARGIN * rayleigh, frobenius) * scale
  # An all-zero Q would give a zero step denominator.
  return jnp.maximum(top, jnp.finfo(quad.dtype).tiny)


def make_problem(quad, lin, const, rows) -> LassoProblem:
  """Assembles a :class:`LassoProblem` from ``Q``, ``q``, ``||L̄||^2`` and the design row count."""
  quad = jnp.asarray(quad)
  return LassoProblem(quad, jnp.asarray(lin), jnp.asarray(const), _lipschitz_bound(quad),
                      jnp.asarray(rows, quad.dtype))


def reference_problem(gram_x: Float[ArrayLike, "c n n"], gram_y: Float[ArrayLike, "n n"], *,
                      normalized: bool = False) -> LassoProblem:
  """The problem exactly as the module docstring states it, in float64 numpy: the reference that every fast build
  (whole Grams, tiles, streamed from the features, batched, sharded) is tested against.

  ``K̄_k = H K_k H``, ``L̄ = H L H`` with ``H = I - 11'/n``; optionally ``K̄_k / ||K̄_k||_F`` and ``L̄ / ||L̄||_F``;
  then ``Q_ij = <K̄_i, K̄_j>_F``, ``q_i = <K̄_i, L̄>_F``, ``const = ||L̄||_F^2`` and ``rows = n^2``. Memory is
  ``O(c n^2)``: for tests and small problems, not for calibration.

  >>> g = np.stack([np.eye(3), np.ones((3, 3))])  # the second channel is constant: K̄ = 0
  >>> p = reference_problem(g, np.eye(3))
  >>> (np.round(np.asarray(p.quad), 6) + 0.0).tolist(), (np.round(np.asarray(p.lin), 6) + 0.0).tolist()
  ([[2.0, 0.0], [0.0, 0.0]], [2.0, 0.0])
  """
  gx = np.asarray(gram_x, np.float64)
  gy = np.asarray(gram_y, np.float64)
  n = gy.shape[-1]
  h = np.eye(n) - 1.0 / n
  kbar = h @ gx @ h
  lbar = h @ gy @ h
  if normalized:
    norms = np.sqrt(np.sum(kbar * kbar, axis=(1, 2)))
    kbar = np.where(norms[:, None, None] > 0, kbar / np.where(norms > 0, norms, 1.0)[:, None, None], 0.0)
    ly = np.sqrt(np.sum(lbar * lbar))
    lbar = lbar / ly if ly > 0 else lbar
  flat = kbar.reshape(len(kbar), -1)
  with jax.enable_x64(True):
    return make_problem(flat @ flat.T, flat @ lbar.reshape(-1), np.sum(lbar * lbar), float(n * n))


def check_unbatched(problems: Sequence[LassoProblem], fn: str) -> None:
  if isinstance(problems, LassoProblem) or not isinstance(problems, Sequence):
    raise ValueError(f"{fn} takes a list of LassoProblems, got {type(problems).__name__}.")
  if not problems:
    raise ValueError("problems must hold at least one LassoProblem, got an empty sequence.")
  for i, p in enumerate(problems):
    if not isinstance(p, LassoProblem):
      raise ValueError(f"problems[{i}] must be a LassoProblem (see problem_from_grams), got {type(p).__name__}.")
    if p.lin.ndim != 1:
      raise ValueError(f"problems[{i}] is a batch of problems (q of shape {tuple(p.lin.shape)}); {fn} takes "
                       "single-layer problems.")


def widen(problem: LassoProblem) -> LassoProblem:
  """The problem in float32 when it is float16 or bfloat16 (LAPACK, which the face solves use, has neither, and
  their range and precision cannot hold a solve); any other problem as it is."""
  if jnp.dtype(problem.lin.dtype).itemsize >= 4:
    return problem
  return LassoProblem(*(jnp.asarray(a, jnp.float32) for a in problem))


def check_problem(problem: LassoProblem, name: str = "problem", *, values: bool = True) -> None:
  """The problem's structure, and with ``values`` that ``Q``, ``q`` and the constant are finite (one reduction, read
  back on the host: it waits for the problem's computation)."""
  if not isinstance(problem, LassoProblem):
    raise ValueError(f"{name} must be a LassoProblem (see hsic_jax.problem_from_grams), got {type(problem).__name__}.")
  if problem.lin.shape[-1] < 1:
    raise ValueError(f"{name} has zero channels; there is nothing to select.")
  if not values:
    return
  fields = ("quad", "lin", "const")
  arrays = [getattr(problem, f) for f in fields]
  if all(_checks.is_concrete(a) for a in arrays) and bool(_checks.all_finite(*arrays)):
    return  # one reduction and one scalar back for the common case
  for field, array in zip(fields, arrays):
    _checks.check_finite(f"{name}.{field}", array)
