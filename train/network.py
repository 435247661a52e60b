"""What the program knows of its model, the same for a zoo model and a user's: how to build it, its channel groups,
its decisions, the exact cost of any widths, the thin model, and how it is saved.

``model.name`` is a zoo name (``models.MODELS``: ``resnet56``, ``vgg16``, ...) or a factory path,
``"package.module:function"`` or ``"path/to/file.py:function"`` (:mod:`models.factory`), called with
``model.kwargs`` (and ``num_classes``, ``rngs`` where it takes them). Past building, every model goes the same way:

- channel groups: the model's own ``channel_groups()`` where it declares them (the zoo does, with the width-list
  entries each group sets), else :func:`hsic_jax.derive_model_groups` on the model's jaxpr;
- decisions (one per prunable group: the layers reading its channels) and calibration taps:
  :func:`hsic_jax.taps.decisions` and :func:`hsic_jax.taps.calibration_problems`, read from the jaxpr;
- MACs and params of any widths: :func:`hsic_jax.cost_fn`, at the data's image size, batch 1;
- the thin model: :func:`hsic_jax.thin_model` (the zoo's classes rebuild themselves at new widths; another class
  has its layers resized and is checked by running it on an example input);
- checkpoints: :mod:`models.checkpoint`, which records a factory model's path, kwargs and input shape, and a pruned
  model's plan, so that ``models.load_pruned`` rebuilds either.

>>> import ml_collections
>>> cfg = ml_collections.ConfigDict({"model": {"name": "resnet20", "kwargs": {}, "widths": None},
...                                  "data": {"image_size": 32, "mean": (0.5, 0.5, 0.5)}})
>>> net = Network.from_config(cfg)
>>> net.input_shape, net.factory is None
((2, 32, 32, 3), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

import hsic_jax as hj
import models
from models import factory as factory_lib


def model_groups(model: nnx.Module, example: Any) -> list[hj.ChannelGroup]:
  """The channel groups of ``model``: declared (``model.channel_groups()``) where it declares them (the zoo's, with
  the width-list entries each sets), else derived from its jaxpr on ``example`` (:func:`hsic_jax.derive_model_groups`)."""
  declare = getattr(model, "channel_groups", None)
  if callable(declare):
    return list(declare())
  return hj.derive_model_groups(model, example)


def model_decisions(model: nnx.Module, example: Any, groups: Sequence[hj.ChannelGroup] | None = None
                    ) -> list[hj.taps.Decision]:
  """One decision per prunable group of ``model`` (``groups``, default :func:`model_groups`), in forward order,
  with the layers reading its channels (:func:`hsic_jax.taps.decisions`, from the jaxpr on ``example``).

  Raises:
    ValueError: a model with no prunable group.
  """
  groups = model_groups(model, example) if groups is None else groups
  prunable = [g for g in groups if g.prunable]
  if not prunable:
    raise ValueError(f"the {type(model).__name__} has no prunable channel group: nothing to prune (every group "
                     "found is fixed: the input's, the output's, or one an unregistered operation touches)")
  return hj.taps.decisions(model, example, groups=prunable)


def zoo_example(model: nnx.Module) -> np.ndarray:
  """Two zero images at a zoo model's input size (:func:`models.input_size`).

  Raises:
    ValueError: not a zoo model (pass its decisions, or an example input, explicitly).
  """
  try:
    name = models.model_name(model)
  except ValueError as e:
    raise ValueError(f"{e}: its input size is not known here; pass decisions= (train.network.model_decisions(model, "
                     "example)) or an example input") from e
  h, w = models.input_size(name)
  return np.zeros((2, h, w, 3), np.float32)


@dataclasses.dataclass(frozen=True)
class Network:
  """The program's model: a zoo name or a factory, with the input shape everything is traced at.

  Attributes:
    name: ``model.name``: a zoo name or a factory path.
    kwargs: ``model.kwargs``, the factory's keyword arguments (a zoo model takes none).
    widths: ``model.widths``, a zoo model's dense width list (``None``: its default).
    input_shape: ``(2, image_size, image_size, channels)``, channels from the data's normalisation: the example
      input everything is traced on (two images, so that no axis of size 1 hides the batch; costs are counted at
      batch 1).
  """

  name: str
  kwargs: Mapping[str, Any]
  widths: tuple[int, ...] | None
  input_shape: tuple[int, ...]

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> Network:
    """The network of a config (``model.*`` and the data's image size).

    Raises:
      ValueError: an unknown zoo name (listing them), a malformed factory path, ``model.kwargs`` for a zoo model,
        ``model.widths`` for a factory model.
    """
    name = str(cfg.model.name)
    kwargs = cfg.model.get("kwargs", None)
    kwargs = kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs or {})
    widths = None if cfg.model.widths is None else tuple(int(w) for w in cfg.model.widths)
    size = int(cfg.data.image_size)
    shape = (2, size, size, len(tuple(cfg.data.mean)))
    if factory_lib.is_factory(name):
      if widths is not None:
        raise ValueError(f"model.widths is for the zoo's models; the factory {name!r} takes its sizes from "
                         "model.kwargs")
      factory_lib.FactorySpec(name, kwargs, shape)  # checks the path's form
    else:
      if name not in models.MODELS:
        raise ValueError(f"unknown model.name {name!r}; expected one of {sorted(models.MODELS)}, or a factory "
                         "'package.module:function' returning an NNX model")
      if kwargs:
        raise ValueError(f"model.kwargs {sorted(kwargs)} is for a factory model; the zoo's {name} is set by "
                         "model.widths")
    return cls(name, kwargs, widths, shape)

  @property
  def factory(self) -> factory_lib.FactorySpec | None:
    """The factory spec of a user's model; ``None`` for a zoo model."""
    if not factory_lib.is_factory(self.name):
      return None
    return factory_lib.FactorySpec(self.name, self.kwargs, self.input_shape)

  def example(self) -> np.ndarray:
    """Zeros of the input shape: what the jaxpr is traced on (only its shape matters)."""
    return np.zeros(self.input_shape, np.float32)

  def build(self, *, num_classes: int, seed: int) -> nnx.Module:
    """A freshly initialised model (for pre-training here)."""
    spec = self.factory
    if spec is None:
      return models.get_model(self.name, None if self.widths is None else list(self.widths),
                              num_classes=num_classes, rngs=nnx.Rngs(seed))
    return spec.build(num_classes=num_classes, rngs=nnx.Rngs(seed))

  def check_builds(self) -> None:
    """Builds a factory model abstractly (nothing initialised), so that a factory that cannot be imported, takes
    other kwargs or returns no NNX module is refused before any work; a no-op for a zoo model.

    Raises:
      ValueError: as :func:`models.factory.build`.
    """
    if self.factory is not None:
      factory_lib.build_abstract(self.name, self.kwargs, num_classes=2)

  def check(self, model: nnx.Module, num_classes: int, where: str) -> None:
    """Refuses a dense model that is not this network for ``num_classes`` classes.

    Raises:
      ValueError: another zoo architecture or widths, a model that fails on the input shape, or another class count.
    """
    if self.factory is None:
      try:
        name = models.model_name(model)
      except ValueError:
        name = type(model).__name__
      if name != self.name:
        raise ValueError(f"the dense model at {where} is a {name}, but model.name is {self.name!r}")
      if self.widths is not None and list(model.widths) != list(self.widths):
        raise ValueError(f"the dense model has widths {model.widths}, but model.widths is {list(self.widths)}")
    got = factory_lib.num_outputs(model, self.example())
    if got != num_classes:
      raise ValueError(f"the dense model has {got} classes but the data set has {num_classes}; expected a model "
                       "trained on this data set")

  def groups(self, model: nnx.Module) -> list[hj.ChannelGroup]:
    """The model's channel groups (:func:`model_groups`)."""
    return model_groups(model, self.example())

  def decisions(self, model: nnx.Module, groups: Sequence[hj.ChannelGroup] | None = None) -> list[hj.taps.Decision]:
    """One decision per prunable group, in forward order (:func:`model_decisions`)."""
    return model_decisions(model, self.example(), groups)

  def cost(self, model: nnx.Module, groups: Sequence[hj.ChannelGroup] | None = None
           ) -> Callable[[Mapping[str, int] | None], hj.Cost]:
    """``widths per group name -> Cost`` (MACs and params at batch 1), traced once."""
    groups = self.groups(model) if groups is None else groups
    return hj.cost_fn(model, self.example(), groups=groups)

  def thin(self, model: nnx.Module, keep: Mapping[str, Any]) -> tuple[nnx.Module, hj.PrunePlan]:
    """The model with only the kept channels of each group (:func:`hsic_jax.thin_model`), and the plan."""
    groups = self.groups(model)
    widths = getattr(model, "widths", None)
    plan = hj.prune(nnx.to_pure_dict(nnx.state(model)), groups, keep,
                    widths=None if widths is None else list(widths)).plan
    return hj.thin_model(model, groups, plan, self.example()), plan

  def save(self, model: nnx.Module, path: Any, extra: Mapping[str, Any]) -> None:
    """Saves ``model`` as a model checkpoint (:func:`models.checkpoint.save`), a factory model with its spec."""
    from models import checkpoint  # pylint: disable=import-outside-toplevel  (orbax only when saving)
    checkpoint.save(model, path, extra=extra, factory=self.factory)

