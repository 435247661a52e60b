"""``benchmarks/device_check.sh``: its tiny mode runs on the CPU and writes one JSON with every part, and the merge
keeps each part's status, result and log, with the Gram builds divided by both measured peaks."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import device_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_merge_keeps_every_part_and_divides_the_builds_by_both_peaks(tmp_path):
  (tmp_path / "peaks.json").write_text(json.dumps({"float32_gflops": 100.0, "bfloat16_gflops": 400.0}))
  (tmp_path / "gram_throughput.json").write_text(json.dumps({"rows": [{"label": "a", "ours_gflops": 50.0}]}))
  (tmp_path / "selection.log").write_text("x" * 5000 + "Traceback: boom")
  (tmp_path / "status.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"part": "peaks", "rc": 0, "seconds": 1.5}, {"part": "gram_throughput", "rc": 0, "seconds": 2.0},
      {"part": "selection", "rc": 124, "seconds": 130.0},
      {"part": "input_pipeline", "rc": 0, "seconds": 0, "skipped": "not in this checkout"}]))
  out = device_check.merge(tmp_path)
  assert set(out["parts"]) == {"peaks", "gram_throughput", "selection", "input_pipeline"}
  assert out["parts"]["selection"]["exit_status"] == 124 and "result" not in out["parts"]["selection"]
  assert out["parts"]["selection"]["log_tail"].endswith("boom")
  assert len(out["parts"]["selection"]["log_tail"]) == device_check.LOG_TAIL
  assert out["parts"]["input_pipeline"]["skipped"] == "not in this checkout"
  assert out["gram_vs_peaks"] == [{"label": "a", "gflops": 50.0, "fraction_of_float32_peak": 0.5,
                                   "fraction_of_bfloat16_peak": 0.125}]
  assert out["total_seconds"] == pytest.approx(133.5)


@pytest.mark.slow
def test_tiny_run_on_the_cpu_writes_every_part(tmp_path):
  """The whole script at tiny sizes (a ResNet-20) on the CPU: 3.4 minutes on a shared 2-core machine (200 s of
  parts, most of it compilation)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's machine
  env.update({"PYTHON": sys.executable, "PYTHONPATH": str(ROOT)})
  out = tmp_path / "check.json"
  proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--tiny", str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  got = json.loads(out.read_text())
  assert got["tiny"] is True and got["machine"]["jax_backend"] == "cpu"
  parts = got["parts"]
  assert set(parts) == {"selection", "peaks", "train_step", "gram_throughput", "input_pipeline"}
  for name in ("selection", "peaks", "train_step", "gram_throughput"):
    assert parts[name]["exit_status"] == 0, parts[name].get("log_tail")
    assert "result" in parts[name]
  stages = parts["selection"]["result"]["stages"]
  assert {"capture", "build", "search", "total"} <= set(stages)
  assert all(stages[s]["cold"] >= stages[s]["warm"] > 0 for s in ("capture", "build", "search"))
  assert parts["peaks"]["result"]["float32_gflops"] > 0 and parts["peaks"]["result"]["bfloat16_gflops"] > 0
  rows = parts["train_step"]["result"]["rows"]
  assert {"dense", "pruned", "pruned_x8"} <= set(rows)
  assert all(r["images_per_second"] > 0 and r["loss_finite"] for r in rows.values())
  assert all(w % 8 == 0 or w == d for w, d in zip(rows["pruned_x8"]["widths"], rows["dense"]["widths"]))
  assert rows["pruned"]["widths"] != rows["dense"]["widths"]
  assert [r["label"] for r in got["gram_vs_peaks"]] == [r["label"] for r in parts["gram_throughput"]["result"]["rows"]]
  pipeline = parts["input_pipeline"]
  assert pipeline["skipped"] or pipeline["exit_status"] == 0
