"""Which choice of APIB drives its channels' one-shot quality: the sign, the output target, the bandwidth.

At equal (uniform) widths the pruning-quality study found HSIC Lasso's channels below L1's right after surgery when
little is removed and above them when much is. HSIC Lasso as APIB runs it makes three choices that could explain
that, and this benchmark changes one at a time, at uniform widths (so only the channels differ), on the pretrained
CIFAR-10 ResNet-56 (27 decisions: each block's middle channels, chosen against its second conv):

- the sign: the nonnegative Lasso (the paper's) against the signed one (``select.positive=False``, what the
  reference implementation runs);
- the output target ``Y``: the decision's conv output before BatchNorm (the program's default) against the block's
  output (after BN, the shortcut sum and the ReLU: what the next block sees);
- the bandwidth of the Gaussian kernels: APIB's ``gamma = 1 / values per sample`` against the median heuristic and
  pyHSICLasso's rule; and the normalised (Frobenius) problems.

Each row: the channels of every decision at the uniform widths of the ratio (``select_k`` fills past the Lasso's
support by marginal relevance, the program's default), cut, BatchNorm re-estimated on training images, top-1 on the
validation images; per calibration seed (the seed moves the 128 calibration images), mean and range. No fine-tune:
this measures the choice of channels alone. ``--quick``: ResNet-20, one ratio, one seed, three rows.

Usage::

  python -m benchmarks.apib_choices [--quick] [--seeds 0,1,2] [--ratios 0.3,0.55,0.7]
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import _common, plots
from benchmarks import pruning_quality as pq

NAME = "apib_choices"
SECTION = "## Which choice of APIB drives its channels (`python -m benchmarks.apib_choices`)"
PARAGRAPH = (
    "At uniform widths (only the channels differ), on the pretrained CIFAR-10 ResNet-56, one choice of HSIC Lasso "
    "changed at a time against the program's default (nonnegative Lasso, Y = the decision's conv output before "
    "BatchNorm, APIB's bandwidth); L1 norms are the reference criterion. Top-1 right after surgery with BatchNorm "
    "re-estimated, no fine-tune, on the validation images carved from the shared subset (seen in pre-training), "
    "mean (min-max) over calibration seeds.")


@dataclasses.dataclass(frozen=True)
class Choice:
  """One row: a criterion (``hsic_lasso`` or a baseline), ``select`` overrides and the output target."""
  label: str
  criterion: str = "hsic_lasso"
  select: dict[str, Any] = dataclasses.field(default_factory=dict)
  target: str = "pre_bn"  # "pre_bn": the decision's conv output; "block": the block's output

  def variant(self) -> pq.Variant:
    return pq.Variant(self.label, "uniform", self.criterion, select=dict(self.select))


CHOICES = (
    Choice("L1 norms (reference)", "l1"),
    Choice("HSIC Lasso (default: nonnegative, pre-BN target, APIB bandwidth)"),
    Choice("signed Lasso", select={"positive": False}),
    Choice("target: block output", target="block"),
    Choice("bandwidth: median heuristic", select={"bandwidth": "median"}),
    Choice("bandwidth: pyHSICLasso's rule", select={"bandwidth": "pyhsiclasso"}),
    Choice("normalised problems", select={"normalized": True}),
)
QUICK_CHOICES = (CHOICES[0], CHOICES[1], CHOICES[3])


def block_output_capture(model: Any, bn_mode: str):
  """A jitted ``images -> {decision: (x (n, c, h*w), y (n, values))}`` for the zoo's CIFAR ResNets, where ``x`` is
  the decision's conv input (as the program's taps) and ``y`` the output of the decision's block."""
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  split = train_lib.split_model(model)
  graphdef = split.train_def if bn_mode == "batch" else split.eval_def

  @jax.jit
  def capture(params, stats, images):
    m = train_lib.merge(graphdef, params, stats)
    h = jax.nn.relu(m.stem(images))
    out = {}
    for s in (1, 2, 3):
      stage = getattr(m, f"stage{s}")
      for j in range(stage.num_blocks):
        block = getattr(stage, f"block{j}")
        inner = jax.nn.relu(block.bn1(block.conv1(h)))
        h = block(h)
        n, hh, ww, c = inner.shape
        out[f"stage{s}/block{j}/conv2"] = (jnp.transpose(inner.reshape(n, hh * ww, c), (0, 2, 1)), h.reshape(n, -1))
    return out

  return lambda images: capture(split.params, split.batch_stats, images)


