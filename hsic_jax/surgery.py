"""Channel surgery: pure functions that remove channels from a state pytree, by channel group.

Removing channels ``R`` of a group ``g`` deletes, from every member slice ``(path, axis, offset, spatial)`` of
``g``, the positions ``p * C + offset + r`` for ``r`` in ``R`` and ``p < spatial``, where ``C = n_axis / spatial``
(see :class:`hsic_jax.groups.ChannelSlice`). Groups compose: several groups may index one leaf along one axis
(concatenation, at different offsets) or along different axes (a conv's input and output), and a leaf keeps the
positions that no group removes. Optimizer-state subtrees that mirror the parameters (momentum ``trace``, Adam
``mu``/``nu``) are cut the same way (a leaf in them that follows a cut axis without mirroring its parameter, such as
a factored moment, is refused), and a :class:`PrunePlan` records the cut so that a pruned checkpoint can be rebuilt
from the dense one (:func:`apply_plan`).

:func:`thin_model` turns the cut state into a working model of the same class.

:func:`mask` is the reference that surgery is checked against: it zeroes the removed channels in the dense state
instead of deleting them. Zeroing every consumer ("in") slice removes the channels' contribution exactly, also
through residual adds, so a physically pruned model computes the same function as the masked dense one.

Surgery changes shapes, so it runs eagerly, not under ``jit``: leaves are cut on the host with numpy and put back
where they were (a committed jax array on its sharding when that still divides, numpy stays numpy).

>>> import numpy as np
>>> from hsic_jax.groups import ChannelGroup, ChannelSlice
>>> state = {"conv": {"kernel": np.ones((3, 3, 3, 4)), "bias": np.arange(4.0)}, "fc": {"kernel": np.ones((4, 2))}}
>>> group = ChannelGroup("conv", 4, (ChannelSlice(("conv", "kernel"), 3, "out"),
...                                  ChannelSlice(("conv", "bias"), 0, "out"), ChannelSlice(("fc", "kernel"), 0, "in")))
>>> result = prune(state, [group], {"conv": [1, 3]})
>>> result.state["conv"]["bias"], result.state["fc"]["kernel"].shape
(array([1., 3.]), (2, 2))
>>> mask(state, [group], {"conv": [1, 3]})["fc"]["kernel"][:, 0]
array([0., 1., 0., 1.])
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsic_jax._budget import round_width  # its home is hsic_jax.budget; kept importable here
from hsic_jax.groups import ChannelGroup, ChannelSlice, Path, flatten_state, keypath_to_path, path_str

__all__ = [
    "PrunePlan",
    "PruneResult",
    "apply_plan",
    "keep_top_k",
    "mask",
    "prune",
    "round_width",
    "thin_model",
]


_PLAN_FORMAT = 1
# BatchNorm variance-like leaves stay untouched by `mask`: zeroing them would divide by sqrt(eps) (or by zero).
_VARIANCE_NAMES = frozenset({"var", "variance", "running_var", "moving_var", "moving_variance"})


@dataclasses.dataclass(frozen=True)
class PrunePlan:
  """What a pruning did, enough to rebuild the pruned state from the dense one.

  Attributes:
    sizes: original size of every group named in the keep sets.
    keep: kept channel indices (sorted) of every such group.
    widths: the model's width list before pruning (``None`` if not given).
    new_widths: the width list after pruning (``None`` if ``widths`` was not given).
  """

  sizes: Mapping[str, int]
  keep: Mapping[str, tuple[int, ...]]
  widths: tuple[int, ...] | None = None
  new_widths: tuple[int, ...] | None = None

  def to_json(self) -> str:
    """Serialises the plan as JSON (group order preserved)."""
    return json.dumps({
        "format": _PLAN_FORMAT,
        "groups": [{"name": n, "size": self.sizes[n], "keep": list(self.keep[n])} for n in self.keep],
        "widths": None if self.widths is None else list(self.widths),
        "new_widths": None if self.new_widths is None else list(self.new_widths),
    })

  def then(self, second: PrunePlan) -> PrunePlan:
    """The plan of pruning by this plan, then by ``second`` (a plan of the model this one left): one plan of the
    first model, so that :func:`apply_plan` on the original state gives the twice-pruned state (pruning in rounds).

    A group in both keeps ``self.keep[g][i]`` for every ``i`` in ``second.keep[g]``; a group in one plan only keeps
    that plan's channels.

    >>> first = PrunePlan({"a": 6}, {"a": (0, 2, 3, 5)})
    >>> first.then(PrunePlan({"a": 4, "b": 3}, {"a": (1, 3), "b": (0, 2)})).keep
    {'a': (2, 5), 'b': (0, 2)}

    Raises:
      ValueError: ``second`` sizes a group of this plan other than what this plan kept of it.
    """
    if not isinstance(second, PrunePlan):
      raise ValueError(f"second must be a PrunePlan, got {type(second).__name__}")
    sizes, keep = dict(self.sizes), dict(self.keep)
    for name, idx in second.keep.items():
      if name in self.keep:
        if int(second.sizes[name]) != len(self.keep[name]):
          raise ValueError(f"group {name!r}: the second plan has {second.sizes[name]} channels, but the first kept "
                           f"{len(self.keep[name])}; expected a plan of the model the first plan left")
        keep[name] = tuple(int(self.keep[name][i]) for i in idx)
      else:
        sizes[name], keep[name] = int(second.sizes[name]), tuple(int(i) for i in idx)
    return PrunePlan(sizes, keep, self.widths, second.new_widths if second.new_widths is not None else
                     self.new_widths)

  @classmethod
  def from_json(cls, text: str) -> PrunePlan:
    """Parses :meth:`to_json` output.

    Raises:
      ValueError: if ``text`` is not a plan of a known format.
    """
    try:
      data = json.loads(text)
      fmt = data.get("format")
      if fmt == _PLAN_FORMAT:
        sizes = {g["name"]: int(g["size"]) for g in data["groups"]}
        keep = {g["name"]: tuple(int(i) for i in g["keep"]) for g in data["groups"]}
        widths = None if data["widths"] is None else tuple(int(w) for w in data["widths"])
        new_widths = None if data["new_widths"] is None else tuple(int(w) for w in data["new_widths"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # JSONDecodeError is a ValueError
      raise ValueError(f"text is not a PrunePlan JSON ({e!r}); expected the output of PrunePlan.to_json") from e
    if fmt != _PLAN_FORMAT:
      raise ValueError(f"plan format {fmt!r} is not supported; expected {_PLAN_FORMAT}")
    bad = {name: size for name, size in sizes.items() if size < 1}
    if bad:
      raise ValueError(f"the plan's group sizes must be >= 1, got {bad}")
    return cls(sizes, keep, widths, new_widths)


class PruneResult(NamedTuple):
  """The result of :func:`prune`.

  Attributes:
    state: the pruned state, of the same kind as the input (pure dict or ``nnx.State``).
    opt_state: the pruned optimizer state (``None`` if none was given).
    widths: the new width list (``None`` if no width list was given).
    plan: the record of the cut.
  """

  state: Any
  opt_state: Any
  widths: list[int] | None
  plan: PrunePlan


# ----------------------------------------------------------------------------------------------------------------
# Choosing kept channels.


def keep_top_k(scores: Any, k: int, *, multiple: int = 1) -> np.ndarray:
  """Indices (sorted ascending) of the ``round_width(k, len(scores), multiple=multiple)`` highest scores.

  Ties go to the lower index.

  >>> keep_top_k([0.1, 0.9, 0.5, 0.7], 2).tolist()
  [1, 3]
  >>> keep_top_k([0.1, 0.9, 0.5, 0.7], 1, multiple=3).tolist()
  [1, 2, 3]

  Raises:
    ValueError: if ``scores`` is not a non-empty 1-D array of finite numbers.
  """
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"scores must be finite; got non-finite values at indices {np.flatnonzero(~np.isfinite(s))}")
  n = round_width(k, s.size, multiple=multiple)
  order = np.argsort(-s, kind="stable")
  return np.sort(order[:n])


# ----------------------------------------------------------------------------------------------------------------
# Validation.


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _channel_positions(member: ChannelSlice, channels: np.ndarray, n_axis: int) -> np.ndarray:
  """Positions along the member's axis of the given channels (all spatial copies)."""
  c_total = n_axis // member.spatial
  base = member.offset + channels
  return (np.arange(member.spatial)[:, None] * c_total + base[None, :]).reshape(-1)


