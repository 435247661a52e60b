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

The steps are ``_grid``, ``_bisect`` (the shared :func:`hsic_jax.budget.bisect`) and ``_fill``, sharing one trace
of every point evaluated (``_Trace``); the result is a :class:`hsic_jax.budget.BudgetResult`.

>>> import numpy as np, hsic_jax as hj
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(64, 8, 2)).astype(np.float32)
>>> y = np.concatenate([np.sin(x[:, 0]), x[:, 1] ** 2, x[:, 2]], 1)
>>> problems = [hj.problem_from_features(x, y), hj.problem_from_features(x[:, :6], y)]
>>> res = global_lambda_search(problems, lambda w: {"channels": float(sum(w))}, target=6.0, key="channels")
>>> int(sum(res.widths)), res.reached
(6, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from hsic_jax import _checks, _lasso
from hsic_jax import problem as problem_lib
from hsic_jax import selection, solver
from hsic_jax._budget import BudgetPoint, BudgetResult, CostFn, bisect, check_count, check_reachable, check_target
from hsic_jax._budget import check_tolerance, costs_at, min_widths, round_width, within
from hsic_jax.problem import LassoProblem

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
    return round_width(k, int(self.sizes[d]), multiple=self.multiple)

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
    _lasso.check_problem(stacked, "problems")
    if stacked.lin.ndim != 2:
      raise ValueError(f"problems must be a stack of single-layer problems, got q of shape {stacked.lin.shape}")
    return [LassoProblem(stacked.quad[i, :c, :c], stacked.lin[i, :c], stacked.const[i], stacked.lipschitz[i],
                         stacked.rows[i]) for i, c in enumerate(np.asarray(sizes).tolist())]
  _lasso.check_unbatched(problems, "global_lambda_search")
  for i, p in enumerate(problems):
    _lasso.check_problem(p, f"problems[{i}]")
  return list(problems)


@dataclasses.dataclass
class _Trace:
  """Every point the search evaluates, in order, with the solution behind each: what the grid, bisect and fill steps
  share."""

  dec: _Decisions
  cost: CostFn
  key: str
  target: float
  tolerance: float
  progress: Callable[[BudgetPoint], None] | None
  points: list[BudgetPoint] = dataclasses.field(default_factory=list)
  solved: dict[float, Solution] = dataclasses.field(default_factory=dict)

  def value(self, p: BudgetPoint) -> float:
    return p.costs[self.key]

  def within(self, p: BudgetPoint) -> bool:
    return within(self.value(p), self.target, self.tolerance)

  def costs(self, widths: Sequence[int]) -> dict[str, float]:
    return costs_at(self.cost, widths, (self.key,))

  def add(self, point: BudgetPoint) -> BudgetPoint:
    self.points.append(point)
    if self.progress is not None:
      self.progress(point)
    return point

  def evaluate(self, lams: np.ndarray, phase: str, init: Solution | None = None) -> list[BudgetPoint]:
    """Every decision solved at every penalty of ``lams`` (batched), each penalty's widths costed and recorded."""
    points = []
    for lam, solution in zip(np.asarray(lams, np.float64), self.dec.solve(lams, init)):
      widths = self.dec.widths_of(solution)
      point = BudgetPoint(float(lam), widths, self.costs(widths), phase)
      self.solved[point.value] = solution
      points.append(self.add(point))
    return points


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
    progress: Callable[[BudgetPoint], None] | None = None,
) -> BudgetResult:
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
    A :class:`~hsic_jax.budget.BudgetResult` (``method="lambda_search"``, ``value`` the penalty of the chosen point,
    of the last lambda point before a fill; ``keep`` the kept channels; ``trace`` every point, the phase of each
    ``"grid"``, ``"bisect"`` or ``"fill"``). When the band cannot be reached, the point nearest to the target from
    below is returned with ``reached=False``.

  Raises:
    ValueError: no problems, a bad argument, or a target outside the reachable range (the message gives it).
  """
  problems = _as_list(problems)
  omega = min_widths(omega, [p.num_channels for p in problems])
  multiple = check_count("multiple", multiple, 1)
  grid, max_steps = check_count("grid", grid, 2), check_count("max_steps", max_steps, 0)
  tolerance, target = check_tolerance(tolerance), check_target(target)
  dec = _Decisions(problems, omega, multiple, positive, tol, max_iter, bucket)
  trace = _Trace(dec, cost, key, target, tolerance, progress)
  floor, points = _grid(trace, grid)
  inside = [p for p in points if trace.within(p)]
  if inside:
    best = min(inside, key=lambda p: abs(trace.value(p) - target))
  else:
    best = _bisect(trace, floor, points, max_steps)
  solution = dec.floor if best is floor or best.value not in trace.solved else trace.solved[best.value]
  keep = list(dec.keep_of(solution, best.widths))
  if not trace.within(best) and fill:
    best, keep = _fill(trace, best, keep)
  return BudgetResult("lambda_search", best.widths, dict(best.costs), key, target, trace.within(best),
                      (trace.value(floor), trace.value(points[-1])), tuple(trace.points), tuple(keep), best.value)


def _grid(trace: _Trace, grid: int) -> tuple[BudgetPoint, list[BudgetPoint]]:
  """Step 1: the floor (every decision at ``omega``) and one batched solve over ``grid`` log-spaced penalties from
  ``max_d lambda_max(d)`` down, plus ``lam = 0``; the target is checked against the range they span."""
  dec = trace.dec
  if dec.top <= 0:
    raise ValueError("no decision has a channel with positive relevance q (every layer's output is constant on the "
                     "calibration data); expected features that vary")
  floor_widths = tuple(dec.round(int(o), d) for d, o in enumerate(dec.omega))
  floor = BudgetPoint(dec.top, floor_widths, trace.costs(floor_widths), "bound")
  points = trace.evaluate(np.concatenate([dec.top * np.logspace(0.0, -6.0, grid), [0.0]]), "grid")
  check_reachable(trace.key, trace.target, trace.value(floor), trace.value(points[-1]), tolerance=trace.tolerance,
                  what="the search", high="the widest solution, at lam = 0")
  return floor, points


def _bisect(trace: _Trace, floor: BudgetPoint, points: list[BudgetPoint], max_steps: int) -> BudgetPoint:
  """Step 2: bisection on ``lam`` between the grid points that bracket the target, warm-started from the point
  above the target; where it cannot land in the band, the point of the trace nearest the target from below."""
  # Penalties decrease along the grid, so costs (mostly) increase: the bracket is the first point above target.
  above = next(i for i, p in enumerate(points) if trace.value(p) > trace.target)
  eps = 1e-7 * trace.dec.top
  _, _, hit = bisect(
      points[above - 1] if above > 0 else floor, points[above],
      midpoint=lambda lo, hi: None if lo.value - hi.value <= eps else 0.5 * (lo.value + hi.value),
      evaluate=lambda mid, lo, hi: trace.evaluate(np.array([mid]), "bisect", trace.solved.get(hi.value))[0],
      is_below=lambda p: trace.value(p) <= trace.target, stop=trace.within, max_steps=max_steps)
  if hit is not None:
    return hit
  below = [p for p in trace.points if trace.value(p) <= trace.target] or [floor]
  return max(below, key=trace.value)


def _fill(trace: _Trace, start: BudgetPoint, keep: list[np.ndarray]) -> tuple[BudgetPoint, list[np.ndarray]]:
  """Step 3: greedy fill toward the target from below: one multiple at a time to the decision whose next channel is
  the most relevant (``q`` of the next unkept channel, relative to the decision's top ``q``), while in budget."""
  dec, limit = trace.dec, trace.target * (1 + trace.tolerance)
  current, keep = start, list(keep)
  while not trace.within(current):
    widths = list(current.widths)
    candidates = []
    for d, w in enumerate(widths):
      size = int(dec.sizes[d])
      if w < size:
        rest = np.setdiff1d(np.arange(size), keep[d])
        candidates.append((float(np.max(dec.lin[d][rest])) / max(float(np.max(dec.lin[d])), 1e-30), d))
    for _, d in sorted(candidates, reverse=True):
      trial = list(widths)
      trial[d] = min(int(dec.sizes[d]), widths[d] + dec.multiple)
      costs = trace.costs(trial)
      if costs[trace.key] <= limit:
        keep[d] = _extend(dec, d, keep[d], trial[d])
        current = trace.add(BudgetPoint(start.value, tuple(trial), costs, "fill"))
        break
    else:
      break  # no decision can grow within the budget
  return current, keep


def _extend(dec: _Decisions, d: int, kept: np.ndarray, width: int) -> np.ndarray:
  """``kept`` plus the most relevant unkept channels of decision ``d``, up to ``width``."""
  lin = dec.lin[d]
  rest = np.setdiff1d(np.arange(int(dec.sizes[d])), kept)
  extra = rest[np.argsort(-lin[rest], kind="stable")][:width - kept.size]
  return np.sort(np.concatenate([kept, extra]))
