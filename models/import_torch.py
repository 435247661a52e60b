"""Import PyTorch-layout weights into the Flax models and save/load them as orbax checkpoints.

Supported names (``state_dict`` keys; conv weights OIHW, linear weights ``(out, in)``):

- CIFAR ResNets (``resnet20/32/44/56/110``, the layout of ``shared/weights/*.npz``): ``conv1.weight``,
  ``bn1.{weight,bias,running_mean,running_var}``, ``layer{s}.{j}.conv{1,2}.weight``, ``layer{s}.{j}.bn{1,2}.*``,
  ``linear.{weight,bias}``;
- ``resnet50`` (torchvision): ``conv1``, ``bn1``, ``layer{s}.{j}.conv{1,2,3}``, ``layer{s}.{j}.bn{1,2,3}``,
  ``layer{s}.0.downsample.{0,1}``, ``fc``.

``num_batches_tracked`` entries are ignored. Conversion: conv ``W[o, i, h, w] -> kernel[h, w, i, o]``, linear
``W[o, i] -> kernel[i, o]``, BN ``weight -> scale``, ``running_mean -> mean``, ``running_var -> var``. The width
list and class count are read off the weight shapes, so pruned (thinner) PyTorch models import too.

Command line::

  python -m models.import_torch --model resnet56 --weights ../shared/weights/resnet56_cifar10.npz --out ckpt/r56

A checkpoint is one orbax composite: item ``state`` (the pure state dict, ``nnx.to_pure_dict(nnx.state(model))``)
and item ``meta`` (JSON ``{"model", "widths", "num_classes"}``), so :func:`load_checkpoint` rebuilds the model.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import models as registry
from models import resnet50 as r50
from models import resnet_cifar

FlaxPath = tuple[str, ...]
_BN_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
CIFAR_RESNETS = tuple(f"resnet{d}" for d in resnet_cifar.DEPTHS)
SUPPORTED = CIFAR_RESNETS + ("resnet50",)


def _leaf_suffix(layer_kind: str, leaf: str) -> str:
  if layer_kind == "bn":
    return _BN_LEAF[leaf]
  return {"kernel": "weight", "bias": "bias"}[leaf]


def torch_key(model_name: str, path: FlaxPath) -> str:
  """The PyTorch ``state_dict`` key of a Flax pure-state path, e.g. ``("stage1", "block0", "conv1", "kernel")``
  -> ``"layer1.0.conv1.weight"``.

  Raises:
    ValueError: the model has no PyTorch naming here, or the path is not one of its parameters.
  """
  _check_supported(model_name)
  leaf = path[-1]
  fc = "linear" if model_name in CIFAR_RESNETS else "fc"
  if path[:1] == ("stem",):
    layer = {"conv": "conv1", "bn": "bn1"}[path[1]]
    return f"{layer}.{_leaf_suffix(path[1], leaf)}"
  if path[:1] == ("fc",):
    return f"{fc}.{_leaf_suffix('fc', leaf)}"
  m = re.fullmatch(r"stage(\d+)", str(path[0]))
  b = re.fullmatch(r"block(\d+)", str(path[1])) if len(path) > 1 else None
  if m and b:
    prefix = f"layer{m.group(1)}.{b.group(1)}"
    if path[2] == "downsample":
      idx = {"conv": "0", "bn": "1"}[path[3]]
      return f"{prefix}.downsample.{idx}.{_leaf_suffix(path[3], leaf)}"
    kind = "bn" if path[2].startswith("bn") else "conv"
    return f"{prefix}.{path[2]}.{_leaf_suffix(kind, leaf)}"
  raise ValueError(f"{model_name}: no PyTorch name for parameter path {path}")


def _to_flax(value: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO for conv weights, (out, in) -> (in, out) for linear weights; others unchanged."""
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


def _torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  s = tuple(flax_shape)
  if len(s) == 4:
    return (s[3], s[2], s[0], s[1])
  if len(s) == 2:
    return (s[1], s[0])
  return s


def _check_supported(model_name: str) -> None:
  if model_name not in SUPPORTED:
    raise ValueError(f"model_name {model_name!r} has no PyTorch weight naming here; expected one of {SUPPORTED}")


def _require(state_dict: Mapping[str, Any], key: str, model_name: str) -> np.ndarray:
  if key not in state_dict:
    raise ValueError(f"state_dict for {model_name!r} is missing key {key!r}")
  return np.asarray(state_dict[key])


