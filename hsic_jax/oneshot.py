"""Any Flax CNN pruned in one call: decisions, calibration, widths under a cost target, and the thin model.

:func:`prune_model` chains what the library offers for any NNX model, with nothing declared by hand:

1. the channel groups (:func:`hsic_jax.derive_model_groups`) and the decisions (:func:`hsic_jax.taps.decisions`);
2. the exact cost of any widths (:func:`hsic_jax.cost_fn`) and the target it must reach;
3. the evidence the selection method and criterion need (:func:`hsic_jax.method_needs`), from the calibration
   images: HSIC Lasso problems (:func:`hsic_jax.taps.calibration_problems`), ITPruner's layer similarity
   (:func:`hsic_jax.taps.similarity`), or a criterion's channel scores (:func:`hsic_jax.channel_scores`, with the
   activations of :func:`hsic_jax.taps.activations` or the loss gradients on labelled images);
4. widths and channels (:func:`hsic_jax.select`), and the thin model (:func:`hsic_jax.thin_model`).

The target. ``{"macs": r}`` or ``{"params": r}``: with ``0 < r <= 1``, the kept fraction of the dense model's count
(``{"macs": 0.5}`` keeps half the MACs, i.e. removes 50%); with ``r > 1``, an absolute count. This is the meaning of
the program's ``select.target`` with ``select.ratio`` or ``select.absolute``. APIB, uniform and global search the
widths whose cost lands within ``tolerance`` of the target; ITPruner treats it as a budget (cost at most the
target). A target outside what the minimum widths (``omega``) and the dense model allow raises the library's
reachable-range error (:func:`hsic_jax.budget.check_reachable`).

>>> from flax import nnx
>>> import jax.numpy as jnp, numpy as np
>>> model = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.relu,
...                        nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.relu,
...                        nnx.Conv(8, 4, (3, 3), rngs=nnx.Rngs(0)))
>>> images = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)
>>> res = prune_model(model, images, target={"macs": 0.6}, settings={"tolerance": 0.1})
>>> abs(res.pruned.macs / res.dense.macs - 0.6) <= 0.1 * 0.6
True
>>> res.model(images).shape
(16, 8, 8, 4)
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsic_jax import criteria, methods, taps
from hsic_jax._nnx_apply import pure_apply
from hsic_jax.costs import Cost, cost_fn
from hsic_jax.groups import ChannelGroup
from hsic_jax.jaxpr_groups import derive_model_groups
from hsic_jax.surgery import PrunePlan, prune, thin_model

__all__ = [
    "DEFAULT_SETTINGS",
    "GroupWidth",
    "PruneModelResult",
    "prune_model",
    "resolve_target",
]

# The selection methods' settings (hsic_jax.methods), at the program's defaults; ``settings=`` overrides them.
DEFAULT_SETTINGS: dict[str, Any] = {
    "tolerance": 0.01, "positive": True, "grid": 24, "max_steps": 40, "fill": "relevance",
    "global_normalize": "l2", "params_budget": None,
    "itpruner": {"beta": 500.0, "normalize": True, "kernel": "linear", "solver": "reference"},
}


class GroupWidth(NamedTuple):
  """A decision's group at its dense and its pruned width."""

  dense: int
  pruned: int


@dataclasses.dataclass(frozen=True)
class PruneModelResult:
  """What :func:`prune_model` returns.

  Attributes:
    model: the thin model (a new module; the input model is not changed).
    plan: the cut, re-applicable to the dense state with :func:`hsic_jax.apply_plan` and ``groups``.
    groups: the channel groups the plan names (derived, unless given).
    widths: per decision's group name, its dense and pruned width.
    dense: the dense model's :class:`~hsic_jax.Cost`.
    pruned: the thin model's :class:`~hsic_jax.Cost`.
    report: what the program's selection record holds: the method, criterion, target and tolerance, whether the
      target was reached, the decisions (name, group, size, kept), the kept channels, the method's own record
      (APIB: lambda and the search trace; ITPruner: importances and the allocation; ...) and the seconds of each
      step.
  """

  model: nnx.Module
  plan: PrunePlan
  groups: tuple[ChannelGroup, ...]
  widths: dict[str, GroupWidth]
  dense: Cost
  pruned: Cost
  report: dict[str, Any]


