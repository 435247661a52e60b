"""The program as several real JAX processes on this machine (``python -m train.launch``, gloo CPU collectives).

The default run (about 25 s) checks the launcher's own behaviour on a stand-in program (prefixes, failing as a
whole), a 2-process run refused before any work because its batch does not split over the processes, and the
distributed flags' check. The slow tests run ``digits_apib`` (shrunk) through every stage as 1 process x 4 devices
and as 2 processes x 2 devices and compare what they chose and trained, kill one process mid-fine-tune and resume,
and run a thin ResNet-50 on ImageNet-format data as 2 processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from models import checkpoint
from train import launch

ROOT = Path(__file__).resolve().parents[1]
# digits_apib at the smallest size that still runs every stage: 8x8 inputs, 64 calibration images, batches that
# split over 4 devices, one epoch of pre-training (5 steps of 256) and one of fine-tuning (11 steps of 128), both at
# lr 1e-3. Why so short and so
# slow: float32 sums in another order (4 devices in one process, 2 x 2 over gloo, but also 1 device against 4 in
# one process) differ in their last bits, and this net, trained from scratch on 8x8 images, amplifies that: at
# lr 0.02, 22 steps from the same start end 0.13 apart (max |difference| of a parameter) for 1 x 4 against 2 x 2
# and for 1 x 1 against 1 x 4 alike (0.015 after 4 steps). At lr 1e-3 the runs stay within float32 tolerance, yet
# the parameters move by far more than it, so wrong shards or a missing reduction would show.
TINY = ["--config=digits_apib", "--config.data.image_size=8", "--config.pretrain.epochs=1",
        "--config.pretrain.lr=0.001", "--config.pretrain.batch_size=256", "--config.finetune.epochs=1",
        "--config.finetune.lr=0.001", "--config.finetune.batch_size=128", "--config.finetune.checkpoint_every_steps=4",
        "--config.finetune.log_every_steps=4", "--config.calib.num_images=64", "--config.calib.batch_size=32",
        "--config.eval.bn_recalibrate_steps=2"]
RTOL, ATOL = 1e-4, 1e-5  # float32, sums in another order


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("multiprocess")
  e = dict(os.environ)
  e.update({"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(base / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(ROOT)})
  return e, base


def _launch_cmd(processes: int, devices: int, *program: str) -> list[str]:
  return [sys.executable, "-m", "train.launch", f"--processes={processes}", f"--devices_per_process={devices}", "--",
          *program]


def _run(cmd: list[str], e: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------------------------
# The launcher (default run).


def test_child_env_sets_the_device_count_once_and_the_cpu_platform():
  e = launch.child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"},
                       devices_per_process=2, process_id=1)
  assert e["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=2"]
  assert e["JAX_PLATFORMS"] == "cpu" and e["TQDM_DISABLE"] == "1"
  assert "TQDM_DISABLE" not in launch.child_env({}, devices_per_process=1, process_id=0)


def test_launcher_prefixes_output_and_fails_as_a_whole(tmp_path):
  e = {**os.environ, "PYTHONPATH": str(ROOT)}
  t0 = time.perf_counter()
  proc = _run([sys.executable, "-c", "import sys; from train import launch; sys.exit(launch.launch("
               "['--fail=1'], processes=3, module='tests._launch_child'))"], e, timeout=120)
  seconds = time.perf_counter() - t0
  assert proc.returncode == 3, proc.stdout + proc.stderr
  out = proc.stdout
  for i in range(3):
    assert re.search(rf"^\[p{i}\] hello from {i} of 3 at localhost:\d+$", out, re.M), out
    assert re.search(rf"^\[launch\] process {i}: pid \d+$", out, re.M), out
  assert "[launch] error: process 1 exited with code 3; stopped the other processes" in out
  assert "[p1] partial line without newline" in out  # a last line without "\n" is not lost
  assert seconds < 60  # processes 0 and 2 were stopped, not waited for (they sleep 600 s)


def test_ctrl_c_stops_every_process():
  e = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.Popen([sys.executable, "-c", "import sys; from train import launch; sys.exit(launch.launch("
                           "['--fail=99'], processes=2, module='tests._launch_child'))"], cwd=ROOT, env=e,
                          stdout=subprocess.PIPE, text=True)
  lines, pids = [], []
  while len([l for l in lines if "hello from" in l]) < 2:  # both processes are up (and sleep 600 s)
    lines.append(proc.stdout.readline())
    assert lines[-1], "".join(lines)
    found = re.match(r"\[launch\] process \d: pid (\d+)", lines[-1])
    pids += [int(found.group(1))] if found else []
  proc.send_signal(signal.SIGINT)
  rest, _ = proc.communicate(timeout=60)
  assert proc.returncode == 130 and "[launch] interrupted: stopped every process" in rest
  for pid in pids:  # reaped by the launcher: no such process any more
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_batch_that_the_processes_do_not_split_is_refused_before_any_work(env):
  e, base = env
  workdir = base / "refused"
  proc = _run(_launch_cmd(2, 1, *TINY, "--config.finetune.batch_size=129", f"--workdir={workdir}",
                          f"--config.data.data_dir={base / 'tfds'}"), e, timeout=300)
  assert proc.returncode == 1, proc.stdout[-3000:]
  assert ("finetune batch_size 129 must be a multiple of the 2 devices it is split over (2 processes x 1); "
          "expected e.g. 128") in proc.stdout
  assert re.search(r"\[launch\] error: process [01] exited with code 1", proc.stdout)
  assert "[dense]" not in proc.stdout and not (workdir / "config.json").exists()


def test_distributed_flags_go_together(env):
  e, _ = env
  proc = _run([sys.executable, "-m", "train.main", "--config=digits_apib", "--num_processes=2"], e, timeout=120)
  assert proc.returncode == 2
  assert ("error: --coordinator_address, --process_id missing: --coordinator_address, --num_processes and "
          "--process_id go together") in proc.stderr


# ------------------------------------------------------------------------------------------------------------------
# The whole program, 1 x 4 against 2 x 2 (slow).


def _state(workdir: Path, model: str = "final") -> list[tuple[str, np.ndarray]]:
  state = nnx.to_pure_dict(nnx.state(checkpoint.load(workdir / model)))
  return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]]


def _assert_same_params(a: Path, b: Path, **tol: float) -> None:
  for (name, x), (name_b, y) in zip(_state(a), _state(b), strict=True):
    assert name == name_b and x.shape == y.shape, (name, name_b)
    np.testing.assert_allclose(x, y, err_msg=name, **tol)


@pytest.fixture(scope="module")
def one_by_four(env):
  e, base = env
  workdir = base / "1x4"
  proc = _run(_launch_cmd(1, 4, *TINY, f"--workdir={workdir}", f"--config.data.data_dir={base / 'tfds'}"), e)
  assert proc.returncode == 0, proc.stdout[-4000:]
  return workdir


@pytest.fixture(scope="module")
def two_by_two(env):
  e, base = env
  workdir = base / "2x2"
  t0 = time.perf_counter()
  proc = _run(_launch_cmd(2, 2, *TINY, f"--workdir={workdir}", f"--config.data.data_dir={base / 'tfds'}"), e)
  assert proc.returncode == 0, proc.stdout[-4000:]
  return workdir, proc.stdout, time.perf_counter() - t0


@pytest.mark.slow  # 80 s on 2 busy cores with a warm compilation cache, 9 min cold: two whole runs
def test_two_processes_choose_and_train_what_one_process_does(one_by_four, two_by_two):
  two, out, _ = two_by_two
  one = one_by_four
  sel1, sel2 = (json.loads((w / "selection.json").read_text()) for w in (one, two))
  assert sel1["widths"] == sel2["widths"]
  assert sel1["keep"] == sel2["keep"]
  cal1, cal2 = (json.loads((w / "calibration" / "calibration.json").read_text()) for w in (one, two))
  assert cal1["ids"] == cal2["ids"]
  _assert_same_params(one, two, rtol=RTOL, atol=ATOL)
  # ... while fine-tuning moved them far beyond that tolerance (the comparison can fail).
  moved = max(float(np.max(np.abs(x - y))) for (_, x), (_, y) in zip(_state(two), _state(two, "pruned")))
  assert moved > 100 * ATOL
  ev1, ev2 = (json.loads((w / "evaluation.json").read_text()) for w in (one, two))
  for model in ("dense", "pruned_before_finetune", "final"):
    assert ev2[model]["examples"] == 355  # the test digits, each once: the padding of the last batch is masked
    assert abs(ev1[model]["top1"] - ev2[model]["top1"]) <= 1 / 355 + 1e-9
  # Process 0 alone writes the logs and the report: one record per stage, one summary line.
  stages = [json.loads(line)["stage"] for line in (two / "metrics.jsonl").read_text().splitlines()
            if '"event": "stage"' in line]
  assert stages == ["dense", "calibrate", "select", "surgery", "finetune", "evaluate", "report"]
  assert out.count("MACs (") == 1 and "[p0] report:" in out
  assert (two / "report.md").exists() and (two / "widths.png").exists()


@pytest.mark.slow  # 50 s on 2 busy cores with a warm compilation cache
def test_killing_one_process_mid_finetune_fails_the_job_and_the_same_command_resumes_it(env, two_by_two):
  e, base = env
  reference, _, _ = two_by_two
  workdir = base / "killed"
  # The stages before fine-tuning, as the reference run wrote them.
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("finetune", "final", "evaluation.json",
                                                                    "report.*", "*.png"))
  cmd = _launch_cmd(2, 2, *TINY, f"--workdir={workdir}", f"--config.data.data_dir={base / 'tfds'}")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  pid = None
  while pid is None:
    line = proc.stdout.readline()
    assert line, "".join(lines)
    lines.append(line)
    found = re.match(r"\[launch\] process 1: pid (\d+)", line)
    pid = int(found.group(1)) if found else None
  deadline = time.time() + 600
  killed = False
  while time.time() < deadline and proc.poll() is None:
    if (workdir / "finetune" / "4").is_dir() and not (workdir / "final").exists():
      os.kill(pid, signal.SIGKILL)
      killed = True
      break
    time.sleep(0.05)
  rest, _ = proc.communicate(timeout=120)
  out = "".join(lines) + rest
  assert killed, "the run ended before a fine-tuning checkpoint could be seen: " + out[-3000:]
  assert proc.returncode != 0
  assert "[launch] error: process 1 exited with signal 9 (SIGKILL); stopped the other processes" in out
  assert not (workdir / "final").exists()
  resumed = _run(cmd, e)
  assert resumed.returncode == 0, resumed.stdout[-4000:]
  # Resumed from step 4's checkpoint on the same 2 x 2 layout: the same computation as the uninterrupted run.
  _assert_same_params(reference, workdir, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # 52 s on 2 busy cores with a warm compilation cache, 2 min cold: ResNet-50's compilation x 2
def test_tiny_resnet50_runs_every_stage_as_two_processes_on_imagenet_format_data(env, tmp_path):
  import models  # pylint: disable=import-outside-toplevel
  from train.datasets import make_fake_imagenet  # pylint: disable=import-outside-toplevel
  e, _ = env
  make_fake_imagenet(tmp_path / "tfds", train=16, validation=6, seed=0)
  widths = [w // 8 for w in models.default_widths("resnet50")]  # test_resnet50_tiny's thin ResNet-50
  dense = checkpoint.save(models.random_model("resnet50", widths), tmp_path / "dense_ckpt")
  workdir = tmp_path / "run"
  proc = _run(_launch_cmd(2, 2, "--config=resnet50_apib", f"--config.data.data_dir={tmp_path / 'tfds'}",
                          "--config.data.image_size=32", "--config.data.num_workers=0", f"--config.dense.path={dense}",
                          f"--config.model.widths={tuple(widths)}", "--config.select.ratio=0.6",
                          "--config.finetune.epochs=1", "--config.finetune.batch_size=8",
                          "--config.finetune.checkpoint_every_steps=1", "--config.calib.num_images=16",
                          "--config.calib.batch_size=8", "--config.eval.batch_size=8",
                          "--config.eval.bn_recalibrate_steps=1", f"--workdir={workdir}"), e, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-4000:]
  rep = json.loads((workdir / "report.json").read_text())
  assert rep["model"] == "resnet50" and len(rep["widths"]) == 32
  assert abs(rep["ratios"]["macs"] - 0.6) <= 0.01 * 0.6
  # 6 validation images in one global batch of 8 over 4 devices: the last device holds only padding.
  assert rep["evaluation"]["examples"] == 6
