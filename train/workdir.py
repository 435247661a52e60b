"""Where a run of the program keeps its models: the workdir layout, for readers of a run.

The program (:mod:`train.pipeline`) writes each model as a model checkpoint (:mod:`models.checkpoint`) in its own
sub-directory of the workdir: ``dense/`` (the model it started from), ``pruned/`` (right after surgery, with the
plan in its meta) and ``final/`` (fine-tuned, with the plan). :func:`model_checkpoint` names the newest, e.g.
``models.load_pruned(workdir.model_checkpoint("runs/digits_apib"))`` is the fine-tuned pruned model.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_DIRS = ("final", "pruned", "dense")
"""The workdir's model checkpoints, newest first."""


def _is_checkpoint(path: Path) -> bool:
  return (path / "_CHECKPOINT_METADATA").exists() or (path / "meta").exists()


def model_checkpoint(path: str | os.PathLike[str]) -> Path:
  """The newest model checkpoint of a run's workdir: ``final/`` (fine-tuned), else ``pruned/``, else ``dense/``.

  Args:
    path: a run's workdir, or a checkpoint directory (returned as it is, so that a command can take either).

  Raises:
    FileNotFoundError: ``path`` does not exist.
  """
  root = Path(path)
  for sub in MODEL_DIRS:
    if _is_checkpoint(root / sub):
      return root / sub
  if not root.exists():
    raise FileNotFoundError(f"{root} does not exist; expected a run workdir or a model checkpoint directory")
  return root
