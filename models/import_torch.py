"""Import PyTorch-layout weights into the Flax models.

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

writes the project's model checkpoint (:mod:`models.checkpoint`), which :func:`models.load_pruned` and the program's
``dense.source=checkpoint`` read back.
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
from flax import nnx
from flax.nnx import traversals

from models import checkpoint, resnet50 as r50
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
  flat = traversals.flatten_mapping(checkpoint.abstract_state(model_name, widths, num_classes))
  expected = {torch_key(model_name, tuple(str(k) for k in pth)): (pth, var) for pth, var in flat.items()}
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
  return checkpoint.build_with_state(model_name, widths, num_classes, pure)


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
    out = checkpoint.save(model, args.out, force=args.force)
  except FileExistsError as e:
    parser.error(str(e))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  print(f"{args.model}: {n_params:,} params, widths {model.widths} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