def resolve_target(target: Any, dense: Cost) -> tuple[str, float]:
  """``(key, absolute target)`` from ``{"macs" | "params": value}``: a value in ``(0, 1]`` is a fraction of the
  dense count, a larger one an absolute count.

  >>> resolve_target({"macs": 0.5}, Cost(1000, 10, ()))
  ('macs', 500.0)

  Raises:
    ValueError: not a one-entry mapping of ``"macs"`` or ``"params"`` to a finite number ``> 0``, or an absolute
      target above the dense count.
  """
  if not isinstance(target, Mapping) or len(target) != 1:
    raise ValueError(f"target must be a one-entry mapping like {{'macs': 0.5}} (a kept fraction) or "
                     f"{{'params': 1e6}} (an absolute count), got {target!r}")
  (key, value), = target.items()
  if key not in ("macs", "params"):
    raise ValueError(f"target's key must be 'macs' or 'params', got {key!r}")
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
     or value <= 0:
    raise ValueError(f"target[{key!r}] must be a finite number > 0 (a kept fraction in (0, 1] or a count), "
                     f"got {value!r}")
  full = float(getattr(dense, key))
  absolute = float(value) * full if value <= 1 else float(value)
  if absolute > full:
    raise ValueError(f"target {key} {absolute:,.0f} is above the dense model's {full:,.0f}; expected a target in "
                     f"(0, {full:,.0f}] (or a fraction in (0, 1])")
  return key, absolute


def _split_batches(calib_batches: Any, labels: Any) -> tuple[list[Any], list[Any] | None]:
  """Calibration inputs per batch, and their labels per batch (``None`` when none were given)."""
  def is_pair(b: Any) -> bool:
    return (isinstance(b, tuple) and len(b) == 2 and np.ndim(b[1]) == 1 and np.ndim(b[0]) >= 2
            and np.shape(b[1])[0] == np.shape(jax.tree_util.tree_leaves(b[0])[0])[0]
            and np.issubdtype(np.asarray(b[1]).dtype, np.integer))

  if hasattr(calib_batches, "shape") or is_pair(calib_batches):
    calib_batches = [calib_batches]
  if isinstance(calib_batches, (str, bytes, Mapping)) or not isinstance(calib_batches, Iterable):
    raise ValueError(f"calib_batches must be an array, or an iterable of arrays or of (images, labels), got "
                     f"{type(calib_batches).__name__}")
  inputs, found = [], []
  for b in calib_batches:
    if is_pair(b):
      inputs.append(b[0])
      found.append(np.asarray(b[1]))
    else:
      inputs.append(b)
  if not inputs:
    raise ValueError("calib_batches is empty; expected at least one batch of calibration images")
  if found and len(found) != len(inputs):
    raise ValueError("calib_batches mixes (images, labels) pairs with unlabelled batches; label all or none")
  if labels is not None:
    if found:
      raise ValueError("labels were given both in calib_batches and as labels=; give them once")
    flat = np.asarray(labels)
    counts = [np.shape(jax.tree_util.tree_leaves(b)[0])[0] for b in inputs]
    if flat.ndim != 1 or flat.shape[0] != sum(counts):
      raise ValueError(f"labels must be a 1-D array of one label per calibration image ({sum(counts)}), got shape "
                       f"{flat.shape}")
    found = np.split(flat, np.cumsum(counts)[:-1])
  return inputs, (found or None)


