"""The run's report: ``report.json`` (read by other tools), ``report.md`` (read by people) and PNG plots.

Written last, from the stages' saved results, and atomically: a run interrupted before the end leaves no report.

``report.json`` keys: ``dense.{macs,params,top1,top5}``, ``pruned.{macs,params,top1_before_finetune,
top1_before_finetune_raw,top1,top5}``, ``widths`` (per decision: group, dense and pruned width), ``model_widths``
(the pruned model's whole width list), ``search`` (APIB: a list of ``{lambda, macs, params, widths, phase}``;
empty for other methods), ``selection`` (method, criterion, target, lambda for APIB, importances and the
allocation for ITPruner, whether the target was hit), ``calibration`` (image ids, BN mode), ``data``, ``seconds``
(per stage), ``warnings`` (sentences for people: e.g. fine-tuning that ended below the after-surgery accuracy)
and ``config``.

The fine-tuned model reported is the last step's: no checkpoint is picked by its accuracy on the evaluation split
(the evaluation split is only measured, never used to choose).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_collections


def _read(path: Path) -> Any:
  return json.loads(path.read_text())


def _history(workdir: Path) -> dict[str, list[dict[str, Any]]]:
  """Per training stage, its epoch records and logged windows, from ``metrics.jsonl``."""
  out: dict[str, list[dict[str, Any]]] = {}
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return out
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except ValueError:  # a line cut by a kill
      continue
    if rec.get("event") == "epoch":
      out.setdefault(rec["stage"], []).append(rec)
  # A resumed run logs the epochs after its checkpoint again: keep the last record of each epoch.
  return {k: list({round(r["epoch"], 6): r for r in v}.values()) for k, v in out.items()}


def build(workdir: Path, config: ml_collections.ConfigDict, data_info: dict[str, Any]) -> dict[str, Any]:
  sel = _read(workdir / "selection.json")
  ev = _read(workdir / "evaluation.json")
  calib = _read(workdir / "calibration" / "calibration.json")
  seconds = _read(workdir / "seconds.json") if (workdir / "seconds.json").exists() else {}
  dense, costs = sel["dense"], sel["costs"]
  widths = [{"decision": d["decision"], "group": d["group"], "dense": d["size"], "pruned": d["kept"]}
            for d in sel["decisions"]]
  return _with_warnings({
      "model": config.model.name,
      # The precision of the evaluated models' convolutions and matmuls (that of the run's every stage).
      "compute_dtype": ev.get("compute_dtype", "float32"),
      "dense": {"macs": dense["macs"], "params": dense["params"], "top1": ev["dense"]["top1"],
                "top5": ev["dense"]["top5"]},
      "pruned": {"macs": costs["macs"], "params": costs["params"],
                 "top1_before_finetune": ev["pruned_before_finetune"]["top1"],
                 "top1_before_finetune_raw": ev["pruned_before_finetune_raw"]["top1"],
                 "top1": ev["final"]["top1"], "top5": ev["final"]["top5"]},
      "ratios": {"macs": costs["macs"] / dense["macs"], "params": costs["params"] / dense["params"]},
      "widths": widths,
      "model_widths": sel["widths"],
      "search": sel.get("search", []),
      "selection": {k: sel.get(k) for k in ("method", "criterion", "target_key", "target", "tolerance",
                                            "within_tolerance", "lambda", "reachable", "positive", "round_to",
                                            "omega", "importance", "beta", "budgets", "solver", "allocation")},
      "calibration": {k: calib[k] for k in ("num_images", "ids", "split", "bn_mode", "augment")},
      "evaluation": {"split": ev["split"], "examples": ev["final"]["examples"],
                     "bn_recalibrate": bool(config.eval.bn_recalibrate)},
      "data": data_info,
      "training": _history(workdir),
      "seconds": {**seconds, **{f"calibrate_{k}": v for k, v in _calib_seconds(calib).items()},
                  "select_search": sel["seconds"]},
      "config": json.loads(config.to_json_best_effort()),
  })


def _with_warnings(rep: dict[str, Any]) -> dict[str, Any]:
  rep["warnings"] = [w for w in (finetune_warning(rep),) if w]
  return rep


SHORT_RUN_RECIPE = ("--config.finetune.lr=0.01 --config.finetune.distill_weight=0.5 (a few epochs at a tenth of the "
                    "reference's rate, distilled from the dense model; README, 'Short fine-tunes')")


def finetune_warning(rep: dict[str, Any]) -> str | None:
  """A sentence when fine-tuning ended below the accuracy right after surgery (the BN re-estimated one where the
  run re-estimates, else the raw one), with the likely cause and the short-run recipe; None otherwise (no
  fine-tuning, or it did not lose accuracy).

  Args:
    rep: a report with ``pruned.{top1, top1_before_finetune}`` and ``config.finetune.{epochs, lr}``.
  """
  p, ft = rep["pruned"], rep["config"].get("finetune", {})
  epochs = ft.get("epochs", 0)
  if not epochs or p["top1"] >= p["top1_before_finetune"]:
    return None
  return (f"fine-tuning ended below the after-surgery accuracy: top-1 {p['top1']:.4f} after {epochs:g} epochs at lr "
          f"{ft.get('lr', float('nan')):g}, {p['top1_before_finetune']:.4f} right after surgery. Likely cause: the "
          "learning rate belongs to a long schedule (the references': lr 0.1 over 135-300 epochs); a short run "
          f"wants a lower one: {SHORT_RUN_RECIPE}. The model kept is the last step's either way.")


def _calib_seconds(calib: dict[str, Any]) -> dict[str, float]:
  sec = calib["seconds"]
  return dict(sec) if isinstance(sec, dict) else {"problems": float(sec)}


_METHOD_TITLE = {"apib": "APIB", "itpruner": "ITPruner", "uniform": "uniform", "global": "global-ranking"}


def _selection_line(rep: dict[str, Any]) -> str:
  s = rep["selection"]
  method, crit = s.get("method") or "apib", s.get("criterion") or "hsic_lasso"
  reached = "reached" if s["within_tolerance"] else "**not reached**"
  fill = "HSIC Lasso" if crit == "hsic_lasso" else f"criterion `{crit}`"
  if method == "apib":
    text = (f"Selection: global lambda {s['lambda']:.6g} for target {s['target_key']} {s['target']:,.0f} "
            f"(tolerance {s['tolerance']:.1%}, {reached}); {len(rep['search'])} points evaluated; "
            f"{'nonnegative' if s['positive'] else 'signed (reference)'} HSIC Lasso")
    text += "." if crit == "hsic_lasso" else f"; the widths filled by {fill}."
  elif method == "itpruner":
    alloc = s.get("allocation") or {}
    used = ", ".join(f"{k} {v:,.0f} ({rep['pruned'][k] / v:.1%} used)" for k, v in (s.get("budgets") or {}).items())
    text = (f"Selection: ITPruner widths (beta {s['beta']:g}) under the budget {used} "
            f"({'held' if s['within_tolerance'] else '**exceeded**'}), {s.get('solver') or 'search'} solver; "
            "objective sum a_i w_i / c_i "
            f"{alloc.get('objective', float('nan')):.4g} ({alloc.get('dense_objective', float('nan')):.4g} at the "
            f"dense widths); channels by {fill}.")
  else:
    text = (f"Selection: {_METHOD_TITLE[method]} widths for target {s['target_key']} {s['target']:,.0f} "
            f"(tolerance {s['tolerance']:.1%}, {reached}); channels by {fill}.")
  return text


def markdown(rep: dict[str, Any]) -> str:
  d, p = rep["dense"], rep["pruned"]
  s = rep["selection"]
  lines = [
      f"# {rep['model']}: {_METHOD_TITLE.get(s.get('method') or 'apib', s.get('method'))} pruning to "
      f"{rep['ratios'][s['target_key']]:.1%} of the dense {s['target_key']}", "",
      f"Evaluated on `{rep['data'].get('name', '')}` split `{rep['evaluation']['split']}` "
      f"({rep['evaluation']['examples']} images), convolutions and matmuls in {rep.get('compute_dtype', 'float32')}.",
      "",
      "| | MACs | params | top-1 | top-5 |", "|---|---:|---:|---:|---:|",
      f"| dense | {d['macs'] / 1e6:.2f}M | {d['params'] / 1e6:.3f}M | {d['top1']:.4f} | {d['top5']:.4f} |",
      f"| pruned, after surgery | {p['macs'] / 1e6:.2f}M | {p['params'] / 1e6:.3f}M | "
      f"{p['top1_before_finetune']:.4f} | |",
      f"| pruned, fine-tuned | {p['macs'] / 1e6:.2f}M ({rep['ratios']['macs']:.1%}) | {p['params'] / 1e6:.3f}M "
      f"({rep['ratios']['params']:.1%}) | {p['top1']:.4f} | {p['top5']:.4f} |", "",
      *[f"**Warning:** {w}\n" for w in rep.get("warnings") or []],
      f"Right after surgery: top-1 {p['top1_before_finetune_raw']:.4f} with the dense running BatchNorm statistics"
      + (f", {p['top1_before_finetune']:.4f} with them re-estimated on training batches."
         if rep["evaluation"]["bn_recalibrate"] else "."), "",
      _selection_line(rep) + f" Calibration: {rep['calibration']['num_images']} images of "
      f"`{rep['calibration']['split']}`, BatchNorm in {rep['calibration']['bn_mode']}-statistics mode (ids in "
      "report.json).", "",
      "## Widths per decision", "", "| decision | group | dense | pruned |", "|---|---|---:|---:|"]
  lines += [f"| {w['decision']} | {w['group']} | {w['dense']} | {w['pruned']} |" for w in rep["widths"]]
  lines += ["", "## Seconds per stage", "", "| stage | s |", "|---|---:|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in rep["seconds"].items()]
  lines += ["", "Plots: " + ", ".join(rep.get("plots") or ["widths.png", "training.png"]) + ".", ""]
  return "\n".join(lines)


def plots(workdir: Path, rep: dict[str, Any]) -> list[str]:
  """Per-decision widths, the lambda search and the training curves, as PNGs (skipped without matplotlib)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  made = []
  ws = rep["widths"]
  fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(ws)), 3.6))
  x = range(len(ws))
  ax.bar(x, [w["dense"] for w in ws], color="#cccccc", label="dense")
  ax.bar(x, [w["pruned"] for w in ws], color="#2b7bba", label="pruned")
  ax.set_xticks(list(x), [w["group"] for w in ws], rotation=90, fontsize=6)
  ax.set_ylabel("channels")
  ax.set_title(f"{rep['model']}: widths per decision")
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "widths.png", dpi=110)
  plt.close(fig)
  made.append("widths.png")

  s = rep["selection"]
  key = s["target_key"]
  pts = [p for p in rep["search"] if p["lambda"] > 0]
  if pts:
    made.append(_lambda_plot(workdir, pts, s, key, plt))
  if s.get("importance"):
    made.append(_importance_plot(workdir, rep, plt))
  hist = rep["training"]
  if hist:
    made.append(_training_plot(workdir, rep, hist, plt))
  return made


