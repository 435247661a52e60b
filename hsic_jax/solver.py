"""Accelerated projected proximal gradient (FISTA with adaptive restart) for the HSIC Lasso quadratic form.

Objective (nonnegative, the default)::

  F(beta) = 1/2 beta' Q beta - q' beta + 1/2 const + lam * sum_k beta_k,   beta >= 0,

which equals ``1/2 ||vec(L̄) - sum_k beta_k vec(K̄_k)||^2 + lam sum_k beta_k`` (see :mod:`hsic_jax.problem`).
scikit-learn's ``Lasso(alpha=lam / rows, positive=True, fit_intercept=False)`` on the ``rows x c`` design solves
the same problem, its objective being ``F / rows``. With ``positive=False`` the penalty is ``lam ||beta||_1`` and
beta is signed (the APIB reference's plain Lasso, kept for comparison).

Iteration: ``beta <- prox(y - (Q y - q) / L)`` with ``L`` an upper estimate of the largest eigenvalue of ``Q``,
the prox being ``max(. - lam/L, 0)`` (nonnegative) or soft-thresholding (signed); Nesterov momentum restarts
whenever it points uphill (O'Donoghue and Candès, 2015). Every ``check_every`` steps the duality gap is computed at
the current iterate from a dual point ``theta = s r`` (residual ``r``, ``s`` scaling it into the dual-feasible set
``A' theta <= lam``), in a form that never subtracts ``const`` from a like-sized number::

  gap = 1/2 (1 - s)^2 ||r||^2 + lam * penalty(beta) + s * beta' (Q beta - q)

At every test, primal-dual active-set (semismooth Newton) iterations take over: guess the support as the
coordinates one proximal-gradient step leaves nonzero, jump to the exact minimiser of ``F`` on that face (one
Cholesky solve), repeat until the guess repeats (at most ``MAX_NEWTON`` times). Once the guess is right this lands
on the optimum at once instead of crawling along the ill-conditioned directions that kernel Grams of correlated
channels produce; the best point seen is kept only if it lowers ``F``, so the step never goes uphill. On real
ResNet-50 layers (c = 64 to 512) this takes 1 or 2 tests of 20 steps (27 of 32 layers stop at the first).

On CPU a batch is solved one problem at a time (``lax.map``) and each face solve gathers the support into the
smallest of ``c/8, c/4, c/2, c`` rows that holds it; accelerators vmap the batch and solve full-size masked systems.

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

from jax.sharding import PartitionSpec as P

from hsic_jax import _checks, _sharding
from hsic_jax.problem import LassoProblem

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


def _penalty(beta, positive):
  return jnp.sum(beta, -1) if positive else jnp.sum(jnp.abs(beta), -1)


@_checks.highest_precision
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


def _masked_solve(quad, rhs, m):
  face = quad * (m[:, None] * m[None, :]) + jnp.diag(1.0 - m)
  return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(face, lower=True), m * rhs) * m


def _face_solve(quad, rhs, mask, compact):
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
    sol = _face_solve(quad, lin - lam * sign, mask, compact)
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
def _solve_one(quad, lin, const, lipschitz, lam, init, tol, max_iter, check_every, positive, compact=False):
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


@functools.partial(jax.jit, static_argnames=("max_iter", "check_every", "positive", "strategy"))
def _solve(problem, lam, init, tol, max_iter, check_every, positive, strategy):
  """Solves a batch of problems (any leading axes, broadcast against ``lam``) in one call (see the module doc)."""
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
    args, axes = args + (lam_b,), axes + (0,)
    call = lambda a, b, k, l, m, compact=False: fn(a, b, k, l, m, None, compact=compact)
  else:
    args, axes = args + (lam_b, init_b), axes + (0, 0)
    call = fn
  if strategy == "loop":
    mapped = [i for i, ax in enumerate(axes) if ax is not None]  # the rest (a path's shared Q) is closed over

    def one(xs):
      full = list(args)
      for i, x in zip(mapped, xs):
        full[i] = x
      return call(*full, compact=True)

    out = jax.lax.map(one, [args[i] for i in mapped])
  else:
    out = jax.vmap(call, in_axes=axes)(*args)
  return jax.tree.map(lambda a: a.reshape(batch + a.shape[1:]), out)


def batch_specs(axes) -> tuple[LassoProblem, LassoResult]:
  """``PartitionSpec`` trees of a stacked problem and of its result, split over ``axes`` along the batch."""
  row, mat = P(axes), P(axes, None)
  return LassoProblem(P(axes, None, None), mat, row, row, row), LassoResult(mat, mat, row, row, row, row, row)


@functools.partial(jax.jit, static_argnames=("max_iter", "check_every", "positive", "strategy", "mesh", "axes"))
def _solve_split(problem, lam, init, tol, max_iter, check_every, positive, strategy, mesh, axes):
  """:func:`_solve` on each device's shard of a stack split over ``axes`` (``lam`` and ``init`` one per problem)."""
  p_spec, r_spec = batch_specs(axes)
  local = lambda p, l, i, t: _solve(p, l, i, t, max_iter, check_every, positive, strategy)  # noqa: E731
  return jax.shard_map(local, mesh=mesh, in_specs=(p_spec, P(axes), P(axes, None), P()), out_specs=r_spec,
                       check_vma=False)(problem, lam, init, tol)


