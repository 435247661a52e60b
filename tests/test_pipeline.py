"""The pruning program end to end on digits at tiny scale, its resume after SIGKILL, its configs and its errors.

The whole pipeline runs in a subprocess (`python -m train.main`, as a user runs it), with JAX's persistent
compilation cache shared between the runs of this module so that the killed and resumed runs do not compile again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
import models
from models import checkpoint, flops
from tests import _program
from train import config_lib, main as main_lib, pipeline, workdir as workdir_lib
from train.configs import digits_apib

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=digits_apib", "--config.data.image_size=8", "--config.pretrain.epochs=1",
        "--config.pretrain.batch_size=32", "--config.finetune.epochs=2", "--config.finetune.batch_size=32",
        "--config.finetune.checkpoint_every_steps=10", "--config.finetune.log_every_steps=5",
        "--config.calib.num_images=64", "--config.calib.batch_size=32", "--config.eval.bn_recalibrate_steps=2",
        "--config.finetune.distill_weight=0.5"]


env, finished = _program.program_fixtures(TINY, "pipeline")


def _cmd(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
  return _program.command(TINY, workdir, data_dir, *extra)


def test_whole_pipeline_writes_a_consistent_report(finished):
  workdir, proc = finished
  assert "report:" in proc.stdout and "MACs" in proc.stdout
  rep = json.loads((workdir / "report.json").read_text())
  for key in ("dense", "pruned", "widths", "search", "seconds"):
    assert key in rep
  for key in ("macs", "params", "top1"):
    assert key in rep["dense"]
  for key in ("macs", "params", "top1_before_finetune", "top1"):
    assert key in rep["pruned"]
  assert all({"lambda", "macs", "params"} <= set(p) for p in rep["search"])
  assert set(rep["seconds"]) >= set(pipeline.STAGES) - {"report"}
  # The MACs hit the target (half the dense count, 1%), counted independently by tracing the pruned model.
  final = models.load_pruned(workdir_lib.model_checkpoint(workdir))
  exact = flops.count("resnet20", final.widths, exact=True, input_hw=(8, 8))
  assert exact.macs == rep["pruned"]["macs"]
  assert abs(exact.macs - 0.5 * rep["dense"]["macs"]) <= 0.01 * 0.5 * rep["dense"]["macs"]
  assert final.widths == rep["model_widths"]
  assert [w["pruned"] for w in rep["widths"]] == [final.widths[1 + 2 * k] for k in range(9)]
  # Calibration ids are recorded, and they are distinct training images.
  ids = rep["calibration"]["ids"]
  assert len(ids) == 64 and len(set(ids)) == 64
  for name in ("report.md", "widths.png", "lambda_search.png", "training.png", "metrics.jsonl", "config.json"):
    assert (workdir / name).exists(), name
  # Accuracies are fractions of the evaluation split (no example dropped: 355 digits in test).
  assert rep["evaluation"]["examples"] == 355
  assert 0.0 <= rep["pruned"]["top1"] <= 1.0


def test_pruned_checkpoint_is_the_plan_applied_to_the_dense_one(finished):
  workdir, _ = finished
  dense = models.load_pruned(workdir / "dense")
  pruned = checkpoint.load(workdir / "pruned")
  plan = hj.PrunePlan.from_json(json.dumps(checkpoint.read_meta(workdir / "pruned")["plan"]))
  rebuilt = hj.apply_plan(nnx.to_pure_dict(nnx.state(dense)), dense.channel_groups(), plan)
  got = jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(pruned)))
  want = jax.tree_util.tree_leaves(rebuilt.state)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The kept channels are those of the selection.
  sel = json.loads((workdir / "selection.json").read_text())
  assert {k: list(v) for k, v in plan.keep.items()} == sel["keep"]


def test_rerun_does_no_work_and_a_changed_config_is_refused(env, finished):
  e, base = env
  workdir, _ = finished
  before = (workdir / "report.json").stat().st_mtime_ns
  again = subprocess.run(_cmd(workdir, base / "tfds"), cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert (workdir / "report.json").stat().st_mtime_ns == before
  changed = subprocess.run(_cmd(workdir, base / "tfds", "--config.select.ratio=0.4"), cwd=ROOT, env=e,
                           capture_output=True, text=True, timeout=300)
  assert changed.returncode == 1 and "select.ratio" in changed.stderr


def test_sigkill_during_finetuning_then_resume_gives_the_same_parameters(env, finished):
  e, base = env
  reference, _ = finished
  workdir = base / "killed"
  _program.kill_during_finetuning_then_resume(_cmd(workdir, base / "tfds"), workdir, env=e, cwd=ROOT)
  _program.assert_same_final_parameters(reference, workdir)


# ------------------------------------------------------------------------------------------------------------------
# Configs and errors (in process).


def test_every_config_resolves_and_builds():
  names = config_lib.available()
  assert {"digits_apib", "resnet56_apib", "resnet20_apib", "resnet110_apib", "vgg16_apib", "googlenet_apib",
          "mobilenetv2_apib", "resnet50_apib", "resnet20_itpruner", "resnet56_itpruner", "vgg16_itpruner",
          "resnet50_itpruner"} <= set(names)
  import importlib.util  # pylint: disable=import-outside-toplevel
  for name in names:
    path = config_lib.resolve(name)
    text = path.read_text()
    assert "python -m train.main --config=" + name in text, f"{name}'s docstring gives no command"
    assert text.lstrip().startswith('"""')
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    need = hj.method_needs(cfg.select.method, cfg.select.criterion)  # known, and meaning something together
    assert ("similarity" in need) == name.endswith("_itpruner"), name


