"""benchmarks.input_pipeline: the quick run measures the whole pipeline and every step, and reports well-formed,
positive rates (not a timing assertion: the machine is shared)."""

from __future__ import annotations

import json
import math

from benchmarks import input_pipeline as ip


def test_quick_run_reports_rates_for_the_pipeline_and_each_step(tmp_path):
  ip.main(["--quick", "--no-readme", "--out", str(tmp_path)])
  payload = json.loads((tmp_path / "input_pipeline.json").read_text())
  assert payload["benchmark"] == "input_pipeline" and payload["quick"]
  [row] = payload["pipeline"]
  assert row["workers"] == 1 and row["images"] == payload["batches"] * payload["batch_size"]
  assert row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0
  assert math.isclose(row["images_per_cpu_s"], row["images"] / row["cpu_seconds"])
  # The workers' CPU time is counted: a pipeline cannot cost less CPU than one decode per image.
  steps = {s["step"]: s["ms_per_image"] for s in payload["steps"]}
  assert set(steps) == {"read", "decode", "crop_resize", "program", "no_draft", "old", "reduced_quality", "eval",
                        "host_normalize", "program_128", "no_draft_128"}
  assert all(v > 0 for v in steps.values())
  assert row["cpu_ms_per_image"] > 0.5 * steps["decode"]
  summary = payload["summary"]
  assert math.isclose(sum(summary["shares"].values()), 1.0)
  assert math.isclose(summary["host_cores_per_chip"], summary["accelerator_images_per_s_per_chip"]
                      / summary["images_per_cpu_s"])
  assert 250 < payload["mean_size"][0] < 450 and 300 < payload["mean_size"][1] < 500  # ImageNet-like sizes
  assert ip.verdict(summary).startswith("Through the whole pipeline")
