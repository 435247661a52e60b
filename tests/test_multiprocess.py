"""The program as several real JAX processes on this machine (``python -m train.launch``, gloo CPU collectives).

The default run starts processes twice: the launcher's own behaviour on a stand-in program (prefixes, failing as a
whole), and a 2-process run refused before any work because its batch does not split over the processes. The
slow tests run ``digits_apib`` (shrunk) through every stage as 1 process x 4 devices and as 2 processes x 2 devices
and compare what they chose and trained, then kill one process mid-fine-tune and resume.
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
# digits_apib at the smallest size that still runs every stage: 8x8 inputs, one epoch of pre-training and one of
# fine-tuning at batch 32 (44 steps each), 64 calibration images. Every batch splits over 4 devices.
TINY = ["--config=digits_apib", "--config.data.image_size=8", "--config.pretrain.epochs=1",
        "--config.pretrain.batch_size=32", "--config.finetune.epochs=1", "--config.finetune.batch_size=32",
        "--config.finetune.checkpoint_every_steps=10", "--config.finetune.log_every_steps=11",
        "--config.calib.num_images=64", "--config.calib.batch_size=32", "--config.eval.bn_recalibrate_steps=2"]
# float32 sums over 4 devices in one process and over 2 x 2 across processes (gloo) differ in order only.
RTOL, ATOL = 1e-4, 1e-5


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


def test_batch_that_the_processes_do_not_split_is_refused_before_any_work(env):
  e, base = env
  workdir = base / "refused"
  proc = _run(_launch_cmd(2, 1, *TINY, "--config.finetune.batch_size=33", f"--workdir={workdir}",
                          f"--config.data.data_dir={base / 'tfds'}"), e, timeout=300)
  assert proc.returncode == 1, proc.stdout[-3000:]
  assert ("finetune batch_size 33 must be a multiple of the 2 devices it is split over (2 processes x 1); "
          "expected e.g. 32") in proc.stdout
  assert re.search(r"\[launch\] error: process [01] exited with code 1", proc.stdout)
  assert "[dense]" not in proc.stdout and not (workdir / "config.json").exists()


# ------------------------------------------------------------------------------------------------------------------
# The whole program, 1 x 4 against 2 x 2 (slow).


def _final_state(workdir: Path) -> list[tuple[str, np.ndarray]]:
  state = nnx.to_pure_dict(nnx.state(checkpoint.load(workdir / "final")))
  return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]]


def _assert_same_params(a: Path, b: Path, **tol: float) -> None:
  for (name, x), (name_b, y) in zip(_final_state(a), _final_state(b), strict=True):
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


@pytest.mark.slow  # about 6 min on 2 busy cores: two whole runs, most of it compilation
def test_two_processes_choose_and_train_what_one_process_does(one_by_four, two_by_two):
  two, out, _ = two_by_two
  one = one_by_four
  sel1, sel2 = (json.loads((w / "selection.json").read_text()) for w in (one, two))
  assert sel1["widths"] == sel2["widths"]
  assert sel1["keep"] == sel2["keep"]
  cal1, cal2 = (json.loads((w / "calibration" / "calibration.json").read_text()) for w in (one, two))
  assert cal1["ids"] == cal2["ids"]
  _assert_same_params(one, two, rtol=RTOL, atol=ATOL)
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


@pytest.mark.slow  # about 4 min on 2 busy cores
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
    if (workdir / "finetune" / "10").is_dir() and not (workdir / "final").exists():
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
  # Resumed from step 10's checkpoint on the same 2 x 2 layout: the same computation as the uninterrupted run.
  _assert_same_params(reference, workdir, rtol=1e-6, atol=1e-7)
