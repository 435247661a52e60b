"""Calibration: the dense model's taps on a few images, turned into one HSIC Lasso problem per pruning decision.

A decision is a consumer layer (``models``' ``decisions()``); its candidate channels are its input channels, which
are the output channels of one prunable channel group (the group with an ``"in"`` member on the consumer's kernel).
For each decision the tap holds the consumer's input ``(n, h, w, c)``, read as ``c`` channels of ``h * w`` values
each, and its pre-BatchNorm output ``(n, ...)``, flattened per image: ``X`` and ``Y`` of APIB, with Gaussian kernels
of bandwidth ``gamma = 1 / (values per sample)`` by default. Problems of several calibration batches add up
(:func:`hsic_jax.combine_problems`), so ``n`` may exceed what one forward pass holds.

BatchNorm runs with the batch's own statistics (``bn_mode="batch"``, as APIB's reference code, which never switches
the model to eval mode) or with the running statistics (``"running"``). The dense model's variables are not changed
either way: the forward pass runs on a copy inside ``jit``. The forward pass runs in the model's compute dtype
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
from train import files, train as train_lib


def decision_groups(model: nnx.Module) -> list[tuple[str, ChannelGroup]]:
  """``(decision, group)`` for every decision of ``model``, in forward order.

  Raises:
    ValueError: a decision that no prunable group feeds (a model whose declarations disagree).
  """
  groups = [g for g in model.channel_groups() if g.prunable]
  out = []
  for d in model.decisions():
    kernel = tuple(d.split("/")) + ("kernel",)
    match = [g for g in groups if any(m.role == "in" and tuple(m.path) == kernel for m in g.members)]
    if len(match) != 1:
      raise ValueError(f"decision {d!r} is fed by {len(match)} prunable groups ({[g.name for g in match]}); "
                       "expected exactly one")
    out.append((d, match[0]))
  return out


def _targets(taps: dict[str, Any], decisions: Sequence[str], conv3_y: str) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``{decision: (x (n, c, h*w), y (n, values))}`` from the taps."""
  out = {}
  for d in decisions:
    tap = taps[d]
    n, h, w, c = tap.input.shape
    x = jnp.transpose(tap.input.reshape(n, h * w, c), (0, 2, 1))
    y = tap.output
    if conv3_y == "pooled" and d.endswith("/conv3") and "fc" in taps:
      y = taps["fc"].input  # APIB's reference: every ResNet-50 conv3 explains the pooled feature
    out[d] = (x, y.reshape(n, -1))
  return out


def _jitted_taps(model: nnx.Module, bn_mode: str, extract):
  """A jitted ``images -> extract(taps)`` on a copy of ``model``, BatchNorm with batch or running statistics."""
  if bn_mode not in ("batch", "running"):
    raise ValueError(f"calib.bn_mode must be 'batch' or 'running', got {bn_mode!r}")
  split = train_lib.split_model(model)
  graphdef = split.train_def if bn_mode == "batch" else split.eval_def

  @jax.jit
  def capture(params, stats, images):
    _, taps = train_lib.merge(graphdef, params, stats)(images, capture=True)
    # A model computing in bfloat16 records bfloat16 taps; the Grams and their products are accumulated in float32
    # (n^2 sums of squares round away in an 8-bit mantissa), so the taps are cast before anything is built.
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), extract(taps))

  return lambda images: capture(split.params, split.batch_stats, images)


def make_capture(model: nnx.Module, bn_mode: str, decisions: Sequence[str], conv3_y: str):
  """A jitted ``images -> {decision: (x, y)}`` on a copy of ``model``."""
  if conv3_y not in ("block", "pooled"):
    raise ValueError(f"calib.resnet50_conv3_y must be 'block' or 'pooled', got {conv3_y!r}")
  return _jitted_taps(model, bn_mode, lambda taps: _targets(taps, decisions, conv3_y))


def make_activations(model: nnx.Module, bn_mode: str, decisions: Sequence[str]):
  """A jitted ``images -> [activation (n, h, w, c) per decision]`` (each consumer's input) on a copy of ``model``."""
  return _jitted_taps(model, bn_mode, lambda taps: [taps[d].input for d in decisions])


def activations(model: nnx.Module, images: np.ndarray, cfg_calib: Any) -> list[jax.Array]:
  """Every decision's activation on ``images``, taken ``cfg_calib.batch_size`` images at a time."""
  decisions = [d for d, _ in decision_groups(model)]
  capture = make_activations(model, cfg_calib.bn_mode, decisions)
  bs = max(int(cfg_calib.batch_size), 1)
  parts = [capture(jnp.asarray(images[s:s + bs])) for s in range(0, len(images), bs)]
  return [jnp.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(len(decisions))]


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
                     *, seed: int, acts: Sequence[jax.Array] | None = None) -> list[np.ndarray]:
  """Per-channel scores of every decision's group by ``criterion`` (higher is kept first); ``acts``: the
  decisions' activations on ``images`` when the caller has them already (:func:`activations`)."""
  pairs = decision_groups(model)
  needs = criteria.criterion_needs(criterion)
  state = nnx.to_pure_dict(nnx.state(model))
  if "activations" in needs and acts is None:
    acts = activations(model, images, cfg_calib)
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


def build_problems(model: nnx.Module, images: np.ndarray, cfg_calib: Any, cfg_select: Any
                   ) -> tuple[list[str], list[hj.LassoProblem]]:
  """One problem per decision from ``images`` (taken ``cfg_calib.batch_size`` at a time), summed over batches."""
  decisions = [d for d, _ in decision_groups(model)]
  capture = make_capture(model, cfg_calib.bn_mode, decisions, cfg_calib.resnet50_conv3_y)
  bs = int(cfg_calib.batch_size)
  if bs < 2:
    raise ValueError(f"calib.batch_size must be >= 2 (HSIC needs two samples per batch), got {bs}")
  starts = list(range(0, len(images), bs))
  if len(images) - starts[-1] < 2:
    starts = starts[:-1] or [0]
  per_decision: dict[str, list[hj.LassoProblem]] = {d: [] for d in decisions}
  bar = tqdm(total=len(starts) * len(decisions), desc="calibrate", unit="layer", leave=False)
  for i, s in enumerate(starts):
    end = len(images) if i == len(starts) - 1 else s + bs
    feats = capture(jnp.asarray(images[s:end]))
    # Dispatched without waiting for each build's check; the summed problems are validated once below.
    for d, p in zip(decisions, problems_from_taps(feats, decisions, cfg_select, check=False,
                                                  progress=lambda: bar.update(1))):
      per_decision[d].append(p)
  bar.close()
  return decisions, hj.taps.sum_batches(per_decision)


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
