"""ITPruner's width allocation: layer importances from normalised HSIC, then widths under cost budgets.

ITPruner (Zheng et al., 2021) scores each prunable layer by how little it shares with the others and gives wider
layers to higher scores, subject to a budget on the network's cost:

1. :func:`layer_importance`: from the (l, l) normalised HSIC (linear CKA) matrix ``S`` between layers'
   activations, ``r_i = sum_{j != i} S_ij`` (how redundant layer i is), ``rhat = r / sum(r)`` and
   ``a_i = exp(-beta * rhat_i)``.
2. :func:`allocate_widths`: maximise ``sum_i a_i w_i / c_i`` (``c`` the dense widths) over integer widths
   ``w_i in [max(min_width, 1), c_i]`` (optionally multiples of ``multiple``, capped at ``c_i``) subject to
   ``cost_k(w) <= budget_k`` for every budget.

A convolutional network's MACs and parameter count are polynomials of degree at most 2 in its widths (a conv costs
``C_in * C_out`` times a constant; BatchNorm and biases are linear; fixed parts are constants), so
:func:`fit_quadratic_cost` recovers ``cost(w) = const + u.w + sum_i q_i w_i^2 + sum_{i<j} D_ij w_i w_j`` exactly
from a few hundred evaluations of the caller's exact counter, checks the fit at random widths, and the optimiser
then works on the fitted form (microseconds per evaluation); the chosen widths are checked once more with the exact
counter. The form is indefinite (a chain of convs couples neighbouring widths bilinearly), so no convexity helps:
the allocation runs SLSQP from several starts on the continuous relaxation, rounds each result down onto the width
lattice, repairs feasibility, improves it by an integer local search (one step up, or one step up and one down,
while every budget holds) and keeps the best.

ITPruner's own code (reproduced by :func:`reference_allocation` for comparison) runs SLSQP once from the all-dense,
infeasible start, does not check that it succeeded and rounds to the nearest width, so its widths can be 0 and its
cost can exceed the budget.

>>> import numpy as np
>>> a = layer_importance(np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]]), beta=1.0)
>>> alloc = allocate_widths(a, [8, 8, 8], lambda w: {"macs": float(w[0] * w[1] + w[1] * w[2])}, {"macs": 40.0})
>>> alloc.widths, alloc.reached
((8, 2, 8), True)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize

from hsic_jax._budget import BudgetResult, CostFn, check_count, check_reachable, costs_at, min_widths, round_width
from hsic_jax._lattice import Lattice

# The fitted form is exact up to float64 rounding of sums of products of integers below 2**53.
_FIT_RTOL = 1e-9


def _as_importance(importance: Any) -> np.ndarray:
  a = np.asarray(importance, dtype=np.float64)
  if a.ndim != 1 or a.size < 1:
    raise ValueError(f"importance must be a non-empty 1-D array, got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"importance must be finite, got {a.tolist()}")
  if np.any(a < 0):
    raise ValueError(f"importance must be >= 0, got {a.tolist()}")
  return a


def _as_widths(name: str, widths: Any, length: int | None = None) -> np.ndarray:
  w = np.asarray(widths)
  if w.ndim != 1 or w.size < 1:
    raise ValueError(f"{name} must be a non-empty 1-D list of widths, got shape {w.shape}")
  if not np.all(np.isfinite(w.astype(np.float64))) or np.any(w != np.round(w)) or np.any(w < 1):
    raise ValueError(f"{name} must hold integers >= 1, got {w.tolist()}")
  if length is not None and w.size != length:
    raise ValueError(f"{name} must have {length} entries (one per layer), got {w.size}")
  return w.astype(np.int64)


def layer_importance(similarity: Any, *, beta: float, normalize: bool = True) -> np.ndarray:
  """ITPruner's importance of each layer from the normalised HSIC between layers.

  ``r_i = sum_{j != i} S_ij`` is how much layer i shares with all the others; with ``normalize``,
  ``rhat = r / sum_k r_k`` (else ``rhat = r``); ``a_i = exp(-beta * rhat_i)``, so the least redundant layers weigh
  most in the allocation's objective. ``S_ii`` is ignored.

  >>> s = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, 0.2], [0.3, 0.2, 1.0]])
  >>> np.round(layer_importance(s, beta=2.0), 4).tolist()  # r = (0.8, 0.7, 0.5), rhat = r / 2
  [0.4493, 0.4966, 0.6065]

  Args:
    similarity: (l, l) symmetric, finite matrix (e.g. ``hsic_matrix(features, normalized=True)``).
    beta: sharpness ``>= 0``; 0 gives every layer importance 1.
    normalize: divide ``r`` by its sum (ITPruner's default).

  Raises:
    ValueError: a non-square, asymmetric or non-finite ``similarity``, a negative or non-finite ``beta``, or
      ``normalize`` with ``sum(r) <= 0`` (fewer than 2 layers, or no shared information to normalise by).
  """
  s = np.asarray(similarity, dtype=np.float64)
  if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 1:
    raise ValueError(f"similarity must be a square (l, l) matrix, got shape {s.shape}")
  if not np.all(np.isfinite(s)):
    raise ValueError("similarity must be finite; it holds NaN or inf")
  scale = max(float(np.max(np.abs(s))), 1.0)
  asym = float(np.max(np.abs(s - s.T)))
  if asym > 1e-6 * scale:
    raise ValueError(f"similarity must be symmetric, got max |S - S^T| = {asym:.3g}")
  if not (math.isfinite(float(beta)) and float(beta) >= 0):
    raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
  s = 0.5 * (s + s.T)
  r = s.sum(axis=1) - np.diag(s)
  if normalize:
    total = float(r.sum())
    if not total > 0:
      raise ValueError(f"normalize=True needs sum_i r_i > 0 (r_i = sum_(j != i) S_ij), got {total:.3g} for "
                       f"{s.shape[0]} layer(s)")
    r = r / total
  return np.exp(-float(beta) * r)


@dataclasses.dataclass(frozen=True)
class QuadraticCost:
  """``cost(w) = const + linear.w + sum_i square_i w_i^2 + sum_{i<j} cross_ij w_i w_j``.

  Attributes:
    const: the constant term.
    linear: (l,) coefficients ``u``.
    square: (l,) coefficients ``q``.
    cross: (l, l) symmetric, zero-diagonal ``D``; each pair counts once (``0.5 * w^T D w``).

  >>> QuadraticCost(1.0, np.array([1.0, 0.0]), np.array([0.0, 2.0]), np.array([[0.0, 3.0], [3.0, 0.0]]))([1, 2])
  16.0
  """

  const: float
  linear: np.ndarray
  square: np.ndarray
  cross: np.ndarray

  def __post_init__(self) -> None:
    u, q, d = (np.asarray(x, dtype=np.float64) for x in (self.linear, self.square, self.cross))
    l = u.shape[0] if u.ndim == 1 else -1
    if u.ndim != 1 or q.shape != (l,) or d.shape != (l, l):
      raise ValueError(f"QuadraticCost needs linear (l,), square (l,) and cross (l, l), got {u.shape}, {q.shape}, "
                       f"{d.shape}")
    if not (math.isfinite(float(self.const)) and np.all(np.isfinite(u)) and np.all(np.isfinite(q))
            and np.all(np.isfinite(d))):
      raise ValueError("QuadraticCost coefficients must be finite")
    if np.any(np.diag(d) != 0) or not np.allclose(d, d.T, rtol=1e-12, atol=0):
      raise ValueError("QuadraticCost.cross must be symmetric with a zero diagonal")
    object.__setattr__(self, "const", float(self.const))
    for name, x in (("linear", u), ("square", q), ("cross", d)):
      object.__setattr__(self, name, x)

  @property
  def size(self) -> int:
    return int(self.linear.shape[0])

  def evaluate(self, widths: Any) -> Any:
    """The cost at ``widths`` of shape (l,) (a float) or (m, l) (an (m,) array)."""
    w = np.asarray(widths, dtype=np.float64)
    if w.shape[-1:] != (self.size,):
      raise ValueError(f"widths must end in an axis of {self.size}, got shape {w.shape}")
    val = self.const + w @ self.linear + (w * w) @ self.square + 0.5 * np.einsum("...i,ij,...j->...", w, self.cross, w)
    return float(val) if w.ndim == 1 else val

  __call__ = evaluate

  def gradient(self, widths: Any) -> np.ndarray:
    """``d cost / d w = linear + 2 square * w + cross @ w``."""
    w = np.asarray(widths, dtype=np.float64)
    return self.linear + 2 * self.square * w + self.cross @ w


def fit_quadratic_costs(cost_fn: CostFn, base_widths: Sequence[int], *, keys: Sequence[str] = ("macs",),
                        check_points: int = 16, seed: int = 0, rtol: float = _FIT_RTOL) -> dict[str, QuadraticCost]:
  """:func:`fit_quadratic_cost` for several keys of one cost function, sharing its evaluations.

  >>> fits = fit_quadratic_costs(lambda w: {"a": w[0] * w[1], "b": 2.0 * w[0]}, [4, 4], keys=("a", "b"))
  >>> float(fits["a"].cross[0, 1]), fits["b"].linear.tolist()
  (1.0, [2.0, 0.0])

  Raises:
    ValueError: as :func:`fit_quadratic_cost`.
  """
  base = _as_widths("base_widths", base_widths)
  keys = list(keys)
  if not keys or not all(isinstance(k, str) for k in keys):
    raise ValueError(f"keys must be a non-empty list of strings, got {keys!r}")
  check_points = check_count("check_points", check_points, 0)
  l = base.size
  # Steps of -1 from the base stay within [1, base]: a width of 1 or 2 allows 0 or 1 step, where the cost needs no
  # square (or no term at all) in that width to be exact on the widths it can take.
  steps = np.minimum(2, base - 1)

  def at(w: np.ndarray) -> np.ndarray:
    c = costs_at(cost_fn, w, keys)
    return np.array([c[k] for k in keys])

  f0 = at(base)
  f1 = np.zeros((l, len(keys)))
  grad = np.zeros((l, len(keys)))  # d cost / d w at the base
  square = np.zeros((l, len(keys)))
  for i in range(l):
    if steps[i] == 0:
      continue
    e = np.zeros(l, np.int64)
    e[i] = 1
    f1[i] = at(base - e)
    if steps[i] == 2:
      f2 = at(base - 2 * e)
      square[i] = 0.5 * (f2 - 2 * f1[i] + f0)
    # f(b - e) = f0 - g + q  =>  g = f0 - f(b - e) + q
    grad[i] = f0 - f1[i] + square[i]
  cross = np.zeros((len(keys), l, l))
  for i in range(l):
    for j in range(i + 1, l):
      if steps[i] == 0 or steps[j] == 0:
        continue
      w = base.copy()
      w[i] -= 1
      w[j] -= 1
      # f(b - e_i - e_j) = f0 - g_i - g_j + q_i + q_j + D_ij = f(b - e_i) + f(b - e_j) - f0 + D_ij
      cross[:, i, j] = cross[:, j, i] = at(w) - f1[i] - f1[j] + f0
  b = base.astype(np.float64)
  out = {}
  for n, k in enumerate(keys):
    q, d = square[:, n], cross[n]
    u = grad[:, n] - 2 * q * b - d @ b
    const = f0[n] - u @ b - q @ (b * b) - 0.5 * b @ d @ b
    out[k] = QuadraticCost(const, u, q, d)
  rng = np.random.default_rng(seed)
  worst = {k: 0.0 for k in keys}
  worst_at: dict[str, list[int]] = {}
  for _ in range(int(check_points)):
    w = rng.integers(1, base + 1)
    exact = at(w)
    for n, k in enumerate(keys):
      err = abs(out[k](w) - exact[n]) / max(abs(exact[n]), 1.0)
      if err > worst[k]:
        worst[k], worst_at[k] = err, w.tolist()
  bad = {k: e for k, e in worst.items() if e > rtol}
  if bad:
    k = max(bad, key=bad.get)
    raise ValueError(f"cost {k!r} is not quadratic in the widths: the fitted quadratic is off by a relative "
                     f"{bad[k]:.3g} (> {rtol:g}) at widths {worst_at[k]}")
  return out


def fit_quadratic_cost(cost_fn: CostFn, base_widths: Sequence[int], *, key: str = "macs", check_points: int = 16,
                       seed: int = 0, rtol: float = _FIT_RTOL) -> QuadraticCost:
  """The exact quadratic ``cost_fn(w)[key]``, recovered by finite differences at the base widths, then checked.

  With ``b`` the base widths and ``f = cost_fn(.)[key]``: ``q_i = (f(b - 2e_i) - 2 f(b - e_i) + f(b)) / 2``,
  ``g_i = f(b) - f(b - e_i) + q_i`` (the gradient at ``b``), ``D_ij = f(b - e_i - e_j) - f(b - e_i) - f(b - e_j) +
  f(b)``, then ``u = g - 2 q b - D b`` and the constant from ``f(b)``: ``1 + 2l + l(l-1)/2`` calls in all, none
  outside ``[1, b]`` (a layer of width 2 gets no square term, one of width 1 no term, which is exact on the widths
  they can take). The fit is then compared with ``f`` at ``check_points`` random integer widths in ``[1, b]``.

  >>> cost = fit_quadratic_cost(lambda w: {"macs": 3 * w[0] * w[1] + w[1] ** 2 + 7}, [5, 6])
  >>> cost.const, cost.linear.tolist(), cost.square.tolist(), float(cost.cross[0, 1])
  (7.0, [0.0, 0.0], [0.0, 1.0], 3.0)

  Args:
    cost_fn: ``widths -> {key: value, ...}``, e.g. the exact MACs/params counter of the pruned model.
    base_widths: (l,) integer widths >= 1 around which to difference (the dense widths).
    key: the entry of ``cost_fn``'s result to fit.
    check_points: random width vectors at which to check the fit.
    seed: seed of the check points.
    rtol: largest accepted ``|fit - f| / max(|f|, 1)``.

  Raises:
    ValueError: ``f`` is not quadratic in the widths (the check fails; the message names the key, the largest
      relative error and where), ``cost_fn`` lacks ``key`` or returns a non-finite value, or bad ``base_widths``.
  """
  return fit_quadratic_costs(cost_fn, base_widths, keys=(key,), check_points=check_points, seed=seed,
                             rtol=rtol)[key]


@dataclasses.dataclass(frozen=True)
class AllocationStart:
  """One start of :func:`allocate_widths`.

  Attributes:
    name: ``"uniform"`` (one kept fraction for every layer), ``"importance"`` (kept fractions proportional to the
      importances), ``"random-k"`` or ``"greedy"`` (no continuous solve: widths added one step at a time from the
      minimum by importance per unit of cost).
    solver_success: what SLSQP reported (``None`` for ``"greedy"``).
    relaxed_objective: the continuous solution's objective after pulling it inside the budgets (``None`` for
      ``"greedy"``).
    rounded_objective: the objective once rounded down onto the width lattice and repaired to feasibility.
    objective: after the integer local search.
    widths: the widths after the local search.
    feasible: whether every fitted budget holds at ``widths``.
  """

  name: str
  solver_success: bool | None
  relaxed_objective: float | None
  rounded_objective: float
  objective: float
  widths: tuple[int, ...]
  feasible: bool


SOLVERS = ("search", "reference")


def _ray_to_budget(lat: Lattice, lo: np.ndarray, target: np.ndarray) -> np.ndarray:
  """The point ``lo + t (target - lo)`` with the largest ``t in [0, 1]`` inside every fitted budget (bisection)."""
  lo_f, tg = lo.astype(np.float64), target.astype(np.float64)
  if lat.feasible(tg):
    return tg
  t_ok, t_bad = 0.0, 1.0
  for _ in range(60):
    t = 0.5 * (t_ok + t_bad)
    if lat.feasible(lo_f + t * (tg - lo_f)):
      t_ok = t
    else:
      t_bad = t
  return lo_f + t_ok * (tg - lo_f)


def _relax(lat: Lattice, lo: np.ndarray, x0: np.ndarray, maxiter: int) -> tuple[np.ndarray, bool]:
  """SLSQP on ``max a.x`` over ``x = w / c in [lo / c, 1]`` with every fitted budget normalised to 1."""
  c = lat.base
  a = lat.a / max(float(np.sum(lat.a)), 1e-300)

  def cons(x: np.ndarray) -> np.ndarray:
    return np.array([1.0 - q(c * x) / b for q, b in zip(lat.costs, lat.budgets)])

  def cons_jac(x: np.ndarray) -> np.ndarray:
    return np.stack([-q.gradient(c * x) * c / b for q, b in zip(lat.costs, lat.budgets)])

  res = optimize.minimize(lambda x: -float(a @ x), x0, jac=lambda x: -a, method="SLSQP",
                          bounds=list(zip((lo / c).tolist(), [1.0] * len(c))),
                          constraints=[{"type": "ineq", "fun": cons, "jac": cons_jac}],
                          options={"maxiter": maxiter, "ftol": 1e-12})
  x = np.clip(res.x, lo / c, 1.0)
  # SLSQP may stop slightly outside the budgets (or far outside, on failure): pull it back along the ray from lo.
  w = _ray_to_budget(lat, lo, c * x)
  return w, bool(res.success)


def allocate_widths(importance: Any, base_widths: Sequence[int], cost_fn: CostFn, budgets: Mapping[str, float], *,
                    min_width: int | float | Sequence[int] = 1, multiple: int = 1, starts: int = 8, seed: int = 0,
                    check_points: int = 16,
                    fitted: Mapping[str, QuadraticCost] | None = None, maxiter: int = 200,
                    max_moves: int | None = None, solver: str = "search") -> BudgetResult:
  """Integer widths maximising ``sum_i a_i w_i / c_i`` with every ``cost_fn(w)[k] <= budgets[k]``.

  Widths range over ``[round_width(min_width, c_i), c_i]`` in steps of ``multiple`` (the dense width ``c_i`` is
  always allowed, as :func:`hsic_jax.budget.round_width` caps). Costs must be nondecreasing in every width (MACs
  and params are), so the minimum widths are the cheapest point. Method:

  1. fit every budgeted cost as an exact quadratic of the widths (:func:`fit_quadratic_costs`, ~``l^2 / 2`` calls
     of ``cost_fn``, skipped with ``fitted``);
  2. ``starts`` continuous starts (uniform kept fraction, fractions proportional to importance, random ones), each
     pulled inside the budgets along the ray from the minimum widths and solved by SLSQP on the relaxation;
     plus one greedy start from the minimum widths;
  3. each result rounded down onto the lattice, repaired to feasibility, then improved by an integer local search
     (the best single step up that fits, else the best one-up-one-down exchange that gains and fits);
  4. the best candidate whose exact ``cost_fn`` holds every budget.

  ``solver="reference"`` instead runs ITPruner's own optimisation (:func:`reference_allocation`: one SLSQP from the
  dense widths with default tolerances on the raw importances), rounds to the nearest allowed width and then only
  repairs: layers step down, least objective lost per unit of overshoot first, until every budget holds. With
  ITPruner's importances (``exp(-beta rhat)``, about 1e-11 for beta 246 over 9 layers) the objective is so small
  against SLSQP's default tolerance that it stops soon after reaching the budget, close to a uniform scaling tilted
  by the importances: this is what reproduces ITPruner's published widths. Solved to optimality (``"search"``), the
  same linear objective puts most layers at their minimum or their dense width.

  >>> alloc = allocate_widths([1.0, 2.0], [8, 8], lambda w: {"macs": float(w[0] + 3 * w[1])}, {"macs": 20.0})
  >>> alloc.widths, alloc.costs["macs"], alloc.reached
  ((8, 4), 20.0, True)

  Args:
    importance: (l,) finite, nonnegative weights ``a`` (e.g. :func:`layer_importance`).
    base_widths: (l,) dense widths ``c``.
    cost_fn: ``widths -> {key: value}``: the exact cost of a width vector.
    budgets: ``{key: budget}``, one or more (e.g. ``{"macs": 57e6, "params": 0.4e6}``).
    min_width: smallest width of any layer: a count ``>= 1``, a fraction in ``(0, 1)`` of each dense width, or
      one count per layer (:func:`hsic_jax.min_widths`; capped at ``c_i``).
    multiple: widths are multiples of this (or ``c_i``).
    starts: continuous starts (>= 1).
    seed: seed of the random starts and of the fit's check points.
    check_points: random checks of the quadratic fit.
    fitted: precomputed ``{key: QuadraticCost}`` for every budget key (skips the fit).
    maxiter: SLSQP iterations per start.
    max_moves: cap on local-search moves per start (default: the number of lattice points).
    solver: ``"search"`` (the method above) or ``"reference"`` (ITPruner's SLSQP, rounded and repaired).

  Returns:
    A :class:`~hsic_jax.budget.BudgetResult` (``method="itpruner"``; ``key`` and ``target``: the first budget;
    ``reached``: every budget holds for the exact costs; ``trace``: every start's :class:`AllocationStart`), with
    ``extras``: ``objective`` (``sum_i a_i w_i / c_i`` at the widths), ``dense_objective`` (``sum_i a_i``),
    ``budgets``, ``relaxed_objective`` (the best objective of the continuous relaxation over the starts: a local
    optimum, so an indication of the rounding gap, not a bound; ``None`` when no relaxation ran), ``reachable``
    (per budget key, the exact cost at the minimum and at the dense widths), ``cost_calls`` (calls of
    ``cost_fn``), ``seconds`` (wall time) and ``solver``. The dense widths when they already fit every budget.

  Raises:
    ValueError: bad arguments, NaN importances, a budget below the cost at the minimum widths (the message gives
      the reachable range), or a cost that is not quadratic in the widths.
  """
  t0 = time.perf_counter()
  a, base, budgets = _check_allocation(importance, base_widths, budgets, solver)
  floor = min_widths(min_width, base, name="min_width")
  multiple = check_count("multiple", multiple, 1)
  starts = check_count("starts", starts, 1)
  keys = list(budgets)
  bud = np.array([budgets[k] for k in keys])
  exact = _Exact(cost_fn, keys)
  lo = np.array([round_width(int(m), int(c), multiple=multiple) for m, c in zip(floor, base)], np.int64)
  dense_cost, low_cost = exact(base), exact(lo)
  reachable = {k: (low_cost[k], dense_cost[k]) for k in keys}
  for k in keys:
    check_reachable(k, budgets[k], *reachable[k], above=False, high="dense: a budget above it keeps every width")
  extras = {"dense_objective": float(np.sum(a)), "budgets": budgets, "reachable": reachable, "solver": solver}
  if all(dense_cost[k] <= b for k, b in zip(keys, bud)):
    return _allocation(base, dense_cost, (), {**extras, "objective": extras["dense_objective"],
                                              "relaxed_objective": extras["dense_objective"]}, exact, t0)
  fits = _fit(exact, base, keys, fitted, check_points, seed)
  lat = Lattice(a, base, lo, multiple, [fits[k] for k in keys], bud)
  results, relaxed_best = _solve(lat, solver, starts, seed, maxiter, max_moves)
  chosen, chosen_cost = _verify(results, exact, bud, lo, low_cost)
  w = np.array(chosen)
  return _allocation(w, chosen_cost, tuple(results), {**extras, "objective": lat.objective(w),
                                                      "relaxed_objective": relaxed_best}, exact, t0)


def _check_allocation(importance: Any, base_widths: Sequence[int], budgets: Any, solver: Any
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
  """Step 1 of :func:`allocate_widths`: the importances, dense widths and budgets, checked."""
  a = _as_importance(importance)
  base = _as_widths("base_widths", base_widths, a.size)
  if not isinstance(budgets, Mapping) or not budgets:
    raise ValueError(f"budgets must be a non-empty mapping of cost key to budget, got {budgets!r}")
  for k, b in budgets.items():
    if not isinstance(k, str) or not (isinstance(b, (int, float, np.floating, np.integer)) and math.isfinite(b)):
      raise ValueError(f"budgets must map cost keys to finite numbers, got {k!r}: {b!r}")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
  return a, base, {k: float(b) for k, b in budgets.items()}


class _Exact:
  """The caller's exact cost function at integer widths, its budgeted keys checked, its calls counted."""

  def __init__(self, cost_fn: CostFn, keys: Sequence[str]):
    self.cost_fn, self.keys, self.calls = cost_fn, list(keys), 0

  def __call__(self, w: Any) -> dict[str, float]:
    self.calls += 1
    return costs_at(self.cost_fn, [int(x) for x in w], self.keys)

  def counted(self, w: Sequence[int]) -> Mapping[str, float]:
    """The unchecked cost function, counted (for the fit, which checks what it reads)."""
    self.calls += 1
    return self.cost_fn(w)


def _fit(exact: _Exact, base: np.ndarray, keys: Sequence[str], fitted: Mapping[str, QuadraticCost] | None,
         check_points: int, seed: int) -> dict[str, QuadraticCost]:
  """Step 2: every budgeted cost as an exact quadratic of the widths (or the caller's ``fitted`` ones, checked)."""
  if fitted is None:
    return fit_quadratic_costs(exact.counted, base.tolist(), keys=keys, check_points=check_points, seed=seed)
  missing = [k for k in keys if k not in fitted]
  if missing:
    raise ValueError(f"fitted lacks a QuadraticCost for budget key(s) {missing}")
  for k in keys:
    if fitted[k].size != base.size:
      raise ValueError(f"fitted[{k!r}] has {fitted[k].size} widths, expected {base.size}")
  return {k: fitted[k] for k in keys}


def _solve(lat: Lattice, solver: str, starts: int, seed: int, maxiter: int, max_moves: int | None
           ) -> tuple[list[AllocationStart], float | None]:
  """Step 3: the candidates on the lattice, by ITPruner's own SLSQP (``"reference"``) or the multi-start search."""
  if solver == "reference":
    c = lat.base
    x, ok = _reference_slsqp(lat.a, c, lat.costs, lat.budgets)
    start = _finish(lat, "reference", ok, float((lat.a / c) @ (c * x)), lat.nearest(c * x), 0)
    return [start], start.relaxed_objective
  return _search(lat, lat.a, lat.base, lat.lo, starts, seed, maxiter, max_moves)


def _verify(results: Sequence[AllocationStart], exact: _Exact, bud: np.ndarray, lo: np.ndarray,
            low_cost: dict[str, float]) -> tuple[tuple[int, ...], dict[str, float]]:
  """Step 4: the best candidate whose exact costs hold every budget (the fit can disagree right at a budget)."""
  order = sorted(range(len(results)), key=lambda i: (not results[i].feasible, -results[i].objective, i))
  seen: set[tuple[int, ...]] = set()
  for i in order:
    r = results[i]
    if not r.feasible or r.widths in seen:
      continue
    seen.add(r.widths)
    ex = exact(np.array(r.widths))
    if all(ex[k] <= b for k, b in zip(exact.keys, bud)):
      return r.widths, ex
  # Only when the fit and the exact counter disagree right at a budget: fall back to the cheapest point.
  return tuple(int(x) for x in lo), low_cost


def _allocation(w: np.ndarray, costs: dict[str, float], starts: tuple[AllocationStart, ...], extras: dict[str, Any],
                exact: _Exact, t0: float) -> BudgetResult:
  """The :class:`~hsic_jax.budget.BudgetResult` of :func:`allocate_widths` (its extras in the order of the record)."""
  budgets = extras["budgets"]
  key = next(iter(budgets))
  order = ("objective", "dense_objective", "budgets", "relaxed_objective", "reachable")
  return BudgetResult("itpruner", tuple(int(x) for x in w), costs, key, budgets[key],
                      all(costs[k] <= b for k, b in budgets.items()), extras["reachable"][key], starts,
                      extras={**{k: extras[k] for k in order}, "cost_calls": exact.calls,
                              "seconds": time.perf_counter() - t0, "solver": extras["solver"]})


def _reference_slsqp(a: np.ndarray, c: np.ndarray, costs: Sequence[QuadraticCost], budgets: np.ndarray
                     ) -> tuple[np.ndarray, bool]:
  """ITPruner's SLSQP: ``max a.x`` over ``x in [0, 1]`` from ``x = 1``, default tolerances, no constraint gradient."""
  cons = [{"type": "ineq", "fun": (lambda x, q=q, b=b: np.array([b - q(c * x)]))} for q, b in zip(costs, budgets)]
  res = optimize.minimize(lambda x: -float(a @ x), np.ones(a.size), jac=lambda x: -a, method="SLSQP",
                          bounds=[(0, 1)] * a.size, constraints=cons)
  return np.clip(np.asarray(res.x, np.float64), 0.0, 1.0), bool(res.success)


def _search(lat: Lattice, a: np.ndarray, c: np.ndarray, lo: np.ndarray, starts: int, seed: int, maxiter: int,
            max_moves: int | None) -> tuple[list[AllocationStart], float | None]:
  """The continuous starts and the greedy start of :func:`allocate_widths`, each finished on the lattice."""
  moves = int(max_moves) if max_moves is not None else int(sum(len(v) for v in lat.values)) + 10
  rng = np.random.default_rng(seed)
  frac_lo = lo / c

  inits: list[tuple[str, np.ndarray]] = [("uniform", c.copy())]
  if int(starts) >= 2:
    inits.append(("importance", lo + (a / max(float(a.max()), 1e-300)) * (c - lo)))
  for s in range(int(starts) - len(inits)):
    inits.append((f"random-{s}", lo + rng.uniform(size=a.size) * (c - lo)))

  results: list[AllocationStart] = []
  relaxed_best: float | None = None
  for name, target in inits:
    x0 = _ray_to_budget(lat, lo, target) / c
    w_rel, ok = _relax(lat, lo, np.clip(x0, frac_lo, 1.0), int(maxiter))
    rel_obj = lat.objective(w_rel)
    relaxed_best = rel_obj if relaxed_best is None else max(relaxed_best, rel_obj)
    results.append(_finish(lat, name, ok, rel_obj, lat.floor(w_rel), moves))
  results.append(_finish(lat, "greedy", None, None, lat.greedy(lo.copy()), moves))
  return results, relaxed_best


def _finish(lat: Lattice, name: str, ok: bool | None, rel_obj: float | None, w0: np.ndarray,
            moves: int) -> AllocationStart:
  w = lat.repair(w0)
  if w is None:
    return AllocationStart(name, ok, rel_obj, float("-inf"), float("-inf"), tuple(int(x) for x in w0), False)
  rounded = lat.objective(w)
  w = lat.local_search(w, moves)
  return AllocationStart(name, ok, rel_obj, rounded, lat.objective(w), tuple(int(x) for x in w), lat.feasible(w))


def reference_allocation(importance: Any, base_widths: Sequence[int], cost: QuadraticCost,
                         budget: float) -> BudgetResult:
  """ITPruner's allocation as its code runs it, for comparison with :func:`allocate_widths`.

  ``scipy.optimize.minimize(-a.x, x0=ones, jac=-a, method="SLSQP", bounds=[(0, 1)] * l,
  constraints=budget - cost(c * x) >= 0)`` with default tolerances and iterations and no constraint gradient, then
  ``w = np.around(c * x)`` with no lower clamp and no check of success or of the rounded cost.

  >>> ref = reference_allocation([1.0, 1.0], [4, 4], QuadraticCost(0.0, np.ones(2), np.zeros(2), np.zeros((2, 2))),
  ...                            4.0)
  >>> sum(ref.widths)
  4

  Returns:
    A :class:`~hsic_jax.budget.BudgetResult` (``method="itpruner_reference"``): ``widths`` ``np.around(c * x)``
    (round half to even; can be 0), ``costs`` ``{"cost": quadratic cost at the widths}`` (``key="cost"``),
    ``target`` the budget, ``reached`` ``cost <= budget``, ``reachable`` the cost at all-zero and at the dense
    widths; ``extras``: ``x`` (SLSQP's kept fractions), ``success`` (what SLSQP reported: ITPruner does not look),
    ``objective`` (``sum_i a_i w_i / c_i``) and ``zero_widths`` (how many widths are 0).

  Raises:
    ValueError: bad importances, widths, cost or budget.
  """
  a = _as_importance(importance)
  base = _as_widths("base_widths", base_widths, a.size)
  if not isinstance(cost, QuadraticCost) or cost.size != a.size:
    raise ValueError(f"cost must be a QuadraticCost over {a.size} widths, got {cost!r}")
  if not math.isfinite(float(budget)):
    raise ValueError(f"budget must be finite, got {budget!r}")
  c = base.astype(np.float64)
  x, ok = _reference_slsqp(a, c, [cost], np.array([float(budget)]))
  w = np.around(c * x).astype(np.int64)
  val = cost(w)
  return BudgetResult("itpruner_reference", tuple(int(v) for v in w), {"cost": val}, "cost", float(budget),
                      bool(val <= float(budget)), (cost(np.zeros(a.size)), cost(base)),
                      extras={"x": tuple(float(v) for v in x), "success": ok, "objective": float((a / c) @ w),
                              "zero_widths": int(np.sum(w == 0))})
