"""Pruning quality: APIB, ITPruner, the combined mode and the baseline criteria, on a real pretrained network.

``python -m benchmarks.pruning_quality [--quick] [--no-readme] [--out DIR] [--shared DIR] [--finetune-steps N]``
``python -m benchmarks.pruning_quality --study [--epochs E] [--seeds 0,1,2] [--network resnet20] [--methods A,B]``
``python -m benchmarks.pruning_quality --stability [--network resnet20]``
(``--render`` rewrites the README block and the plots from the saved JSON.)

On the pretrained CIFAR-10 ResNet-56 (``../shared/weights``) and the real CIFAR-10 images of ``../shared/data``
(validation: the last 10% of each batch file, as the program's ``cifar10_folder`` carves it; the network was
trained on all of CIFAR-10's training images, so its accuracy there is agreement with itself, not generalisation),
every method prunes the same dense model with the same calibration images (128 training images, BatchNorm with
batch statistics, as ``resnet56_apib``) to 30%, 55% and 70% of its MACs removed, through the program's own code
(``train.pipeline.select_channels``, ``prune_model``):

- **APIB**: one global HSIC Lasso penalty searched to the target; its own support;
- **ITPruner**: importances from linear CKA between the layers (beta 500), widths by the reference's SLSQP repaired
  to the budget (``select.itpruner.solver="reference"``), channels by L1 norm (the reference's fill);
- **ITPruner (exact optimum)**: the same objective solved to optimality (``select.itpruner.solver="search"``);
- **ITPruner + HSIC Lasso** (the combined mode): ITPruner's widths, channels by ``hsic_jax.select_k`` per layer;
- **uniform + criterion**: the same kept fraction in every layer (searched to the target), channels by HSIC Lasso
  or by each baseline criterion of ``hsic_jax.criteria`` (random, L1, L2, FPGM, BN scale, Taylor, HRank, CHIP): at
  equal widths, only the choice of channels differs.

For each: top-1 on the validation images right after surgery (BatchNorm statistics re-estimated on 20 training
batches) and after the same short fine-tune (``--finetune-steps`` steps of SGD at batch 64, lr 0.01 cosine,
distilled from the dense model, as the README's short ResNet-56 run), and the selection time (the evidence the
method needs from the calibration images, plus the allocation). Then:

- **overlap** at 55%: the Jaccard index of the channels two criteria keep at equal (uniform) widths, averaged over
  layers;
- **stability**: HSIC Lasso's kept channels (uniform widths at 55%) as the number of calibration images grows from
  32 to 512, as the Jaccard index with the 512-image selection;
- **selection time on ResNet-50** for every criterion (randomly initialised weights, as no ImageNet weights are
  available offline; 64 CIFAR-10 images resized to 224x224; widths at 37.9% of the dense MACs), next to the APIB
  paper's table (on a GPU): L1 7 s, FPGM 8 s, APIB 63 s, HRank 9,112 s, CHIP 545,618 s.

The peer of each row is the L1-norm criterion at the same widths, in the same run: accuracy differences and time
ratios are against it.

**The study at a real fine-tuning budget** (``--study``, implied by ``--epochs`` or ``--seeds``; ``--network``
resnet20 by default, resnet56 allowed): one ratio (50% of the MACs removed); for each seed of ``--seeds`` (default
0,1,2; the seed moves the calibration images, the training data order and the random criterion) and each method of
:func:`study_variants` (APIB and its ``select`` variants, ITPruner, ITPruner + HSIC Lasso, uniform L1, FPGM and
random), the top-1 right after surgery (BN re-estimated) and after ``--epochs`` (default 10) epochs over the
training images of the same distilled recipe at ``--lr`` (default 0.01: the reference's 0.1 belongs to a 135-epoch
schedule and, cut short, leaves the network below where surgery left it), plus widths, kept channels and selection
time. A variant whose kept channels equal an earlier row's under the same seed reuses that row's accuracies (same
model, same seed: same training) and says so. Per method: mean, standard deviation, min and max over seeds; a pair
of methods "differs beyond the spread" when their ranges do not overlap. Its own results
(``results/pruning_quality_study.json``), plot, README block and progress file
(``results/pruning_quality_study_progress.jsonl``, committed: hours of fine-tuning; one part per (seed, method), so
that a killed run resumes and a new variant or seed is just computed);
``--study --render`` renders whatever parts the progress file holds.

**How many calibration images** (``--stability``): APIB, APIB on normalised problems, ITPruner and ITPruner + HSIC
Lasso select at 50% removed from n = 32 ... 2048 calibration images (seed 0); each selection is compared with the
same method's at the largest n (widths: sum(min)/sum(max); channels: mean Jaccard over layers), and ``stable_from``
is the smallest n from which both stay >= 0.9 (``results/pruning_quality_calibration.json``, one resumable part
per n).

``--quick`` (CI-sized; the fallback when the shared folder is missing is to stop with a message): the pretrained
ResNet-20 instead of ResNet-56, one ratio (55%), a few methods, two fine-tuning steps, a short stability curve and
no ResNet-50 section; its results go to ``--out`` or a temporary folder, never over the committed ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

NAME = "pruning_quality"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CRITERIA = ("random", "l1", "l2", "fpgm", "bn_scale", "taylor", "hrank", "chip")
RATIOS_REMOVED = (0.30, 0.55, 0.70)
STABILITY_N = (32, 64, 128, 256, 512)
# The APIB paper's pruning-time table (ResNet-50, 76% sparsity, on a GPU), seconds.
PAPER_SECONDS = {"l1": 7.0, "fpgm": 8.0, "hsic_lasso": 63.0, "hrank": 9112.0, "chip": 545618.0}
SECTION = "## Pruning quality (`python -m benchmarks.pruning_quality`)"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the study: a selection method, its channel criterion and any other ``select`` settings.

  ``select`` holds config overrides under ``cfg.select`` by dotted key (``{"normalized": True}``,
  ``{"itpruner.beta": 100.0}``), so that a variant of a method is a new row, not new code.
  """
  label: str
  method: str      # select.method
  criterion: str   # select.criterion
  solver: str = "reference"  # select.itpruner.solver
  select: dict[str, Any] = dataclasses.field(default_factory=dict)

  def select_config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the ``select`` config ``base`` with this variant's method, criterion, solver and overrides."""
    out = ml_collections.ConfigDict(base.to_dict())
    out.method, out.criterion = self.method, self.criterion
    out.itpruner.solver = self.solver
    for key, value in self.select.items():
      *path, leaf = key.split(".")
      node = out
      for part in path:
        node = node[part]
      if leaf not in node:
        raise ValueError(f"Variant {self.label!r}: select override {key!r} names no setting of cfg.select")
      node[leaf] = value
    return out


def variants(quick: bool) -> list[Variant]:
  out = [Variant("APIB", "apib", "hsic_lasso"), Variant("ITPruner", "itpruner", "l1"),
         Variant("ITPruner (exact optimum)", "itpruner", "l1", "search"),
         Variant("ITPruner + HSIC Lasso", "itpruner", "hsic_lasso"),
         Variant("uniform + HSIC Lasso", "uniform", "hsic_lasso")]
  crits = ("l1", "fpgm", "chip") if quick else CRITERIA
  return out + [Variant(f"uniform + {c}", "uniform", c) for c in crits]


def study_variants() -> list[Variant]:
  """The methods of the study at a real fine-tuning budget: the paper's methods, the uniform baselines,
  and APIB's variants, each a ``select`` override (a new one is a new row that a resumed run computes)."""
  return [Variant("APIB", "apib", "hsic_lasso"),
          Variant("APIB (normalised problems)", "apib", "hsic_lasso", select={"normalized": True}),
          Variant("APIB (signed Lasso)", "apib", "hsic_lasso", select={"positive": False}),
          Variant("APIB (cost-aware MACs penalty)", "apib", "hsic_lasso", select={"cost_aware": "macs"}),
          Variant("APIB (floor 10% of each width)", "apib", "hsic_lasso", select={"omega": 0.1}),
          Variant("ITPruner", "itpruner", "l1"),
          Variant("ITPruner + HSIC Lasso", "itpruner", "hsic_lasso"),
          Variant("ITPruner + HSIC Lasso (residual fill)", "itpruner", "hsic_lasso", select={"fill": "residual"}),
          Variant("uniform + l1", "uniform", "l1"),
          Variant("uniform + fpgm", "uniform", "fpgm"),
          Variant("uniform + random", "uniform", "random")]


