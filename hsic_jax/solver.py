"""Accelerated projected proximal gradient (FISTA with adaptive restart) for the HSIC Lasso quadratic form.

Objective (nonnegative, the default)::

  F(beta) = 1/2 beta' Q beta - q' beta + 1/2 const + lam * sum_k beta_k,   beta >= 0,

which equals ``1/2 ||vec(L̄) - sum_k beta_k vec(K̄_k)||^2 + lam sum_k beta_k`` (see :mod:`hsic_jax.problem`).
scikit-learn's ``Lasso(alpha=lam / rows, positive=True, fit_intercept=False)`` on the ``rows x c`` design solves
the same problem, its objective being ``F / rows``. With ``positive=False`` the penalty is ``lam ||beta||_1`` and
beta is signed (the APIB reference's plain Lasso, kept for comparison).

Iteration: ``beta <- prox(y - (Q y - q) / L)`` with ``L`` the largest eigenvalue of ``Q``, the prox being
``max(. - lam/L, 0)`` (nonnegative) or soft-thresholding (signed); Nesterov momentum restarts whenever it points
uphill (O'Donoghue and Candès, 2015). Every ``check_every`` steps the duality gap is computed at the current
iterate from a dual point ``theta = s r`` (residual ``r``, ``s`` scaling it into the dual-feasible set
``A' theta <= lam``), in a form that never subtracts ``const`` from a like-sized number::

  gap = 1/2 (1 - s)^2 ||r||^2 + lam * penalty(beta) + s * beta' (Q beta - q)

At every test an active-set step moves to the minimiser of ``F`` on the current support (one dense
``c x c`` solve), stopping at the support's boundary; once proximal gradient has found the support this lands on
the optimum at once instead of crawling along the ill-conditioned directions that kernel Grams of correlated
channels produce. The step is kept only if it lowers ``F``.

The loop stops when ``gap <= tol * F(beta)`` (``lam > 0``), or when the KKT residual (projected gradient,
sup-norm) is at most ``tol * max|q|`` (``lam = 0``, where the dual point degenerates), or after ``max_iter`` steps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from hsic_jax import _checks
from hsic_jax.problem import LassoProblem

# Relative duality-gap tolerances. In float32 the gap of a solved problem is only known to a few 1e-6 (it is a
# difference of like-sized terms), so a tighter tolerance would never be met.
DEFAULT_TOL = {4: 1e-5, 8: 1e-9}


def default_tol(dtype) -> float:
  return DEFAULT_TOL.get(jnp.dtype(dtype).itemsize, 1e-5)
DEFAULT_MAX_ITER = 20_000


class LassoResult(NamedTuple):
  """Solution of one (or a batch of) HSIC Lasso problems; leading axes are batch axes.

  Attributes:
    beta: coefficients, ``(..., c)``; ``>= 0`` in the nonnegative mode.
    selected: boolean mask of kept channels, ``beta > 0`` (``beta != 0`` in the signed mode).
    objective: ``F(beta)`` on the scale stated in the module docstring.
    gap: duality gap at ``beta`` (an upper bound on ``F(beta) - min F``).
    iterations: proximal-gradient steps taken.
    converged: whether a stopping test was met before ``max_iter``.
    lam: the penalty this result was solved at.
  """

  beta: Float[Array, "*b c"]
  selected: Bool[Array, "*b c"]
  objective: Float[Array, "*b"]
  gap: Float[Array, "*b"]
  iterations: Int[Array, "*b"]
  converged: Bool[Array, "*b"]
  lam: Float[Array, "*b"]

  def indices(self) -> np.ndarray:
    """Indices of the selected channels of an unbatched result, ascending."""
    mask = np.asarray(self.selected)
    if mask.ndim != 1:
      raise ValueError(f"indices() needs an unbatched result; selected has shape {mask.shape}.")
    return np.flatnonzero(mask)


def _penalty(beta, positive):
  return jnp.sum(beta, -1) if positive else jnp.sum(jnp.abs(beta), -1)


def objective(problem: LassoProblem, beta, lam, *, positive: bool = True):
  """``F(beta)`` of the module docstring (traceable)."""
  qb = jnp.einsum("...ij,...j->...i", problem.quad, beta)
  smooth = 0.5 * jnp.sum(beta * qb, -1) - jnp.sum(problem.lin * beta, -1) + 0.5 * problem.const
  return smooth + lam * _penalty(beta, positive)


def _certificates(quad, lin, const, beta, lam, positive):
  """Objective, duality gap and KKT residual at ``beta``."""
  qb = quad @ beta
  grad = qb - lin  # gradient of the smooth part; A' r = -grad
  pen = _penalty(beta, positive)
  bqb = beta @ qb
  qbeta = lin @ beta
  rr = jnp.maximum(const - 2.0 * qbeta + bqb, 0.0)  # ||r||^2
  corr = -grad
  top = jnp.max(corr) if positive else jnp.max(jnp.abs(corr))
  s = jnp.where(top > lam, lam / jnp.where(top > lam, top, 1.0), 1.0)
  gap = 0.5 * (1.0 - s) ** 2 * rr + lam * pen + s * (bqb - qbeta)
  obj = 0.5 * rr + lam * pen
  if positive:
    full = grad + lam
    pg = jnp.where(beta > 0, full, jnp.minimum(full, 0.0))
  else:
    pg = jnp.where(beta != 0, grad + lam * jnp.sign(beta), jnp.maximum(jnp.abs(grad) - lam, 0.0))
  kkt = jnp.max(jnp.abs(pg))
  return obj, jnp.maximum(gap, 0.0), kkt


def _smooth_plus_penalty(quad, lin, beta, lam, positive):
  """``F(beta) - const/2``: enough to compare two points."""
  return 0.5 * beta @ (quad @ beta) - lin @ beta + lam * _penalty(beta, positive)


def _face_step(quad, lin, lam, x, positive):
  """One active-set step: move towards the minimiser of F on the current support (face), stopping at its boundary.

  On the support ``S`` with fixed signs, ``F`` is a quadratic whose minimiser solves ``Q_SS b_S = q_S - lam s_S``
  (``s = 1`` when nonnegative, ``sign(x)`` when signed), found by one dense solve. The step goes from ``x`` towards that point and stops where the first coordinate reaches 0,
  which leaves the support. By convexity every point of the segment has ``F <= F(x)``. This resolves the
  ill-conditioned directions within the support (where gradient steps crawl) in one move; coordinates entering the
  support are left to the proximal-gradient steps.
  """
  mask = (x > 0) if positive else (x != 0)
  m = mask.astype(x.dtype)
  rhs = m * (lin - lam * (1.0 if positive else jnp.sign(x)))

  # Q restricted to the support, identity elsewhere: one Cholesky solve. A singular Q_SS (collinear channels in the
  # support) gives non-finite values and the step is rejected by the caller.
  face = quad * (m[:, None] * m[None, :]) + jnp.diag(1.0 - m)
  sol = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(face, lower=True), rhs) * m
  crossing = mask & (sol * jnp.sign(x) <= 0)  # coordinates that would change sign (or leave the orthant)
  ratios = jnp.where(crossing, x / jnp.where(crossing, x - sol, 1.0), jnp.inf)
  alpha = jnp.minimum(1.0, jnp.min(ratios))
  boundary = x + alpha * (sol - x)
  # Snap the blocking coordinate(s) exactly to zero.
  boundary = jnp.where(crossing & (ratios <= alpha), 0.0, boundary)
  # The face minimiser with every crossing coordinate dropped at once (a projected Newton step) often does far
  # better than stopping at the first boundary, but it is not always a descent step: keep the better of the two.
  projected = jnp.where(crossing, 0.0, sol)
  f_b = _smooth_plus_penalty(quad, lin, boundary, lam, positive)
  f_p = _smooth_plus_penalty(quad, lin, projected, lam, positive)
  new = jnp.where(f_p <= f_b, projected, boundary)
  if positive:
    new = jnp.maximum(new, 0.0)
  return new, jnp.all(jnp.isfinite(new))


def _solve_one(quad, lin, const, lipschitz, lam, init, tol, max_iter, check_every, positive):
  """FISTA with adaptive restart on one problem (vmapped for batches), with periodic active-set steps."""
  step = 1.0 / lipschitz
  thresh = lam * step
  scale = jnp.max(jnp.abs(lin))

  def prox(v):
    return jnp.maximum(v - thresh, 0.0) if positive else jnp.sign(v) * jnp.maximum(jnp.abs(v) - thresh, 0.0)

  def fista_step(_, st):
    x, y, t = st
    x_new = prox(y - step * (quad @ y - lin))
    restart = jnp.dot(y - x_new, x_new - x) > 0
    t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
    y_new = jnp.where(restart, x_new, x_new + ((t - 1.0) / t_new) * (x_new - x))
    return x_new, y_new, t_new

  def done(obj, gap, kkt):
    # The gap bound certifies lam > 0; at lam = 0 the dual point degenerates and the KKT residual is used.
    return jnp.where(lam > 0, gap <= tol * obj, kkt <= tol * scale)

  def cond(st):
    return (st[3] < max_iter) & ~st[4]

  eps = jnp.finfo(lin.dtype).eps

  def body(st):
    x, y, t, it, _, best, flat = st
    x, y, t = jax.lax.fori_loop(0, check_every, fista_step, (x, y, t))
    it = it + check_every
    obj, gap, kkt = _certificates(quad, lin, const, x, lam, positive)
    # At every test, an active-set step on the current support; momentum restarts from the new point.
    xf, ok = _face_step(quad, lin, lam, x, positive)
    objf, gapf, kktf = _certificates(quad, lin, const, xf, lam, positive)
    use = ok & (objf <= obj)
    x = jnp.where(use, xf, x)
    y = jnp.where(use, xf, y)
    t = jnp.where(use, 1.0, t)
    new_obj = jnp.where(use, objf, obj)
    # Stalled: two rounds in a row that do not lower the best F beyond rounding mean the iterate is as good as this
    # precision allows; stop (``converged`` still reports whether the gap test was met).
    flat = jnp.where(new_obj >= best - 16 * eps * jnp.abs(new_obj), flat + 1, 0)
    stop = jnp.where(use, done(objf, gapf, kktf), done(obj, gap, kkt))
    return x, y, t, it, stop | (flat >= 2), jnp.minimum(best, new_obj), flat

  x0 = prox(init) if init is not None else jnp.zeros_like(lin)
  obj0, gap0, kkt0 = _certificates(quad, lin, const, x0, lam, positive)
  one = jnp.ones((), lin.dtype)
  zero = jnp.zeros((), jnp.int32)
  init_state = (x0, x0, one, zero, done(obj0, gap0, kkt0), jnp.asarray(jnp.inf, lin.dtype), zero)
  x, _, _, it, *_ = jax.lax.while_loop(cond, body, init_state)
  obj, gap, kkt = _certificates(quad, lin, const, x, lam, positive)
  selected = x > 0 if positive else x != 0
  return LassoResult(x, selected, obj, gap, it, done(obj, gap, kkt), jnp.asarray(lam, lin.dtype))


@functools.partial(jax.jit, static_argnames=("max_iter", "check_every", "positive"))
def _solve(problem, lam, init, tol, max_iter, check_every, positive):
  """Solves a batch of problems (any leading axes, broadcast against ``lam``) in one vmapped call."""
  batch = jnp.broadcast_shapes(problem.lin.shape[:-1], jnp.shape(lam))
  c = problem.lin.shape[-1]
  fn = functools.partial(_solve_one, tol=tol, max_iter=max_iter, check_every=check_every, positive=positive)
  lam_b = jnp.broadcast_to(jnp.asarray(lam, problem.lin.dtype), batch).reshape(-1)
  init_b = None if init is None else jnp.broadcast_to(init, batch + (c,)).reshape(-1, c)
  if problem.lin.ndim == 1:
    # One problem at many penalties (a path): share Q instead of copying it per penalty.
    args = (problem.quad, problem.lin, problem.const, problem.lipschitz)
    axes = (None, None, None, None)
  else:
    args = (jnp.broadcast_to(problem.quad, batch + (c, c)).reshape(-1, c, c),
            jnp.broadcast_to(problem.lin, batch + (c,)).reshape(-1, c),
            jnp.broadcast_to(problem.const, batch).reshape(-1),
            jnp.broadcast_to(problem.lipschitz, batch).reshape(-1))
    axes = (0, 0, 0, 0)
  if init_b is None:
    out = jax.vmap(lambda a, b, k, l, m: fn(a, b, k, l, m, None), in_axes=axes + (0,))(*args, lam_b)
  else:
    out = jax.vmap(fn, in_axes=axes + (0, 0))(*args, lam_b, init_b)
  return jax.tree.map(lambda a: a.reshape(batch + a.shape[1:]), out)


def check_problem(problem: LassoProblem, name: str = "problem") -> None:
  if not isinstance(problem, LassoProblem):
    raise ValueError(f"{name} must be a LassoProblem (see hsic_jax.problem_from_grams), got {type(problem).__name__}.")
  if problem.lin.shape[-1] < 1:
    raise ValueError(f"{name} has zero channels; there is nothing to select.")
  for field in ("quad", "lin", "const"):
    _checks.check_finite(f"{name}.{field}", getattr(problem, field))


def solve(
    problem: LassoProblem,
    lam: Float[ArrayLike, "*b"],
    *,
    positive: bool = True,
    init: Float[ArrayLike, "*b c"] | None = None,
    tol: float | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    check_every: int = 50,
) -> LassoResult:
  """Solves HSIC Lasso at penalty ``lam`` (broadcast against the problem's batch axes; see module docstring).

  Args:
    problem: from :func:`hsic_jax.problem_from_grams` / :func:`hsic_jax.problem_from_features`, or a stack.
    lam: penalty ``>= 0``; a scalar, or an array broadcast against the problem's leading axes (a lambda path).
    positive: nonnegative HSIC Lasso (default) or the signed Lasso of the APIB reference code.
    init: warm start for ``beta`` (projected onto the feasible set).
    tol: relative duality-gap (and KKT) tolerance; default 1e-5 in float32, 1e-9 in float64.
    max_iter: cap on proximal-gradient steps; ``converged`` is False when it is hit.
    check_every: proximal-gradient steps between convergence tests (each test also tries an active-set step).

  Returns:
    A :class:`LassoResult` with the problem's and ``lam``'s broadcast batch shape.
  """
  check_problem(problem)
  _checks.check_nonnegative_scalar("lam", lam)
  tol = default_tol(problem.lin.dtype) if tol is None else tol
  if not tol > 0:
    raise ValueError(f"tol must be > 0, got {tol}.")
  if max_iter < 1 or check_every < 1:
    raise ValueError(f"max_iter and check_every must be >= 1, got {max_iter} and {check_every}.")
  if init is not None:
    init = jnp.asarray(init, problem.lin.dtype)
    _checks.check_finite("init", init)
    if init.shape[-1] != problem.num_channels:
      raise ValueError(f"init must have {problem.num_channels} coefficients on its last axis, got shape {init.shape}.")
  return _solve(problem, jnp.asarray(lam, problem.lin.dtype), init, tol, int(max_iter), int(check_every),
                bool(positive))


def lambda_max(problem: LassoProblem, *, positive: bool = True) -> Float[Array, "*b"]:
  """Smallest ``lam`` at which ``beta = 0`` is optimal: ``max(0, max_k q_k)``, or ``max_k |q_k|`` if signed.

  ``beta = 0`` is optimal iff the gradient there, ``-q + lam``, satisfies the KKT conditions: ``-q_k + lam >= 0``
  for all ``k`` (nonnegative) or ``|q_k| <= lam`` (signed).
  """
  check_problem(problem)
  if positive:
    return jnp.maximum(jnp.max(problem.lin, axis=-1), 0.0)
  return jnp.max(jnp.abs(problem.lin), axis=-1)
