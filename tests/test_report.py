"""The run's report on stage results written by hand: the warning when fine-tuning ended below the after-surgery
accuracy, in report.json, report.md and the program's summary line."""

from __future__ import annotations

import json

import pytest

from train import report
from train.configs.base import get_base_config


def _config(epochs=2, lr=0.1):
  cfg = get_base_config()
  cfg.model.name = "resnet20"
  cfg.finetune.epochs = epochs
  cfg.finetune.lr = lr
  return cfg


def _workdir(tmp_path, *, surgery, final, raw=0.3):
  (tmp_path / "calibration").mkdir()
  sel = {"dense": {"macs": 40e6, "params": 0.27e6}, "costs": {"macs": 20e6, "params": 0.13e6},
         "decisions": [{"decision": 0, "group": "stage1", "size": 16, "kept": 8}], "widths": [8], "seconds": 1.0,
         "method": "apib", "criterion": "hsic_lasso", "target_key": "macs", "target": 20e6, "tolerance": 0.01,
         "within_tolerance": True, "lambda": 0.1, "positive": True, "search": []}
  ev = {"dense": {"top1": 1.0, "top5": 1.0}, "pruned_before_finetune": {"top1": surgery},
        "pruned_before_finetune_raw": {"top1": raw}, "final": {"top1": final, "top5": 0.99, "examples": 465},
        "split": "validation"}
  calib = {"num_images": 128, "ids": [1, 2], "split": "train", "bn_mode": "batch", "augment": False, "seconds": 2.0}
  for name, value in (("selection.json", sel), ("evaluation.json", ev), ("calibration/calibration.json", calib)):
    (tmp_path / name).write_text(json.dumps(value))
  return tmp_path


def test_fine_tuning_below_the_after_surgery_accuracy_is_reported_with_cause_and_recipe(tmp_path):
  rep = report.build(_workdir(tmp_path, surgery=0.84, final=0.62), _config(epochs=1, lr=0.1), {"name": "cifar10"})
  assert len(rep["warnings"]) == 1
  w = rep["warnings"][0]
  assert "0.6200" in w and "0.8400" in w and "long schedule" in w and "lr 0.1" in w
  assert "--config.finetune.lr=0.01" in w and "Short fine-tunes" in w
  md = report.markdown(rep)
  assert f"**Warning:** {w}" in md


@pytest.mark.parametrize("final", [0.84, 0.92])  # level with surgery, and above it
def test_no_warning_when_fine_tuning_did_not_lose_accuracy(tmp_path, final):
  rep = report.build(_workdir(tmp_path, surgery=0.84, final=final), _config(), {"name": "cifar10"})
  assert rep["warnings"] == []
  assert "Warning" not in report.markdown(rep)


def test_no_warning_without_fine_tuning(tmp_path):
  # With 0 epochs the final model is the un-recalibrated pruned one: below the BN re-estimated figure, not a loss.
  rep = report.build(_workdir(tmp_path, surgery=0.84, final=0.30), _config(epochs=0), {"name": "cifar10"})
  assert rep["warnings"] == []


def test_the_summary_line_carries_the_warning(tmp_path, monkeypatch, capsys):
  from train import main as main_lib, pipeline  # pylint: disable=import-outside-toplevel
  rep = report.build(_workdir(tmp_path, surgery=0.84, final=0.62), _config(epochs=1), {"name": "cifar10"})
  monkeypatch.setattr(pipeline, "run_pipeline", lambda config, workdir, only=None: rep)
  assert main_lib.main(["main", "--config=digits_apib", f"--workdir={tmp_path}", "--compilation_cache="]) == 0
  out = capsys.readouterr().out
  assert "0.6200 fine-tuned" in out
  assert f"warning: {rep['warnings'][0]}" in out
