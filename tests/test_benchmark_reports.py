"""The benchmarks' reports: the solver table marks results that missed the tolerance, README blocks are replaced in
place, and every plot renders from results shaped as the programs write them (failed and missing entries
included)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from benchmarks import _common, gram_throughput, plots, solver_throughput


def _solver_rows() -> list[dict]:
  def res(seconds, gap, reached, **extra):
    return {"seconds": seconds, "rel_gap": gap, "setting": "", "reached": reached, "speedup_of_ours": seconds / 0.01,
            **extra}

  ok = {"workload": "layer A", "problems": 1, "ours": res(0.01, 1e-7, True),
        "sklearn_lasso": res(1.0, 2e-6, True), "sklearn_lassolars": res(0.1, 0.0, True),
        "pyhsiclasso_nlars": res(0.05, 3e-2, False)}
  broken = {"workload": "layer B", "problems": 2, "ours": res(0.02, 5e-8, True),
            "sklearn_lasso": res(2.0, 1e-6, True), "sklearn_lassolars": res(0.3, 0.0, True),
            "pyhsiclasso_nlars": {"seconds": math.nan, "rel_gap": math.nan, "setting": "", "reached": False,
                                  "failed": "ValueError: boom", "speedup_of_ours": math.nan}}
  return [ok, broken]


def test_solver_table_marks_missed_tolerance_and_failures():
  lines = solver_throughput.results_table(_solver_rows()).splitlines()
  assert len(lines) == 4  # header, rule, two rows
  a = [c.strip() for c in lines[2].strip("|").split("|")]
  b = [c.strip() for c in lines[3].strip("|").split("|")]
  assert a[1] == "0.01" and a[2] == "1" and a[3] == "0.1"  # reached: no mark
  assert a[4] == "0.05 †"  # nlars missed the tolerance
  assert a[5:8] == ["100.0x", "10.0x", "5.0x"]
  assert a[8] == "1.0e-07 / 2.0e-06 / 3.0e-02"
  assert b[4] == "failed" and b[7] == "-"


def test_update_readme_replaces_only_its_block(tmp_path, monkeypatch):
  readme = tmp_path / "README.md"
  readme.write_text("# B\n\n<!-- BEGIN x -->\nold\n<!-- END x -->\n\ntext after\n")
  monkeypatch.setattr(_common, "README", readme)
  _common.update_readme("x", "new table\n\n" + plots.readme_link("x"))
  _common.update_readme("y", "other")
  text = readme.read_text()
  assert "old" not in text and "new table\n\n![x](results/x.png)\n<!-- END x -->" in text
  assert text.index("text after") < text.index("<!-- BEGIN y -->")  # a new block goes at the end
  assert text.count("<!-- BEGIN x -->") == 1


def _gram_payload() -> dict:
  rows = [{"label": "a", "fraction_of_peak": 0.31, "speedup_vs_numpy64": 2.8},
          {"label": "b", "fraction_of_peak": 0.42}]  # NumPy reference skipped
  return {"matmul_peak_gflops": 221.0, "rows": rows}


def _pruned_payload() -> dict:
  def v(name, ratio, eff):
    return {"variant": name, "macs_ratio": ratio, "efficiency": eff}

  return {"results": [{"model": "resnet56", "batch": 16, "target_ratio": 0.45,
                       "variants": [v("dense", 1.0, 1.0), v("masked", 1.0, 0.97), v("pruned", 0.455, 0.44),
                                    v("pruned (x16)", 0.59, 0.82)]}]}


@pytest.mark.parametrize("name,payload", [("solver_throughput", {"rows": _solver_rows()}),
                                          ("gram_throughput", _gram_payload()),
                                          ("pruned_speed", _pruned_payload())])
def test_plots_render(name, payload, tmp_path):
  image = pytest.importorskip("matplotlib.image")
  out = plots.PLOTS[name](payload, tmp_path / f"{name}.png")
  assert out == tmp_path / f"{name}.png"
  pixels = image.imread(out)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 200
  assert np.ptp(pixels[..., :3]) > 0.5  # something was drawn, not a blank canvas


def test_plots_main_rejects_unknown_names(capsys):
  assert plots.main(["no_such_benchmark"]) == 2
  assert "unknown benchmark" in capsys.readouterr().err


def test_gram_peak_is_taken_at_the_library_precision():
  # On accelerators the backend default is TF32 or bfloat16 passes, several times faster than the full float32
  # the library asks for: the peak must be the same operation. (The CPU runs full float32 whatever is asked, so the
  # request in the jaxpr is what is checked.)
  a = np.ones((4, 4), np.float32)
  dots = [e for e in jax.make_jaxpr(gram_throughput.peak_matmul)(a, a).eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1
  assert dots[0].params["precision"] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert gram_throughput.peak_size("cpu") == 2048
  assert gram_throughput.peak_size("gpu") == gram_throughput.peak_size("tpu") == 8192
