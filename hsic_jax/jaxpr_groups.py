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

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np
from flax import nnx

from hsic_jax import _jaxpr_walk
from hsic_jax.groups import ChannelGroup, ChannelSlice, Path, flatten_state, keypath_to_path, path_str


class GroupDerivationWarning(UserWarning):
  """A primitive or parameter use that channel-group derivation could not follow (its groups are fixed)."""


Source = tuple[Path, int]  # (parameter path, axis of that leaf)

# Reasons recorded on channel sets; any reason makes the set's group not prunable.
_INPUT = "network input"
_OUTPUT = "network output"
_SPATIAL = "spatial axis"
_CONSTANT = "constant channels (padding or a concatenated constant) that no parameter produces"

_ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "clamp",
    "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma", "div", "eq", "erf", "erf_inv", "erfc",
    "exp", "exp2", "expm1", "floor", "ge", "gt", "igamma", "igammac", "imag", "integer_pow", "is_finite", "le",
    "lgamma", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or",
    "polygamma", "population_count", "pow", "real", "reduce_precision", "rem", "round", "rsqrt", "select_n",
    "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square", "sub",
    "tan", "tanh", "xor", "zeta", "sharding_constraint", "mesh_cast", "reshard", "pvary", "stop_gradient",
})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                     "reduce_xor", "argmax", "argmin"})
_REDUCE_WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})


# ----------------------------------------------------------------------------------------------------------------
# Abstract values: how each axis of a jaxpr variable relates to channel sets or parameter axes.


@dataclasses.dataclass(frozen=True)
class _Seg:
  node: int  # a channel set (possibly a constant one: padding, a concatenated constant)
  size: int


@dataclasses.dataclass(frozen=True)
class _Layout:
  """An axis of length ``repeat * sum(seg sizes)``: index ``p * width + offset_k + c`` is channel c of segment k."""

  repeat: int
  segs: tuple[_Seg, ...]

  @property
  def width(self) -> int:
    return sum(s.size for s in self.segs)

  @property
  def size(self) -> int:
    return self.repeat * self.width

  def nodes(self) -> list[int]:
    return [s.node for s in self.segs]

  def bounds(self) -> list[int]:
    out, pos = [0], 0
    for s in self.segs:
      pos += s.size
      out.append(pos)
    return out


@dataclasses.dataclass(frozen=True)
class _Act:
  """A value that depends on the network input: one layout per axis."""

  layouts: tuple[_Layout, ...]


@dataclasses.dataclass(frozen=True)
class _Par:
  """A value computed from parameters and constants only: per axis, the parameter axes it is indexed by."""

  sources: tuple[frozenset[Source], ...]


AbstractValue = _Act | _Par
"""The abstract value of a jaxpr variable: an activation (per axis, the channel sets it holds) or a value computed
from parameters and constants only (per axis, the parameter axes it is indexed by). Rules receive and return them;
build them with the :class:`ChannelRuleContext` helpers."""

_Info = AbstractValue


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def _no_sources(rank: int) -> _Par:
  return _Par((frozenset(),) * rank)


