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
from collections.abc import Sequence
from typing import Any, Literal

import jax

__all__ = [
    "ChannelGroup",
    "ChannelSlice",
    "Path",
    "flatten_state",
    "keypath_to_path",
    "path_str",
]


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
    note: free text, e.g. why a derived group is not prunable ("network output", "grouped convolution").
  """

  name: str
  size: int
  members: tuple[ChannelSlice, ...]
  prunable: bool = True
  width_indices: tuple[int, ...] = ()
  note: str = ""


def keypath_to_path(keypath: Sequence[Any]) -> Path:
  """Converts a JAX key path (``DictKey``, ``SequenceKey``, ``GetAttrKey`` entries) to a plain ``Path``.

  The trailing ``.value`` that an ``nnx.State`` adds for each ``Variable`` is dropped, so the paths of an
  ``nnx.State`` and of its pure dict (``nnx.to_pure_dict``) agree.

  >>> import jax
  >>> keypath_to_path((jax.tree_util.DictKey("conv1"), jax.tree_util.DictKey("kernel")))
  ('conv1', 'kernel')
  """
  path: list[str | int] = []
  for key in keypath:
    if isinstance(key, jax.tree_util.DictKey):
      path.append(key.key)
    elif isinstance(key, jax.tree_util.SequenceKey):
      path.append(key.idx)
    elif isinstance(key, jax.tree_util.GetAttrKey):
      path.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      path.append(key.key)
    else:
      path.append(str(key))
  if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
    path.pop()
  return tuple(path)


def flatten_state(state: Any) -> dict[Path, Any]:
  """Returns ``{path: leaf}`` for every leaf of a state pytree (a pure dict or an ``nnx.State``), in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return {keypath_to_path(keypath): leaf for keypath, leaf in leaves}


def path_str(path: Path) -> str:
  """Joins a path with ``/`` for messages and names: ``("stage1", 0, "conv1")`` -> ``"stage1/0/conv1"``."""
  return "/".join(str(key) for key in path)