def _importance_plot(workdir: Path, rep: dict[str, Any], plt: Any) -> str:
  imp = rep["selection"]["importance"]
  ws = rep["widths"]
  fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(ws)), 3.6))
  x = range(len(imp))
  ax.bar(x, imp, color="#d95f02")
  ax.set_xticks(list(x), [w["group"] for w in ws], rotation=90, fontsize=6)
  ax.set_ylabel("a_i = exp(-beta rhat_i)")
  ax.set_title(f"{rep['model']}: ITPruner layer importance")
  fig.tight_layout()
  fig.savefig(workdir / "importance.png", dpi=110)
  plt.close(fig)
  return "importance.png"


def _lambda_plot(workdir: Path, pts: list[dict[str, Any]], s: dict[str, Any], key: str, plt: Any) -> str:
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for phase, marker in (("grid", "o"), ("bisect", "x"), ("fill", "+")):
    sub = [p for p in pts if p["phase"] == phase]
    if sub:
      ax.scatter([p["lambda"] for p in sub], [p[key] for p in sub], marker=marker, label=phase)
  ax.axhspan(s["target"] * (1 - s["tolerance"]), s["target"] * (1 + s["tolerance"]), color="orange", alpha=0.3,
             label="target band")
  ax.axvline(s["lambda"], color="k", lw=0.8, ls="--", label="chosen lambda")
  ax.set_xscale("log")
  ax.set_xlabel("lambda")
  ax.set_ylabel(key)
  ax.set_title("global lambda search")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(workdir / "lambda_search.png", dpi=110)
  plt.close(fig)
  return "lambda_search.png"


