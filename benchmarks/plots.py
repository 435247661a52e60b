"""Plots of the benchmark results, drawn from the JSON the programs write to ``benchmarks/results/``.

Each benchmark program calls its function here after writing its JSON; ``python -m benchmarks.plots`` redraws every
plot from the saved results (e.g. after a change to a plot) without re-running anything. Plots need matplotlib (the
``bench`` extra); without it they are skipped with a message.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import _common

# A pruned variant counts towards the pruned-speed goal when its MACs ratio is this close to the target.
RATIO_TOLERANCE = 0.05

SOLVERS = (("ours", "hsic_jax"), ("sklearn_lasso", "scikit-learn Lasso"), ("sklearn_lassolars", "LassoLars"),
           ("pyhsiclasso_nlars", "pyHSICLasso nlars"))


def pyplot() -> Any:
  """matplotlib.pyplot on the Agg backend, or None without matplotlib (the plots are then skipped)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib is not installed (pip install -e '.[bench]'): no plot drawn", file=sys.stderr)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save(fig: Any, plt: Any, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plain_log_ticks(axis: Any, suffix: str = "") -> None:
  """Major ticks of a log axis as plain numbers (``10``, ``100x``), no labels on the minor ones."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  axis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
  axis.set_minor_formatter(ticker.NullFormatter())


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def solver_throughput(payload: dict[str, Any], path: pathlib.Path) -> pathlib.Path | None:
  """Problems per second of every solver on every workload (log scale), one row of bars per workload; a solver
  that failed or has no time on a workload has no bar there."""
  plt = pyplot()
  if plt is None:
    return None
  rows = payload["rows"]
  fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
  height = 0.8 / len(SOLVERS)
  for k, (key, name) in enumerate(SOLVERS):
    ys, widths, reached = [], [], []
    for i, r in enumerate(rows):
      secs = r.get(key, {}).get("seconds")
      if "failed" not in r.get(key, {}) and _finite(secs):
        ys.append(i + (k - (len(SOLVERS) - 1) / 2) * height)
        widths.append(r["problems"] / secs)
        reached.append(r[key].get("reached", True))
    bars = ax.barh(ys, widths, height, label=name)
    for bar, ok in zip(bars, reached):
      if not ok:  # fast but short of the tolerance: not a like-for-like time
        bar.set_hatch("///")
        bar.set_alpha(0.5)
  if any(not r[key].get("reached", True) for r in rows for key, _ in SOLVERS
         if key in r and "failed" not in r[key]):
    ax.text(0.99, 0.01, "hatched: did not reach the objective tolerance", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=7)
  ax.set_xscale("log")
  plain_log_ticks(ax.xaxis)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([r["workload"] for r in rows], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("problems solved per second (log scale; more is better)")
  ax.set_title("HSIC Lasso solvers at equal objective tolerance")
  ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 0.04))
  ax.grid(axis="x", which="both", alpha=0.3)
  return save(fig, plt, path)


def gram_throughput(payload: dict[str, Any], path: pathlib.Path, goal: float = 0.5) -> pathlib.Path | None:
  """Share of the same-run matmul peak per layer shape, with the goal as a line, and the speedup over the NumPy
  float64 reference (log scale) where it was measured."""
  plt = pyplot()
  if plt is None:
    return None
  rows = payload["rows"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.8), sharey=True)
  ys = range(len(rows))
  left.barh(ys, [100 * r["fraction_of_peak"] for r in rows], 0.6, color="tab:blue")
  left.axvline(100 * goal, color="tab:red", linestyle="--", label=f"goal ({goal:.0%} of peak)")
  left.set_xlim(0, 100)
  left.set_xlabel(f"% of the matmul peak ({payload['matmul_peak_gflops']:.0f} GFLOP/s, same run)")
  left.set_yticks(list(ys))
  left.set_yticklabels([r["label"] for r in rows], fontsize=8)
  left.invert_yaxis()
  left.legend(fontsize=8, loc="lower right")
  left.set_title("Gram + Q construction, hsic_jax")
  speed = [r.get("speedup_vs_numpy64") for r in rows]
  right.barh([y for y, s in zip(ys, speed) if _finite(s)], [s for s in speed if _finite(s)], 0.6, color="tab:green")
  right.set_xscale("log")
  plain_log_ticks(right.xaxis, "x")
  right.set_xlabel("speedup over NumPy float64 H K H (log scale)")
  right.set_title("against the reference construction")
  for ax in (left, right):
    ax.grid(axis="x", which="both", alpha=0.3)
  return save(fig, plt, path)


def pruned_speed(payload: dict[str, Any], path: pathlib.Path, goal: float = 0.7) -> pathlib.Path | None:
  """Efficiency (realised speedup / MACs-ratio speedup) of every pruned variant, per model and batch, with the goal
  as a line; each bar is labelled with its MACs ratio (variants far from the target ratio do not count towards the
  goal)."""
  plt = pyplot()
  if plt is None:
    return None
  labels, effs, notes = [], [], []
  for r in payload["results"]:
    for v in r["variants"]:
      if v["variant"].startswith("pruned"):
        labels.append(f"{r['model']} batch {r['batch']}: {v['variant']}")
        effs.append(100 * v["efficiency"])
        off = abs(v["macs_ratio"] - r["target_ratio"]) > RATIO_TOLERANCE
        notes.append(f"MACs {v['macs_ratio']:.2f}" + (" (off target)" if off else ""))
  fig, ax = plt.subplots(figsize=(9, 0.38 * len(labels) + 1.5))
  bars = ax.barh(range(len(labels)), effs, 0.6, color=["tab:gray" if "off" in n else "tab:blue" for n in notes])
  for bar, note in zip(bars, notes):
    ax.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=7)
  ax.axvline(100 * goal, color="tab:red", linestyle="--", label=f"goal ({goal:.0%})")
  ax.set_xlim(0, max([110.0] + [e + 25 for e in effs]))
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("efficiency: measured speedup / MACs-ratio speedup (%)")
  ax.set_title("Physically pruned models, eval throughput vs dense")
  ax.legend(fontsize=8, loc="lower right")
  ax.grid(axis="x", alpha=0.3)
  return save(fig, plt, path)


PLOTS: dict[str, Callable[[dict[str, Any], pathlib.Path], pathlib.Path | None]] = {
    "solver_throughput": solver_throughput,
    "gram_throughput": gram_throughput,
    "pruned_speed": pruned_speed,
}


def png_path(name: str) -> pathlib.Path:
  return _common.RESULTS / f"{name}.png"


def readme_link(name: str) -> str:
  """The Markdown image line that the benchmark's README block ends with."""
  return f"![{name}](results/{name}.png)"


def main(argv: list[str] | None = None) -> int:
  names = (argv if argv is not None else sys.argv[1:]) or list(PLOTS)
  unknown = [n for n in names if n not in PLOTS]
  if unknown:
    print(f"unknown benchmark(s) {unknown}; known: {sorted(PLOTS)}", file=sys.stderr)
    return 2
  for name in names:
    src = _common.RESULTS / f"{name}.json"
    if not src.exists():
      print(f"{src} does not exist: run python -m benchmarks.{name} first", file=sys.stderr)
      continue
    out = PLOTS[name](json.loads(src.read_text()), png_path(name))
    if out is not None:
      print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