def infer_widths(model_name: str, state_dict: Mapping[str, Any]) -> tuple[list[int], int]:
  """Reads the width list and the class count off the weight shapes (output channels of each conv)."""
  _check_supported(model_name)
  out = lambda key: int(_require(state_dict, key, model_name).shape[0])  # noqa: E731
  if model_name in CIFAR_RESNETS:
    n = (int(model_name[len("resnet"):]) - 2) // 6
    widths = [out("conv1.weight")]
    for s in range(1, 4):
      for j in range(n):
        widths += [out(f"layer{s}.{j}.conv1.weight"), out(f"layer{s}.{j}.conv2.weight")]
    return widths, out("linear.weight")
  widths = [0] * 37
  widths[0] = out("conv1.weight")
  for s, (w_idx, pairs) in enumerate(r50.layout()[1], start=1):
    widths[w_idx] = out(f"layer{s}.0.conv3.weight")
    for j, (a, b) in enumerate(pairs):
      widths[a], widths[b] = out(f"layer{s}.{j}.conv1.weight"), out(f"layer{s}.{j}.conv2.weight")
  return widths, out("fc.weight")


def import_torch_state(model_name: str, state_dict: Mapping[str, np.ndarray]) -> nnx.Module:
  """Builds the Flax model ``model_name`` holding the weights of a PyTorch ``state_dict``.

  Args:
    model_name: one of ``resnet20/32/44/56/110`` (CIFAR naming) or ``resnet50`` (torchvision naming).
    state_dict: key -> array (numpy, or anything ``np.asarray`` accepts, e.g. a CPU torch tensor).

  Returns:
    The model, in eval mode (BatchNorm uses the imported running statistics).

  Raises:
    ValueError: unsupported model name; missing or unexpected keys (listed); a shape that does not match the
      architecture (naming the key, the expected and the actual PyTorch shape).
  """
  widths, num_classes = infer_widths(model_name, state_dict)
  model = nnx.eval_shape(lambda: registry.get_model(model_name, widths, num_classes=num_classes,
                                                    rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  expected = {torch_key(model_name, tuple(str(k) for k in pth)): (pth, var) for pth, var in flat}
  given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  missing = sorted(set(expected) - given)
  unexpected = sorted(given - set(expected))
  if missing or unexpected:
    raise ValueError(f"state_dict for {model_name!r} does not match the architecture: missing keys {missing[:10]}"
                     f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                     f"{' ...' if len(unexpected) > 10 else ''}")
  pure: dict[Any, Any] = {}
  for key, (pth, var) in expected.items():
    value = np.asarray(state_dict[key], dtype=np.float32)
    want = _torch_shape(var.shape)
    if value.shape != want:
      raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, expected {want} for {model_name!r} with "
                       f"widths inferred as {widths}")
    node = pure
    for k in pth[:-1]:
      node = node.setdefault(k, {})
    node[pth[-1]] = jnp.asarray(_to_flax(value))
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a ``.npz`` of PyTorch-named arrays into a dict.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``path`` is not an ``.npz`` archive (a directory, a single ``.npy`` array, text, a truncated file)
      or holds object arrays, which would need unpickling.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"weights file {path} does not exist")
  if not path.is_file():
    raise ValueError(f"weights {path} is not a file; expected an .npz of PyTorch state_dict arrays")
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"weights {path} is not an .npz archive; expected an .npz of PyTorch state_dict arrays "
                     "(np.savez(path, **{k: v.numpy() for k, v in state_dict.items()}))") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"weights {path} holds a single array, not an .npz archive of named arrays; expected an .npz "
                     "of PyTorch state_dict arrays")
  try:
    with data:
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    if "allow_pickle" in str(e):
      raise ValueError(f"weights {path} holds object (pickled) arrays, which are not loaded since unpickling can run "
                       "code; save plain numeric arrays (v.numpy() of each tensor)") from e
    raise ValueError(f"weights {path} is a damaged .npz archive ({e})") from e


# ------------------------------------------------------------------------------------------------------------------
# Orbax checkpoints.


