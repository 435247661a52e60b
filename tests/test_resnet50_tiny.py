"""``resnet50_apib`` at tiny scale: a small array_record data set in imagenet2012's feature format (JPEG images of
several sizes, 1000-class labels), read as TFDS's ``imagenet2012``, through every stage for a few steps."""

from __future__ import annotations

import json

import jax
import pytest

import models
from models import checkpoint
from train import pipeline
from train.configs import resnet50_apib
from train.datasets import make_fake_imagenet


# Every width of ResNet-50 divided by 8: the same 53 layers and 32 decisions, at a size the test can afford.
WIDTHS = [w // 8 for w in models.default_widths("resnet50")]


@pytest.mark.slow  # about 95 s on 2 cores, nearly all XLA compilation: bash run.sh test -m slow
def test_resnet50_apib_runs_every_stage_on_imagenet_format_data(tmp_path):
  data_dir = tmp_path / "tfds"
  make_fake_imagenet(data_dir, train=16, validation=8, seed=0)
  cfg = resnet50_apib.get_config()
  cfg.data.data_dir = str(data_dir)
  cfg.data.image_size = 32
  cfg.data.num_workers = 0
  # No ImageNet weights offline: the dense model is a randomly initialised ResNet-50 saved as a model checkpoint,
  # as models.import_torch writes them (the `pretrain` source is exercised by the digits pipeline test).
  dense = models.random_model("resnet50", WIDTHS)
  cfg.dense.path = str(checkpoint.save(dense, tmp_path / "dense_ckpt"))
  cfg.model.widths = tuple(WIDTHS)
  # The fixed stem and residual streams weigh more in the thin net: 37.9% is below what its minimum widths allow.
  cfg.select.ratio = 0.6
  cfg.finetune.epochs = 1
  cfg.finetune.batch_size = 8
  cfg.finetune.checkpoint_every_steps = 1
  cfg.calib.num_images = 16
  cfg.calib.batch_size = 8
  cfg.eval.batch_size = 8
  cfg.eval.bn_recalibrate_steps = 1
  mesh = pipeline.train_lib.make_mesh(jax.devices()[:1])
  rep = pipeline.run_pipeline(cfg, tmp_path / "run", mesh=mesh)
  assert rep["model"] == "resnet50" and len(rep["widths"]) == 32
  assert abs(rep["ratios"]["macs"] - 0.6) <= 0.01 * 0.6
  assert rep["calibration"]["num_images"] == 16
  assert rep["evaluation"]["examples"] == 8
  assert set(rep["seconds"]) >= {"dense", "calibrate", "select", "surgery", "finetune", "evaluate"}
  assert json.loads((tmp_path / "run" / "report.json").read_text())["pruned"]["macs"] == rep["pruned"]["macs"]
