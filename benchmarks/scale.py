"""How calibration grows with the number of calibration images n and channels c: memory, time, fitted exponents.

``python -m benchmarks.scale [--quick] [--out DIR] [--no-readme] [--max-n N]``

Three measurements, then a model fitted to them:

1. **One layer's problem build vs n** (:func:`hsic_jax.problem_from_features`, the library's default memory budget
   :data:`hsic_jax.problem.DEFAULT_BLOCK_BYTES`): features ``x`` of shape ``(n, c, d)`` with ``c = 64``, ``d = 64`` (an 8x8
   conv input) and an output ``y`` of ``(n, 64)``, n = 64 ... ``--max-n``. Seconds (warm: the median of two calls
   after a compiling one) and the compiled working memory (XLA's ``memory_analysis`` of the jitted build: its
   temporaries, compiled for n beyond what is run, up to 16,384). The build holds the whole per-channel Grams
   (``c n^2`` floats) while they fit in the budget, and streams tiles of them from the features past it.
2. **One layer's build vs c** at n = 512, d = 16, c = 16 ... 512.
3. **The program's calibration vs n**: a randomly initialised ResNet-20 at 32x32 with the ``resnet20_apib``
   settings, run through the program's own functions, as ``benchmarks.selection_e2e`` does: the forward pass with
   taps (:func:`train.calibrate.make_capture`), every decision's build (:func:`train.calibrate.problems_from_taps`)
   and the lambda search (:func:`train.pipeline.select_channels`), with the taps' bytes.

The model: work ``W = 2 c n^2 d`` (distances) ``+ c^2 n^2`` (Q over packed triangles) and time ``t = W / r``; the
exponents of n and c are fitted by least squares on log-log over the larger sizes (expected: 2 in n; between 1 and 2
in c, as the ``c n^2 d`` distances give way to the ``c^2 n^2`` products). Memory per build: ``x`` and ``y``, the
output Gram (``n^2`` floats, twice while it is centered) and at most the memory budget of Gram entries; the whole
calibration batch's taps (``n`` times the bytes per image) are held while the builds run. From these, the n that
fits one 16 GB and one 80 GB device is projected for ResNet-50 at 224x224 (its taps per image from the model's
shapes), and the README block says when to split calibration over devices by channel rather than by images.

Figures are from whatever machine runs it; the committed ones from a 2-core CPU shared with other jobs, so the
times are noisy and the rates low: the exponents and the memory figures carry over, the seconds do not.
``--quick``: tiny sizes (a smoke run); results go to ``--out`` or a temporary folder, not over the committed ones.
"""

from __future__ import annotations

import json
import math
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import hsic_jax as hj
import models
from benchmarks import _common
from train import calibrate, config_lib, pipeline

LAYER_NS = (64, 128, 256, 512, 1024, 2048, 4096)
COMPILE_ONLY_NS = (8192, 16384)  # working memory compiled, not run
CHANNELS = (16, 32, 64, 128, 256, 512)
PROGRAM_NS = (64, 128, 256, 512, 1024)
QUICK = {"layer_ns": (32, 64, 128), "compile_only_ns": (256,), "channels": (8, 16, 32), "program_ns": (16, 32),
         "layer": (16, 8), "channel_n": 64}
LAYER = (64, 64)  # (c, d) of the n sweep
CHANNEL_N, CHANNEL_D = 512, 16
Q = 64
DEVICES_GB = (16, 80)
# Channel sharding of ResNet-50's builds is judged at this n over this many devices, against an interconnect that
# delivers one byte per this many FLOPs of the device (H100: 67 float32 TFLOP/s over 450 GB/s of NVLink ~ 150;
# TPU v5p's float32 products over its ICI are of the same order).
SHARD_DEVICES, SHARD_N, FLOPS_PER_BYTE = 8, 1024, 150.0
HEADROOM = 0.9  # of a device's memory usable by the calibration (the runtime and the model take the rest)
F32 = 4
SECTION = "## Calibration at scale (`scale`)"
SECTION_PARAGRAPH = (
    "How calibration's memory and time grow with the number of calibration images n and the channels c, measured "
    "on one layer's build (`hsic_jax.problem_from_features`) and on the program's calibration of a ResNet-20, with "
    "exponents fitted on log-log; from them, the n that fits one device for ResNet-50, and when calibration should "
    "be split over devices by channel rather than by images. `python -m benchmarks.scale` (`--quick`: a smoke run; "
    "`--render`: this block from the saved results).")


