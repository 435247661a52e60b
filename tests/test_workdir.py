"""Where a run of the program keeps its models (train.workdir)."""

from __future__ import annotations

from pathlib import Path

import pytest

import models
from models import checkpoint
from train import workdir as workdir_lib


def test_model_checkpoint_is_the_newest_model_of_a_workdir(tmp_path: Path):
  run = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    workdir_lib.model_checkpoint(run)
  model = models.random_model("resnet20", [4] * 7 + [8] * 6 + [12] * 6)
  checkpoint.save(model, run / "dense")
  assert workdir_lib.model_checkpoint(run) == run / "dense"
  checkpoint.save(model, run / "pruned")
  assert workdir_lib.model_checkpoint(run) == run / "pruned"
  (run / "final").mkdir()  # a stage that stopped before its model was written
  assert workdir_lib.model_checkpoint(run) == run / "pruned"
  checkpoint.save(model, run / "final", force=True)
  assert workdir_lib.model_checkpoint(run) == run / "final"
  assert models.load_pruned(workdir_lib.model_checkpoint(run)).widths == model.widths
  assert workdir_lib.model_checkpoint(run / "pruned") == run / "pruned"  # a checkpoint is its own newest model
