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


def _study_row(label, seed, surgery, tuned, keep=((0, 1),)):
  return {**_row(label, "apib", "hsic_lasso", 0.5, tuned, [list(k) for k in keep]), "seed": seed,
          "top1_after_surgery": surgery}


def test_spread_is_mean_sample_std_min_max():
  s = pq.spread([0.80, 0.82, 0.90])
  assert s["n"] == 3 and s["mean"] == pytest.approx(0.84) and s["min"] == 0.80 and s["max"] == 0.90
  # ddof 1: deviations -0.04, -0.02, 0.06 -> (0.0016 + 0.0004 + 0.0036) / 2 = 0.0028
  assert s["std"] == pytest.approx(0.0028 ** 0.5)
  assert pq.spread([0.5])["std"] == 0.0


def test_aggregate_groups_by_method_over_seeds_and_separated_needs_disjoint_ranges():
  rows = [_study_row("A", 1, 0.60, 0.91), _study_row("A", 0, 0.62, 0.90), _study_row("A", 2, 0.61, 0.92),
          _study_row("B", 0, 0.50, 0.85), _study_row("B", 1, 0.55, 0.89), _study_row("B", 2, 0.52, 0.91),
          _study_row("C", 0, 0.40, 0.70), _study_row("C", 1, 0.41, 0.71), _study_row("C", 2, 0.42, 0.72)]
  summary = pq.aggregate(rows)
  assert [s["label"] for s in summary] == ["A", "B", "C"]
  a = summary[0]
  assert a["seeds"] == [0, 1, 2] and a["top1_finetuned"]["mean"] == pytest.approx(0.91)
  assert a["top1_after_surgery"]["min"] == 0.60 and a["top1_after_surgery"]["max"] == 0.62
  # Fine-tuned: A 0.90-0.92 and B 0.85-0.91 overlap; C (0.70-0.72) is below both.
  tuned = {(p["better"], p["worse"]) for p in pq.separated(summary, "top1_finetuned")}
  assert tuned == {("A", "C"), ("B", "C")}
  # After surgery every range is disjoint (A 0.60-0.62, B 0.50-0.55, C 0.40-0.42); ordered by difference.
  surg = pq.separated(summary, "top1_after_surgery")
  assert [(p["better"], p["worse"]) for p in surg] == [("A", "C"), ("B", "C"), ("A", "B")]
  assert surg[2]["difference"] == pytest.approx(0.61 - (0.50 + 0.55 + 0.52) / 3) and surg[2]["gap"] == pytest.approx(0.60 - 0.55)
  # One seed is no spread: nothing is called separated.
  assert pq.separated(pq.aggregate([r for r in rows if r["seed"] == 0]), "top1_finetuned") == []


def test_variant_select_overrides_reach_the_config_and_unknown_keys_are_refused():
  from train.configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  base = get_base_config().select
  v = pq.Variant("x", "apib", "hsic_lasso", select={"normalized": True, "itpruner.beta": 7.0})
  sel = v.select_config(base)
  assert sel.normalized is True and sel.itpruner.beta == 7.0 and sel.method == "apib"
  assert base.normalized is False  # a copy
  with pytest.raises(ValueError, match="no_such"):
    pq.Variant("y", "apib", "hsic_lasso", select={"no_such": 1}).select_config(base)
  labels = [v.label for v in pq.study_variants()]
  assert len(set(labels)) == len(labels)
  assert {"APIB", "ITPruner", "ITPruner + HSIC Lasso", "uniform + l1", "uniform + fpgm", "uniform + random",
          "APIB (normalised problems)"} <= set(labels)
  program = pq.study_config("resnet20", pq.SHARED, "/tmp/unused").select
  for v in pq.study_variants():
    v.select_config(program)  # every variant's override is a key of the program's config


def test_study_flags_and_rendering_from_progress(tmp_path, capsys):
  with pytest.raises(SystemExit):
    pq.main(["--seeds", "0,0"])
  with pytest.raises(SystemExit):
    pq.main(["--epochs", "2", "--finetune-steps", "3"])
  assert pq.seed_list("0,1,2") == [0, 1, 2]
  key = {"mode": "study", "model": "resnet20", "epochs": 3, "steps_per_epoch": 5, "removed": 0.5, "lr": 0.01,
         "calibration_images": 128}
  path = tmp_path / "progress.jsonl"
  prog = pq.Progress(path, key)
  prog.get("setup", lambda: {"dense_top1": 1.0, "dense_macs": 40e6, "eval_examples": 465, "train_examples": 4195})
  for seed in (0, 1):
    prog.get(f"seed {seed} A", lambda seed=seed: _study_row("A", seed, 0.6 + seed / 100, 0.9))
  pq.main(["--study", "--render", "--progress", str(path), "--out", str(tmp_path)])
  payload = json.loads((tmp_path / "pruning_quality_study.json").read_text())
  assert payload["partial"] and payload["seeds"] == [0, 1] and payload["epochs"] == 3
  assert payload["summary"][0]["top1_after_surgery"]["mean"] == pytest.approx(0.605)
  assert "| A | 2 |" in capsys.readouterr().out


def test_twin_lookup_matches_exact_channels_of_the_same_seed_only():
  rows = [_study_row("A", 0, 0.6, 0.9, keep=((0, 1), (2,))), _study_row("B", 1, 0.5, 0.8, keep=((0, 2), (2,))),
          {**_study_row("C", 0, 0.6, 0.9, keep=((0, 2), (2,))), "same_selection_as": "B"}]
  twin = pq.twin_lookup(rows, 0)
  assert twin([[0, 1], [2]])["label"] == "A"
  assert twin([[0, 1], [3]]) is None
  assert twin([[0, 2], [2]]) is None  # B is another seed; C is a reuse, not a measurement


def test_width_agreement_is_the_weighted_jaccard():
  assert pq.width_agreement([4, 8], [4, 8]) == 1.0
  assert pq.width_agreement([2, 8], [4, 6]) == pytest.approx((2 + 6) / (4 + 8))
  # For channel sets nested by width it is the Jaccard index of the union over layers.
  a, b = [[0, 1], list(range(8))], [[0, 1, 2, 3], list(range(6))]
  union_a = {(l, c) for l, k in enumerate(a) for c in k}
  union_b = {(l, c) for l, k in enumerate(b) for c in k}
  assert pq.width_agreement([2, 8], [4, 6]) == pytest.approx(len(union_a & union_b) / len(union_a | union_b))


def test_calibration_summary_stable_from_needs_every_larger_n_above_the_bar():
  ref = {"widths": [4, 8], "keep": [[0, 1, 2, 3], list(range(8))]}
  near = {"widths": [4, 8], "keep": [[0, 1, 2, 4], list(range(8))]}   # channels (3/5 + 1) / 2 = 0.8
  same = {"widths": [4, 8], "keep": ref["keep"]}
  parts = {32: {"A": same, "B": near}, 64: {"A": near, "B": same}, 128: {"A": same, "B": same},
           256: {"A": ref, "B": ref}}
  out = {s["label"]: s for s in pq.calibration_summary(parts)}
  assert [c["channels"] for c in out["A"]["curve"]] == pytest.approx([1.0, 0.8, 1.0, 1.0])
  assert out["A"]["stable_from"] == 128  # n=32 agrees, but n=64 does not: stable only from 128
  assert out["B"]["stable_from"] == 64
  assert out["A"]["largest_n"] == 256
  parts[128]["A"] = near
  assert pq.calibration_summary(parts)[0]["stable_from"] is None
