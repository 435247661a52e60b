"""Multiply-accumulates (MACs) and parameter counts of the registry's models, for any width list.

Counted by :func:`hsic_jax.count_macs`, per layer and in total, at batch 1 and the model's input size (32x32 CIFAR,
224x224 ImageNet):

- conv: ``MACs = H_out * W_out * C_out * (C_in / groups) * k_h * k_w`` = output positions x ``prod(kernel.shape)``;
- fully connected: ``MACs = C_in * C_out``;
- params: every ``nnx.Param`` (kernels, biases, BatchNorm scale and bias); BatchNorm running statistics are not
  parameters. BN, ReLU, pooling and additions cost no MACs (thop-style "FLOPs" add BN terms; compare ratios).

For a registry model the trace is done once (dense widths, on an abstract model) and cached as a
:func:`hsic_jax.cost_fn` over the model's declared channel groups: a width list gives each group with
``width_indices`` its width, so :func:`count` costs about a millisecond, fast enough for a lambda search;
``count(..., exact=True)`` re-traces the model built with the given widths.

>>> count("resnet56").macs
125485696
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import hsic_jax as hj
import models as registry
from models._common import check_num_classes

LayerCount = hj.LayerCost
"""One layer's row of a :class:`Count` (see :class:`hsic_jax.LayerCost`)."""


@dataclasses.dataclass(frozen=True)
class Count:
  """MACs and params of one model: per-layer rows in forward order, and totals; ``num_classes`` is the classifier
  width the model was built with (None when the model does not say) and ``input_hw`` the input size counted at."""

  model: str
  widths: tuple[int, ...]
  layers: tuple[LayerCount, ...]
  macs: int
  params: int
  num_classes: int | None = None
  input_hw: tuple[int, int] | None = None

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.model, "widths": list(self.widths), "num_classes": self.num_classes,
            "input_hw": None if self.input_hw is None else list(self.input_hw), "macs": self.macs,
            "params": self.params, "layers": [dataclasses.asdict(layer) for layer in self.layers]}


def _input(input_hw: tuple[int, int]) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, int(input_hw[0]), int(input_hw[1]), 3), jnp.float32)


def count_model(model: nnx.Module, input_hw: tuple[int, int], *, name: str = "") -> Count:
  """Counts MACs and params of any NHWC ``model`` (concrete or abstract) at ``input_hw`` with 3 input channels
  (:func:`hsic_jax.count_macs` in evaluation mode; the model itself is not changed)."""
  cost = hj.count_macs(model, _input(input_hw))
  return Count(name, tuple(getattr(model, "widths", ())), cost.layers, cost.macs, cost.params,
               getattr(model, "num_classes", None), tuple(input_hw))


@functools.lru_cache(maxsize=None)
def _structure(name: str, num_classes: int | None, input_hw: tuple[int, int]
               ) -> tuple[Callable[[Mapping[str, int]], hj.Cost], tuple[tuple[str, int, int], ...], int]:
  """The cached cost function of registry model ``name`` over its declared groups, each group with a width-list
  entry as ``(group name, width index, group size)``, and the class count."""
  model = nnx.eval_shape(lambda: registry.get_model(name, num_classes=num_classes, rngs=nnx.Rngs(0)))
  groups = model.channel_groups()
  cost = hj.cost_fn(model, _input(input_hw), groups=groups)
  indexed = tuple((g.name, g.width_indices[0], g.size) for g in groups if g.width_indices)
  return cost, indexed, int(model.num_classes)


def count(name: str, widths: Sequence[int] | None = None, *, num_classes: int | None = None,
          exact: bool = False, input_hw: tuple[int, int] | None = None) -> Count:
  """MACs and params of registry model ``name`` built with ``widths`` (default: dense), per layer and total.

  Args:
    name: a name in :data:`models.MODELS`.
    widths: the width list (validated as :func:`models.get_model` does); ``None`` for the dense model.
    num_classes: classifier outputs (default per model).
    exact: trace the model built with these widths instead of using the cached structure (slower; same result).
    input_hw: the input size to count at (default: the model's, :func:`models.input_size`), e.g. a CIFAR ResNet
      run on 16x16 images.

  Returns:
    A :class:`Count` with rows in forward order.
  """
  hw = registry.input_size(name) if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
  if exact:
    model = nnx.eval_shape(lambda: registry.get_model(name, widths, num_classes=num_classes, rngs=nnx.Rngs(0)))
    return count_model(model, hw, name=name)
  ws = registry.validate_widths(name, widths)
  cost, indexed, classes = _structure(name, None if num_classes is None else check_num_classes(num_classes), hw)
  if any(ws[i] > size for _, i, size in indexed):  # wider than the dense model: its shapes are not a cut of it
    return count(name, ws, num_classes=num_classes, exact=True, input_hw=hw)
  c = cost({group: ws[i] for group, i, _ in indexed})
  return Count(name, tuple(ws), c.layers, c.macs, c.params, classes, hw)
