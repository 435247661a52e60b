"""The pruning-quality study's own arithmetic (overlap, the L1 peer, resuming) on payloads built by hand; the study
itself runs as a program (``python -m benchmarks.pruning_quality --quick``), not here."""

from __future__ import annotations

import json

import pytest

from benchmarks import pruning_quality as pq


def _row(label, method, criterion, removed, top1, keep):
  return {"label": label, "method": method, "criterion": criterion, "solver": "reference", "removed": removed,
          "macs": 10e6, "params": 1e5, "widths": [len(k) for k in keep], "keep": keep, "top1_raw": top1 / 2,
          "top1_after_surgery": top1 - 0.1, "top1_finetuned": top1, "select_seconds": 1.5, "dense_top1": 1.0}


def test_jaccard_by_hand():
  assert pq.jaccard([0, 1, 2], [1, 2, 3]) == pytest.approx(2 / 4)
  assert pq.jaccard([], []) == 0.0
  assert pq.jaccard([5], [5]) == 1.0


def test_overlap_is_the_mean_over_layers_of_uniform_rows_only():
  rows = [_row("APIB", "apib", "hsic_lasso", 0.55, 0.9, [[0, 1], [0]]),
          _row("uniform + l1", "uniform", "l1", 0.55, 0.8, [[0, 1], [2]]),
          _row("uniform + fpgm", "uniform", "fpgm", 0.55, 0.85, [[1, 2], [2]])]
  names, mat = pq.overlap_matrix(rows)
  assert names == ["l1", "fpgm"]
  # layer 0: {0,1} vs {1,2} = 1/3; layer 1: {2} vs {2} = 1
  assert mat[0][1] == pytest.approx((1 / 3 + 1) / 2) and mat[1][0] == mat[0][1] and mat[0][0] == 1.0


def test_accuracy_table_compares_with_uniform_l1_at_the_same_ratio():
  rows = [_row("uniform + l1", "uniform", "l1", 0.3, 0.80, [[0]]), _row("APIB", "apib", "hsic_lasso", 0.3, 0.83, [[0]]),
          _row("uniform + l1", "uniform", "l1", 0.7, 0.50, [[0]]), _row("APIB", "apib", "hsic_lasso", 0.7, 0.45, [[0]])]
  lines = pq.accuracy_table({"rows": rows, "finetune_steps": 5}).splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  assert [c[6] for c in cells] == ["+0.00", "+3.00", "+0.00", "-5.00"]
  assert cells[1][:2] == ["30%", "APIB"]


def test_progress_resumes_finished_parts_and_ignores_other_runs(tmp_path):
  path = tmp_path / "progress.jsonl"
  calls = []
  prog = pq.Progress(path, {"model": "m", "finetune_steps": 2})
  assert prog.get("a", lambda: calls.append("a") or {"x": 1}) == {"x": 1}
  with path.open("a") as f:
    f.write('{"key": {"model": "m", "finetune_steps": 2}, "part": "b", "val')  # cut short by a kill
  again = pq.Progress(path, {"model": "m", "finetune_steps": 2})
  assert again.get("a", lambda: calls.append("a again")) == {"x": 1}
  assert again.get("b", lambda: calls.append("b") or 7) == 7
  other = pq.Progress(path, {"model": "m", "finetune_steps": 3})
  assert other.get("a", lambda: calls.append("a other") or 2) == 2
  assert calls == ["a", "b", "a other"]
  assert [json.loads(line)["part"] for line in path.read_text().splitlines()[2:]] == ["b", "a"]


def test_variants_cover_every_method_and_criterion():
  full = pq.variants(quick=False)
  assert {v.criterion for v in full if v.method == "uniform"} == {"hsic_lasso", *pq.CRITERIA}
  assert {(v.method, v.solver) for v in full if v.method == "itpruner"} == {("itpruner", "reference"),
                                                                            ("itpruner", "search")}
  assert {v.label for v in pq.variants(quick=True)} < {v.label for v in full}
