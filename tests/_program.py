"""What the tests of the pruning program as a subprocess share: kill a run during fine-tuning, resume it, and
compare its final parameters with an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import models
from train import workdir as workdir_lib


ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(base: Path) -> dict[str, str]:
  """The environment of a program run: one CPU device (as a user's laptop) and the suite's persistent compilation
  cache (conftest), or one under ``base``."""
  e = dict(os.environ)
  e.pop("XLA_FLAGS", None)
  e.update({"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(base / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
  return e


def command(flags: Sequence[str], workdir: Path, data_dir: Path, *extra: str) -> list[str]:
  """``python -m train.main`` with ``flags``, the data directory, the workdir and ``extra`` flags."""
  return [sys.executable, "-m", "train.main", *flags, f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
          *extra]


def run_to_end(cmd: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
  """Runs ``cmd`` from the repository root; it must succeed."""
  proc = subprocess.run(list(cmd), cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def program_fixtures(flags: Sequence[str], name: str):
  """Module fixtures ``env`` (``(environment, base directory)``) and ``finished`` (``(workdir, process)`` of one
  run of the program with ``flags`` to the end, data under ``base/tfds``)."""

  @pytest.fixture(scope="module")
  def env(tmp_path_factory):
    base = tmp_path_factory.mktemp(name)
    return subprocess_env(base), base

  @pytest.fixture(scope="module")
  def finished(env):  # pylint: disable=redefined-outer-name
    e, base = env
    workdir = base / "run"
    return workdir, run_to_end(command(flags, workdir, base / "tfds"), e)

  return env, finished


def kill_during_finetuning_then_resume(cmd: Sequence[str], workdir: Path, *, env: Mapping[str, str], cwd: Path
                                       ) -> subprocess.CompletedProcess:
  """Starts ``cmd``, SIGKILLs it once a fine-tuning checkpoint exists in ``workdir`` (and no final model yet),
  checks it left no report, then runs ``cmd`` again to the end and returns that run."""
  proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 400
  killed = False
  while time.time() < deadline and proc.poll() is None:
    steps = [p for p in (workdir / "finetune").glob("[0-9]*") if p.is_dir()] if (workdir / "finetune").exists() else []
    if steps and not (workdir / "final").exists():
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.02)
  proc.wait(timeout=60)
  assert killed, "the run ended before a fine-tuning checkpoint could be seen"
  assert not (workdir / "report.json").exists()
  resumed = subprocess.run(list(cmd), cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return resumed


def assert_same_final_parameters(a: Path, b: Path) -> None:
  """The newest models of two workdirs hold bitwise equal parameters and statistics."""
  left, right = (jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(models.load_pruned(
      workdir_lib.model_checkpoint(w))))) for w in (a, b))
  assert len(left) == len(right)
  for x, y in zip(left, right):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