def test_unknown_config_name_and_key_are_errors(capsys):
  assert main_lib.main(["prog", "--config=no_such_config"]) == 2
  err = capsys.readouterr().err
  assert "unknown config 'no_such_config'" in err and "resnet56_apib" in err
  assert main_lib.main(["prog", "--config=digits_apib", "--config.select.ratoo=0.5"]) == 2
  assert "ratoo" in capsys.readouterr().err


def _tiny_config(data_dir):
  cfg = digits_apib.get_config()
  cfg.data.data_dir = str(data_dir)
  return cfg


def test_impossible_targets_give_the_reachable_range():
  dense = flops.count("resnet20")
  cfg = digits_apib.get_config()
  cfg.select.ratio = 1.5
  with pytest.raises(ValueError, match="select.ratio must be in"):
    pipeline.resolve_target(cfg, dense)
  cfg.select.absolute = 2 * dense.macs
  with pytest.raises(ValueError, match="above the dense model"):
    pipeline.resolve_target(cfg, dense)


def test_impossible_target_in_the_search_stage(finished, tmp_path):
  workdir, _ = finished
  # A copy of the run up to calibration, asked for 1% of the MACs: below what omega=1 allows.
  import shutil  # pylint: disable=import-outside-toplevel
  for name in ("dense", "calibration", "config.json"):
    src = workdir / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
  cfg = pipeline.ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  cfg.select.ratio = 0.01
  run = pipeline.Run(cfg, tmp_path, pipeline.train_lib.make_mesh(jax.devices()[:1]), True)
  with pytest.raises(ValueError, match="outside what the search can reach: reachable range"):
    pipeline.stage_select(run)


def test_missing_data_says_how_to_get_it(tmp_path):
  cfg = digits_apib.get_config()
  cfg.data.name = "cifar10_folder"
  cfg.data.source_dir = str(tmp_path / "nowhere")
  cfg.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    pipeline.run_pipeline(cfg, tmp_path / "run", mesh=pipeline.train_lib.make_mesh(jax.devices()[:1]))