def _check_groups_arg(groups: Any) -> list[ChannelGroup]:
  """``groups`` as a list, after checking that it is a sequence (any iterable) of :class:`ChannelGroup`."""
  if groups is None or isinstance(groups, (str, bytes, Mapping, ChannelGroup)) or not isinstance(groups, Iterable):
    raise ValueError(f"groups must be a sequence of ChannelGroup (e.g. model.channel_groups() or derive_groups(...)), "
                     f"got {type(groups).__name__}")
  groups = list(groups)
  for i, g in enumerate(groups):
    if not isinstance(g, ChannelGroup):
      raise ValueError(f"groups[{i}] must be a ChannelGroup, got {type(g).__name__}")
  return groups


def _check_keep_arg(keep: Any) -> Mapping[str, Any]:
  if not isinstance(keep, Mapping):
    hint = " (dict(pairs) turns (name, indices) pairs into one)" if isinstance(keep, (list, tuple)) else ""
    raise ValueError(f"keep must be a mapping from group name to kept channel indices, e.g. {{'conv1': [0, 2]}}, "
                     f"got {type(keep).__name__}{hint}")
  return keep


def _validate_groups(groups: Sequence[ChannelGroup], leaves: Mapping[Path, Any]) -> dict[str, ChannelGroup]:
  """Checks that every member of every group exists in the state with a consistent axis length."""
  by_name: dict[str, ChannelGroup] = {}
  for g in groups:
    if g.name in by_name:
      raise ValueError(f"groups contain the name {g.name!r} twice; group names must be unique")
    if g.size < 1:
      raise ValueError(f"group {g.name!r} has size {g.size}; expected >= 1")
    by_name[g.name] = g
  # (path, axis) -> list of (group, member), to check lengths and overlaps across groups.
  uses: dict[tuple[Path, int], list[tuple[ChannelGroup, ChannelSlice]]] = {}
  for g in groups:
    for m in g.members:
      path = tuple(m.path)
      if path not in leaves:
        close = [path_str(p) for p in leaves if p[-1:] == path[-1:]][:5]
        raise ValueError(f"group {g.name!r}: member path {path_str(path)!r} is not in the state; expected a leaf "
                         f"path of the state the groups were declared for (leaves ending the same way: {close})")
      shape = _leaf_shape(leaves[path])
      if not -len(shape) <= m.axis < len(shape):
        raise ValueError(f"group {g.name!r}: member {path_str(path)!r} has shape {shape}, no axis {m.axis}")
      axis = m.axis % len(shape)
      n = shape[axis]
      if m.spatial < 1 or m.offset < 0 or n % m.spatial:
        raise ValueError(f"group {g.name!r}: member {path_str(path)!r} axis {axis} has length {n}, which does not "
                         f"fit spatial={m.spatial} (expected a multiple) and offset={m.offset} (expected >= 0)")
      if m.offset + g.size > n // m.spatial:
        raise ValueError(f"group {g.name!r} has {g.size} channels but member {path_str(path)!r} axis {axis} has "
                         f"length {n} (offset {m.offset}, spatial {m.spatial}); expected at least "
                         f"{(m.offset + g.size) * m.spatial}: does the state belong to the model the groups "
                         f"describe?")
      uses.setdefault((path, axis), []).append((g, m))
  for (path, axis), ms in uses.items():
    n = _leaf_shape(leaves[path])[axis]
    if len(ms) == 1:
      g, m = ms[0]
      if m.offset == 0 and g.size * m.spatial != n:
        raise ValueError(f"group {g.name!r} has {g.size} channels but member {path_str(path)!r} axis {axis} has "
                         f"length {n}; expected {g.size * m.spatial}: does the state belong to the model the groups "
                         f"describe?")
    taken = np.zeros(n, dtype=bool)
    for g, m in ms:
      pos = _channel_positions(m, np.arange(g.size), n)
      if taken[pos].any():
        others = sorted({h.name for h, _ in ms if h is not g})
        raise ValueError(f"group {g.name!r} and one of {others} both index positions of {path_str(path)!r} axis "
                         f"{axis}; expected disjoint channel ranges (check offsets)")
      taken[pos] = True
  return by_name


