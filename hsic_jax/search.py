"""One global HSIC Lasso penalty for every pruning decision, searched so that a cost of the widths hits a target.

APIB solves one HSIC Lasso problem per decision (a layer's candidate input channels) at a single penalty ``lam``
shared by all of them, so that layers compete on one scale (``lam`` is a threshold on ``q_k = <K̄_k, L̄>``). Each
decision ``d`` keeps ``k_d(lam)`` channels:

- the support of its solution at ``lam``, or, where that holds fewer than ``omega`` channels, the first ``omega``
  channels to enter its path (found once by :func:`hsic_jax.select_k`, since they do not depend on ``lam``);
- rounded up to a multiple of ``multiple`` (never past the layer's size), the extra channels taken in order of
  ``|beta|`` and then of relevance ``q``.

The widths set the cost (MACs or params, computed by the caller's ``cost`` function, which knows the
architecture); the search finds ``lam`` with ``|cost - target| <= tolerance * target``:

1. one batched solve over a log-spaced grid of penalties from ``max_d lambda_max(d)`` down, every decision at every
   grid point in a single compiled call;
2. bisection between the two grid points that bracket the target, every decision solved in one batched call per
   step, warm-started, and capped at ``max_steps``;
3. where a jump of the step function ``cost(lam)`` crosses the whole band (widths move in multiples), a greedy
   fill from the widest point under the target adds one multiple at a time to the decision whose next channel is
   most relevant, while the cost stays at most ``target * (1 + tolerance)``.

Every point evaluated is recorded in the trace.

>>> import numpy as np, hsic_jax as hj
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(64, 8, 2)).astype(np.float32)
>>> y = np.concatenate([np.sin(x[:, 0]), x[:, 1] ** 2, x[:, 2]], 1)
>>> problems = [hj.problem_from_features(x, y), hj.problem_from_features(x[:, :6], y)]
>>> res = global_lambda_search(problems, lambda w: {"channels": float(sum(w))}, target=6.0, key="channels")
>>> int(sum(res.widths)), res.within_tolerance
(6, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hsic_jax import _checks, _floor
from hsic_jax import problem as problem_lib
from hsic_jax import selection, solver
from hsic_jax.problem import LassoProblem

CostFn = Callable[[Sequence[int]], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class SearchPoint:
  """One evaluated penalty: the widths it gives and their costs (every key the cost function returns)."""

  lam: float
  widths: tuple[int, ...]
  costs: Mapping[str, float]
  phase: str  # "grid", "bisect", "fill" or "bound"

  def to_dict(self) -> dict[str, Any]:
    return {"lambda": self.lam, "widths": list(self.widths), **{k: float(v) for k, v in self.costs.items()},
            "phase": self.phase}


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """The outcome of :func:`global_lambda_search`.

  Attributes:
    lam: the penalty of the chosen point (of the last lambda point before a fill).
    widths: kept channels per decision.
    keep: kept channel indices per decision (sorted), ``len(keep[d]) == widths[d]``.
    costs: the cost function's values at ``widths``.
    target: the target value of ``costs[key]``.
    key: the cost that was targeted.
    within_tolerance: whether ``|costs[key] - target| <= tolerance * target``.
    trace: every point evaluated, in order.
    reachable: ``(lowest, highest)`` cost the search could reach (every decision at ``omega`` / at ``lam = 0``).
  """

  lam: float
  widths: tuple[int, ...]
  keep: tuple[np.ndarray, ...]
  costs: Mapping[str, float]
  target: float
  key: str
  within_tolerance: bool
  trace: tuple[SearchPoint, ...]
  reachable: tuple[float, float]


def _order(beta: np.ndarray, lin: np.ndarray) -> np.ndarray:
  """Channels of one decision ranked by ``|beta|`` then ``q`` (descending)."""
  return np.lexsort((-lin, -np.abs(beta)))


Solution = tuple[list[np.ndarray], list[np.ndarray]]  # per decision: selected mask (c_d,), beta (c_d,)


class _Decisions:
  """The decisions' problems stacked by width, solved together, and their solutions turned into widths and keep sets
  (omega floor, rounding to a multiple).

  Problems of one width share a stack: no decision is padded to a wider one (on CPU a padded problem costs what
  the widest does), and there are as many solver calls per penalty as distinct widths (4 for ResNet-50), never one
  per layer.
  """

  def __init__(self, problems: Sequence[LassoProblem], omega: np.ndarray, multiple: int, positive: bool,
               tol: float | None, max_iter: int, bucket: bool | None):
    self.sizes = np.asarray([p.num_channels for p in problems], np.int64)
    self.lin = [np.asarray(p.lin) for p in problems]
    self.omega = np.minimum(omega, self.sizes)
    self.multiple = multiple
    self.positive, self.tol, self.max_iter = positive, tol, max_iter
    if bucket is None:
      bucket = _bucket_by_default(self.sizes, _checks.strategy_for(*(p.quad for p in problems)))
    self.buckets: list[tuple[np.ndarray, LassoProblem]] = []
    groups = [np.flatnonzero(self.sizes == c) for c in sorted(set(self.sizes.tolist()))] if bucket else \
        [np.arange(len(problems))]
    for idx in groups:
      stacked, _ = problem_lib.stack_problems([problems[i] for i in idx])
      self.buckets.append((idx, stacked))
    self.top = max(float(np.max(np.asarray(solver.lambda_max(st, positive=positive)))) for _, st in self.buckets)
    floor_sel: list[np.ndarray] = [np.empty(0)] * len(problems)
    floor_beta: list[np.ndarray] = [np.empty(0)] * len(problems)
    # Problems were validated once (_as_list): every stack is dispatched before any result is read back.
    floors = [(idx, selection.select_k(st, self.omega[idx].astype(np.int32), widths=self.sizes[idx].astype(np.int32),
                                       positive=positive, tol=tol, max_iter=max_iter, check=False))
              for idx, st in self.buckets]
    for idx, k in floors:
      sel, beta = np.asarray(k.selected), np.asarray(k.result.beta)
      for j, d in enumerate(idx):
        c = int(self.sizes[d])
        floor_sel[d], floor_beta[d] = sel[j, :c], beta[j, :c]
    self.floor: Solution = (floor_sel, floor_beta)

  def solve(self, lams: np.ndarray, init: Solution | None = None) -> list[Solution]:
    """Every decision at every penalty of ``lams``: one batched call per width, warm-started from ``init``."""
    g = len(lams)
    sel = [[np.empty(0)] * len(self.sizes) for _ in range(g)]
    beta = [[np.empty(0)] * len(self.sizes) for _ in range(g)]
    results = []
    for idx, st in self.buckets:  # every stack dispatched before any result is read back
      lam_arr = jnp.asarray(lams, st.lin.dtype)[:, None]
      c_max = st.num_channels
      warm = None if init is None else jnp.asarray(np.stack([np.pad(init[1][d], (0, c_max - init[1][d].size))
                                                             for d in idx]))[None]
      results.append((idx, solver.solve(st, lam_arr, positive=self.positive, init=warm, tol=self.tol,
                                        max_iter=self.max_iter, check=False)))
    for idx, res in results:
      s_arr, b_arr = np.asarray(res.selected), np.asarray(res.beta)
      for i in range(g):
        for j, d in enumerate(idx):
          c = int(self.sizes[d])  # a padded stack's padding is never selected
          sel[i][d], beta[i][d] = s_arr[i, j, :c], b_arr[i, j, :c]
    return [(sel[i], beta[i]) for i in range(g)]

  def round(self, k: int, d: int) -> int:
    size = int(self.sizes[d])
    return min(size, self.multiple * math.ceil(max(int(k), 1) / self.multiple))

  def widths_of(self, solution: Solution) -> tuple[int, ...]:
    return tuple(self.round(max(int(s.sum()), int(o)), d) for d, (s, o) in enumerate(zip(solution[0], self.omega)))

  def keep_of(self, solution: Solution, widths: Sequence[int]) -> tuple[np.ndarray, ...]:
    keep = []
    for d, w in enumerate(widths):
      sel, b = solution[0][d], solution[1][d]
      if sel.sum() < self.omega[d]:
        sel, b = self.floor[0][d], self.floor[1][d]
      # Selected channels first, then the rest by |beta| and relevance: rounding up takes the next best ones.
      ranked = _order(b, self.lin[d])
      ranked = np.concatenate([ranked[sel[ranked]], ranked[~sel[ranked]]])
      keep.append(np.sort(ranked[:w]))
    return tuple(keep)


# Stacks by width pay when padding would at least triple the work of a one-at-a-time (CPU) solve, whose steps cost
# about c^2 each: ResNet-50's 32 decisions (c = 64 to 512) cost 3.3x padded; ResNet-56's (16 to 64) 2.3x. Each
# stack is compiled on its own, so fewer stacks compile faster: by width, a search runs faster warm and slower cold.
BUCKET_WORK_RATIO = 3.0


def _bucket_by_default(sizes: np.ndarray, strategy: str) -> bool:
  if strategy != "loop":
    return False  # vmapped: the padded problems of a stack run side by side
  padded = len(sizes) * float(np.max(sizes)) ** 2
  return padded > BUCKET_WORK_RATIO * float(np.sum(sizes.astype(np.float64) ** 2))


def _as_list(problems: Any) -> list[LassoProblem]:
  """The single-layer problems, from a list or from ``(stacked, sizes)`` as :func:`hsic_jax.stack_problems` gives
  them (the padding is cut off: zero padding changes neither the solutions nor the Lipschitz bound)."""
  if isinstance(problems, tuple) and len(problems) == 2 and isinstance(problems[0], LassoProblem):
    stacked, sizes = problems
    solver.check_problem(stacked, "problems")
    if stacked.lin.ndim != 2:
      raise ValueError(f"problems must be a stack of single-layer problems, got q of shape {stacked.lin.shape}")
    return [LassoProblem(stacked.quad[i, :c, :c], stacked.lin[i, :c], stacked.const[i], stacked.lipschitz[i],
                         stacked.rows[i]) for i, c in enumerate(np.asarray(sizes).tolist())]
  problem_lib._check_unbatched(problems, "global_lambda_search")  # pylint: disable=protected-access
  for i, p in enumerate(problems):
    solver.check_problem(p, f"problems[{i}]")
  return list(problems)


def _check_target(costs_lo: Mapping[str, float], costs_hi: Mapping[str, float], key: str, target: float,
                  tolerance: float) -> None:
  lo, hi = float(costs_lo[key]), float(costs_hi[key])
  if target < lo * (1 - tolerance) or target > hi * (1 + tolerance):
    raise ValueError(f"target {key} {target:,.0f} is outside what the search can reach: {lo:,.0f} (every decision "
                     f"at its minimum width) to {hi:,.0f} (the widest solution, at lam = 0); expected a target in "
                     f"that range (as a ratio of the widest: {lo / hi:.4f} to 1)")


def global_lambda_search(
    problems: Sequence[LassoProblem] | tuple[LassoProblem, Any],
    cost: CostFn,
    target: float,
    *,
    key: str = "macs",
    tolerance: float = 0.01,
    omega: int | float | Sequence[int] = 1,
    multiple: int = 1,
    positive: bool = True,
    grid: int = 24,
    max_steps: int = 40,
    tol: float | None = None,
    max_iter: int = solver.DEFAULT_MAX_ITER,
    fill: bool = True,
    bucket: bool | None = None,
    progress: Callable[[SearchPoint], None] | None = None,
) -> SearchResult:
  """Finds one penalty for all decisions whose widths make ``cost(widths)[key]`` hit ``target``.

  Args:
    problems: one :class:`~hsic_jax.LassoProblem` per decision, or ``(stacked, sizes)`` as
      :func:`~hsic_jax.stack_problems` returns them.
    cost: widths (kept channels per decision, in the order of ``problems``) -> ``{name: value}``, e.g. MACs and
      params of the model built with them; must be increasing in every width for the search to be meaningful.
    target: the value of ``cost(...)[key]`` to reach.
    key: which cost to target.
    tolerance: relative band around the target.
    omega: minimum channels per decision (the first ``omega`` to enter each path): a count ``>= 1``, a fraction
      in ``(0, 1)`` of each decision's width (``ceil(omega * c_d)``), or one count per decision
      (:func:`hsic_jax.min_widths`).
    multiple: round every width up to a multiple of this (capped at the decision's size).
    positive: nonnegative HSIC Lasso (default) or the signed Lasso of APIB's reference code.
    grid: number of log-spaced penalties in the first, batched pass (plus ``lam = 0``).
    max_steps: cap on bisection steps.
    tol, max_iter: solver settings.
    fill: allow the greedy fill (step 3 of the module docstring) when bisection cannot land in the band.
    bucket: stack the decisions by width (one solver call per distinct width) instead of zero-padding them all
      to the widest (one call); default: by width on CPU when padding would triple the work
      (:data:`BUCKET_WORK_RATIO`), one stack on accelerators.
    progress: called with every evaluated point (e.g. to advance a progress bar).

  Returns:
    A :class:`SearchResult`. When the band cannot be reached, the point nearest to the target from below is
    returned with ``within_tolerance=False``.

  Raises:
    ValueError: no problems, a bad argument, or a target outside the reachable range (the message gives it).
  """
  problems = _as_list(problems)
  omega = _floor.min_widths(omega, [p.num_channels for p in problems])
  for name, value, low in (("multiple", multiple, 1), ("grid", grid, 2),
                           ("max_steps", max_steps, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
    raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
  if not (isinstance(target, (int, float, np.number)) and math.isfinite(target) and target > 0):
    raise ValueError(f"target must be a finite number > 0, got {target!r}")
  target = float(target)
  dec = _Decisions(problems, omega, int(multiple), positive, tol, max_iter, bucket)
  trace: list[SearchPoint] = []
  solved: dict[float, Solution] = {}

  def evaluate(lams: np.ndarray, phase: str, init: Solution | None = None) -> list[SearchPoint]:
    points = []
    for lam, solution in zip(np.asarray(lams, np.float64), dec.solve(lams, init)):
      widths = dec.widths_of(solution)
      point = SearchPoint(float(lam), widths, dict(cost(widths)), phase)
      solved[point.lam] = solution
      trace.append(point)
      points.append(point)
      if progress is not None:
        progress(point)
    return points

  def value(p: SearchPoint) -> float:
    return float(p.costs[key])

  def within(p: SearchPoint) -> bool:
    return abs(value(p) - target) <= tolerance * target

  top = dec.top
  if top <= 0:
    raise ValueError("no decision has a channel with positive relevance q (every layer's output is constant on the "
                     "calibration data); expected features that vary")
  floor_widths = tuple(dec.round(int(o), d) for d, o in enumerate(dec.omega))
  floor = SearchPoint(top, floor_widths, dict(cost(floor_widths)), "bound")
  lams = np.concatenate([top * np.logspace(0.0, -6.0, grid), [0.0]])
  points = evaluate(lams, "grid")
  _check_target(floor.costs, points[-1].costs, key, target, tolerance)
  reachable = (value(floor), value(points[-1]))

  best = None
  inside = [p for p in points if within(p)]
  if inside:
    best = min(inside, key=lambda p: abs(value(p) - target))
  else:
    # Penalties decrease along the grid, so costs (mostly) increase: the bracket is the first point above target.
    above = next(i for i, p in enumerate(points) if value(p) > target)
    hi_p = points[above - 1] if above > 0 else floor  # cost <= target (larger lam)
    lo_p = points[above]  # cost > target (smaller lam)
    for _ in range(max_steps):
      if hi_p.lam - lo_p.lam <= 1e-7 * top:
        break
      mid = 0.5 * (hi_p.lam + lo_p.lam)
      p = evaluate(np.array([mid]), "bisect", solved.get(lo_p.lam))[0]
      if within(p):
        best = p
        break
      if value(p) > target:
        lo_p = p
      else:
        hi_p = p
    if best is None:
      below = [p for p in trace if value(p) <= target] or [floor]
      best = max(below, key=value)
  solution = dec.floor if best is floor or best.lam not in solved else solved[best.lam]
  widths = list(best.widths)
  keep = list(dec.keep_of(solution, widths))

  if not within(best) and fill:
    widths, keep, best = _fill(dec, widths, keep, best, cost, key, target, tolerance, trace, progress)
  return SearchResult(best.lam, tuple(widths), tuple(keep), dict(best.costs), target, key, within(best),
                      tuple(trace), reachable)


def _fill(dec: _Decisions, widths, keep, best, cost, key, target, tolerance, trace, progress):
  """Greedy fill toward the target from below: one multiple at a time to the decision whose next channel is the
  most relevant (``q`` of the next unkept channel, relative to the decision's top ``q``), while in budget."""
  limit = target * (1 + tolerance)
  current = best
  while abs(float(current.costs[key]) - target) > tolerance * target:
    candidates = []
    for d, w in enumerate(widths):
      size = int(dec.sizes[d])
      if w >= size:
        continue
      lin = dec.lin[d]
      rest = np.setdiff1d(np.arange(size), keep[d])
      score = float(np.max(lin[rest])) / max(float(np.max(lin)), 1e-30)
      candidates.append((score, d))
    grown = False
    for _, d in sorted(candidates, reverse=True):
      trial = list(widths)
      trial[d] = min(int(dec.sizes[d]), widths[d] + dec.multiple)
      costs = dict(cost(trial))
      if float(costs[key]) <= limit:
        widths = trial
        keep[d] = _extend(dec, d, keep[d], trial[d])
        current = SearchPoint(best.lam, tuple(widths), costs, "fill")
        trace.append(current)
        if progress is not None:
          progress(current)
        grown = True
        break
    if not grown:
      break
  return widths, keep, current


def _extend(dec: _Decisions, d: int, kept: np.ndarray, width: int) -> np.ndarray:
  """``kept`` plus the most relevant unkept channels of decision ``d``, up to ``width``."""
  lin = dec.lin[d]
  rest = np.setdiff1d(np.arange(int(dec.sizes[d])), kept)
  extra = rest[np.argsort(-lin[rest], kind="stable")][:width - kept.size]
  return np.sort(np.concatenate([kept, extra]))
