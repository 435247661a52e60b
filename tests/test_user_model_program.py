"""The pruning program on a network outside the zoo (examples/user_cnns.py's SE-ResNet, named by its factory):
end to end, killed during fine-tuning and resumed, and its models loaded back by the project's loader.

Like tests/test_pipeline.py, the program runs in a subprocess (``python -m train.main --config=digits_se_resnet``,
as a user runs it) on digits at 8x8, with JAX's persistent compilation cache shared between the runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

import hsic_jax as hj
import models
from examples import user_cnns
from models import checkpoint
from tests import _program
from tests._models import masked_copy
from train import config_lib, pipeline, workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=digits_se_resnet", "--config.model.kwargs.width=8", "--config.data.image_size=8",
        "--config.pretrain.epochs=1", "--config.pretrain.batch_size=32", "--config.finetune.epochs=1",
        "--config.finetune.batch_size=32", "--config.finetune.checkpoint_every_steps=10",
        "--config.finetune.log_every_steps=5", "--config.calib.num_images=64", "--config.calib.batch_size=32",
        "--config.eval.bn_recalibrate_steps=2"]


env, finished = _program.program_fixtures(TINY, "user_model")


def _cmd(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
  return _program.command(TINY, workdir, data_dir, *extra)


def _images(n=6):
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, 8, 8, 3)), jnp.float32)


def test_a_factory_model_is_pruned_end_to_end_and_loads_back_as_its_own_class(finished):
  workdir, proc = finished
  assert "examples.user_cnns:se_resnet" in proc.stdout
  rep = json.loads((workdir / "report.json").read_text())
  sel = json.loads((workdir / "selection.json").read_text())
  assert rep["model"] == "examples.user_cnns:se_resnet" and sel["widths"] is None and sel["within_tolerance"]
  final = models.load_pruned(workdir_lib.model_checkpoint(workdir))
  dense = models.load_pruned(workdir / "dense")
  assert type(final) is user_cnns.SEResNet and type(dense) is user_cnns.SEResNet
  # The MACs, counted again from the loaded model's own jaxpr, are the report's and within 1% of the config's 35%.
  x = _images()
  assert hj.count_macs(dense, x).macs == rep["dense"]["macs"]
  got = hj.count_macs(final, x).macs
  target = 0.35 * rep["dense"]["macs"]
  assert sel["target"] == pytest.approx(target) and got == rep["pruned"]["macs"] and abs(got - target) <= 0.01 * target
  # Every decision kept what the selection says: the loaded model's layers have those widths.
  kept = {d["group"]: d["kept"] for d in sel["decisions"]}
  assert kept == {g: len(k) for g, k in sel["keep"].items()}
  assert final.stage1[0].conv1.kernel.shape[-1] == kept["stage1/0/conv1"]
  assert final.stage1[0].se.fc1.kernel.shape[-1] == kept["stage1/0/se/fc1"]
  assert final.stem.kernel.shape[-1] == kept["stem"]
  assert final(x).shape == (6, 10) and np.isfinite(np.asarray(final(x))).all()
  assert rep["evaluation"]["examples"] == 355 and 0.0 <= rep["pruned"]["top1"] <= 1.0
  for name in ("report.md", "widths.png", "lambda_search.png", "training.png"):
    assert (workdir / name).exists(), name


def test_the_pruned_checkpoint_is_the_dense_model_masked_at_the_kept_channels(finished):
  workdir, _ = finished
  dense = models.load_pruned(workdir / "dense")
  pruned = models.load_pruned(workdir / "pruned")
  plan = hj.PrunePlan.from_json(json.dumps(checkpoint.read_meta(workdir / "pruned")["plan"]))
  x = _images()
  groups = hj.derive_model_groups(dense, x)
  rebuilt = hj.apply_plan(nnx.to_pure_dict(nnx.state(dense)), groups, plan).state
  for a, b in zip(jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(pruned))), jax.tree_util.tree_leaves(rebuilt),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  masked = masked_copy(dense, groups, plan.keep)
  np.testing.assert_allclose(np.asarray(pruned(x)), np.asarray(masked(x)), rtol=1e-4, atol=1e-4)


def test_killed_during_finetuning_the_same_command_resumes_to_the_same_parameters(env, finished):
  e, base = env
  reference, _ = finished
  workdir = base / "killed"
  _program.kill_during_finetuning_then_resume(_cmd(workdir, base / "tfds"), workdir, env=e, cwd=ROOT)
  _program.assert_same_final_parameters(reference, workdir)


def test_bad_factory_inputs_fail_before_any_work(env, tmp_path):
  _, base = env
  for extra, message in [(["--config.model.name=examples.user_cnns:no_such_net"], "has no attribute 'no_such_net'"),
                         (["--config.model.kwargs.depth=3"], "takes no argument(s) ['depth']"),
                         (["--config.dense.source=npz"], "dense.source 'npz' reads the zoo's PyTorch weights")]:
    workdir = tmp_path / extra[-1].split("=")[0].rsplit(".", 1)[-1]
    cfg = _config(base, *extra)
    with pytest.raises(ValueError, match=re.escape(message)):
      pipeline.run_pipeline(cfg, workdir, mesh=pipeline.train_lib.make_mesh(jax.devices()[:1]))
    assert not (workdir / "dense").exists()


def _config(base: Path, *extra: str):
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
  cfg, _ = config_lib.parse_flags(["prog", *TINY, f"--config.data.data_dir={base / 'tfds'}", *extra], fv, holder)
  return cfg


def test_a_pruned_factory_model_is_pruned_again_in_a_second_round(env, finished, tmp_path):
  """Pruning in rounds: the finished run's pruned model as the dense model of a second run (uniform L1 to 70% of its
  MACs). The second pruned checkpoint records one plan of the factory's model (the rounds composed), and loads
  back as the once-pruned model cut again by the second selection."""
  _, base = env
  once = models.load_pruned(finished[0] / "pruned")
  cfg = _config(base, "--config.dense.source=checkpoint", f"--config.dense.path={finished[0] / 'pruned'}",
                "--config.select.method=uniform", "--config.select.criterion=l1", "--config.select.ratio=0.7",
                "--config.select.tolerance=0.05")
  mesh = pipeline.train_lib.make_mesh(jax.devices()[:1])
  for stage in ("dense", "calibrate", "select", "surgery"):
    pipeline.run_pipeline(cfg, tmp_path, only=stage, mesh=mesh)
  twice = models.load_pruned(tmp_path / "pruned")
  sel = json.loads((tmp_path / "selection.json").read_text())
  x = _images()
  direct = hj.thin_model(once, hj.derive_model_groups(once, x), sel["keep"], x)
  np.testing.assert_allclose(np.asarray(twice(x)), np.asarray(direct(x)), rtol=1e-5, atol=1e-5)
  plan = checkpoint.read_meta(tmp_path / "pruned")["plan"]
  first = checkpoint.read_meta(finished[0] / "pruned")["plan"]
  assert {g["name"]: g["size"] for g in plan["groups"]} == {g["name"]: g["size"] for g in first["groups"]}
  assert hj.count_macs(twice, x).macs <= hj.count_macs(once, x).macs * 0.7 * 1.05
