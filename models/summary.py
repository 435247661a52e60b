"""Per-layer MACs/params table of a registry model, for any widths.

Usage::

  python -m models.summary --model resnet56
  python -m models.summary --model resnet20 --widths 16,8,16,16,16,16,16,32,32,32,32,32,32,64,64,64,64,64,64
  python -m models.summary --model resnet50 --json > resnet50.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from flax import nnx

import models
from models import flops


def _fmt_hw(hw: tuple[int, int] | None) -> str:
  return "-" if hw is None else f"{hw[0]}x{hw[1]}"


def _dense_count(count: flops.Count) -> flops.Count | None:
  """The dense model of ``count``'s registry model, class count and input size (None for a model not in it)."""
  if count.model not in models.MODELS:
    return None
  if count.input_hw is None or tuple(count.input_hw) == tuple(models.input_size(count.model)):
    return flops.count(count.model, num_classes=count.num_classes)
  dense = nnx.eval_shape(lambda: models.get_model(count.model, num_classes=count.num_classes, rngs=nnx.Rngs(0)))
  return flops.count_model(dense, count.input_hw, name=count.model)


def format_table(count: flops.Count) -> str:
  """Renders a :class:`models.flops.Count` as a fixed-width text table with totals, compared with the dense model
  of the same class count and input size (``count.num_classes``, ``count.input_hw``)."""
  header = ("layer", "kind", "in", "out", "kernel", "out HxW", "MACs", "params")
  rows = [(r.name, r.kind, str(r.in_ch), str(r.out_ch), _fmt_hw(r.kernel), _fmt_hw(r.out_hw), f"{r.macs:,}",
           f"{r.params:,}") for r in count.layers]
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
  right = {2, 3, 6, 7}

  def line(cells: Sequence[str]) -> str:
    return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

  out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
  dense = _dense_count(count)
  out.append("")
  out.append(f"model {count.model}: {count.macs:,} MACs ({count.macs / 1e6:.2f}M), "
             f"{count.params:,} params ({count.params / 1e6:.3f}M)")
  if dense is not None and tuple(dense.widths) != tuple(count.widths):
    out.append(f"vs dense: {count.macs / dense.macs:.4f} of MACs, {count.params / dense.params:.4f} of params")
  return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help=f"one of {sorted(models.MODELS)}")
  parser.add_argument("--widths", default=None, help="comma-separated width list (default: dense)")
  parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default per model)")
  parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
  args = parser.parse_args(argv)
  try:
    widths = None if args.widths is None else [int(w) for w in args.widths.replace(" ", "").split(",") if w]
  except ValueError:
    parser.error(f"--widths must be comma-separated integers, got {args.widths!r}")
  try:
    count = flops.count(args.model, widths, num_classes=args.num_classes)
  except ValueError as e:
    parser.error(str(e))
  if args.json:
    json.dump(count.to_dict(), sys.stdout, indent=1)
    sys.stdout.write("\n")
  else:
    print(format_table(count))
  return 0


if __name__ == "__main__":
  sys.exit(main())
