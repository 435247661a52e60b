"""The whole APIB selection, timed per stage, against the procedure of APIB's reference code in the same run.

``python -m benchmarks.selection_e2e [--quick] [--no-readme] [--out DIR] [--shared DIR] [--ref-budget S]``
(``--render`` rewrites the README block and the plot from the saved JSON.)

For each workload, hsic_jax runs the program's own code paths with the program's settings (``train.configs``):

1. **forward pass with taps**: :func:`train.calibrate.make_capture` (the taps read from the model's jaxpr,
   :func:`hsic_jax.taps.feature_fn`; BatchNorm in batch-statistics mode, as ``stage_calibrate``), every decision's
   input and output at once;
2. **problem builds**: :func:`train.calibrate.problems_from_taps` (:func:`hsic_jax.problem_from_features` per
   decision), which :func:`train.calibrate.build_problems` runs on every calibration batch;
3. **lambda search**: :func:`train.pipeline.select_channels` (the ``apib`` method of :mod:`hsic_jax.methods`:
   :func:`hsic_jax.global_lambda_search`) with the cost and target of :func:`train.pipeline.selection_budget`
   (:func:`hsic_jax.cost_fn`, exact MACs from the jaxpr), as ``train.pipeline.stage_select`` calls them.

Each stage runs once cold (its first call in the process: compilation + run), then warm (median of ``--repeats``);
"compile" is cold minus warm. The total is the sum of the stages. As in ``stage_select``, the cost function's set-up
(:func:`hsic_jax.cost_fn` traces the model once) is outside the search's time; it is recorded apart.

**The peer** is the procedure of APIB's reference code (``prune.py`` / ``pruners/HSIClasso.py``), run on the same
captured features: for every alpha it evaluates, every layer rebuilds its centered Gaussian Grams in NumPy
(float32, gamma = 1/P per channel and 1/Q for the output, no normalisation), forms the explicit
``n^2 x C`` design and fits scikit-learn's ``Lasso(alpha, warm_start=True, selection='random', random_state=0)``
(signed, ``fit_intercept=True``, ``max_iter=1000``, ``tol=1e-4``), with the per-layer omega bisection; the outer
bisection on alpha starts from ``lo = 0, hi = alpha0`` (the APIB README's value), doubles ``hi`` while
``FLOPs(hi) >= target`` and bisects until the MACs are within the tolerance of the target. MACs come from
the same exact cost function (the reference builds and profiles a thin model with thop at every step; that is not
charged here). alpha is on scikit-learn's scale, ``alpha = lam / n^2`` of hsic_jax's ``lam``. Two choices favour the
reference: squared distances by the expansion ``|a|^2 + |b|^2 - 2 a.b`` in batched matmuls (its code broadcasts
``(C, n, n, P)`` differences), and a cap of ``MAX_BISECTION`` outer steps (its loop has none).

When the reference's evaluations have taken more than ``--ref-budget`` seconds and the bisection has not ended, the
remaining evaluations are not run: their number is found by continuing the same bisection on hsic_jax's signed
solutions at ``lam = alpha n^2`` (``positive=False``, the reference's Lasso), and the reference total is reported as
the mean measured evaluation time x the number of evaluations, labelled as extrapolated from the measured ones.

Workloads:

- **ResNet-56**: the pretrained CIFAR-10 weights (``../shared/weights``), n = 128 real CIFAR-10 training images, target
  57M MACs (``resnet56_apib``), tolerance 1%, omega 1;
- **ResNet-50**: n = 64 CIFAR-10 images resized to 224 x 224 through a randomly initialised ResNet-50 (no ImageNet
  weights are available offline: the features come from real images through the real architecture, not from a
  trained network), target 37.9% of the dense MACs (``resnet50_apib``), tolerance 1%, omega 1.

``--quick`` (and the fallback when the shared folder is missing): a randomly initialised ResNet-20 on 32 synthetic
images, target 50% of its MACs (``resnet20_apib``); the reference runs in full. Its results go to ``--out`` or a
temporary folder, never over the committed ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

import hsic_jax as hj
from benchmarks import _common, plots

NAME = "selection_e2e"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
STAGES = (("capture", "forward pass with taps"), ("build", "problem builds"), ("search", "lambda search"))
# The reference's outer bisection has no cap; this one stops a jump of the MACs across the band from looping forever.
MAX_BISECTION = 60
MAX_DOUBLINGS = 60
# APIB README's --alpha (the initial hi of the reference's bisection) for these networks.
ALPHA0 = {"resnet56": 8e-4, "resnet50": 7e-5}
QUICK_ALPHA0 = 1e-3
# main.py's --alpha default, used when the README gives none: a second start, only counted (see run_reference).
DEFAULT_ALPHA = 1e-6
REPEATS = 3
QUICK_REPEATS = 2
REF_BUDGET = 240.0
# A workload during which other processes took more than this share of the CPUs is marked as contended: on this
# 2-core machine NumPy's two OpenBLAS threads then slowed the reference's Gram products by up to 50x (3.7 s -> 205 s
# for one ResNet-50 evaluation), and XLA's threads slow down too, unevenly.
CONTENDED = 0.10
SECTION = "## Whole APIB selection (`selection_e2e`)"


@dataclasses.dataclass
class Workload:
  """One model to select channels for, with the program's config (settings, target) and its calibration images."""

  label: str
  config: ml_collections.ConfigDict
  model: Any  # an nnx.Module from models.get_model
  images: np.ndarray
  alpha0: float
  note: str


