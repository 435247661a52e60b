"""CNN architectures in Flax NNX (NHWC, float32) with explicit width lists and declared channel groups.

>>> from flax import nnx
>>> import models
>>> models.default_widths("resnet20")[:5]
[16, 16, 16, 16, 16]
>>> m = nnx.eval_shape(lambda: models.get_model("resnet20", rngs=nnx.Rngs(0)))  # shapes only
>>> len(m.widths), m.stage2.block0.conv1.kernel.shape
(19, (3, 3, 16, 32))

Every model built by :func:`get_model` has

- ``.widths``: its width list (layout per architecture, see each module's docstring and :func:`default_widths`);
  a pruned model is the same class built with new widths;
- ``.channel_groups()``: the :class:`hsic_jax.ChannelGroup` of every internal set of coupled channels, the
  prunable ones marked ``prunable=True`` with the width-list entries they set in ``width_indices``;
- ``.decisions()``: the names of its APIB pruning decisions (consumer layers: the layers whose input channels APIB
  selects) in forward order;
- ``model(x, capture=True) -> (logits, taps)``: ``taps[decision]`` is a :class:`Tap` with the consumer's input
  ``(n, h, w, c)`` and its pre-BN output (ResNet-50 also records ``taps["fc"]``, the pooled feature): the
  hand-declared taps that the ones read from the jaxpr (:mod:`hsic_jax.taps`, which the pruning program uses for
  every model) are checked against;
- ``.eval()`` / ``.train()`` to switch BatchNorm between running and batch statistics.

Parameter paths read like the architecture, e.g. ``("stage1", "block0", "conv1", "kernel")``.

:func:`random_model` builds one with He-normal weights drawn in NumPy (no initializer compiled); the model
checkpoint (save, read_meta, load, and ``build_with_state``, a model from a pure dict of arrays) is
:mod:`models.checkpoint`, and :func:`load_pruned` loads one, a zoo model or a model from a user's factory
(:mod:`models.factory`: ``"package.module:function"``, which the pruning program takes as ``model.name``); :mod:`models.import_torch` converts PyTorch weights.
:func:`set_compute_dtype` runs a built model's convolutions and matmuls in bfloat16 (:mod:`models.precision`),
its parameters and statistics staying float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from models import _common, googlenet, mobilenetv2, resnet50, resnet_cifar, vgg
from models.precision import compute_dtype, set_compute_dtype
from models._common import Tap, Taps
from models.googlenet import GoogLeNet
from models.mobilenetv2 import MobileNetV2
from models.resnet50 import ResNet50
from models.resnet_cifar import ResNetCifar
from models.vgg import VGG16


def _resnet_cifar(depth: int) -> Callable[..., nnx.Module]:
  def build(widths: Sequence[int] | None, num_classes: int | None, rngs: nnx.Rngs) -> nnx.Module:
    return ResNetCifar(depth, widths, num_classes=10 if num_classes is None else num_classes, rngs=rngs)
  return build


def _build_vgg(widths: Sequence[int] | None, num_classes: int | None, rngs: nnx.Rngs) -> nnx.Module:
  return VGG16(widths, num_classes=10 if num_classes is None else num_classes, rngs=rngs)


def _build_resnet50(widths: Sequence[int] | None, num_classes: int | None, rngs: nnx.Rngs) -> nnx.Module:
  return ResNet50(widths, num_classes=1000 if num_classes is None else num_classes, rngs=rngs)


def _build_googlenet(widths: Sequence[int] | None, num_classes: int | None, rngs: nnx.Rngs) -> nnx.Module:
  return GoogLeNet(widths, num_classes=10 if num_classes is None else num_classes, rngs=rngs)


def _build_mbv2(imagenet: bool) -> Callable[..., nnx.Module]:
  def build(widths: Sequence[int] | None, num_classes: int | None, rngs: nnx.Rngs) -> nnx.Module:
    return MobileNetV2(widths, num_classes=num_classes, imagenet=imagenet, rngs=rngs)
  return build


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registry entry: how to build a model, its dense widths, its width check and its input size."""

  build: Callable[[Sequence[int] | None, int | None, nnx.Rngs], nnx.Module]
  default_widths: Callable[[], list[int]]
  validate_widths: Callable[[Sequence[int] | None], list[int]]
  input_hw: tuple[int, int]


def _cifar_entry(d: int) -> ModelEntry:
  return ModelEntry(_resnet_cifar(d), lambda: resnet_cifar.default_widths(d),
                    lambda ws: resnet_cifar.validate_widths(d, ws), (32, 32))


MODELS: dict[str, ModelEntry] = {
    **{f"resnet{d}": _cifar_entry(d) for d in resnet_cifar.DEPTHS},
    "vgg16": ModelEntry(_build_vgg, vgg.default_widths, vgg.validate_widths, (32, 32)),
    "resnet50": ModelEntry(_build_resnet50, resnet50.default_widths, resnet50.validate_widths, (224, 224)),
    "googlenet": ModelEntry(_build_googlenet, googlenet.default_widths, googlenet.validate_widths, (32, 32)),
    "mobilenetv2": ModelEntry(_build_mbv2(False), mobilenetv2.default_widths,
                              lambda ws: mobilenetv2.validate_widths(ws, imagenet=False), (32, 32)),
    "mobilenetv2_imagenet": ModelEntry(_build_mbv2(True), mobilenetv2.default_widths,
                                       lambda ws: mobilenetv2.validate_widths(ws, imagenet=True), (224, 224)),
}
"""Registry: model name -> :class:`ModelEntry`."""


