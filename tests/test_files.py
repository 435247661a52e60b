"""train.files: the program's JSON and .npz files, written atomically and read with errors that say what to do."""

import json

import numpy as np
import pytest

from train import files


def test_json_round_trip_turns_numpy_values_into_python_ones(tmp_path):
  path = tmp_path / "selection.json"
  payload = {"widths": np.array([3, 5], np.int64), "lam": np.float32(0.25), "n": np.int32(7), "pair": (1, 2)}
  files.write_json(path, payload)
  back = files.read_json(path)
  assert back == {"widths": [3, 5], "lam": 0.25, "n": 7, "pair": [1, 2]}
  assert type(back["n"]) is int and type(back["lam"]) is float
  assert files.jsonable(payload) == back
  assert not list(tmp_path.glob("*.tmp"))  # the temporary name was renamed away
  with pytest.raises(TypeError, match="not JSON serialisable: object"):
    files.write_json(tmp_path / "bad.json", {"x": object()})
  assert not (tmp_path / "bad.json").exists()  # a failed write leaves nothing that looks finished


def test_a_damaged_json_says_to_delete_it(tmp_path):
  path = tmp_path / "evaluation.json"
  path.write_text('{"top1": 0.9')  # cut short
  with pytest.raises(ValueError, match="evaluation.json cannot be read .*delete it to run its stage again"):
    files.read_json(path)
  with pytest.raises(ValueError, match="cannot be read"):
    files.read_json(tmp_path / "missing.json")


def test_npz_round_trip_checks_the_decisions(tmp_path):
  path = tmp_path / "problems.npz"
  quad = np.arange(8.0).reshape(2, 2, 2)
  files.save_npz(path, decisions=np.array(["a", "b"]), quad=quad)
  out = files.load_npz(path, ["a", "b"])
  np.testing.assert_array_equal(out["quad"], quad)
  assert not list(tmp_path.glob("*.tmp.npz"))
  with pytest.raises(ValueError, match="written for other decisions"):
    files.load_npz(path, ["a", "c"])
  path.write_bytes(path.read_bytes()[:40])  # a truncated archive
  with pytest.raises(ValueError, match=f"delete {tmp_path} to calibrate again"):
    files.load_npz(path, ["a", "b"])
  json.dumps(files.jsonable({"x": np.zeros(2)}))  # arrays become lists JSON can write
