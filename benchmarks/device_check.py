"""The parts of ``benchmarks/device_check.sh``: what a GPU or TPU is worth to the program, measured in one go.

``python -m benchmarks.device_check --part PART --out DIR [--tiny]`` runs one part and writes ``DIR/PART.json``;
``python -m benchmarks.device_check --merge DIR --out FILE`` gathers them (and the script's own records of each
part's exit status and seconds) into one JSON. The shell script runs each part under its own time limit, so that one
slow or failing part leaves the others' results.

Parts:

- ``selection``: the whole APIB selection of ResNet-50 (randomly initialised, 64 images at 224x224, the
  ``resnet50_apib`` settings and target), cold (compilation included) and warm, stage by stage, through
  :func:`benchmarks.selection_e2e.run_hsic_jax` (the program's capture, builds and search); the reference procedure
  is not run (it is host NumPy, timed by ``selection_e2e`` itself). Images: CIFAR-10 from the shared folder resized
  as ``selection_e2e`` does, else Gaussian noise.
- ``peaks``: this device's matmul peak in float32 (full precision, as the library's products ask for) and in
  bfloat16 (the fine-tuning's convolutions under ``half_precision``), with
  :func:`benchmarks.gram_throughput.matmul_peak`; ``gram_throughput`` (run by the script) then gives the builds'
  GFLOP/s, and the merge divides them by both peaks.
- ``train_step``: images per second of the fine-tuning step (:func:`train.train.make_train_step`, SGD with
  momentum, the ``resnet50_apib`` recipe) of the dense ResNet-50 and of ResNet-50 pruned to 37.9% of its MACs with
  widths unrounded and rounded to multiples of 8 (:func:`benchmarks.pruned_speed.widths_for_ratio`), in the
  config's precision (``half_precision="auto"``: bfloat16 on an accelerator) and, for the dense model, in float32.

``--tiny``: a ResNet-20 at small sizes on whatever backend is there (the CPU in the test suite; its fine-tuning steps
in bfloat16 and float32), so that the script is kept working; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PARTS = ("selection", "peaks", "train_step")
LOG_TAIL = 3000  # characters of each part's output kept in the merged JSON
# Model, images, batch and timed steps of the train_step part; the selection's workload.
FULL = {"model": "resnet50", "image": 224, "batch": 128, "steps": 20, "ratio": 0.379, "config": "resnet50_apib"}
TINY = {"model": "resnet20", "image": 16, "batch": 8, "steps": 3, "ratio": 0.5, "config": "resnet20_apib"}


def _write(out: pathlib.Path, part: str, payload: dict[str, Any]) -> None:
  from benchmarks import _common  # pylint: disable=import-outside-toplevel
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{part}.json").write_text(json.dumps({"part": part, "machine": _common.machine(), **payload}, indent=2,
                                               default=float))


def selection(tiny: bool) -> dict[str, Any]:
  """Cold and warm seconds of the program's capture, builds and search on ResNet-50 (ResNet-20 when tiny)."""
  from benchmarks import selection_e2e  # pylint: disable=import-outside-toplevel
  if tiny:
    workload = selection_e2e.quick_workloads()[0]
  elif selection_e2e.SHARED.is_dir():
    workload = selection_e2e.real_workloads(selection_e2e.SHARED)[1]
  else:
    import models  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from train.configs import resnet50_apib  # pylint: disable=import-outside-toplevel
    cfg = resnet50_apib.get_config()
    n = int(cfg.calib.num_images)
    images = np.random.default_rng(0).normal(size=(n, 224, 224, 3)).astype(np.float32)
    workload = selection_e2e.Workload("ResNet-50", cfg, models.get_model("resnet50", rngs=nnx.Rngs(0)), images,
                                      selection_e2e.ALPHA0["resnet50"], "randomly initialised, Gaussian images")
  ours = selection_e2e.run_hsic_jax(workload, repeats=2)
  return {"workload": workload.label, "note": workload.note, "images": int(workload.images.shape[0]),
          "stages": ours["stages"], "search": ours["search"], "cost_setup_seconds": ours["cost_setup_seconds"]}


def peaks(tiny: bool) -> dict[str, Any]:
  """GFLOP/s of a square matmul in float32 (full precision) and in bfloat16 on the default device."""
  from benchmarks import gram_throughput  # pylint: disable=import-outside-toplevel
  size = 256 if tiny else gram_throughput.peak_size(jax.default_backend())
  return {"size": size, "float32_gflops": gram_throughput.matmul_peak(size),
          "bfloat16_gflops": gram_throughput.matmul_peak(size, dtype=jnp.bfloat16)}


