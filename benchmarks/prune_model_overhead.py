"""Calibration from taps read off the jaxpr against the zoo's hand-declared taps, in the same run.

``python -m benchmarks.prune_model_overhead [--quick] [--no-readme] [--out DIR] [--repeats R]``

Both sides build the same HSIC Lasso problems (one per decision, summed over calibration batches) from the same
model and images, with the program's settings (BatchNorm on batch statistics, APIB's bandwidth, no normalisation):

- **hand-declared**: the zoo model's own ``model(x, capture=True)`` taps (how the program calibrated before it took
  its taps from the jaxpr), one jitted forward pass per batch, then :func:`hsic_jax.problem_from_features` per
  decision;
- **derived**: :func:`hsic_jax.taps.calibration_problems` with the model's declared groups (the same decisions),
  which traces the forward pass, finds every decision's consumer by the channel rules and reads the taps with its
  jaxpr interpreter, one jitted pass per batch, then the same problem builds;
- **derived, groups too**: the same with the groups derived as well (:func:`hsic_jax.derive_model_groups`, what
  :func:`hsic_jax.prune_model` does for a model without declared groups), restricted to the declared decisions.

Every call is timed whole (tracing and compilation included: each side compiles its forward pass anew on every
call, as a pruning run does once), the sides interleaved, median of ``--repeats``. The ratio is derived over
hand-declared; the goal is a ratio of at most 1.10.

Workloads: ResNet-56 (randomly initialised: the taps' cost does not depend on the weights), n = 128 synthetic
32 x 32 images in one batch, and a small ResNet-50 (every width a quarter of torchvision's) on n = 32 synthetic
64 x 64 images in batches of 16. ``--quick``: ResNet-20 on 32 images, results in a temporary folder.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import hsic_jax as hj
import models
from benchmarks import _common
from train import train as train_lib

NAME = "prune_model_overhead"
GOAL = 1.10
REPEATS = 3


def workloads(quick: bool) -> list[dict[str, Any]]:
  rng = np.random.default_rng(0)
  if quick:
    return [{"label": "ResNet-20 (quick)", "model": models.random_model("resnet20"), "batch": 32,
             "images": rng.normal(size=(32, 32, 32, 3)).astype(np.float32)}]
  r50 = [max(1, w // 4) for w in models.default_widths("resnet50")]
  return [
      {"label": "ResNet-56", "model": models.random_model("resnet56"), "batch": 128,
       "images": rng.normal(size=(128, 32, 32, 3)).astype(np.float32)},
      {"label": "ResNet-50 (1/4 widths, 64x64)", "model": models.random_model("resnet50", r50), "batch": 16,
       "images": rng.normal(size=(32, 64, 64, 3)).astype(np.float32)},
  ]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def hand_declared_problems(model: Any, batches: list[np.ndarray]) -> list[hj.LassoProblem]:
  """The problems from the zoo's hand-declared taps (``model(x, capture=True)``, BatchNorm on batch statistics):
  ``X`` the consumer's input as ``(n, c, h*w)``, ``Y`` its pre-BN output per image, summed over batches."""
  split = train_lib.split_model(model)
  decisions = model.decisions()

  @jax.jit
  def capture(params: Any, stats: Any, x: Any) -> dict[str, tuple[Any, Any]]:
    _, taps = train_lib.merge(split.train_def, params, stats)(x, capture=True)
    out = {}
    for d in decisions:
      n, h, w, c = taps[d].input.shape
      out[d] = (jnp.transpose(taps[d].input.reshape(n, h * w, c), (0, 2, 1)), taps[d].output.reshape(n, -1))
    return out

  per: dict[str, list[hj.LassoProblem]] = {d: [] for d in decisions}
  for b in batches:
    feats = capture(split.params, split.batch_stats, jnp.asarray(b))
    for d in decisions:
      per[d].append(hj.problem_from_features(*feats[d], check=False))
  return hj.taps.sum_batches(per)