def _validate_keep(keep: Mapping[str, Any], by_name: Mapping[str, ChannelGroup]) -> dict[str, np.ndarray]:
  """Returns the keep sets as sorted int arrays, after checking names, ranges, duplicates and emptiness."""
  out: dict[str, np.ndarray] = {}
  for name, idx in keep.items():
    if name not in by_name:
      known = sorted(by_name)
      shown = f"{known[:12]}" + (f" and {len(known) - 12} more" if len(known) > 12 else "")
      raise ValueError(f"keep names unknown group {name!r}; expected one of {shown}")
    g = by_name[name]
    try:
      arr = np.asarray(idx)
    except ValueError as e:  # a ragged nesting
      raise ValueError(f"keep[{name!r}] must be a 1-D sequence of channel indices, got {idx!r}") from e
    if arr.ndim != 1:
      raise ValueError(f"keep[{name!r}] must be a 1-D sequence of channel indices, got shape {arr.shape}")
    if arr.size == 0:
      raise ValueError(f"keep[{name!r}] is empty; a group is never emptied (keep at least 1 of {g.size} channels)")
    if arr.dtype == np.bool_:
      raise ValueError(f"keep[{name!r}] is a boolean mask; expected channel indices (np.flatnonzero(mask))")
    # Python ints beyond int64 make an object array: they are integers, range-checked below.
    big_ints = arr.dtype == object and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in arr)
    if not (big_ints or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
      raise ValueError(f"keep[{name!r}] must hold integer channel indices, got {arr.tolist()[:10]}")
    if np.issubdtype(arr.dtype, np.floating):
      if not np.all(np.isfinite(arr)) or not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"keep[{name!r}] must hold integer channel indices, got {arr.tolist()[:10]}")
    # The range is checked on the values given, before the cast to int64 (1e20 would wrap around to -2**63).
    bad = arr[(arr < 0) | (arr >= g.size)]
    if bad.size:
      shown = [int(i) if isinstance(i, float) and abs(i) < 2**63 else i for i in bad.tolist()[:10]]
      raise ValueError(f"keep[{name!r}] has indices {shown} out of range; expected 0 <= i < {g.size}")
    arr = np.sort(arr.astype(np.int64))
    dup = arr[1:][arr[1:] == arr[:-1]]
    if dup.size:
      raise ValueError(f"keep[{name!r}] repeats indices {np.unique(dup).tolist()[:10]}; expected unique indices")
    if not g.prunable and arr.size != g.size:
      raise ValueError(f"group {name!r} is not prunable ({g.note or 'declared fixed'}); expected all {g.size} "
                       f"channels kept or the group left out of keep")
    out[name] = arr
  return out


# ----------------------------------------------------------------------------------------------------------------
# State plumbing.


def _rebuild(state: Any, new_leaves: Mapping[Path, Any]) -> Any:
  """Returns ``state`` with each leaf replaced by ``new_leaves[path]`` (a new pytree; the input is untouched)."""
  return jax.tree_util.tree_map_with_path(lambda kp, leaf: new_leaves[keypath_to_path(kp)], state)


def _to_host(leaf: Any) -> np.ndarray:
  return np.asarray(jax.device_get(leaf))


def _like(leaf: Any, value: np.ndarray) -> Any:
  """``value`` as the same kind of array as ``leaf``: numpy stays numpy, a jax array goes back to its devices."""
  if not isinstance(leaf, jax.Array):
    return value
  if getattr(leaf, "committed", False):
    try:
      return jax.device_put(value, leaf.sharding)
    except ValueError:  # a partitioned axis that no longer divides evenly: leave placement to the caller
      pass
  return jnp.asarray(value)  # uncommitted, like the input: jit does not recompile for a new placement