# ------------------------------------------------------------------------------------------------------------------
# Set-up: the program's config, data, dense model and calibration evidence.


def study_config(model: str, shared: pathlib.Path, data_dir: str) -> ml_collections.ConfigDict:
  from train import config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load(f"{model}_apib")
  cfg.data.source_dir = str(shared / "data" / "cifar10-subset" / "cifar-10-batches-bin")
  cfg.data.data_dir = data_dir
  cfg.dense.path = str(shared / "weights" / f"{model}_cifar10.npz")
  cfg.select.round_to = 1
  cfg.select.itpruner.beta = 500.0 if model == "resnet56" else 246.0
  return cfg


@dataclasses.dataclass
class Evidence:
  problems: list[Any]
  similarity: np.ndarray
  scores: dict[str, list[np.ndarray]]
  seconds: dict[str, float]  # per kind of evidence: "problems", "similarity", each criterion


@dataclasses.dataclass
class Pretrained:
  """What every study on a shared pretrained network starts from: its config, devices, dense model, decisions and
  their cost function."""
  cfg: ml_collections.ConfigDict
  mesh: Any
  dense: Any
  pairs: list[Any]
  cost: Any
  dense_macs: float


def pretrained(network: str, shared: pathlib.Path, data_dir: str) -> Pretrained:
  """The shared pretrained ``network`` imported, its data prepared, on this host's devices."""
  import hsic_jax as hj  # pylint: disable=import-outside-toplevel
  from models import import_torch  # pylint: disable=import-outside-toplevel
  from train import calibrate, data, pipeline, train as train_lib  # pylint: disable=import-outside-toplevel
  cfg = study_config(network, shared, data_dir)
  if jax.default_backend() == "cpu":
    hj.limit_lapack_threads()
  data.prepare(cfg.data)
  dense = import_torch.import_torch_state(network, import_torch.load_npz(cfg.dense.path))
  pairs = calibrate.decision_groups(dense)
  cost = pipeline.selection_budget(cfg, dense).cost
  return Pretrained(cfg, train_lib.make_mesh(), dense, pairs, cost, cost([g.size for _, g in pairs])["macs"])


def gather_evidence(model: Any, cfg: ml_collections.ConfigDict, images: np.ndarray, labels: np.ndarray,
                    criteria_names: Sequence[str], *, problems: bool = True, similarity: bool = True,
                    select: ml_collections.ConfigDict | None = None) -> Evidence:
  """The calibration evidence: HSIC Lasso problems (built under ``select``, default ``cfg.select``), ITPruner's layer
  similarity and each criterion's scores; ``problems``/``similarity`` False skip those (a variant that needs none)."""
  from train import calibrate  # pylint: disable=import-outside-toplevel
  seconds = {}
  probs, sim = None, None
  if problems:
    t0 = time.perf_counter()
    _, probs = calibrate.build_problems(model, images, cfg.calib, cfg.select if select is None else select)
    jax.block_until_ready(probs)
    seconds["hsic_lasso"] = time.perf_counter() - t0
  if similarity:
    t0 = time.perf_counter()
    sim = calibrate.layer_similarity(calibrate.activations(model, images, cfg.calib), "linear")
    seconds["similarity"] = time.perf_counter() - t0
  scores = {}
  for c in criteria_names:
    t0 = time.perf_counter()
    scores[c] = calibrate.criterion_scores(model, c, images, labels, cfg.calib, seed=int(cfg.seed))
    seconds[c] = time.perf_counter() - t0
    print(f"  scores {c}: {seconds[c]:.1f} s", flush=True)
  return Evidence(probs, sim, scores, seconds)


# ------------------------------------------------------------------------------------------------------------------
# One pruned model: select, cut, evaluate, fine-tune briefly, evaluate.


def _eval(cfg: ml_collections.ConfigDict, model: Any, mesh: Any) -> float:
  from train import loops  # pylint: disable=import-outside-toplevel
  return loops.evaluate_model(cfg, model, mesh)["top1"]


def _recalibrated(cfg: ml_collections.ConfigDict, model: Any, mesh: Any) -> Any:
  from train import loops  # pylint: disable=import-outside-toplevel
  return loops.recalibrated(cfg, model, mesh, batch_size=64)


def _finetune(cfg: ml_collections.ConfigDict, model: Any, teacher: Any, steps: int, mesh: Any, *, epochs: int = 1,
              lr: float = 0.01) -> Any:
  """``epochs`` epochs of ``steps`` steps each: SGD at batch 64, cosine from ``lr`` to 0, distilled from ``teacher``
  (weight 0.5); the final model is the last step's (no checkpoint is chosen on the evaluation images)."""
  from train import loops, train as train_lib  # pylint: disable=import-outside-toplevel
  from train.configs.base import apib_recipe  # pylint: disable=import-outside-toplevel
  recipe = apib_recipe(epochs=epochs, lr=lr)
  recipe.batch_size = 64
  recipe.distill_weight = 0.5
  recipe.checkpoint_every_steps = 10 ** 9
  recipe.log_every_steps = 10 ** 9
  with tempfile.TemporaryDirectory(prefix="pq_ft_") as tmp:
    loop = loops.make_loop(cfg, recipe, tmp, mesh=mesh, desc="finetune", evaluate=False,
                           steps_per_epoch=steps)
    tuned, _ = train_lib.train_and_evaluate(model, recipe, loop, mesh, seed=int(cfg.seed), teacher=teacher)
  return tuned


def prune_and_measure(v: Variant, cfg: ml_collections.ConfigDict, dense: Any, ev: Evidence, target: float,
                      finetune_steps: int, mesh: Any, pairs: Sequence[Any], dense_acc: float, *,
                      finetune_epochs: int = 1, lr: float = 0.01,
                      twin: Any = None) -> dict[str, Any]:
  """Selects ``v``'s channels to ``target`` MACs, cuts, evaluates after surgery (BN re-estimated), fine-tunes for
  ``finetune_epochs`` epochs of ``finetune_steps`` steps and evaluates again.

  ``twin(keep)``, when given, returns an already measured row whose kept channels are exactly ``keep`` (or None):
  the same pruned model under the same seed trains to the same numbers, so its accuracies are reused and the row
  says so (``same_selection_as``) instead of repeating the fine-tune.
  """
  from train import network, pipeline  # pylint: disable=import-outside-toplevel
  sel_cfg = v.select_config(cfg.select)
  cost = pipeline.selection_budget(cfg, dense).cost
  scores = ev.scores.get(v.criterion)
  sel = pipeline.select_channels(sel_cfg, [g.size for _, g in pairs], cost, "macs", target, multiple=1,
                                 problems=ev.problems, similarity=ev.similarity, scores=scores, seed=int(cfg.seed))
  evidence_s = ev.seconds.get(v.criterion, 0.0) + (ev.seconds["hsic_lasso"] if v.method == "apib" and
                                                    v.criterion != "hsic_lasso" else 0.0)
  if v.method == "itpruner":
    evidence_s += ev.seconds["similarity"]
  costs = cost(sel.widths)
  base = {"label": v.label, "method": v.method, "criterion": v.criterion, "solver": v.solver, "select": v.select,
          "macs": costs["macs"], "params": costs["params"], "widths": sel.widths,
          "keep": [k.tolist() for k in sel.keep],
          "select_seconds": evidence_s + sel.seconds, "evidence_seconds": evidence_s,
          "allocation_seconds": sel.seconds, "dense_top1": dense_acc}
  same = twin(base["keep"]) if twin is not None else None
  if same is not None:
    print(f"    {v.label:<24} keeps exactly the channels of {same['label']}: its accuracies reused", flush=True)
    return {**base, **{k: same[k] for k in ("top1_raw", "top1_after_surgery", "top1_finetuned")},
            "finetune_seconds": 0.0, "same_selection_as": same["label"]}
  pruned, _ = network.Network.from_config(cfg).thin(dense, {g.name: k for (_, g), k in zip(pairs, sel.keep)})
  raw = _eval(cfg, pruned, mesh)
  recal = _recalibrated(cfg, pruned, mesh)
  after_surgery = _eval(cfg, recal, mesh)
  t0 = time.perf_counter()
  tuned = _finetune(cfg, recal, dense, finetune_steps, mesh, epochs=finetune_epochs, lr=lr) if finetune_steps > 0 \
      else recal
  final = _eval(cfg, tuned, mesh) if finetune_steps > 0 else after_surgery
  finetune_s = time.perf_counter() - t0
  row = {**base, "top1_raw": raw, "top1_after_surgery": after_surgery, "top1_finetuned": final,
         "finetune_seconds": finetune_s}
  print(f"    {v.label:<24} {costs['macs'] / 1e6:7.2f}M MACs  surgery {after_surgery:.4f} (raw {raw:.4f})  "
        f"fine-tuned {final:.4f}  select {row['select_seconds']:.1f} s", flush=True)
  return row


