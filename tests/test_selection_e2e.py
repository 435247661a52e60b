"""benchmarks.selection_e2e: the quick run reports every stage and ratio, hsic_jax's search and the reference
procedure both land in the MACs band (the comparison is like for like), the reference's Lasso works on the scale
``alpha = lam / n^2`` (checked against an independent float64 computation), its outer bisection doubles, bisects and
stops as APIB's ``auto_prune`` (capped where that loops forever), and the README section goes in its place."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import hsic_jax as hj
from benchmarks import selection_e2e as se


def test_quick_run_reports_every_stage_and_both_searches_reach_the_band(tmp_path):
  se.main(["--quick", "--no-readme", "--out", str(tmp_path)])
  payload = json.loads((tmp_path / "selection_e2e.json").read_text())
  assert payload["quick"] and payload["benchmark"] == "selection_e2e" and len(payload["rows"]) == 1
  row = payload["rows"][0]
  for stage in ("capture", "build", "search", "selection", "total"):
    s = row["stages"][stage]
    assert set(s) == {"cold", "warm", "compile"}, stage
    assert s["cold"] > 0 and s["warm"] > 0 and math.isclose(s["compile"], s["cold"] - s["warm"], abs_tol=1e-9)
  st = row["stages"]
  assert math.isclose(st["selection"]["warm"], st["build"]["warm"] + st["search"]["warm"])
  assert math.isclose(st["total"]["cold"], st["capture"]["cold"] + st["build"]["cold"] + st["search"]["cold"])

  ref, ratios = row["reference"], row["ratios"]
  assert set(ratios) == {"selection_cold", "selection_warm", "total_cold", "total_warm"}
  assert all(math.isfinite(v) and v > 0 for v in ratios.values())
  assert math.isclose(ratios["selection_cold"], ref["seconds"] / st["selection"]["cold"])
  assert math.isclose(ratios["selection_warm"], ref["seconds"] / st["selection"]["warm"])

  # Like for like: both reach the band around the same target, the reference fully measured (no extrapolation).
  search = row["search"]
  tol = row["settings"]["tolerance"]
  target = search["target"]
  assert search["within_tolerance"] and abs(search["macs"] - target) <= tol * target
  assert ref["reached"] and abs(ref["macs"] - target) <= tol * target
  assert not ref["extrapolated"] and ref["measured_evaluations"] == ref["total_evaluations"] >= 2
  assert all(e["measured"] for e in ref["evaluations"])
  assert math.isclose(ref["seconds"], sum(e["seconds"] for e in ref["evaluations"]))
  assert len(ref["evaluations"][0]["widths"]) == row["decisions"] == len(search["widths"])
  if (tmp_path / "selection_e2e.png").exists():  # matplotlib is optional
    assert (tmp_path / "selection_e2e.png").stat().st_size > 1000


def _independent_relevance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """``<K̄_c, L̄> / n^2`` per channel in float64: explicit ``H``, kernels from direct differences."""
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n

  def centered(z):
    d2 = np.sum((z[:, None, :] - z[None, :, :]) ** 2, axis=-1)
    return h @ np.exp(-d2 / z.shape[1]) @ h

  lbar = centered(y)
  return np.array([np.sum(centered(x[:, c]) * lbar) for c in range(x.shape[1])]) / n**2


def test_reference_lasso_scale_against_an_independent_computation():
  rng = np.random.default_rng(3)
  n, c, p = 16, 5, 4
  x = rng.normal(size=(n, c, p))
  y = np.concatenate([np.sin(2 * x[:, 2]), x[:, 2] ** 2], axis=1)  # explained by channel 2 only
  design, target = se.reference_design(x, y)
  assert design.shape == (n * n, c) and design.dtype == np.float32 and design.flags["F_CONTIGUOUS"]
  rel = _independent_relevance(x, y)
  np.testing.assert_allclose(design.T.astype(np.float64) @ target / n**2, rel, rtol=1e-3,
                             atol=1e-4 * np.max(np.abs(rel)))
  top = int(np.argmax(np.abs(rel)))
  assert top == 2
  alpha_max = float(np.max(np.abs(rel)))
  assert np.sort(np.abs(rel))[-2] < 0.9 * alpha_max  # a gap: between the two only the top one enters

  keep, fits = se.reference_keep(design, target, 1.001 * alpha_max, omega=0)
  assert keep.size == 0 and fits == 1
  # Just below alpha_max scikit-learn's tol=1e-4 duality-gap test already holds at w = 0 (the optimum is that close
  # to it), so the reference may keep nothing there; a little further down, exactly the most relevant channel.
  keep, _ = se.reference_keep(design, target, 0.99 * alpha_max, omega=0)
  assert keep.tolist() in ([], [top])
  keep, _ = se.reference_keep(design, target, 0.95 * alpha_max, omega=0)
  assert keep.tolist() == [top]
  # With the omega floor, a layer emptied at alpha is bisected down to exactly omega channels: the most relevant.
  keep, fits = se.reference_keep(design, target, 4 * alpha_max, omega=1)
  assert keep.tolist() == [top] and fits > 1

  # hsic_jax's signed lambda_max is the same threshold on its scale: lam = alpha * n^2.
  problem = hj.problem_from_features(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  assert float(hj.lambda_max(problem, positive=False)) / n**2 == pytest.approx(alpha_max, rel=1e-3)


def test_reference_bisection_doubles_then_bisects_and_stops_on_a_jump():
  calls: list[tuple[float, str]] = []

  def macs(alpha: float) -> float:
    return 100.0 / (1.0 + 1e3 * alpha)  # decreasing in alpha

  def value(alpha: float, phase: str) -> float:
    calls.append((alpha, phase))
    return macs(alpha)

  assert se.apib_bisection(value, 50.0, 1e-4, 0.01)
  doubles = [a for a, ph in calls if ph == "double"]
  assert doubles == pytest.approx([1e-4 * 2**i for i in range(len(doubles))])
  assert macs(doubles[-1]) < 50.0 <= macs(doubles[-2])  # the doubling stops at the first point below the target
  assert calls[len(doubles)] == (pytest.approx(doubles[-1] / 2), "bisect")  # lo = 0
  assert abs(macs(calls[-1][0]) - 50.0) <= 0.5  # the last evaluated alpha is in the band
  assert all(abs(macs(a) - 50.0) > 0.5 for a, _ in calls[:-1])  # and it stopped there

  # A jump across the whole band: the cap ends the search (the reference's own loop has none).
  calls.clear()
  assert not se.apib_bisection(lambda a, ph: calls.append((a, ph)) or (100.0 if a < 1.0 else 0.0), 50.0, 0.5, 0.01)
  assert sum(ph == "bisect" for _, ph in calls) == se.MAX_BISECTION