def block_output_problems(model: Any, images: np.ndarray, cfg: ml_collections.ConfigDict) -> list[Any]:
  """The decisions' problems against their blocks' outputs, batch by batch and summed, as the program builds them."""
  import hsic_jax as hj  # pylint: disable=import-outside-toplevel
  from train import calibrate  # pylint: disable=import-outside-toplevel
  decisions = [d for d, _ in calibrate.decision_groups(model)]
  capture = block_output_capture(model, cfg.calib.bn_mode)
  bs = int(cfg.calib.batch_size)
  per: dict[str, list[Any]] = {d: [] for d in decisions}
  for s in range(0, len(images), bs):
    feats = capture(jnp.asarray(images[s:s + bs]))
    for d, p in zip(decisions, calibrate.problems_from_taps(feats, decisions, cfg.select)):
      per[d].append(p)
  return [ps[0] if len(ps) == 1 else hj.combine_problems(ps) for ps in per.values()]


def measure(choice: Choice, cfg: ml_collections.ConfigDict, dense: Any, pairs: Sequence[Any], target_macs: float,
            mesh: Any, dense_acc: float) -> dict[str, Any]:
  """One (seed, ratio, choice): its evidence from the seed's calibration images, then cut and measured."""
  from train import data  # pylint: disable=import-outside-toplevel
  v = choice.variant()
  images, labels, _ = data.calibration_batch(cfg.data, int(cfg.calib.num_images), seed=int(cfg.calib.seed))
  sel_cfg = v.select_config(cfg.select)
  t0 = time.perf_counter()
  if choice.criterion == "hsic_lasso" and choice.target == "block":
    ev = pq.Evidence(block_output_problems(dense, images, _with_select(cfg, sel_cfg)), None, {}, {})
  else:
    ev = pq.gather_evidence(dense, cfg, images, labels, [] if choice.criterion == "hsic_lasso" else [choice.criterion],
                            problems=choice.criterion == "hsic_lasso", similarity=False, select=sel_cfg)
  ev.seconds.setdefault("hsic_lasso", time.perf_counter() - t0)
  row = pq.prune_and_measure(v, cfg, dense, ev, target_macs, 0, mesh, pairs, dense_acc)
  return {k: row[k] for k in ("label", "macs", "widths", "keep", "top1_raw", "top1_after_surgery")} | {
      "target": choice.target, "select": choice.select, "criterion": choice.criterion}