# ------------------------------------------------------------------------------------------------------------------
# Workloads.


def real_workloads(shared: pathlib.Path) -> list[Workload]:
  """ResNet-56 (pretrained, 128 CIFAR-10 images) and ResNet-50 (random init, 64 CIFAR-10 images at 224)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from models import cifar10, import_torch  # pylint: disable=import-outside-toplevel
  from train.configs import resnet50_apib, resnet56_apib  # pylint: disable=import-outside-toplevel
  images, _ = cifar10.load_split(shared / "data" / "cifar10-subset" / "cifar-10-batches-bin")
  images = cifar10.normalize(images[np.random.default_rng(0).permutation(len(images))[:128]])
  c56 = resnet56_apib.get_config()
  r56 = import_torch.import_torch_state("resnet56", import_torch.load_npz(shared / "weights" / "resnet56_cifar10.npz"))
  c50 = resnet50_apib.get_config()
  r50 = models.get_model("resnet50", rngs=nnx.Rngs(0))
  n50 = int(c50.calib.num_images)
  big = np.asarray(jax.image.resize(jnp.asarray(images[:n50]), (n50, 224, 224, 3), "bilinear"))
  return [
      Workload("ResNet-56", c56, r56, images[:int(c56.calib.num_images)], ALPHA0["resnet56"],
               "pretrained CIFAR-10 weights, real CIFAR-10 training images"),
      Workload("ResNet-50", c50, r50, big, ALPHA0["resnet50"],
               "randomly initialised, as no ImageNet weights are available offline; CIFAR-10 images resized to "
               "224x224"),
  ]


def quick_workloads() -> list[Workload]:
  """A randomly initialised ResNet-20 on 32 synthetic images, to 50% of its MACs."""
  import models  # pylint: disable=import-outside-toplevel
  from train.configs import resnet20_apib  # pylint: disable=import-outside-toplevel
  cfg = resnet20_apib.get_config()
  cfg.calib.num_images = cfg.calib.batch_size = 32
  images = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype(np.float32)
  return [Workload("ResNet-20 (quick)", cfg, models.random_model("resnet20"), images, QUICK_ALPHA0,
                   "randomly initialised, synthetic Gaussian images")]


# ------------------------------------------------------------------------------------------------------------------
# The program's cost function and target (train.pipeline.selection_budget, as stage_select).


def cost_function(workload: Workload) -> tuple[Callable[[Sequence[int]], dict[str, float]], str, float, float]:
  """``(cost, key, target, dense)`` of :func:`train.pipeline.selection_budget` for the workload's model and config:
  kept channels per decision -> MACs and params, the config's target, and the dense value of the targeted cost."""
  from train import pipeline  # pylint: disable=import-outside-toplevel
  budget = pipeline.selection_budget(workload.config, workload.model)
  return budget.cost, budget.key, float(budget.target), float(getattr(budget.dense, budget.key))


# ------------------------------------------------------------------------------------------------------------------
# hsic_jax, stage by stage.


def _ready(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def _cold_warm(fn: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, float]]:
  """Runs ``fn`` once cold, then ``repeats`` times warm: its result and ``{cold, warm, compile}`` seconds."""
  t0 = time.perf_counter()
  out = fn()
  cold = time.perf_counter() - t0
  warm = _common.time_call(fn, repeats=repeats)
  return out, {"cold": cold, "warm": warm, "compile": cold - warm}