def _loss_gradients(model: nnx.Module, inputs: Sequence[Any], labels: Sequence[Any], bn_mode: str) -> Any:
  """Gradient of the mean softmax cross-entropy over all calibration images with respect to the model's state
  (a pure dict with its paths): what the first-order Taylor criterion reads."""
  apply, pure = pure_apply(model, bn_mode)

  @jax.jit
  def grad(p: Any, args: Any, y: Any) -> Any:
    def loss(q: Any) -> Any:
      logits = apply(q, *args)
      return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return jax.grad(loss)(p)

  total = None
  n = 0
  for b, y in zip(inputs, labels):
    args = tuple(b) if isinstance(b, (tuple, list)) else (b,)
    g = grad(pure, args, jnp.asarray(y))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    n += len(y)
  return jax.tree.map(lambda t: np.asarray(t) / n, total)


def prune_model(model: nnx.Module, calib_batches: Any, *, target: Mapping[str, float] | None = None,
                method: str = "apib", criterion: str | None = None, labels: Any = None,
                omega: int | float | Sequence[int] = 1, round_to: int = 1, example_args: tuple[Any, ...] | None = None,
                groups: Sequence[ChannelGroup] | None = None, bn_mode: str = "batch",
                calibration: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None,
                seed: int = 0) -> PruneModelResult:
  """Prunes the channels of any NNX CNN to a cost target in one call (see the module docstring for the steps).

  Args:
    model: the dense NNX model (not changed).
    calib_batches: the calibration images: an array (one batch), or an iterable of arrays or of
      ``(images, labels)`` pairs (a multi-input model's batch is a tuple of its arrays).
    target: ``{"macs": r}`` or ``{"params": r}``, ``r`` in ``(0, 1]`` a kept fraction of the dense count, or an
      absolute count above 1; default ``{"macs": 0.5}``.
    method: a selection method of :func:`hsic_jax.method_names` (``"apib"``, ``"itpruner"``, ``"uniform"``,
      ``"global"``, or one registered).
    criterion: which channels fill the widths: ``"hsic_lasso"`` or a criterion of
      :func:`hsic_jax.criterion_names`; default ``"hsic_lasso"`` for ``"apib"``, ``"l1"`` otherwise (ITPruner's
      reference fill).
    labels: one class label per calibration image, when ``calib_batches`` holds none and the criterion needs loss
      gradients (``"taylor"``).
    omega: the width floor of every decision: a count, a fraction in ``(0, 1)`` of each dense width, or one count
      per decision (:func:`hsic_jax.min_widths`).
    round_to: widths rounded up to a multiple of this (capped at the dense width).
    example_args: the model's inputs for tracing (shapes matter); default the first batch.
    groups: the channel groups; default :func:`hsic_jax.derive_model_groups` of ``example_args``.
    bn_mode: BatchNorm on each batch's statistics (``"batch"``, APIB's) or the running ones (``"running"``),
      during calibration.
    calibration: keyword options of :func:`hsic_jax.taps.calibration_problems`: ``target`` (``Y``),
      ``consumers``, ``bandwidth``, ``normalized``.
    settings: the selection method's settings, over :data:`DEFAULT_SETTINGS` (``tolerance``, APIB's ``grid``,
      ``max_steps`` and ``positive``, ``fill``, ``global_normalize``, ITPruner's ``itpruner`` dict and
      ``params_budget``).
    seed: seed of random criteria and of ITPruner's starts.

  Returns:
    A :class:`PruneModelResult`.

  Raises:
    ValueError: bad arguments (named), no prunable group, batches of different shapes, an unknown method or
      criterion, evidence that needs labels without any, and a target outside the reachable range (the message
      gives the range).
  """
  times: dict[str, float] = {}
  t0 = time.perf_counter()
  target = {"macs": 0.5} if target is None else target
  if criterion is None:
    criterion = methods.HSIC_LASSO if method == "apib" else "l1"
  need = methods.method_needs(method, criterion)
  inputs, batch_labels = _split_batches(calib_batches, labels)
  if example_args is None:
    first = inputs[0]
    example_args = tuple(first) if isinstance(first, (tuple, list)) else (first,)
  if groups is None:
    groups = derive_model_groups(model, *example_args)
  groups = list(groups)
  decs = taps.decisions(model, *example_args, groups=groups)
  cost = cost_fn(model, *example_args, groups=groups)
  dense = cost()
  key, absolute = resolve_target(target, dense)
  sizes = [int(d.group.size) for d in decs]

  def decision_cost(widths: Sequence[int]) -> dict[str, float]:
    c = cost({d.group.name: int(w) for d, w in zip(decs, widths)})
    return {"macs": float(c.macs), "params": float(c.params)}

  times["setup"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  options = dict(calibration or {})
  unknown = sorted(set(options) - {"target", "consumers", "bandwidth", "normalized"})
  if unknown:
    raise ValueError(f"calibration has unknown options {unknown}; expected target, consumers, bandwidth, normalized")
  merged = copy.deepcopy(DEFAULT_SETTINGS)
  for k, v in (settings or {}).items():
    merged[k] = {**merged[k], **v} if isinstance(merged.get(k), dict) and isinstance(v, Mapping) else v
  merged.update(omega=omega, seed=int(seed))
  problems = similarity = scores = None
  if "problems" in need:
    _, problems = taps.calibration_problems(model, inputs, decisions=decs, bn_mode=bn_mode, **options)
  cneeds = criteria.criterion_needs(criterion) if criterion != methods.HSIC_LASSO else frozenset()
  acts = None
  if "similarity" in need or "activations" in cneeds:
    acts = taps.activations(model, inputs, decisions=decs, bn_mode=bn_mode)
  if "similarity" in need:
    similarity = taps.similarity(None, None, kernel=merged["itpruner"]["kernel"], acts=acts)
  if "scores" in need:
    grads = None
    if "grads" in cneeds:
      if batch_labels is None:
        raise ValueError(f"criterion {criterion!r} needs loss gradients: give calib_batches as (images, labels) "
                         "pairs or pass labels=")
      grads = _loss_gradients(model, inputs, batch_labels, bn_mode)
    state = nnx.to_pure_dict(nnx.state(model))
    scores = [criteria.channel_scores(criterion, d.group, state=state, grads=grads, seed=int(seed),
                                      activations=None if "activations" not in cneeds else acts[i])
              for i, d in enumerate(decs)]
  times["calibrate"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  result = methods.select(method, criterion, methods.Evidence(problems, similarity, scores), decision_cost, absolute,
                          key=key, sizes=sizes, multiple=round_to, settings=merged)
  times["select"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  keep = {d.group.name: [int(i) for i in k] for d, k in zip(decs, result.keep)}
  plan = prune(nnx.to_pure_dict(nnx.state(model)), groups, keep).plan
  thin = thin_model(model, groups, plan, *example_args)
  times["thin"] = time.perf_counter() - t0
  pruned = cost({d.group.name: len(k) for d, k in zip(decs, result.keep)})
  report = {
      "method": method, "criterion": criterion, "target_key": key, "target": absolute,
      "tolerance": float(merged["tolerance"]), "within_tolerance": bool(result.reached),
      "costs": {"macs": float(pruned.macs), "params": float(pruned.params)},
      "dense": {"macs": float(dense.macs), "params": float(dense.params)},
      "decisions": [{"decision": d.name, "group": d.group.name, "size": d.group.size, "kept": len(k),
                     "consumers": list(d.consumers)} for d, k in zip(decs, result.keep)],
      "keep": keep, "round_to": int(round_to), "omega": omega, "bn_mode": bn_mode,
      **methods.get_method(method).record(result), "seconds": times}
  widths = {d.group.name: GroupWidth(int(d.group.size), len(k)) for d, k in zip(decs, result.keep)}
  return PruneModelResult(thin, plan, tuple(groups), widths, dense, pruned, report)
