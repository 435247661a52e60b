"""Records what the program selects on a few fixed cases, so a redesign can be checked to change no behaviour.

  python tests/data/record_behaviour.py [--shared DIR] [--only CASE ...]

Each case is a config of ``train/configs/`` with overrides, run through the program's own stages (``dense``,
``calibrate``, ``select``: :func:`train.pipeline.run_pipeline` with ``only=``) in a fresh workdir on one device, and
summarised from its ``selection.json``: the width of every decision, the kept channel indices of every group, the
penalty reached (APIB) or the allocation's objective (ITPruner, uniform), and the dense and pruned MACs and params.
The summaries are written to ``behaviour_baseline.json`` beside this file; ``tests/test_behaviour_unchanged.py``
runs the same cases and compares. The baseline was recorded from the code at commit 45e9d86.

``select.round_to`` is pinned to 1 (what the program uses on a CPU) so that the widths do not depend on the backend.
Overrides may name ``{shared}`` (the shared data and weights folder) and ``{data}`` (a scratch dataset folder).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASELINE = pathlib.Path(__file__).resolve().parent / "behaviour_baseline.json"
SHARED = pathlib.Path(os.environ.get("HSIC_JAX_SHARED") or ROOT.parent / "shared")

_CIFAR = {"data.source_dir": "{shared}/data/cifar10-subset/cifar-10-batches-bin", "data.data_dir": "{data}",
          "select.round_to": 1}

# name -> (config, overrides). Digits is the embedded default as `bash run.sh main` runs it (pre-training included);
# the others start from the shared pretrained PyTorch weights.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "digits_apib": ("digits_apib", {"data.data_dir": "{data}", "select.round_to": 1}),
    "resnet56_apib": ("resnet56_apib", {**_CIFAR, "dense.path": "{shared}/weights/resnet56_cifar10.npz"}),
    "resnet20_itpruner": ("resnet20_itpruner", {**_CIFAR, "dense.path": "{shared}/weights/resnet20_cifar10.npz"}),
    "resnet20_uniform_l1": ("resnet20_apib", {**_CIFAR, "dense.path": "{shared}/weights/resnet20_cifar10.npz",
                                              "select.method": "uniform", "select.criterion": "l1"}),
}

STAGES = ("dense", "calibrate", "select")


def config_for(name: str, overrides: dict[str, Any], *, shared: pathlib.Path, data_dir: pathlib.Path):
  """The config ``name`` with ``overrides`` (dotted keys) applied, placeholders filled."""
  cfg = importlib.import_module(f"train.configs.{name}").get_config()
  for key, value in overrides.items():
    if isinstance(value, str):
      value = value.format(shared=shared, data=data_dir)
    *head, last = key.split(".")
    node = cfg
    for h in head:
      node = node[h]
    node[last] = value
  return cfg


def compute(case: str, workdir: pathlib.Path, *, shared: pathlib.Path, data_dir: pathlib.Path) -> dict[str, Any]:
  """Runs ``case`` through the selection in ``workdir`` (one device) and returns its summary."""
  import jax  # pylint: disable=import-outside-toplevel
  import hsic_jax  # pylint: disable=import-outside-toplevel
  from train import pipeline  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu":
    hsic_jax.limit_lapack_threads()  # as train.main does: JAX's CPU factorisations call SciPy's LAPACK
  name, overrides = CASES[case]
  cfg = config_for(name, overrides, shared=shared, data_dir=data_dir)
  mesh = pipeline.train_lib.make_mesh(jax.devices()[:1])
  t0 = time.perf_counter()
  for stage in STAGES:
    pipeline.run_pipeline(cfg, workdir, only=stage, mesh=mesh)
  seconds = time.perf_counter() - t0
  sel = json.loads((workdir / "selection.json").read_text())
  out: dict[str, Any] = {
      "config": name, "overrides": overrides, "method": sel["method"], "criterion": sel["criterion"],
      "decision_widths": [int(d["kept"]) for d in sel["decisions"]],
      "decision_sizes": [int(d["size"]) for d in sel["decisions"]],
      "model_widths": [int(w) for w in sel["widths"]],
      "keep": {g: [int(i) for i in k] for g, k in sel["keep"].items()},
      "dense": {"macs": float(sel["dense"]["macs"]), "params": float(sel["dense"]["params"])},
      "pruned": {"macs": float(sel["costs"]["macs"]), "params": float(sel["costs"]["params"])},
      "target": float(sel["target"]), "within_tolerance": bool(sel["within_tolerance"])}
  if "lambda" in sel:
    out["lambda"] = float(sel["lambda"])
  if "allocation" in sel:
    alloc = sel["allocation"]
    out["allocation"] = {k: alloc[k] for k in ("objective", "value") if isinstance(alloc.get(k), (int, float))}
  out["seconds"] = seconds  # informational: how long the case took when recorded
  return out


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shared", type=pathlib.Path, default=SHARED, help="shared data and weights folder")
  parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="record these cases (others are kept)")
  args = parser.parse_args(argv)
  if not args.shared.is_dir():
    print(f"error: the shared folder {args.shared} is needed (pretrained weights and CIFAR-10 images)",
          file=sys.stderr)
    return 1
  payload = json.loads(BASELINE.read_text()) if BASELINE.exists() and args.only else {"cases": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for case in args.only or CASES:
      print(f"== {case}", flush=True)
      summary = compute(case, pathlib.Path(tmp) / case, shared=args.shared.resolve(),
                        data_dir=pathlib.Path(tmp) / "data")
      payload["cases"][case] = summary
      print(f"   {summary['seconds']:.1f} s, widths {summary['decision_widths']}, "
            f"lambda {summary.get('lambda')}, allocation {summary.get('allocation')}", flush=True)
  payload["recorded_from"] = _commit()
  text = json.dumps(payload, indent=1)
  # Lists of numbers on one line each: the file stays readable and its diffs show which decision changed.
  text = re.sub(r"\[\s*([-0-9.e+,\s]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
  BASELINE.write_text(text + "\n")
  print(f"wrote {BASELINE}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  sys.exit(main())
