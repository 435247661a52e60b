"""The program's loops on a config's data (train.loops), on scikit-learn's digits at 8x8."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest

import models
from models import cifar10
from train import config_lib, data, loops, train as train_lib


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = config_lib.load("digits_apib")
  c.data.data_dir = str(tmp_path_factory.mktemp("tfds_digits"))
  c.data.image_size = 8
  c.data.num_workers = 0
  c.finetune.batch_size = 32
  c.eval.batch_size = 64
  data.prepare(c.data)
  return c


def _same(a, b, cfg):
  """``a`` (from a loop: on the device, normalised there) holds ``b`` (the data layer's uint8 host batch)."""
  assert set(a) == set(b)
  for k in a:
    got = np.asarray(a[k])
    if k == "image":
      assert b[k].dtype == np.uint8 and got.dtype == np.float32
      np.testing.assert_allclose(got, cifar10.normalize(b[k], cfg.data.mean, cfg.data.std), rtol=1e-6, atol=1e-6)
    else:
      np.testing.assert_array_equal(got, np.asarray(b[k]))


def test_make_loop_feeds_the_recipes_batches_from_any_step(cfg, tmp_path):
  mesh = train_lib.make_mesh(jax.devices()[:1])
  loop = loops.make_loop(cfg, cfg.finetune, tmp_path, mesh=mesh, desc="finetune")
  assert loop.steps_per_epoch == data.steps_per_epoch(cfg.data, batch_size=32) and loop.desc == "finetune"
  assert loop.eval_steps == math.ceil(data.num_examples(cfg.data, cfg.data.eval_split) / 64)
  stream = list(itertools.islice(data.train_batches(cfg.data, batch_size=32, seed=int(cfg.seed)), 4))
  _same(next(loop.train_batches(0)), stream[0], cfg)
  _same(next(loop.train_batches(3)), stream[3], cfg)  # a resumed run reads on where it stopped
  assert sum(int(b["mask"].sum()) for b in loop.eval_batches()) == data.num_examples(cfg.data, cfg.data.eval_split)
  loop.log({"ignored": 1})  # the default log drops records
  short = loops.make_loop(cfg, cfg.finetune, tmp_path, mesh=mesh, desc="ft", evaluate=False, steps_per_epoch=5)
  assert short.eval_batches is None and short.eval_steps is None and short.steps_per_epoch == 5


def test_evaluate_model_counts_every_example_of_the_split(cfg):
  model = models.random_model("resnet20", num_classes=10, seed=0)
  mesh = train_lib.make_mesh(jax.devices()[:1])
  got = loops.evaluate_model(cfg, model, mesh)
  # Oracle: the model called on the whole split at once, top-1 counted in NumPy.
  images, labels = [], []
  for b in data.eval_batches(cfg.data, cfg.data.eval_split, batch_size=64):
    keep = np.asarray(b["mask"]).astype(bool)
    images.append(np.asarray(b["image"])[keep])
    labels.append(np.asarray(b["label"])[keep])
  images, labels = cifar10.normalize(np.concatenate(images), cfg.data.mean, cfg.data.std), np.concatenate(labels)
  top1 = float(np.mean(np.argmax(np.asarray(model(images)), -1) == labels))
  assert got["examples"] == len(labels) == data.num_examples(cfg.data, cfg.data.eval_split)
  assert got["top1"] == pytest.approx(top1, abs=1e-9)
  assert loops.evaluate_model(cfg, model, mesh, split="train")["examples"] == data.num_examples(cfg.data, "train")


def test_recalibrated_reestimates_on_the_configs_training_batches(cfg):
  model = models.random_model("resnet20", num_classes=10, seed=0)
  mesh = train_lib.make_mesh(jax.devices()[:1])
  got = loops.recalibrated(cfg, model, mesh, batch_size=16)
  want = train_lib.recalibrate_batch_norm(
      models.random_model("resnet20", num_classes=10, seed=0),
      ({"image": cifar10.normalize(b["image"], cfg.data.mean, cfg.data.std)}
       for b in data.train_batches(cfg.data, batch_size=16, seed=int(cfg.seed) + 1)),
      int(cfg.eval.bn_recalibrate_steps), mesh)
  # The loop normalises on the device, the oracle in NumPy: equal up to float rounding.
  np.testing.assert_allclose(np.asarray(got.stem.bn.mean[...]), np.asarray(want.stem.bn.mean[...]), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(np.asarray(got.stem.bn.mean[...]), 0.0)  # moved off the identity statistics
