"""Test set-up: 8 simulated CPU devices for sharding tests, and the shared data folder."""

import os
import pathlib

# Must happen before jax is imported anywhere: sharding tests split channels over 8 simulated devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# JAX's persistent compilation cache, for this process and the program runs the tests start as subprocesses (which
# compile the same steps again): compilation is most of the suite's time on a CPU. Set the variable to "" to test
# without it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/hsic_jax/jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


def shared_dir() -> pathlib.Path:
  """The shared data folder beside the repository (override with HSIC_JAX_SHARED)."""
  env = os.environ.get("HSIC_JAX_SHARED")
  return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
  path = shared_dir()
  if not path.is_dir():
    pytest.skip(f"shared data folder not found at {path} (set HSIC_JAX_SHARED to its location)")
  return path
