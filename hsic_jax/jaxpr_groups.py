"""Channel groups derived automatically from the jaxpr of a model's forward pass.

A CNN's coupled channels follow from its dataflow: a conv's input feature axis reads the channels its producer's
output axis writes; BatchNorm vectors and biases broadcast along a channel axis index those channels; a residual
add ties the channels of its operands together; a concatenation places several channel sets side by side; a
channels-last flatten spreads each channel over ``h * w`` rows of the next Dense kernel. :func:`derive_groups`
traces ``apply_fn(params, *args)`` with :func:`jax.make_jaxpr` and follows these relations through every equation
(inlining ``jit``/``custom_jvp``/``custom_vjp``/``closed_call``/``remat`` sub-jaxprs), so that any Flax CNN can
be pruned without writing its groups by hand. :func:`check_groups` compares hand-declared groups with derived ones.

How it works. Every axis of every activation carries a *layout*: the axis is ``repeat`` copies (the spatial
positions of a channels-last flatten) of a row of *segments*, each either a channel set (a node of a union-find)
of some size or constant padding. Operations map layouts from inputs to outputs:

- ``conv_general_dilated``: the kernel's input-feature axis becomes an ``"in"`` member of the lhs feature
  channel sets; the output feature axis is a new channel set whose ``"out"`` member is the kernel's output axis.
  A depthwise conv (``feature_group_count`` equal to the input channels, multiplier 1) passes its input channel
  sets through, with its kernel's output axis as an ``"out"`` member of them.
- ``dot_general``: a contraction of an activation axis with a parameter axis makes the parameter axis an ``"in"``
  member (with ``spatial`` from a flatten); the parameter's free axis is a new channel set.
- elementwise ops: operands' layouts on equal-sized axes are united (residual add); a parameter vector broadcast
  along a channel axis becomes an ``"out"`` member (BatchNorm scale/bias/mean/var, conv and Dense biases).
- ``concatenate``, ``pad`` and ``slice`` on an axis join, extend with constant segments, or cut the segment row;
  ``reshape`` follows merges (``(n, h, w, c) -> (n, h*w*c)`` gives ``repeat = h*w``) and splits.
- reductions and pooling keep the axes they do not reduce.

Values computed from parameters alone before they meet an activation (BatchNorm's ``rsqrt(var + eps) * scale``,
a reshaped bias, a transposed or cast kernel) are tracked per axis, so each activation channel axis knows which
parameter axes it finally meets.

A group is *prunable* when deleting its channels from every member computes exactly what zeroing their consumer
slices computes (see :func:`hsic_jax.surgery.mask`). Anything that cannot be followed that exactly marks the
channel sets it touches as not prunable and says why in ``ChannelGroup.note``: grouped convolutions, channel
shuffles, reductions over a channel axis (LayerNorm, softmax), a channel set added to a sub-range of another (the
zero-padded "option A" shortcut of CIFAR ResNets), a flatten whose channel axis is not last, a kernel normalised
over its input channels. Primitives that are not understood at all (``gather``, ``sort``, loops: ``scan``,
``while``, ``cond`` are not entered) and parameter axes that cannot be followed also raise a
:class:`GroupDerivationWarning`. The channel sets of the network input and outputs are not prunable either.

A derived group's members are the slices of every parameter leaf indexed by the set's channels; a set without
any parameter member (batch and spatial axes, for instance) is not reported.

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> model = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
...                        nnx.relu, nnx.Conv(8, 4, (3, 3), rngs=nnx.Rngs(0)))
>>> groups = derive_model_groups(model, jnp.zeros((2, 8, 8, 3)))
>>> [(g.name, g.size, g.prunable) for g in groups]
[('input', 3, False), ('layers/0', 8, True), ('layers/3', 4, False)]
>>> [(path_str(m.path), m.axis, m.role) for m in groups[1].members][::3]
[('layers/0/kernel', 3, 'out'), ('layers/1/scale', 0, 'out'), ('layers/3/kernel', 2, 'in')]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np
from flax import nnx

from hsic_jax import _jaxpr_rules, _jaxpr_walk
from hsic_jax import _jaxpr_context as _context
from hsic_jax._jaxpr_context import AbstractValue, ChannelRule, ChannelRuleContext
from hsic_jax._jaxpr_rules import channel_rules, register_channel_rule, unregister_channel_rule
from hsic_jax.groups import ChannelGroup, ChannelSlice, Path, flatten_state, keypath_to_path, path_str

__all__ = [
    "AbstractValue",
    "ChannelRule",
    "ChannelRuleContext",
    "GroupDerivationWarning",
    "channel_rules",
    "check_groups",
    "derive_groups",
    "derive_model_groups",
    "register_channel_rule",
    "unregister_channel_rule",
]


class GroupDerivationWarning(UserWarning):
  """A primitive or parameter use that channel-group derivation could not follow (its groups are fixed)."""


def _warn_unread(jaxpr: jcore.Jaxpr, param_leaves: Sequence[tuple[Any, Any]], param_paths: Sequence[Path],
                 an: ChannelRuleContext) -> None:
  """Warns about floating-point parameter arrays that the traced pass never reads.

  Such a parameter (a layer used only in training, like an auxiliary head, traced in evaluation mode) is in no
  derived group, so pruning would leave it uncut even where it reads pruned channels. Integer leaves (step
  counters, random-key state) and scalars are not reported.
  """
  read = _jaxpr_walk.read_inputs(jaxpr)
  if not any(read[:len(param_paths)]):
    return  # parameters read from a closure: the "no parameter is indexed" warning says so
  unread = []
  for (_, leaf), path, used in zip(param_leaves, param_paths, read):
    dtype = getattr(leaf, "dtype", None)
    if not used and np.ndim(leaf) >= 1 and dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating):
      unread.append(path_str(path))
  if unread:
    shown = ", ".join(unread[:12]) + (f" and {len(unread) - 12} more" if len(unread) > 12 else "")
    an.warn(f"the traced forward pass never reads parameters {shown} (a layer used only in another mode, such as "
            "a training-only auxiliary head?): they are in no derived channel group, so pruning leaves them "
            "uncut; derive the groups from a pass that uses them (e.g. derive_model_groups(..., eval_mode=False)) "
            "or add their slices to the groups by hand")


def _emit_warnings(messages: Iterable[str]) -> None:
  for message in messages:
    warnings.warn(message, GroupDerivationWarning, stacklevel=3)


def derive_groups(apply_fn: Callable[..., Any], params: Any, *example_args: Any) -> list[ChannelGroup]:
  """Derives the channel groups of a forward pass ``apply_fn(params, *example_args)`` from its jaxpr.

  Every axis of every intermediate value is mapped to channel sets (see the module docstring); each channel set
  that indexes at least one parameter slice becomes a :class:`ChannelGroup` whose members are those slices, named
  after its first producing layer (``"stage1/block0/conv1"``) and marked not prunable, with the reason in
  ``note``, when its channels touch the network input or output or pass through an operation that removing
  channels would not commute with. ``width_indices`` is left empty (a model's width list is its own convention).

  BatchNorm statistics become members through any use in the traced function: normalising in evaluation mode,
  or their running-average update in training mode (a layer that neither reads nor updates them in the traced
  mode leaves them out). For an NNX model use :func:`derive_model_groups`, which traces in evaluation mode.

  Args:
    apply_fn: pure forward function ``apply_fn(params, *args) -> outputs``; it must read the parameters from its
      first argument (not from a closure).
    params: the parameter pytree (a pure dict from ``nnx.to_pure_dict`` or an ``nnx.State``); member paths are its
      key paths.
    *example_args: example inputs (only their shapes and dtypes matter; use a batch of 2 or more).

  Returns:
    The groups in forward order. Members use non-negative axes.

  Warns:
    GroupDerivationWarning: for primitives it cannot interpret and parameters whose channel axes it cannot
      follow; the groups concerned are marked not prunable.

  >>> import jax.numpy as jnp
  >>> params = {"conv": {"kernel": jnp.ones((3, 3, 3, 8))}, "fc": {"kernel": jnp.ones((8, 2))}}
  >>> def fwd(p, x):
  ...   h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
  ...                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ...   return jnp.mean(jax.nn.relu(h), axis=(1, 2)) @ p["fc"]["kernel"]
  >>> [(g.name, g.size, g.prunable) for g in derive_groups(fwd, params, jnp.ones((2, 8, 8, 3)))]
  [('input', 3, False), ('conv', 8, True), ('fc', 2, False)]
  """
  closed, param_leaves, param_paths = _trace(apply_fn, params, example_args)
  ctx = _interpret(closed, param_leaves, param_paths)
  groups = _collect_groups(ctx)
  _emit_warnings(ctx.warned)
  return groups


def _trace(apply_fn: Callable[..., Any], params: Any, example_args: tuple[Any, ...]
           ) -> tuple[jcore.ClosedJaxpr, list[tuple[Any, Any]], list[Path]]:
  """The jaxpr of ``apply_fn(params, *example_args)``, the parameter leaves (with key paths) and their paths."""
  closed = jax.make_jaxpr(apply_fn)(params, *example_args)
  param_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  param_paths = [keypath_to_path(kp) for kp, _ in param_leaves]
  arg_leaves = jax.tree_util.tree_leaves(example_args)
  if len(closed.jaxpr.invars) != len(param_paths) + len(arg_leaves):
    raise ValueError(f"the traced function has {len(closed.jaxpr.invars)} inputs but params and example_args have "
                     f"{len(param_paths)} + {len(arg_leaves)} leaves; expected apply_fn(params, *example_args)")
  return closed, param_leaves, param_paths


def _interpret(closed: jcore.ClosedJaxpr, param_leaves: Sequence[tuple[Any, Any]],
               param_paths: Sequence[Path]) -> ChannelRuleContext:
  """Runs the rules over the jaxpr: parameters enter as their own axes, the example inputs as fixed channel sets
  (the network input), and the channel sets of the outputs are fixed too."""
  jaxpr = closed.jaxpr
  ctx = ChannelRuleContext(_jaxpr_rules.RULES)
  in_infos: list[AbstractValue] = []
  for v, path in zip(jaxpr.invars, param_paths):
    in_infos.append(_context.Par(tuple(frozenset({(path, d)}) for d in range(len(_context.var_shape(v))))))
  for v in jaxpr.invars[len(param_paths):]:
    in_infos.append(_context.Act(tuple(ctx.fresh(s, _context.INPUT) for s in _context.var_shape(v))))
  const_infos = [_context.Par((frozenset(),) * np.ndim(c)) for c in closed.consts]
  outs = ctx.run(jaxpr, const_infos, in_infos)
  _warn_unread(jaxpr, param_leaves, param_paths, ctx)
  for info in outs:
    if isinstance(info, _context.Act):
      for layout in info.layouts:
        ctx.flag_layout(layout, _context.OUTPUT)
  return ctx


def _group_roots(ctx: ChannelRuleContext) -> list[int]:
  """The union-find roots of the channel sets that index at least one parameter slice, in creation order."""
  roots: dict[int, None] = {}
  for n in range(len(ctx.parent)):
    r = ctx.find(n)
    if ctx.members[r]:
      roots.setdefault(r, None)
  if not roots:
    ctx.warn("no parameter is indexed by any channel set; does apply_fn read its parameters from its first "
             "argument?")
  return sorted(roots)


def _group_name(members: Sequence[ChannelSlice], reasons: dict[str, None], taken: dict[str, int]) -> str:
  """A channel set's group name: its first producing layer (``"stage1/block0/conv1"``), ``"input"``, or the first
  member's layer with ``/constant`` or ``/in``; ``#2``, ``#3``, ... for repeats."""
  producers = [m for m in members if m.role == "out"]
  if _context.CONSTANT in reasons:
    name = path_str(members[0].path[:-1]) + "/constant"
  elif producers:
    name = path_str(producers[0].path[:-1]) or path_str(producers[0].path)
  elif _context.INPUT in reasons:
    name = "input"
  else:
    name = path_str(members[0].path[:-1]) + "/in"
  count = taken.get(name, 0)
  taken[name] = count + 1
  return f"{name}#{count + 1}" if count else name


def _collect_groups(ctx: ChannelRuleContext) -> list[ChannelGroup]:
  """One :class:`ChannelGroup` per channel set with parameter members; prunable unless a reason was recorded on
  the set or one of its members' parameter axes could not be followed."""
  groups: list[ChannelGroup] = []
  taken: dict[str, int] = {}
  for r in _group_roots(ctx):
    members = sorted(ctx.members[r], key=lambda m: ctx.members[r][m])
    reasons = dict(ctx.reasons[r])
    name = _group_name(members, reasons, taken)
    for m in members:
      why = ctx.lost.get((m.path, m.axis))
      if why is not None:
        what = f"parameter {path_str(m.path)} axis {m.axis} is {why}"
        reasons[f"{what}, so removing its channels is not the same as zeroing them"] = None
        ctx.warn(f"{what}; channel group {name!r} is marked not prunable")
    groups.append(ChannelGroup(name, ctx.size[r], tuple(members), prunable=not reasons, note="; ".join(reasons)))
  return groups


def derive_model_groups(model: nnx.Module, *example_args: Any, eval_mode: bool = True) -> list[ChannelGroup]:
  """Derives the channel groups of an NNX model's forward pass ``model(*example_args)``.

  Equivalent to ``derive_groups(lambda s, *a: nnx.merge(graphdef, s)(*a), nnx.to_pure_dict(state), *args)`` with
  ``graphdef, state = nnx.split(model)``, on a copy switched to evaluation mode (the model itself is not changed).
  Member paths are those of ``nnx.to_pure_dict(nnx.state(model))``.

  Args:
    model: the NNX model.
    *example_args: example inputs, e.g. ``jnp.zeros((2, 32, 32, 3))``.
    eval_mode: call ``.eval()`` on the copy first, so that the traced pass is the inference one (BatchNorm
      normalising with its running statistics, dropout off).
  """
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  if eval_mode:
    copy.eval()
  graphdef, state = nnx.split(copy)
  pure = nnx.to_pure_dict(state)

  def apply(p: Any, *args: Any) -> Any:
    return nnx.merge(graphdef, p)(*args)

  return derive_groups(apply, pure, *example_args)


def _member_key(m: ChannelSlice, ranks: dict[Path, int] | None) -> tuple[Path, int, str, int, int]:
  axis = m.axis
  if axis < 0 and ranks is not None and m.path in ranks:
    axis += ranks[m.path]
  return (tuple(m.path), axis, m.role, m.offset, m.spatial)


def _fmt_member(key: tuple[Path, int, str, int, int]) -> str:
  path, axis, role, offset, spatial = key
  extra = (f" offset={offset}" if offset else "") + (f" spatial={spatial}" if spatial != 1 else "")
  return f"{path_str(path)}[axis {axis}, {role}{extra}]"


def check_groups(declared: Sequence[ChannelGroup], derived: Sequence[ChannelGroup], *, state: Any = None,
                 ignore_boundary: bool = True) -> list[str]:
  """Compares hand-declared channel groups with derived ones; returns readable differences (empty: they agree).

  Groups are compared as sets of members ``(path, axis, role, offset, spatial)`` with their size, ignoring names,
  ``width_indices`` and ``note``. A declared group that is prunable while its derived twin is not is a difference
  (the reason is quoted); a declared non-prunable group whose twin is prunable is a policy choice and is fine.

  Args:
    declared: the groups a model declares (e.g. ``model.channel_groups()``).
    derived: the groups from :func:`derive_groups` or :func:`derive_model_groups`.
    state: optional state pytree, used to turn negative axes into non-negative ones before comparing.
    ignore_boundary: do not report derived, non-prunable groups without a declared twin whose members all have
      one role: the network input's channels (read by the stem, ``"in"`` only) and the outputs (``"out"`` only),
      which models do not usually declare.

  Returns:
    One line per difference.
  """
  ranks = None
  if state is not None:
    ranks = {p: np.ndim(leaf) for p, leaf in flatten_state(state).items()}

  def keyset(g: ChannelGroup) -> frozenset[tuple[Path, int, str, int, int]]:
    return frozenset(_member_key(m, ranks) for m in g.members)

  dec = [(g, keyset(g)) for g in declared]
  der = [(g, keyset(g)) for g in derived]
  problems: list[str] = []
  matched: set[int] = set()
  for g, ks in dec:
    twin = next((k for k, (h, hs) in enumerate(der) if hs == ks), None)
    if twin is not None:
      matched.add(twin)
      h = der[twin][0]
      if h.size != g.size:
        problems.append(f"declared group {g.name!r} has size {g.size} but its channels number {h.size} in the "
                        f"forward pass (derived group {h.name!r})")
      if g.prunable and not h.prunable:
        problems.append(f"declared group {g.name!r} is prunable but the forward pass shows it is not: {h.note}")
      continue
    overlaps = sorted(((len(ks & hs), k) for k, (_, hs) in enumerate(der) if ks & hs), reverse=True)
    if not overlaps:
      problems.append(f"declared group {g.name!r} (size {g.size}) shares no member with any derived group: "
                      f"{', '.join(_fmt_member(k) for k in sorted(ks, key=str))}")
      continue
    h, hs = der[overlaps[0][1]]
    missing = sorted(hs - ks, key=str)
    extra = sorted(ks - hs, key=str)
    msg = f"declared group {g.name!r} (size {g.size}) differs from derived group {h.name!r} (size {h.size})"
    if missing:
      msg += f"; not declared: {', '.join(_fmt_member(k) for k in missing)}"
    if extra:
      msg += f"; declared but not in that group: {', '.join(_fmt_member(k) for k in extra)}"
    problems.append(msg)
  for k, (h, hs) in enumerate(der):
    if k in matched:
      continue
    if any(hs & ks for _, ks in dec):
      continue  # already reported as a difference of an overlapping declared group
    roles = {m.role for m in h.members}
    if ignore_boundary and not h.prunable and len(roles) == 1:
      continue
    problems.append(f"derived group {h.name!r} (size {h.size}, {'prunable' if h.prunable else 'fixed'}) is not "
                    f"declared: {', '.join(_fmt_member(m) for m in sorted(hs, key=str))}")
  return problems
