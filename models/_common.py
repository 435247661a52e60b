"""Building blocks shared by the model definitions: layers, width validation and channel-group members.

All models are NHWC, float32, and follow PyTorch's numerics where weights are imported from PyTorch:
BatchNorm ``y = scale * (x - mean) / sqrt(var + 1e-5) + bias`` with running statistics updated as
``stat <- 0.9 * stat + 0.1 * batch_stat`` (PyTorch momentum 0.1), and explicit symmetric conv padding
(``SAME`` in Flax pads asymmetrically for stride 2, PyTorch does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice, Path

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: running = m * running + (1 - m) * batch, i.e. PyTorch momentum 0.1.

# He normal (fan_out), the usual initialisation of conv nets trained with ReLU.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class Tap(NamedTuple):
  """What a calibration tap records for one pruning decision (one consumer layer).

  Attributes:
    input: the consumer layer's input, ``(n, h, w, c)``; channel ``c`` is the decision's candidate channel.
      For a Dense consumer the input is the pooled feature shaped ``(n, 1, 1, c)``.
    output: the consumer's output before its BatchNorm (and before any activation): ``(n, h', w', c')`` for a
      conv, ``(n, c')`` for a Dense layer.
  """

  input: jax.Array
  output: jax.Array


Taps = dict[str, Tap]


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """A 2-D conv with PyTorch's symmetric padding ``kernel // 2`` on each side."""
  pad = kernel // 2
  return nnx.Conv(
      in_ch,
      out_ch,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=bias,
      kernel_init=conv_init,
      rngs=rngs,
  )


def batch_norm(ch: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm over the last axis with PyTorch's defaults (eps 1e-5, momentum 0.1)."""
  return nnx.BatchNorm(ch, momentum=BN_MOMENTUM, epsilon=BN_EPS, rngs=rngs)


def max_pool(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
  """Max pool with PyTorch semantics (implicit ``-inf`` padding)."""
  return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes: ``(n, h, w, c) -> (n, c)``."""
  return jnp.mean(x, axis=(1, 2))


# ------------------------------------------------------------------------------------------------------------------
# Width validation.


def check_num_classes(num_classes: Any) -> int:
  """Returns ``num_classes`` as an int, or raises ValueError unless it is an int (Python or NumPy) >= 1 (10.0 is
  refused)."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
  return int(num_classes)


def check_widths(model: str, widths: Sequence[int], expected_len: int, layout: str) -> list[int]:
  """Returns ``widths`` as a list of ints after checking its length and that every entry is >= 1.

  Raises:
    ValueError: naming the model, the bad value and the expected layout.
  """
  try:
    ws = [int(w) for w in widths]
  except (TypeError, ValueError) as e:
    raise ValueError(f"widths for {model!r} must be a sequence of ints, got {widths!r}") from e
  if any(int(w) != w for w in widths):
    raise ValueError(f"widths for {model!r} must be integers, got {list(widths)!r}")
  if len(ws) != expected_len:
    raise ValueError(f"widths for {model!r} must have {expected_len} entries ({layout}); got {len(ws)}")
  bad = [(i, w) for i, w in enumerate(ws) if w < 1]
  if bad:
    raise ValueError(f"widths for {model!r} must all be >= 1; got {bad[:5]} as (index, width)")
  return ws


# ------------------------------------------------------------------------------------------------------------------
# Channel-slice helpers: where a set of channels lives in the pure state dict.


def conv_out(path: Path, *, bias: bool = False) -> tuple[ChannelSlice, ...]:
  """Output axis of a conv kernel ``(kh, kw, in, out)`` (and its bias)."""
  members = [ChannelSlice(path + ("kernel",), 3, "out")]
  if bias:
    members.append(ChannelSlice(path + ("bias",), 0, "out"))
  return tuple(members)


def conv_in(path: Path, *, offset: int = 0) -> tuple[ChannelSlice, ...]:
  """Input axis of a conv kernel ``(kh, kw, in, out)``."""
  return (ChannelSlice(path + ("kernel",), 2, "in", offset=offset),)


def depthwise(path: Path) -> tuple[ChannelSlice, ...]:
  """A depthwise conv ``(kh, kw, 1, c)``: channel ``i`` in is channel ``i`` out, indexed on the output axis."""
  return (ChannelSlice(path + ("kernel",), 3, "out"),)


def bn(path: Path) -> tuple[ChannelSlice, ...]:
  """A BatchNorm's per-channel scale, bias and running mean/var."""
  return tuple(ChannelSlice(path + (leaf,), 0, "out") for leaf in ("scale", "bias", "mean", "var"))


def dense_out(path: Path) -> tuple[ChannelSlice, ...]:
  """Output axis of a Dense kernel ``(in, out)`` and its bias."""
  return (ChannelSlice(path + ("kernel",), 1, "out"), ChannelSlice(path + ("bias",), 0, "out"))


def dense_in(path: Path, *, offset: int = 0, spatial: int = 1) -> tuple[ChannelSlice, ...]:
  """Input rows of a Dense kernel ``(in, out)``."""
  return (ChannelSlice(path + ("kernel",), 0, "in", offset=offset, spatial=spatial),)


def group(
    name: str,
    size: int,
    *member_lists: tuple[ChannelSlice, ...],
    prunable: bool,
    width_indices: Sequence[int] = (),
) -> ChannelGroup:
  """Builds a :class:`ChannelGroup` from member tuples."""
  members = tuple(m for ms in member_lists for m in ms)
  return ChannelGroup(name, size, members, prunable=prunable, width_indices=tuple(width_indices))


def p(name: str) -> Path:
  """``"stage1/block0/conv1"`` -> ``("stage1", "block0", "conv1")``."""
  return tuple(name.split("/"))


class WidthModel(nnx.Module):
  """Base of the architectures: keeps the width list and class count a model was built with."""

  def _set_widths(self, widths: Sequence[int], num_classes: int) -> None:
    self.num_classes = check_num_classes(num_classes)
    self._widths = tuple(widths)

  @property
  def widths(self) -> list[int]:
    """The width list this model was built with."""
    return list(self._widths)

  def with_widths(self, widths: Sequence[int]) -> nnx.Module:
    """This architecture with the same class count built at ``widths``, abstractly (``nnx.eval_shape``: no array
    is allocated): the hook :func:`hsic_jax.thin_model` rebuilds a pruned model with."""
    import models  # pylint: disable=import-outside-toplevel  (the registry imports this module)
    name = models.model_name(self)
    return nnx.eval_shape(lambda: models.get_model(name, list(widths), num_classes=self.num_classes,
                                                   rngs=nnx.Rngs(0)))