def run(w: dict[str, Any], repeats: int) -> dict[str, Any]:
  model, images, bs = w["model"], w["images"], int(w["batch"])
  batches = [images[s:s + bs] for s in range(0, len(images), bs)]
  declared = model.channel_groups()

  def derived_all() -> list[hj.LassoProblem]:
    decs = hj.taps.decisions(model, batches[0])
    keep = [d for d in decs if d.name in set(model.decisions())]
    return hj.taps.calibration_problems(model, batches, decisions=keep)[1]

  sides: dict[str, Callable[[], Any]] = {
      "hand": lambda: hand_declared_problems(model, batches),
      "derived": lambda: hj.taps.calibration_problems(model, batches, groups=declared)[1],
      "derived_groups": derived_all,
  }
  times: dict[str, list[float]] = {k: [] for k in sides}
  outs: dict[str, Any] = {}
  for _ in range(repeats):
    for k, fn in sides.items():
      outs[k], t = _timed(fn)
      times[k].append(t)
  diff = max(float(np.max(np.abs(np.asarray(a.quad) - np.asarray(b.quad))) / max(float(np.max(np.abs(b.quad))), 1e-30))
             for a, b in zip(outs["derived"], outs["hand"]))
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {"workload": w["label"], "images": len(images), "batch": bs, "decisions": len(outs["hand"]),
          "seconds": med, "all_seconds": times, "ratio": med["derived"] / med["hand"],
          "ratio_groups": med["derived_groups"] / med["hand"], "max_rel_diff_quad": diff}


def table(rows: list[dict[str, Any]]) -> str:
  return _common.markdown_table(
      ["workload", "n (batch)", "decisions", "hand-declared s", "derived s", "ratio", "derived + groups s", "ratio"],
      [[r["workload"], f"{r['images']} ({r['batch']})", r["decisions"], _common.fmt(r["seconds"]["hand"]),
        _common.fmt(r["seconds"]["derived"]), f"{r['ratio']:.2f}", _common.fmt(r["seconds"]["derived_groups"]),
        f"{r['ratio_groups']:.2f}"] for r in rows])


def render(payload: dict[str, Any]) -> str:
  rows = payload["rows"]
  met = all(r["ratio"] <= GOAL for r in rows)
  return (table(rows) + "\n\n" + f"Goal (derived taps at most {GOAL:.2f}x the hand-declared ones): "
          f"{'met' if met else 'not met'}; the problems agree to a relative "
          f"{max(r['max_rel_diff_quad'] for r in rows):.1e} in Q. Median of {payload['repeats']} interleaved calls, "
          "tracing and compilation included, on " + f"{payload['machine']['device']} "
          f"({payload['machine']['cpu_count']} CPUs, shared).")


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, ("quick", "out", "no-readme"),
                          help={"quick": "ResNet-20 on 32 images (CI-sized)"})
  parser.add_argument("--repeats", type=int, default=REPEATS, help="interleaved calls per side (median)")
  args = parser.parse_args(argv)
  rows = []
  for w in workloads(args.quick):
    print(f"{w['label']} ...", flush=True)
    rows.append(run(w, args.repeats))
  payload = {"quick": args.quick, "repeats": args.repeats, "rows": rows, "machine": _common.machine()}
  print(render(payload))
  out = args.out if args.out is not None else (pathlib.Path(tempfile.mkdtemp(prefix=f"{NAME}_")) if args.quick
                                              else None)
  if out is None:
    path = _common.write_results(NAME, {k: v for k, v in payload.items() if k != "machine"})
  else:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    path.write_text(json.dumps({"benchmark": NAME, **payload}, indent=2))
  print(f"wrote {path}")
  if not args.no_readme and not args.quick and out is None:
    _common.ensure_section(NAME, f"## Calibration taps from the jaxpr (`{NAME}`)",
                           "The calibration problems from taps that hsic_jax.taps reads off the jaxpr against the "
                           "zoo's hand-declared taps (train.calibrate.build_problems), same model and images, "
                           "whole calls timed (tracing and compilation included).")
    _common.update_readme(NAME, render(payload))
    print(f"updated {_common.README}")


if __name__ == "__main__":
  main()