class ChannelRuleContext:
  """The state of one derivation, handed to every channel rule: union-find over channel sets and their members.

  A rule (see :func:`register_channel_rule`) maps the abstract values of an equation's operands to those of its
  results with these helpers, each taking the equation and its operand values and returning one value per result:

  - :meth:`elementwise`: the operands are combined position by position (``add``, ``mul``, ``max``); their channel
    sets on each axis are tied together and a parameter vector broadcast along a channel axis becomes a producer
    member of it;
  - :meth:`pass_through`: result ``i`` is operand ``i`` (an identity, a barrier, a cast);
  - :meth:`mix_axes`: the result is the first operand, with the channels along the given axes mixed, so that
    removing one of them would change the others (they are marked not prunable);
  - :meth:`opaque`: nothing is known; every channel set it touches is marked not prunable and a
    :class:`GroupDerivationWarning` names the primitive (what an unregistered primitive gets);
  - :meth:`is_activation`: whether a value depends on the network input.
  """

  def __init__(self) -> None:
    self.parent: list[int] = []
    self.size: list[int] = []
    self.reasons: list[dict[str, None]] = []
    self.members: list[dict[ChannelSlice, int]] = []  # member -> sequence number (for a stable order)
    self.owner: dict[ChannelSlice, int] = {}
    self.lost: dict[Source, str] = {}  # parameter axes that could not be followed, and why
    self.warned: dict[str, None] = {}
    self.seq = 0

  # -- helpers for rules -----------------------------------------------------------------------------------------

  @staticmethod
  def is_activation(value: AbstractValue) -> bool:
    """Whether ``value`` depends on the network input (else it is computed from parameters and constants)."""
    return isinstance(value, _Act)

  def elementwise(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue]) -> list[AbstractValue]:
    """One result combining the operands position by position (operands of rank 0 or of the result's rank)."""
    return [self._elementwise(list(ins), [_shape(v) for v in eqn.invars], _shape(eqn.outvars[0]),
                              eqn.primitive.name)]

  def pass_through(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue]) -> list[AbstractValue]:
    """Result ``i`` is operand ``i`` (results must have the operands' shapes)."""
    if len(eqn.outvars) > len(ins) or any(_shape(o) != _shape(i) for o, i in zip(eqn.outvars, eqn.invars)):
      return self.opaque(eqn, ins)
    return list(ins[:len(eqn.outvars)])

  def mix_axes(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue], axes: Iterable[int],
               reason: str) -> list[AbstractValue]:
    """One result shaped like the first operand whose ``axes`` lose their channel identity (marked with ``reason``).

    Other operands are treated as :meth:`opaque` would if they are activations, and ignored otherwise.
    """
    in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    if len(in_shape) != len(out_shape):
      return self.opaque(eqn, ins)
    for info in ins[1:]:
      if isinstance(info, _Act):
        self.flag_info(info, reason)
    return [self.per_axis(ins[0], in_shape, out_shape, set(axes), reason)]

  def opaque(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue]) -> list[AbstractValue]:
    """Results of a primitive that is not understood: everything it touches loses its channel identity."""
    return self._opaque(eqn.primitive.name, list(ins), [_shape(v) for v in eqn.outvars])

  # -- union-find ------------------------------------------------------------------------------------------------

  def new_node(self, size: int, reason: str | None = None) -> int:
    self.parent.append(len(self.parent))
    self.size.append(size)
    self.reasons.append({reason: None} if reason else {})
    self.members.append({})
    return len(self.parent) - 1

  def find(self, n: int) -> int:
    root = n
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[n] != root:
      self.parent[n], n = root, self.parent[n]
    return root

  def union(self, a: int, b: int) -> int:
    a, b = self.find(a), self.find(b)
    if a == b:
      return a
    if self.size[a] != self.size[b]:  # cannot happen for well-typed programs; stay safe rather than merge
      self.flag(a, f"coupled to a channel set of different size {self.size[b]}")
      self.flag(b, f"coupled to a channel set of different size {self.size[a]}")
      return a
    if b < a:
      a, b = b, a
    self.parent[b] = a
    self.reasons[a].update(self.reasons[b])
    self.members[a].update(self.members[b])
    self.reasons[b], self.members[b] = {}, {}
    return a

  def is_constant(self, n: int) -> bool:
    return _CONSTANT in self.reasons[self.find(n)]

  def flag(self, n: int | None, reason: str) -> None:
    if n is not None:
      self.reasons[self.find(n)][reason] = None

  def flag_layout(self, layout: _Layout, reason: str) -> None:
    for n in layout.nodes():
      self.flag(n, reason)

  def flag_info(self, info: _Info, reason: str) -> None:
    if isinstance(info, _Act):
      for layout in info.layouts:
        self.flag_layout(layout, reason)
    else:
      for srcs in info.sources:
        self.lose(srcs, reason)

  def lose(self, sources: Iterable[Source], reason: str) -> None:
    for source in sources:
      self.lost.setdefault(source, reason)

  def warn(self, message: str) -> None:
    if message not in self.warned:
      self.warned[message] = None

  def fresh(self, size: int, reason: str | None = None) -> _Layout:
    return _Layout(1, (_Seg(self.new_node(size, reason), size),))

  def constant(self, size: int) -> _Seg:
    """Channels that no parameter produces (padding, a concatenated constant): a fixed channel set of their own."""
    return _Seg(self.new_node(size, _CONSTANT), size)

  # -- members ---------------------------------------------------------------------------------------------------

  def add_member(self, node: int, member: ChannelSlice) -> None:
    node = self.find(node)
    if member in self.owner:
      other = self.find(self.owner[member])
      if self.size[other] == self.size[node]:
        self.union(other, node)  # a shared parameter (e.g. one layer applied twice) ties its channel sets
      else:
        self.flag(other, f"{path_str(member.path)} is indexed by channel sets of different sizes")
        self.flag(node, f"{path_str(member.path)} is indexed by channel sets of different sizes")
      return
    self.owner[member] = node
    self.members[node][member] = self.seq
    self.seq += 1

  def attach(self, layout: _Layout, sources: Iterable[Source], role: str) -> None:
    """Makes every parameter axis in ``sources`` a member of each channel set of ``layout``.

    Every segment gets a member, constant ones included, so that the members of one parameter axis cover it whole
    (``prune`` checks that) wherever the channels of a layer sit among others.
    """
    for path, axis in sorted(sources, key=lambda s: (path_str(s[0]), s[1])):
      offset = 0
      for seg in layout.segs:
        self.add_member(seg.node, ChannelSlice(path, axis, role, offset=offset, spatial=layout.repeat))
        offset += seg.size

  # -- layouts ---------------------------------------------------------------------------------------------------

  def tie(self, a: _Seg, b: _Seg) -> _Seg:
    """One segment of an elementwise op's result from equal-sized segments of its operands."""
    if self.is_constant(a.node):
      return b
    if self.is_constant(b.node):
      return a
    return _Seg(self.union(a.node, b.node), a.size)

  def unify(self, a: _Layout, b: _Layout) -> _Layout:
    """Ties two layouts of one axis (operands of an elementwise op); returns the result's layout."""
    if a == b:
      return a
    if a.repeat == b.repeat and [s.size for s in a.segs] == [s.size for s in b.segs]:
      return _Layout(a.repeat, tuple(self.tie(sa, sb) for sa, sb in zip(a.segs, b.segs)))
    reason = "coupled to a sub-range of another channel set (e.g. a zero-padded shortcut)"
    if a.repeat == b.repeat:
      ba, bb = set(a.bounds()), set(b.bounds())
      if ba <= bb or bb <= ba:
        coarse, fine = (a, b) if ba <= bb else (b, a)
        fine_pos, coarse_pos = fine.bounds(), coarse.bounds()
        segs = []
        for k, seg in enumerate(coarse.segs):
          lo, hi = coarse_pos[k], coarse_pos[k + 1]
          inner = [fine.segs[i] for i in range(len(fine.segs)) if lo <= fine_pos[i] and fine_pos[i + 1] <= hi]
          if len(inner) == 1:
            segs.append(self.tie(seg, inner[0]))
            continue
          real = [s.node for s in inner if not self.is_constant(s.node)]
          if real:
            self.flag(seg.node, reason)
            for n in real:
              self.flag(n, reason)
          segs.append(seg)
        return _Layout(coarse.repeat, tuple(segs))
    self.flag_layout(a, reason)
    self.flag_layout(b, reason)
    return a

  def unify_all(self, layouts: Sequence[_Layout]) -> _Layout:
    out = layouts[0]
    for other in layouts[1:]:
      out = self.unify(out, other)
    return out

  # -- interpretation --------------------------------------------------------------------------------------------

  def run(self, jaxpr: jcore.Jaxpr, const_infos: Sequence[_Info], in_infos: Sequence[_Info]) -> list[_Info]:
    return _jaxpr_walk.interpret(jaxpr, const_infos, in_infos, self.eqn, default=lambda v: _no_sources(len(_shape(v))),
                                 const_value=lambda c: _no_sources(np.ndim(c)))

  def eqn(self, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
    """Abstract values of an equation's results: the registered rule for its primitive, else :meth:`opaque`."""
    if not ins:
      return [_no_sources(len(_shape(v))) for v in eqn.outvars]  # iota, constants
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is None:
      return self.opaque(eqn, ins)
    outs = list(rule(self, eqn, list(ins)))
    if len(outs) != len(eqn.outvars):
      raise ValueError(f"the channel rule for primitive {name!r} returned {len(outs)} values for an equation with "
                       f"{len(eqn.outvars)} results; expected one abstract value per result")
    for out, v in zip(outs, eqn.outvars):
      rank = len(out.layouts) if isinstance(out, _Act) else len(out.sources) if isinstance(out, _Par) else None
      if rank != len(_shape(v)):
        raise ValueError(f"the channel rule for primitive {name!r} returned {out!r} for a result of shape "
                         f"{_shape(v)}; expected an abstract value of rank {len(_shape(v))} built with the "
                         "ChannelRuleContext helpers")
    return outs

  def _opaque(self, name: str, ins: list[_Info], out_shapes: list[tuple[int, ...]]) -> list[_Info]:
    if not any(isinstance(i, _Act) for i in ins):
      for info in ins:  # parameters only (e.g. random keys, kernel preprocessing): silent unless a member
        self.flag_info(info, f"used by primitive {name!r}")
      return [_no_sources(len(s)) for s in out_shapes]
    reason = f"passes through primitive {name!r}, which channel-group derivation does not understand"
    self.warn(f"primitive {name!r} is not understood; the channel groups it touches are marked not prunable")
    for info in ins:
      self.flag_info(info, reason)
    return [_Act(tuple(self.fresh(s, reason) for s in shape)) for shape in out_shapes]

  # -- building blocks of the rules ------------------------------------------------------------------------------

  def remap(self, info: _Info, in_shape: tuple[int, ...], out_shape: tuple[int, ...], mapping: Sequence[int | None],
            dropped: Sequence[int], reason: str | None) -> _Info:
    """Output axis ``d`` is input axis ``mapping[d]`` (or new); ``dropped`` input axes vanish (flagged if reason)."""
    if isinstance(info, _Act):
      layouts = []
      for d, m in enumerate(mapping):
        if m is not None and in_shape[m] == out_shape[d]:
          layouts.append(info.layouts[m])
        else:
          layouts.append(self.fresh(out_shape[d]))
      if reason:
        for m in dropped:
          if in_shape[m] > 1:
            self.flag_layout(info.layouts[m], reason)
      return _Act(tuple(layouts))
    srcs = [info.sources[m] if m is not None and in_shape[m] == out_shape[d] else frozenset()
            for d, m in enumerate(mapping)]
    if reason:
      for m in dropped:
        if in_shape[m] > 1:
          self.lose(info.sources[m], reason)
    return _Par(tuple(srcs))

  def per_axis(self, info: _Info, in_shape: tuple[int, ...], out_shape: tuple[int, ...], changed: set[int],
               reason: str) -> _Info:
    """Axes in ``changed`` lose their channel identity (flagged); the others pass through."""
    changed = {d % len(in_shape) for d in changed} if in_shape else set()
    if isinstance(info, _Act):
      layouts = []
      for d in range(len(out_shape)):
        if d in changed:
          self.flag_layout(info.layouts[d], reason)
          layouts.append(self.fresh(out_shape[d], reason))
        else:
          layouts.append(info.layouts[d])
      return _Act(tuple(layouts))
    for d in changed:
      self.lose(info.sources[d], reason)
    return _Par(tuple(frozenset() if d in changed else info.sources[d] for d in range(len(out_shape))))

  def _elementwise(self, ins: list[_Info], in_shapes: list[tuple[int, ...]], out: tuple[int, ...],
                   name: str) -> _Info:
    rank = len(out)
    if any(len(s) not in (0, rank) for s in in_shapes):
      return self._opaque(name, ins, [out])[0]
    if not any(isinstance(i, _Act) for i in ins):
      return _Par(tuple(frozenset().union(*[i.sources[d] for i, s in zip(ins, in_shapes)
                                            if isinstance(i, _Par) and len(s) == rank and s[d] == out[d]])
                        for d in range(rank)))
    layouts = []
    for d in range(rank):
      acts = [i.layouts[d] for i, s in zip(ins, in_shapes) if isinstance(i, _Act) and len(s) == rank
              and s[d] == out[d]]
      layout = self.unify_all(acts) if acts else self.fresh(out[d])
      for i, s in zip(ins, in_shapes):
        if isinstance(i, _Par) and len(s) == rank and s[d] == out[d] and i.sources[d]:
          self.attach(layout, i.sources[d], "out")
      layouts.append(layout)
    return _Act(tuple(layouts))

  def slice(self, info: _Info, in_shape: tuple[int, ...], out_shape: Sequence[int], starts: Sequence[int],
            strides: Sequence[int | None]) -> _Info:
    reason = "sliced into a partial channel range"
    if isinstance(info, _Par):
      changed = {d for d in range(len(in_shape)) if out_shape[d] != in_shape[d]}
      return self.per_axis(info, in_shape, tuple(out_shape), changed, "sliced")
    layouts = []
    for d in range(len(in_shape)):
      lay, start, stop = info.layouts[d], starts[d], starts[d] + out_shape[d]
      stride = strides[d] or 1
      if out_shape[d] == in_shape[d]:
        layouts.append(lay)
        continue
      bounds = lay.bounds()
      if stride == 1 and lay.repeat == 1 and start in bounds and stop in bounds:
        k0, k1 = bounds.index(start), bounds.index(stop)
        layouts.append(_Layout(1, lay.segs[k0:k1]))
        continue
      self.flag_layout(lay, reason)
      layouts.append(self.fresh(out_shape[d], reason))
    return _Act(tuple(layouts))


# ----------------------------------------------------------------------------------------------------------------
# The rule registry.

ChannelRule = Callable[[ChannelRuleContext, jcore.JaxprEqn, list[AbstractValue]], Sequence[AbstractValue]]
"""``rule(ctx, eqn, ins) -> outs``: the abstract values of ``eqn``'s results (one per ``eqn.outvars``) from those
of its operands ``ins`` (one per ``eqn.invars``), built with the :class:`ChannelRuleContext` helpers."""

_RULES: dict[str, ChannelRule] = {}


def _primitive_name(primitive: Any) -> str:
  name = primitive if isinstance(primitive, str) else getattr(primitive, "name", None)
  if not isinstance(name, str) or not name:
    raise ValueError(f"primitive must be a jax.extend.core.Primitive or its non-empty name, got {primitive!r}")
  return name


def register_channel_rule(primitive: jcore.Primitive | str, rule: ChannelRule, *, replace: bool = False) -> None:
  """Registers how channel-group derivation follows ``primitive`` (a primitive of the user's own, say).

  Derivation is an abstract interpretation of the traced forward pass: every equation's primitive has a rule
  ``rule(ctx, eqn, ins) -> outs`` mapping the abstract values of its operands to those of its results, as JAX's own
  interpreters map primitives to rules. An equation whose primitive has no rule is opaque: every channel set it
  touches is marked not prunable and a :class:`GroupDerivationWarning` names the primitive. Rules are looked up
  by primitive name; call-like primitives (``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``)
  are inlined before any rule is consulted.

  Args:
    primitive: the primitive (``jax.extend.core.Primitive``) or its name.
    rule: ``rule(ctx: ChannelRuleContext, eqn: jax.extend.core.JaxprEqn, ins: list[AbstractValue])`` returning
      one abstract value per result, built with ``ctx.elementwise``, ``ctx.pass_through``, ``ctx.mix_axes`` or
      ``ctx.opaque`` (see :class:`ChannelRuleContext`).
    replace: allow replacing an existing rule (built-in rules included).

  Raises:
    ValueError: if ``primitive`` is neither a primitive nor a name, ``rule`` is not callable, or a rule is already
      registered for the name and ``replace`` is false.

  >>> import jax.extend.core
  >>> scale_p = jax.extend.core.Primitive("my_channel_scale")  # y = 2 x, channel by channel
  >>> register_channel_rule(scale_p, lambda ctx, eqn, ins: ctx.elementwise(eqn, ins))
  >>> "my_channel_scale" in channel_rules()
  True
  >>> unregister_channel_rule(scale_p)
  """
  name = _primitive_name(primitive)
  if not callable(rule):
    raise ValueError(f"rule must be callable as rule(ctx, eqn, ins), got {rule!r}")
  if name in _RULES and not replace:
    raise ValueError(f"primitive {name!r} already has a channel rule; pass replace=True to replace it")
  _RULES[name] = rule


def unregister_channel_rule(primitive: jcore.Primitive | str) -> None:
  """Removes the rule of ``primitive`` (a primitive or its name): it becomes opaque to derivation again.

  Raises:
    ValueError: if no rule is registered for it.

  >>> register_channel_rule("my_identity", lambda ctx, eqn, ins: ctx.pass_through(eqn, ins))
  >>> unregister_channel_rule("my_identity")
  >>> "my_identity" in channel_rules()
  False
  """
  name = _primitive_name(primitive)
  if name not in _RULES:
    raise ValueError(f"primitive {name!r} has no channel rule to unregister")
  del _RULES[name]


def channel_rules() -> dict[str, ChannelRule]:
  """A copy of the registry ``{primitive name: rule}``.

  >>> channel_rules()["add"] is channel_rules()["mul"]
  True
  """
  return dict(_RULES)


def _in_shapes(eqn: jcore.JaxprEqn) -> list[tuple[int, ...]]:
  return [_shape(v) for v in eqn.invars]


def _out_shape(eqn: jcore.JaxprEqn) -> tuple[int, ...]:
  return _shape(eqn.outvars[0])


def _rule_elementwise(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  return ctx.elementwise(eqn, ins)


def _rule_pass_through(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  return ctx.pass_through(eqn, ins)


_CONST_CONTRACTION = ("contracted with a constant (e.g. a channel mean written as x @ (ones / c)), which pruning "
                      "would not cut")
_ACT_CONTRACTION = ("contracted with another activation (e.g. einsum('...c,...c', a, b)): no parameter consumes "
                    "these channels, so removing them is not zeroing a consumer slice")


def _rule_conv(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shapes, out_shape = _in_shapes(eqn), _out_shape(eqn)
  lhs, rhs = ins
  if not isinstance(lhs, _Act):
    return ctx.opaque(eqn, ins)
  dn = eqn.params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  groups = eqn.params["feature_group_count"]
  if not isinstance(rhs, _Par) or eqn.params["batch_group_count"] != 1:
    return ctx._opaque("conv_general_dilated (with an activation as kernel or batch groups)", ins, [out_shape])
  feat = lhs.layouts[lhs_spec[1]]
  c_in = feat.size
  rhs_in, rhs_out = rhs.sources[rhs_spec[1]], rhs.sources[rhs_spec[0]]
  n_out = out_shape[out_spec[1]]
  for d in lhs_spec[2:]:
    ctx.flag_layout(lhs.layouts[d], _SPATIAL)
  layouts: list[_Layout | None] = [None] * len(out_shape)
  layouts[out_spec[0]] = lhs.layouts[lhs_spec[0]]
  for d in out_spec[2:]:
    layouts[d] = ctx.fresh(out_shape[d], _SPATIAL)
  if groups == 1:
    if not rhs_in:
      ctx.flag_layout(feat, _CONST_CONTRACTION)
    ctx.attach(feat, rhs_in, "in")  # a flattened feature axis (space-to-depth) gives members with spatial > 1
    out_feat = ctx.fresh(n_out)
    ctx.attach(out_feat, rhs_out, "out")
  elif groups == c_in and in_shapes[1][rhs_spec[1]] == 1 and n_out == c_in and feat.repeat == 1:
    out_feat = feat  # depthwise: output channel i is input channel i
    ctx.attach(out_feat, rhs_out, "out")
  else:
    kind = "depthwise convolution with a channel multiplier" if groups == c_in else "grouped convolution"
    reason = f"{kind} (feature_group_count={groups})"
    ctx.flag_layout(feat, reason)
    out_feat = ctx.fresh(n_out, reason)
    ctx.attach(out_feat, rhs_out, "out")
  layouts[out_spec[1]] = out_feat
  return [_Act(tuple(lay for lay in layouts if lay is not None))]


def _rule_dot(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shapes = _in_shapes(eqn)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = ins
  lfree = [i for i in range(len(in_shapes[0])) if i not in lc and i not in lb]
  rfree = [i for i in range(len(in_shapes[1])) if i not in rc and i not in rb]
  if isinstance(lhs, _Par) and isinstance(rhs, _Par):
    # A product of parameters (e.g. a low-rank kernel): free axes keep their sources, contracted ones vanish.
    srcs = [lhs.sources[i] | rhs.sources[j] for i, j in zip(lb, rb)]
    return [_Par(tuple(srcs + [lhs.sources[i] for i in lfree] + [rhs.sources[j] for j in rfree]))]

  def axis_layout(info: _Info, axis: int, size: int) -> _Layout:
    if isinstance(info, _Act):
      return info.layouts[axis]
    layout = ctx.fresh(size)
    ctx.attach(layout, info.sources[axis], "out")
    return layout

  for i, j in zip(lc, rc):
    if isinstance(lhs, _Act) and isinstance(rhs, _Act):
      ctx.flag_layout(lhs.layouts[i], _ACT_CONTRACTION)
      ctx.flag_layout(rhs.layouts[j], _ACT_CONTRACTION)
      ctx.unify(lhs.layouts[i], rhs.layouts[j])
      continue
    act, par, ai, pj = (lhs, rhs, i, j) if isinstance(lhs, _Act) else (rhs, lhs, j, i)
    assert isinstance(act, _Act) and isinstance(par, _Par)
    if not par.sources[pj]:
      ctx.flag_layout(act.layouts[ai], _CONST_CONTRACTION)
    ctx.attach(act.layouts[ai], par.sources[pj], "in")
  layouts = []
  for i, j in zip(lb, rb):
    if isinstance(lhs, _Act) and isinstance(rhs, _Act):
      layouts.append(ctx.unify(lhs.layouts[i], rhs.layouts[j]))
    else:
      act, par, ai, pj = (lhs, rhs, i, j) if isinstance(lhs, _Act) else (rhs, lhs, j, i)
      assert isinstance(act, _Act) and isinstance(par, _Par)
      ctx.attach(act.layouts[ai], par.sources[pj], "out")
      layouts.append(act.layouts[ai])
  layouts += [axis_layout(lhs, i, in_shapes[0][i]) for i in lfree]
  layouts += [axis_layout(rhs, j, in_shapes[1][j]) for j in rfree]
  return [_Act(tuple(layouts))]


def _rule_reshape(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  info, in_shape, out_shape = ins[0], _in_shapes(eqn)[0], _out_shape(eqn)
  dimensions = eqn.params.get("dimensions")
  if dimensions is not None:
    perm = list(dimensions)
    info = ctx.remap(info, in_shape, tuple(in_shape[p] for p in perm), perm, [], None)
    in_shape = tuple(in_shape[p] for p in perm)
  in_axes = [i for i, s in enumerate(in_shape) if s != 1]
  out_axes = [o for o, s in enumerate(out_shape) if s != 1]
  blocks: list[tuple[list[int], list[int]]] = []
  i = j = 0
  while i < len(in_axes) and j < len(out_axes):
    bi, bo = [in_axes[i]], [out_axes[j]]
    pi, po = in_shape[in_axes[i]], out_shape[out_axes[j]]
    i, j = i + 1, j + 1
    while pi != po:
      if pi < po:
        bi.append(in_axes[i])
        pi *= in_shape[in_axes[i]]
        i += 1
      else:
        bo.append(out_axes[j])
        po *= out_shape[out_axes[j]]
        j += 1
    blocks.append((bi, bo))
  merged = "merged into a later axis by a reshape (e.g. a flatten with channels not last)"
  split = "split by a reshape (e.g. a channel shuffle)"
  if isinstance(info, _Par):
    srcs: list[frozenset[Source]] = [frozenset()] * len(out_shape)
    for bi, bo in blocks:
      if len(bi) == 1 and len(bo) == 1:
        srcs[bo[0]] = info.sources[bi[0]]
      else:
        for a in bi:
          ctx.lose(info.sources[a], "reshaped across axes")
    return [_Par(tuple(srcs))]
  layouts: list[_Layout | None] = [None] * len(out_shape)
  for a, s in enumerate(in_shape):
    if s == 1:
      ctx.flag_layout(info.layouts[a], "reshaped away")
  for bi, bo in blocks:
    if len(bi) == 1 and len(bo) == 1:
      layouts[bo[0]] = info.layouts[bi[0]]
    elif len(bo) == 1:
      last = info.layouts[bi[-1]]
      for a in bi[:-1]:
        ctx.flag_layout(info.layouts[a], merged)
      factor = int(np.prod([in_shape[a] for a in bi[:-1]]))
      layouts[bo[0]] = _Layout(factor * last.repeat, last.segs)
    elif len(bi) == 1:
      src = info.layouts[bi[0]]
      last = out_shape[bo[-1]]
      if last % src.width == 0 and src.repeat % (last // src.width) == 0:
        layouts[bo[-1]] = _Layout(last // src.width, src.segs)
        for o in bo[:-1]:
          layouts[o] = ctx.fresh(out_shape[o], split)
      else:
        ctx.flag_layout(src, split)
        for o in bo:
          layouts[o] = ctx.fresh(out_shape[o], split)
    else:
      for a in bi:
        ctx.flag_layout(info.layouts[a], split)
      for o in bo:
        layouts[o] = ctx.fresh(out_shape[o], split)
  return [_Act(tuple(lay if lay is not None else ctx.fresh(out_shape[d]) for d, lay in enumerate(layouts)))]


def _rule_transpose(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  return [ctx.remap(ins[0], _in_shapes(eqn)[0], _out_shape(eqn), list(eqn.params["permutation"]), [], None)]


def _rule_broadcast_in_dim(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  out_shape = _out_shape(eqn)
  mapping: list[int | None] = [None] * len(out_shape)
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    mapping[d] = i
  return [ctx.remap(ins[0], _in_shapes(eqn)[0], out_shape, mapping, [], None)]


def _rule_squeeze(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shape = _in_shapes(eqn)[0]
  dims = {d % len(in_shape) for d in eqn.params["dimensions"]}
  keep = [i for i in range(len(in_shape)) if i not in dims]
  return [ctx.remap(ins[0], in_shape, _out_shape(eqn), keep, sorted(dims), None)]


def _rule_reduce(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shape = _in_shapes(eqn)[0]
  axes = sorted(eqn.params["axes"])
  keep = [i for i in range(len(in_shape)) if i not in axes]
  why = f"reduced over by {eqn.primitive.name!r} (e.g. a channel mean or softmax)"
  return [ctx.remap(ins[0], in_shape, _out_shape(eqn), keep, axes, why)]


def _rule_reduce_window(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  p = eqn.params
  in_shapes = _in_shapes(eqn)
  out_shapes = [_shape(v) for v in eqn.outvars]
  rank = len(in_shapes[0])
  ones = (1,) * rank
  window, strides = p["window_dimensions"], p["window_strides"]
  padding = p.get("padding", ((0, 0),) * rank)
  base, wdil = p.get("base_dilation", ones), p.get("window_dilation", ones)
  changed = {d for d in range(rank) if (window[d], strides[d], tuple(padding[d]), base[d], wdil[d])
             != (1, 1, (0, 0), 1, 1)}
  return [ctx.per_axis(info, in_shapes[0], shape, changed, "pooled over")
          for info, shape in zip(ins[:len(out_shapes)], out_shapes)]


def _rule_cumulative(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  return [ctx.per_axis(ins[0], _in_shapes(eqn)[0], _out_shape(eqn), {eqn.params["axis"]},
                       f"{eqn.primitive.name} along it")]


def _rule_rev(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  return [ctx.per_axis(ins[0], _in_shapes(eqn)[0], _out_shape(eqn), set(eqn.params["dimensions"]), "reversed")]


def _rule_dynamic_slice(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shape, out_shape = _in_shapes(eqn)[0], _out_shape(eqn)
  changed = {d for d in range(len(in_shape)) if in_shape[d] != out_shape[d]}
  return [ctx.per_axis(ins[0], in_shape, out_shape, changed, "dynamically sliced")]


def _rule_concatenate(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shapes, out = _in_shapes(eqn), _out_shape(eqn)
  dim = eqn.params["dimension"]
  if not any(isinstance(i, _Act) for i in ins):
    for i in ins:
      ctx.flag_info(_Par((i.sources[dim],)), "concatenated with other arrays")
    return [_Par(tuple(frozenset() if d == dim else frozenset().union(*[i.sources[d] for i in ins])
                       for d in range(len(out))))]
  layouts = []
  for d in range(len(out)):
    if d == dim:
      segs: list[_Seg] = []
      for info, s in zip(ins, in_shapes):
        if isinstance(info, _Act):
          lay = info.layouts[d]
          if lay.repeat != 1:
            ctx.flag_layout(lay, "concatenated after a flatten")
            segs.extend(ctx.fresh(s[d], "concatenated after a flatten").segs)
          else:
            segs.extend(lay.segs)
        elif info.sources[d]:
          # Learned channels (a parameter broadcast over the batch): a channel set the parameter produces.
          learned = ctx.fresh(s[d])
          ctx.attach(learned, info.sources[d], "out")
          segs.extend(learned.segs)
        else:
          segs.append(ctx.constant(s[d]))  # e.g. CoordConv's coordinates
      layouts.append(_Layout(1, tuple(segs)))
    else:
      acts = [i.layouts[d] for i in ins if isinstance(i, _Act)]
      layout = ctx.unify_all(acts)
      for i in ins:
        if isinstance(i, _Par) and i.sources[d]:
          ctx.attach(layout, i.sources[d], "out")
      layouts.append(layout)
  return [_Act(tuple(layouts))]


def _rule_pad(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  info, in_shape, out_shape = ins[0], _in_shapes(eqn)[0], _out_shape(eqn)
  config = eqn.params["padding_config"]
  if isinstance(info, _Par):
    changed = {d for d, c in enumerate(config) if tuple(c) != (0, 0, 0)}
    return [ctx.per_axis(info, in_shape, out_shape, changed, "padded")]
  if len(ins) > 1 and isinstance(ins[1], _Act):
    ctx.flag_info(info, "padded with a value computed from the input")
    return [_Act(tuple(ctx.fresh(s, "padded with a value computed from the input") for s in out_shape))]
  layouts = []
  for d, (lo, hi, interior) in enumerate(config):
    lay = info.layouts[d]
    if (lo, hi, interior) == (0, 0, 0):
      layouts.append(lay)
    elif interior == 0 and lo >= 0 and hi >= 0 and lay.repeat == 1:
      segs = ((ctx.constant(lo),) if lo else ()) + lay.segs + ((ctx.constant(hi),) if hi else ())
      layouts.append(_Layout(1, segs))
    else:
      ctx.flag_layout(lay, "padded with interior or negative padding")
      layouts.append(ctx.fresh(out_shape[d], "padded with interior or negative padding"))
  return [_Act(tuple(layouts))]


def _rule_slice(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shape, out_shape = _in_shapes(eqn)[0], _out_shape(eqn)
  strides = eqn.params.get("strides") or (1,) * len(in_shape)
  return [ctx.slice(ins[0], in_shape, out_shape, eqn.params["start_indices"], strides)]


def _rule_split(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[_Info]) -> list[_Info]:
  in_shape = _in_shapes(eqn)[0]
  axis, outs, start = eqn.params["axis"], [], 0
  for v in eqn.outvars:
    shape = _shape(v)
    starts = [0] * len(shape)
    starts[axis] = start
    outs.append(ctx.slice(ins[0], in_shape, shape, starts, (1,) * len(shape)))
    start += shape[axis]
  return outs


_RULES.update({name: _rule_elementwise for name in _ELEMENTWISE})
_RULES.update({name: _rule_reduce for name in _REDUCE})
_RULES.update({name: _rule_reduce_window for name in _REDUCE_WINDOW})
_RULES.update({name: _rule_cumulative for name in _CUMULATIVE})
_RULES.update({
    "optimization_barrier": _rule_pass_through,
    "conv_general_dilated": _rule_conv,
    "dot_general": _rule_dot,
    "reshape": _rule_reshape,
    "transpose": _rule_transpose,
    "broadcast_in_dim": _rule_broadcast_in_dim,
    "squeeze": _rule_squeeze,
    "rev": _rule_rev,
    "dynamic_slice": _rule_dynamic_slice,
    "concatenate": _rule_concatenate,
    "pad": _rule_pad,
    "slice": _rule_slice,
    "split": _rule_split,
})


# ----------------------------------------------------------------------------------------------------------------
# Public API.


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
  closed = jax.make_jaxpr(apply_fn)(params, *example_args)
  param_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  param_paths = [keypath_to_path(kp) for kp, _ in param_leaves]
  arg_leaves = jax.tree_util.tree_leaves(example_args)
  jaxpr = closed.jaxpr
  if len(jaxpr.invars) != len(param_paths) + len(arg_leaves):
    raise ValueError(f"the traced function has {len(jaxpr.invars)} inputs but params and example_args have "
                     f"{len(param_paths)} + {len(arg_leaves)} leaves; expected apply_fn(params, *example_args)")
  an = ChannelRuleContext()
  in_infos: list[_Info] = []
  for v, path in zip(jaxpr.invars, param_paths):
    in_infos.append(_Par(tuple(frozenset({(path, d)}) for d in range(len(_shape(v))))))
  for v in jaxpr.invars[len(param_paths):]:
    in_infos.append(_Act(tuple(an.fresh(s, _INPUT) for s in _shape(v))))
  const_infos = [_Par((frozenset(),) * np.ndim(c)) for c in closed.consts]
  outs = an.run(jaxpr, const_infos, in_infos)
  _warn_unread(jaxpr, param_leaves, param_paths, an)
  for info in outs:
    if isinstance(info, _Act):
      for layout in info.layouts:
        an.flag_layout(layout, _OUTPUT)

  roots: dict[int, None] = {}
  for n in range(len(an.parent)):
    r = an.find(n)
    if an.members[r]:
      roots.setdefault(r, None)
  if not roots:
    an.warn("no parameter is indexed by any channel set; does apply_fn read its parameters from its first "
            "argument?")
  groups: list[ChannelGroup] = []
  names: dict[str, int] = {}
  for r in sorted(roots):
    members = sorted(an.members[r], key=lambda m: an.members[r][m])
    reasons = dict(an.reasons[r])
    producers = [m for m in members if m.role == "out"]
    if _CONSTANT in reasons:
      name = path_str(members[0].path[:-1]) + "/constant"
    elif producers:
      name = path_str(producers[0].path[:-1]) or path_str(producers[0].path)
    elif _INPUT in reasons:
      name = "input"
    else:
      name = path_str(members[0].path[:-1]) + "/in"
    count = names.get(name, 0)
    names[name] = count + 1
    if count:
      name = f"{name}#{count + 1}"
    for m in members:
      why = an.lost.get((m.path, m.axis))
      if why is not None:
        what = f"parameter {path_str(m.path)} axis {m.axis} is {why}"
        reasons[f"{what}, so removing its channels is not the same as zeroing them"] = None
        an.warn(f"{what}; channel group {name!r} is marked not prunable")
    groups.append(ChannelGroup(name, an.size[r], tuple(members), prunable=not reasons,
                               note="; ".join(reasons)))
  _emit_warnings(an.warned)
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