def _step_rate(name: str, widths: list[int] | None, sizes: dict[str, Any], dtype: Any) -> dict[str, Any]:
  """Images per second of ``sizes["steps"]`` fine-tuning steps after a compiling one."""
  import models  # pylint: disable=import-outside-toplevel
  from train import config_lib, train as train_lib  # pylint: disable=import-outside-toplevel
  recipe = config_lib.load(sizes["config"]).finetune
  model = models.set_compute_dtype(models.random_model(name, widths), dtype)
  split = train_lib.split_model(model)
  lr_fn = train_lib.create_learning_rate_fn(recipe, 1000)
  tx = train_lib.create_optimizer(recipe, lr_fn, split.params)
  mesh = train_lib.make_mesh()
  batch_size = sizes["batch"] - sizes["batch"] % len(jax.devices()) or len(jax.devices())
  rng = np.random.default_rng(0)
  batch = train_lib.shard_batch({
      "image": rng.normal(size=(batch_size, sizes["image"], sizes["image"], 3)).astype(np.float32),
      "label": rng.integers(0, int(model.num_classes), batch_size).astype(np.int32)}, mesh)
  state = train_lib.replicate(train_lib.init_state(split, tx), mesh)
  step = train_lib.make_train_step(split, tx, recipe, lr_fn)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, None)
  jax.block_until_ready(metrics)
  cold = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(sizes["steps"]):
    state, metrics = step(state, batch, None)
  jax.block_until_ready((state, metrics))
  warm = (time.perf_counter() - t0) / sizes["steps"]
  return {"widths": list(model.widths), "batch": batch_size, "compute_dtype": models.compute_dtype(model),
          "first_step_seconds": cold, "step_seconds": warm, "images_per_second": batch_size / warm,
          "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def train_step(tiny: bool) -> dict[str, Any]:
  """The fine-tuning step's images/s: dense, pruned unrounded and pruned with widths rounded to 8."""
  from benchmarks import pruned_speed  # pylint: disable=import-outside-toplevel
  from models import flops  # pylint: disable=import-outside-toplevel
  from train import config_lib, train as train_lib  # pylint: disable=import-outside-toplevel
  sizes = TINY if tiny else FULL
  name = sizes["model"]
  # The config's precision ("auto": bfloat16 on an accelerator); tiny runs bfloat16 anyway, so that the CPU run
  # goes through both precisions' paths.
  dtype = train_lib.compute_dtype(True if tiny else config_lib.load(sizes["config"]).half_precision)
  dense_macs = flops.count(name).macs
  rows = {}
  for label, multiple in (("pruned", 1), ("pruned_x8", 8)):
    ws, ratio = pruned_speed.widths_for_ratio(name, sizes["ratio"], multiple)
    rows[label] = {**_step_rate(name, ws, sizes, dtype), "macs_ratio": ratio}
  rows["dense"] = {**_step_rate(name, None, sizes, dtype), "macs_ratio": 1.0}
  if dtype is not None:  # the dense model in float32 too: what bfloat16 buys
    rows["dense_float32"] = {**_step_rate(name, None, sizes, None), "macs_ratio": 1.0}
  for row in rows.values():
    row["speedup_vs_dense"] = row["images_per_second"] / rows["dense"]["images_per_second"]
  return {"model": name, "image_size": sizes["image"], "dense_macs": dense_macs, "rows": rows}


def merge(folder: pathlib.Path) -> dict[str, Any]:
  """One JSON from the parts' files in ``folder`` and the script's ``status.jsonl`` (a part's exit status and
  seconds per line); the builds' GFLOP/s as fractions of both measured peaks."""
  out: dict[str, Any] = {"parts": {}}
  status = folder / "status.jsonl"
  records = [json.loads(line) for line in status.read_text().splitlines() if line.strip()] if status.exists() else []
  for rec in records:
    path = folder / f"{rec['part']}.json"
    entry = {"exit_status": rec["rc"], "seconds": rec["seconds"], "skipped": rec.get("skipped")}
    if path.exists():
      entry["result"] = json.loads(path.read_text())
    log = folder / f"{rec['part']}.log"
    if log.exists():  # what the part printed last: the numbers of a part without a JSON, or why it failed
      entry["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:]
    out["parts"][rec["part"]] = entry
  grams = out["parts"].get("gram_throughput", {}).get("result")
  pk = out["parts"].get("peaks", {}).get("result")
  if grams and pk:
    out["gram_vs_peaks"] = [{"label": r["label"], "gflops": r["ours_gflops"],
                             "fraction_of_float32_peak": r["ours_gflops"] / pk["float32_gflops"],
                             "fraction_of_bfloat16_peak": r["ours_gflops"] / pk["bfloat16_gflops"]}
                            for r in grams["rows"]]
  parts = [p.get("result", {}).get("machine") for p in out["parts"].values()]
  out["machine"] = next((m for m in parts if m), None)
  out["total_seconds"] = sum(float(p["seconds"]) for p in out["parts"].values())
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--part", choices=PARTS, help="run this part")
  parser.add_argument("--merge", type=pathlib.Path, help="gather the parts written to this folder")
  parser.add_argument("--out", type=pathlib.Path, required=True, help="folder of a part's JSON, or the merged file")
  parser.add_argument("--tiny", action="store_true", help="tiny sizes on any backend (keeps the script working)")
  args = parser.parse_args(argv)
  if (args.part is None) == (args.merge is None):
    parser.error("give one of --part or --merge")
  if args.merge is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "device_check", "tiny": args.tiny, **merge(args.merge)}, indent=2))
    print(f"wrote {args.out}")
    return 0
  if jax.default_backend() == "cpu":
    import hsic_jax  # pylint: disable=import-outside-toplevel
    hsic_jax.limit_lapack_threads()
  t0 = time.perf_counter()
  payload = {"selection": selection, "peaks": peaks, "train_step": train_step}[args.part](args.tiny)
  _write(args.out, args.part, {**payload, "tiny": args.tiny, "seconds": time.perf_counter() - t0})
  print(json.dumps(payload, indent=1, default=float)[:2000])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
