"""The program's JSON and ``.npz`` files: written atomically (a temporary name, then a rename), read with errors
that say which file to delete to run its stage again."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def json_default(x: Any) -> Any:
  """NumPy scalars and arrays as their Python values (``json.dumps(..., default=json_default)``)."""
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def jsonable(payload: Any) -> Any:
  """``payload`` with NumPy values (and tuples) turned into what JSON reads back."""
  return json.loads(json.dumps(payload, default=json_default))


def write_json(path: Path, payload: Any) -> None:
  """Writes ``payload`` as indented JSON to ``path``, atomically."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=json_default))
  os.replace(tmp, path)


def read_json(path: Path) -> Any:
  """Reads a JSON file.

  Raises:
    ValueError: the file cannot be read or parsed (the message says to delete it to run its stage again).
  """
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise ValueError(f"{path} cannot be read ({err}); delete it to run its stage again") from err


def save_npz(path: Path, **arrays: np.ndarray) -> None:
  """Writes ``arrays`` as one ``.npz``, atomically."""
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **arrays)
  tmp.replace(path)


def load_npz(path: Path, decisions: list[str]) -> dict[str, np.ndarray]:
  """Reads a calibration ``.npz`` written for ``decisions`` (its ``decisions`` array must match).

  Raises:
    ValueError: the file is damaged, or was written for other decisions.
  """
  try:
    with np.load(path, allow_pickle=False) as f:
      out = {k: np.asarray(f[k]) for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a truncated archive is a BadZipFile
    raise ValueError(f"{path} cannot be read ({err}); delete {path.parent} to calibrate again") from err
  if [str(d) for d in out.get("decisions", [])] != decisions:
    raise ValueError(f"{path} was written for other decisions than this model's; delete {path.parent} to "
                     "calibrate again")
  return out