# ------------------------------------------------------------------------------------------------------------------
# Overlap and stability.


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
  sa, sb = set(int(i) for i in a), set(int(i) for i in b)
  return len(sa & sb) / max(1, len(sa | sb))


def overlap_matrix(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[float]]]:
  """Mean over layers of the Jaccard index of kept channels, between the uniform-width rows (equal widths)."""
  uni = [r for r in rows if r["method"] == "uniform"]
  names = [r["criterion"] for r in uni]
  mat = [[float(np.mean([jaccard(ka, kb) for ka, kb in zip(ra["keep"], rb["keep"])])) for rb in uni] for ra in uni]
  return names, mat


def stability(model: Any, cfg: ml_collections.ConfigDict, pairs: Sequence[Any], widths: Sequence[int],
              ns: Sequence[int]) -> list[dict[str, Any]]:
  """HSIC Lasso's kept channels at fixed ``widths`` from ``n`` calibration images, against the largest ``n``."""
  import hsic_jax as hj  # pylint: disable=import-outside-toplevel
  from train import calibrate, data  # pylint: disable=import-outside-toplevel
  keeps = {}
  for n in ns:
    images, _, _ = data.calibration_batch(cfg.data, n, seed=int(cfg.calib.seed))
    c = ml_collections.ConfigDict(cfg.calib.to_dict())
    c.batch_size = min(n, 128)
    t0 = time.perf_counter()
    _, problems = calibrate.build_problems(model, images, c, cfg.select)
    keeps[n] = hj.methods.lasso_keep(problems, list(widths), positive=bool(cfg.select.positive))
    print(f"  stability n={n}: {time.perf_counter() - t0:.1f} s", flush=True)
  ref = keeps[max(ns)]
  return [{"n": n, "jaccard_vs_largest": float(np.mean([jaccard(a, b) for a, b in zip(keeps[n], ref)])),
           "jaccard_vs_previous": (float(np.mean([jaccard(a, b) for a, b in zip(keeps[n], keeps[ns[i - 1]])]))
                                   if i else None)} for i, n in enumerate(ns)]


# ------------------------------------------------------------------------------------------------------------------
# Selection time on ResNet-50.


def resnet50_times(shared: pathlib.Path, criteria_names: Sequence[str]) -> list[dict[str, Any]]:
  """Seconds to select ResNet-50's channels at 37.9% of its MACs, per criterion (uniform widths) and for APIB and
  ITPruner, each from a cold start of its evidence (compilation included: a user's first run)."""
  import models  # pylint: disable=import-outside-toplevel
  from models import cifar10  # pylint: disable=import-outside-toplevel
  from train import calibrate, pipeline  # pylint: disable=import-outside-toplevel
  from train.configs import resnet50_apib  # pylint: disable=import-outside-toplevel
  cfg = resnet50_apib.get_config()
  cfg.select.round_to = 1
  cfg.select.itpruner.beta = 2000.0
  model = models.random_model("resnet50")
  images, labels = cifar10.load_split(shared / "data" / "cifar10-subset" / "cifar-10-batches-bin")
  idx = np.random.default_rng(0).permutation(len(images))[:64]
  small = cifar10.normalize(images[idx])
  big = np.asarray(jax.image.resize(jnp.asarray(small), (64, 224, 224, 3), "bilinear"))
  labels = np.asarray(labels[idx]) % 1000
  pairs = calibrate.decision_groups(model)
  cost = pipeline.selection_budget(cfg, model).cost
  target = 0.379 * cost([g.size for _, g in pairs])["macs"]
  sizes = [g.size for _, g in pairs]
  out = []
  for name in ["hsic_lasso", "itpruner"] + list(criteria_names):
    sel_cfg = ml_collections.ConfigDict(cfg.select.to_dict())
    t0 = time.perf_counter()
    if name == "hsic_lasso":
      _, problems = calibrate.build_problems(model, big, cfg.calib, cfg.select)
      sel_cfg.method, sel_cfg.criterion = "apib", "hsic_lasso"
      sel = pipeline.select_channels(sel_cfg, sizes, cost, "macs", target, multiple=1, problems=problems)
    elif name == "itpruner":
      sim = calibrate.layer_similarity(calibrate.activations(model, big, cfg.calib), "linear")
      sel_cfg.method, sel_cfg.criterion = "itpruner", "l1"
      scores = calibrate.criterion_scores(model, "l1", big, labels, cfg.calib, seed=0)
      sel = pipeline.select_channels(sel_cfg, sizes, cost, "macs", target, multiple=1, similarity=sim,
                                     scores=scores)
    else:
      scores = calibrate.criterion_scores(model, name, big, labels, cfg.calib, seed=0)
      sel_cfg.method, sel_cfg.criterion = "uniform", name
      sel = pipeline.select_channels(sel_cfg, sizes, cost, "macs", target, multiple=1, scores=scores)
    seconds = time.perf_counter() - t0
    macs = cost(sel.widths)["macs"]
    out.append({"criterion": name, "seconds": seconds, "macs": macs, "paper_gpu_seconds": PAPER_SECONDS.get(name)})
    print(f"  ResNet-50 {name:<10} {seconds:8.1f} s  ({macs / 1e9:.3f} GMACs)", flush=True)
  return out


# ------------------------------------------------------------------------------------------------------------------
# Tables, plots, README.


def accuracy_table(payload: dict[str, Any]) -> str:
  rows = []
  for r in payload["rows"]:
    peer = next((p for p in payload["rows"] if p["removed"] == r["removed"] and p["method"] == "uniform" and
                 p["criterion"] == "l1"), None)
    delta = "" if peer is None else f"{100 * (r['top1_finetuned'] - peer['top1_finetuned']):+.2f}"
    rows.append([f"{100 * r['removed']:.0f}%", r["label"], f"{r['macs'] / 1e6:.2f}M",
                 f"{100 * r['top1_raw']:.2f}", f"{100 * r['top1_after_surgery']:.2f}",
                 f"{100 * r['top1_finetuned']:.2f}", delta, f"{r['select_seconds']:.2f}"])
  return _common.markdown_table(["MACs removed", "method", "MACs", "top-1 raw %", "top-1 after surgery (BN re-est.) %",
                                 f"top-1 after {payload['finetune_steps']} steps %", "vs uniform L1 (pts)",
                                 "selection s"], rows)


def overlap_table(payload: dict[str, Any]) -> str:
  names, mat = payload["overlap"]["names"], payload["overlap"]["jaccard"]
  return _common.markdown_table(["criterion"] + names,
                                [[n] + [f"{v:.2f}" for v in row] for n, row in zip(names, mat)])


def stability_table(payload: dict[str, Any]) -> str:
  return _common.markdown_table(
      ["calibration images", "Jaccard vs largest n", "Jaccard vs previous n"],
      [[s["n"], f"{s['jaccard_vs_largest']:.3f}", "" if s["jaccard_vs_previous"] is None else
        f"{s['jaccard_vs_previous']:.3f}"] for s in payload["stability"]])


