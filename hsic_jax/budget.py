"""Widths under a cost budget: what every allocator shares, and the uniform and global allocators.

A *cost function* maps the kept channels of every decision to the costs of the model built with them
(``cost(widths) -> {"macs": .., "params": ..}``; the caller knows the architecture). Every allocator of the library
(:func:`hsic_jax.global_lambda_search` for APIB, :func:`hsic_jax.allocate_widths` for ITPruner, and
:func:`allocate_uniform` / :func:`allocate_global` here for the baseline criteria) looks for widths whose
``cost(widths)[key]`` reaches a target, and shares:

- :data:`CostFn`, the type of a cost function, and :func:`costs_at`, its checked evaluation;
- :func:`check_target` and :func:`check_reachable`: a target must lie in ``[lowest, highest]`` of what the
  allocator can reach (widened by the tolerance), with one error text that gives the range;
- :func:`round_width`: a width rounded up to a multiple, within ``[1, size]``;
- the contract of "an integer >= low" (:func:`check_count`): an ``int``, a NumPy integer or an integral float such
  as ``1e4``; booleans, ``2.5``, NaN and infinities are refused;
- :func:`min_widths`: the width floor every allocator respects, a count of channels (that integer contract), one
  count per decision, or a fraction in ``(0, 1)`` of each dense width;
- :func:`bisect`: bisection on a monotone family of widths between a point under the target and one above it;
- :class:`BudgetResult`, the one result type every allocator returns, and :class:`BudgetPoint`, one evaluated point
  of its trace.

The allocators of this module search a one-parameter family of widths that grows in every width:

- :func:`allocate_uniform`: one kept fraction for every decision;
- :func:`allocate_global`: one threshold on the per-decision-normalised scores of all decisions.

>>> res = allocate_global([np.array([1.0, 3.0, 2.0])], lambda w: {"macs": float(sum(w))}, 2.0, normalize="max")
>>> res.widths, [k.tolist() for k in res.keep]
((2,), [[1, 2]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from hsic_jax._budget import (
    BudgetPoint,
    BudgetResult,
    CostFn,
    bisect,
    check_count,
    check_reachable,
    check_target,
    check_tolerance,
    costs_at,
    min_widths,
    round_width,
    within,
)
from hsic_jax.criteria import NORMALIZATIONS, check_scores, normalize_scores
from hsic_jax.surgery import keep_top_k

__all__ = [
    "BudgetPoint",
    "BudgetResult",
    "CostFn",
    "allocate_global",
    "allocate_uniform",
    "bisect",
    "check_count",
    "check_reachable",
    "check_target",
    "check_tolerance",
    "costs_at",
    "min_widths",
    "round_width",
    "within",
]


# ----------------------------------------------------------------------------------------------------------------
# Uniform and global allocation.


def _check_sizes(sizes: Any) -> list[int]:
  if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
    raise ValueError(f"sizes must be a sequence of channel counts, got {type(sizes).__name__}")
  out = list(sizes)
  if not out or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in out):
    raise ValueError(f"sizes must be a non-empty sequence of integers >= 1, got {out!r}")
  return [int(s) for s in out]


def _check_common(target: Any, tolerance: Any, multiple: Any, key: Any) -> tuple[float, int]:
  multiple = check_count("multiple", multiple, 1)
  check_tolerance(tolerance)
  target = check_target(target)
  if not isinstance(key, str):
    raise ValueError(f"key must be a string naming a cost, got {key!r}")
  return target, multiple


def _family_search(cost_fn: CostFn, key: str, target: float, tolerance: float, n: int,
                   value_at: Callable[[int], float | None], widths_at: Callable[[int], Sequence[int]]
                   ) -> tuple[BudgetPoint, tuple[float, float], list[BudgetPoint]]:
  """The point of largest index ``i`` of a family of widths nondecreasing in ``i`` (index 0: the minimum widths,
  ``n - 1``: dense) whose cost is at most the target, or the next one where only that lands in the band."""
  if not callable(cost_fn):
    raise ValueError(f"cost_fn must be callable (widths -> {{name: value}}), got {type(cost_fn).__name__}")
  trace: list[BudgetPoint] = []

  def evaluate(i: int, phase: str) -> tuple[int, BudgetPoint]:
    widths = tuple(int(w) for w in widths_at(i))
    point = BudgetPoint(value_at(i), widths, costs_at(cost_fn, widths, (key,)), phase)
    trace.append(point)
    return i, point

  lo, hi = evaluate(0, "bound"), evaluate(n - 1, "bound")
  reachable = (lo[1].costs[key], hi[1].costs[key])
  check_reachable(key, target, *reachable, tolerance=tolerance)
  if reachable[1] <= target:
    return hi[1], reachable, trace
  if reachable[0] > target:
    return lo[1], reachable, trace  # above the target but within the band (checked above)
  below, above, _ = bisect(lo, hi, midpoint=lambda a, b: None if b[0] - a[0] <= 1 else (a[0] + b[0]) // 2,
                           evaluate=lambda mid, a, b: evaluate(mid, "bisect"),
                           is_below=lambda p: p[1].costs[key] <= target)
  ok = lambda p: within(p.costs[key], target, tolerance)  # noqa: E731
  best = above[1] if not ok(below[1]) and ok(above[1]) else below[1]
  return best, reachable, trace


def allocate_uniform(sizes: Sequence[int], cost_fn: CostFn, target: float, *, key: str = "macs",
                     tolerance: float = 0.01, min_width: int | float | Sequence[int] = 1,
                     multiple: int = 1) -> BudgetResult:
  """One kept fraction ``f`` for every decision, the largest whose cost is at most the target.

  ``width_d(f) = round_width(max(ceil(f * size_d), min_width), size_d, multiple=multiple)`` (rounded up to a
  multiple, capped at the size). The widths change only at ``f = k / size_d``, so the search bisects over those
  breakpoints (exact, about ``log2(sum(sizes))`` cost evaluations). Where the largest fraction under the target
  misses the band ``|cost - target| <= tolerance * target`` and the next breakpoint lands in it, that one is taken.

  >>> res = allocate_uniform([10, 20], lambda w: {"macs": float(sum(w))}, 15.0)
  >>> res.widths, res.value, res.reached
  ((5, 10), 0.5, True)

  Args:
    sizes: the dense channel count of every decision.
    cost_fn: widths -> ``{name: value}``, increasing in every width.
    target: the value of ``cost_fn(widths)[key]`` to reach.
    key: which cost to target.
    tolerance: relative band around the target.
    min_width: the fewest channels a decision keeps (capped at its size): a count ``>= 1``, a fraction in
      ``(0, 1)`` of each size, or one count per decision (:func:`min_widths`).
    multiple: round every width up to a multiple of this (capped at the size).

  Returns:
    A :class:`BudgetResult` (``method="uniform"``, ``value`` the fraction, no ``keep``: uniform knows no scores).

  Raises:
    ValueError: bad arguments, or a target outside ``[cost at min widths, dense cost]`` (widened by the tolerance;
      the message gives the range).
  """
  sizes = _check_sizes(sizes)
  target, multiple = _check_common(target, tolerance, multiple, key)
  floor = min_widths(min_width, sizes, name="min_width")
  fractions = np.unique(np.concatenate([[0.0]] + [np.arange(1, s + 1) / s for s in sizes]))

  def widths_at(i: int) -> list[int]:
    f = float(fractions[i])
    # The small slack keeps k / size_d from rounding up to k + 1 (float division then multiplication).
    return [round_width(max(math.ceil(f * s - 1e-9), int(m)), s, multiple=multiple) for s, m in zip(sizes, floor)]

  best, reachable, trace = _family_search(cost_fn, key, target, float(tolerance), len(fractions),
                                          lambda i: float(fractions[i]), widths_at)
  return BudgetResult("uniform", best.widths, dict(best.costs), key, target,
                      within(best.costs[key], target, float(tolerance)), reachable, tuple(trace), None, best.value)


def allocate_global(scores: Sequence[Any], cost_fn: CostFn, target: float, *, key: str = "macs",
                    normalize: str = "l2", tolerance: float = 0.01, min_width: int | float | Sequence[int] = 1,
                    multiple: int = 1) -> BudgetResult:
  """One threshold ``t`` on every decision's normalised scores (:func:`~hsic_jax.criteria.normalize_scores`), the
  lowest whose cost is at most the target: decision ``d`` keeps its channels with ``s_hat >= t``, at least
  ``min_width`` of them, their count rounded up to ``multiple`` by adding the next best channels (ties to the lower
  index; capped at the size).

  The widths change only at the scores' distinct values, so the search bisects over those (about
  ``log2(sum(sizes))`` cost evaluations); the band rule is that of :func:`allocate_uniform`.

  >>> res = allocate_global([[0.9, 0.1], [0.5, 0.4]], lambda w: {"macs": float(sum(w))}, 3.0, normalize="none")
  >>> res.widths, [k.tolist() for k in res.keep], res.value
  ((1, 2), [[0], [0, 1]], 0.4)

  Args:
    scores: per decision, one score per channel (higher kept first), e.g. from
      :func:`~hsic_jax.criteria.channel_scores`.
    cost_fn, target, key, tolerance, min_width, multiple: as in :func:`allocate_uniform`.
    normalize: ``"l2"``, ``"max"``, ``"sum"`` or ``"none"``.

  Returns:
    A :class:`BudgetResult` (``method="global"``, ``value`` the threshold, ``extras["normalize"]``).

  Raises:
    ValueError: bad arguments, or a target outside the reachable range (the message gives it).
  """
  target, multiple = _check_common(target, tolerance, multiple, key)
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
  raw = check_scores(scores)
  norm = [normalize_scores(s, normalize=normalize) for s in raw]
  sizes = [s.size for s in raw]
  floor = min_widths(min_width, sizes, name="min_width")
  ascending = [np.sort(s) for s in norm]
  thresholds = np.unique(np.concatenate(norm))[::-1]  # high to low: index 0 keeps the least

  def counts_at(i: int) -> list[int]:
    if i == 0:
      return [0] * len(sizes)  # the minimum widths, below every threshold
    t = thresholds[i - 1]
    return [int(s.size - np.searchsorted(s, t, side="left")) for s in ascending]

  def widths_at(i: int) -> list[int]:
    return [round_width(max(k, int(m)), n, multiple=multiple) for k, n, m in zip(counts_at(i), sizes, floor)]

  best, reachable, trace = _family_search(cost_fn, key, target, float(tolerance), len(thresholds) + 1,
                                          lambda i: None if i == 0 else float(thresholds[i - 1]), widths_at)
  keep = tuple(keep_top_k(s, w) for s, w in zip(raw, best.widths))
  return BudgetResult("global", best.widths, dict(best.costs), key, target,
                      within(best.costs[key], target, float(tolerance)), reachable, tuple(trace), keep, best.value,
                      {"normalize": normalize})
