"""The traced core of the HSIC Lasso solver, shared by :func:`hsic_jax.solve` and :func:`hsic_jax.select_k`: one
problem solved by FISTA with adaptive restart and active-set (semismooth Newton) steps, its duality-gap
certificates, its result type and tolerances. The algorithm is stated in :mod:`hsic_jax.solver`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jax.sharding import PartitionSpec as P

from hsic_jax import _checks
from hsic_jax._lasso import LassoProblem


# Relative duality-gap tolerances. In float32 the gap of a solved problem is only known to a few 1e-6 (it is a
# difference of like-sized terms), so a tighter tolerance would never be met.
DEFAULT_TOL = {4: 1e-5, 8: 1e-9}


def default_tol(dtype) -> float:
  return DEFAULT_TOL.get(jnp.dtype(dtype).itemsize, 1e-5)


def resolve_tol(tol, dtype) -> float:
  """``tol`` as a float, or the default for ``dtype`` when None; ValueError unless it is a number > 0."""
  if tol is None:
    return default_tol(dtype)
  message = f"tol must be > 0 (a relative duality-gap tolerance) or None for the default, got {tol!r}."
  try:
    value = float(tol)
  except (TypeError, ValueError) as err:
    raise ValueError(message) from err
  if not value > 0:  # NaN too
    raise ValueError(message)
  return value


DEFAULT_MAX_ITER = 20_000


# Active-set (Newton) iterations tried at each convergence test; they stop early once the support repeats. On the
# ResNet-50 workload the first test, after only 20 gradient steps, takes 3 to 10 of them (mostly 5 to 8); with a
# cap of 5 most layers needed a second test.
MAX_NEWTON = 10


# Proximal-gradient steps between convergence tests (and active-set steps).
CHECK_EVERY = 20


class LassoResult(NamedTuple):
  """Solution of one (or a batch of) HSIC Lasso problems; leading axes are batch axes.

  Attributes:
    beta: coefficients, ``(..., c)``; ``>= 0`` in the nonnegative mode.
    selected: boolean mask of kept channels, ``beta > 0`` (``beta != 0`` in the signed mode).
    objective: ``F(beta)`` on the scale stated in the module docstring.
    gap: duality gap at ``beta`` (an upper bound on ``F(beta) - min F``). At ``lam = 0`` the dual point is 0 and
      the gap equals the objective, which certifies nothing; ``converged`` then comes from the KKT residual.
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


def penalty(beta, positive):
  return jnp.sum(beta, -1) if positive else jnp.sum(jnp.abs(beta), -1)


def _certificates(quad, lin, const, beta, lam, positive):
  """Objective, duality gap and KKT residual at ``beta``."""
  qb = quad @ beta
  grad = qb - lin  # gradient of the smooth part; A' r = -grad
  pen = penalty(beta, positive)
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
  return 0.5 * beta @ (quad @ beta) - lin @ beta + lam * penalty(beta, positive)


def _masked_solve(quad, rhs, m):
  face = quad * (m[:, None] * m[None, :]) + jnp.diag(1.0 - m)
  return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(face, lower=True), m * rhs) * m