def _keep_masks(groups: Mapping[str, ChannelGroup], keep: Mapping[str, np.ndarray], leaves: Mapping[Path, Any],
                roles: Sequence[str] = ("in", "out")) -> dict[tuple[Path, int], np.ndarray]:
  """Boolean keep masks per (leaf path, axis) over the positions the keep sets remove."""
  masks: dict[tuple[Path, int], np.ndarray] = {}
  for name, kept in keep.items():
    g = groups[name]
    removed = np.setdiff1d(np.arange(g.size), kept)
    if removed.size == 0:
      continue
    for m in g.members:
      if m.role not in roles:
        continue
      path = tuple(m.path)
      shape = _leaf_shape(leaves[path])
      axis = m.axis % len(shape)
      mask = masks.setdefault((path, axis), np.ones(shape[axis], dtype=bool))
      mask[_channel_positions(m, removed, shape[axis])] = False
  return masks


def _slice_leaves(leaves: Mapping[Path, Any], masks: Mapping[tuple[Path, int], np.ndarray]) -> dict[Path, Any]:
  by_path: dict[Path, list[tuple[int, np.ndarray]]] = {}
  for (path, axis), m in masks.items():
    by_path.setdefault(path, []).append((axis, np.flatnonzero(m)))
  new = dict(leaves)
  # Sliced on the host with numpy: a device gather per leaf would compile once per distinct shape, eagerly.
  for path, cuts in by_path.items():
    value = _to_host(leaves[path])
    for axis, index in cuts:
      value = np.take(value, index, axis=axis)
    new[path] = _like(leaves[path], value)
  return new


def _prune_opt_state(opt_state: Any, leaves: Mapping[Path, Any],
                     masks: Mapping[tuple[Path, int], np.ndarray]) -> Any:
  """Cuts the optimizer-state leaves that mirror parameter leaves, refusing those that follow a cut axis otherwise.

  A per-parameter subtree is a mapping (or ``nnx.State``) whose leaf paths are all state paths: momentum
  ``trace``, Adam ``mu``/``nu``, Adafactor's ``v``, ``v_row`` and ``v_col``. In it, a leaf of its parameter's shape
  is cut like the parameter; a leaf of the parameter's rank with another length on an axis (other than 1) is
  refused; a leaf of another shape is kept if none of its axes has the length of one of the
  parameter's cut axes (a placeholder of shape ``(1,)``, a statistic reduced over the cut axis), and refused
  otherwise: a factored moment (Adafactor's ``v_row``/``v_col`` of a cut axis) has no per-channel layout this
  function could know. Leaves outside such subtrees (``count``) are kept.
  """
  shapes = {p: _leaf_shape(l) for p, l in leaves.items()}
  cuts: dict[Path, dict[int, np.ndarray]] = {}
  for (path, axis), m in masks.items():
    cuts.setdefault(path, {})[axis] = m

  def per_parameter(node: Any) -> bool:
    if not isinstance(node, (Mapping, nnx.State)):
      return False
    sub = flatten_state(node)
    return bool(sub) and all(p in shapes for p in sub)

  def cut(keypath: Any, node: Any) -> Any:
    if not per_parameter(node):
      return node
    sub = flatten_state(node)
    sub_masks = {}
    for p, leaf in sub.items():
      if p not in cuts:
        continue
      shape = _leaf_shape(leaf)
      if shape == shapes[p]:
        sub_masks.update({(p, axis): m for axis, m in cuts[p].items()})
        continue
      if len(shape) == len(shapes[p]) and any(a not in (1, b) for a, b in zip(shape, shapes[p])):
        # Of the parameter's rank but another length on some axis (not a broadcast 1): a moment of some other
        # parameter or model, whose channels cannot be matched to the cut ones.
        where = path_str(keypath_to_path(keypath) + p)
        raise ValueError(
            f"opt_state leaf {where!r} has shape {shape}, unlike the shape {shapes[p]} of its parameter "
            f"{path_str(p)!r}, which the pruning cuts: expected a leaf of the parameter's shape (or lengths of 1 "
            "where it reduces an axis). Pass the optimizer state of these parameters, or opt_state=None and "
            "initialise the optimizer again for the pruned parameters.")
      for axis, m in cuts[p].items():
        if m.size in shape:
          where = path_str(keypath_to_path(keypath) + p)
          raise ValueError(
              f"opt_state leaf {where!r} has shape {shape}, which has the length {m.size} of axis {axis} of parameter "
              f"{path_str(p)!r} {shapes[p]} that the pruning cuts to {int(m.sum())}, but not the parameter's shape: "
              "it is no per-channel copy of the parameter (e.g. a factored second moment, as Adafactor keeps for "
              "large parameters) and cannot be cut. Expected an optimizer state whose per-parameter leaves mirror "
              "the parameters (SGD momentum, Adam); otherwise pass opt_state=None and initialise the optimizer "
              "again for the pruned parameters.")
    return _rebuild(node, _slice_leaves(sub, sub_masks))

  return jax.tree_util.tree_map_with_path(cut, opt_state, is_leaf=per_parameter)


