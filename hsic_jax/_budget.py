"""What every allocator of widths under a cost budget shares (re-exported by :mod:`hsic_jax.budget`).

A private module of its own because :mod:`hsic_jax.surgery` (which rounds widths) sits below the allocators: it
imports nothing of the library but :mod:`hsic_jax._checks`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from hsic_jax._checks import check_count  # the one integer check of the library, re-exported here

CostFn = Callable[[Sequence[int]], Mapping[str, float]]
P = TypeVar("P")

__all__ = ["BudgetPoint", "BudgetResult", "CostFn", "bisect", "check_count", "check_reachable", "check_target",
           "check_tolerance", "costs_at", "min_widths", "round_width", "within"]


# ----------------------------------------------------------------------------------------------------------------
# The shared checks.


def check_tolerance(tolerance: Any) -> float:
  """``tolerance`` as a float in ``[0, 1)`` (the relative band ``|cost - target| <= tolerance * target``)."""
  if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float, np.floating)) and 0 <= tolerance < 1):
    raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
  return float(tolerance)


def check_target(target: Any, name: str = "target") -> float:
  """``target`` as a finite float ``> 0``."""
  if isinstance(target, bool) or not (isinstance(target, (int, float, np.number)) and math.isfinite(target)
                                      and target > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {target!r}")
  return float(target)


def _fmt(v: float) -> str:
  return f"{v:,.0f}" if abs(v) >= 1e6 else f"{v:.6g}"


def check_reachable(key: str, target: float, lowest: float, highest: float, *, tolerance: float = 0.0,
                    above: bool = True, what: str = "the allocation", low: str = "every decision at its minimum width",
                    high: str = "dense") -> None:
  """Raises ValueError unless ``lowest * (1 - tolerance) <= target <= highest * (1 + tolerance)``: the one error of
  every allocator for a target it cannot reach, giving the range.

  ``above=False`` checks the lower end only (a budget above the dense cost is met by the dense widths). ``what``
  names the allocator, ``low`` and ``high`` what the two ends are, in the message.

  >>> check_reachable("macs", 5.0, 4.0, 8.0)
  >>> check_reachable("macs", 2.0, 4.0, 8.0)
  Traceback (most recent call last):
  ...
  ValueError: target macs 2 is outside what the allocation can reach: reachable range [4, 8] (every decision at its \
minimum width to dense); expected a target in that range (as a ratio of the highest: 0.5000 to 1)
  """
  if lowest * (1 - tolerance) <= target and (not above or target <= highest * (1 + tolerance)):
    return
  ratio = f" (as a ratio of the highest: {lowest / highest:.4f} to 1)" if highest > 0 else ""
  raise ValueError(f"target {key} {_fmt(target)} is outside what {what} can reach: reachable range "
                   f"[{_fmt(lowest)}, {_fmt(highest)}] ({low} to {high}); expected a target in that range{ratio}")


def within(value: float, target: float, tolerance: float) -> bool:
  """Whether ``|value - target| <= tolerance * target``."""
  return abs(value - target) <= tolerance * target


def round_width(k: int, size: int, *, multiple: int = 1) -> int:
  """Rounds a channel count up to a multiple, within ``[1, size]``: ``min(size, multiple * ceil(max(k, 1) / m))``.

  Hardware prefers widths that are multiples of 8 (GPU) or 128 (TPU); a group never becomes empty, and a width
  rounded past the group's size is capped at the size.

  >>> round_width(13, 64, multiple=8), round_width(0, 64, multiple=8), round_width(60, 64, multiple=16)
  (16, 8, 64)

  Raises:
    ValueError: if ``size < 1`` or ``multiple < 1``.
  """
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  return min(size, multiple * math.ceil(max(int(k), 1) / multiple))


def min_widths(omega: Any, sizes: Sequence[int], *, name: str = "omega") -> np.ndarray:
  """The fewest channels each decision keeps: ``min(omega, c_d)`` for a count, ``ceil(omega * c_d)`` for a fraction.

  A count (one for all decisions, or one per decision) follows :func:`check_count`, the library's one integer
  contract; only a float strictly between 0 and 1 is a fraction.

  Args:
    omega: an integer ``>= 1`` (a count; an integral float such as ``2.0`` is one too), a float in ``(0, 1)`` (a
      fraction of each dense width, e.g. ``0.1``), or one count ``>= 1`` per decision.
    sizes: the dense width ``c_d`` of every decision.
    name: the argument's name in error messages.

  Returns:
    Per-decision counts (int64), each in ``[1, c_d]``.

  Raises:
    ValueError: zero, a negative, NaN or infinity, a float ``>= 1`` that is not an integer, a boolean, or a sequence
      of the wrong length or with a value that is not an integer ``>= 1``.

  >>> min_widths(0.1, [16, 64]).tolist(), min_widths(3, [16, 2]).tolist()
  ([2, 7], [3, 2])
  """
  sizes_arr = np.asarray([int(s) for s in sizes], np.int64)
  if isinstance(omega, (float, np.floating)) and 0 < omega < 1:
    # The slack keeps a product such as 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
    per = np.ceil(float(omega) * sizes_arr - 1e-9).astype(np.int64)
  elif isinstance(omega, (int, float, np.number, np.bool_)):
    try:
      per = np.full(sizes_arr.shape, check_count(name, omega, 1), np.int64)
    except ValueError as err:
      raise ValueError(f"{name} must be an integer >= 1 (a count of channels) or a fraction in (0, 1) of each "
                       f"decision's dense width, got {omega!r}") from err
  else:
    if isinstance(omega, (str, bytes)) or not isinstance(omega, Iterable):
      raise ValueError(f"{name} must be an integer >= 1, a fraction in (0, 1) or one count per decision, got "
                       f"{omega!r}")
    seq = list(omega)
    if len(seq) != sizes_arr.size:
      raise ValueError(f"{name} as a sequence must hold one integer >= 1 per decision ({sizes_arr.size}), got "
                       f"{seq!r}")
    per = np.asarray([check_count(f"{name}[{d}]", v, 1) for d, v in enumerate(seq)], np.int64)
  return np.clip(per, 1, sizes_arr)


def costs_at(cost_fn: CostFn, widths: Sequence[int], keys: Iterable[str]) -> dict[str, float]:
  """``cost_fn(widths)`` as ``{name: float}`` (every key it returns), checked to hold each of ``keys``, finite.

  Raises:
    ValueError: ``cost_fn`` returns no mapping, lacks a key, or gives a non-finite value for one.
  """
  widths = [int(w) for w in widths]
  out = cost_fn(widths)
  if not isinstance(out, Mapping):
    raise ValueError(f"cost_fn must return a mapping of cost names to values, got {out!r}")
  for k in keys:
    if k not in out:
      raise ValueError(f"cost_fn must return a mapping with key {k!r}, got {sorted(out)}")
    if not math.isfinite(float(out[k])):
      raise ValueError(f"cost_fn returned a non-finite {k} {out[k]!r} at widths {widths}")
  return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# The result type.


@dataclasses.dataclass(frozen=True)
class BudgetPoint:
  """One evaluated point of an allocator's trace.

  Attributes:
    value: the searched parameter there: the penalty ``lam`` (APIB), the kept fraction (uniform), the threshold
      (global); ``None`` for the minimum widths of a score allocation.
    widths: the widths it gives.
    costs: the cost function's values there (every key it returns).
    phase: how it was found: ``"grid"``, ``"bisect"``, ``"fill"`` or ``"bound"``.
  """

  value: float | None
  widths: tuple[int, ...]
  costs: Mapping[str, float]
  phase: str


@dataclasses.dataclass(frozen=True)
class BudgetResult:
  """Widths reached under a budget, as every allocator returns them.

  Attributes:
    method: the allocator: ``"lambda_search"``, ``"uniform"``, ``"global"``, ``"itpruner"`` (or
      ``"itpruner_reference"``), or a user-registered selection method's name.
    widths: kept channels per decision.
    costs: the cost function's values at ``widths`` (every key it returns).
    key: the targeted cost (the first budget of :func:`hsic_jax.allocate_widths`).
    target: the target (or budget) of ``costs[key]``.
    reached: whether the target was reached: ``|costs[key] - target| <= tolerance * target`` for a target, every
      budget held for budgets.
    reachable: ``(lowest, highest)`` ``costs[key]`` the allocator could reach.
    trace: every point evaluated, in order (:class:`BudgetPoint`; the starts of :func:`hsic_jax.allocate_widths`).
    keep: kept channel indices per decision (sorted), where the allocator chose them; else ``None``.
    value: the chosen parameter (``lam``, fraction, threshold), where there is one.
    extras: method-specific values (ITPruner's objectives and budgets, the score normalisation, ...).
  """

  method: str
  widths: tuple[int, ...]
  costs: Mapping[str, float]
  key: str
  target: float
  reached: bool
  reachable: tuple[float, float]
  trace: tuple[Any, ...] = ()
  keep: tuple[np.ndarray, ...] | None = None
  value: float | None = None
  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Bisection.


def bisect(below: P, above: P, *, midpoint: Callable[[P, P], Any], evaluate: Callable[[Any, P, P], P],
           is_below: Callable[[P], bool], stop: Callable[[P], bool] = lambda p: False,
           max_steps: int | None = None) -> tuple[P, P, P | None]:
  """Bisection between ``below`` (cost at most the target) and ``above`` (cost over it) of a monotone family.

  Each step evaluates ``evaluate(midpoint(below, above), below, above)`` and replaces ``below`` or ``above`` with
  it (``is_below``), until ``midpoint`` returns ``None`` (the bracket is as tight as the family allows), ``stop``
  holds for a point (it is returned third), or ``max_steps`` steps.

  >>> cost = lambda i: 3 * i  # the largest i with cost <= 10 is 3
  >>> bisect(0, 9, midpoint=lambda a, b: None if b - a <= 1 else (a + b) // 2, evaluate=lambda m, a, b: m,
  ...        is_below=lambda i: cost(i) <= 10)
  (3, 4, None)

  Returns:
    ``(below, above, stopped)``: the final bracket and the point that stopped it (``None`` if none did).
  """
  steps = 0
  while max_steps is None or steps < max_steps:
    mid = midpoint(below, above)
    if mid is None:
      break
    steps += 1
    p = evaluate(mid, below, above)
    if stop(p):
      return below, above, p
    if is_below(p):
      below = p
    else:
      above = p
  return below, above, None
