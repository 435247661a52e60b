"""The state of one channel-group derivation: abstract values of jaxpr variables and the union-find over channel
sets that the rules (:mod:`hsic_jax._jaxpr_rules`) build with. How they relate to a model's channels is stated in
:mod:`hsic_jax.jaxpr_groups`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.extend.core as jcore
import numpy as np

from hsic_jax import _jaxpr_walk
from hsic_jax.groups import ChannelSlice, Path, path_str


Source = tuple[Path, int]  # (parameter path, axis of that leaf)

# Reasons recorded on channel sets; any reason makes the set's group not prunable.
INPUT = "network input"
OUTPUT = "network output"
SPATIAL = "spatial axis"
CONSTANT = "constant channels (padding or a concatenated constant) that no parameter produces"


@dataclasses.dataclass(frozen=True)
class Seg:
  node: int  # a channel set (possibly a constant one: padding, a concatenated constant)
  size: int


@dataclasses.dataclass(frozen=True)
class Layout:
  """An axis of length ``repeat * sum(seg sizes)``: index ``p * width + offset_k + c`` is channel c of segment k."""

  repeat: int
  segs: tuple[Seg, ...]

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
class Act:
  """A value that depends on the network input: one layout per axis."""

  layouts: tuple[Layout, ...]


@dataclasses.dataclass(frozen=True)
class Par:
  """A value computed from parameters and constants only: per axis, the parameter axes it is indexed by."""

  sources: tuple[frozenset[Source], ...]


AbstractValue = Act | Par
"""The abstract value of a jaxpr variable: an activation (per axis, the channel sets it holds) or a value computed
from parameters and constants only (per axis, the parameter axes it is indexed by). Rules receive and return them;
build them with the :class:`ChannelRuleContext` helpers."""


def var_shape(v: Any) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def no_sources(rank: int) -> Par:
  return Par((frozenset(),) * rank)


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

  def __init__(self, rules: Mapping[str, Callable[..., Sequence[AbstractValue]]]) -> None:
    self.rules = rules  # primitive name -> rule (see hsic_jax.jaxpr_groups.register_channel_rule)
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
    return isinstance(value, Act)

  def elementwise(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue]) -> list[AbstractValue]:
    """One result combining the operands position by position (operands of rank 0 or of the result's rank)."""
    return [self._elementwise(list(ins), [var_shape(v) for v in eqn.invars], var_shape(eqn.outvars[0]),
                              eqn.primitive.name)]

  def pass_through(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue]) -> list[AbstractValue]:
    """Result ``i`` is operand ``i`` (results must have the operands' shapes)."""
    if len(eqn.outvars) > len(ins) or any(var_shape(o) != var_shape(i) for o, i in zip(eqn.outvars, eqn.invars)):
      return self.opaque(eqn, ins)
    return list(ins[:len(eqn.outvars)])

  def mix_axes(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue], axes: Iterable[int],
               reason: str) -> list[AbstractValue]:
    """One result shaped like the first operand whose ``axes`` lose their channel identity (marked with ``reason``).

    Other operands are treated as :meth:`opaque` would if they are activations, and ignored otherwise.
    """
    in_shape, out_shape = var_shape(eqn.invars[0]), var_shape(eqn.outvars[0])
    if len(in_shape) != len(out_shape):
      return self.opaque(eqn, ins)
    for info in ins[1:]:
      if isinstance(info, Act):
        self.flag_info(info, reason)
    return [self.per_axis(ins[0], in_shape, out_shape, set(axes), reason)]

  def opaque(self, eqn: jcore.JaxprEqn, ins: Sequence[AbstractValue]) -> list[AbstractValue]:
    """Results of a primitive that is not understood: everything it touches loses its channel identity."""
    return self.opaque_as(eqn.primitive.name, list(ins), [var_shape(v) for v in eqn.outvars])

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
    return CONSTANT in self.reasons[self.find(n)]

  def flag(self, n: int | None, reason: str) -> None:
    if n is not None:
      self.reasons[self.find(n)][reason] = None

  def flag_layout(self, layout: Layout, reason: str) -> None:
    for n in layout.nodes():
      self.flag(n, reason)

  def flag_info(self, info: AbstractValue, reason: str) -> None:
    if isinstance(info, Act):
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

  def fresh(self, size: int, reason: str | None = None) -> Layout:
    return Layout(1, (Seg(self.new_node(size, reason), size),))

  def constant(self, size: int) -> Seg:
    """Channels that no parameter produces (padding, a concatenated constant): a fixed channel set of their own."""
    return Seg(self.new_node(size, CONSTANT), size)

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

  def attach(self, layout: Layout, sources: Iterable[Source], role: str) -> None:
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

  def tie(self, a: Seg, b: Seg) -> Seg:
    """One segment of an elementwise op's result from equal-sized segments of its operands."""
    if self.is_constant(a.node):
      return b
    if self.is_constant(b.node):
      return a
    return Seg(self.union(a.node, b.node), a.size)

  def unify(self, a: Layout, b: Layout) -> Layout:
    """Ties two layouts of one axis (operands of an elementwise op); returns the result's layout."""
    if a == b:
      return a
    if a.repeat == b.repeat and [s.size for s in a.segs] == [s.size for s in b.segs]:
      return Layout(a.repeat, tuple(self.tie(sa, sb) for sa, sb in zip(a.segs, b.segs)))
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
        return Layout(coarse.repeat, tuple(segs))
    self.flag_layout(a, reason)
    self.flag_layout(b, reason)
    return a

  def unify_all(self, layouts: Sequence[Layout]) -> Layout:
    out = layouts[0]
    for other in layouts[1:]:
      out = self.unify(out, other)
    return out

  # -- interpretation --------------------------------------------------------------------------------------------

  def run(self, jaxpr: jcore.Jaxpr, const_infos: Sequence[AbstractValue],
          in_infos: Sequence[AbstractValue]) -> list[AbstractValue]:
    return _jaxpr_walk.interpret(jaxpr, const_infos, in_infos, self.eqn,
                                 default=lambda v: no_sources(len(var_shape(v))),
                                 const_value=lambda c: no_sources(np.ndim(c)))

  def eqn(self, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
    """Abstract values of an equation's results: the registered rule for its primitive, else :meth:`opaque`."""
    if not ins:
      return [no_sources(len(var_shape(v))) for v in eqn.outvars]  # iota, constants
    name = eqn.primitive.name
    rule = self.rules.get(name)
    if rule is None:
      return self.opaque(eqn, ins)
    outs = list(rule(self, eqn, list(ins)))
    if len(outs) != len(eqn.outvars):
      raise ValueError(f"the channel rule for primitive {name!r} returned {len(outs)} values for an equation with "
                       f"{len(eqn.outvars)} results; expected one abstract value per result")
    for out, v in zip(outs, eqn.outvars):
      rank = len(out.layouts) if isinstance(out, Act) else len(out.sources) if isinstance(out, Par) else None
      if rank != len(var_shape(v)):
        raise ValueError(f"the channel rule for primitive {name!r} returned {out!r} for a result of shape "
                         f"{var_shape(v)}; expected an abstract value of rank {len(var_shape(v))} built with the "
                         "ChannelRuleContext helpers")
    return outs

  def opaque_as(self, name: str, ins: list[AbstractValue], out_shapes: list[tuple[int, ...]]) -> list[AbstractValue]:
    """:meth:`opaque` for an operation named ``name`` (a primitive used in a way its rule does not follow)."""
    if not any(isinstance(i, Act) for i in ins):
      for info in ins:  # parameters only (e.g. random keys, kernel preprocessing): silent unless a member
        self.flag_info(info, f"used by primitive {name!r}")
      return [no_sources(len(s)) for s in out_shapes]
    reason = f"passes through primitive {name!r}, which channel-group derivation does not understand"
    self.warn(f"primitive {name!r} is not understood; the channel groups it touches are marked not prunable")
    for info in ins:
      self.flag_info(info, reason)
    return [Act(tuple(self.fresh(s, reason) for s in shape)) for shape in out_shapes]

  # -- building blocks of the rules ------------------------------------------------------------------------------

  def remap(self, info: AbstractValue, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            mapping: Sequence[int | None], dropped: Sequence[int], reason: str | None) -> AbstractValue:
    """Output axis ``d`` is input axis ``mapping[d]`` (or new); ``dropped`` input axes vanish (flagged if reason)."""
    if isinstance(info, Act):
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
      return Act(tuple(layouts))
    srcs = [info.sources[m] if m is not None and in_shape[m] == out_shape[d] else frozenset()
            for d, m in enumerate(mapping)]
    if reason:
      for m in dropped:
        if in_shape[m] > 1:
          self.lose(info.sources[m], reason)
    return Par(tuple(srcs))

  def per_axis(self, info: AbstractValue, in_shape: tuple[int, ...], out_shape: tuple[int, ...], changed: set[int],
               reason: str) -> AbstractValue:
    """Axes in ``changed`` lose their channel identity (flagged); the others pass through."""
    changed = {d % len(in_shape) for d in changed} if in_shape else set()
    if isinstance(info, Act):
      layouts = []
      for d in range(len(out_shape)):
        if d in changed:
          self.flag_layout(info.layouts[d], reason)
          layouts.append(self.fresh(out_shape[d], reason))
        else:
          layouts.append(info.layouts[d])
      return Act(tuple(layouts))
    for d in changed:
      self.lose(info.sources[d], reason)
    return Par(tuple(frozenset() if d in changed else info.sources[d] for d in range(len(out_shape))))

  def _elementwise(self, ins: list[AbstractValue], in_shapes: list[tuple[int, ...]], out: tuple[int, ...],
                   name: str) -> AbstractValue:
    rank = len(out)
    if any(len(s) not in (0, rank) for s in in_shapes):
      return self.opaque_as(name, ins, [out])[0]
    if not any(isinstance(i, Act) for i in ins):
      return Par(tuple(frozenset().union(*[i.sources[d] for i, s in zip(ins, in_shapes)
                                            if isinstance(i, Par) and len(s) == rank and s[d] == out[d]])
                        for d in range(rank)))
    layouts = []
    for d in range(rank):
      acts = [i.layouts[d] for i, s in zip(ins, in_shapes) if isinstance(i, Act) and len(s) == rank
              and s[d] == out[d]]
      layout = self.unify_all(acts) if acts else self.fresh(out[d])
      for i, s in zip(ins, in_shapes):
        if isinstance(i, Par) and len(s) == rank and s[d] == out[d] and i.sources[d]:
          self.attach(layout, i.sources[d], "out")
      layouts.append(layout)
    return Act(tuple(layouts))

  def slice(self, info: AbstractValue, in_shape: tuple[int, ...], out_shape: Sequence[int], starts: Sequence[int],
            strides: Sequence[int | None]) -> AbstractValue:
    reason = "sliced into a partial channel range"
    if isinstance(info, Par):
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
        layouts.append(Layout(1, lay.segs[k0:k1]))
        continue
      self.flag_layout(lay, reason)
      layouts.append(self.fresh(out_shape[d], reason))
    return Act(tuple(layouts))


ChannelRule = Callable[[ChannelRuleContext, jcore.JaxprEqn, list[AbstractValue]], Sequence[AbstractValue]]
"""``rule(ctx, eqn, ins) -> outs``: the abstract values of ``eqn``'s results (one per ``eqn.outvars``) from those
of its operands ``ins`` (one per ``eqn.invars``), built with the :class:`ChannelRuleContext` helpers."""