@functools.partial(jax.jit, static_argnames=("max_iter", "check_every", "positive", "strategy", "mesh", "axes"))
def _path_split(problem, lam, init, tol, max_iter, check_every, positive, strategy, mesh, axes):
  """:func:`_solve` of one problem (replicated) at each device's share of penalties split over ``axes``."""
  _, r_spec = batch_specs(axes)
  local = lambda p, l, i, t: _solve(p, l, i, t, max_iter, check_every, positive, strategy)  # noqa: E731
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P(axes, None), P()), out_specs=r_spec,
                       check_vma=False)(problem, lam, init, tol)


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


def solve(
    problem: LassoProblem,
    lam: Float[ArrayLike, "*b"],
    *,
    positive: bool = True,
    init: Float[ArrayLike, "*b c"] | None = None,
    tol: float | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    check_every: int = CHECK_EVERY,
    strategy: str | None = None,
    check: bool = True,
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
    strategy: ``"loop"`` (problems of a batch one after another, with compact active-set solves: fastest on CPUs)
      or ``"vmap"`` (side by side: accelerators); default from where ``problem``'s arrays live.
    check: check that the problem, ``lam`` and ``init`` are finite first (waits for them to be computed);
      ``False`` for a problem the caller has validated (e.g. built with the default ``check=True``), so that a loop
      of solves can dispatch without waiting.

  Returns:
    A :class:`LassoResult` with the problem's and ``lam``'s broadcast batch shape. A float16 or bfloat16 problem is
    solved (and its result returned) in float32.
  """
  check_problem(problem, values=check)
  problem = widen(problem)
  if check:
    _checks.check_nonnegative_scalar("lam", lam)
  try:
    jnp.broadcast_shapes(problem.lin.shape[:-1], jnp.shape(lam))
  except ValueError as err:
    raise ValueError(f"lam of shape {jnp.shape(lam)} does not broadcast against the problem's batch shape "
                     f"{problem.lin.shape[:-1]}: pass a scalar, one lam per problem, a grid for one "
                     "problem, or for a batch of b problems a (g, 1) grid (g penalties for each of them).") from err
  tol = resolve_tol(tol, problem.lin.dtype)
  max_iter = _checks.check_count("max_iter", max_iter, 1)
  check_every = _checks.check_count("check_every", check_every, 1)
  if init is not None:
    init = jnp.asarray(init, problem.lin.dtype)
    if check:
      _checks.check_finite("init", init)
    if init.shape[-1] != problem.num_channels:
      raise ValueError(f"init must have {problem.num_channels} coefficients on its last axis, got shape {init.shape}.")
  strategy = _checks.strategy_for(problem.quad, strategy=strategy)
  lam = jnp.asarray(lam, problem.lin.dtype)
  split = _sharding.split_axis(problem.quad, 0) if problem.lin.ndim == 2 else None
  if split is not None and lam.ndim <= 1 and lam.size in (1, problem.lin.shape[0]):
    # A stack split over a mesh: every device solves its own problems; the result stays split.
    b, c = problem.lin.shape
    mesh, axes = split
    place = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    lam_b = place(jnp.broadcast_to(lam, (b,)), P(axes))
    init_b = place(jnp.zeros((b, c), problem.lin.dtype) if init is None else jnp.broadcast_to(init, (b, c)),
                   P(axes, None))
    return _solve_split(problem, lam_b, init_b, tol, max_iter, check_every, bool(positive), strategy, mesh, axes)
  path_split = _sharding.split_axis(lam, 0) if problem.lin.ndim == 1 and lam.ndim == 1 else None
  if path_split is not None:
    # A path whose penalties are split over a mesh: every device solves its own penalties; the result stays split.
    mesh, axes = path_split
    g, c = lam.shape[0], problem.num_channels
    init_g = jnp.zeros((g, c), problem.lin.dtype) if init is None else jnp.broadcast_to(init, (g, c))
    init_g = jax.device_put(init_g, jax.sharding.NamedSharding(mesh, P(axes, None)))
    return _path_split(problem, lam, init_g, tol, max_iter, check_every, bool(positive), strategy, mesh, axes)
  return _solve(problem, lam, init, tol, max_iter, check_every, bool(positive), strategy)


def lambda_max(problem: LassoProblem, *, positive: bool = True) -> Float[Array, "*b"]:
  """Smallest ``lam`` at which ``beta = 0`` is optimal: ``max(0, max_k q_k)``, or ``max_k |q_k|`` if signed.

  ``beta = 0`` is optimal iff the gradient there, ``-q + lam``, satisfies the KKT conditions: ``-q_k + lam >= 0``
  for all ``k`` (nonnegative) or ``|q_k| <= lam`` (signed).
  """
  check_problem(problem)
  problem = widen(problem)
  if positive:
    return jnp.maximum(jnp.max(problem.lin, axis=-1), 0.0)
  return jnp.max(jnp.abs(problem.lin), axis=-1)
