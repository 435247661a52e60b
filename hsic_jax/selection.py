"""Channel selection by HSIC Lasso: the public primitives built on the problem builders and the solver."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jax.sharding import PartitionSpec as P

from hsic_jax import _checks, _fill, _fista, _lasso, _sharding
from hsic_jax import problem as problem_lib
from hsic_jax import solver
from hsic_jax._fista import LassoResult
from hsic_jax._gram import Bandwidth
from hsic_jax._lasso import LassoProblem

__all__ = [
    "FILLS",
    "KSelection",
    "lambda_grid",
    "lasso_path",
    "lasso_select",
    "lasso_select_features",
    "select_k",
]


def lasso_select(
    gram_x: Float[ArrayLike, "c n n"],
    gram_y: Float[ArrayLike, "n n"],
    lam: float,
    *,
    normalized: bool = False,
    positive: bool = True,
    tol: float | None = None,
    max_iter: int = _fista.DEFAULT_MAX_ITER,
    dtype=jnp.float32,
) -> LassoResult:
  """Selects the input channels whose Gram matrices best explain the output Gram, by nonnegative HSIC Lasso.

  Solves ``min_{beta >= 0} 1/2 ||vec(L̄) - sum_k beta_k vec(K̄_k)||^2 + lam sum_k beta_k`` where ``K̄_k = H K_k H``
  and ``L̄ = H L H`` are centered by this function: pass **raw** Gram matrices (centered ones work too, centering
  being idempotent). scikit-learn's ``Lasso(alpha=lam / n**2, positive=True, fit_intercept=False)`` on the
  ``n^2``-row design solves the same problem. ``lam >= lambda_max = max_k <K̄_k, L̄>`` selects nothing.

  Args:
    gram_x: ``(c, n, n)`` per-channel Gram matrices.
    gram_y: ``(n, n)`` output Gram matrix.
    lam: penalty ``>= 0`` on the scale above (``tr(K̄ L̄)`` units).
    normalized: Frobenius-normalise each centered Gram first (pyHSICLasso); APIB does not.
    positive: ``False`` reproduces the APIB reference's signed Lasso (a channel is kept if ``beta != 0``).
    tol: relative duality-gap tolerance (default 1e-5 in float32, 1e-9 in float64).
    max_iter: iteration cap.
    dtype: float32 (default) or float64 (needs ``jax.enable_x64``); float16 and bfloat16 are computed (and
      returned) in float32.

  Returns:
    :class:`LassoResult`: ``beta`` (c,), ``selected`` (c,) mask, ``objective``, ``gap``, ``iterations``, ...

  >>> import numpy as np
  >>> rng = np.random.default_rng(0)
  >>> x = rng.normal(size=(64, 3, 1)).astype(np.float32)
  >>> y = x[:, 0] ** 2  # depends on channel 0 only
  >>> from hsic_jax import channel_grams, gaussian_gram
  >>> res = lasso_select(channel_grams(x, bandwidth=1.0), gaussian_gram(y, bandwidth=1.0), lam=50.0)
  >>> res.indices().tolist()
  [0]
  """
  p = problem_lib.problem_from_grams(gram_x, gram_y, normalized=normalized, dtype=dtype)
  return solver.solve(p, lam, positive=positive, tol=tol, max_iter=max_iter)


def lasso_select_features(
    x: Float[ArrayLike, "n c d"],
    y: ArrayLike,
    lam: float,
    *,
    bandwidth: Bandwidth = "apib",
    y_kernel: str = "gaussian",
    y_bandwidth: Bandwidth | None = None,
    normalized: bool = False,
    positive: bool = True,
    tol: float | None = None,
    max_iter: int = _fista.DEFAULT_MAX_ITER,
    dtype=jnp.float32,
) -> LassoResult:
  """:func:`lasso_select` starting from features ``x`` (n, c, d) and a target ``y`` (features or labels).

  The Grams are built blockwise (see :func:`hsic_jax.problem_from_features`), so a layer with ``n = 1024`` and
  ``c = 512`` stays within a few hundred MB.
  """
  p = problem_lib.problem_from_features(x, y, bandwidth=bandwidth, y_kernel=y_kernel, y_bandwidth=y_bandwidth,
                                        normalized=normalized, dtype=dtype)
  return solver.solve(p, lam, positive=positive, tol=tol, max_iter=max_iter)


def _check_ratio(ratio) -> float:
  try:
    value = float(ratio)
  except (TypeError, ValueError) as err:
    raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}.") from err
  if not 0 < value < 1:
    raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}.")
  return value


def lambda_grid(problem: LassoProblem, *, num: int = 50, ratio: float = 1e-3,
                positive: bool = True) -> Float[Array, " num"]:
  """Log-spaced penalties from ``lambda_max`` down to ``ratio * lambda_max`` (unbatched problem; a float16 or
  bfloat16 one gives float32 penalties, as it is solved in float32)."""
  num = _checks.check_count("num", num, 1)
  ratio = _check_ratio(ratio)
  _lasso.check_problem(problem)
  if problem.lin.ndim != 1:
    raise ValueError(f"lambda_grid takes one unbatched problem; got q of shape {tuple(problem.lin.shape)}.")
  problem = _lasso.widen(problem)
  top = solver.lambda_max(problem, positive=positive)
  return top * jnp.logspace(0.0, np.log10(ratio), num, dtype=problem.lin.dtype)


def _check_lams(lams: ArrayLike) -> None:
  """ValueError unless ``lams`` is a non-empty 1-D array of finite penalties >= 0 (values checked when concrete)."""
  if not isinstance(lams, jax.Array):
    try:
      host = np.asarray(lams)
    except Exception as err:  # noqa: BLE001 - anything that is not array-like
      raise ValueError(f"lams must be a 1-D array of penalties >= 0, got {type(lams).__name__}.") from err
    if not (jnp.issubdtype(host.dtype, jnp.floating) or jnp.issubdtype(host.dtype, jnp.integer)):
      raise ValueError(f"lams must be a 1-D array of penalties >= 0, got {lams!r} (dtype {host.dtype}).")
    lams = host
  if jnp.ndim(lams) != 1 or jnp.shape(lams)[0] < 1:
    raise ValueError(f"lams must be a 1-D array of penalties >= 0 holding at least one, got shape "
                     f"{tuple(jnp.shape(lams))}.")
  _checks.check_nonnegative_scalar("lams", lams)


def lasso_path(
    problem: LassoProblem,
    lams: Float[ArrayLike, " l"] | None = None,
    *,
    num: int = 50,
    ratio: float = 1e-3,
    positive: bool = True,
    tol: float | None = None,
    max_iter: int = _fista.DEFAULT_MAX_ITER,
) -> LassoResult:
  """Solves one problem at a whole grid of penalties in one vmapped call.

  Args:
    problem: an unbatched :class:`LassoProblem`.
    lams: penalties ``>= 0``; by default :func:`lambda_grid` (``num`` values from ``lambda_max`` to ``ratio`` times
      it).
    num, ratio: the default grid's size (an integer >= 1) and range (in (0, 1)).
    positive, tol, max_iter: solver settings, as in :func:`hsic_jax.solve`.

  Returns:
    A :class:`LassoResult` with a leading axis over ``lams``. A float16 or bfloat16 problem is solved (and its
    result returned) in float32.
  """
  _lasso.check_problem(problem)
  if problem.lin.ndim != 1:
    raise ValueError(f"lasso_path takes one unbatched problem; got lin of shape {problem.lin.shape}.")
  problem = _lasso.widen(problem)
  if lams is None:
    lams = lambda_grid(problem, num=num, ratio=ratio, positive=positive)
  else:
    _check_lams(lams)
  return solver.solve(problem, jnp.asarray(lams, problem.lin.dtype), positive=positive, tol=tol, max_iter=max_iter)


FILLS = ("relevance", "residual")


class KSelection(NamedTuple):
  """Result of :func:`select_k`.

  Attributes:
    selected: boolean mask with exactly ``k`` True entries.
    lam: the penalty found by bisection.
    exact: whether the Lasso support at ``lam`` has exactly ``k`` channels. When False (ties, or ``k`` larger than
      any Lasso support), ``selected`` is the top ``k`` by coefficient magnitude, then by ``q`` (relevance), from
      the solution with more than ``k`` channels nearest to ``lam`` (or, when no solution tried had more, from the
      one with the most).
    result: the Lasso solution at ``lam``.
  """

  selected: Bool[Array, "*b c"]
  lam: Float[Array, "*b"]
  exact: Bool[Array, "*b"]
  result: LassoResult


def _top_k_mask(beta, lin, k, width):
  # Primary key: a true channel before padding; then coefficient magnitude (descending: the signed Lasso keeps
  # negative ones too); then relevance q (descending).
  padding = jnp.arange(beta.shape[0]) >= width
  order = jnp.lexsort((-lin, -jnp.abs(beta), padding))
  ranks = jnp.empty_like(order).at[order].set(jnp.arange(order.shape[0]))
  return ranks < k


def _select_k_one(quad, lin, const, lip, k, width, tol, max_iter, max_steps, positive, compact=False,
                  support_only=False):
  solve_at = functools.partial(_fista.solve_one, quad, lin, const, lip,
                               tol=tol, max_iter=max_iter, check_every=_fista.CHECK_EVERY, positive=positive,
                               compact=compact)
  top = jnp.maximum(jnp.max(lin) if positive else jnp.max(jnp.abs(lin)), 0.0)

  def count(res):
    return jnp.sum(res.selected)

  def better(res, best):
    # The fallback: the latest (nearest) solution with more than k channels; until there is one, the largest.
    return (count(res) > k) | ((count(best) <= k) & (count(res) >= count(best)))

  zero = jnp.zeros((), lin.dtype)
  # The solver appears once in the program: step 0 of the loop is the cold solve at top / 2 (from beta = 0), the
  # later steps bisect warm-started. A cold solve before the loop would trace and compile the solver twice.
  def cond(st):
    lo, hi, res, _, step = st
    return (step == 0) | ((count(res) != k) & (step <= max_steps) & (hi - lo > 1e-7 * top))

  def body(st):
    lo, hi, res, best, step = st
    started = step > 0
    cnt = count(res)
    lo = jnp.where(started & (cnt > k), res.lam, lo)
    hi = jnp.where(started & (cnt < k), res.lam, hi)
    best = jax.tree.map(lambda b, r: jnp.where(started & better(res, best), r, b), best, res)
    new = solve_at(0.5 * (lo + hi), jnp.where(started, res.beta, 0.0))
    return lo, hi, new, best, step + 1

  placeholder = LassoResult(jnp.zeros_like(lin), jnp.zeros(lin.shape, bool), zero, zero,  # replaced at step 0
                                   jnp.zeros((), jnp.int32), jnp.zeros((), bool), zero)
  lo, hi, res, best, _ = jax.lax.while_loop(cond, body, (zero, top, placeholder, placeholder,
                                                          jnp.zeros((), jnp.int32)))
  exact = count(res) == k
  fallback = jax.tree.map(lambda r, b: jnp.where(better(res, best), r, b), res, best)
  fallback_mask = _top_k_mask(fallback.beta, lin, k, width)
  if support_only:  # the fill beyond the support is left to the caller (fill="residual")
    fallback_mask = fallback_mask & (fallback.beta != 0)
  mask = jnp.where(exact, res.selected, fallback_mask)
  return KSelection(mask, res.lam, exact, res)


@functools.partial(jax.jit, static_argnames=("max_iter", "max_steps", "positive", "strategy", "support_only"))
def _select_k(problem, k, widths, tol, max_iter, max_steps, positive, strategy, support_only=False):
  fn = functools.partial(_select_k_one, tol=tol, max_iter=max_iter, max_steps=max_steps, positive=positive,
                         compact=strategy == "loop", support_only=support_only)
  args = (problem.quad, problem.lin, problem.const, problem.lipschitz, k, widths)
  return fn(*args) if problem.lin.ndim == 1 else _checks.map_batch(fn, args, strategy)


@functools.partial(jax.jit, static_argnames=("max_iter", "max_steps", "positive", "strategy", "mesh", "axes",
                                             "support_only"))
def _select_k_split(problem, k, widths, tol, max_iter, max_steps, positive, strategy, mesh, axes, support_only=False):
  """:func:`_select_k` on each device's shard of a stack split over ``axes``."""
  p_spec, r_spec = _fista.batch_specs(axes)
  row = P(axes)
  local = lambda p, kk, w, t: _select_k(p, kk, w, t, max_iter, max_steps, positive, strategy,  # noqa: E731
                                        support_only)
  return jax.shard_map(local, mesh=mesh, in_specs=(p_spec, row, row, P()),
                       out_specs=KSelection(P(axes, None), row, row, r_spec), check_vma=False)(problem, k, widths, tol)