def run_hsic_jax(workload: Workload, repeats: int) -> dict[str, Any]:
  """Times the three stages of the program's selection on ``workload`` (see the module docstring)."""
  from train import calibrate, pipeline  # pylint: disable=import-outside-toplevel
  cfg = workload.config
  decisions = [d for d, _ in calibrate.decision_groups(workload.model)]
  images = _ready(jnp.asarray(workload.images))
  stages: dict[str, dict[str, float]] = {}
  holder: dict[str, Any] = {}

  def capture():
    # make_capture is part of the first call (it splits the model and defines the jitted forward pass).
    if "capture" not in holder:
      holder["capture"] = calibrate.make_capture(workload.model, cfg.calib.bn_mode, decisions,
                                                 cfg.calib.resnet50_conv3_y)
    return _ready(holder["capture"](images))

  feats, stages["capture"] = _cold_warm(capture, repeats)

  problems, stages["build"] = _cold_warm(lambda: _ready(calibrate.problems_from_taps(feats, decisions, cfg.select)),
                                         repeats)

  t0 = time.perf_counter()
  budget = pipeline.selection_budget(cfg, workload.model)  # the first count traces the model (cached afterwards)
  cost_setup = time.perf_counter() - t0
  key, target, dense = budget.key, float(budget.target), float(getattr(budget.dense, budget.key))
  sel, stages["search"] = _cold_warm(lambda: pipeline.select_channels(
      cfg.select, budget.sizes, budget.cost, key, target, multiple=budget.multiple, problems=problems), repeats)
  result = sel.result
  settings = {"tolerance": float(cfg.select.tolerance), **pipeline.floor_record(cfg.select, budget.sizes),
              "multiple": budget.multiple,
              "positive": bool(cfg.select.positive), "grid": int(cfg.select.grid),
              "max_steps": int(cfg.select.max_steps)}
  for kind in ("cold", "warm", "compile"):
    stages.setdefault("selection", {})[kind] = stages["build"][kind] + stages["search"][kind]
    stages.setdefault("total", {})[kind] = sum(stages[s][kind] for s, _ in STAGES)
  n = int(workload.images.shape[0])
  return {
      "stages": stages,
      "search": {"lambda": result.value, "alpha_equivalent": result.value / (n * n), key: result.costs[key],
                 "target": target, "ratio_of_dense": result.costs[key] / dense, "within_tolerance":
                 bool(result.reached), "points": len(result.trace), "widths": list(result.widths),
                 "phases": sorted({p.phase for p in result.trace})},
      "cost_setup_seconds": cost_setup,
      "settings": {**settings, "bandwidth": str(cfg.select.bandwidth), "normalized": bool(cfg.select.normalized),
                   "bn_mode": str(cfg.calib.bn_mode), "resnet50_conv3_y": str(cfg.calib.resnet50_conv3_y)},
      "_features": feats, "_problems": problems, "_decisions": decisions,
  }


# ------------------------------------------------------------------------------------------------------------------
# The reference procedure (APIB's code: Grams, Lasso, omega and alpha bisections).


def _centered_gaussian(z: np.ndarray) -> np.ndarray:
  """``H K H`` for every ``(n, p)`` slice of ``z`` ``(b, n, p)``: ``K = exp(-|z_i - z_j|^2 / p)``, in z's dtype.

  Batched matmuls throughout, as the reference's ``torch.matmul``; the distances by the expansion, clamped at 0.
  """
  n, p = z.shape[1], z.shape[2]
  sq = np.einsum("bnp,bnp->bn", z, z)
  d2 = np.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * (z @ z.transpose(0, 2, 1)), 0.0)
  k = np.exp(-d2 / np.asarray(p, z.dtype))
  h = (np.eye(n) - 1.0 / n).astype(z.dtype)
  return h @ k @ h