def _training_plot(workdir: Path, rep: dict[str, Any], hist: dict[str, Any], plt: Any) -> str:
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for stage, recs in hist.items():
    ep = [r["epoch"] for r in recs]
    axes[0].plot(ep, [r["train_loss"] for r in recs], marker=".", label=f"{stage} train")
    if recs and "eval_loss" in recs[0]:
      axes[0].plot(ep, [r["eval_loss"] for r in recs], marker=".", ls="--", label=f"{stage} eval")
      axes[1].plot(ep, [r["eval_top1"] for r in recs], marker=".", label=f"{stage} eval top-1")
    axes[1].plot(ep, [r["train_accuracy"] for r in recs], marker=".", ls=":", label=f"{stage} train acc")
  axes[1].axhline(rep["dense"]["top1"], color="k", lw=0.8, ls="--", label="dense top-1")
  axes[1].axhline(rep["pruned"]["top1_before_finetune"], color="grey", lw=0.8, ls=":",
                  label="pruned top-1, before fine-tuning")
  axes[0].set_xlabel("epoch")
  axes[0].set_ylabel("loss")
  axes[1].set_xlabel("epoch")
  axes[1].set_ylabel("accuracy")
  for a in axes:
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(workdir / "training.png", dpi=110)
  plt.close(fig)
  return "training.png"


def write(workdir: Path, config: ml_collections.ConfigDict, data_info: dict[str, Any]) -> dict[str, Any]:
  """Builds the report, draws the plots, then writes ``report.md`` and, last, ``report.json`` (each atomically)."""
  rep = build(workdir, config, data_info)
  rep["plots"] = plots(workdir, rep)
  for name, text in (("report.md", markdown(rep)), ("report.json", json.dumps(rep, indent=2))):
    tmp = workdir / (name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, workdir / name)
  return rep