def test_mismatched_and_corrupt_checkpoints_are_refused(finished, tmp_path):
  workdir, _ = finished
  from train import checkpoints  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  # A fine-tuning checkpoint asked for by a run with other widths.
  mgr = checkpoints.TrainCheckpoints(workdir / "finetune")
  meta = {"widths": [16] * 19, "seed": 0}
  with pytest.raises(checkpoints.CheckpointMismatchError, match="widths"):
    mgr.restore_latest({"x": np.zeros(3)}, meta)
  mgr.close()
  # A model checkpoint whose arrays were replaced by another model's: refused, naming the checkpoint.
  bad = tmp_path / "bad"
  shutil.copytree(workdir / "pruned", bad)
  shutil.rmtree(bad / "state")
  shutil.copytree(workdir / "dense" / "state", bad / "state")
  with pytest.raises(ValueError, match="bad"):
    checkpoint.load(bad)
  # A damaged one (meta cut): refused.
  (tmp_path / "cut").mkdir()
  with pytest.raises(ValueError):
    checkpoint.load(tmp_path / "cut")


def test_evaluate_command_reproduces_the_reported_accuracy(env, finished):
  e, base = env
  workdir, _ = finished
  proc = subprocess.run([sys.executable, "-m", "train.evaluate", "--config=digits_apib", "--config.data.image_size=8",
                         f"--config.data.data_dir={base / 'tfds'}", f"--checkpoint={workdir}"], cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout[proc.stdout.index("{"):])
  rep = json.loads((workdir / "report.json").read_text())
  assert got["examples"] == rep["evaluation"]["examples"]
  np.testing.assert_allclose(got["top1"], rep["pruned"]["top1"], atol=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# Other selection methods and criteria, on a copy of the finished run's dense model (stages called in process).


def _variant_run(finished, tmp_path, **select):
  import shutil  # pylint: disable=import-outside-toplevel
  workdir, _ = finished
  shutil.copytree(workdir / "dense", tmp_path / "dense")
  cfg = pipeline.ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  for key, value in select.items():
    node = cfg.select
    *head, last = key.split("__")
    for h in head:
      node = node[h]
    node[last] = value
  return pipeline.Run(cfg, tmp_path, pipeline.train_lib.make_mesh(jax.devices()[:1]), True)


def _stages(run, *names):
  for name in names:
    pipeline._STAGE_FNS[name](run)  # pylint: disable=protected-access
  return json.loads((run.workdir / "selection.json").read_text())


def _activations_numpy(model, images, batch_size):
  """Each decision's input activation, read from the model's own taps with BatchNorm in batch-statistics mode, one
  calibration batch at a time (each batch normalised by its own statistics, as calibration does)."""
  model.train()
  parts = [model(jax.numpy.asarray(images[s:s + batch_size]), capture=True)[1]
           for s in range(0, len(images), batch_size)]
  model.eval()
  return [np.concatenate([np.asarray(t[d].input, np.float64) for t in parts]) for d in model.decisions()]


def _linear_cka(a, b):
  def centred_gram(f):
    f = f.reshape(len(f), -1)
    k = f @ f.T
    h = np.eye(len(k)) - 1.0 / len(k)
    return h @ k @ h
  ka, kb = centred_gram(a), centred_gram(b)
  return float(np.sum(ka * kb) / np.sqrt(np.sum(ka * ka) * np.sum(kb * kb)))


def _l1_of_producer(state, group):
  """Per-channel L1 norm of the group's producing conv kernels (HWIO, output axis last), from the state."""
  flat = hj.groups.flatten_state(state)
  total = np.zeros(group.size)
  for m in group.members:
    leaf = np.asarray(flat[m.path])
    if m.role == "out" and m.path[-1] == "kernel" and leaf.ndim >= 2:
      total += np.abs(np.moveaxis(leaf, m.axis, -1)).reshape(-1, group.size).sum(0)
  return total


def test_itpruner_widths_follow_the_importances_of_independent_cka_and_fit_the_budget(finished, tmp_path):
  from train import data  # pylint: disable=import-outside-toplevel
  run = _variant_run(finished, tmp_path, method="itpruner", criterion="l1", itpruner__beta=50.0)
  sel = _stages(run, "calibrate", "select", "surgery")
  dense = run.load_model("dense")
  # The similarity matrix is linear CKA between the decisions' activations, recomputed here in numpy.
  cfg = run.config
  images, _, _ = data.calibration_batch(cfg.data, int(cfg.calib.num_images), seed=int(cfg.calib.seed))
  acts = _activations_numpy(dense, images, int(cfg.calib.batch_size))
  want = np.array([[_linear_cka(a, b) for b in acts] for a in acts])
  np.testing.assert_allclose(np.asarray(sel["similarity"]), want, atol=2e-4)
  r = want.sum(1) - np.diag(want)
  np.testing.assert_allclose(sel["importance"], np.exp(-50.0 * r / r.sum()), rtol=2e-3)
  # The budget holds, counted exactly on the pruned model; widths are those of the surgery.
  pruned = run.load_model("pruned")
  exact = flops.count("resnet20", pruned.widths, exact=True, input_hw=(8, 8))
  assert exact.macs <= sel["target"] and exact.macs == sel["costs"]["macs"]
  assert exact.macs >= (1 - sel["tolerance"]) * sel["target"]
  assert pruned.widths == sel["widths"]
  # The channels are the top L1 norms of each producing conv.
  state = nnx.to_pure_dict(nnx.state(dense))
  from train import calibrate  # pylint: disable=import-outside-toplevel
  for (_, g), d in zip(calibrate.decision_groups(dense), sel["decisions"]):
    l1 = _l1_of_producer(state, g)
    kept = sel["keep"][g.name]
    assert len(kept) == d["kept"]
    dropped = sorted(set(range(g.size)) - set(kept))
    if dropped:
      assert l1[kept].min() >= l1[dropped].max()


def test_uniform_widths_filled_by_l1_keep_each_layers_largest_norms(finished, tmp_path):
  from train import calibrate  # pylint: disable=import-outside-toplevel
  run = _variant_run(finished, tmp_path, criterion="l1", method="uniform")
  sel = _stages(run, "calibrate", "select", "surgery")
  dense = run.load_model("dense")
  state = nnx.to_pure_dict(nnx.state(dense))
  kept_fraction = [d["kept"] / d["size"] for d in sel["decisions"]]
  # uniform: one fraction for every decision (up to rounding to whole channels)
  assert max(kept_fraction) - min(kept_fraction) <= 1.0 / min(d["size"] for d in sel["decisions"]) + 1e-9
  assert abs(sel["costs"]["macs"] - sel["target"]) <= sel["tolerance"] * sel["target"] or sel["costs"]["macs"] <= \
      sel["target"]
  for (_, g) in calibrate.decision_groups(dense):
    l1 = _l1_of_producer(state, g)
    kept = sel["keep"][g.name]
    dropped = sorted(set(range(g.size)) - set(kept))
    if dropped:
      assert l1[kept].min() >= l1[dropped].max()


def test_itpruner_widths_filled_by_hsic_lasso_keep_select_k_channels(finished, tmp_path):
  run = _variant_run(finished, tmp_path, method="itpruner", criterion="hsic_lasso", itpruner__beta=50.0)
  sel = _stages(run, "calibrate", "select")
  _, problems = pipeline.calibrate.load_problems(run.path("calibration") / "problems.npz")
  for p, d in zip(problems, sel["decisions"]):
    want = np.flatnonzero(np.asarray(hj.select_k(p, d["kept"]).selected))
    assert sel["keep"][d["group"]] == want.tolist()


def test_selection_methods_and_criteria_are_checked():
  with pytest.raises(ValueError, match=r"'hsic_lasso' has none: .* a method that solves its problems: \['apib'\]"):
    hj.method_needs("global", "hsic_lasso")
  with pytest.raises(ValueError, match="unknown criterion 'no_such'.*fpgm"):
    hj.method_needs("uniform", "no_such")
  with pytest.raises(ValueError, match=r"unknown selection method 'lottery'; expected one of \['apib'"):
    hj.method_needs("lottery", "l1")


def test_apib_widths_filled_by_fpgm_keep_each_layers_top_fpgm_scores(finished, tmp_path):
  """``--config.select.criterion=fpgm`` on an APIB config: APIB's global search sets the widths (as the APIB run
  does), FPGM's scores (distance sums, derived by hand in test_criteria) pick the channels."""
  from scipy.spatial.distance import cdist  # pylint: disable=import-outside-toplevel
  from train import calibrate  # pylint: disable=import-outside-toplevel
  workdir, _ = finished
  run = _variant_run(finished, tmp_path, criterion="fpgm")
  sel = _stages(run, "calibrate", "select")
  apib = json.loads((workdir / "selection.json").read_text())
  assert [d["kept"] for d in sel["decisions"]] == [d["kept"] for d in apib["decisions"]]
  assert sel["lambda"] == pytest.approx(apib["lambda"])
  dense = run.load_model("dense")
  flat = hj.groups.flatten_state(nnx.to_pure_dict(nnx.state(dense)))
  for (_, g), d in zip(calibrate.decision_groups(dense), sel["decisions"]):
    rows = [np.moveaxis(np.asarray(flat[m.path]), m.axis, 0).reshape(g.size, -1) for m in g.members
            if m.role == "out" and m.path[-1] == "kernel"]
    w = np.concatenate(rows, axis=1)
    score = cdist(w, w).sum(1)
    kept = sel["keep"][g.name]
    dropped = sorted(set(range(g.size)) - set(kept))
    if dropped:
      assert score[kept].min() >= score[dropped].max() - 1e-4 * score.max()


def test_calibration_of_non_finite_activations_names_the_decisions(finished):
  from train import calibrate, data  # pylint: disable=import-outside-toplevel
  workdir, _ = finished
  cfg = pipeline.ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  dense = pipeline.Run(cfg, workdir, pipeline.train_lib.make_mesh(jax.devices()[:1]), False).load_model("dense")
  images, _, _ = data.calibration_batch(cfg.data, 8, seed=0)
  images = np.array(images)
  images[2, 3, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r"calibration problems of \[.*\] are not finite"):
    calibrate.build_problems(dense, images, cfg.calib, cfg.select)


def test_itpruner_with_an_activation_criterion_scores_from_the_same_activations(finished, tmp_path):
  """The similarity's activations are reused for HRank's scores: equal to scores computed afresh."""
  from train import calibrate, data  # pylint: disable=import-outside-toplevel
  run = _variant_run(finished, tmp_path, method="itpruner", criterion="hrank", itpruner__beta=50.0)
  _stages(run, "calibrate", "select")
  cfg = run.config
  saved = np.load(run.path("calibration") / "scores.npz")
  dense = run.load_model("dense")
  images, labels, _ = data.calibration_batch(cfg.data, int(cfg.calib.num_images), seed=int(cfg.calib.seed))
  fresh = calibrate.criterion_scores(dense, "hrank", images, labels, cfg.calib, seed=int(cfg.seed))
  for i, want in enumerate(fresh):
    np.testing.assert_array_equal(saved[str(i)], want)


def test_a_workdir_from_before_a_new_config_field_resumes_unless_the_field_differs(tmp_path):
  cfg = config_lib.load("digits_apib")
  saved = json.loads(cfg.to_json_best_effort())
  del saved["calib"]["consumers"], saved["model"]["kwargs"]  # fields the program gained since that run started
  (tmp_path / "config.json").write_text(json.dumps(saved))
  pipeline.check_config(cfg, tmp_path)  # at their defaults: the same run
  cfg.calib.consumers = "sum"
  with pytest.raises(ValueError, match=r"keys that differ: calib.consumers"):
    pipeline.check_config(cfg, tmp_path)