def resnet50_table(payload: dict[str, Any]) -> str:
  rows = payload.get("resnet50") or []
  l1 = next((r["seconds"] for r in rows if r["criterion"] == "l1"), None)
  return _common.markdown_table(
      ["criterion", "seconds here (CPU, cold)", "vs L1 here", "paper (GPU) s", "vs L1 in the paper"],
      [[r["criterion"], f"{r['seconds']:.1f}", "" if not l1 else f"{r['seconds'] / l1:.1f}x",
        "" if r["paper_gpu_seconds"] is None else f"{r['paper_gpu_seconds']:,.0f}",
        "" if r["paper_gpu_seconds"] is None else f"{r['paper_gpu_seconds'] / PAPER_SECONDS['l1']:.1f}x"]
       for r in rows])


def plot(payload: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
  plt = plots.pyplot()
  if plt is None:
    return []
  made = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  labels = list(dict.fromkeys(r["label"] for r in payload["rows"]))
  colors = plt.get_cmap("tab20").colors  # one colour per method (the default cycle repeats after 10)
  for i, label in enumerate(labels):
    rs = sorted((r for r in payload["rows"] if r["label"] == label), key=lambda r: r["macs"])
    hsic = label in ("APIB", "ITPruner", "ITPruner (exact optimum)", "ITPruner + HSIC Lasso", "uniform + HSIC Lasso")
    for ax, k in zip(axes, ("top1_after_surgery", "top1_finetuned")):
      ax.plot([r["macs"] / 1e6 for r in rs], [100 * r[k] for r in rs], marker="o" if hsic else ".",
              ls="-" if hsic else ":", color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], label=label)
  for ax, title in zip(axes, ("right after surgery (BN re-estimated)",
                              f"after {payload['finetune_steps']} fine-tuning steps")):
    ax.axhline(100 * payload["dense_top1"], color="k", lw=0.8, ls="--")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
  axes[1].legend(fontsize=6, ncol=2)
  fig.suptitle(f"{payload['model']}: accuracy vs MACs per method")
  fig.tight_layout()
  p = out_dir / f"{NAME}_accuracy.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  made.append(p)

  names, mat = payload["overlap"]["names"], payload["overlap"]["jaccard"]
  fig, ax = plt.subplots(figsize=(5.5, 4.6))
  im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
  ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
  ax.set_yticks(range(len(names)), names, fontsize=7)
  for i, row in enumerate(mat):
    for j, v in enumerate(row):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
  fig.colorbar(im, ax=ax, label="Jaccard of kept channels")
  ax.set_title(f"overlap at {100 * payload['overlap']['removed']:.0f}% MACs removed (equal widths)", fontsize=9)
  fig.tight_layout()
  p = out_dir / f"{NAME}_overlap.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  made.append(p)

  st = payload["stability"]
  fig, ax = plt.subplots(figsize=(5, 3.4))
  ax.plot([s["n"] for s in st], [s["jaccard_vs_largest"] for s in st], marker="o", label="vs the largest n")
  ax.plot([s["n"] for s in st[1:]], [s["jaccard_vs_previous"] for s in st[1:]], marker="x", ls="--",
          label="vs the previous n")
  ax.set_xscale("log", base=2)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("calibration images")
  ax.set_ylabel("Jaccard of kept channels")
  ax.set_title("HSIC Lasso selection stability", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  p = out_dir / f"{NAME}_stability.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  made.append(p)
  return made


README_PARAGRAPH = (
    "Every method prunes the same pretrained CIFAR-10 ResNet-56 with the same 128 calibration images to 30%, 55% "
    "and 70% of its MACs removed, through the program's own selection and surgery: APIB, ITPruner (channels by L1 "
    "norm), the combined mode (ITPruner's widths filled by HSIC Lasso), ITPruner's objective solved to optimality "
    "(\"exact optimum\"), and equal (uniform) widths filled by HSIC Lasso or by each baseline criterion. "
    "Accuracy is measured on the validation images carved from the shared "
    "CIFAR-10 subset, on which the network was trained (agreement with itself, not generalisation), right after "
    "surgery (BatchNorm re-estimated) and after the same short distilled fine-tune for every method. The peer of "
    "each row is uniform L1 at the same MACs. See the module docstring for the protocol.")


def render_readme(payload: dict[str, Any]) -> None:
  _common.ensure_section(NAME, SECTION, README_PARAGRAPH)
  m = payload["machine"]
  parts = [
      f"Run {m['date']} on {m['cpu_count']} CPU cores ({m['device']}), jax {m['jax']}; the whole study took "
      f"{payload['seconds'] / 60:.0f} min. Dense {payload['model']}: {payload['dense_macs'] / 1e6:.2f}M MACs, top-1 "
      f"{100 * payload['dense_top1']:.2f}% on {payload['eval_examples']} validation images.",
      "", "**Accuracy** (top-1 %, validation):", "", accuracy_table(payload),
      "", f"![accuracy vs MACs](results/{NAME}_accuracy.png)",
      "", f"**Overlap** of the channels kept at {100 * payload['overlap']['removed']:.0f}% removed, equal widths "
      "(mean Jaccard over layers):", "", overlap_table(payload), "", f"![overlap](results/{NAME}_overlap.png)",
      "", "**Stability** of HSIC Lasso's selection with the number of calibration images (uniform widths at "
      f"{100 * payload['overlap']['removed']:.0f}% removed):", "", stability_table(payload),
      "", f"![stability](results/{NAME}_stability.png)"]
  if payload.get("resnet50"):
    parts += ["", "**Selection time on ResNet-50** (random weights, 64 images at 224x224, cold: compilation "
              "included), next to the APIB paper's table (GPU):", "", resnet50_table(payload)]
  _common.update_readme(NAME, "\n".join(parts))


# ------------------------------------------------------------------------------------------------------------------
# The program.


class Progress:
  """Finished parts of a study, one JSON line each in ``path``, so that an interrupted run resumes where it
  stopped. A line is reused only by a run of the same model and fine-tuning steps."""

  def __init__(self, path: pathlib.Path, key: dict[str, Any]):
    self.path, self.key = path, key
    self.done: dict[str, Any] = {}
    self.seconds: dict[str, float] = {}  # wall time of each part, whichever run computed it
    self.new_seconds = 0.0  # of the parts this run computed
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by the interruption
        if rec.get("key") == key:
          self.done[rec["part"]] = rec["value"]
          self.seconds[rec["part"]] = float(rec.get("seconds", 0.0))
      if self.done:
        print(f"resuming: {len(self.done)} finished parts in {path}", flush=True)

  def get(self, part: str, compute: Any) -> Any:
    if part not in self.done:
      t0 = time.perf_counter()
      self.done[part] = compute()
      self.seconds[part] = time.perf_counter() - t0
      self.new_seconds += self.seconds[part]
      self.path.parent.mkdir(parents=True, exist_ok=True)
      cut = self.path.exists() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size > 0
      with self.path.open("a") as f:
        f.write(("\n" if cut else "") + json.dumps({"key": self.key, "part": part, "value": self.done[part],
                            "seconds": self.seconds[part]}) + "\n")
    return self.done[part]

  def total_seconds(self, elapsed: float) -> float:
    """The study's wall time as if run at once: this run's time outside the parts, plus every part's time."""
    return elapsed - self.new_seconds + sum(self.seconds.values())


def run(quick: bool, shared: pathlib.Path, finetune_steps: int, data_dir: str, with_resnet50: bool,
        progress_path: pathlib.Path) -> dict[str, Any]:
  import hsic_jax as hj  # pylint: disable=import-outside-toplevel
  from models import import_torch  # pylint: disable=import-outside-toplevel
  from train import calibrate, data, pipeline, train as train_lib  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  model_name = "resnet20" if quick else "resnet56"
  cfg = study_config(model_name, shared, data_dir)
  if jax.default_backend() == "cpu":
    hj.limit_lapack_threads()
  data.prepare(cfg.data)
  mesh = train_lib.make_mesh()
  dense = import_torch.import_torch_state(model_name, import_torch.load_npz(cfg.dense.path))
  pairs = calibrate.decision_groups(dense)
  cost = pipeline.selection_budget(cfg, dense).cost
  dense_macs = cost([g.size for _, g in pairs])["macs"]
  images, labels, _ = data.calibration_batch(cfg.data, int(cfg.calib.num_images), seed=int(cfg.calib.seed))
  vs = variants(quick)
  crits = sorted({v.criterion for v in vs} - {"hsic_lasso"}, key=list(CRITERIA).index)
  print(f"{model_name}: calibration evidence ({len(images)} images)", flush=True)
  ev = gather_evidence(dense, cfg, images, labels, crits)
  dense_acc = _eval(cfg, dense, mesh)
  print(f"{model_name}: dense top-1 {dense_acc:.4f}", flush=True)
  ratios = (0.55,) if quick else RATIOS_REMOVED
  prog = Progress(progress_path, {"model": model_name, "finetune_steps": finetune_steps, "quick": quick})
  rows = []
  for removed in ratios:
    print(f"{100 * removed:.0f}% of the MACs removed", flush=True)
    for v in vs:
      rows.append(prog.get(f"row {removed} {v.label}", lambda: {"removed": removed, **prune_and_measure(
          v, cfg, dense, ev, (1 - removed) * dense_macs, finetune_steps, mesh, pairs, dense_acc)}))
  mid = 0.55
  names, mat = overlap_matrix([r for r in rows if r["removed"] == mid])
  uni = next(r for r in rows if r["removed"] == mid and r["method"] == "uniform")
  ns = (16, 32, 64) if quick else STABILITY_N
  stab = prog.get("stability", lambda: stability(dense, cfg, pairs, uni["widths"], ns))
  r50 = prog.get("resnet50", lambda: resnet50_times(shared, CRITERIA)) if with_resnet50 and not quick else []
  return {"quick": quick, "model": model_name, "finetune_steps": finetune_steps, "dense_macs": dense_macs,
          "dense_top1": dense_acc, "eval_examples": data.num_examples(cfg.data, cfg.data.eval_split),
          "calibration_images": int(cfg.calib.num_images), "evidence_seconds": ev.seconds,
          "rows": rows, "overlap": {"removed": mid, "names": names, "jaccard": mat}, "stability": stab,
          "resnet50": r50, "seconds": prog.total_seconds(time.perf_counter() - t_start)}


# ------------------------------------------------------------------------------------------------------------------
# The study at a real fine-tuning budget: one ratio, several seeds, epochs of fine-tuning.


STUDY_NAME = f"{NAME}_study"
STUDY_SECTION = "## Pruning quality at a real fine-tuning budget (`python -m benchmarks.pruning_quality --study`)"
STUDY_NETWORK = "resnet20"


def study_name(network: str) -> str:
  """The file stem of a study's results: ``pruning_quality_study`` for the default network, else suffixed."""
  return STUDY_NAME if network == STUDY_NETWORK else f"{STUDY_NAME}_{network}"


def study_section(network: str) -> str:
  return STUDY_SECTION if network == STUDY_NETWORK else STUDY_SECTION.replace(
      "--study`)", f"--study --network {network}`)")
STUDY_REMOVED = 0.50
STUDY_LR = 0.01
QUALITY_KEYS = ("top1_after_surgery", "top1_finetuned")


def seeded_config(cfg: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """``cfg`` with the seed that moves the calibration images (``calib.seed``), the training data order and the
  random criterion (``seed``)."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.seed = int(seed)
  out.calib.seed = int(seed)
  return out


def study_part(v: Variant, cfg: ml_collections.ConfigDict, dense: Any, pairs: Sequence[Any], target: float,
               steps_per_epoch: int, epochs: int, lr: float, mesh: Any, dense_acc: float,
               twin: Any = None) -> dict[str, Any]:
  """One (seed, method) part: this variant's own evidence from the seed's calibration images, then
  :func:`prune_and_measure` with ``epochs`` epochs of fine-tuning."""
  from train import data  # pylint: disable=import-outside-toplevel
  sel_cfg = v.select_config(cfg.select)
  images, labels, _ = data.calibration_batch(cfg.data, int(cfg.calib.num_images), seed=int(cfg.calib.seed))
  lasso = v.method == "apib" or v.criterion == "hsic_lasso"
  crits = [] if v.criterion == "hsic_lasso" else [v.criterion]
  ev = gather_evidence(dense, cfg, images, labels, crits, problems=lasso, similarity=v.method == "itpruner",
                       select=sel_cfg)
  return prune_and_measure(v, cfg, dense, ev, target, steps_per_epoch, mesh, pairs, dense_acc,
                           finetune_epochs=epochs, lr=lr, twin=twin)


def spread(values: Sequence[float]) -> dict[str, float]:
  """Mean, sample standard deviation (ddof 1; 0 for a single value), min and max."""
  x = np.asarray(values, np.float64)
  return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
          "min": float(x.min()), "max": float(x.max())}


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per method (in order of first appearance): the spread over seeds of each quality key, of the MACs and of the
  selection time, and the widths of each seed."""
  out = []
  for label in dict.fromkeys(r["label"] for r in rows):
    rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
    out.append({"label": label, "seeds": [r["seed"] for r in rs],
                **{k: spread([r[k] for r in rs]) for k in QUALITY_KEYS + ("macs", "select_seconds")},
                "widths": [r["widths"] for r in rs]})
  return out


def separated(summary: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
  """The pairs of methods whose difference in ``key`` exceeds the spread: their ranges over seeds (min to max) do
  not overlap. With 3 seeds this is the plain reading of "better on every seed and then some"; a pair listed has
  the better method first."""
  out = []
  for i, a in enumerate(summary):
    for b in summary[i + 1:]:
      if a[key]["n"] < 2 or b[key]["n"] < 2:
        continue
      hi, lo = (a, b) if a[key]["mean"] >= b[key]["mean"] else (b, a)
      if hi[key]["min"] > lo[key]["max"]:
        out.append({"better": hi["label"], "worse": lo["label"], "difference": hi[key]["mean"] - lo[key]["mean"],
                    "gap": hi[key]["min"] - lo[key]["max"]})
  return sorted(out, key=lambda d: -d["difference"])


def twin_lookup(rows: Sequence[dict[str, Any]], seed: int) -> Any:
  """``keep -> row``: the first measured row of ``seed`` (not itself a reuse) that kept exactly ``keep``, or None."""
  done = [r for r in rows if r["seed"] == seed and "same_selection_as" not in r]
  return lambda keep: next((r for r in done if r["keep"] == keep), None)


def run_study(shared: pathlib.Path, network: str, epochs: int, seeds: Sequence[int], data_dir: str,
              progress_path: pathlib.Path, *, lr: float = STUDY_LR, variants_: Sequence[Variant] | None = None,
              max_steps_per_epoch: int | None = None) -> dict[str, Any]:
  """Every (seed, method) part of the study, resumable from ``progress_path``; see the module docstring."""
  from train import data  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  pre = pretrained(network, shared, data_dir)
  cfg, mesh, dense, pairs, dense_macs = pre.cfg, pre.mesh, pre.dense, pre.pairs, pre.dense_macs
  steps = data.steps_per_epoch(cfg.data, batch_size=64)
  if max_steps_per_epoch is not None:
    steps = min(steps, int(max_steps_per_epoch))
  vs = study_variants() if variants_ is None else list(variants_)
  prog = Progress(progress_path, {"mode": "study", "model": network, "epochs": epochs, "steps_per_epoch": steps,
                                  "removed": STUDY_REMOVED, "lr": lr, "calibration_images": int(cfg.calib.num_images)})
  setup = prog.get("setup", lambda: {
      "dense_top1": _eval(cfg, dense, mesh), "dense_macs": dense_macs,
      "eval_examples": data.num_examples(cfg.data, cfg.data.eval_split),
      "train_examples": data.num_examples(cfg.data, cfg.data.train_split)})
  dense_acc = setup["dense_top1"]
  print(f"{network}: dense top-1 {dense_acc:.4f}; {len(seeds)} seeds x {len(vs)} methods, {epochs} epochs of "
        f"{steps} steps each", flush=True)
  rows = []
  for seed in seeds:
    scfg = seeded_config(cfg, seed)
    for v in vs:
      print(f"seed {seed}: {v.label}", flush=True)
      twin = twin_lookup(rows, seed)
      rows.append(prog.get(f"seed {seed} {v.label}", lambda: {"seed": int(seed), "removed": STUDY_REMOVED, **study_part(
          v, scfg, dense, pairs, (1 - STUDY_REMOVED) * dense_macs, steps, epochs, lr, mesh, dense_acc, twin=twin)}))
  return study_payload(rows, network=network, epochs=epochs, steps_per_epoch=steps, seeds=list(seeds), lr=lr,
                       **setup, calibration_images=int(cfg.calib.num_images),
                       seconds=prog.total_seconds(time.perf_counter() - t_start),
                       part_seconds=dict(prog.seconds))


def study_payload(rows: Sequence[dict[str, Any]], **settings: Any) -> dict[str, Any]:
  summary = aggregate(rows)
  return {"study": True, "removed": STUDY_REMOVED, **settings, "rows": list(rows), "summary": summary,
          "separated": {k: separated(summary, k) for k in QUALITY_KEYS}}


def study_table(payload: dict[str, Any]) -> str:
  def cell(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} ({100 * s['min']:.2f}-{100 * s['max']:.2f})"
  return _common.markdown_table(
      ["method", "seeds", "MACs", "top-1 after surgery (BN re-est.) %", f"top-1 after {payload['epochs']} epochs %",
       "selection s"],
      [[s["label"], s["top1_finetuned"]["n"], f"{s['macs']['mean'] / 1e6:.2f}M", cell(s["top1_after_surgery"]),
        cell(s["top1_finetuned"]), f"{s['select_seconds']['mean']:.1f}"] for s in payload["summary"]])


def separated_lines(payload: dict[str, Any]) -> list[str]:
  out = []
  for key, what in zip(QUALITY_KEYS, ("right after surgery", "after fine-tuning")):
    pairs = payload["separated"][key]
    if not pairs:
      out.append(f"- {what}: no difference between two methods exceeds the spread over seeds.")
      continue
    out.append(f"- {what}: " + "; ".join(f"{p['better']} > {p['worse']} by {100 * p['difference']:.2f} pts"
                                          for p in pairs) + ".")
  return out


def study_plot(payload: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
  plt = plots.pyplot()
  if plt is None:
    return []
  summary = payload["summary"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
  for ax, key, title in zip(axes, QUALITY_KEYS, ("right after surgery (BN re-estimated)",
                                                  f"after {payload['epochs']} epochs of distilled fine-tuning")):
    for i, s in enumerate(summary):
      vals = [100 * r[key] for r in payload["rows"] if r["label"] == s["label"]]
      ax.errorbar([i], [100 * s[key]["mean"]], yerr=[[100 * (s[key]["mean"] - s[key]["min"])],
                                                      [100 * (s[key]["max"] - s[key]["mean"])]],
                  fmt="o", color="C0", capsize=4)
      ax.scatter([i] * len(vals), vals, marker="x", color="C1", s=14, zorder=3)
    ax.axhline(100 * payload["dense_top1"], color="k", lw=0.8, ls="--", label="dense")
    ax.set_xticks(range(len(summary)), [s["label"] for s in summary], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{payload['network']} at {100 * payload['removed']:.0f}% of the MACs removed: mean and min-max over "
               f"seeds {payload['seeds']} (x: each seed)", fontsize=10)
  fig.tight_layout()
  p = out_dir / f"{study_name(payload['network'])}_accuracy.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  return [p, widths_plot(payload, out_dir)]


def decision_sizes(network: str) -> list[int]:
  """The dense width of every decision of the zoo's ``network`` (read off an abstract build: nothing trained)."""
  import models  # pylint: disable=import-outside-toplevel
  from train import calibrate  # pylint: disable=import-outside-toplevel
  return [g.size for _, g in calibrate.decision_groups(models.random_model(network))]


def widths_plot(payload: dict[str, Any], out_dir: pathlib.Path) -> pathlib.Path:
  """Each method's kept fraction of every decision's width (mean over seeds, min-max as a band), in forward order:
  how even or uneven the widths a method gives are."""
  plt = plots.pyplot()
  dense = np.asarray(decision_sizes(payload["network"]), np.float64)
  summary = payload["summary"]
  fig, ax = plt.subplots(figsize=(11, 4.2))
  x = np.arange(len(dense))
  lines: dict[str, list[str]] = {}  # methods whose widths are equal on every seed share one line
  for s in summary:
    lines.setdefault(json.dumps(s["widths"]), []).append(s["label"])
  for i, (widths, labels) in enumerate(lines.items()):
    w = np.asarray(json.loads(widths), np.float64) / dense
    ax.plot(x, w.mean(0), marker=".", lw=1.2, color=f"C{i % 10}", ls="-" if i < 10 else "--",
            label=" = ".join(labels))
    if len(w) > 1:
      ax.fill_between(x, w.min(0), w.max(0), color=f"C{i % 10}", alpha=0.12)
  ax.set_xlabel("decision (forward order)")
  ax.set_ylabel("kept fraction of the dense width")
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(f"{payload['network']} at {100 * payload['removed']:.0f}% of the MACs removed: the widths each method "
               "gives (mean over seeds, band: min-max)", fontsize=9)
  fig.tight_layout()
  p = out_dir / f"{study_name(payload['network'])}_widths.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  return p


STUDY_PARAGRAPH = (
    "The question users ask: after a fine-tune long enough to recover, which method gives the better network? The "
    "pretrained CIFAR-10 ResNet-20 is pruned to 50% of its MACs by each method (APIB, its variants, ITPruner, the "
    "combined mode, uniform widths with L1, FPGM or random channels), with 128 calibration images, then fine-tuned "
    "for whole epochs over the shared training images (SGD at batch 64, lr 0.01 cosine to 0, distilled from the "
    "dense model with weight 0.5), once per seed; the seed moves the calibration images, the data order and the "
    "random criterion. Accuracy is on the validation images carved from the shared subset (the network saw them in "
    "pre-training: agreement with itself, not generalisation). A difference \"exceeds the spread\" when the two "
    "methods' ranges over seeds do not overlap.")


def render_study_readme(payload: dict[str, Any]) -> None:
  name = study_name(payload["network"])
  _common.ensure_section(name, study_section(payload["network"]), STUDY_PARAGRAPH.replace(
      "The pretrained CIFAR-10 ResNet-20", f"The pretrained CIFAR-10 {payload['network'].replace('resnet', 'ResNet-')}"))
  m = payload["machine"]
  parts = [
      f"Run {m['date']} on {m['cpu_count']} CPU cores ({m['device']}), jax {m['jax']}: {payload['network']}, "
      f"{len(payload['rows'])} (seed, method) parts, {payload['epochs']} epochs of {payload['steps_per_epoch']} "
      f"steps each ({payload['train_examples']} training images at batch 64), lr {payload['lr']}; the study took "
      f"{payload['seconds'] / 3600:.1f} h. Dense: {payload['dense_macs'] / 1e6:.2f}M MACs, top-1 "
      f"{100 * payload['dense_top1']:.2f}% on {payload['eval_examples']} validation images.",
      "", "**Accuracy** (top-1 %, validation: mean ± std (min-max) over seeds):", "", study_table(payload),
      "", "**Differences that exceed the spread** (disjoint ranges over seeds):", "", *separated_lines(payload),
      "", f"![accuracy per method](results/{name}_accuracy.png)",
      "", f"![widths per method](results/{name}_widths.png)"]
  _common.update_readme(name, "\n".join(parts))


def study_from_progress(progress_path: pathlib.Path) -> dict[str, Any]:
  """The study's payload from whatever (seed, method) parts ``progress_path`` holds (the latest key's), so that a
  run still going can be rendered; settings the parts do not record are left out."""
  recs = [json.loads(line) for line in progress_path.read_text().splitlines() if line.strip().endswith("}")]
  recs = [r for r in recs if r.get("key", {}).get("mode") == "study"]
  if not recs:
    raise SystemExit(f"{progress_path} holds no study parts")
  key = recs[-1]["key"]
  parts = {r["part"]: r for r in recs if r["key"] == key}
  rows = [r["value"] for p, r in parts.items() if p.startswith("seed ")]
  if "setup" not in parts or not rows:
    raise SystemExit(f"{progress_path} holds no finished (seed, method) part yet")
  return study_payload(rows, network=key["model"], epochs=key["epochs"], steps_per_epoch=key["steps_per_epoch"],
                       seeds=sorted({r["seed"] for r in rows}), lr=key["lr"], **parts["setup"]["value"],
                       calibration_images=key["calibration_images"],
                       seconds=sum(float(r.get("seconds", 0.0)) for r in parts.values()), partial=True)


# ------------------------------------------------------------------------------------------------------------------
# Stability of the widths and channels with the number of calibration images.


CALIB_NAME = f"{NAME}_calibration"
CALIB_SECTION = ("## Pruning quality: how many calibration images? "
                 "(`python -m benchmarks.pruning_quality --stability`)")
CALIB_N = (32, 64, 128, 256, 512, 1024, 2048)
STABLE_AT = 0.9
CALIB_METHODS = ("APIB", "APIB (normalised problems)", "APIB (cost-aware MACs penalty)", "ITPruner",
                 "ITPruner + HSIC Lasso")


def width_agreement(a: Sequence[int], b: Sequence[int]) -> float:
  """``sum_i min(a_i, b_i) / sum_i max(a_i, b_i)``: the weighted Jaccard index of two width vectors (1 when equal;
  for channel sets nested by width it is the Jaccard index of the union over layers)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.minimum(a, b).sum() / max(1e-12, np.maximum(a, b).sum()))


def channel_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
  """The mean over layers of the Jaccard index of the kept channels."""
  return float(np.mean([jaccard(x, y) for x, y in zip(a, b)]))


def calibration_part(n: int, cfg: ml_collections.ConfigDict, dense: Any, pairs: Sequence[Any], target: float,
                     methods: Sequence[Variant]) -> dict[str, Any]:
  """Each method's widths and kept channels from ``n`` calibration images (the evidence built once per ``select``
  setting that shapes it)."""
  from train import data, pipeline  # pylint: disable=import-outside-toplevel
  images, labels, _ = data.calibration_batch(cfg.data, n, seed=int(cfg.calib.seed))
  cost = pipeline.selection_budget(cfg, dense).cost
  sizes = [g.size for _, g in pairs]
  out, cache = {}, {}
  for v in methods:
    sel_cfg = v.select_config(cfg.select)
    lasso = v.method == "apib" or v.criterion == "hsic_lasso"
    key = (bool(sel_cfg.normalized) if lasso else None, v.method == "itpruner",
           None if v.criterion == "hsic_lasso" else v.criterion)
    if key not in cache:
      cache[key] = gather_evidence(dense, cfg, images, labels, [] if key[2] is None else [key[2]],
                                   problems=lasso, similarity=key[1], select=sel_cfg)
    ev = cache[key]
    t0 = time.perf_counter()
    sel = pipeline.select_channels(sel_cfg, sizes, cost, "macs", target, multiple=1, problems=ev.problems,
                                   similarity=ev.similarity, scores=ev.scores.get(v.criterion), seed=int(cfg.seed))
    out[v.label] = {"widths": list(sel.widths), "keep": [k.tolist() for k in sel.keep],
                    "macs": cost(sel.widths)["macs"], "seconds": time.perf_counter() - t0}
    print(f"  n={n} {v.label:<28} widths {list(sel.widths)}", flush=True)
  return out


def calibration_summary(parts: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
  """Per method: width and channel agreement with the largest ``n`` at every ``n``, and ``stable_from``, the
  smallest ``n`` from which both stay >= STABLE_AT for every larger ``n`` (None when even the second largest is
  below)."""
  ns = sorted(parts)
  ref = parts[ns[-1]]
  out = []
  for label in ref:
    curve = [{"n": n, "widths": width_agreement(parts[n][label]["widths"], ref[label]["widths"]),
              "channels": channel_agreement(parts[n][label]["keep"], ref[label]["keep"])} for n in ns]
    stable = None
    for c in reversed(curve[:-1]):
      if min(c["widths"], c["channels"]) < STABLE_AT:
        break
      stable = c["n"]
    out.append({"label": label, "largest_n": ns[-1], "curve": curve, "stable_from": stable})
  return out


def run_calibration(shared: pathlib.Path, network: str, data_dir: str, progress_path: pathlib.Path,
                    ns: Sequence[int] = CALIB_N, labels: Sequence[str] = CALIB_METHODS) -> dict[str, Any]:
  """The stability study: each method's selection at 50% of the MACs removed from every ``n`` of ``ns``
  calibration images (seed 0), one resumable part per ``n``."""
  from train import data  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  pre = pretrained(network, shared, data_dir)
  cfg, dense, pairs = pre.cfg, pre.dense, pre.pairs
  target = (1 - STUDY_REMOVED) * pre.dense_macs
  ns = [n for n in ns if n <= data.num_examples(cfg.data, cfg.data.calib_split)]
  methods = [v for v in study_variants() if v.label in labels]
  prog = Progress(progress_path, {"mode": "calibration", "model": network, "removed": STUDY_REMOVED,
                                  "calib_batch_size": int(cfg.calib.batch_size)})
  parts = {}
  for n in ns:
    print(f"{network}: {n} calibration images", flush=True)
    parts[n] = prog.get(f"n {n}", lambda n=n: calibration_part(n, seeded_config(cfg, 0), dense, pairs, target,
                                                               methods))
  return {"network": network, "removed": STUDY_REMOVED, "ns": ns, "calib_batch_size": int(cfg.calib.batch_size),
          "parts": {str(n): p for n, p in parts.items()}, "summary": calibration_summary(parts),
          "seconds": prog.total_seconds(time.perf_counter() - t_start)}


def calibration_table(payload: dict[str, Any]) -> str:
  summary = payload["summary"]
  ns = [c["n"] for c in summary[0]["curve"]] if summary else []
  return _common.markdown_table(
      ["method", *[f"n={n}" for n in ns], f"stable from (>= {STABLE_AT})"],
      [[s["label"], *[f"{c['widths']:.2f} / {c['channels']:.2f}" for c in s["curve"]],
        "not within the n tried" if s["stable_from"] is None else s["stable_from"]] for s in summary])


def calibration_plot(payload: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
  plt = plots.pyplot()
  if plt is None:
    return []
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for i, s in enumerate(payload["summary"]):
    ns = [c["n"] for c in s["curve"]]
    ax.plot(ns, [c["channels"] for c in s["curve"]], marker="o", color=f"C{i}", label=f"{s['label']}: channels")
    ax.plot(ns, [c["widths"] for c in s["curve"]], marker="x", ls="--", color=f"C{i}", label=f"{s['label']}: widths")
  ax.axhline(STABLE_AT, color="k", lw=0.8, ls=":")
  ax.set_xscale("log", base=2)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("calibration images")
  ax.set_ylabel(f"agreement with n={payload['ns'][-1]}")
  ax.set_title(f"{payload['network']} at {100 * payload['removed']:.0f}% of the MACs removed", fontsize=9)
  ax.legend(fontsize=6)
  fig.tight_layout()
  p = out_dir / f"{CALIB_NAME}.png"
  fig.savefig(p, dpi=110)
  plt.close(fig)
  return [p]


CALIB_PARAGRAPH = (
    "How many calibration images does a selection need before it stops moving? Each method selects the pretrained "
    "ResNet-20's widths and channels at 50% of the MACs removed from n training images (seed 0; taken 128 per "
    "forward pass, as the program does), and each is compared with its own selection at the largest n: widths by "
    "sum(min)/sum(max) of the two width vectors, channels by the Jaccard index of the kept channels averaged over "
    "layers. A method is stable from the smallest n from which both stay at or above 0.9.")


def render_calibration_readme(payload: dict[str, Any]) -> None:
  _common.ensure_section(CALIB_NAME, CALIB_SECTION, CALIB_PARAGRAPH)
  m = payload["machine"]
  _common.update_readme(CALIB_NAME, "\n".join([
      f"Run {m['date']} on {m['cpu_count']} CPU cores, jax {m['jax']}; {payload['seconds'] / 60:.0f} min.", "",
      "**Agreement with the largest n** (widths / channels):", "", calibration_table(payload), "",
      f"![calibration stability](results/{CALIB_NAME}.png)"]))


def seed_list(text: str) -> list[int]:
  try:
    seeds = [int(t) for t in text.split(",") if t.strip()]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--seeds={text!r} must be comma-separated integers, e.g. 0,1,2") from e
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f"--seeds={text!r} must be distinct integers >= 0, e.g. 0,1,2")
  return seeds


def pick_variants(labels: Sequence[str] | None) -> list[Variant]:
  """The study's variants named by ``labels`` (in the study's order), or all of them."""
  vs = study_variants()
  if labels is None:
    return vs
  unknown = sorted(set(labels) - {v.label for v in vs})
  if unknown:
    raise SystemExit(f"--methods: unknown method(s) {unknown}; the study's methods are {[v.label for v in vs]}")
  return [v for v in vs if v.label in labels]


QUICK_STUDY_VARIANTS = ("APIB", "APIB (signed Lasso)", "uniform + l1", "uniform + random")


def _study_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  quick = args.quick
  if args.finetune_steps is not None and args.epochs is not None:
    parser.error("--finetune-steps and --epochs both set the fine-tune's length: give one (the study uses epochs)")
  epochs = args.epochs if args.epochs is not None else (1 if quick else 10)
  if epochs < 1:
    parser.error(f"--epochs={epochs} must be >= 1")
  seeds = args.seeds if args.seeds is not None else ([0, 1] if quick else [0, 1, 2])
  name = study_name(args.network)
  out = args.out if args.out is not None else (pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_")) if quick
                                               else None)
  progress = args.progress or ((out / "progress.jsonl") if quick else
                                _common.RESULTS / f"{name}_progress.jsonl")
  if args.render:
    payload = {"machine": _common.machine(), **study_from_progress(progress)}
  else:
    if not args.shared.is_dir():
      raise SystemExit(f"the shared folder {args.shared} (pretrained weights and CIFAR-10 images) is needed; "
                       "pass --shared DIR")
    vs = pick_variants(args.methods.split(",") if args.methods else (QUICK_STUDY_VARIANTS if quick else None))
    payload = {"machine": _common.machine(), **run_study(
        args.shared, args.network, epochs, seeds, args.data_dir or "~/tensorflow_datasets", progress, lr=args.lr,
        variants_=vs, max_steps_per_epoch=2 if quick else None)}
  print(study_table(payload), end="\n\n")
  print("\n".join(separated_lines(payload)))
  out_dir = _common.RESULTS if out is None else out
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps({"benchmark": name, **payload}, indent=2))
  print(f"wrote {path}")
  for p in study_plot(payload, out_dir):
    print(f"wrote {p}")
  if not args.no_readme and not quick and out is None:
    render_study_readme(payload)
    print(f"updated {_common.README}")


def _calibration_main(args: argparse.Namespace) -> None:
  quick = args.quick
  out = args.out if args.out is not None else (pathlib.Path(tempfile.mkdtemp(prefix=f"{CALIB_NAME}_")) if quick
                                               else None)
  progress = args.progress or ((out / "progress.jsonl") if quick else
                                pathlib.Path("runs") / CALIB_NAME / "progress.jsonl")
  if not args.shared.is_dir():
    raise SystemExit(f"the shared folder {args.shared} (pretrained weights and CIFAR-10 images) is needed; "
                     "pass --shared DIR")
  payload = {"machine": _common.machine(), **run_calibration(
      args.shared, args.network, args.data_dir or "~/tensorflow_datasets", progress,
      ns=(16, 32, 64) if quick else CALIB_N, labels=("APIB", "ITPruner") if quick else CALIB_METHODS)}
  print(calibration_table(payload))
  out_dir = _common.RESULTS if out is None else out
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{CALIB_NAME}.json"
  path.write_text(json.dumps({"benchmark": CALIB_NAME, **payload}, indent=2))
  print(f"wrote {path}")
  for p in calibration_plot(payload, out_dir):
    print(f"wrote {p}")
  if not args.no_readme and not quick and out is None:
    render_calibration_readme(payload)
    print(f"updated {_common.README}")


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, ("quick", "out", "no-readme", "render"), help={
      "quick": "ResNet-20, one ratio, a few methods (CI-sized)",
      "out": "results folder (default benchmarks/results; a temporary one with --quick)",
      "render": "rewrite the README block and the plots from the saved results, running nothing (with --study: "
                "from --progress, finished parts only)"})
  parser.add_argument("--shared", type=pathlib.Path, default=SHARED, help="shared data and weights folder")
  parser.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps per pruned model")
  parser.add_argument("--data-dir", default=None, help="where the CIFAR-10 folder is prepared as a TFDS data set")
  parser.add_argument("--no-resnet50", action="store_true", help="skip the ResNet-50 selection times")
  parser.add_argument("--progress", type=pathlib.Path, default=None,
                      help="finished parts, for resuming (default runs/pruning_quality/progress.jsonl; none with "
                           "--quick)")
  study = parser.add_argument_group("the study at a real fine-tuning budget (one ratio, seeds, epochs)")
  study.add_argument("--study", action="store_true", help="run the study (implied by --epochs or --seeds)")
  study.add_argument("--epochs", type=int, default=None,
                     help="fine-tuning epochs per model over the training images (default 10; 1 with --quick)")
  study.add_argument("--seeds", type=seed_list, default=None,
                     help="comma-separated seeds, e.g. 0,1,2 (default; 0,1 with --quick)")
  study.add_argument("--network", choices=("resnet20", "resnet56"), default="resnet20", help="the pretrained network")
  study.add_argument("--lr", type=float, default=STUDY_LR, help="the fine-tune's peak learning rate")
  study.add_argument("--methods", default=None,
                     help="comma-separated method labels to run (default: every row of study_variants)")
  study.add_argument("--stability", action="store_true",
                     help="how the selections move with the number of calibration images (32 ... 2048)")
  args = parser.parse_args(argv)
  if args.stability:
    _calibration_main(args)
    return
  if args.study or args.epochs is not None or args.seeds is not None:
    _study_main(args, parser)
    return
  if args.render:
    payload = json.loads((_common.RESULTS / f"{NAME}.json").read_text())
    render_readme(payload)
    plot(payload, _common.RESULTS)
    print(f"updated {_common.README}")
    return
  if not args.shared.is_dir():
    raise SystemExit(f"the shared folder {args.shared} (pretrained weights and CIFAR-10 images) is needed; "
                     "pass --shared DIR")
  quick = args.quick
  steps = args.finetune_steps if args.finetune_steps is not None else (2 if quick else 60)
  out = args.out if args.out is not None else (pathlib.Path(tempfile.mkdtemp(prefix=f"{NAME}_")) if quick else None)
  data_dir = args.data_dir or "~/tensorflow_datasets"  # the program's default: prepared once, then reused
  progress = args.progress or ((out / "progress.jsonl") if quick else
                                pathlib.Path("runs") / NAME / "progress.jsonl")
  payload = run(quick, args.shared, steps, data_dir, not args.no_resnet50, progress)
  for table in (accuracy_table(payload), overlap_table(payload), stability_table(payload)):
    print(table, end="\n\n")
  if payload["resnet50"]:
    print(resnet50_table(payload))
  path = _common.write_results(NAME, payload, out)
  out_dir = _common.RESULTS if out is None else out
  print(f"wrote {path}")
  for p in plot(json.loads(path.read_text()), out_dir):
    print(f"wrote {p}")
  if not args.no_readme and not quick and out is None:
    render_readme(json.loads(path.read_text()))
    print(f"updated {_common.README}")


if __name__ == "__main__":
  main()