def _new_widths(widths: Sequence[int] | None, groups: Mapping[str, ChannelGroup],
                keep: Mapping[str, np.ndarray]) -> list[int] | None:
  if widths is None:
    return None
  new = [int(w) for w in widths]
  for name, g in groups.items():  # every group, cut or not, must describe this width list
    for i in g.width_indices:
      if not 0 <= i < len(new):
        raise ValueError(f"group {name!r} sets width index {i}, but widths has {len(new)} entries; expected the "
                         "width list of the model the groups describe")
      if new[i] != g.size:
        raise ValueError(f"widths[{i}] is {widths[i]} but group {name!r}, which sets it, has {g.size} channels; "
                         f"expected the width list of the model the groups describe")
  set_by: dict[int, str] = {}
  for name, kept in keep.items():
    g = groups[name]
    if not g.width_indices and kept.size < g.size:
      raise ValueError(f"widths cannot follow the cut of group {name!r} ({g.size} -> {kept.size} channels): the group "
                       "has no width_indices (groups from derive_groups have none), so no entry of the width list "
                       "gives its width; pass widths=None (the pruned state's shapes are the new model's) or give the "
                       "group the width_indices it sets")
    for i in g.width_indices:
      if i in set_by and new[i] != kept.size:
        raise ValueError(f"groups {set_by[i]!r} and {name!r} both set widths[{i}] but keep different counts "
                         f"({new[i]} and {kept.size})")
      new[i] = int(kept.size)
      set_by[i] = name
  return new


# ----------------------------------------------------------------------------------------------------------------
# Public API.


def prune(state: Any, groups: Sequence[ChannelGroup], keep: Mapping[str, Any], *,
          widths: Sequence[int] | None = None, opt_state: Any = None) -> PruneResult:
  """Removes from ``state`` every channel of each group in ``keep`` that is not kept.

  For a member slice ``(path, axis, offset, spatial)`` of group ``g`` with kept set ``K``, the leaf keeps, along
  ``axis``, the positions ``p * C + offset + k`` (``k`` in ``K``, ``p < spatial``, ``C = n_axis / spatial``) and
  every position that belongs to no removed channel; positions keep their original order. Groups not named in
  ``keep`` are untouched. Inputs are never modified.

  Args:
    state: the model state, a pure dict (``nnx.to_pure_dict(nnx.state(model))``) or an ``nnx.State``.
    groups: the model's channel groups.
    keep: group name -> kept channel indices, unique and in ``[0, size)``; they are sorted (the kept channels keep
      their original order whatever order is given).
    widths: the model's width list; the result's ``widths`` sets ``widths[i] = len(keep[g])`` for every ``i`` in
      ``g.width_indices``. A group that is cut must have width indices (derived groups have none).
    opt_state: an optax optimizer state for ``state``'s parameters. In every subtree whose leaves have the paths of
      state leaves (momentum ``trace``, Adam ``mu`` and ``nu``), the leaves of their parameter's shape are cut the
      same way; leaves of the parameter's rank but other lengths (not 1) are refused; leaves of other shapes are
      kept if their shape does not follow a cut axis (placeholders), and refused otherwise (factored moments such
      as Adafactor's for large parameters). Other leaves (``count``) are kept.

  Returns:
    ``PruneResult(state, opt_state, widths, plan)``; ``Model(widths)`` has exactly the pruned state's structure.

  Raises:
    ValueError: ``groups`` not a sequence of :class:`ChannelGroup` or ``keep`` not a mapping; unknown group name;
      indices out of range, duplicated or empty (a group is never emptied); a non-prunable group cut; a member path
      missing from the state or an axis length that does not match its group; a width list that does not match the
      groups or cannot follow a cut group (no width indices); an ``opt_state`` leaf that follows a cut axis but
      does not mirror its parameter, or that has its cut parameter's rank but another shape.

  >>> import numpy as np
  >>> from hsic_jax.groups import ChannelGroup, ChannelSlice
  >>> state = {"a": {"kernel": np.ones((3, 3, 3, 4))}, "b": {"kernel": np.ones((3, 3, 4, 5))}}
  >>> g = ChannelGroup("a", 4, (ChannelSlice(("a", "kernel"), 3, "out"), ChannelSlice(("b", "kernel"), 2, "in")),
  ...                  width_indices=(0,))
  >>> res = prune(state, [g], {"a": [0, 2]}, widths=[4])
  >>> res.state["a"]["kernel"].shape, res.state["b"]["kernel"].shape, res.widths
  ((3, 3, 3, 2), (3, 3, 2, 5), [2])
  """
  groups, keep = _check_groups_arg(groups), _check_keep_arg(keep)
  leaves = flatten_state(state)
  by_name = _validate_groups(groups, leaves)
  kept = _validate_keep(keep, by_name)
  new_widths = _new_widths(widths, by_name, kept)
  masks = _keep_masks(by_name, kept, leaves)
  new_state = _rebuild(state, _slice_leaves(leaves, masks))
  new_opt = None if opt_state is None else _prune_opt_state(opt_state, leaves, masks)
  plan = PrunePlan(
      sizes={n: by_name[n].size for n in kept},
      keep={n: tuple(int(i) for i in k) for n, k in kept.items()},
      widths=None if widths is None else tuple(int(w) for w in widths),
      new_widths=None if new_widths is None else tuple(new_widths),
  )
  return PruneResult(new_state, new_opt, new_widths, plan)