def _with_select(cfg: ml_collections.ConfigDict, sel: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.select = sel
  return out


def run(shared: pathlib.Path, network: str, ratios: Sequence[float], seeds: Sequence[int], data_dir: str,
        choices: Sequence[Choice], progress_path: pathlib.Path) -> dict[str, Any]:
  from train import data, loops  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  pre = pq.pretrained(network, shared, data_dir)
  cfg, mesh, dense, pairs, dense_macs = pre.cfg, pre.mesh, pre.dense, pre.pairs, pre.dense_macs
  prog = pq.Progress(progress_path, {"mode": NAME, "model": network,
                                     "calibration_images": int(cfg.calib.num_images)})
  setup = prog.get("setup", lambda: {"dense_top1": loops.evaluate_model(cfg, dense, mesh)["top1"],
                                     "dense_macs": dense_macs,
                                     "eval_examples": data.num_examples(cfg.data, cfg.data.eval_split)})
  rows = []
  for seed in seeds:
    scfg = pq.seeded_config(cfg, seed)
    for r in ratios:
      for ch in choices:
        print(f"seed {seed}, {100 * r:.0f}% removed: {ch.label}", flush=True)
        rows.append(prog.get(f"seed {seed} removed {r} {ch.label}", lambda: {
            "seed": int(seed), "removed": float(r),
            **measure(ch, scfg, dense, pairs, (1 - r) * dense_macs, mesh, setup["dense_top1"])}))
  return {"network": network, "ratios": list(ratios), "seeds": list(seeds), **setup,
          "calibration_images": int(cfg.calib.num_images), "rows": rows, "summary": summarise(rows),
          "seconds": prog.total_seconds(time.perf_counter() - t_start)}


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (choice, ratio): the spread of the after-surgery top-1 over seeds, and the mean Jaccard overlap of its
  channels with the default HSIC Lasso row's at the same seed and ratio."""
  default = CHOICES[1].label
  by = {(r["label"], r["removed"], r["seed"]): r for r in rows}
  out = []
  for label in dict.fromkeys(r["label"] for r in rows):
    for ratio in dict.fromkeys(r["removed"] for r in rows):
      rs = [r for r in rows if r["label"] == label and r["removed"] == ratio]
      if not rs:
        continue
      overlap = [np.mean([pq.jaccard(a, b) for a, b in zip(r["keep"], by[(default, ratio, r["seed"])]["keep"])])
                 for r in rs if (default, ratio, r["seed"]) in by]
      out.append({"label": label, "removed": ratio, "top1": pq.spread([r["top1_after_surgery"] for r in rs]),
                  "overlap_with_default": float(np.mean(overlap)) if overlap else None})
  return out


def table(payload: dict[str, Any]) -> str:
  ratios = payload["ratios"]
  cells: dict[str, dict[float, dict[str, Any]]] = {}
  for s in payload["summary"]:
    cells.setdefault(s["label"], {})[s["removed"]] = s

  def cell(s: dict[str, Any] | None) -> str:
    if s is None:
      return "-"
    t = s["top1"]
    spread = f" ({100 * t['min']:.1f}-{100 * t['max']:.1f})" if t["n"] > 1 else ""
    ov = "" if s["overlap_with_default"] is None else f"; J {s['overlap_with_default']:.2f}"
    return f"{100 * t['mean']:.2f}{spread}{ov}"

  return _common.markdown_table(["choice"] + [f"{100 * r:.0f}% removed: top-1 %; J = Jaccard with default"
                                              for r in ratios],
                                [[label] + [cell(by.get(r)) for r in ratios] for label, by in cells.items()])


def plot(payload: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
  plt = plots.pyplot()
  if plt is None:
    return []
  fig, ax = plt.subplots(figsize=(9, 4.2))
  labels = list(dict.fromkeys(s["label"] for s in payload["summary"]))
  ratios = payload["ratios"]
  width = 0.8 / max(len(labels), 1)
  for i, label in enumerate(labels):
    ss = {s["removed"]: s["top1"] for s in payload["summary"] if s["label"] == label}
    xs = [k + (i - (len(labels) - 1) / 2) * width for k, r in enumerate(ratios) if r in ss]
    ys = [100 * ss[r]["mean"] for r in ratios if r in ss]
    lo = [100 * (ss[r]["mean"] - ss[r]["min"]) for r in ratios if r in ss]
    hi = [100 * (ss[r]["max"] - ss[r]["mean"]) for r in ratios if r in ss]
    ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=f"C{i}", label=label)
  ax.set_xticks(range(len(ratios)), [f"{100 * r:.0f}% of MACs removed" for r in ratios])
  ax.set_ylabel("top-1 after surgery, BN re-estimated (%)")
  ax.legend(fontsize=7)
  ax.set_title(f"{payload['network']}, uniform widths: one choice of HSIC Lasso at a time (no fine-tune)", fontsize=9)
  fig.tight_layout()
  p = out_dir / f"{NAME}.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  return [p]


def render_readme(payload: dict[str, Any]) -> None:
  _common.ensure_section(NAME, SECTION, PARAGRAPH)
  m = payload["machine"]
  text = "\n".join([
      f"Run {m['date']} on {m['cpu_count']} CPU cores ({m['device']}), jax {m['jax']}: {payload['network']}, "
      f"{payload['calibration_images']} calibration images, seeds {payload['seeds']}, "
      f"{len(payload['rows'])} rows in {payload['seconds'] / 60:.1f} min. Dense top-1 "
      f"{100 * payload['dense_top1']:.2f}% on {payload['eval_examples']} validation images.", "",
      table(payload), "", f"![one choice at a time](results/{NAME}.png)"])
  _common.update_readme(NAME, text)


def _floats(text: str) -> list[float]:
  return [float(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, ("quick", "out", "no-readme"), help={
      "quick": "ResNet-20, one ratio, one seed, three rows (CI-sized)"})
  parser.add_argument("--shared", type=pathlib.Path, default=pq.SHARED, help="shared data and weights folder")
  parser.add_argument("--data-dir", default=None, help="where the CIFAR-10 folder is prepared as a TFDS data set")
  parser.add_argument("--seeds", type=pq.seed_list, default=None, help="calibration seeds, e.g. 0,1,2")
  parser.add_argument("--ratios", type=_floats, default=None, help="fractions of the MACs removed, e.g. 0.3,0.55")
  parser.add_argument("--progress", type=pathlib.Path, default=None, help="resume file (default: under runs/)")
  args = parser.parse_args(argv)
  if not args.shared.is_dir():
    raise SystemExit(f"the shared folder {args.shared} (pretrained weights and CIFAR-10 images) is needed; "
                     "pass --shared DIR")
  quick = args.quick
  ratios = args.ratios or ([0.3] if quick else [0.3, 0.55, 0.7])
  if any(not 0 < r < 1 for r in ratios):
    parser.error(f"--ratios={ratios}: each must be in (0, 1)")
  seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
  out = args.out if args.out is not None else (pathlib.Path(tempfile.mkdtemp(prefix=f"{NAME}_")) if quick else None)
  progress = args.progress or ((out / "progress.jsonl") if quick else pathlib.Path("runs") / NAME / "progress.jsonl")
  payload = {"machine": _common.machine(), **run(
      args.shared, "resnet20" if quick else "resnet56", ratios, seeds, args.data_dir or "~/tensorflow_datasets",
      QUICK_CHOICES if quick else CHOICES, progress)}
  print(table(payload))
  print(f"wrote {_common.write_results(NAME, {k: v for k, v in payload.items() if k != 'machine'}, out)}")
  for p in plot(payload, _common.RESULTS if out is None else out):
    print(f"wrote {p}")
  if not args.no_readme and not quick and out is None:
    render_readme(payload)
    print(f"updated {_common.README}")


if __name__ == "__main__":
  main()
