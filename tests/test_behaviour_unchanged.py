"""The program selects what it selected before the redesign: widths and kept channels equal to the recorded ones.

``tests/data/behaviour_baseline.json`` was written by ``python tests/data/record_behaviour.py`` from the code at
commit 45e9d86 (before the modules were redesigned). Each case runs again here through the program's stages
(``dense``, ``calibrate``, ``select``) in a fresh workdir on one device; its per-decision widths and kept channel
indices must be exactly the recorded ones, the penalty (APIB) or allocation objective equal to rtol 1e-6, the MACs
and params equal. A change that moves any of them changes behaviour; if that is intended, record again and say why
in the commit.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from tests.conftest import shared_dir

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("record_behaviour", HERE / "data" / "record_behaviour.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)
BASELINE = json.loads((HERE / "data" / "behaviour_baseline.json").read_text())["cases"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("behaviour_data")


def _check(case: str, tmp_path: pathlib.Path, data_dir: pathlib.Path) -> None:
  shared = shared_dir()
  if not shared.is_dir():
    pytest.skip(f"shared data folder not found at {shared} (pretrained weights, CIFAR-10 images; set "
                "HSIC_JAX_SHARED): the behaviour baseline cannot be checked")
  want = BASELINE[case]
  name, overrides = record.CASES[case]
  assert (name, overrides) == (want["config"], want["overrides"]), "the case's definition changed since recording"
  got = record.compute(case, tmp_path / "run", shared=shared.resolve(), data_dir=data_dir)
  assert (got["method"], got["criterion"]) == (want["method"], want["criterion"])
  assert got["decision_sizes"] == want["decision_sizes"]
  assert got["decision_widths"] == want["decision_widths"]
  assert got["model_widths"] == want["model_widths"]
  assert sorted(got["keep"]) == sorted(want["keep"])
  for group, kept in want["keep"].items():
    assert got["keep"][group] == kept, f"{case}: the kept channels of {group} changed"
  assert got["dense"] == want["dense"] and got["pruned"] == want["pruned"]
  assert got["target"] == pytest.approx(want["target"], rel=1e-12)
  assert got["within_tolerance"] == want["within_tolerance"]
  assert ("lambda" in got) == ("lambda" in want)
  if "lambda" in want:
    np.testing.assert_allclose(got["lambda"], want["lambda"], rtol=1e-6)
  assert sorted(got.get("allocation", {})) == sorted(want.get("allocation", {}))
  for key, value in want.get("allocation", {}).items():
    np.testing.assert_allclose(got["allocation"][key], value, rtol=1e-6, err_msg=f"allocation {key}")


def test_digits_default_selects_as_recorded(tmp_path, data_dir):
  """The embedded default (``bash run.sh main``): pre-training from scratch (8 epochs at 16x16), calibration, APIB's
  lambda search. 37 s alone, 44-51 s under pytest (a shared 2-core CPU)."""
  _check("digits_apib", tmp_path, data_dir)


def test_resnet56_apib_selects_as_recorded(tmp_path, data_dir):
  """APIB on the shared pretrained ResNet-56 to 57M MACs: calibration of 27 decisions and the global search.
  12 s alone, 13-21 s under pytest (2-core CPU)."""
  _check("resnet56_apib", tmp_path, data_dir)


def test_resnet20_itpruner_selects_as_recorded(tmp_path, data_dir):
  """ITPruner on the shared ResNet-20: widths from layer importances (linear CKA), channels by L1 norm. 3 s."""
  _check("resnet20_itpruner", tmp_path, data_dir)


def test_resnet20_uniform_l1_selects_as_recorded(tmp_path, data_dir):
  """One kept fraction for every decision of the shared ResNet-20, channels by L1 norm. 1 s (2-core CPU)."""
  _check("resnet20_uniform_l1", tmp_path, data_dir)