def work(n: int, c: int, d: int) -> float:
  """FLOPs of one build: the channels' distances and the quadratic form over packed triangles."""
  return 2.0 * c * n * n * d + c * c * n * (n + 1)


def build_bytes(n: int, c: int, d: int, q: int, *, inputs: bool = True,
                block_bytes: int = hj.problem.DEFAULT_BLOCK_BYTES) -> float:
  """The memory model of one build: its inputs ``x`` and ``y`` (unless ``inputs`` is false: taps the caller holds
  anyway), the output Gram (twice while it is centered), and the Gram entries: the whole ``c n^2`` while they fit in
  the budget (with one centered, packed copy where the products take them whole), else tiles of at most the
  budget (an accelerator's; a CPU's are cache-sized)."""
  grams = c * n * n * F32
  if grams > block_bytes:  # streamed: tiles of at most the budget (a CPU takes cache-sized ones, far smaller)
    held = block_bytes
  else:  # whole Grams, and their centered, packed copy unless the products take them in tiles (3 copies > budget)
    held = grams + (grams if 3 * grams <= block_bytes else 0)
  return ((n * c * d + n * q) * F32 if inputs else 0) + 2 * n * n * F32 + held


def intensity(n: int, c: int, d: int, devices: int) -> float:
  """FLOPs per byte moved of one layer's build split by channel over ``devices``: each device computes its
  ``c / devices`` rows of ``Q`` (``2 c^2 n^2 / devices`` FLOPs with the distances) and receives the other devices'
  features of the layer (``n c d`` floats) to form them."""
  flops = (2.0 * c * n * n * d + 2.0 * c * c * n * n) / devices
  return flops / (n * c * d * F32 * (devices - 1) / devices)


