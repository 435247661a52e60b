"""Calibration: the dense model's taps on a few images, turned into one HSIC Lasso problem per pruning decision.

A decision sets the width of one prunable channel group (:func:`train.network.model_decisions`, the same for a zoo
model and a user's); its candidate channels are the group's, read by its consumer layers (the convs and dense
layers with an ``"in"`` member in the group). The taps are read from the model's jaxpr (:mod:`hsic_jax.taps`): for
each decision, its first consumer's input, the group's ``c`` channels of ``h * w`` values each, and the consumer's
pre-BatchNorm output ``(n, ...)``, flattened per image: ``X`` and ``Y`` of APIB, with Gaussian kernels of bandwidth
``gamma = 1 / (values per sample)`` by default. Problems of several calibration batches add up
(:func:`hsic_jax.combine_problems`), so ``n`` may exceed what one forward pass holds.

BatchNorm runs with the batch's own statistics (``bn_mode="batch"``, as APIB's reference code, which never switches
the model to eval mode) or with the running statistics (``"running"``). The dense model's variables are not changed
either way. The forward pass runs in the model's compute dtype
(bfloat16 under ``half_precision``); the taps are cast to float32 before any Gram is built.

Other selection methods need other evidence from the same images, collected here too:

- ITPruner: the normalised HSIC (linear CKA by default) between the activations of every pair of decisions, where a
  decision's activation is its consumer's input (the channels whose number the decision sets, after BN and ReLU);
- a baseline criterion (``hsic_jax.criteria``): per-channel scores of each decision's group, from the weights, the
  same activations, or the gradient of the cross-entropy on the calibration images (first-order Taylor).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import hsic_jax as hj
from hsic_jax import ChannelGroup, criteria
from train import files, network, train as train_lib


Decisions = Sequence[hj.taps.Decision]


def _decisions(model: nnx.Module, decisions: Decisions | None, example: Any = None) -> list[hj.taps.Decision]:
  if decisions is not None:
    return list(decisions)
  return network.model_decisions(model, network.zoo_example(model) if example is None else example)


def decision_groups(model: nnx.Module, example: Any = None) -> list[tuple[str, ChannelGroup]]:
  """``(decision, group)`` for every decision of ``model``, in forward order (:func:`train.network.model_decisions`
  on ``example``, default two zero images at a zoo model's input size).

  Raises:
    ValueError: a model with no prunable group.
  """
  return [(d.name, d.group) for d in _decisions(model, None, example)]


def _starts(n: int, bs: int) -> list[tuple[int, int]]:
  """``[start, end)`` of each calibration batch of ``bs`` images; a last batch of one image joins the one before
  (HSIC needs two samples per batch)."""
  starts = list(range(0, n, bs))
  if n - starts[-1] < 2:
    starts = starts[:-1] or [0]
  return [(s, n if i == len(starts) - 1 else s + bs) for i, s in enumerate(starts)]


def targets(model: nnx.Module, decisions: Decisions, conv3_y: str, example: Any) -> Any:
  """The calibration target ``Y`` of :func:`hsic_jax.taps.calibration_problems`: every consumer's pre-BN output
  (``"block"``), or, with ``"pooled"`` (APIB's reference on ResNet-50), the classifier's input (the pooled
  feature) for the decisions whose consumer is a ``conv3`` (a bottleneck's last conv)."""
  if conv3_y not in ("block", "pooled"):
    raise ValueError(f"calib.resnet50_conv3_y must be 'block' or 'pooled', got {conv3_y!r}")
  if conv3_y == "block" or not any(d.name.endswith("/conv3") for d in decisions):
    return "pre_bn"
  fcs = [layer.name for layer in hj.count_macs(model, example).layers if layer.kind == "fc"]
  if not fcs:
    return "pre_bn"
  return {d.name: hj.taps.Site(fcs[-1], "input") for d in decisions if d.name.endswith("/conv3")}


def make_capture(model: nnx.Module, bn_mode: str, decisions: Sequence[str], conv3_y: str, example: Any = None):
  """A jitted ``images -> {decision: (x (n, c, h*w), y (n, values))}`` on a copy of ``model``: the taps of the
  named decisions, read from the jaxpr (:func:`hsic_jax.taps.feature_fn`)."""
  if bn_mode not in hj.taps.BN_MODES:
    raise ValueError(f"calib.bn_mode must be 'batch' or 'running', got {bn_mode!r}")
  example = network.zoo_example(model) if example is None else example
  by_name = {d.name: d for d in _decisions(model, None, example)}
  decs = [by_name[d] for d in decisions]
  run = hj.taps.feature_fn(model, example, decisions=decs, target=targets(model, decs, conv3_y, example),
                             bn_mode=bn_mode)
  return lambda images: {name: taps[0] for name, taps in run(images).items()}


def activations(model: nnx.Module, images: np.ndarray, cfg_calib: Any, *,
                decisions: Decisions | None = None) -> list[jax.Array]:
  """Every decision's activation on ``images`` (its consumer's input, the group's channels; float32), taken
  ``cfg_calib.batch_size`` images at a time (:func:`hsic_jax.taps.activations`)."""
  decs = _decisions(model, decisions)
  if cfg_calib.bn_mode not in hj.taps.BN_MODES:
    raise ValueError(f"calib.bn_mode must be 'batch' or 'running', got {cfg_calib.bn_mode!r}")
  bs = max(int(cfg_calib.batch_size), 2)
  return hj.taps.activations(model, [jnp.asarray(images[s:e]) for s, e in _starts(len(images), bs)],
                             decisions=decs, bn_mode=cfg_calib.bn_mode)


def layer_similarity(acts: Sequence[jax.Array], kernel: str) -> np.ndarray:
  """ITPruner's ``(l, l)`` normalised HSIC between the decisions' activations (each flattened per image)."""
  return np.asarray(hj.hsic_matrix(list(acts), kernel=kernel, normalized=True), np.float64)


def loss_gradients(model: nnx.Module, images: np.ndarray, labels: np.ndarray, cfg_calib: Any) -> dict[str, Any]:
  """Gradient of the mean cross-entropy on the calibration images with respect to the parameters (summed over
  batches of ``cfg_calib.batch_size``, weighted by batch size), as a pure dict shaped like the parameters."""
  split = train_lib.split_model(model)
  graphdef = split.train_def if cfg_calib.bn_mode == "batch" else split.eval_def

  @jax.jit
  def grad(params, stats, x, y):
    def loss(p):
      logits = train_lib.merge(graphdef, p, stats)(x)
      return jnp.sum(train_lib.cross_entropy(logits, y, 0.0))
    return jax.grad(loss)(params)

  bs = max(int(cfg_calib.batch_size), 1)
  total = None
  for s in range(0, len(images), bs):
    g = grad(split.params, split.batch_stats, jnp.asarray(images[s:s + bs]), jnp.asarray(labels[s:s + bs]))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return jax.tree.map(lambda t: np.asarray(t) / len(images), total)


def criterion_scores(model: nnx.Module, criterion: str, images: np.ndarray, labels: np.ndarray, cfg_calib: Any,
                     *, seed: int, acts: Sequence[jax.Array] | None = None,
                     decisions: Decisions | None = None) -> list[np.ndarray]:
  """Per-channel scores of every decision's group by ``criterion`` (higher is kept first); ``acts``: the
  decisions' activations on ``images`` when the caller has them already (:func:`activations`)."""
  decs = _decisions(model, decisions)
  pairs = [(d.name, d.group) for d in decs]
  needs = criteria.criterion_needs(criterion)
  state = nnx.to_pure_dict(nnx.state(model))
  if "activations" in needs and acts is None:
    acts = activations(model, images, cfg_calib, decisions=decs)
  if "activations" not in needs:
    acts = None
  grads = loss_gradients(model, images, labels, cfg_calib) if "grads" in needs else None
  out = []
  for i, (_, g) in enumerate(tqdm(pairs, desc=f"scores ({criterion})", unit="layer", leave=False)):
    out.append(np.asarray(criteria.channel_scores(criterion, g, state=state, grads=grads, seed=seed,
                                                  activations=None if acts is None else acts[i]), np.float64))
  return out


def problems_from_taps(feats: dict[str, tuple[jax.Array, jax.Array]], decisions: Sequence[str], cfg_select: Any, *,
                       check: bool = True, progress: Any = None) -> list[hj.LassoProblem]:
  """One problem per decision from one batch of captured taps (:func:`make_capture`'s ``{decision: (x, y)}``),
  with the config's kernel settings (``select.bandwidth``, ``select.normalized``)."""
  out = []
  for d in decisions:
    x, y = feats[d]
    out.append(hj.problem_from_features(x, y, bandwidth=cfg_select.bandwidth, normalized=cfg_select.normalized,
                                        check=check))
    if progress is not None:
      progress()
  return out


def build_problems(model: nnx.Module, images: np.ndarray, cfg_calib: Any, cfg_select: Any, *,
                   decisions: Decisions | None = None) -> tuple[list[str], list[hj.LassoProblem]]:
  """One problem per decision from ``images`` (taken ``cfg_calib.batch_size`` at a time), summed over batches:
  :func:`hsic_jax.taps.calibration_problems` with the config's BatchNorm mode, target and kernel settings."""
  decs = _decisions(model, decisions)
  if cfg_calib.bn_mode not in hj.taps.BN_MODES:
    raise ValueError(f"calib.bn_mode must be 'batch' or 'running', got {cfg_calib.bn_mode!r}")
  bs = int(cfg_calib.batch_size)
  if bs < 2:
    raise ValueError(f"calib.batch_size must be >= 2 (HSIC needs two samples per batch), got {bs}")
  batches = [jnp.asarray(images[s:e]) for s, e in _starts(len(images), bs)]
  target = targets(model, decs, cfg_calib.resnet50_conv3_y, batches[0])
  consumers = getattr(cfg_calib, "consumers", "first")
  if consumers not in ("first", "sum"):
    raise ValueError(f"calib.consumers must be 'first' or 'sum', got {consumers!r}")
  with tqdm(total=len(batches), desc="calibrate", unit="batch", leave=False) as bar:
    return hj.taps.calibration_problems(model, batches, decisions=decs, target=target, consumers=consumers,
                                        bandwidth=cfg_select.bandwidth, normalized=cfg_select.normalized,
                                        bn_mode=cfg_calib.bn_mode, progress=lambda: bar.update(1))


def save_problems(path: Path, decisions: Sequence[str], problems: Sequence[hj.LassoProblem]) -> None:
  """Writes the problems (``Q``, ``q``, ``||L̄||^2``, Lipschitz bound, rows) as one ``.npz``, atomically."""
  arrays = {"decisions": np.asarray(list(decisions))}
  for i, p in enumerate(problems):
    for field in p._fields:
      arrays[f"{i}/{field}"] = np.asarray(getattr(p, field))
  files.save_npz(path, **arrays)


def load_problems(path: Path) -> tuple[list[str], list[hj.LassoProblem]]:
  """Reads :func:`save_problems`' file back.

  Raises:
    ValueError: the file is damaged or not such a file.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      decisions = [str(d) for d in data["decisions"]]
      problems = [hj.LassoProblem(*(jnp.asarray(data[f"{i}/{f}"]) for f in hj.LassoProblem._fields))
                  for i in range(len(decisions))]
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:  # truncated: BadZipFile
    raise ValueError(f"calibration problems {path} cannot be read ({err}); delete it to calibrate again") from err
  return decisions, problems
