"""Evaluates any model checkpoint (a run's workdir or a checkpoint directory) on a data split.

  python -m train.evaluate --config=resnet56_apib --checkpoint=runs/r56 [--split=validation]

The config gives the data (``--config.data.*`` overrides apply) and the evaluation batch size; the checkpoint gives
the model and its widths (a workdir's newest model, :func:`train.workdir.model_checkpoint`, loaded by
:func:`models.load_pruned`), run in the config's precision (``half_precision``), as the program trained it.
Prints top-1, top-5 and the mean loss as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from train import config_lib

# Flags of their own (not absl's global FLAGS): the program and train.evaluate can live in one process.
_FLAGS = flags.FlagValues()

_CONFIG = config_flags.DEFINE_config_file("config", None, "config whose data section to use", lock_config=True,
                                          flag_values=_FLAGS)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a run workdir or a model checkpoint directory",
                                  flag_values=_FLAGS)
_SPLIT = flags.DEFINE_string("split", None, "data split (default: the config's data.eval_split)",
                             flag_values=_FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  parsed = config_lib.parse_flags(sys.argv if argv is None else argv, _FLAGS, _CONFIG,
                                  required={"checkpoint": "a run workdir or a checkpoint directory"})
  if parsed is None:
    return 2
  config, _ = parsed
  import models  # pylint: disable=import-outside-toplevel
  from models import checkpoint  # pylint: disable=import-outside-toplevel
  from train import data, loops, train as train_lib, workdir  # pylint: disable=import-outside-toplevel
  split = _SPLIT.value or config.data.eval_split
  try:
    data.prepare(config.data)
    path = workdir.model_checkpoint(_CHECKPOINT.value)
    model = models.set_compute_dtype(models.load_pruned(path), train_lib.compute_dtype(config.half_precision))
    meta = checkpoint.read_meta(path)
    result = loops.evaluate_model(config, model, train_lib.make_mesh(), split=split, desc=f"eval {split}")
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(json.dumps({"checkpoint": _CHECKPOINT.value, "model": meta["model"], "widths": meta["widths"],
                    **({"kwargs": meta["kwargs"]} if "kwargs" in meta else {}), "split": split, **result}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
