"""The pruning program: dense model -> calibrate -> select -> surgery -> fine-tune -> evaluate -> report.

Each stage writes its result to the workdir and is skipped when that result is already there, so re-running the
same command resumes where a run stopped, and ``--only=STAGE`` runs one stage from the previous stage's saved
result. Results are written atomically (a temporary name, then a rename): an interrupted stage leaves nothing that
looks finished. Training stages resume from their own orbax checkpoints.

The model is a zoo name or a user's factory (``model.name = "package.module:function"``); past building, every
model goes the same way (:mod:`train.network`): groups declared or derived from the jaxpr, decisions and
calibration taps read from the jaxpr, costs counted from it, and the thin model from :func:`hsic_jax.thin_model`.

Every model is saved with float32 parameters and statistics, whatever the run's precision (``half_precision``,
recorded as ``compute_dtype`` in each checkpoint's meta); a model is loaded to compute in the run's precision.

Workdir layout::

  config.json          the resolved config (a re-run with a different one is refused)
  metrics.jsonl        one JSON line per logged training window, epoch and stage
  dense/               the dense model (orbax; from a PyTorch .npz, a checkpoint, or pre-trained here in pretrain/)
  calibration/         problems.npz (Q, q, ||L̄||² per decision) and calibration.json (image ids, timings)
  selection.json       the selection (hsic_jax.methods): keep sets, widths, costs, and the method's record (APIB:
                       lambda and the search trace; ITPruner: importances and the allocation; ...)
  pruned/              the pruned model right after surgery, with the plan in its meta
  finetune/            fine-tuning checkpoints; final/ the fine-tuned model, with the plan
  evaluation.json      top-1 / top-5 of the dense, the pruned (before fine-tuning) and the final model
  report.json, report.md, widths.png, lambda_search.png, training.png

Several processes (``jax.distributed``; every process runs this same program on a workdir they all see): every
process trains, evaluates and saves models together (orbax writes each array once); the calibration, the selection
and the report run on process 0 alone, and every other process reads their files, so all of them prune with the
same problems and the same channels, by construction. The stages are separated by barriers that also carry each
process's outcome: a stage that fails on one process raises on all of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

import hsic_jax as hj
import models
from models import checkpoint, import_torch
from train import calibrate, data, files, loops, network as network_lib, report, train as train_lib

STAGES = ("dense", "calibrate", "select", "surgery", "finetune", "evaluate", "report")


@dataclasses.dataclass
class Run:
  """One run of the program: its config, workdir, devices and log."""

  config: ml_collections.ConfigDict
  workdir: Path
  mesh: jax.sharding.Mesh
  writer: bool  # process 0 writes the workdir's files
  compute_dtype: Any = None  # of every convolution and matmul (train.train.compute_dtype); None: float32
  network: network_lib.Network | None = None  # the model, a zoo name or a user's factory; None: the config's

  def __post_init__(self) -> None:
    if self.network is None:
      self.network = network_lib.Network.from_config(self.config)

  def path(self, name: str) -> Path:
    return self.workdir / name

  def barrier(self, name: str, error: BaseException | None = None) -> None:
    """Waits for every process (a no-op with one); raises ``error`` where it happened and a ``ValueError`` naming
    the failed processes everywhere else, so that no process goes on alone."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
      if error is None and failed.any():
        raise ValueError(f"{name}: process(es) {np.flatnonzero(failed).tolist()} failed (their output says why)")
    if error is not None:
      raise error

  def on_writer(self, name: str, fn: Callable[[], Any]) -> None:
    """Runs ``fn`` on process 0 while the others wait; a failure there raises on every process."""
    error = None
    if self.writer:
      try:
        fn()
      except (ValueError, FileNotFoundError) as err:
        error = err
    self.barrier(name, error)

  def log(self, record: dict[str, Any]) -> None:
    if self.writer:
      with open(self.path("metrics.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.time(), **record}, default=files.json_default) + "\n")

  def save_model(self, model: nnx.Module, name: str, extra: dict[str, Any]) -> None:
    """Saves ``model`` to ``workdir/name`` atomically (orbax writes a temporary directory, renamed at the end).
    Every process calls it (orbax's saves are collective); process 0 moves the directories."""
    tmp = self.path(name + ".tmp")
    if self.writer and tmp.exists():
      shutil.rmtree(tmp)
    self.barrier(f"save {name}: start")
    self.network.save(model, tmp, {**extra, "compute_dtype": train_lib.precision_name(self.compute_dtype)})
    self.barrier(f"save {name}: written")
    if self.writer:
      final = self.path(name)
      if final.exists():  # a stage run again with --only replaces its result
        shutil.rmtree(final)
      os.replace(tmp, final)
    self.barrier(f"save {name}: done")

  def load_model(self, name: str) -> nnx.Module:
    """The model saved at ``workdir/name`` (float32 parameters), computing in the run's precision."""
    return models.set_compute_dtype(checkpoint.load(self.path(name)), self.compute_dtype)


# ------------------------------------------------------------------------------------------------------------------
# Shared helpers.


def _loop(run: Run, section: ml_collections.ConfigDict, workdir: Path, desc: str) -> train_lib.Loop:
  return loops.make_loop(run.config, section, workdir, mesh=run.mesh, desc=desc, log=run.log)


def _evaluate(run: Run, model: nnx.Module, desc: str) -> dict[str, float]:
  return loops.evaluate_model(run.config, model, run.mesh, desc=desc)


# ------------------------------------------------------------------------------------------------------------------
# Stages.


def stage_dense(run: Run) -> dict[str, Any]:
  """The dense model: from a PyTorch ``.npz`` (zoo models), an orbax model checkpoint, trained here
  (``pretrain``), or as a user's factory returns it (``factory``: the factory loads its own weights)."""
  cfg = run.config
  net = run.network
  num_classes = data.num_classes(cfg.data)
  source = cfg.dense.source
  where = cfg.dense.path
  extra: dict[str, Any] = {"stage": "dense", "source": source}
  if source == "npz":
    if net.factory is not None:
      raise ValueError(f"dense.source 'npz' reads the zoo's PyTorch weights; the factory model {net.name!r} takes "
                       "'factory' (the factory loads its weights), 'checkpoint' or 'pretrain'")
    model = import_torch.import_torch_state(cfg.model.name, import_torch.load_npz(os.path.expanduser(cfg.dense.path)))
  elif source == "checkpoint":
    path = os.path.expanduser(cfg.dense.path)
    meta = checkpoint.read_meta(path)
    if net.factory is not None and (meta["model"], meta.get("kwargs") or {}) != (net.name, dict(net.kwargs)):
      raise ValueError(f"the dense model at {path} is {meta['model']} with kwargs {meta.get('kwargs') or {}}, but "
                       f"the config asks for {net.name} with kwargs {dict(net.kwargs)}")
    model = checkpoint.load(path)
    if net.factory is not None and meta.get("plan"):
      # An already pruned factory model (pruning in rounds): its checkpoint is rebuilt by cutting the factory's
      # model to its plan, so the dense checkpoint keeps that plan and surgery composes the next one with it.
      extra["plan"] = meta["plan"]
  elif source == "pretrain":
    model = models.set_compute_dtype(net.build(num_classes=num_classes, seed=int(cfg.seed)), run.compute_dtype)
    model, _ = train_lib.train_and_evaluate(model, cfg.pretrain, _loop(run, cfg.pretrain, run.path("pretrain"),
                                                                       "pretrain"), run.mesh, seed=int(cfg.seed))
  elif source == "factory":
    if net.factory is None:
      raise ValueError(f"dense.source 'factory' is for a model.name 'package.module:function'; {net.name!r} is a "
                       "zoo name (use 'npz', 'checkpoint' or 'pretrain')")
    model = net.build(num_classes=num_classes, seed=int(cfg.seed))
    where = f"{net.name}(**{dict(net.kwargs)})"
  else:
    raise ValueError(f"dense.source must be 'npz', 'checkpoint', 'pretrain' or 'factory', got {source!r}")
  net.check(model, num_classes, where)
  model.eval()
  run.save_model(model, "dense", extra)
  return {}


def stage_calibrate(run: Run) -> dict[str, Any]:
  """The evidence the selection needs, from the dense model on the calibration images (on process 0 alone: the
  calibration set is small, and one computation read back by every process is the same for all of them)."""
  model = run.load_model("dense")  # on every process: orbax's restores are collective too
  out: dict[str, Any] = {}
  run.on_writer("calibrate", lambda: out.update(_calibrate(run, model)))
  return out


def _calibrate(run: Run, model: nnx.Module) -> dict[str, Any]:
  cfg = run.config
  need = hj.method_needs(cfg.select.method, cfg.select.criterion)
  n = int(cfg.calib.num_images)
  images, labels, ids = data.calibration_batch(cfg.data, n, seed=int(cfg.calib.seed), augment=bool(cfg.calib.augment))
  out = run.path("calibration")
  out.mkdir(exist_ok=True)
  seconds: dict[str, float] = {}
  decs = run.network.decisions(model)
  decisions = [d.name for d in decs]
  channels = []
  acts = None
  if "problems" in need:
    t0 = time.perf_counter()
    decisions, problems = calibrate.build_problems(model, images, cfg.calib, cfg.select, decisions=decs)
    jax.block_until_ready(problems)
    seconds["problems"] = time.perf_counter() - t0
    channels = [int(p.num_channels) for p in problems]
    calibrate.save_problems(out / "problems.npz", decisions, problems)
  if "similarity" in need:
    t0 = time.perf_counter()
    acts = calibrate.activations(model, images, cfg.calib, decisions=decs)
    sim = calibrate.layer_similarity(acts, cfg.select.itpruner.kernel)
    seconds["similarity"] = time.perf_counter() - t0
    files.save_npz(out / "similarity.npz", decisions=np.asarray(decisions), similarity=sim)
  if "scores" in need:
    t0 = time.perf_counter()
    scores = calibrate.criterion_scores(model, cfg.select.criterion, images, labels, cfg.calib, seed=int(cfg.seed),
                                        acts=acts, decisions=decs)  # the similarity's activations, when it had them
    seconds["scores"] = time.perf_counter() - t0
    files.save_npz(out / "scores.npz", decisions=np.asarray(decisions), **{str(i): sc for i, sc in enumerate(scores)})
  files.write_json(out / "calibration.json", {
      "num_images": n, "ids": [int(i) for i in ids], "labels": [int(l) for l in labels],
      "split": cfg.data.calib_split, "bn_mode": cfg.calib.bn_mode, "augment": bool(cfg.calib.augment),
      "decisions": decisions, "channels": channels, "evidence": sorted(need), "seconds": seconds,
      "criterion": cfg.select.criterion, "method": cfg.select.method,
      "compute_dtype": train_lib.precision_name(run.compute_dtype)})
  return {"seconds": sum(seconds.values())}


def default_multiple() -> int:
  """Widths rounded to multiples of 8 on GPUs and TPUs (their matrix units' tile), of 1 on CPUs."""
  return 1 if jax.default_backend() == "cpu" else 8


def resolve_target(cfg: ml_collections.ConfigDict, dense: hj.Cost) -> tuple[str, float]:
  """``(key, target)`` from ``select.target`` and ``select.ratio`` or ``select.absolute``."""
  key = cfg.select.target
  if key not in ("macs", "params"):
    raise ValueError(f"select.target must be 'macs' or 'params', got {key!r}")
  full = float(getattr(dense, key))
  if cfg.select.absolute and cfg.select.absolute > 0:
    target = float(cfg.select.absolute)
  else:
    ratio = float(cfg.select.ratio)
    if not 0 < ratio <= 1:
      raise ValueError(f"select.ratio must be in (0, 1] (the kept fraction of the dense {key}), got {ratio}")
    target = ratio * full
  if target > full * (1 + cfg.select.tolerance):
    raise ValueError(f"target {key} {target:,.0f} is above the dense model's {full:,.0f}; expected a target in "
                     f"(0, {full:,.0f}]")
  return key, target


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a model's selection is measured against: its decisions, the exact cost of their widths and the target."""

  pairs: list[tuple[str, hj.ChannelGroup]]  # (decision, the group whose channels it sets), in forward order
  dense_widths: list[int] | None  # a zoo model's width list; None for a model without one
  dense: hj.Cost
  key: str
  target: float
  cost: Callable[[Any], dict[str, float]]  # widths per decision -> {"macs", "params"}
  multiple: int
  params_budget: float | None  # ITPruner's parameter budget (select.itpruner.params_ratio of the dense params)

  @property
  def decisions(self) -> list[str]:
    return [d for d, _ in self.pairs]

  @property
  def sizes(self) -> list[int]:
    return [int(g.size) for _, g in self.pairs]


def selection_budget(cfg: ml_collections.ConfigDict, dense_model: nnx.Module,
                     net: network_lib.Network | None = None) -> Budget:
  """The decisions of ``dense_model``, the exact cost of their widths at the config's input size
  (:func:`hsic_jax.cost_fn`), and the config's target (:func:`resolve_target`) and rounding (``select.round_to``,
  else :func:`default_multiple`)."""
  net = network_lib.Network.from_config(cfg) if net is None else net
  groups = net.groups(dense_model)
  pairs = [(d.name, d.group) for d in net.decisions(dense_model, groups)]
  cost = net.cost(dense_model, groups)
  dense = cost()
  key, target = resolve_target(cfg, dense)
  widths = getattr(dense_model, "widths", None)
  return Budget(pairs, None if widths is None else list(widths), dense, key, target, decision_cost(cost, pairs),
                int(cfg.select.round_to) or default_multiple(),
                float(cfg.select.itpruner.params_ratio) * float(dense.params) or None)


COST_AWARE = ("none", "macs", "params")  # select.cost_aware: "none", or the cost whose savings weigh the penalty


def floor_record(cfg_select: ml_collections.ConfigDict, sizes: Sequence[int]) -> dict[str, Any]:
  """``{"omega", "min_widths"}``: the width floor as configured (an int when integral, as the count it is) and as
  resolved per decision by :func:`hsic_jax.min_widths`."""
  omega = cfg_select.omega
  raw = int(omega) if isinstance(omega, (int, float)) and float(omega).is_integer() else omega
  return {"omega": raw, "min_widths": hj.min_widths(omega, list(sizes)).tolist()}


@dataclasses.dataclass(frozen=True)
class Selection:
  """What :func:`select_channels` chose: kept channels and widths per decision, and how they were found."""

  widths: list[int]
  keep: list[np.ndarray]
  record: dict[str, Any]  # method-specific: lambda and trace (APIB), importances and allocation (ITPruner), ...
  seconds: float
  result: hj.BudgetResult | None = None


def select_channels(cfg_select: ml_collections.ConfigDict, sizes: Sequence[int], cost: Callable[[Any], dict],
                    key: str, target: float, *, multiple: int, problems: list[hj.LassoProblem] | None = None,
                    similarity: np.ndarray | None = None, scores: list[np.ndarray] | None = None,
                    params_budget: float | None = None, seed: int = 0) -> Selection:
  """The widths of every decision and the channels that fill them (the ``select`` stage without its files).

  ``cfg_select.method`` names a selection method of the library's registry (:func:`hsic_jax.method_names`: apib,
  itpruner, uniform, global, or one registered with :func:`hsic_jax.register_method`), which sets the widths so that
  ``cost[key]`` reaches ``target``; ``cfg_select.criterion`` picks the channels (:func:`hsic_jax.select`). The
  method's settings are ``cfg_select`` itself, with ``params_budget`` and ``seed``; its progress shows as a bar.

  The APIB variants: ``cfg_select.cost_aware`` (``"macs"`` or ``"params"``) weighs every channel's penalty by what
  its removal saves (:func:`hsic_jax.cost_weighted_problems`): the problems are weighted here, before any method
  sees them, so a user-registered method gets the same problems as the built-in ones. ``cfg_select.omega`` is a
  count or a fraction of each dense width (:func:`hsic_jax.min_widths`); ``cfg_select.fill`` is how
  :func:`hsic_jax.select_k` fills widths beyond the Lasso support (``"relevance"`` or ``"residual"``).
  """
  method = cfg_select.method
  if cfg_select.fill not in hj.selection.FILLS:
    raise ValueError(f"select.fill must be one of {list(hj.selection.FILLS)}, got {cfg_select.fill!r}")
  if cfg_select.cost_aware not in COST_AWARE:
    raise ValueError(f"select.cost_aware must be one of {list(COST_AWARE)}, got {cfg_select.cost_aware!r}")
  if problems is not None and cfg_select.cost_aware != "none":
    problems = hj.cost_weighted_problems(problems, cost, list(sizes), key=cfg_select.cost_aware)
  settings = {**cfg_select.to_dict(), "params_budget": params_budget, "seed": seed}
  t0 = time.perf_counter()
  bar = tqdm(desc=f"select ({method})", unit="point", leave=False)
  try:
    result = hj.select(method, cfg_select.criterion, hj.Evidence(problems, similarity, scores), cost, target,
                       key=key, sizes=list(sizes), multiple=multiple, settings=settings,
                       progress=lambda _: bar.update(1))
  finally:
    bar.close()
  record = files.jsonable(hj.methods.get_method(method).record(result))
  return Selection([int(w) for w in result.widths], list(result.keep), record, time.perf_counter() - t0, result)


def load_evidence(cal: Path, cfg_select: ml_collections.ConfigDict, decisions: list[str]) -> dict[str, Any]:
  """The calibration evidence that the config's method and criterion need, read from ``cal``, as keyword
  arguments of :func:`select_channels`."""
  need = hj.method_needs(cfg_select.method, cfg_select.criterion)
  out: dict[str, Any] = {}
  if "problems" in need:
    saved_decisions, out["problems"] = calibrate.load_problems(cal / "problems.npz")
    if saved_decisions != decisions:
      raise ValueError("the calibration problems were built for other decisions than this model's; delete "
                       f"{cal} to calibrate again")
  if "similarity" in need:
    out["similarity"] = files.load_npz(cal / "similarity.npz", decisions)["similarity"]
  if "scores" in need:
    f = files.load_npz(cal / "scores.npz", decisions)
    out["scores"] = [f[str(i)] for i in range(len(decisions))]
  return out


def stage_select(run: Run) -> dict[str, Any]:
  """Widths and channels per decision (:func:`select_channels`) from the calibration evidence, to the target: run
  once, on process 0; every process reads its ``selection.json``."""
  dense_model = run.load_model("dense")  # on every process: orbax's restores are collective too
  out: dict[str, Any] = {}
  run.on_writer("select", lambda: out.update(_select(run, dense_model)))
  return out


def _select(run: Run, dense_model: nnx.Module) -> dict[str, Any]:
  cfg = run.config
  budget = selection_budget(cfg, dense_model, run.network)
  pairs, key, target = budget.pairs, budget.key, budget.target
  evidence = load_evidence(run.path("calibration"), cfg.select, budget.decisions)
  tol = float(cfg.select.tolerance)
  sel = select_channels(cfg.select, budget.sizes, budget.cost, key, target, multiple=budget.multiple,
                        params_budget=budget.params_budget, seed=int(cfg.seed), **evidence)
  costs = budget.cost(sel.widths)
  if not sel.result.reached:
    tqdm.write(f"warning: the selection could not land within {tol:.1%} of the target {key} {target:,.0f}; "
               f"it has {costs[key]:,.0f}")
  files.write_json(run.path("selection.json"), {
      "method": cfg.select.method, "criterion": cfg.select.criterion, "target_key": key, "target": target,
      "tolerance": tol, "within_tolerance": bool(sel.result.reached), "costs": costs,
      "dense": {"macs": float(budget.dense.macs), "params": float(budget.dense.params),
                "widths": budget.dense_widths},
      "widths": full_widths(pairs, budget.dense_widths, sel.widths),
      "decisions": [{"decision": d, "group": g.name, "size": g.size, "kept": len(k)}
                    for (d, g), k in zip(pairs, sel.keep)],
      "keep": {g.name: [int(i) for i in k] for (_, g), k in zip(pairs, sel.keep)},
      "positive": bool(cfg.select.positive), "round_to": budget.multiple,
      **floor_record(cfg.select, budget.sizes), "cost_aware": cfg.select.cost_aware, "fill": cfg.select.fill,
      **sel.record, "seconds": sel.seconds})
  return {"seconds": sel.seconds}


def full_widths(pairs: Sequence[tuple[str, hj.ChannelGroup]], dense_widths: Sequence[int] | None,
                kept: Any) -> list[int] | None:
  """The model's whole width list with each decision's group set to its kept count (``None`` for a model without a
  width list)."""
  if dense_widths is None:
    return None
  ws = list(dense_widths)
  for (_, g), k in zip(pairs, kept):
    for i in g.width_indices:
      ws[i] = int(k)
  return ws


def decision_cost(cost: Callable[[Any], hj.Cost], pairs: Sequence[tuple[str, hj.ChannelGroup]]
                  ) -> Callable[[Any], dict[str, float]]:
  """``widths per decision -> {"macs", "params"}`` from ``cost`` (:func:`hsic_jax.cost_fn`: widths per group)."""

  def per_decision(kept: Any) -> dict[str, float]:
    c = cost({g.name: int(k) for (_, g), k in zip(pairs, kept)})
    return {"macs": float(c.macs), "params": float(c.params)}

  return per_decision


def stage_surgery(run: Run) -> dict[str, Any]:
  """Removes the unselected channels: :func:`hsic_jax.thin_model` (the zoo's classes rebuilt at their new widths,
  any other class with its layers resized and checked on an example input)."""
  dense_model = run.load_model("dense")
  sel = files.read_json(run.path("selection.json"))
  t0 = time.perf_counter()
  pruned, plan = run.network.thin(dense_model, sel["keep"])
  if sel["widths"] is not None and list(pruned.widths) != list(sel["widths"]):
    raise ValueError(f"surgery gave widths {pruned.widths} but the selection recorded {sel['widths']}")
  base = checkpoint.read_meta(run.path("dense")).get("plan")
  if run.network.factory is not None and base:  # a factory model pruned before: one plan of the factory's model
    plan = hj.PrunePlan.from_json(json.dumps(base)).then(plan)
  run.save_model(pruned, "pruned", {"stage": "surgery", "plan": json.loads(plan.to_json())})
  return {"seconds": time.perf_counter() - t0}


def stage_finetune(run: Run) -> dict[str, Any]:
  cfg = run.config
  pruned = run.load_model("pruned")
  meta = checkpoint.read_meta(run.path("pruned"))
  teacher = run.load_model("dense") if cfg.finetune.distill_weight > 0 else None
  t0 = time.perf_counter()
  if cfg.finetune.epochs > 0:
    pruned, history = train_lib.train_and_evaluate(pruned, cfg.finetune, _loop(run, cfg.finetune,
                                                                               run.path("finetune"), "finetune"),
                                                   run.mesh, seed=int(cfg.seed), teacher=teacher)
  else:
    history = []
  run.save_model(pruned, "final", {"stage": "finetune", "plan": meta.get("plan"), "history": history})
  return {"seconds": time.perf_counter() - t0}


def stage_evaluate(run: Run) -> dict[str, Any]:
  cfg = run.config
  t0 = time.perf_counter()
  out: dict[str, Any] = {}
  out["dense"] = _evaluate(run, run.load_model("dense"), "eval dense")
  pruned = run.load_model("pruned")
  out["pruned_before_finetune_raw"] = _evaluate(run, pruned, "eval pruned")
  if cfg.eval.bn_recalibrate:
    recal = loops.recalibrated(cfg, pruned, run.mesh)
    out["pruned_before_finetune"] = _evaluate(run, recal, "eval pruned (BN re-estimated)")
  else:
    out["pruned_before_finetune"] = out["pruned_before_finetune_raw"]
  out["final"] = _evaluate(run, run.load_model("final"), "eval final")
  out["split"] = cfg.data.eval_split
  out["compute_dtype"] = train_lib.precision_name(run.compute_dtype)
  out["seconds"] = time.perf_counter() - t0
  if run.writer:
    files.write_json(run.path("evaluation.json"), out)
  return {"seconds": out["seconds"]}


def stage_report(run: Run) -> dict[str, Any]:
  run.on_writer("report", lambda: report.write(run.workdir, run.config, data.split_info(run.config.data)))
  return {}


_STAGE_FNS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "dense": stage_dense, "calibrate": stage_calibrate, "select": stage_select, "surgery": stage_surgery,
    "finetune": stage_finetune, "evaluate": stage_evaluate, "report": stage_report}

RESULTS = {"dense": "dense", "calibrate": "calibration/calibration.json", "select": "selection.json",
           "surgery": "pruned", "finetune": "final", "evaluate": "evaluation.json", "report": "report.json"}


# ------------------------------------------------------------------------------------------------------------------
# The program.


def check_config(config: ml_collections.ConfigDict, workdir: Path, *, write: bool = True) -> None:
  """Writes ``config.json`` (when ``write``), or refuses a workdir whose saved config differs (listing the keys that
  differ)."""
  path = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = files.read_json(path)
    from train.configs import base  # pylint: disable=import-outside-toplevel
    diffs = sorted(_diff(saved, current, default=json.loads(base.get_base_config().to_json_best_effort())))
    if diffs:
      shown = ", ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
      raise ValueError(f"workdir {workdir} holds a run of another config (keys that differ: {shown}); use another "
                       "--workdir, or delete the stages to redo from it")
    return
  if write:
    files.write_json(path, current)


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Refuses, before any work, a batch size that the mesh's devices (all processes' together) do not split:
  pre-training's (when the dense model is trained here), fine-tuning's (also BatchNorm re-estimation's) and
  evaluation's."""
  sections = {"finetune": config.finetune.batch_size, "eval": config.eval.batch_size}
  if config.dense.source == "pretrain":
    sections["pretrain"] = config.pretrain.batch_size
  for what, batch_size in sections.items():
    train_lib.check_batch_size(int(batch_size), mesh, what)


_MISSING = object()


def _diff(a: Any, b: Any, prefix: str = "", default: Any = _MISSING) -> list[str]:
  """The keys whose values differ between a saved config ``a`` and the current one ``b``. A key the saved config
  lacks matches a current value equal to the base config's default (``default``): a field added to the program
  since the run was started, at its default, does not change the run."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in set(a) | set(b):
      sub = default.get(k, _MISSING) if isinstance(default, dict) else _MISSING
      out += _diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}{k}.", sub)
    return out
  if a is _MISSING and default is not _MISSING and b == default:
    return []
  return [] if a == b else [prefix.rstrip(".")]


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | Path, *, only: str | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Runs every stage whose result is missing (or only ``only``); returns the report (``report.json``'s content).

  Raises:
    ValueError: an unknown stage, a config that differs from the workdir's, a stage run alone without the previous
      stage's result, and every bad-input error of the stages (missing data, impossible targets, mismatched
      checkpoints).
  """
  if only is not None and only not in STAGES:
    raise ValueError(f"unknown stage {only!r}; expected one of {list(STAGES)}")
  workdir = Path(workdir).expanduser().resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  net = network_lib.Network.from_config(config)
  net.check_builds()  # a factory that cannot be imported or called fails here, before the workdir is touched
  run = Run(config, workdir, mesh if mesh is not None else train_lib.make_mesh(), jax.process_index() == 0,
            train_lib.compute_dtype(config.half_precision), net)
  # Every process decides the same stages before any of them runs one (past the first barrier, process 0 may write
  # a stage's result while another is still looking).
  todo = []
  for i, stage in enumerate(STAGES):
    if only is not None and stage != only:
      continue
    if only is not None and i > 0 and not (workdir / RESULTS[STAGES[i - 1]]).exists():
      raise ValueError(f"stage {stage!r} needs the result of stage {STAGES[i - 1]!r} "
                       f"({workdir / RESULTS[STAGES[i - 1]]}); run the earlier stages first")
    if only is not None or not (workdir / RESULTS[stage]).exists():
      todo.append(stage)
  check_batch_sizes(config, run.mesh)
  check_config(config, workdir, write=run.writer)
  run.on_writer("prepare the data", lambda: data.prepare(config.data))
  if not run.writer:
    data.prepare(config.data)  # finds it prepared
  timings_path = workdir / "seconds.json"
  timings = files.read_json(timings_path) if timings_path.exists() else {}
  for stage in todo:
    if stage == "report" and run.writer:
      files.write_json(timings_path, timings)
    t0 = time.perf_counter()
    tqdm.write(f"[{stage}] ...")
    try:
      _STAGE_FNS[stage](run)
    except (ValueError, FileNotFoundError) as err:
      run.barrier(f"stage {stage}", err)
      raise
    run.barrier(f"stage {stage}")
    timings[stage] = time.perf_counter() - t0
    run.log({"event": "stage", "stage": stage, "seconds": timings[stage]})
    if stage != "report" and run.writer:
      files.write_json(timings_path, timings)
  if (workdir / "report.json").exists():
    return files.read_json(workdir / "report.json")
  return {}
