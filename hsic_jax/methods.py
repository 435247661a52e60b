"""Selection methods behind one registry: the evidence each needs, and widths (and channels) under a cost target.

A selection method maps what calibration gathered (:class:`Evidence`), a cost function (``widths -> {"macs": ..,
"params": ..}``, see :mod:`hsic_jax.budget`) and a target to a :class:`~hsic_jax.budget.BudgetResult`. The
built-in methods:

======== ================================================================================ ==========
name     widths                                                                           needs
======== ================================================================================ ==========
apib     one HSIC Lasso penalty for all decisions (:func:`hsic_jax.global_lambda_search`) problems
itpruner ITPruner's importances, integer allocation (:func:`hsic_jax.allocate_widths`)    similarity
uniform  one kept fraction for every decision (:func:`hsic_jax.allocate_uniform`)         --
global   one threshold on normalised scores (:func:`hsic_jax.allocate_global`)            scores
======== ================================================================================ ==========

The *criterion* fills the widths with channels: ``"hsic_lasso"`` (APIB's own support, or exactly ``k`` channels
by :func:`hsic_jax.select_k`: it needs the ``problems``) or a criterion of :mod:`hsic_jax.criteria` (its top
``scores``). :func:`method_needs` says what a method and a criterion need together; :func:`select` runs both.

Evidence kinds: ``problems`` (one :class:`~hsic_jax.LassoProblem` per decision), ``similarity`` (the ``(l, l)``
normalised HSIC between the decisions' activations) and ``scores`` (one score per channel of every decision).

Users add methods with :func:`register_method`:

>>> import numpy as np
>>> from hsic_jax import budget
>>> def half(evidence, cost, target, *, key, sizes, multiple, settings, progress=None):
...   widths = tuple(max(s // 2, 1) for s in sizes)
...   costs = budget.costs_at(cost, widths, (key,))
...   return budget.BudgetResult("half", widths, costs, key, target, costs[key] <= target, (0.0, costs[key]))
>>> register_method("half", half, needs=())
>>> res = select("half", "l1", Evidence(scores=[np.arange(4.0)]), lambda w: {"macs": float(sum(w))}, 3.0,
...              key="macs", sizes=[4], multiple=1, settings={})
>>> res.widths, [k.tolist() for k in res.keep]
((2,), [[2, 3]])
>>> unregister_method("half")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from hsic_jax import allocation, budget, criteria, search
from hsic_jax._registry import Registry
from hsic_jax.budget import BudgetPoint, BudgetResult, CostFn
from hsic_jax.problem import LassoProblem, stack_problems
from hsic_jax.selection import select_k

EVIDENCE = frozenset({"problems", "similarity", "scores"})
HSIC_LASSO = "hsic_lasso"  # the criterion that keeps channels by HSIC Lasso (from the problems)


@dataclasses.dataclass(frozen=True)
class Evidence:
  """What calibration gathered, per decision (``None`` where a method and criterion do not need it)."""

  problems: Sequence[LassoProblem] | None = None
  similarity: Any = None
  scores: Sequence[np.ndarray] | None = None


class MethodFn(Protocol):
  """``fn(evidence, cost, target, *, key, sizes, multiple, settings, progress) -> BudgetResult``.

  ``sizes`` are the dense channel counts of the decisions, ``multiple`` the rounding of widths, ``settings`` the
  method's settings (a mapping; the program passes its ``select`` config), ``progress`` a callback for every
  evaluated point (or ``None``).
  """

  def __call__(self, evidence: Evidence, cost: CostFn, target: float, *, key: str, sizes: Sequence[int],
               multiple: int, settings: Mapping[str, Any],
               progress: Callable[[Any], None] | None = None) -> BudgetResult:
    ...


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered selection method.

  Attributes:
    name: its name.
    fn: the method (:class:`MethodFn`).
    needs: the evidence it needs for the widths (a subset of :data:`EVIDENCE`).
    keeps: the evidence its result's ``keep`` comes from (``"problems"``: HSIC Lasso, ``"scores"``: the
      criterion's), used when the criterion is that evidence; ``None``: the criterion always picks the channels.
    record: the result as a JSON-able dict (what the program writes to its ``selection.json``).
  """

  name: str
  fn: MethodFn
  needs: frozenset[str]
  keeps: str | None
  record: Callable[[BudgetResult], dict[str, Any]]


