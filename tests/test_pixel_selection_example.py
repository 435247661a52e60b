"""The pixel-selection example (``python -m examples.pixel_selection``): it runs, writes its report, and its selection beats random pixels."""

import json

import numpy as np
import pytest

from examples import pixel_selection as demo


def test_demo_writes_a_report_whose_selection_beats_random_pixels(tmp_path, capsys):
  demo.main(["--out", str(tmp_path), "--k", "6", "12", "--calib", "300"])
  report = json.loads((tmp_path / "report.json").read_text())
  assert "| pixels kept |" in (tmp_path / "report.md").read_text()
  assert "report.md" in capsys.readouterr().out
  for row in report["budgets"]:
    assert len(row["selected"]) == row["k"] and len(set(row["selected"])) == row["k"]
    # The pixels HSIC Lasso keeps carry the class better than the mean of 5 random draws of as many pixels.
    assert row["accuracy_hsic_lasso"] > row["accuracy_random_mean"] + 0.02, row
  assert report["accuracy_all_64_pixels"] > 0.9
  # A pixel that is blank in every calibration image carries nothing and is never kept.
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  x = load_digits().data
  order = np.random.default_rng(0).permutation(len(x))
  blank = np.flatnonzero(np.ptp(x[order[:300]], axis=0) == 0)
  assert blank.size and not set(blank) & set(report["budgets"][-1]["selected"])


@pytest.mark.parametrize("args, msg", [(["--seed", "-1"], "--seed must be >= 0"),
                                       (["--k", "0"], "--k values must be in"),
                                       (["--calib", "1"], "--calib must be in")])
def test_demo_arguments_are_checked(tmp_path, capsys, args, msg):
  with pytest.raises(SystemExit):
    demo.main(["--out", str(tmp_path)] + args)
  err = capsys.readouterr().err
  assert msg in err and "python -m examples.pixel_selection" in err
