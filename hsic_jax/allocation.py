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
>>> alloc.widths, alloc.feasible
((8, 2, 8), True)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize

from hsic_jax import _floor

CostFn = Callable[[Sequence[int]], Mapping[str, float]]

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


def _costs_of(cost_fn: CostFn, widths: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
  out = cost_fn([int(x) for x in widths])
  vals = {}
  for k in keys:
    if k not in out:
      raise ValueError(f"cost_fn returned no {k!r} (it returned {sorted(out)})")
    v = float(out[k])
    if not math.isfinite(v):
      raise ValueError(f"cost_fn returned {k}={v} at widths {widths.tolist()}")
    vals[k] = v
  return vals


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
  if int(check_points) < 0:
    raise ValueError(f"check_points must be >= 0, got {check_points}")
  l = base.size
  # Steps of -1 from the base stay within [1, base]: a width of 1 or 2 allows 0 or 1 step, where the cost needs no
  # square (or no term at all) in that width to be exact on the widths it can take.
  steps = np.minimum(2, base - 1)

  def at(w: np.ndarray) -> np.ndarray:
    c = _costs_of(cost_fn, w, keys)
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


@dataclasses.dataclass(frozen=True)
class Allocation:
  """The outcome of :func:`allocate_widths`.

  Attributes:
    widths: the chosen width of every layer.
    objective: ``sum_i a_i w_i / c_i`` at ``widths``.
    dense_objective: the objective at the dense widths, ``sum_i a_i``.
    costs: the exact ``cost_fn(widths)`` (every key it returns).
    budgets: the budgets, by key.
    feasible: whether every budget holds for the exact costs.
    relaxed_objective: the best objective of the continuous relaxation over the starts (a local optimum, so an
      indication of the rounding gap, not a bound); ``None`` when no relaxation ran.
    reachable: per budget key, the exact cost at the minimum widths and at the dense widths.
    starts: every start's results.
    cost_calls: calls of ``cost_fn``.
    seconds: wall time.
    solver: ``"search"`` or ``"reference"`` (see :func:`allocate_widths`).
  """

  widths: tuple[int, ...]
  objective: float
  dense_objective: float
  costs: dict[str, float]
  budgets: dict[str, float]
  feasible: bool
  relaxed_objective: float | None
  reachable: dict[str, tuple[float, float]]
  starts: tuple[AllocationStart, ...]
  cost_calls: int
  seconds: float
  solver: str = "search"


SOLVERS = ("search", "reference")


class _Lattice:
  """The allowed widths of every layer and the fitted budgets, for the integer search."""

  def __init__(self, a: np.ndarray, base: np.ndarray, lo: np.ndarray, multiple: int,
               costs: Sequence[QuadraticCost], budgets: np.ndarray):
    self.a, self.base = a, base.astype(np.float64)
    self.values = []
    for c, low in zip(base.tolist(), lo.tolist()):
      # ``low`` is a multiple of ``multiple`` unless it is ``c`` itself (round_width caps at the size).
      v = list(range(low, c + 1, multiple)) if low < c else []
      self.values.append(np.unique(np.array(v + [c], np.int64)))
    # Padded (l, L) table of the lattices (each row repeats its last value), for vectorised step look-ups.
    self.length = np.array([len(v) for v in self.values])
    self.table = np.stack([np.pad(v, (0, int(self.length.max()) - len(v)), mode="edge") for v in self.values])
    self.rows = np.arange(len(self.values))
    self.costs = list(costs)
    self.budgets = budgets
    self.slack_tol = 1e-9 * np.maximum(np.abs(budgets), 1.0)
    self.weight = a / self.base  # objective per unit of width

  def objective(self, w: np.ndarray) -> float:
    return float(self.weight @ w)

  def cost(self, w: np.ndarray) -> np.ndarray:
    return np.array([q(w) for q in self.costs])

  def feasible(self, w: np.ndarray) -> bool:
    return bool(np.all(self.cost(w) <= self.budgets + self.slack_tol))

  def floor(self, w: np.ndarray) -> np.ndarray:
    """Each width down to the largest allowed value <= it (the smallest allowed value where none is)."""
    pos = np.sum(self.table <= np.asarray(w, np.float64)[:, None] + 1e-9, axis=1) - 1
    pos = np.clip(np.minimum(pos, self.length - 1), 0, None)
    return self.table[self.rows, pos]

  def nearest(self, w: np.ndarray) -> np.ndarray:
    """Each width to its nearest allowed value (ties to the lower one)."""
    d = np.abs(self.table - np.asarray(w, np.float64)[:, None])
    d = np.where(np.arange(self.table.shape[1])[None, :] < self.length[:, None], d, np.inf)
    return self.table[self.rows, np.argmin(d + 1e-9 * np.arange(self.table.shape[1])[None, :], axis=1)]

  def _pos(self, w: np.ndarray) -> np.ndarray:
    return np.minimum(np.sum(self.table < w[:, None], axis=1), self.length - 1)

  def up_steps(self, w: np.ndarray, s: int) -> np.ndarray:
    """Per layer, the change of ``s`` steps up its lattice (0 where it has fewer than ``s`` above)."""
    pos = self._pos(w) + s
    ok = pos < self.length
    return np.where(ok, self.table[self.rows, np.minimum(pos, self.length - 1)] - w, 0).astype(np.float64)

  def steps(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the change of one step up and one step down on its lattice (0 where there is none)."""
    pos = self._pos(w)
    up = np.where(pos + 1 < self.length, self.table[self.rows, np.minimum(pos + 1, self.length - 1)] - w, 0)
    down = np.where(pos > 0, self.table[self.rows, np.maximum(pos - 1, 0)] - w, 0)
    return up.astype(np.float64), down.astype(np.float64)

  def deltas(self, w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(keys, l): the change of every cost when layer i alone changes by ``d_i``."""
    wf = w.astype(np.float64)
    return np.stack([d * q.gradient(wf) + q.square * d * d for q in self.costs])

  def repair(self, w: np.ndarray) -> np.ndarray | None:
    """Steps layers down, cheapest objective loss per unit of overshoot removed first, until every budget holds."""
    w = w.copy()
    for _ in range(int(sum(len(v) for v in self.values))):
      over = self.cost(w) - self.budgets
      if np.all(over <= self.slack_tol):
        return w
      _, down = self.steps(w)
      can = down < 0
      if not np.any(can):
        return None
      gain = -self.deltas(w, down)  # cost removed, per key
      norm = self.budgets[:, None]
      relief = np.sum(np.clip(gain, 0, None) / norm * (over[:, None] > 0), axis=0)
      loss = -self.weight * down
      score = np.where(can & (relief > 0), loss / np.maximum(relief, 1e-300), np.inf)
      if not np.isfinite(score).any():
        return None
      i = int(np.argmin(score))
      w[i] += int(down[i])
    return w if self.feasible(w) else None

  def greedy(self, w: np.ndarray) -> np.ndarray:
    """From feasible ``w``, steps up the layer with the most objective per unit of normalised cost while it fits."""
    w = w.copy()
    for _ in range(int(sum(len(v) for v in self.values))):
      up, _ = self.steps(w)
      slack = self.budgets + self.slack_tol - self.cost(w)
      delta = self.deltas(w, up)
      ok = (up > 0) & np.all(delta <= slack[:, None], axis=0)
      if not np.any(ok):
        return w
      price = np.max(np.clip(delta, 0, None) / self.budgets[:, None], axis=0)
      score = np.where(ok, self.weight * up / np.maximum(price, 1e-300), -np.inf)
      i = int(np.argmax(score))
      w[i] += int(up[i])
    return w

  def local_search(self, w: np.ndarray, max_moves: int, *, up_steps: int = 4) -> np.ndarray:
    """Improves feasible ``w`` by moves that gain objective and keep every budget, best move first, until none.

    Moves: one step up of one layer; else ``s <= up_steps`` steps up of layer i with layer j (any ``j != i``) down
    by the fewest lattice steps that bring every budget back (the nearest lower width that fits gains most).
    """
    w = w.copy()
    for _ in range(max_moves):
      up, _ = self.steps(w)
      slack = self.budgets + self.slack_tol - self.cost(w)
      d_up = self.deltas(w, up)
      ok = (up > 0) & np.all(d_up <= slack[:, None], axis=0)
      if np.any(ok):
        i = int(np.argmax(np.where(ok, self.weight * up, -np.inf)))
        w[i] += int(up[i])
        continue
      move = self._best_exchange(w, slack, up_steps)
      if move is None:
        return w
      i, di, j, dj = move
      w[i] += di
      w[j] += dj
    return w

  def _best_exchange(self, w: np.ndarray, slack: np.ndarray, up_steps: int) -> tuple[int, int, int, int] | None:
    owner, down = [], []
    for j, v in enumerate(self.values):
      below = v[v < w[j]]
      owner.append(np.full(below.size, j))
      down.append(below - w[j])
    owner_a, dj = np.concatenate(owner), np.concatenate(down).astype(np.float64)
    if owner_a.size == 0:
      return None
    wf = w.astype(np.float64)
    grads = [q.gradient(wf) for q in self.costs]
    floor = 1e-12 * max(self.objective(w), 1.0)
    best: tuple[float, tuple[int, int, int, int]] | None = None
    for s in range(1, up_steps + 1):
      di = self.up_steps(w, s)
      movable = np.flatnonzero(di > 0)
      if movable.size == 0:
        break
      d = di[movable]
      gain = (self.weight[movable] * d)[:, None] - (self.weight[owner_a] * -dj)[None, :]
      fits = (gain > floor) & (movable[:, None] != owner_a[None, :])
      for k, q in enumerate(self.costs):
        g = grads[k]
        up_cost = d * g[movable] + q.square[movable] * d * d
        # j's change at w with i already moved: d_j (g_j + D_ij d_i) + q_j d_j^2.
        down_cost = dj[None, :] * (g[owner_a][None, :] + q.cross[movable][:, owner_a] * d[:, None]) + \
            (q.square[owner_a] * dj * dj)[None, :]
        fits &= (up_cost[:, None] + down_cost) <= slack[k]
      if not np.any(fits):
        continue
      flat = int(np.argmax(np.where(fits, gain, -np.inf)))
      r, col = np.unravel_index(flat, gain.shape)
      if best is None or gain[r, col] > best[0]:
        best = (float(gain[r, col]), (int(movable[r]), int(d[r]), int(owner_a[col]), int(dj[col])))
    return None if best is None else best[1]


def _ray_to_budget(lat: _Lattice, lo: np.ndarray, target: np.ndarray) -> np.ndarray:
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


def _relax(lat: _Lattice, lo: np.ndarray, x0: np.ndarray, maxiter: int) -> tuple[np.ndarray, bool]:
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
                    min_width: int | float | Sequence[int] = 1, multiple: int = 1, starts: int = 8, seed: int = 0, check_points: int = 16,
                    fitted: Mapping[str, QuadraticCost] | None = None, maxiter: int = 200,
                    max_moves: int | None = None, solver: str = "search") -> Allocation:
  """Integer widths maximising ``sum_i a_i w_i / c_i`` with every ``cost_fn(w)[k] <= budgets[k]``.

  Widths range over ``[round_width(min_width, c_i), c_i]`` in steps of ``multiple`` (the dense width ``c_i`` is
  always allowed, as :func:`hsic_jax.surgery.round_width` caps). Costs must be nondecreasing in every width (MACs
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
  >>> alloc.widths, alloc.costs["macs"]
  ((8, 4), 20.0)

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
    An :class:`Allocation`; the dense widths when they already fit every budget.

  Raises:
    ValueError: bad arguments, NaN importances, a budget below the cost at the minimum widths (the message gives
      the reachable range), or a cost that is not quadratic in the widths.
  """
  t0 = time.perf_counter()
  a = _as_importance(importance)
  base = _as_widths("base_widths", base_widths, a.size)
  if not isinstance(budgets, Mapping) or not budgets:
    raise ValueError(f"budgets must be a non-empty mapping of cost key to budget, got {budgets!r}")
  for k, b in budgets.items():
    if not isinstance(k, str) or not (isinstance(b, (int, float, np.floating, np.integer)) and math.isfinite(b)):
      raise ValueError(f"budgets must map cost keys to finite numbers, got {k!r}: {b!r}")
  floor = _floor.min_widths(min_width, base, name="min_width")
  for name, v in (("multiple", multiple), ("starts", starts)):
    if int(v) != v or int(v) < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
  keys = list(budgets)
  bud = np.array([float(budgets[k]) for k in keys])
  calls = 0

  def exact(w: np.ndarray) -> dict[str, float]:
    nonlocal calls
    calls += 1
    out = cost_fn([int(x) for x in w])
    _costs_of(lambda _: out, w, keys)  # the budgeted keys are present and finite
    return {k: float(v) for k, v in out.items()}

  lo = np.minimum(base, int(multiple) * np.ceil(floor / int(multiple))).astype(np.int64)
  dense_obj = float(np.sum(a))
  dense_cost = exact(base)
  low_cost = exact(lo)
  reachable = {k: (low_cost[k], dense_cost[k]) for k in keys}
  short = [k for k, b in zip(keys, bud) if low_cost[k] > b]
  if short:
    raise ValueError("budgets cannot be met: " + "; ".join(
        f"{k} budget {budgets[k]:.6g} is below the cost at the minimum widths (reachable range "
        f"[{reachable[k][0]:.6g}, {reachable[k][1]:.6g}])" for k in short))
  if all(dense_cost[k] <= b for k, b in zip(keys, bud)):
    return Allocation(tuple(int(x) for x in base), dense_obj, dense_obj, dense_cost, dict(budgets), True, dense_obj,
                      reachable, (), calls, time.perf_counter() - t0, solver)
  if fitted is None:
    counted = []

    def counting(w: Sequence[int]) -> Mapping[str, float]:
      counted.append(1)
      return cost_fn(w)

    fits = fit_quadratic_costs(counting, base.tolist(), keys=keys, check_points=check_points, seed=seed)
    calls += len(counted)
  else:
    missing = [k for k in keys if k not in fitted]
    if missing:
      raise ValueError(f"fitted lacks a QuadraticCost for budget key(s) {missing}")
    fits = {k: fitted[k] for k in keys}
    for k in keys:
      if fits[k].size != a.size:
        raise ValueError(f"fitted[{k!r}] has {fits[k].size} widths, expected {a.size}")
  lat = _Lattice(a, base, lo, int(multiple), [fits[k] for k in keys], bud)
  c = base.astype(np.float64)
  if solver == "reference":
    x, ok = _reference_slsqp(a, c, [fits[k] for k in keys], bud)
    start = _finish(lat, "reference", ok, float((a / c) @ (c * x)), lat.nearest(c * x), 0)
    results = [start]
    relaxed_best = start.relaxed_objective
  else:
    results, relaxed_best = _search(lat, a, c, lo, starts, seed, maxiter, max_moves)
  order = sorted(range(len(results)), key=lambda i: (not results[i].feasible, -results[i].objective, i))
  seen: set[tuple[int, ...]] = set()
  chosen, chosen_cost = None, None
  for i in order:
    r = results[i]
    if not r.feasible or r.widths in seen:
      continue
    seen.add(r.widths)
    ex = exact(np.array(r.widths))
    if all(ex[k] <= b for k, b in zip(keys, bud)):
      chosen, chosen_cost = r.widths, ex
      break
  if chosen is None:
    # Only when the fit and the exact counter disagree right at a budget: fall back to the cheapest point.
    chosen, chosen_cost = tuple(int(x) for x in lo), low_cost
  w = np.array(chosen)
  feasible = all(chosen_cost[k] <= b for k, b in zip(keys, bud))
  return Allocation(tuple(int(x) for x in w), lat.objective(w), dense_obj, chosen_cost, dict(budgets), feasible,
                    relaxed_best, reachable, tuple(results), calls, time.perf_counter() - t0, solver)


def _reference_slsqp(a: np.ndarray, c: np.ndarray, costs: Sequence[QuadraticCost], budgets: np.ndarray
                     ) -> tuple[np.ndarray, bool]:
  """ITPruner's SLSQP: ``max a.x`` over ``x in [0, 1]`` from ``x = 1``, default tolerances, no constraint gradient."""
  cons = [{"type": "ineq", "fun": (lambda x, q=q, b=b: np.array([b - q(c * x)]))} for q, b in zip(costs, budgets)]
  res = optimize.minimize(lambda x: -float(a @ x), np.ones(a.size), jac=lambda x: -a, method="SLSQP",
                          bounds=[(0, 1)] * a.size, constraints=cons)
  return np.clip(np.asarray(res.x, np.float64), 0.0, 1.0), bool(res.success)


def _search(lat: _Lattice, a: np.ndarray, c: np.ndarray, lo: np.ndarray, starts: int, seed: int, maxiter: int,
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


def _finish(lat: _Lattice, name: str, ok: bool | None, rel_obj: float | None, w0: np.ndarray,
            moves: int) -> AllocationStart:
  w = lat.repair(w0)
  if w is None:
    return AllocationStart(name, ok, rel_obj, float("-inf"), float("-inf"), tuple(int(x) for x in w0), False)
  rounded = lat.objective(w)
  w = lat.local_search(w, moves)
  return AllocationStart(name, ok, rel_obj, rounded, lat.objective(w), tuple(int(x) for x in w), lat.feasible(w))


@dataclasses.dataclass(frozen=True)
class ReferenceAllocation:
  """What ITPruner's own optimisation gives (see :func:`reference_allocation`).

  Attributes:
    widths: ``np.around(c * x)`` (round half to even; can be 0).
    x: SLSQP's kept fractions.
    success: what SLSQP reported (ITPruner does not look).
    objective: ``sum_i a_i w_i / c_i`` at ``widths``.
    cost: the quadratic cost at ``widths``.
    budget: the budget.
    feasible: ``cost <= budget``.
    zero_widths: how many widths are 0.
  """

  widths: tuple[int, ...]
  x: tuple[float, ...]
  success: bool
  objective: float
  cost: float
  budget: float
  feasible: bool
  zero_widths: int


def reference_allocation(importance: Any, base_widths: Sequence[int], cost: QuadraticCost,
                         budget: float) -> ReferenceAllocation:
  """ITPruner's allocation as its code runs it, for comparison with :func:`allocate_widths`.

  ``scipy.optimize.minimize(-a.x, x0=ones, jac=-a, method="SLSQP", bounds=[(0, 1)] * l,
  constraints=budget - cost(c * x) >= 0)`` with default tolerances and iterations and no constraint gradient, then
  ``w = np.around(c * x)`` with no lower clamp and no check of success or of the rounded cost.

  >>> ref = reference_allocation([1.0, 1.0], [4, 4], QuadraticCost(0.0, np.ones(2), np.zeros(2), np.zeros((2, 2))),
  ...                            4.0)
  >>> sum(ref.widths)
  4

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
  return ReferenceAllocation(tuple(int(v) for v in w), tuple(float(v) for v in x), ok,
                             float((a / c) @ w), val, float(budget), bool(val <= float(budget)), int(np.sum(w == 0)))
