"""The README's Python examples run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) >= 2
  namespace: dict = {"np": np}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  # The examples' own results are meaningful: the selection found the channels y depends on.
  assert set(namespace["res"].indices()) <= {0, 1, 2, 3} and bool(namespace["res"].converged)
  assert np.flatnonzero(np.asarray(namespace["sel"].selected)).tolist() == [0, 1, 2, 3]
  assert namespace["thin"].widths == namespace["out"].widths