def reference_design(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The reference's ``n^2 x C`` design (column c = vec of channel c's centered Gram) and target vec(L̄), float32.

  Args:
    x: a layer's input as ``(n, C, P)``.
    y: its output flattened per sample, ``(n, Q)``.
  """
  x = np.asarray(x, np.float32)
  c = x.shape[1]
  kbar = _centered_gaussian(np.ascontiguousarray(x.transpose(1, 0, 2)))
  lbar = _centered_gaussian(np.asarray(y, np.float32).reshape(1, y.shape[0], -1))[0]
  return kbar.reshape(c, -1).T, lbar.reshape(-1)  # the transpose is Fortran-ordered, as the reference's numpy()


def reference_keep(design: np.ndarray, target: np.ndarray, alpha: float, omega: int) -> tuple[np.ndarray, int]:
  """The reference's layer selection at ``alpha`` (``HSIC_lasso_pruning``): kept channel indices and Lasso fits.

  One ``Lasso`` per call, warm-started across its own omega bisection: when fewer than ``omega`` channels survive,
  alpha' is bisected in ``[0, alpha]`` until exactly ``omega`` do, ``mid < 1e-20`` or more than 50 steps.
  """
  solver = Lasso(alpha=alpha, warm_start=True, selection="random", random_state=0)

  def solve(a: float) -> np.ndarray:
    solver.alpha = a
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      solver.fit(design, target)
    return np.flatnonzero(solver.coef_ != 0.0)

  keep, fits = solve(alpha), 1
  if keep.size < omega:
    lo, hi, step = 0.0, alpha, 0
    while True:
      step += 1
      mid = 0.5 * (lo + hi)
      keep, fits = solve(mid), fits + 1
      if keep.size > omega:
        lo = mid
      elif keep.size < omega:
        hi = mid
      else:
        break
      if mid < 1e-20 or step > 50:
        break
  return keep, fits


def reference_evaluate(layers: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float, omega: Sequence[int],
                       cost: Callable[[Sequence[int]], dict[str, float]], key: str) -> dict[str, Any]:
  """One alpha evaluation of the reference: every layer's Grams rebuilt and its Lasso fitted (``omega``: the floor
  of each layer), then the MACs."""
  t0 = time.perf_counter()
  grams = lasso = 0.0
  widths, fits = [], 0
  for (x, y), floor in zip(layers, omega, strict=True):
    t = time.perf_counter()
    design, target = reference_design(x, y)
    t1 = time.perf_counter()
    keep, f = reference_keep(design, target, alpha, int(floor))
    lasso += time.perf_counter() - t1
    grams += t1 - t
    widths.append(int(keep.size))
    fits += f
  # A layer left with no channel (the reference's inner bisection can time out there) is counted at width 1: the
  # cost model needs widths >= 1.
  value = cost([max(w, 1) for w in widths])[key]
  return {"alpha": alpha, key: value, "widths": widths, "fits": fits, "seconds": time.perf_counter() - t0,
          "grams_seconds": grams, "lasso_seconds": lasso, "measured": True}


def emulator(problems: Sequence[hj.LassoProblem], omega: Sequence[int],
             cost: Callable[[Sequence[int]], dict[str, float]], key: str) -> Callable[[float], dict[str, Any]]:
  """alpha -> the reference's widths approximated by hsic_jax's signed solutions at ``lam = alpha n^2`` (used only
  to count the evaluations the reference's bisection would still take; it is not timed)."""
  stacked, _ = hj.stack_problems(list(problems))
  rows = float(np.asarray(stacked.rows).ravel()[0])

  def evaluate(alpha: float) -> dict[str, Any]:
    lam = jnp.full(stacked.lin.shape[:-1], alpha * rows, stacked.lin.dtype)
    res = hj.solve(stacked, lam, positive=False)
    widths = [max(int(k), int(o), 1) for k, o in zip(np.asarray(res.selected).sum(-1), omega, strict=True)]
    return {"alpha": alpha, key: cost(widths)[key], "widths": widths, "measured": False}

  return evaluate


def apib_bisection(value: Callable[[float, str], float], target: float, alpha0: float, tolerance: float) -> bool:
  """The reference's outer search (``auto_prune``): ``lo = 0, hi = alpha0``; ``hi`` doubled while
  ``value(hi) >= target``; then bisection until ``value`` is within ``tolerance`` of ``target`` (or ``mid < 1e-15``,
  or ``MAX_BISECTION`` steps). ``value(alpha, phase)`` evaluates one alpha; returns whether the band was reached."""
  lo, hi = 0.0, float(alpha0)
  for _ in range(MAX_DOUBLINGS):
    if value(hi, "double") < target:
      break
    hi *= 2.0
  for _ in range(MAX_BISECTION):
    mid = 0.5 * (lo + hi)
    f = value(mid, "bisect")
    if f > target * (1 + tolerance):
      lo = mid
    elif f < target * (1 - tolerance):
      hi = mid
    else:
      return True
    if mid < 1e-15:
      break
  return False


def reference_search(layers: Sequence[tuple[np.ndarray, np.ndarray]], cost: Callable[[Sequence[int]], dict[str, float]],
                     key: str, target: float, *, alpha0: float, tolerance: float, omega: Sequence[int], budget: float,
                     emulate: Callable[[], Callable[[float], dict[str, Any]]]) -> dict[str, Any]:
  """The reference's outer bisection on alpha (``auto_prune``), measured until ``budget`` seconds, then counted.

  Args:
    layers: ``(x (n, C, P), y (n, Q))`` per decision, float32 NumPy.
    cost: widths -> costs; ``cost(...)[key]`` is compared with ``target``.
    key: the targeted cost.
    target: the target value.
    alpha0: the initial ``hi``.
    tolerance: relative band.
    omega: minimum channels of each layer (:func:`hsic_jax.min_widths` of the config's ``select.omega``).
    budget: seconds of measured evaluations after which the rest are counted, not run.
    emulate: builds the counting evaluator (called at most once, when the budget runs out).

  Returns:
    The evaluations in order (``measured`` or counted), whether the band was reached, and the timing summary.
  """
  evals: list[dict[str, Any]] = []
  state: dict[str, Any] = {"spent": 0.0, "emulator": None}

  def value(alpha: float, phase: str) -> float:
    if state["spent"] <= budget:
      point = reference_evaluate(layers, alpha, omega, cost, key)
      state["spent"] += point["seconds"]
    else:
      if state["emulator"] is None:
        state["emulator"] = emulate()
      point = state["emulator"](alpha)
    point["phase"] = phase
    evals.append(point)
    print(f"  reference alpha={alpha:.4g} ({phase}, {'measured' if point['measured'] else 'counted'}): "
          f"{key} {point[key]:,.0f}" + (f", {point['seconds']:.2f} s" if point["measured"] else ""), flush=True)
    return float(point[key])

  reached = apib_bisection(value, target, alpha0, tolerance)
  measured = [e for e in evals if e["measured"]]
  per_eval = float(np.mean([e["seconds"] for e in measured]))
  extrapolated = len(measured) < len(evals)
  final = evals[-1]
  return {
      "evaluations": evals, "reached": reached, "final_alpha": final["alpha"], key: final[key],
      "final_measured": final["measured"], "measured_evaluations": len(measured), "total_evaluations": len(evals),
      "extrapolated": extrapolated, "measured_seconds": float(sum(e["seconds"] for e in measured)),
      "seconds_per_evaluation": per_eval,
      "seconds": per_eval * len(evals) if extrapolated else float(sum(e["seconds"] for e in measured)),
      "grams_share": float(sum(e["grams_seconds"] for e in measured) / sum(e["seconds"] for e in measured)),
      "lasso_fits": int(sum(e["fits"] for e in measured)),
  }


def run_reference(workload: Workload, ours: dict[str, Any], budget: float, count: bool = True) -> dict[str, Any]:
  """The reference procedure on the features hsic_jax captured (the same arrays, copied to float32 NumPy).

  With ``count``, the counting stand-in (:func:`emulator`) is also checked against the measured evaluations and
  run from the reference's default start ``DEFAULT_ALPHA`` (its compilation would double the quick run's time).
  """
  cost, key, target, dense = cost_function(workload)
  cfg = workload.config
  layers = [tuple(np.asarray(a, np.float32) for a in ours["_features"][d]) for d in ours["_decisions"]]
  omega = [int(o) for o in hj.min_widths(cfg.select.omega, [p.num_channels for p in ours["_problems"]])]
  res = reference_search(layers, cost, key, target, alpha0=workload.alpha0, tolerance=float(cfg.select.tolerance),
                         omega=omega, budget=budget,
                         emulate=lambda: emulator(ours["_problems"], omega, cost, key))
  res["ratio_of_dense"] = res[key] / dense
  res["alpha0"] = workload.alpha0
  res["budget_seconds"] = budget
  if not count:
    return res
  ev = emulator(ours["_problems"], omega, cost, key)
  # How far the counting stand-in is from the measured reference, at the alphas both evaluated.
  diffs = [abs(ev(e["alpha"])[key] - e[key]) / e[key] for e in res["evaluations"] if e["measured"]]
  res["emulator_max_rel_diff"] = float(max(diffs))
  # The number of evaluations depends on where alpha0 falls: counted (not run, not timed) from the reference's
  # command-line default as well.
  counted: list[float] = []

  def value(alpha: float, _phase: str) -> float:
    counted.append(alpha)
    return float(ev(alpha)[key])

  ok = apib_bisection(value, target, DEFAULT_ALPHA, float(cfg.select.tolerance))
  res["from_default_alpha"] = {"alpha0": DEFAULT_ALPHA, "evaluations_counted": len(counted), "reached": ok,
                               "seconds_estimate": len(counted) * res["seconds_per_evaluation"]}
  return res


# ------------------------------------------------------------------------------------------------------------------
# Reporting.


def _ratio(a: float, b: float) -> float:
  return a / b if b > 0 else math.nan


def summarise(workload: Workload, ours: dict[str, Any], ref: dict[str, Any], shares: dict[str, float | None]
              ) -> dict[str, Any]:
  """The JSON row of one workload: hsic_jax's stages and search result, the reference, the ratios, and the share of
  the CPU that other processes took meanwhile (``contended`` above :data:`CONTENDED`)."""
  st = ours["stages"]
  ref_s = ref["seconds"]
  return {
      "others_cpu_share": shares, "contended": any(v is not None and v > CONTENDED for v in shares.values()),
      "workload": workload.label, "note": workload.note, "model": str(workload.config.model.name),
      "n": int(workload.images.shape[0]), "image_hw": list(workload.images.shape[1:3]),
      "decisions": len(ours["_decisions"]), "settings": ours["settings"],
      "cost_setup_seconds": ours["cost_setup_seconds"], "stages": st, "search": ours["search"],
      "reference": ref,
      "ratios": {
          "selection_cold": _ratio(ref_s, st["selection"]["cold"]),
          "selection_warm": _ratio(ref_s, st["selection"]["warm"]),
          # The reference has no forward pass of its own here: the same capture (warm) is added to it.
          "total_cold": _ratio(ref_s + st["capture"]["warm"], st["total"]["cold"]),
          "total_warm": _ratio(ref_s + st["capture"]["warm"], st["total"]["warm"]),
      },
  }


def _ref_cell(ref: dict[str, Any]) -> str:
  if ref["extrapolated"]:
    return (f"{_common.fmt(ref['seconds'])} (extrapolated from {ref['measured_evaluations']} measured evaluations of "
            f"{ref['total_evaluations']})")
  return f"{_common.fmt(ref['seconds'])} ({ref['total_evaluations']} evaluations)"


def results_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown: one line per stage and workload; the reference against the selection from features and the total."""
  headers = ["workload", "stage", "cold s", "warm s", "compile s", "reference s", "reference / hsic_jax (cold)",
             "reference / hsic_jax (warm)"]
  table = []
  for r in rows:
    st, ref, ra = r["stages"], r["reference"], r["ratios"]
    lines = [(key, label, "", "", "") for key, label in STAGES]
    lines.append(("selection", "builds + search (from the taps)", _ref_cell(ref), f"{ra['selection_cold']:.1f}x",
                  f"{ra['selection_warm']:.1f}x"))
    lines.append(("total", "total", f"{_common.fmt(ref['seconds'] + st['capture']['warm'])} (+ the same forward pass)",
                  f"{ra['total_cold']:.1f}x", f"{ra['total_warm']:.1f}x"))
    for key, label, ref_cell, rc, rw in lines:
      s = st[key]
      table.append([r["workload"], label, _common.fmt(s["cold"]), _common.fmt(s["warm"]), _common.fmt(s["compile"]),
                    ref_cell, rc, rw])
  return _common.markdown_table(headers, table)


def results_summary(rows: Sequence[dict[str, Any]]) -> str:
  """One line per workload: where each search landed, and the stage that dominates."""
  out = []
  for r in rows:
    s, ref, st = r["search"], r["reference"], r["stages"]
    warm_top = max((k for k, _ in STAGES), key=lambda k: st[k]["warm"])
    fd = ref.get("from_default_alpha")
    default = "" if fd is None else (
        f"; from its command-line default alpha {fd['alpha0']:g} it would take {fd['evaluations_counted']} "
        f"(counted on hsic_jax's signed solutions, which are within {ref['emulator_max_rel_diff']:.1%} of its MACs "
        f"where both ran; not run, about {_common.fmt(fd['seconds_estimate'])} s)")
    labels = dict(STAGES)
    out.append(
        f"- {r['workload']} ({r['note']}; n = {r['n']}, {r['decisions']} decisions): hsic_jax lands at "
        f"{s['macs'] / 1e6:,.2f}M MACs ({s['ratio_of_dense']:.1%} of dense, target {s['target'] / 1e6:,.2f}M, "
        f"{'within' if s['within_tolerance'] else 'outside'} the band) after {s['points']} points, lam = "
        f"{s['lambda']:.4g} (alpha {s['alpha_equivalent']:.3g}); the reference "
        f"{'reaches' if ref['reached'] else 'does not reach'} the band at alpha {ref['final_alpha']:.3g} "
        f"({ref['macs'] / 1e6:,.2f}M, {'measured' if ref['final_measured'] else 'counted'}) after "
        f"{ref['total_evaluations']} evaluations from alpha0 = {ref['alpha0']:g}, "
        f"{ref['seconds_per_evaluation']:.2f} s each ({ref['grams_share']:.0%} of it rebuilding Grams){default}. Warm, "
        f"{labels[warm_top]} dominates "
        f"({st[warm_top]['warm'] / st['total']['warm']:.0%} of {_common.fmt(st['total']['warm'])} s); cold, "
        f"compilation is {st['total']['compile'] / st['total']['cold']:.0%} of {_common.fmt(st['total']['cold'])} s.")
  return "\n".join(out)


def contention(rows: Sequence[dict[str, Any]]) -> str:
  """A sentence on the share of the machine's CPU time that other processes took during each workload."""
  parts = []
  for r in rows:
    share = r.get("others_cpu_share") or {}
    if all(share.get(k) is not None for k in ("hsic_jax", "reference")):
      parts.append(f"{share['hsic_jax']:.0%} during {r['workload']}'s hsic_jax stages and {share['reference']:.0%} "
                   f"during its reference")
  if not parts:
    return ""
  text = "Share of the CPU time that other processes on this shared machine took: " + ", ".join(parts) + "."
  bad = [r["workload"] for r in rows if r.get("contended")]
  if bad:
    text += (f" **{' and '.join(bad)}: measured under contention (above {CONTENDED:.0%}); those timings and ratios "
             f"are not comparable with a run that had the CPUs to itself.**")
  return text


def goals(rows: Sequence[dict[str, Any]]) -> str:
  """The three goals against the measured figures (empty for workloads that are not the real ones)."""
  by = {r["workload"]: r for r in rows}
  out = []

  def mark(name: str) -> str:
    return " (measured under contention, see above)" if by[name].get("contended") else ""

  if "ResNet-56" in by:
    st = by["ResNet-56"]["stages"]
    cold, warm = st["selection"]["cold"], st["selection"]["warm"]
    out.append(f"- ResNet-56 search under 1 s once the features are taken (problem builds + lambda search): "
               f"{_common.fmt(warm)} s warm ({'met' if warm < 1 else 'not met'}), {_common.fmt(cold)} s cold, "
               f"compilation included ({'met' if cold < 1 else 'not met'}); the lambda search alone takes "
               f"{_common.fmt(st['search']['warm'])} s warm, {_common.fmt(st['search']['cold'])} s cold"
               f"{mark('ResNet-56')}.")
  if "ResNet-50" in by:
    st = by["ResNet-50"]["stages"]["total"]
    out.append(f"- ResNet-50 whole selection under 20 s on this CPU (the APIB paper: 63 s on a GPU): "
               f"{_common.fmt(st['cold'])} s cold, one run of the program ({'met' if st['cold'] < 20 else 'not met'}), "
               f"{_common.fmt(st['warm'])} s warm ({'met' if st['warm'] < 20 else 'not met'}){mark('ResNet-50')}.")
  for name in ("ResNet-56", "ResNet-50"):
    if name in by:
      ra, ref = by[name]["ratios"], by[name]["reference"]
      label = (f"extrapolated from {ref['measured_evaluations']} measured evaluations" if ref["extrapolated"]
               else "measured")
      out.append(f"- {name}, at least 10x the reference procedure (selection from the same features; reference "
                 f"{label}): {ra['selection_cold']:.1f}x cold ({'met' if ra['selection_cold'] >= 10 else 'not met'}), "
                 f"{ra['selection_warm']:.1f}x warm ({'met' if ra['selection_warm'] >= 10 else 'not met'})"
                 f"{mark(name)}.")
  return "\n".join(out)


def plot(payload: dict[str, Any], path: pathlib.Path) -> pathlib.Path | None:
  """Seconds per stage (log scale), one panel per workload: hsic_jax warm with its compilation stacked on top (the
  bar's end is the cold time), and the reference against the selection from the features (hatched when
  extrapolated)."""
  plt = plots.pyplot()
  if plt is None:
    return None
  rows = payload["rows"]
  fig, axes = plt.subplots(len(rows), 1, figsize=(11, 2.6 * len(rows) + 0.6), squeeze=False)
  keys = [k for k, _ in STAGES] + ["selection", "total"]
  labels = [l for _, l in STAGES] + ["builds + search", "total"]
  for ax, r in zip(axes[:, 0], rows):
    st, ref = r["stages"], r["reference"]
    ys = np.arange(len(keys))
    warm = [max(st[k]["warm"], 1e-4) for k in keys]
    comp = [max(st[k]["compile"], 0.0) for k in keys]
    ax.barh(ys - 0.2, warm, 0.38, color="tab:blue", label="hsic_jax warm")
    ax.barh(ys - 0.2, comp, 0.38, left=warm, color="tab:blue", alpha=0.35, label="hsic_jax compile (cold = end)")
    sel = keys.index("selection")
    bar = ax.barh([sel + 0.2], [ref["seconds"]], 0.38, color="tab:red",
                  label="reference procedure" + (" (extrapolated)" if ref["extrapolated"] else ""))
    if ref["extrapolated"]:
      bar[0].set_hatch("///")
      bar[0].set_alpha(0.6)
    ax.set_xscale("log")
    # Log bars start at the axis' left edge: put it below the smallest time so that every bar shows.
    ax.set_xlim(left=min(warm) / 2, right=max(ref["seconds"], max(w + c for w, c in zip(warm, comp))) * 2)
    plots.plain_log_ticks(ax.xaxis)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{r['workload']}: ref / hsic_jax = {r['ratios']['selection_cold']:.1f}x cold, "
                 f"{r['ratios']['selection_warm']:.1f}x warm", fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  axes[-1, 0].set_xlabel("seconds (log scale; less is better)")
  return plots.save(fig, plt, path)


def cpu_snapshot() -> tuple[float, float, float] | None:
  """``(busy CPU seconds of the machine, CPU seconds of this process, wall seconds)``, or None off Linux."""
  try:
    fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (sum(int(f) for f in fields) - int(fields[3]) - int(fields[4])) / ticks  # less idle and iowait
  except (OSError, ValueError, IndexError):
    return None
  own = os.times()
  return busy, own.user + own.system, time.perf_counter()


def others_share(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
  """Share of the machine's CPU time that other processes used between two snapshots (0: this run had it alone).

  On a shared machine the timings are only comparable between runs that had the CPUs to themselves; this says how
  far a run was from that.
  """
  if start is None or end is None or end[2] <= start[2]:
    return None
  others = (end[0] - start[0]) - (end[1] - start[1])
  return max(0.0, others / ((end[2] - start[2]) * (os.cpu_count() or 1)))


def _git_state() -> dict[str, Any]:
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split("\n")
  except (OSError, subprocess.CalledProcessError):
    return {}
  return {"commit": head.strip(), "modified": sorted(l[3:] for l in dirty if l.strip())}


README_PARAGRAPH = (
    "The whole APIB selection as the program runs it, stage by stage: the forward pass that captures every decision's "
    "input and output (`train.calibrate.make_capture`, taps read from the jaxpr, BatchNorm with batch statistics), "
    "the HSIC Lasso problem "
    "builds (`hsic_jax.problem_from_features` per decision) and the global lambda search "
    "(`hsic_jax.global_lambda_search` with the `hsic_jax.cost_fn` cost, as `stage_select`), each timed cold "
    "(first call in the process, compilation included) and warm, on ResNet-56 (pretrained, 128 CIFAR-10 images, "
    "57M MACs) and ResNet-50 (randomly initialised, 64 CIFAR-10 images at 224x224, 37.9% of the dense MACs). The peer, "
    "on the same features in the same run, is the procedure of APIB's reference code: per layer and per alpha, "
    "NumPy Grams rebuilt and scikit-learn's signed `Lasso` on the explicit design of `n^2` rows, with its omega "
    "and alpha bisections; where it would run too long, its total is extrapolated from the evaluations measured "
    "and says so. See the module docstring for the exact protocol.")


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, ("quick", "out", "no-readme", "render"), help={
      "quick": "a small synthetic workload (CI-sized)",
      "out": "results folder (default benchmarks/results; a temporary one with --quick)"})
  parser.add_argument("--shared", type=pathlib.Path, default=SHARED, help="shared data and weights folder")
  parser.add_argument("--repeats", type=int, default=None, help="warm repeats per stage (median)")
  parser.add_argument("--ref-budget", type=float, default=None,
                      help=f"seconds of measured reference evaluations per workload before the rest are counted "
                           f"(default {REF_BUDGET:g}; unlimited with --quick)")
  args = parser.parse_args(argv)
  if args.render:
    payload = json.loads((_common.RESULTS / f"{NAME}.json").read_text())
    render_readme(payload)
    plot(payload, plots.png_path(NAME))
    print(f"updated {_common.README} and {plots.png_path(NAME)}")
    return
  if jax.default_backend() == "cpu":
    capped = hj.limit_lapack_threads()  # as the library advises for the CPU backend (see hsic_jax.runtime)
    print(f"LAPACK threads capped at 1 for: {', '.join(capped) or 'no library found'}")
  quick = args.quick
  if not quick and not args.shared.is_dir():
    print(f"shared folder {args.shared} not found: running the --quick workload instead")
    quick = True
  repeats = args.repeats or (QUICK_REPEATS if quick else REPEATS)
  budget = args.ref_budget if args.ref_budget is not None else (math.inf if quick else REF_BUDGET)
  workloads = quick_workloads() if quick else real_workloads(args.shared)
  load = {"before": list(os.getloadavg())}
  rows = []
  for w in workloads:
    print(f"{w.label}: hsic_jax stages", flush=True)
    t0 = cpu_snapshot()
    ours = run_hsic_jax(w, repeats)
    t1 = cpu_snapshot()
    print(f"{w.label}: reference procedure", flush=True)
    ref = run_reference(w, ours, budget, count=not quick)
    t2 = cpu_snapshot()
    rows.append(summarise(w, ours, ref, {"hsic_jax": others_share(t0, t1), "reference": others_share(t1, t2)}))
  load["after"] = list(os.getloadavg())

  md = results_table(rows)
  summary = results_summary(rows)
  goal_text = goals(rows)
  print(md, summary, goal_text, contention(rows), sep="\n\n")
  payload = {"quick": quick, "repeats": repeats, "ref_budget_seconds": budget, "load_average": load,
             "git": _git_state(), "rows": rows}
  out = args.out if args.out is not None else (pathlib.Path(tempfile.mkdtemp(prefix=f"{NAME}_")) if quick else None)
  if out is None:
    path = _common.write_results(NAME, payload)
    png = plots.png_path(NAME)
  else:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    path.write_text(json.dumps({"benchmark": NAME, "machine": _common.machine(), **payload}, indent=2))
    png = out / f"{NAME}.png"
  print(f"wrote {path}")
  if plot(json.loads(path.read_text()), png) is not None:
    print(f"wrote {png}")
  if not args.no_readme and not quick and out is None:
    render_readme(json.loads(path.read_text()))
    print(f"updated {_common.README}")


def render_readme(payload: dict[str, Any]) -> None:
  """Writes this benchmark's README section (once) and its block from a results payload."""
  m, rows = payload["machine"], payload["rows"]
  _common.ensure_section(NAME, SECTION, README_PARAGRAPH)
  _common.update_readme(NAME, (
      f"Measured {m['date']} on {m['device']} ({m['cpu_count']} CPU cores), jax {m['jax']}; warm = median of "
      f"{payload['repeats']} runs after the cold one. {contention(rows)} The reference's time is against the problem "
      f"builds + search row (both start from the same captured features); the total row adds hsic_jax's warm "
      f"forward pass to it. The reference's number of evaluations depends on where its start alpha0 (the APIB "
      f"README's value for the model) falls against the target.\n\n"
      + results_table(rows) + "\n\n" + results_summary(rows) + "\n\nGoals:\n\n" + goals(rows) + "\n\n"
      + plots.readme_link(NAME)))


if __name__ == "__main__":
  main()
