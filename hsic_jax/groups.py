"""Channel groups: the sets of parameter slices that produce or consume one set of channels.

A channel group names every place in a parameter tree where one set of channels lives: the producing conv's output
axis, its BatchNorm scale/bias/mean/var, the consuming conv's input axis, a Dense kernel's input rows after a
flatten, both axes of a depthwise conv, and every conv tied to one residual stream. Removing channel ``i`` of a group
removes index ``i`` from every one of its slices at once.

Paths are key tuples of the pure state dict (``nnx.to_pure_dict(nnx.state(model))``), for example
``("stage1", "block0", "conv1", "kernel")``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class ChannelSlice:
  """One axis of one parameter leaf that is indexed by a group's channels.

  Attributes:
    path: key path of the leaf in the pure state dict.
    axis: the leaf axis indexed by the channels (negative values count from the end).
    role: ``"out"`` for the producing side (conv/dense output axis, its bias, BatchNorm scale/bias/mean/var),
      ``"in"`` for a consumer (a conv's or dense's input axis).
    offset: where the group's channels start along the axis, when several groups are concatenated on it
      (e.g. an inception module's branches feeding the next conv).
    spatial: number of spatial positions per channel when a consumer reads a channels-last flatten
      (NHWC -> N, H*W*C): channel ``c`` then occupies rows ``p * C_total + offset + c`` for ``p < spatial``.
  """

  path: Path
  axis: int
  role: Literal["out", "in"] = "out"
  offset: int = 0
  spatial: int = 1


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """A set of channels and every parameter slice that produces or consumes them.

  Attributes:
    name: stable, readable name (e.g. ``"stage2/block0/mid"``).
    size: number of channels in the group.
    members: the parameter slices indexed by the group's channels.
    prunable: whether a pruning method may remove channels of this group.
    width_indices: entries of the model's width list that equal this group's size, so that the new widths of a
      pruned model follow from the groups' kept counts.
  """

  name: str
  size: int
  members: tuple[ChannelSlice, ...]
  prunable: bool = True
  width_indices: tuple[int, ...] = ()