def _check_name(name: str) -> None:
  if name not in MODELS:
    raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODELS)}")


def get_model(name: str, widths: Sequence[int] | None = None, *, num_classes: int | None = None,
              rngs: nnx.Rngs) -> nnx.Module:
  """Builds model ``name`` with the given width list (default: the dense widths).

  Args:
    name: one of :data:`MODELS` (``resnet20/32/44/56/110``, ``vgg16``, ``resnet50``, ``googlenet``,
      ``mobilenetv2``, ``mobilenetv2_imagenet``).
    widths: the width list (see :func:`default_widths` for its length and layout); ``None`` for the dense model.
    num_classes: classifier outputs; default 10 for CIFAR models, 1000 for ImageNet ones.
    rngs: parameter initialisation keys.

  Raises:
    ValueError: unknown name, ``num_classes`` not an int >= 1, or widths of the wrong length, with entries
      < 1, or unequal residual widths within a stage.
  """
  _check_name(name)
  if num_classes is not None:
    num_classes = _common.check_num_classes(num_classes)
  return MODELS[name].build(widths, num_classes, rngs)


def default_widths(name: str) -> list[int]:
  """The dense width list of model ``name``."""
  _check_name(name)
  return MODELS[name].default_widths()


def validate_widths(name: str, widths: Sequence[int] | None) -> list[int]:
  """Checks a width list for model ``name`` without building it; returns it as a list of ints.

  Raises:
    ValueError: unknown name, or a width list :func:`get_model` would reject (saying what was expected).
  """
  _check_name(name)
  return MODELS[name].validate_widths(widths)


def input_size(name: str) -> tuple[int, int]:
  """The spatial input size ``(h, w)`` at which MACs are counted (32x32 for CIFAR, 224x224 for ImageNet)."""
  _check_name(name)
  return MODELS[name].input_hw


def load_pruned(path: str | os.PathLike[str]) -> nnx.Module:
  """Loads a model checkpoint (written by :func:`models.checkpoint.save`, as the pruning program writes its
  models) as a ready NNX model (eval mode), with its pruned widths: a zoo model rebuilt at its widths, a factory
  model (``model.name = "package.module:function"``) rebuilt by calling the factory and cutting its model to the
  checkpoint's plan (:func:`hsic_jax.thin_model`), of the user's own class.

  Args:
    path: a checkpoint directory. For a run of the program, ``train.workdir.model_checkpoint(workdir)`` names its
      newest model (the fine-tuned one, else the pruned one, else the dense one). The pruning plan, where there is
      one, is in ``models.checkpoint.read_meta(path)["plan"]``.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: not a model checkpoint (a run's workdir, for instance), a corrupt one, or one whose arrays do not
      match its widths.
  """
  from models import checkpoint  # pylint: disable=import-outside-toplevel  (orbax only when loading)
  root = pathlib.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"{root} does not exist; expected a model checkpoint directory")
  try:
    checkpoint.read_meta(root)
  except ValueError as e:
    raise ValueError(f"{e}; for a run's workdir, pass train.workdir.model_checkpoint(workdir), its newest "
                     "model") from e
  return checkpoint.load(root)


def random_model(name: str, widths: Sequence[int] | None = None, *, num_classes: int | None = None,
                 seed: int = 0) -> nnx.Module:
  """Model ``name`` with He-normal kernels (``N(0, 2 / fan_in)``, ``fan_in`` = the product of a kernel's input
  axes), zero biases and identity BatchNorm (scale 1, bias 0, mean 0, var 1), drawn in NumPy from ``seed``.

  :func:`get_model` initialises eagerly, compiling every initializer on first use (about 8 s for a ResNet-20 on a
  CPU); here the shapes come from an abstract model and the values from NumPy, for workloads that need a model
  quickly and do not care for its accuracy (timings, tests). Returned in eval mode.

  Raises:
    ValueError: as :func:`get_model`.
  """
  from models import checkpoint  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)

  def init(path: tuple[object, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    shape, last = tuple(leaf.shape), str(getattr(path[-1], "key", path[-1]))
    if last == "kernel":
      return (rng.normal(size=shape) * math.sqrt(2.0 / math.prod(shape[:-1]))).astype(np.float32)
    return (np.ones if last in ("scale", "var") else np.zeros)(shape, np.float32)

  values = jax.tree_util.tree_map_with_path(init, checkpoint.abstract_state(name, widths, num_classes))
  return checkpoint.build_with_state(name, widths, num_classes, values)


def model_name(model: nnx.Module) -> str:
  """The registry name of a model instance (inverse of :func:`get_model`)."""
  if isinstance(model, ResNetCifar):
    return f"resnet{model.depth}"
  if isinstance(model, VGG16):
    return "vgg16"
  if isinstance(model, ResNet50):
    return "resnet50"
  if isinstance(model, GoogLeNet):
    return "googlenet"
  if isinstance(model, MobileNetV2):
    return "mobilenetv2_imagenet" if model.imagenet else "mobilenetv2"
  raise ValueError(f"model of type {type(model).__name__} is not one of the registry's architectures")


__all__ = ["MODELS", "ModelEntry", "get_model", "default_widths", "validate_widths", "input_size", "load_pruned",
           "random_model", "model_name", "set_compute_dtype", "compute_dtype", "Tap",
           "Taps", "ResNetCifar", "VGG16", "ResNet50", "GoogLeNet", "MobileNetV2"]
