"""train.calibrate: the saved calibration problems round-trip, and a damaged file says to calibrate again."""

import numpy as np
import pytest

import hsic_jax as hj
from train import calibrate


def _problems(rng):
  out = []
  for c in (3, 4):
    a = rng.normal(size=(6, c))
    out.append(hj.LassoProblem(quad=a.T @ a, lin=a.T @ rng.normal(size=6), const=np.float64(2.0),
                               lipschitz=np.float64(np.linalg.eigvalsh(a.T @ a).max()), rows=np.float64(36.0)))
  return out


def test_saved_problems_read_back_and_a_truncated_file_is_refused(tmp_path):
  problems = _problems(np.random.default_rng(0))
  path = tmp_path / "calibration" / "problems.npz"
  path.parent.mkdir()
  calibrate.save_problems(path, ["stage1/block0", "stage1/block1"], problems)
  decisions, back = calibrate.load_problems(path)
  assert decisions == ["stage1/block0", "stage1/block1"]
  for p, q in zip(problems, back):
    for field in hj.LassoProblem._fields:
      np.testing.assert_allclose(np.asarray(getattr(q, field)), np.asarray(getattr(p, field)), rtol=1e-6)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy
  with pytest.raises(ValueError, match="cannot be read .*delete it to calibrate again"):
    calibrate.load_problems(path)