_REGISTRY: Registry[Method] = Registry("selection method")


def default_record(result: BudgetResult) -> dict[str, Any]:
  """``{"value", "reachable", "extras"}`` of a result: the record of a method registered without one."""
  return {"value": result.value, "reachable": list(result.reachable), "extras": dict(result.extras)}


def register_method(name: str, fn: MethodFn, *, needs: Iterable[str], keeps: str | None = None,
                    record: Callable[[BudgetResult], dict[str, Any]] | None = None, replace: bool = False) -> None:
  """Adds a selection method to the registry, so that :func:`select` and the program can use it by name.

  Raises:
    ValueError: ``name`` is not a non-empty string or is taken (and not ``replace``), ``fn`` or ``record`` is not
      callable, or ``needs`` / ``keeps`` name evidence other than ``"problems"``, ``"similarity"``, ``"scores"``.
  """
  if not callable(fn):
    raise ValueError(f"fn must be callable, got {type(fn).__name__}")
  if isinstance(needs, str) or not isinstance(needs, Iterable):
    raise ValueError(f"needs must be a set of strings among {sorted(EVIDENCE)}, got {needs!r}")
  needs = frozenset(needs)
  if not needs <= EVIDENCE:
    raise ValueError(f"needs must be a subset of {sorted(EVIDENCE)}, got unknown {sorted(needs - EVIDENCE)}")
  if keeps not in (None, "problems", "scores"):
    raise ValueError(f"keeps must be None, 'problems' or 'scores', got {keeps!r}")
  if record is not None and not callable(record):
    raise ValueError(f"record must be callable, got {type(record).__name__}")
  _REGISTRY.add(name, Method(name, fn, needs, keeps, record or default_record), replace=replace)


def unregister_method(name: str) -> None:
  """Removes a selection method from the registry.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  _REGISTRY.remove(name)


def method_names() -> tuple[str, ...]:
  """Names of the registered selection methods, the built-ins first.

  >>> method_names()[:4]
  ('apib', 'itpruner', 'uniform', 'global')
  """
  return _REGISTRY.names()


def get_method(name: Any) -> Method:
  """The registered method ``name``.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  return _REGISTRY.get(name)


def method_needs(name: str, criterion: str) -> frozenset[str]:
  """The evidence that method ``name`` with ``criterion`` needs: the method's, and ``problems`` for
  ``"hsic_lasso"`` or ``scores`` for a criterion of :mod:`hsic_jax.criteria`.

  >>> sorted(method_needs("itpruner", "l1"))
  ['scores', 'similarity']

  Raises:
    ValueError: an unknown method or criterion, or a method that ranks a criterion's scores with
      ``"hsic_lasso"``, which has none.
  """
  method = get_method(name)
  if criterion != HSIC_LASSO and criterion not in criteria.criterion_names():
    raise ValueError(f"unknown criterion {criterion!r}; expected {HSIC_LASSO!r} or one of "
                     f"{list(criteria.criterion_names())}")
  if "scores" in method.needs and criterion == HSIC_LASSO:
    solving = [m.name for m in _REGISTRY.values() if "problems" in m.needs]
    raise ValueError(f"selection method {name!r} ranks a criterion's scores, and {HSIC_LASSO!r} has none: choose a "
                     f"criterion of {list(criteria.criterion_names())}, or for HSIC Lasso a method that solves its "
                     f"problems: {solving}")
  return method.needs | {"problems" if criterion == HSIC_LASSO else "scores"}


