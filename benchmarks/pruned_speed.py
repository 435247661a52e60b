"""Inference speed of physically pruned models vs dense and vs mask-based pruning, next to their MACs ratio.

``python -m benchmarks.pruned_speed [--quick] [--repeats N] [--skip-resnet50] [--multiples 8,16]``

For each model, three variants run the same jitted eval forward (CPU, float32, NHWC):

- **dense**: the unpruned model;
- **masked**: the dense model with the removed channels zeroed (``hsic_jax.surgery.mask``): same shapes, so the same
  work as dense; this is what mask-based pruning buys at inference;
- **pruned**: the model rebuilt with the thin widths and the sliced weights (``hsic_jax.surgery.prune``);
- **pruned (x8)**, **pruned (x16)**: the same with every pruned width rounded to a multiple of 8 or 16
  (``--multiples``), which XLA's CPU convolutions run much faster than odd channel counts (on the machine of the
  committed results a 3x3 conv with 16 inputs and 7 outputs at 32x32 takes longer than one with 16 outputs). The
  rounded variants land at the nearest achievable MACs ratio, shown in the table.

Pruned widths: ResNet-56 at about 45% of its MACs (APIB's CIFAR operating point) by shrinking every block's middle
width by one factor; ResNet-50 at about 40% (APIB's ImageNet point) by shrinking every p1/p2 by one factor (the
rounded variant lands at the nearest achievable ratio). Which channels are kept does not matter for speed (the first
ones are).

ResNet-56 runs at two batch sizes: 16 (small-batch serving, activations in cache) and 128 (throughput, activations
streamed from memory, where the unpruned residual stream's memory-bound work weighs more); ResNet-50 at batch 8.

Reported: milliseconds per batch (median over interleaved repeats: dense, masked, pruned, dense, ...), speedup over
dense, and **efficiency = speedup / (dense MACs / pruned MACs)**, the share of the ideal speedup that is realised
(goal >= 70%). The verdict line takes, per model and batch, the best median efficiency among the pruned variants
whose MACs ratio is within 0.05 of the target (so a rounding that lands far from it does not count). The same from
the fastest repeat ("min") is shown too: on a shared machine it is the steadier estimate of uncontended time.
Results go to ``benchmarks/results/pruned_speed.json``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from benchmarks import _common, plots
from hsic_jax import ChannelGroup, surgery
from models import checkpoint, flops


def scaled_widths(groups: list[ChannelGroup], dense: list[int], factor: float, multiple: int) -> list[int]:
  """Dense widths with every prunable group's entries multiplied by ``factor``, rounded to a multiple of
  ``multiple`` (at least ``multiple``, at most the dense size)."""
  ws = list(dense)
  for g in groups:
    if g.prunable:
      w = min(g.size, max(multiple, multiple * round(g.size * factor / multiple)))
      for i in g.width_indices:
        ws[i] = w
  return ws


def widths_for_ratio(name: str, target: float, multiple: int = 1) -> tuple[list[int], float]:
  """Bisects the uniform shrink factor of the prunable widths so that MACs / dense MACs is closest to ``target``."""
  model = nnx.eval_shape(lambda: models.get_model(name, rngs=nnx.Rngs(0)))
  groups, dense_widths = model.channel_groups(), model.widths
  dense = flops.count(name).macs
  lo, hi = 0.0, 1.0
  best = (dense_widths, 1.0)
  for _ in range(30):
    mid = (lo + hi) / 2
    ws = scaled_widths(groups, dense_widths, mid, multiple)
    ratio = flops.count(name, ws).macs / dense
    if abs(ratio - target) < abs(best[1] - target):
      best = (ws, ratio)
    lo, hi = (lo, mid) if ratio > target else (mid, hi)
  return best


def random_state(model: nnx.Module, seed: int) -> dict[str, Any]:
  """He-normal kernels, BN scale/var in [0.5, 1.5], small biases/means (values do not affect the timing)."""
  rng = np.random.default_rng(seed)

  def draw(path: Any, leaf: Any) -> np.ndarray:
    key, shape = path[-1].key, leaf.shape
    if key == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
    if key in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0.0, 0.1, shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(model)))


def build(name: str, widths: list[int] | None, pure: dict[str, Any]) -> tuple[nnx.GraphDef, nnx.State]:
  """The eval-mode graph and state of model ``name`` with ``widths`` holding ``pure`` (shapes checked)."""
  return nnx.split(checkpoint.build_with_state(name, widths, None, pure))


def forward_fn(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> Callable[[], jax.Array]:
  fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  jax.block_until_ready(fwd(state, x))  # compile + warm up
  return lambda: jax.block_until_ready(fwd(state, x))


def bench_model(name: str, target: float, batch: int, repeats: int, multiples: list[int]) -> dict[str, Any]:
  dense_model = nnx.eval_shape(lambda: models.get_model(name, rngs=nnx.Rngs(0)))
  groups = dense_model.channel_groups()
  pure = random_state(dense_model, 0)
  h, w = models.input_size(name)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, h, w, 3)).astype(np.float32))
  dense_macs = flops.count(name).macs
  variants = {"dense": forward_fn(*build(name, None, pure), x)}
  macs = {"dense": dense_macs}
  widths_of: dict[str, list[int]] = {"dense": dense_model.widths}
  exact_widths, _ = widths_for_ratio(name, target)
  keep = {g.name: np.arange(exact_widths[g.width_indices[0]]) for g in groups if g.prunable}
  variants["masked"] = forward_fn(*build(name, None, surgery.mask(pure, groups, keep)), x)
  macs["masked"], widths_of["masked"] = dense_macs, dense_model.widths
  for label, mult in [("pruned", 1)] + [(f"pruned (x{m})", m) for m in multiples]:
    ws, _ = widths_for_ratio(name, target, mult)
    keep = {g.name: np.arange(ws[g.width_indices[0]]) for g in groups if g.prunable}
    res = surgery.prune(pure, groups, keep, widths=dense_model.widths)
    assert res.widths == ws
    variants[label] = forward_fn(*build(name, ws, res.state), x)
    macs[label], widths_of[label] = flops.count(name, ws).macs, ws
  times: dict[str, list[float]] = {k: [] for k in variants}
  for _ in range(repeats):  # interleaved, so that load changes hit every variant alike
    for k, fn in variants.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  best = {k: min(v) for k, v in times.items()}
  rows = []
  for k in variants:
    ideal = dense_macs / macs[k]
    speedup = med["dense"] / med[k]
    rows.append({"variant": k, "widths": widths_of[k], "macs": macs[k], "macs_ratio": macs[k] / dense_macs,
                 "ms_per_batch": med[k] * 1e3, "min_ms_per_batch": best[k] * 1e3, "images_per_s": batch / med[k],
                 "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal,
                 "efficiency_min": best["dense"] / best[k] / ideal, "times_s": times[k]})
  return {"model": name, "batch": batch, "input_hw": [h, w], "target_ratio": target, "repeats": repeats,
          "variants": rows}


def main(argv: list[str] | None = None) -> int:
  parser = _common.parser(__doc__, ("quick",), prog="python -m benchmarks.pruned_speed",
                          help={"quick": "small batches and few repeats (a smoke run)"})
  parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per variant (default 7)")
  parser.add_argument("--skip-resnet50", action="store_true", help="only ResNet-56")
  parser.add_argument("--multiples", default="8,16",
                      help="also time pruned widths rounded to these multiples (hardware-friendly; default 8,16)")
  args = parser.parse_args(argv)
  repeats = args.repeats or (2 if args.quick else 7)
  if repeats < 1:
    parser.error(f"--repeats must be >= 1, got {repeats}")
  plan = [("resnet56", 0.45, 8)] if args.quick else [("resnet56", 0.45, 16), ("resnet56", 0.45, 128)]
  if not args.skip_resnet50:
    plan.append(("resnet50", 0.40, 1 if args.quick else 8))
  try:
    multiples = [int(m) for m in args.multiples.split(",") if m.strip()]
  except ValueError:
    parser.error(f"--multiples must be comma-separated integers, got {args.multiples!r}")
  if any(m < 2 for m in multiples):
    parser.error(f"--multiples must all be >= 2, got {args.multiples!r}")
  results = [bench_model(name, target, batch, repeats, multiples) for name, target, batch in plan]
  headers = ("model", "variant", "batch", "MACs (M)", "MACs ratio", "ms / batch (median)", "ms (min)", "images/s",
             "speedup", "ideal", "efficiency", "efficiency (min)")
  rows = [(r["model"], v["variant"], r["batch"], f"{v['macs'] / 1e6:.1f}", f"{v['macs_ratio']:.3f}",
           f"{v['ms_per_batch']:.1f}", f"{v['min_ms_per_batch']:.1f}", f"{v['images_per_s']:.0f}",
           f"{v['speedup']:.2f}x", f"{v['ideal_speedup']:.2f}x", f"{v['efficiency']:.0%}",
           f"{v['efficiency_min']:.0%}") for r in results for v in r["variants"]]
  table = _common.markdown_table(headers, rows)
  print(table)
  if args.quick:  # a smoke run: keep the committed results
    return 0
  path = _common.write_results("pruned_speed", {"quick": args.quick, "results": results, "table": table})
  print(f"\nwrote {path}")
  m = _common.machine()
  def near_target(r: dict[str, Any], v: dict[str, Any]) -> bool:
    return v["variant"].startswith("pruned") and abs(v["macs_ratio"] - r["target_ratio"]) <= plots.RATIO_TOLERANCE

  eff = {f"{r['model']} (batch {r['batch']})": max((v["efficiency"] for v in r["variants"] if near_target(r, v)),
                                                   default=0.0) for r in results}
  _common.update_readme("pruned_speed", (
      f"Measured {m['date']} on {m['device']} ({m['cpu_count']} CPU cores), jax {m['jax']}; {repeats} interleaved "
      f"repeats, median. Efficiency = speedup / MACs ratio (goal >= 70%).\n\n" + table
      + f"\n\nBest median efficiency of a pruned variant within {plots.RATIO_TOLERANCE:g} of the target MACs ratio: "
      + ", ".join(f"{k} {v:.0%}" for k, v in eff.items()) + ".\n\n" + plots.readme_link("pruned_speed")))
  plots.pruned_speed({"results": results}, plots.png_path("pruned_speed"))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
