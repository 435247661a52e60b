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
Cholesky solve), repeat until the guess repeats (at most ``_fista.MAX_NEWTON`` times). Once the guess is right this
lands on the optimum at once instead of crawling along the ill-conditioned directions that kernel Grams of correlated
channels produce; the best point seen is kept only if it lowers ``F``, so the step never goes uphill. On real
ResNet-50 layers (c = 64 to 512) this takes 1 or 2 tests of 20 steps (27 of 32 layers stop at the first).

On CPU a batch is solved one problem at a time (``lax.map``) and each face solve gathers the support into the
smallest of ``c/8, c/4, c/2, c`` rows that holds it; accelerators vmap the batch and solve full-size masked systems.

The loop stops when ``gap <= tol * F(beta)`` (``lam > 0``), or when the KKT residual (projected gradient,
sup-norm) is at most ``tol * max|q|`` (``lam = 0``, where the dual point degenerates), or after ``max_iter`` steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jax.sharding import PartitionSpec as P

from hsic_jax import _checks, _fista, _lasso, _sharding
from hsic_jax._fista import CHECK_EVERY, DEFAULT_MAX_ITER, LassoResult
from hsic_jax._lasso import LassoProblem

__all__ = [
    "CHECK_EVERY",
    "DEFAULT_MAX_ITER",
    "LassoResult",
    "lambda_max",
    "objective",
    "solve",
]


@_checks.highest_precision
def objective(problem: LassoProblem, beta, lam, *, positive: bool = True):
  """``F(beta)`` of the module docstring (traceable)."""
  qb = jnp.einsum("...ij,...j->...i", problem.quad, beta)
  smooth = 0.5 * jnp.sum(beta * qb, -1) - jnp.sum(problem.lin * beta, -1) + 0.5 * problem.const
  return smooth + lam * _fista.penalty(beta, positive)


@functools.partial(jax.jit, static_argnames=("max_iter", "check_every", "positive", "strategy"))
def _solve(problem, lam, init, tol, max_iter, check_every, positive, strategy):
  """Solves a batch of problems (any leading axes, broadcast against ``lam``) in one call (see the module doc)."""
  batch = jnp.broadcast_shapes(problem.lin.shape[:-1], jnp.shape(lam))
  c = problem.lin.shape[-1]
  fn = functools.partial(_fista.solve_one, tol=tol, max_iter=max_iter, check_every=check_every, positive=positive)
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


@functools.partial(jax.jit, static_argnames=("max_iter", "check_every", "positive", "strategy", "mesh", "axes"))
def _solve_split(problem, lam, init, tol, max_iter, check_every, positive, strategy, mesh, axes):
  """:func:`_solve` on each device's shard of a stack split over ``axes`` (``lam`` and ``init`` one per problem)."""
  p_spec, r_spec = _fista.batch_specs(axes)
  local = lambda p, l, i, t: _solve(p, l, i, t, max_iter, check_every, positive, strategy)  # noqa: E731
  return jax.shard_map(local, mesh=mesh, in_specs=(p_spec, P(axes), P(axes, None), P()), out_specs=r_spec,
                       check_vma=False)(problem, lam, init, tol)


@functools.partial(jax.jit, static_argnames=("max_iter", "check_every", "positive", "strategy", "mesh", "axes"))
def _path_split(problem, lam, init, tol, max_iter, check_every, positive, strategy, mesh, axes):
  """:func:`_solve` of one problem (replicated) at each device's share of penalties split over ``axes``."""
  _, r_spec = _fista.batch_specs(axes)
  local = lambda p, l, i, t: _solve(p, l, i, t, max_iter, check_every, positive, strategy)  # noqa: E731
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P(axes, None), P()), out_specs=r_spec,
                       check_vma=False)(problem, lam, init, tol)


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
  _lasso.check_problem(problem, values=check)
  problem = _lasso.widen(problem)
  if check:
    _checks.check_nonnegative_scalar("lam", lam)
  try:
    jnp.broadcast_shapes(problem.lin.shape[:-1], jnp.shape(lam))
  except ValueError as err:
    raise ValueError(f"lam of shape {jnp.shape(lam)} does not broadcast against the problem's batch shape "
                     f"{problem.lin.shape[:-1]}: pass a scalar, one lam per problem, a grid for one "
                     "problem, or for a batch of b problems a (g, 1) grid (g penalties for each of them).") from err
  tol = _fista.resolve_tol(tol, problem.lin.dtype)
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
  _lasso.check_problem(problem)
  problem = _lasso.widen(problem)
  if positive:
    return jnp.maximum(jnp.max(problem.lin, axis=-1), 0.0)
  return jnp.max(jnp.abs(problem.lin), axis=-1)