def lasso_keep(problems: Sequence[LassoProblem], widths: Sequence[int], *, positive: bool,
               fill: str = "relevance") -> list[np.ndarray]:
  """Exactly ``widths[d]`` channels of each decision by HSIC Lasso (:func:`hsic_jax.select_k`, a width beyond the
  Lasso support filled by ``fill``: ``"relevance"`` or ``"residual"``), problems of one channel count solved in
  one batched call."""
  keep: list[np.ndarray] = [np.empty(0, np.int64)] * len(problems)
  sizes = [int(p.num_channels) for p in problems]
  for c in sorted(set(sizes)):
    idx = [i for i, s in enumerate(sizes) if s == c]
    stacked, _ = stack_problems([problems[i] for i in idx])
    sel = select_k(stacked, np.asarray([widths[i] for i in idx], np.int32), positive=positive, fill=fill)
    mask = np.asarray(sel.selected)
    for j, i in enumerate(idx):
      keep[i] = np.flatnonzero(mask[j])
  return keep


def select(name: str, criterion: str, evidence: Evidence, cost: CostFn, target: float, *, key: str,
           sizes: Sequence[int], multiple: int, settings: Mapping[str, Any],
           progress: Callable[[Any], None] | None = None) -> BudgetResult:
  """The widths of method ``name`` and the channels of ``criterion`` that fill them.

  The result's ``keep`` is the method's own where it comes from the criterion's evidence (APIB's support for
  ``"hsic_lasso"``, the global threshold's top scores), else the criterion's: :func:`lasso_keep` for
  ``"hsic_lasso"`` (``settings["positive"]``, default ``True``; ``settings["fill"]``, default ``"relevance"``),
  :func:`hsic_jax.criteria.keep_for_widths` otherwise.

  The built-in methods read ``settings["omega"]``, the width floor, as :func:`hsic_jax.min_widths` does: a count,
  a fraction in ``(0, 1)`` of each dense width, or one count per decision.

  Raises:
    ValueError: as :func:`method_needs`, evidence it needs missing, and the method's own errors (an unreachable
      target, ...).
  """
  method = get_method(name)
  need = method_needs(name, criterion)
  missing = sorted(k for k in need if getattr(evidence, k) is None)
  if missing:
    raise ValueError(f"selection method {name!r} with criterion {criterion!r} needs evidence {missing}")
  result = method.fn(evidence, cost, target, key=key, sizes=list(sizes), multiple=multiple, settings=settings,
                     progress=progress)
  widths = [int(w) for w in result.widths]
  own = "problems" if criterion == HSIC_LASSO else "scores"
  if result.keep is not None and method.keeps == own:
    keep = list(result.keep)
  elif criterion == HSIC_LASSO:
    keep = lasso_keep(evidence.problems, widths, positive=bool(settings.get("positive", True)),
                      fill=str(settings.get("fill", "relevance")))
  else:
    keep = criteria.keep_for_widths(evidence.scores, widths)
  keep = [np.sort(np.asarray(k, np.int64)) for k in keep]
  if [len(k) for k in keep] != widths:
    raise ValueError(f"the selection kept {[len(k) for k in keep]} channels where the widths are {widths}")
  return dataclasses.replace(result, keep=tuple(keep))


# ----------------------------------------------------------------------------------------------------------------
# Built-in methods.


def _apib(evidence: Evidence, cost: CostFn, target: float, *, key: str, sizes: Sequence[int], multiple: int,
          settings: Mapping[str, Any], progress: Callable[[Any], None] | None = None) -> BudgetResult:
  del sizes
  return search.global_lambda_search(
      evidence.problems, cost, target, key=key, tolerance=float(settings["tolerance"]), omega=settings["omega"],
      multiple=multiple, positive=bool(settings["positive"]), grid=int(settings["grid"]),
      max_steps=int(settings["max_steps"]), progress=progress)


def _apib_record(result: BudgetResult) -> dict[str, Any]:
  return {"lambda": result.value, "reachable": list(result.reachable),
          "search": [{"lambda": p.value, "widths": list(p.widths), **{k: float(v) for k, v in p.costs.items()},
                      "phase": p.phase} for p in result.trace]}