def _check_state_matches_widths(model: nnx.Module) -> None:
  """Raises ValueError when ``model``'s parameters do not have the shapes its width list builds (a state cut by
  surgery but put back in a model of the old widths, or the reverse), which would only surface on loading."""
  name = registry.model_name(model)
  fresh = nnx.eval_shape(lambda: registry.get_model(name, model.widths, num_classes=int(model.num_classes),
                                                    rngs=nnx.Rngs(0)))
  want = jax.tree_util.tree_map(lambda v: tuple(v.shape), nnx.to_pure_dict(nnx.state(fresh)))
  have = jax.tree_util.tree_map(lambda v: tuple(np.shape(v)), nnx.to_pure_dict(nnx.state(model)))
  want_flat = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0])
  have_flat = dict(jax.tree_util.tree_flatten_with_path(have, is_leaf=lambda x: isinstance(x, tuple))[0])
  for key in sorted(set(want_flat) | set(have_flat), key=str):
    w, h = want_flat.get(key), have_flat.get(key)
    if w != h:
      where = jax.tree_util.keystr(key)
      raise ValueError(f"{name} with widths {list(model.widths)} has {where} of shape {w}, but the model's state holds "
                       f"{h}; its parameters and width list disagree (rebuild the model with the pruned widths: "
                       "get_model(name, result.widths) and nnx.update with the pruned state)")


def save_checkpoint(model: nnx.Module, path: str | os.PathLike[str], *, force: bool = False,
                    extra: Mapping[str, Any] | None = None) -> Path:
  """Saves ``model``'s pure state dict and ``{"model", "widths", "num_classes"}`` as an orbax checkpoint.

  Args:
    model: a registry model.
    path: the checkpoint directory (created; made absolute).
    force: overwrite an existing directory.
    extra: more JSON-serialisable entries for the meta item (e.g. a pruned model's plan); read them back with
      :func:`read_meta`.

  Returns:
    The absolute checkpoint path.

  Raises:
    FileExistsError: ``path`` exists and ``force`` is false.
    ValueError: the model's parameter shapes are not those its width list builds.
  """
  _check_state_matches_widths(model)
  path = Path(path).resolve()
  if path.exists() and not force:
    raise FileExistsError(f"checkpoint directory {path} already exists; pass force=True (CLI: --force) to overwrite")
  meta = {**dict(extra or {}), "model": registry.model_name(model), "widths": model.widths,
          "num_classes": int(model.num_classes)}
  pure = nnx.to_pure_dict(nnx.state(model))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(state=ocp.args.StandardSave(pure), meta=ocp.args.JsonSave(meta)),
               force=force)
  return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The meta item of a checkpoint written by :func:`save_checkpoint` (``model``, ``widths``, ``num_classes`` and
  any ``extra`` entries).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``path`` is not such a checkpoint or cannot be read.
  """
  path = Path(path).resolve()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      meta = ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "not a readable checkpoint"
    raise ValueError(f"{path} is not a readable model checkpoint ({type(e).__name__}: {e}); expected a directory "
                     "written by models.import_torch.save_checkpoint") from e
  if not isinstance(meta, dict) or not {"model", "widths", "num_classes"} <= set(meta):
    raise ValueError(f"{path} has no model meta (model, widths, num_classes); expected a directory written by "
                     "models.import_torch.save_checkpoint")
  return meta


def load_checkpoint(path: str | os.PathLike[str]) -> nnx.Module:
  """Rebuilds the model saved by :func:`save_checkpoint` (in eval mode), with the widths its meta records.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``path`` is not a readable checkpoint, or its arrays do not have the shapes its widths build (a
      corrupt or hand-edited checkpoint); nothing is partially restored.
  """
  path = Path(path).resolve()
  meta = read_meta(path)
  model = nnx.eval_shape(lambda: registry.get_model(meta["model"], meta["widths"],
                                                    num_classes=meta["num_classes"], rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  target = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(path, ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"checkpoint {path} does not hold the state of {meta['model']} with widths {meta['widths']} "
                     f"({type(e).__name__}: {e})") from e
  want = jax.tree_util.tree_leaves(target)
  have = jax.tree_util.tree_leaves(restored)
  if len(want) != len(have) or any(tuple(a.shape) != tuple(np.shape(b)) for a, b in zip(want, have)):
    raise ValueError(f"checkpoint {path} holds arrays whose shapes differ from {meta['model']} with widths "
                     f"{meta['widths']}; the checkpoint is corrupt")
  nnx.replace_by_pure_dict(state, restored)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m models.import_torch",
                                   description="Convert PyTorch-named .npz weights to a Flax orbax checkpoint.")
  parser.add_argument("--model", required=True, help=f"one of {SUPPORTED}")
  parser.add_argument("--weights", required=True, help=".npz of PyTorch state_dict arrays")
  parser.add_argument("--out", required=True, help="checkpoint directory to write")
  parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
  args = parser.parse_args(argv)
  try:
    model = import_torch_state(args.model, load_npz(args.weights))
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  try:
    out = save_checkpoint(model, args.out, force=args.force)
  except FileExistsError as e:
    parser.error(str(e))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  print(f"{args.model}: {n_params:,} params, widths {model.widths} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