def select_k(
    problem: LassoProblem,
    k: int | Int[ArrayLike, " b"],
    *,
    widths: Int[ArrayLike, " b"] | None = None,
    positive: bool = True,
    tol: float | None = None,
    max_iter: int = _fista.DEFAULT_MAX_ITER,
    max_steps: int = 60,
    strategy: str | None = None,
    check: bool = True,
    fill: str = "relevance",
) -> KSelection:
  """Keeps exactly ``k`` channels: bisection on ``lam`` in ``[0, lambda_max]`` until the support has ``k`` entries.

  Each bisection step warm-starts from the previous solution; the whole search is one compiled loop. A batch of
  problems (from :func:`hsic_jax.stack_problems`) takes one ``k`` per problem, and the true widths that
  :func:`~hsic_jax.stack_problems` returns with it, so that a padding channel is never among the ``k``.

  Args:
    problem: one problem, or a stacked batch.
    k: channels to keep, ``1 <= k <= width`` (per problem for a batch).
    widths: true number of channels of each problem of a zero-padded batch (default: all ``c``).
    positive: nonnegative (default) or signed Lasso.
    tol, max_iter: solver settings for every step (``tol > 0`` or None for the default, ``max_iter >= 1``).
    max_steps: cap on bisection steps (an integer >= 0).
    strategy: ``"loop"`` or ``"vmap"`` over a batch, as in :func:`hsic_jax.solve` (default: where the problem
      lives).
    check: check that the problem is finite first, as in :func:`hsic_jax.solve`.
    fill: how a ``k`` beyond every Lasso support tried is filled: ``"relevance"`` (default; by ``q``, as
      :class:`KSelection` says) or ``"residual"`` (greedy: the channel most correlated with the residual
      ``q - Q beta``, ``beta`` refitted by least squares on the kept set after each addition; see
      :mod:`hsic_jax._fill`). The residual fill runs on the host, in float64; its mask is not sharded.

  Returns:
    A :class:`KSelection`. A float16 or bfloat16 problem is solved (and its result returned) in float32.
  """
  _lasso.check_problem(problem, values=check)
  problem = _lasso.widen(problem)
  tol = _fista.resolve_tol(tol, problem.lin.dtype)
  max_iter = _checks.check_count("max_iter", max_iter, 1)
  max_steps = _checks.check_count("max_steps", max_steps, 0)
  c = problem.num_channels
  k_arr = np.asarray(k)
  if k_arr.shape != problem.lin.shape[:-1]:
    raise ValueError(f"k must have shape {problem.lin.shape[:-1]} (one per problem), got {k_arr.shape}.")
  if widths is None:
    widths_arr = np.full(k_arr.shape, c)
  else:
    widths_arr = np.asarray(widths)
    if (widths_arr.shape != k_arr.shape or not np.issubdtype(widths_arr.dtype, np.integer)
        or np.any(widths_arr < 1) or np.any(widths_arr > c)):
      raise ValueError(f"widths must be integers in [1, {c}] of shape {k_arr.shape} (one per problem, as "
                       f"stack_problems returns them), got {widths}.")
  if not np.issubdtype(k_arr.dtype, np.integer) or np.any(k_arr < 1) or np.any(k_arr > widths_arr):
    if k_arr.ndim == 0:
      raise ValueError(f"k must be an integer in [1, {int(widths_arr)}] (never an empty layer), got {k!r}.")
    raise ValueError(f"k must hold an integer in [1, width] per problem (never an empty layer, never more channels "
                     f"than it has), got k={k_arr.tolist()} for widths {widths_arr.tolist()}.")
  if fill not in FILLS:
    raise ValueError(f"fill must be one of {list(FILLS)}, got {fill!r}.")
  support_only = fill == "residual"
  strategy = _checks.strategy_for(problem.quad, strategy=strategy)
  k_j, widths_j, tol_j = (jnp.asarray(k_arr, jnp.int32), jnp.asarray(widths_arr, jnp.int32),
                          jnp.asarray(tol, problem.lin.dtype))
  split = _sharding.split_axis(problem.quad, 0) if problem.lin.ndim == 2 else None
  if split is not None:
    # A stack split over a mesh: every device selects in its own problems; the result stays split.
    mesh, axes = split
    place = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, P(axes)))  # noqa: E731
    out = _select_k_split(problem, place(k_j), place(widths_j), tol_j, max_iter, max_steps, bool(positive),
                          strategy, mesh, axes, support_only)
  else:
    out = _select_k(problem, k_j, widths_j, tol_j, max_iter, max_steps, bool(positive), strategy, support_only)
  if support_only:
    out = out._replace(selected=jnp.asarray(_fill.residual_masks(problem.quad, problem.lin, out.selected, k_arr,
                                                                 widths_arr)))
  return out