def _synthetic(n: int, c: int, d: int, seed: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  x = np.maximum(rng.normal(size=(n, c, d)), 0.0).astype(np.float32)  # post-ReLU-like features
  return jnp.asarray(x), jnp.asarray(rng.normal(size=(n, Q)).astype(np.float32))


def compiled_temp_bytes(n: int, c: int, d: int) -> float:
  """XLA's temporaries of the jitted build at this shape (compiled only; nothing runs)."""
  f = jax.jit(lambda x, y: hj.problem_from_features(x, y, check=False))
  shapes = (jax.ShapeDtypeStruct((n, c, d), jnp.float32), jax.ShapeDtypeStruct((n, Q), jnp.float32))
  return float(f.lower(*shapes).compile().memory_analysis().temp_size_in_bytes)


def _warm_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(first call's seconds, median of ``repeats`` later ones); ``fn`` must block."""
  t0 = time.perf_counter()
  fn()
  cold = time.perf_counter() - t0
  return cold, _common.time_call(fn, repeats=repeats)


def layer_row(n: int, c: int, d: int, *, run: bool, repeats: int) -> dict[str, Any]:
  row = {"n": n, "c": c, "d": d, "q": Q, "gflop": work(n, c, d) / 1e9,
         "path": "whole Grams" if c * n * n * F32 <= hj.problem.DEFAULT_BLOCK_BYTES else "streamed tiles",
         "compiled_temp_mb": compiled_temp_bytes(n, c, d) / 2**20,
         "model_mb": build_bytes(n, c, d, Q, inputs=False) / 2**20}
  if run:
    x, y = _synthetic(n, c, d, n + c)
    cold, warm = _warm_seconds(lambda: jax.block_until_ready(hj.problem_from_features(x, y)), repeats)
    row.update({"cold_seconds": cold, "seconds": warm, "gflops": work(n, c, d) / warm / 1e9})
  return row


def program_row(model: nnx.Module, cfg: Any, n: int, repeats: int) -> dict[str, Any]:
  """The program's calibration on ``n`` synthetic images of ``model``: capture, builds, search."""
  decisions = [dd for dd, _ in calibrate.decision_groups(model)]
  images = jnp.asarray(np.random.default_rng(n).normal(size=(n, 32, 32, 3)).astype(np.float32))
  capture = calibrate.make_capture(model, cfg.calib.bn_mode, decisions, cfg.calib.resnet50_conv3_y)
  _, t_capture = _warm_seconds(lambda: jax.block_until_ready(capture(images)), repeats)
  feats = capture(images)
  tap_bytes = sum(x.nbytes + y.nbytes for x, y in feats.values())
  build = lambda: jax.block_until_ready(calibrate.problems_from_taps(feats, decisions, cfg.select))  # noqa: E731
  _, t_build = _warm_seconds(build, repeats)
  problems = build()
  budget = pipeline.selection_budget(cfg, model)
  search = lambda: pipeline.select_channels(cfg.select, budget.sizes, budget.cost, budget.key,  # noqa: E731
                                            budget.target, multiple=1, problems=problems, seed=0)
  _, t_search = _warm_seconds(search, repeats)
  return {"n": n, "capture_seconds": t_capture, "build_seconds": t_build, "search_seconds": t_search,
          "tap_mb": tap_bytes / 2**20, "tap_mb_per_image": tap_bytes / n / 2**20}


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
  """The slope of log y on log x (least squares)."""
  return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def resnet50_layers(image_size: int = 224) -> tuple[list[tuple[str, int, int, int]], float]:
  """Every ResNet-50 decision's ``(name, c, d, q)`` (input channels, values per channel, output values) and the
  calibration taps' bytes per image (float32), from the model's shapes alone."""
  abstract = nnx.eval_shape(lambda: models.get_model("resnet50", rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  taps = jax.eval_shape(lambda s, im: nnx.merge(graphdef, s)(im, capture=True)[1], state, x)
  layers, per_image = [], 0.0
  for d in abstract.decisions():
    t = taps[d]
    _, h, w, c = t.input.shape
    layers.append((d, int(c), int(h * w), int(math.prod(t.output.shape[1:]))))
    per_image += (math.prod(t.input.shape) + math.prod(t.output.shape)) * F32
  return layers, per_image


def largest_n(memory_bytes: float, per_image: float, layers: Sequence[tuple[str, int, int, int]]) -> int:
  """The largest n (a multiple of 64) whose taps plus the largest build fit in ``memory_bytes``."""
  def need(n: int) -> float:
    return n * per_image + max(build_bytes(n, c, d, q, inputs=False) for _, c, d, q in layers)
  n = 64
  while need(n + 64) <= memory_bytes:
    n += 64
  return n if need(n) <= memory_bytes else 0


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, ("quick", "out", "no-readme", "render"),
                          help={"quick": "tiny sizes (a smoke run; results to --out or a temporary folder)"})
  parser.add_argument("--max-n", type=int, default=LAYER_NS[-1], help="largest n of the layer sweep that is run")
  parser.add_argument("--repeats", type=int, default=1, help="timed calls after the compiling one")
  args = parser.parse_args(argv)
  if args.render:
    payload = json.loads((_common.RESULTS / "scale.json").read_text())
    write_readme(payload)
    print(f"updated {_common.README}")
    return
  quick = args.quick
  if jax.default_backend() == "cpu":
    hj.limit_lapack_threads()  # as the program does: JAX's CPU factorisations call SciPy's LAPACK
  c_n, d_n = QUICK["layer"] if quick else LAYER
  ns = QUICK["layer_ns"] if quick else tuple(n for n in LAYER_NS if n <= args.max_n)
  compile_ns = QUICK["compile_only_ns"] if quick else tuple(sorted(set(n for n in LAYER_NS if n > args.max_n)
                                                                   | set(COMPILE_ONLY_NS)))
  t_start = time.perf_counter()
  layer_rows = [layer_row(n, c_n, d_n, run=True, repeats=args.repeats) for n in tqdm(ns, desc="n sweep")]
  layer_rows += [layer_row(n, c_n, d_n, run=False, repeats=0) for n in tqdm(compile_ns, desc="n (compile only)")]
  ch_n = QUICK["channel_n"] if quick else CHANNEL_N
  channel_rows = [layer_row(ch_n, c, CHANNEL_D, run=True, repeats=args.repeats)
                  for c in tqdm(QUICK["channels"] if quick else CHANNELS, desc="c sweep")]
  cfg = config_lib.load("resnet20_apib")
  model = models.random_model("resnet20")
  program_rows = [program_row(model, cfg, n, args.repeats)
                  for n in tqdm(QUICK["program_ns"] if quick else PROGRAM_NS, desc="program n")]

  ran = [r for r in layer_rows if "seconds" in r]
  tail = ran[len(ran) // 2:] if len(ran) >= 4 else ran

  def by_path(path: str, key: str, rows: Sequence[dict[str, Any]]) -> float | None:
    pts = [(r["n"], r[key]) for r in rows if r["path"] == path and key in r and (quick or r["n"] >= 256)]
    return fit_exponent(*zip(*pts)) if len(pts) >= 2 else None

  streamed = [r for r in layer_rows if r["path"] == "streamed tiles"]
  fits = {
      "build_seconds_vs_n": fit_exponent([r["n"] for r in tail], [r["seconds"] for r in tail]),
      "build_seconds_vs_n_whole": by_path("whole Grams", "seconds", layer_rows),
      "build_seconds_vs_n_streamed": by_path("streamed tiles", "seconds", layer_rows),
      # Over the two largest n, where the output Gram's n^2 has outgrown the tiles' constant budget.
      "streamed_memory_vs_n": fit_exponent([r["n"] for r in streamed[-2:]],
                                           [r["compiled_temp_mb"] for r in streamed[-2:]])
      if len(streamed) >= 2 else None,
      "program_build_seconds_vs_n": fit_exponent([r["n"] for r in program_rows[len(program_rows) // 2:]],
                                                 [r["build_seconds"] for r in program_rows[len(program_rows) // 2:]]),
      "program_search_seconds_vs_n": fit_exponent([r["n"] for r in program_rows],
                                                  [r["search_seconds"] for r in program_rows]),
  }
  rate = float(np.median([r["gflops"] for r in tail]))  # GFLOP/s of this machine's builds at the larger sizes
  layers, per_image = resnet50_layers()
  projection = {"resnet50_tap_mb_per_image": per_image / 2**20, "rate_gflops_here": rate, "devices": {}}
  for gb in DEVICES_GB:
    n = largest_n(HEADROOM * gb * 1e9, per_image, layers)
    projection["devices"][f"{gb}GB"] = {
        "n": n, "taps_gb": n * per_image / 1e9,
        "largest_build_gb": max(build_bytes(n, c, d, q, inputs=False) for _, c, d, q in layers) / 1e9,
        "resnet50_build_tflop": sum(work(n, c, d) for _, c, d, _ in layers) / 1e12}
  sharding = {"devices": SHARD_DEVICES, "n": SHARD_N, "flops_per_byte_needed": FLOPS_PER_BYTE,
              "layers": [{"decision": d, "c": c, "d": dd, "flops_per_byte": intensity(SHARD_N, c, dd, SHARD_DEVICES)}
                         for d, c, dd, _ in layers]}
  payload = {"quick": quick, "sharding": sharding, "layer": {"c": c_n, "d": d_n, "q": Q}, "layer_rows": layer_rows,
             "channel_rows": channel_rows, "program_rows": program_rows, "fits": fits, "projection": projection,
             "resnet50_layers": [{"decision": d, "c": c, "d": dd, "q": q} for d, c, dd, q in layers],
             "block_bytes": hj.problem.DEFAULT_BLOCK_BYTES, "seconds": time.perf_counter() - t_start}
  text = render(payload)
  print(text)
  out = args.out if args.out is not None else (pathlib.Path(tempfile.mkdtemp()) if quick else None)
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"benchmark": "scale", "machine": _common.machine(), **payload},
                                               indent=2))
    print(f"wrote {out / 'scale.json'}")
  else:
    print(f"wrote {_common.write_results('scale', payload)}")
  if not args.no_readme and not quick and out is None:
    write_readme(json.loads((_common.RESULTS / "scale.json").read_text()))


def write_readme(payload: dict[str, Any]) -> None:
  """This benchmark's README section (added once) and its block, from a results payload."""
  m = payload["machine"]
  _common.ensure_section("scale", SECTION, SECTION_PARAGRAPH)
  _common.update_readme("scale", f"Measured {m['date']} on {m['device']} ({m['cpu_count']} CPU cores shared with "
                                 f"other jobs: the seconds are noisy, the exponents and the memory carry over), "
                                 f"jax {m['jax']}, in {payload['seconds']:.0f} s.\n\n" + render(payload))


def _exp(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.2f}"


def render(payload: dict[str, Any]) -> str:
  """The README block: the three tables, the fitted exponents, the projection and the sharding rule."""
  f, proj, lay, sh = payload["fits"], payload["projection"], payload["layer"], payload["sharding"]
  fmt = _common.fmt
  t1 = _common.markdown_table(
      ["n", "path", "GFLOP", "s (warm)", "GFLOP/s", "compiled temp MB", "model MB"],
      [[r["n"], r["path"], fmt(r["gflop"]), fmt(r["seconds"]) if "seconds" in r else "(compiled only)",
        fmt(r["gflops"]) if "gflops" in r else "", fmt(r["compiled_temp_mb"]),
        fmt(build_bytes(r["n"], r["c"], r["d"], r["q"], inputs=False) / 2**20)]
       for r in payload["layer_rows"]])
  whole_c = [r for r in payload["channel_rows"] if r["path"] == "whole Grams"]
  c_time = fit_exponent([r["c"] for r in whole_c[1:]], [r["seconds"] for r in whole_c[1:]])
  c_work = fit_exponent([r["c"] for r in whole_c[1:]], [r["gflop"] for r in whole_c[1:]])
  t2 = _common.markdown_table(["c", "n", "d", "path", "GFLOP", "s (warm)", "GFLOP/s", "compiled temp MB"],
                              [[r["c"], r["n"], r["d"], r["path"], fmt(r["gflop"]), fmt(r["seconds"]),
                                fmt(r["gflops"]), fmt(r["compiled_temp_mb"])] for r in payload["channel_rows"]])
  t3 = _common.markdown_table(["n", "capture s", "builds s (9 decisions)", "search s", "taps MB", "taps MB/image"],
                              [[r["n"], fmt(r["capture_seconds"]), fmt(r["build_seconds"]), fmt(r["search_seconds"]),
                                fmt(r["tap_mb"]), fmt(r["tap_mb_per_image"])] for r in payload["program_rows"]])
  dev = proj["devices"]
  wide = [x for x in sh["layers"] if x["flops_per_byte"] >= sh["flops_per_byte_needed"]]
  lo = min(sh["layers"], key=lambda x: x["flops_per_byte"])
  hi = max(sh["layers"], key=lambda x: x["flops_per_byte"])
  block_mb = payload["block_bytes"] // 2**20
  rates = {p: [r["gflops"] for r in payload["layer_rows"] if r["path"] == p and "gflops" in r and r["n"] >= 256]
           for p in ("whole Grams", "streamed tiles")}
  speed = (f"{np.median(rates['streamed tiles']) / np.median(rates['whole Grams']):.1f}x"
           if all(rates.values()) else "(not measured)")
  return "\n".join([
      f"One layer, c = {lay['c']}, d = {lay['d']}, q = {lay['q']}, against n (memory budget {block_mb} MB; "
      "\"compiled temp\" is XLA's count of the build's temporaries, \"model MB\" the memory model `build_bytes` "
      "of them, both without the inputs; on the streamed path the model takes an accelerator's tiles of the whole "
      "budget, where this CPU takes 8 MB ones):", "", t1, "",
      "One layer against c:", "", t2, "",
      "The program's calibration of a random ResNet-20 (`resnet20_apib` settings) against n:", "", t3, "",
      f"**Fitted exponents** (log-log least squares): build time ~ n^{_exp(f['build_seconds_vs_n_whole'])} on the "
      f"whole-Gram path and ~ n^{_exp(f['build_seconds_vs_n_streamed'])} on the streamed one (n^2 work at fixed c "
      f"and d; over all the larger sizes ~ n^{_exp(f['build_seconds_vs_n'])}: the streamed tiles, sized for the "
      f"cache, ran at {speed} the whole Grams' GFLOP/s here); ~ c^{c_time:.2f} at n = 512, d = 16 on the "
      f"whole-Gram path (its work ~ c^{c_work:.2f}, between the c n^2 d distances and the c^2 n^2 products; the "
      f"time grows slower as the wider products run nearer the peak); streamed working memory ~ n^{_exp(f['streamed_memory_vs_n'])} over the two largest n (the "
      f"{block_mb} MB of tiles is a constant; the output Gram's n^2 takes over); the whole-Gram path holds "
      f"c n^2 floats, which is why it hands over to streaming at c n^2 x 4 B > {block_mb} MB. The program's builds "
      f"grow as n^{_exp(f['program_build_seconds_vs_n'])}; its search, which only sees the c x c problems, stays "
      f"under {max(r['search_seconds'] for r in payload['program_rows']):.2g} s at every n (fitted "
      f"n^{_exp(f['program_search_seconds_vs_n'])}, timing noise of a shared machine on a fraction of a second), so "
      "at large n calibration is all builds and taps.", "",
      f"**What fits one device** (ResNet-50 at 224x224, every decision's taps held at once as the program holds a "
      f"calibration batch's, {proj['resnet50_tap_mb_per_image']:.1f} MB per image in float32, {HEADROOM:.0%} of "
      f"the device for calibration, one batch of n images so that each problem is the exact full-n one): "
      + "; ".join(f"{k}: n = {v['n']:,} (taps {v['taps_gb']:.1f} GB, the largest build beside them "
                  f"{v['largest_build_gb']:.2f} GB, {v['resnet50_build_tflop']:.1f} TFLOP of builds in all)"
                  for k, v in dev.items())
      + ". The taps, linear in n, bound n long before the builds' n^2 Grams do (the tiled builds keep those "
      "within the budget plus 2 n^2 floats of the output Gram: 2.1 GB at n = 16,384). More images than that are "
      "taken in calibration batches (`calib.batch_size`), whose problems add up (block HSIC Lasso), at "
      "`batch_size` times the taps per image; the exact full-n problem needs them on several devices.", "",
      f"**Sharding: by images or by channel.** Split by images (each device captures and builds on its own n / D "
      "images; only the c x c problems are summed, `hsic_jax.combine_problems`), calibration needs no "
      "communication, takes n / D of the taps per device and D^2 times less build work per device than one "
      "full-n build, but the problem is the block one with blocks of n / D images. Split by channel (the library's `shard_map` path: "
      "`hsic_jax.channel_grams` on features split along the channel axis keeps each device's Grams on it, and "
      "XLA's partitioner forms Q's cross-device blocks), the problem is the exact full-n one and each device "
      "holds c / D of the Grams, but the layer's features must be regrouped from images to channels and exchanged "
      f"to form Q's off-diagonal blocks. At n = {sh['n']:,} over D = {sh['devices']} devices a channel-split "
      f"build does {fmt(lo['flops_per_byte'])} FLOPs per byte moved for {lo['decision']} (c = {lo['c']}, "
      f"d = {lo['d']}) up to {fmt(hi['flops_per_byte'])} for {hi['decision']} (c = {hi['c']}, d = {hi['d']}): "
      f"{len(wide)} of ResNet-50's {len(sh['layers'])} decisions reach the ~{sh['flops_per_byte_needed']:.0f} "
      "FLOPs per byte at which an accelerator's interconnect keeps up with its float32 products. So: split by "
      "images while the block size n / D stays at or above the n the method is run with (64 for ImageNet in the "
      "APIB paper), since that is what the program's calibration batches already do; split by channel only when "
      "the exact full-n problem is wanted, for the wide, low-resolution layers (the intensity n (c + d) / (2 d (D - 1)) "
      "is high where c >> d), keeping the high-resolution layers image-split; and distribute whole decisions over devices "
      "(each builds the exact problems of its own layers, no exchange but the taps) when there are more decisions "
      "than devices.",
  ])


if __name__ == "__main__":
  main()