def _itpruner(evidence: Evidence, cost: CostFn, target: float, *, key: str, sizes: Sequence[int], multiple: int,
              settings: Mapping[str, Any], progress: Callable[[Any], None] | None = None) -> BudgetResult:
  """ITPruner: importances from the layer similarity (``settings["itpruner"]``: ``beta``, ``normalize``,
  ``solver``), widths under the target and, with ``settings["params_budget"]``, a parameter budget too."""
  del progress
  it = settings["itpruner"]
  importance = allocation.layer_importance(evidence.similarity, beta=float(it["beta"]),
                                           normalize=bool(it["normalize"]))
  budgets = {key: target}
  if settings.get("params_budget") and key != "params":
    budgets["params"] = float(settings["params_budget"])
  alloc = allocation.allocate_widths(np.asarray(importance), list(sizes), cost, budgets,
                                     min_width=settings["omega"], multiple=multiple,
                                     seed=int(settings.get("seed", 0)), solver=str(it["solver"]))
  # ITPruner's target is a budget: it is reached when every budget holds, however much of it the widths use.
  reached = all(alloc.costs[k] <= v * (1 + 1e-9) for k, v in budgets.items())
  return dataclasses.replace(alloc, reached=reached, extras={
      **alloc.extras, "similarity": np.asarray(evidence.similarity).tolist(),
      "importance": np.asarray(importance).tolist(), "beta": float(it["beta"])})


def _itpruner_record(result: BudgetResult) -> dict[str, Any]:
  ex = result.extras
  return {"similarity": ex["similarity"], "importance": ex["importance"], "beta": ex["beta"],
          "budgets": ex["budgets"], "solver": ex["solver"], "allocation": {
              "widths": list(result.widths), "objective": ex["objective"], "dense_objective": ex["dense_objective"],
              "costs": dict(result.costs), "budgets": ex["budgets"],
              "feasible": all(result.costs[k] <= b for k, b in ex["budgets"].items()),
              "relaxed_objective": ex["relaxed_objective"],
              "reachable": {k: list(v) for k, v in ex["reachable"].items()},
              "starts": [dataclasses.asdict(s) for s in result.trace], "cost_calls": ex["cost_calls"],
              "seconds": ex["seconds"], "solver": ex["solver"]}}


def _uniform(evidence: Evidence, cost: CostFn, target: float, *, key: str, sizes: Sequence[int], multiple: int,
             settings: Mapping[str, Any], progress: Callable[[Any], None] | None = None) -> BudgetResult:
  del evidence, progress
  return budget.allocate_uniform(list(sizes), cost, target, key=key, tolerance=float(settings["tolerance"]),
                                 min_width=settings["omega"], multiple=multiple)


def _global(evidence: Evidence, cost: CostFn, target: float, *, key: str, sizes: Sequence[int], multiple: int,
            settings: Mapping[str, Any], progress: Callable[[Any], None] | None = None) -> BudgetResult:
  del sizes, progress
  return budget.allocate_global(evidence.scores, cost, target, key=key, normalize=settings["global_normalize"],
                                tolerance=float(settings["tolerance"]), min_width=settings["omega"],
                                multiple=multiple)


def _point_dict(p: BudgetPoint) -> dict[str, Any]:
  return {"value": p.value, "widths": list(p.widths), "costs": dict(p.costs), "phase": p.phase}


def _score_record(result: BudgetResult) -> dict[str, Any]:
  return {"allocation": {
      "method": result.method, "value": result.value, "widths": list(result.widths), "costs": dict(result.costs),
      "target": result.target, "key": result.key, "within_tolerance": result.reached,
      "trace": [_point_dict(p) for p in result.trace], "reachable": list(result.reachable),
      "normalize": result.extras.get("normalize")}}


for _name, _fn, _needs, _keeps, _record in (
    ("apib", _apib, {"problems"}, "problems", _apib_record),
    ("itpruner", _itpruner, {"similarity"}, None, _itpruner_record),
    ("uniform", _uniform, set(), None, _score_record),
    ("global", _global, {"scores"}, "scores", _score_record),
):
  register_method(_name, _fn, needs=_needs, keeps=_keeps, record=_record)