def apply_plan(state: Any, groups: Sequence[ChannelGroup], plan: PrunePlan, *, opt_state: Any = None) -> PruneResult:
  """Re-applies a recorded :class:`PrunePlan` to the dense ``state`` (e.g. to rebuild a pruned checkpoint).

  Args:
    state: the dense state the plan was made from.
    groups: the dense model's channel groups; every group in the plan must exist with the recorded size.
    plan: the plan (e.g. ``PrunePlan.from_json(text)``).
    opt_state: optional optimizer state, cut as in :func:`prune`.

  Returns:
    The same :class:`PruneResult` as the original :func:`prune` call.

  Raises:
    ValueError: if a plan group is missing from ``groups`` or has another size, or the state does not match.
  """
  groups = _check_groups_arg(groups)
  if not isinstance(plan, PrunePlan):
    raise ValueError(f"plan must be a PrunePlan (e.g. PrunePlan.from_json(text)), got {type(plan).__name__}")
  by_name = {g.name: g for g in groups}
  for name, size in plan.sizes.items():
    if name not in by_name:
      raise ValueError(f"plan group {name!r} is not among the groups; expected one of {sorted(by_name)}")
    if by_name[name].size != size:
      raise ValueError(f"plan group {name!r} had {size} channels but the group now has {by_name[name].size}; "
                       f"expected the groups of the dense model the plan was made from")
  result = prune(state, groups, plan.keep, widths=plan.widths, opt_state=opt_state)
  if plan.new_widths is not None and tuple(result.widths or ()) != plan.new_widths:
    raise ValueError(f"re-applying the plan gives widths {result.widths}, but the plan recorded "
                     f"{list(plan.new_widths)}; expected the groups' width_indices to be unchanged")
  return result


def mask(state: Any, groups: Sequence[ChannelGroup], keep: Mapping[str, Any], *, zero_out: bool = True) -> Any:
  """Returns the dense ``state`` with the removed channels zeroed instead of deleted.

  Every consumer (``"in"``) slice of a removed channel is zeroed, so the channel contributes nothing to any layer
  that reads it, even when it is the sum of several producers (a residual stream): the dense model then computes
  exactly what the pruned model (:func:`prune`) computes. With ``zero_out``, producer (``"out"``) slices are
  zeroed too (kernels, biases, BatchNorm scale/bias/mean), so the removed channels are also zero inside the
  network; variance leaves (``var``, ...) are left as they are, since zeroing them would divide by ``sqrt(eps)``.

  Args:
    state: the dense state (pure dict or ``nnx.State``).
    groups: the channel groups.
    keep: group name -> kept indices, as for :func:`prune`.
    zero_out: also zero the producer slices.

  Returns:
    A new state of the same structure and shapes as ``state``.

  Raises:
    ValueError: as :func:`prune`.
  """
  groups, keep = _check_groups_arg(groups), _check_keep_arg(keep)
  leaves = flatten_state(state)
  by_name = _validate_groups(groups, leaves)
  kept = _validate_keep(keep, by_name)
  roles = ("in", "out") if zero_out else ("in",)
  masks = _keep_masks(by_name, kept, leaves, roles)
  # Variance leaves are excluded by name: see the docstring.
  host: dict[Path, np.ndarray] = {}
  for (path, axis), m in masks.items():
    if str(path[-1]) in _VARIANCE_NAMES:
      continue
    value = host.get(path)
    if value is None:
      value = host[path] = _to_host(leaves[path]).copy()
    index = [slice(None)] * value.ndim
    index[axis] = ~m
    value[tuple(index)] = 0
  new = dict(leaves)
  for path, value in host.items():
    new[path] = _like(leaves[path], value)
  return _rebuild(state, new)


# ----------------------------------------------------------------------------------------------------------------
# A working model at the pruned widths.

# The hook a model class may offer to be rebuilt at new widths (see thin_model).
_WIDTHS_HOOK = "with_widths"


def _member_keys(g: ChannelGroup, ranks: Mapping[Path, int]) -> frozenset[tuple[Any, ...]]:
  keys = set()
  for m in g.members:
    path = tuple(str(k) for k in m.path)
    rank = ranks.get(path, 0)
    keys.add((path, m.axis % rank if rank else m.axis, m.role, m.offset, m.spatial))
  return frozenset(keys)


def _with_declared_width_indices(model: nnx.Module, groups: list[ChannelGroup],
                                 leaves: Mapping[Path, Any]) -> list[ChannelGroup]:
  """``groups``, each without ``width_indices`` taking those of the model's declared group with the same members
  (``model.channel_groups()``, where the model declares its groups): derived groups then set the width list too."""
  declare = getattr(model, "channel_groups", None)
  if not callable(declare) or all(g.width_indices for g in groups):
    return groups
  ranks = {tuple(str(k) for k in p): len(_leaf_shape(v)) for p, v in leaves.items()}
  declared = {_member_keys(d, ranks): d.width_indices for d in declare() if d.width_indices}
  return [g if g.width_indices else dataclasses.replace(g, width_indices=declared.get(_member_keys(g, ranks), ()))
          for g in groups]


def _vector_size(module: Any) -> int | None:
  """The channel count of a norm layer, read off its per-channel variables."""
  for name in ("scale", "bias", "mean", "var"):
    var = getattr(module, name, None)
    if isinstance(var, nnx.Variable) and getattr(var.get_value(), "shape", None):
      return int(var.get_value().shape[-1])
  return None


