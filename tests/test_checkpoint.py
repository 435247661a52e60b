"""The model checkpoint (models.checkpoint): save/load round trip, meta, refusals of corrupt checkpoints and of
states shaped unlike their widths; the random-initialised model (models.random_model)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import models
from hsic_jax import surgery
from models import checkpoint

THIN = [4] * 7 + [8] * 6 + [12] * 6  # a ResNet-20 of other widths than the dense one
THIN[1] = 3


def _leaves(model):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(model)))]


def test_round_trip_keeps_widths_classes_arrays_and_extra_meta(tmp_path: Path):
  model = models.random_model("resnet20", THIN, num_classes=7, seed=3)
  path = checkpoint.save(model, tmp_path / "ckpt", extra={"plan": {"keep": [1, 2]}, "stage": "test"})
  assert path == (tmp_path / "ckpt").resolve()
  meta = checkpoint.read_meta(path)
  assert meta["model"] == "resnet20" and meta["widths"] == THIN and meta["num_classes"] == 7
  assert meta["plan"] == {"keep": [1, 2]} and meta["stage"] == "test"
  loaded = checkpoint.load(path)
  assert loaded.widths == THIN and int(loaded.num_classes) == 7
  for a, b in zip(_leaves(model), _leaves(loaded), strict=True):
    np.testing.assert_array_equal(a, b)
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))  # both in eval mode
  assert models.load_pruned(path).widths == THIN
  with pytest.raises(FileExistsError, match="force"):
    checkpoint.save(model, path)
  assert checkpoint.save(model, path, force=True) == path


def test_checkpoint_of_parameters_that_disagree_with_the_widths_is_refused(tmp_path: Path):
  # A pruned state put back into a model of the dense widths would save, then fail to load; it is refused at save,
  # writing nothing, and the model built with the pruned widths saves and loads.
  dense = models.random_model("resnet20")
  groups = dense.channel_groups()
  g = next(g for g in groups if g.prunable)
  res = surgery.prune(nnx.to_pure_dict(nnx.state(dense)), groups, {g.name: [0, 2, 5]}, widths=dense.widths)
  state = nnx.state(dense)
  nnx.replace_by_pure_dict(state, res.state)
  nnx.update(dense, state)  # accepted silently: this is why build_with_state checks shapes itself
  with pytest.raises(ValueError, match=r"has .* of shape \(16,\), but the model's state holds \(3,\)"):
    checkpoint.save(dense, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()
  pruned = checkpoint.build_with_state("resnet20", res.widths, 10, res.state)
  assert checkpoint.load(checkpoint.save(pruned, tmp_path / "good")).widths == res.widths


def test_read_meta_and_load_refuse_what_is_not_a_checkpoint(tmp_path: Path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.read_meta(tmp_path / "nope")
  with pytest.raises(FileNotFoundError):
    checkpoint.load(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a readable model checkpoint"):
    checkpoint.read_meta(tmp_path / "empty")
  # models.load_pruned names the program's function for a workdir (a directory holding checkpoints).
  with pytest.raises(ValueError, match=r"model_checkpoint\(workdir\)"):
    models.load_pruned(tmp_path / "empty")


def test_corrupt_checkpoint_is_refused_naming_it(tmp_path: Path):
  thin = checkpoint.save(models.random_model("resnet20", THIN), tmp_path / "thin")
  dense = checkpoint.save(models.random_model("resnet20"), tmp_path / "dense")
  # The thin model's meta over the dense model's arrays: the widths no longer build those shapes.
  bad = tmp_path / "swapped"
  shutil.copytree(thin, bad)
  shutil.rmtree(bad / "state")
  shutil.copytree(dense / "state", bad / "state")
  with pytest.raises(ValueError, match="swapped"):
    checkpoint.load(bad)
  # The meta item cut away: not a model checkpoint any more.
  cut = tmp_path / "cut"
  shutil.copytree(thin, cut)
  shutil.rmtree(cut / "meta")
  with pytest.raises(ValueError, match="cut"):
    checkpoint.load(cut)


def test_build_with_state_refuses_wrong_shapes_and_keys():
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), checkpoint.abstract_state("resnet20", THIN))
  model = checkpoint.build_with_state("resnet20", THIN, None, state)
  assert model.widths == THIN and model.stage1.block0.conv1.kernel.shape == (3, 3, 4, 3)
  wrong = jax.tree.map(lambda x: x, state)
  wrong["stage1"]["block0"]["conv1"]["kernel"] = np.zeros((3, 3, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r"\['stage1'\]\['block0'\]\['conv1'\]\['kernel'\] has shape \(3, 3, 4, 4\), "
                                       r"expected \(3, 3, 4, 3\) for resnet20"):
    checkpoint.build_with_state("resnet20", THIN, None, wrong)
  missing = jax.tree.map(lambda x: x, state)
  del missing["fc"]["bias"]
  with pytest.raises(ValueError, match=r"missing \[\"\['fc'\]\['bias'\]\"\]"):
    checkpoint.build_with_state("resnet20", THIN, None, missing)
  extra = jax.tree.map(lambda x: x, state)
  extra["fc"]["gain"] = np.ones(10, np.float32)
  with pytest.raises(ValueError, match="unexpected.*gain"):
    checkpoint.build_with_state("resnet20", THIN, None, extra)
  # Unknown models and invalid widths are the registry's errors.
  with pytest.raises(ValueError, match="unknown model name"):
    checkpoint.build_with_state("resnet21", None, None, state)
  with pytest.raises(ValueError):
    checkpoint.build_with_state("resnet20", [4] * 3, None, state)


def test_built_models_are_independent_of_each_other():
  # The abstract model is cached per architecture: filling one model must leave the next one untouched.
  state = jax.tree.map(lambda s: np.full(s.shape, 1.0, s.dtype), checkpoint.abstract_state("resnet20", THIN))
  a = checkpoint.build_with_state("resnet20", THIN, None, state)
  b = checkpoint.build_with_state("resnet20", THIN, None, jax.tree.map(lambda x: 2 * x, state))
  assert float(np.asarray(a.fc.kernel[...]).max()) == 1.0 and float(np.asarray(b.fc.kernel[...]).min()) == 2.0
  b.fc.kernel[...] = np.zeros_like(np.asarray(b.fc.kernel[...]))
  assert float(np.asarray(a.fc.kernel[...]).min()) == 1.0


def test_random_model_is_he_normal_with_identity_batch_norm():
  m = models.random_model("resnet56", seed=1)
  assert m.widths == models.default_widths("resnet56")
  k = np.asarray(m.stage3.block0.conv2.kernel[...])  # 3x3x64 inputs per output channel
  assert abs(k.std() - math.sqrt(2.0 / (3 * 3 * 64))) < 0.02 * math.sqrt(2.0 / (3 * 3 * 64))
  assert abs(k.mean()) < 0.01 * k.std()
  bn = m.stage3.block0.bn2
  for name, value in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0)):
    np.testing.assert_array_equal(np.asarray(getattr(bn, name)[...]), value)
  for a, b in zip(_leaves(m), _leaves(models.random_model("resnet56", seed=1)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(k, np.asarray(models.random_model("resnet56", seed=2).stage3.block0.conv2.kernel[...]))