def face_solve(quad, rhs, mask, compact):
  """Minimiser of the quadratic on the coordinates in ``mask`` (others 0): ``Q_SS b_S = rhs_S``, one Cholesky.

  ``Q`` is restricted to the set, with the identity elsewhere. A singular ``Q_SS`` (collinear channels in the set)
  gives non-finite values, which the caller rejects. With ``compact`` (unbatched code only: a batched ``switch``
  would run every branch), the set is first gathered into the smallest of ``c/8, c/4, c/2, c`` that holds it, so a
  support of 80 out of 512 channels costs a 128 x 128 factorisation instead of a 512 x 512 one.
  """
  c = quad.shape[-1]
  m = mask.astype(quad.dtype)
  sizes = sorted({min(c, max(16, c // 8)), min(c, max(16, c // 4)), min(c, max(16, c // 2)), c})
  if not compact or len(sizes) == 1:
    return _masked_solve(quad, rhs, m)
  count = jnp.sum(mask)

  def branch(size):
    def fn(_):
      if size == c:
        return _masked_solve(quad, rhs, m)
      # The set's indices, then copies of index 0 as filler; the filler rows are masked out of the solve (by
      # position, not by channel) and add zeros back.
      idx = jnp.nonzero(mask, size=size, fill_value=0)[0]
      valid = (jnp.arange(size) < count).astype(quad.dtype)
      sub = _masked_solve(quad[idx][:, idx], rhs[idx], valid)
      return jnp.zeros_like(rhs).at[idx].add(sub)
    return fn

  which = jnp.searchsorted(jnp.asarray(sizes), count)
  return jax.lax.switch(which, [branch(size) for size in sizes], None)


def _active_set_step(quad, lin, lam, x, step, max_newton, positive, compact):
  """Primal-dual active-set (semismooth Newton) iterations from ``x``; returns the best point seen and its ``F``.

  Each iteration guesses the support (and signs) as the coordinates that one proximal-gradient step from the
  current point leaves nonzero, and jumps to the exact minimiser of ``F`` on that face (one dense solve). Once the
  guess is right this lands on the optimum; gradient steps alone crawl along the ill-conditioned directions that
  kernel Grams of correlated channels produce. The iterations stop as soon as the guess repeats (before solving
  the same face again). Since active-set iterations can cycle on general ``Q``, every candidate is made feasible
  and only the best ``F`` seen (``x`` itself included) is returned, so the step never goes uphill.
  """

  def f(b):
    return _smooth_plus_penalty(quad, lin, b, lam, positive)

  def guess(b):
    u = b - step * (quad @ b - lin)
    if positive:
      return u > step * lam, jnp.ones_like(u)
    return jnp.abs(u) > step * lam, jnp.sign(u)

  def cond(st):
    k, *_, go = st
    return (k < max_newton) & go

  def body(st):
    k, mask, sign, best, f_best, _ = st
    sol = face_solve(quad, lin - lam * sign, mask, compact)
    ok = jnp.all(jnp.isfinite(sol))
    cand = jnp.where(ok, jnp.maximum(sol, 0.0) if positive else sol, best)
    f_cand = f(cand)
    better = ok & (f_cand < f_best)
    # The next guess is taken before the next solve, so a guess that repeats costs no solve.
    new_mask, new_sign = guess(cand)
    changed = new_mask != mask
    if not positive:
      changed = changed | (new_mask & (new_sign != sign))
    go = ok & jnp.any(changed)
    return (k + 1, new_mask, new_sign, jnp.where(better, cand, best), jnp.where(better, f_cand, f_best), go)

  mask, sign = guess(x)
  start = (jnp.zeros((), jnp.int32), mask, sign, x, f(x), jnp.ones((), bool))
  _, _, _, best, f_best, _ = jax.lax.while_loop(cond, body, start)
  return best, f_best


@_checks.highest_precision
def solve_one(quad, lin, const, lipschitz, lam, init, tol, max_iter, check_every, positive, compact=False):
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
    # At every test, active-set steps from the current iterate; momentum restarts from the new point.
    x_obj = _smooth_plus_penalty(quad, lin, x, lam, positive)
    xf, f_xf = _active_set_step(quad, lin, lam, x, step, MAX_NEWTON, positive, compact)
    use = f_xf < x_obj
    x = jnp.where(use, xf, x)
    y = jnp.where(use, xf, y)
    t = jnp.where(use, 1.0, t)
    obj, gap, kkt = _certificates(quad, lin, const, x, lam, positive)
    # Stalled: two rounds in a row that do not lower the best F beyond rounding mean the iterate is as good as this
    # precision allows; stop (``converged`` still reports whether the gap test was met).
    flat = jnp.where(obj >= best - 16 * eps * jnp.abs(obj), flat + 1, 0)
    return x, y, t, it, done(obj, gap, kkt) | (flat >= 2), jnp.minimum(best, obj), flat

  x0 = prox(init) if init is not None else jnp.zeros_like(lin)
  obj0, gap0, kkt0 = _certificates(quad, lin, const, x0, lam, positive)
  one = jnp.ones((), lin.dtype)
  zero = jnp.zeros((), jnp.int32)
  init_state = (x0, x0, one, zero, done(obj0, gap0, kkt0), jnp.asarray(jnp.inf, lin.dtype), zero)
  x, _, _, it, *_ = jax.lax.while_loop(cond, body, init_state)
  obj, gap, kkt = _certificates(quad, lin, const, x, lam, positive)
  selected = x > 0 if positive else x != 0
  return LassoResult(x, selected, obj, gap, it, done(obj, gap, kkt), jnp.asarray(lam, lin.dtype))


def batch_specs(axes) -> tuple[LassoProblem, LassoResult]:
  """``PartitionSpec`` trees of a stacked problem and of its result, split over ``axes`` along the batch."""
  row, mat = P(axes), P(axes, None)
  return LassoProblem(P(axes, None, None), mat, row, row, row), LassoResult(mat, mat, row, row, row, row, row)