def _update_layer_attributes(model: nnx.Module) -> None:
  """Sets the static sizes that Flax's layers read (``in_features``, ``feature_group_count``, ``num_features``, ...)
  from the shapes of their (pruned) parameters.

  A depthwise convolution keeps one input channel per group, so its group count follows its channels; another
  grouped convolution keeps its group count (its inputs must stay); a GroupNorm keeps its ``num_groups``.
  """
  for path, mod in nnx.iter_modules(model):
    where = path_str(path) or type(mod).__name__
    if isinstance(mod, nnx.Conv):
      k = tuple(mod.kernel.get_value().shape)
      groups, old_in, old_out = mod.feature_group_count, mod.in_features, mod.out_features
      new_out, per_group = k[-1], k[-2]
      if (new_out, per_group * groups) == (old_out, old_in):
        continue
      if mod.mask is not None:
        raise ValueError(f"{where}: a masked convolution (mask of shape {tuple(mod.mask.shape)}) lost channels; "
                         "expected its mask to be cut by hand")
      if groups > 1 and old_in == groups:  # depthwise: one input channel per group, however many remain
        if (new_out * groups) % old_out:
          raise ValueError(f"{where}: depthwise convolution ({old_in} -> {old_out} channels) cut to {new_out} output "
                           f"channels; expected a multiple of its channel multiplier {old_out // groups}")
        groups = new_out * groups // old_out
      elif groups > 1 and (per_group * groups != old_in or new_out % groups):
        raise ValueError(f"{where}: grouped convolution (feature_group_count={groups}, {old_in} -> {old_out} "
                         f"channels) cut to kernel {k}; expected its input channels kept and a multiple of {groups} "
                         "output channels (a grouped convolution keeps its group count)")
      mod.in_features, mod.out_features, mod.feature_group_count = per_group * groups, new_out, groups
      if hasattr(mod, "kernel_shape"):
        mod.kernel_shape = k
    elif isinstance(mod, nnx.ConvTranspose):
      k = tuple(mod.kernel.get_value().shape)
      mod.out_features, mod.in_features = (k[-2], k[-1]) if mod.transpose_kernel else (k[-1], k[-2])
      mod.kernel_shape = k
    elif isinstance(mod, nnx.Linear):
      mod.in_features, mod.out_features = (int(n) for n in mod.kernel.get_value().shape)
    elif isinstance(mod, nnx.GroupNorm):
      n, old = _vector_size(mod), mod.num_groups * mod.group_size
      if n is not None and n != old:
        if n % mod.num_groups:
          raise ValueError(f"{where}: GroupNorm with num_groups={mod.num_groups} cut from {old} to {n} channels; "
                           f"expected a channel count divisible by {mod.num_groups}")
        mod.group_size = n // mod.num_groups
    elif isinstance(mod, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
      n = _vector_size(mod)
      if n is not None:
        mod.num_features = n


def _eval_copy(model: nnx.Module) -> tuple[Any, Any]:
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  copy.eval()
  return nnx.split(copy)


def _output_shapes(model: nnx.Module, args: Sequence[Any]) -> Any:
  graphdef, state = _eval_copy(model)
  return jax.eval_shape(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *args)


def _stale_ints(model: nnx.Module, sizes: set[int]) -> list[str]:
  """Plain ``int`` attributes of user modules equal to a cut group's dense size: widths the library cannot see."""
  found = []
  for path, mod in nnx.iter_modules(model):
    if type(mod).__module__.startswith("flax."):
      continue
    for name, value in vars(mod).items():
      if type(value) is int and value in sizes and not name.startswith("_"):  # pylint: disable=unidiomatic-typecheck
        found.append(f"{path_str(path) + '.' if path else ''}{name} = {value}")
  return found


def _check_thin(dense: nnx.Module, thin: nnx.Module, args: Sequence[Any], cut: set[int]) -> None:
  """Runs the thin model abstractly on ``args``: it must run and give the dense model's output shapes."""
  want = _output_shapes(dense, args)
  stale = _stale_ints(thin, cut)
  hint = (f"; attributes that may hold a dense width: {', '.join(stale[:8])}" if stale else
          "; a Python int attribute that holds a width, read by the forward pass, is the usual cause")
  try:
    got = _output_shapes(thin, args)
  except Exception as e:  # pylint: disable=broad-except  (any failure means the thin model is wrong)
    raise ValueError(f"the thin {type(thin).__name__} fails on the example input ({type(e).__name__}: "
                     f"{str(e)[:300]}){hint}; update them (or give the class a {_WIDTHS_HOOK}(widths) method)") from e
  shapes = lambda t: jax.tree.map(lambda v: (tuple(v.shape), str(v.dtype)), t)  # noqa: E731
  if jax.tree.structure(got) != jax.tree.structure(want) or shapes(got) != shapes(want):
    raise ValueError(f"the thin {type(thin).__name__} gives outputs {shapes(got)} on the example input, the dense "
                     f"model {shapes(want)}{hint}")


def thin_model(model: nnx.Module, groups: Sequence[ChannelGroup], keep_or_plan: Mapping[str, Any] | PrunePlan,
               *example_args: Any, eval_mode: bool = True) -> nnx.Module:
  """A working model of ``model``'s class holding only the kept channels: :func:`prune` (or :func:`apply_plan`) on
  its state, with the layers resized to match.

  Two ways, tried in this order:

  (a) The class rebuilds itself at new widths: ``model`` has a width list ``model.widths`` and a method
      ``model.with_widths(widths) -> nnx.Module`` (concrete or ``nnx.eval_shape``-abstract) building the same
      class at a width list, and every cut group has ``width_indices`` (where a group has none, those of the
      model's declared group with the same members, ``model.channel_groups()``, are used; a cut group that sets
      no width is refused). The pruned arrays go into ``model.with_widths(new_widths)``, every shape checked.
  (b) Otherwise the model's graph is copied, the pruned arrays put in, and the sizes Flax's layers keep as Python
      attributes updated from the new shapes: ``in_features``/``out_features``/``feature_group_count`` of
      ``nnx.Conv`` (a depthwise conv keeps one channel per group, another grouped conv its group count),
      ``nnx.ConvTranspose`` and ``nnx.Linear``, ``num_features`` of ``nnx.BatchNorm``/``LayerNorm``/``RMSNorm``,
      ``group_size`` of ``nnx.GroupNorm`` (which keeps ``num_groups``: it must divide the new count). A width the
      library cannot see (an ``int`` stored on a module of your own and read in the forward pass) is caught by
      running the thin model abstractly on ``example_args`` (required here): if it fails or its outputs' shapes
      differ from the dense model's, the call is refused, naming the module attributes that hold a cut group's
      dense width. (A stale width read in a way that keeps every shape, such as a slice ``x[..., :n]`` past the
      end, is not caught: compare the thin model with :func:`mask` of the dense one where in doubt.)

  The thin model then computes what :func:`mask` of the dense state computes, for groups whose removal commutes
  with zeroing (every prunable derived group). ``model`` is not changed.

  Args:
    model: the dense NNX model (concrete arrays).
    groups: its channel groups (``model.channel_groups()`` or :func:`hsic_jax.derive_model_groups`).
    keep_or_plan: group name -> kept channel indices (as for :func:`prune`), or a :class:`PrunePlan`.
    *example_args: example inputs of the model, to check the thin model (only shapes matter; required for (b),
      used for (a) when given).
    eval_mode: return the thin model in evaluation mode (``.eval()``: BatchNorm on running statistics), else in
      training mode.

  Returns:
    The thin model, of ``type(model)``.

  Raises:
    ValueError: bad ``groups``/``keep``/plan (as :func:`prune`); ``with_widths`` building other shapes than the
      pruned state's; a grouped convolution cut inside its groups, a GroupNorm whose group count no longer divides
      its channels; no ``example_args`` for (b); a thin model that fails on them or changes the output shapes.
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model must be an nnx.Module, got {type(model).__name__}")
  groups = _check_groups_arg(groups)
  pure = nnx.to_pure_dict(nnx.state(model))
  leaves = flatten_state(pure)
  hook, widths = getattr(model, _WIDTHS_HOOK, None), getattr(model, "widths", None)
  rebuild = callable(hook) and widths is not None
  by_name = {g.name: g for g in groups}
  if rebuild:
    groups = _with_declared_width_indices(model, groups, leaves)
    by_name = {g.name: g for g in groups}
    wanted = keep_or_plan.keep if isinstance(keep_or_plan, PrunePlan) else _check_keep_arg(keep_or_plan)
    unset = sorted(name for name, idx in wanted.items() if name in by_name and not by_name[name].width_indices
                   and np.size(idx) < by_name[name].size)
    if unset:
      raise ValueError(f"groups {unset} are cut but set no entry of model.widths (no width_indices, and no declared "
                       f"group of {type(model).__name__} has their members), so model.{_WIDTHS_HOOK} cannot rebuild "
                       "the thin model; pass the model's declared groups (model.channel_groups())")
  if isinstance(keep_or_plan, PrunePlan):
    result = apply_plan(pure, groups, keep_or_plan)
    keep: Mapping[str, Any] = keep_or_plan.keep
    if rebuild and result.widths is None:
      result = prune(pure, groups, keep, widths=list(widths))
  else:
    keep = _check_keep_arg(keep_or_plan)
    result = prune(pure, groups, keep, widths=list(widths) if rebuild else None)
  cut = {name for name, idx in result.plan.keep.items() if len(idx) < by_name[name].size}
  if rebuild:
    new = hook(list(result.widths))
    if not isinstance(new, type(model)):
      raise ValueError(f"model.{_WIDTHS_HOOK}({result.widths}) returned a {type(new).__name__}; expected a "
                       f"{type(model).__name__}")
    graphdef, skeleton = nnx.split(new)
    want = {p: _leaf_shape(v) for p, v in flatten_state(nnx.to_pure_dict(skeleton)).items()}
    have = {p: _leaf_shape(v) for p, v in flatten_state(result.state).items()}
    bad = sorted(path_str(p) for p in set(want) | set(have) if want.get(p) != have.get(p))
    if bad:
      p = next(q for q in set(want) | set(have) if path_str(q) == bad[0])
      raise ValueError(f"model.{_WIDTHS_HOOK}({result.widths}) builds {bad[0]!r} with shape {want.get(p)}, but the "
                       f"pruned state has {have.get(p)} ({len(bad)} such leaves); expected the groups' width_indices "
                       "to say which width-list entry each group sets")
  else:
    if not example_args:
      raise ValueError(f"example_args are needed to check the thin {type(model).__name__} (its class has no "
                       f"{_WIDTHS_HOOK}(widths) method): pass the model's inputs, e.g. thin_model(model, groups, keep, "
                       "x)")
    graphdef, skeleton = nnx.split(model)
  state = nnx.from_flat_state(nnx.to_flat_state(skeleton))  # a new container: the model's own state stays
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, result.state))
  thin = nnx.merge(graphdef, state)
  if not rebuild:
    _update_layer_attributes(thin)
  if example_args:
    _check_thin(model, thin, example_args, {by_name[name].size for name in cut})
  if eval_mode:
    thin.eval()
  else:
    thin.train()
  return thin
