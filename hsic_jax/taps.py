"""Calibration taps read from a model's jaxpr: the decisions of any Flax CNN and what each decision's layers see.

A *decision* sets the width of one prunable channel group (:func:`hsic_jax.derive_model_groups`, or groups the
user declares). Its *consumers* are the convolutions and dense layers whose kernel has an ``"in"`` member in the
group: the layers that read the group's channels. APIB's problem for a decision (:func:`hsic_jax.problem_from_features`)
needs, on every calibration image, the consumer's input split into the group's channels and a target:

- ``X``: the consumer's input restricted to the group's ``c`` channels, ``(n, c, s)``; a conv's ``(n, h, w, C)`` input
  gives ``s = h * w`` values per channel (row-major), a dense layer reading a channels-last flatten gives ``s`` =
  the flattened positions, and a dense layer reading ``(n, C)`` gives ``s = 1``;
- ``Y`` (``target``): the consumer's output before anything else is applied to it (its own bias added, so before
  its BatchNorm and activation) flattened per image (``"pre_bn"``, APIB's choice), the network's first output
  (``"logits"``), or a :class:`Site`: the input or output of any conv or dense layer named by its path (the input of
  the classifier is the pooled feature; the input of the next block's first conv is a block's output). ``target``
  may be a mapping from decision names (``fnmatch`` patterns) to these, the rest getting ``"pre_bn"``.

A group read by several layers (a concatenation feeding two convs, a squeeze-excitation gate and the conv after it)
has several consumers; ``consumers`` chooses: ``"first"`` (the first in forward order, the default), ``"sum"``
(one problem per consumer, summed: every reader's dependence counts), or a mapping from decision or group names to
one consumer path or several (summed); decisions not in the mapping take the first.

How it works. The forward pass is traced once per input shape with :func:`jax.make_jaxpr`; the channel rules of
group derivation (:mod:`hsic_jax.jaxpr_groups`) give, for every conv and dot equation, which parameter axis meets
which activation axis, so each ``"in"`` member names the equation that consumes it and the operand that holds its
channels (at ``offset``, ``spatial`` times, as the member says). The taps are then read by evaluating the jaxpr
with an interpreter that binds every primitive as :func:`jax.core.eval_jaxpr` does, entering ``pjit``,
``custom_jvp``, ``custom_vjp`` and ``remat`` bodies as the derivation does, and keeps just the values the decisions
need: one jitted pass per calibration batch, whose taps are turned into problems and summed over batches with
:func:`hsic_jax.combine_problems` (the batches' activations are never held together).

BatchNorm runs with each batch's own statistics (``bn_mode="batch"``, APIB's reference, with dropout and other
training-only behaviour off) or with the running statistics (``"running"``); the model is not changed either way.

Other evidence from the same interpreter: :func:`activations`, each decision's activation (its first consumer's
input, the group's channels, channels last), the input of ITPruner's layer similarity (:func:`similarity`) and of
the activation criteria (:mod:`hsic_jax.criteria`).

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> model = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
...                        nnx.relu, nnx.Conv(8, 4, (3, 3), rngs=nnx.Rngs(0)))
>>> x = jnp.ones((4, 8, 8, 3)) * jnp.arange(4.0)[:, None, None, None]
>>> [(d.name, d.group.name, d.consumers) for d in decisions(model, x)]
[('layers/3', 'layers/0', ('layers/3',))]
>>> [(x.shape, y.shape) for x, y in features(model, x)["layers/3"]]
[((4, 8, 64), (4, 256))]
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsic_jax import _jaxpr_walk, jaxpr_groups, kernels
from hsic_jax._jaxpr_context import INPUT, Act, ChannelRuleContext, Par, no_sources, var_shape
from hsic_jax._jaxpr_rules import RULES
from hsic_jax._nnx_apply import BN_MODES, pure_apply
from hsic_jax.groups import ChannelGroup, ChannelSlice, Path, keypath_to_path, path_str
from hsic_jax.problem import LassoProblem, combine_problems, problem_from_features

__all__ = [
    "BN_MODES",
    "Decision",
    "Site",
    "sum_batches",
    "activations",
    "calibration_problems",
    "decisions",
    "feature_fn",
    "features",
    "similarity",
]

TARGETS = ("pre_bn", "logits")


@dataclasses.dataclass(frozen=True)
class Decision:
  """One pruning decision: the width of a prunable group, and the layers that read its channels.

  Attributes:
    name: the first consumer's layer path (``"stage1/block0/conv2"``), or ``"{layer}:{group}"`` where several
      groups share their first consumer (the branches of a concatenation).
    group: the channel group whose width the decision sets.
    consumers: layer paths of the convs and dense layers reading the group's channels, in forward order (a layer
      applied twice appears twice).
  """

  name: str
  group: ChannelGroup
  consumers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Site:
  """A value of the forward pass, as a calibration target ``Y``: the input or the output of a conv or dense layer.

  Attributes:
    layer: the layer's path (its kernel's path without ``kernel``), e.g. ``"fc"`` or ``"stage2/block0/conv1"``.
    side: ``"input"`` (the whole activation it reads) or ``"output"`` (what it computes, its bias added).
  """

  layer: str
  side: Literal["input", "output"] = "output"

  def __post_init__(self) -> None:
    if self.side not in ("input", "output"):
      raise ValueError(f"Site.side must be 'input' or 'output', got {self.side!r}")


Target = str | Site
Consumers = str | Mapping[str, str | Sequence[str]]


# ----------------------------------------------------------------------------------------------------------------
# The traced program and where its layers are.


@dataclasses.dataclass(frozen=True)
class _Use:
  """One equation that contracts a kernel axis with an activation axis (a conv or a dense layer applied once)."""

  index: int  # position of the equation in the walk (call bodies entered)
  operand: int  # the activation operand
  batch: int  # its batch axis
  feature: int  # its axis that meets the kernel's input axis
  out: int  # position of the layer's output value: this equation or the bias add after it
  out_batch: int  # batch axis of that output


@dataclasses.dataclass(frozen=True)
class _Tap:
  """Where one consumer's ``X`` and ``Y`` are: values kept by the interpreter, and how ``X`` is cut from its value."""

  x: tuple[int, str, int]  # (equation, "in" | "out", operand or result)
  x_batch: int
  x_feature: int
  offset: int
  size: int
  spatial: int
  y: tuple[int, str, int] | None  # None: the network's first output
  y_batch: int


class _Program:
  """The forward pass traced at one input shape, with every layer's uses found by the channel rules."""

  def __init__(self, apply: Any, pure: Any, args: tuple[Any, ...]) -> None:
    try:
      self.closed = jax.make_jaxpr(apply)(pure, *args)
    except jax.errors.ConcretizationTypeError as err:
      raise ValueError(f"the model's forward pass cannot be traced once for all inputs: it branches or loops in "
                       f"Python on a traced value ({type(err).__name__}: {str(err).splitlines()[0]}); calibration "
                       "taps need a forward pass whose operations do not depend on the input's values") from err
    leaves, _ = jax.tree_util.tree_flatten_with_path(pure)
    self.paths = [keypath_to_path(kp) for kp, _ in leaves]
    self.ranks = {p: np.ndim(leaf) for p, (_, leaf) in zip(self.paths, leaves)}
    self.num_args = len(jax.tree_util.tree_leaves(args))
    self.records: list[tuple[jcore.JaxprEqn, list[int | None], list[int], list[Any]]] = []
    self._walk()
    self.uses = self._find_uses()

  def _walk(self) -> None:
    jaxpr = self.closed.jaxpr
    ctx = ChannelRuleContext(RULES)
    ids = itertools.count()
    ins = [(next(ids), Par(tuple(frozenset({(path, d)}) for d in range(len(var_shape(v))))))
           for v, path in zip(jaxpr.invars, self.paths)]
    ins += [(next(ids), Act(tuple(ctx.fresh(s, INPUT) for s in var_shape(v)))) for v in jaxpr.invars[len(self.paths):]]
    consts = [(next(ids), no_sources(np.ndim(c))) for c in self.closed.consts]

    def rule(eqn: jcore.JaxprEqn, values: list[tuple[int | None, Any]]) -> list[tuple[int, Any]]:
      abstract = [a for _, a in values]
      outs = ctx.eqn(eqn, abstract)
      out_ids = [next(ids) for _ in outs]
      self.records.append((eqn, [i for i, _ in values], out_ids, abstract))
      return list(zip(out_ids, outs))

    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # derivation itself reports what it cannot follow
      outs = _jaxpr_walk.interpret(jaxpr, consts, ins, rule, default=lambda v: (None, no_sources(len(var_shape(v)))),
                                   const_value=lambda c: (next(ids), no_sources(np.ndim(c))))
    self.out_ids = [i for i, _ in outs]

  def _find_uses(self) -> dict[tuple[Path, int], list[_Use]]:
    readers: dict[int, list[int]] = {}
    for k, (_, in_ids, _, _) in enumerate(self.records):
      for i in in_ids:
        if i is not None:
          readers.setdefault(i, []).append(k)
    uses: dict[tuple[Path, int], list[_Use]] = {}
    for k, (eqn, _, out_ids, abstract) in enumerate(self.records):
      for source, use in self._contractions(k, eqn, abstract):
        out, out_batch = self._with_bias(k, out_ids[0], source[0], readers), use.out_batch
        uses.setdefault(source, []).append(dataclasses.replace(use, out=out, out_batch=out_batch))
    return uses

  def _contractions(self, k: int, eqn: jcore.JaxprEqn, abstract: list[Any]) -> list[tuple[tuple[Path, int], _Use]]:
    """``((kernel path, axis), use)`` for every kernel axis that equation ``k`` contracts with an activation axis."""
    name = eqn.primitive.name
    found = []
    if name == "conv_general_dilated" and len(abstract) == 2:
      lhs, rhs = abstract
      dn = eqn.params["dimension_numbers"]
      if isinstance(lhs, Act) and isinstance(rhs, Par) and eqn.params["feature_group_count"] == 1:
        for source in rhs.sources[dn.rhs_spec[1]]:
          found.append((source, _Use(k, 0, dn.lhs_spec[0], dn.lhs_spec[1], k, dn.out_spec[0])))
    elif name == "dot_general" and len(abstract) == 2:
      (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
      if lb or len(lc) != 1:
        return found
      for act, par in ((0, 1), (1, 0)):
        a, p = abstract[act], abstract[par]
        if not (isinstance(a, Act) and isinstance(p, Par)):
          continue
        ai, pj = (lc[0], rc[0]) if act == 0 else (rc[0], lc[0])
        if ai == 0:
          continue  # the batch axis is contracted: no per-image value
        shapes = [var_shape(v) for v in eqn.invars]
        free = [i for i in range(len(shapes[act])) if i != ai]
        out_batch = free.index(0) + (0 if act == 0 else len(shapes[0]) - 1)
        for source in p.sources[pj]:
          found.append((source, _Use(k, act, 0, ai, k, out_batch)))
    return found

  def _with_bias(self, k: int, out_id: int, kernel: Path, readers: dict[int, list[int]]) -> int:
    """The equation computing the layer's output: ``k``, or the add of the layer's own bias that alone reads it."""
    after = readers.get(out_id, [])
    if len(after) != 1:
      return k
    eqn, in_ids, _, abstract = self.records[after[0]]
    if eqn.primitive.name != "add":
      return k
    layer = kernel[:-1]
    other = [a for i, a in zip(in_ids, abstract) if i != out_id]
    if len(other) == 1 and isinstance(other[0], Par):
      sources = [s for axis in other[0].sources for s in axis]
      if sources and all(tuple(p[:len(layer)]) == layer and p != kernel for p, _ in sources):
        return after[0]
    return k

  def layer_uses(self, layer: str) -> list[_Use]:
    """Every use of the kernel ``layer/kernel`` (any of its axes), in forward order."""
    out = {}
    for (path, _), us in self.uses.items():
      if path_str(path[:-1]) == layer and str(path[-1]) == "kernel":
        for u in us:
          out[u.index] = u
    return [out[k] for k in sorted(out)]

  def member_uses(self, m: ChannelSlice) -> list[_Use]:
    axis = m.axis % self.ranks[m.path] if m.path in self.ranks else m.axis
    return self.uses.get((tuple(m.path), axis), [])


# ----------------------------------------------------------------------------------------------------------------
# Inputs.


def _as_args(batch: Any) -> tuple[Any, ...]:
  """A batch as the model's positional arguments: an array is one argument, a tuple or list holds several."""
  if isinstance(batch, (tuple, list)):
    return tuple(batch)
  return (batch,)


def _batch_list(batches: Any) -> list[tuple[Any, ...]]:
  """``batches`` (an array: one batch; else an iterable of batches) as a list of argument tuples."""
  if hasattr(batches, "shape") and hasattr(batches, "dtype"):
    return [(batches,)]
  if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
    raise ValueError(f"batches must be an array or an iterable of batches (arrays, or tuples of a multi-input "
                     f"model's arrays), got {type(batches).__name__}")
  return [_as_args(b) for b in batches]


def _check_batch(i: int, args: tuple[Any, ...], first: tuple[Any, ...] | None) -> int:
  """The batch's number of images, after checking it against the first batch (shapes apart from ``n``)."""
  leaves = jax.tree_util.tree_leaves(args)
  shapes = [tuple(np.shape(leaf)) for leaf in leaves]
  if not shapes or any(len(s) == 0 for s in shapes):
    raise ValueError(f"calibration batch {i} must hold arrays with a leading batch axis, got shapes {shapes}")
  ns = {s[0] for s in shapes}
  if len(ns) != 1:
    raise ValueError(f"calibration batch {i} has inputs of different batch sizes {shapes}; expected one n for all")
  n = ns.pop()
  if n < 2:
    raise ValueError(f"calibration batch {i} has {n} image(s); HSIC needs at least 2 per batch")
  if first is not None:
    ref = [tuple(np.shape(leaf))[1:] for leaf in jax.tree_util.tree_leaves(first)]
    if [s[1:] for s in shapes] != ref or len(shapes) != len(ref):
      raise ValueError(f"calibration batch {i} has input shapes {shapes}, but batch 0 has "
                       f"{[(None,) + s for s in ref]} (None: any number of images); every batch must have the "
                       "same shape apart from its number of images")
  return int(n)


# ----------------------------------------------------------------------------------------------------------------
# Decisions.


def _prunable(model: nnx.Module, groups: Sequence[ChannelGroup] | None, args: tuple[Any, ...]) -> list[ChannelGroup]:
  if groups is None:
    groups = jaxpr_groups.derive_model_groups(model, *args)
  groups = list(groups)
  if any(not isinstance(g, ChannelGroup) for g in groups):
    raise ValueError(f"groups must be a sequence of ChannelGroup, got {[type(g).__name__ for g in groups][:5]}")
  prunable = [g for g in groups if g.prunable]
  if not prunable:
    why = "; ".join(f"{g.name}: {g.note}" for g in groups[:6] if g.note)
    raise ValueError(f"model {type(model).__name__} has no prunable channel group ({len(groups)} groups, none "
                     f"prunable{': ' + why if why else ''}); there is nothing to calibrate or prune")
  return prunable


def _consumer_uses(program: _Program, group: ChannelGroup) -> list[tuple[ChannelSlice, _Use]]:
  """``(member, use)`` for every layer application reading the group's channels, in forward order."""
  out = []
  for m in group.members:
    if m.role != "in":
      continue
    uses = program.member_uses(m)
    if not uses:
      raise ValueError(f"group {group.name!r}: its consumer {path_str(m.path)} (axis {m.axis}) is not read by a "
                       "convolution or dense layer that calibration taps can follow (a conv or dot_general of an "
                       "activation with that kernel axis)")
    out += [(m, u) for u in uses]
  return sorted(out, key=lambda mu: mu[1].index)


def _decisions(program: _Program, groups: Sequence[ChannelGroup]) -> list[Decision]:
  rows = []
  for g in groups:
    uses = _consumer_uses(program, g)
    if uses:
      rows.append((uses[0][1].index, g, tuple(path_str(m.path[:-1]) for m, _ in uses)))
  rows.sort(key=lambda r: r[0])
  firsts = [r[2][0] for r in rows]
  return [Decision(first if firsts.count(first) == 1 else f"{first}:{g.name}", g, cons)
          for (_, g, cons), first in zip(rows, firsts)]


def decisions(model: nnx.Module, *example_args: Any, groups: Sequence[ChannelGroup] | None = None) -> list[Decision]:
  """The pruning decisions of ``model``: one per prunable group that some conv or dense layer reads, in forward
  order of their first consumer.

  Args:
    model: an NNX model.
    *example_args: example inputs (shapes and dtypes matter; a batch of 2 or more).
    groups: the channel groups (e.g. ``model.channel_groups()``); by default
      :func:`hsic_jax.derive_model_groups`.

  Raises:
    ValueError: no prunable group, a forward pass that branches on a traced value, or a group whose ``"in"``
      member no conv or dense layer reads.
  """
  apply, pure = pure_apply(model, "running")
  program = _Program(apply, pure, example_args)
  return _decisions(program, _prunable(model, groups, example_args))


# ----------------------------------------------------------------------------------------------------------------
# Choosing X and Y.


def _target_for(name: str, target: Target | Mapping[str, Target]) -> Target:
  if isinstance(target, Mapping):
    for pattern, value in target.items():
      if fnmatch.fnmatchcase(name, pattern):
        return value
    return "pre_bn"
  return target


def _check_target(target: Any) -> None:
  values = list(target.values()) if isinstance(target, Mapping) else [target]
  for t in values:
    if not (isinstance(t, Site) or t in TARGETS):
      raise ValueError(f"target must be one of {list(TARGETS)}, a Site(layer, side), or a mapping of decision names "
                       f"to those, got {t!r}")


def _chosen(d: Decision, uses: list[tuple[ChannelSlice, _Use]], consumers: Consumers) -> list[int]:
  """Indices into ``uses`` of the consumers whose problems make the decision's."""
  if isinstance(consumers, Mapping):
    choice = consumers.get(d.name, consumers.get(d.group.name, "first"))
    if choice != "first":
      paths = [choice] if isinstance(choice, str) else list(choice)
      idx = [i for i, c in enumerate(d.consumers) if c in paths]
      missing = [p for p in paths if p not in d.consumers]
      if missing or not idx:
        raise ValueError(f"consumers[{d.name!r}] names {missing or paths}, which do not read the channels of group "
                         f"{d.group.name!r}; its consumers are {list(d.consumers)}")
      return idx
    return [0]
  if consumers == "first":
    return [0]
  if consumers == "sum":
    return list(range(len(uses)))
  raise ValueError(f"consumers must be 'first', 'sum' or a mapping of decision or group names to consumer paths, "
                   f"got {consumers!r}")


def _site_value(program: _Program, site: Site) -> tuple[tuple[int, str, int], int]:
  uses = program.layer_uses(site.layer)
  if len(uses) != 1:
    what = "no conv or dense layer has that path" if not uses else f"the layer is applied {len(uses)} times"
    raise ValueError(f"target Site({site.layer!r}, {site.side!r}) must name a conv or dense layer applied once; "
                     f"{what}")
  u = uses[0]
  if site.side == "input":
    return (u.index, "in", u.operand), u.batch
  return (u.out, "out", 0), u.out_batch


def _plan(program: _Program, decs: Sequence[Decision], target: Any, consumers: Consumers,
          ) -> dict[str, list[_Tap]]:
  """Per decision, the taps of its chosen consumers."""
  _check_target(target)
  by_group = {d.group.name: d for d in decs}
  if isinstance(consumers, Mapping):
    unknown = [k for k in consumers if k not in by_group and k not in {d.name for d in decs}]
    if unknown:
      raise ValueError(f"consumers names {unknown}, which are neither decisions nor groups; decisions: "
                       f"{[d.name for d in decs]}")
  plan = {}
  for d in decs:
    uses = _consumer_uses(program, d.group)
    t = _target_for(d.name, target)
    taps = []
    for i in _chosen(d, uses, consumers):
      m, u = uses[i]
      if t == "pre_bn":
        y, y_batch = (u.out, "out", 0), u.out_batch
      elif t == "logits":
        y, y_batch = None, 0
      else:
        y, y_batch = _site_value(program, t)
      taps.append(_Tap((u.index, "in", u.operand), u.batch, u.feature, m.offset, d.group.size, m.spatial, y,
                       y_batch))
    plan[d.name] = taps
  return plan


# ----------------------------------------------------------------------------------------------------------------
# The interpreter.


def _bind(eqn: jcore.JaxprEqn, ins: list[Any]) -> list[Any]:
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*ins, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _literal(v: Any) -> Any:
  if isinstance(v, jcore.Literal):
    return v.val
  raise ValueError(f"jaxpr variable {v} is read before it is written")


def _evaluate(closed: jcore.ClosedJaxpr, args: Sequence[Any], keep: set[tuple[int, str, int]]
              ) -> tuple[dict[tuple[int, str, int], Any], list[Any]]:
  """Runs the jaxpr (call bodies entered, in the order of :class:`_Program`'s walk); returns the kept values and
  the outputs."""
  kept: dict[tuple[int, str, int], Any] = {}
  wanted_in: dict[int, list[int]] = {}
  wanted_out: dict[int, list[int]] = {}
  for k, side, i in keep:
    (wanted_in if side == "in" else wanted_out).setdefault(k, []).append(i)
  counter = itertools.count()

  def rule(eqn: jcore.JaxprEqn, ins: list[Any]) -> list[Any]:
    k = next(counter)
    for i in wanted_in.get(k, ()):
      kept[(k, "in", i)] = ins[i]
    outs = _bind(eqn, ins)
    for i in wanted_out.get(k, ()):
      kept[(k, "out", i)] = outs[i]
    return outs

  outs = _jaxpr_walk.interpret(closed.jaxpr, list(closed.consts), list(args), rule, default=_literal,
                               const_value=lambda c: c)
  return kept, outs


def _float32(value: jax.Array) -> jax.Array:
  """A tap in at least float32: a model computing in bfloat16 records bfloat16 values, and the Grams built from them
  sum n^2 products that an 8-bit mantissa would round away."""
  return value.astype(jnp.promote_types(value.dtype, jnp.float32))


def _cut(value: jax.Array, tap: _Tap) -> jax.Array:
  """``X`` of a tap, ``(n, size, values per channel)``, from the consumer's input (at least float32)."""
  a = _float32(jnp.moveaxis(value, (tap.x_batch, tap.x_feature), (0, 1)))
  n, f = a.shape[:2]
  a = a.reshape(n, tap.spatial, f // tap.spatial, -1)[:, :, tap.offset:tap.offset + tap.size, :]
  return jnp.transpose(a, (0, 2, 1, 3)).reshape(n, tap.size, -1)


def _per_image(value: jax.Array, batch: int) -> jax.Array:
  a = _float32(jnp.moveaxis(value, batch, 0))
  return a.reshape(a.shape[0], -1)


def _channels_last(value: jax.Array, tap: _Tap) -> jax.Array:
  """A tap's activation ``(n, h, w, size)``: a conv's input keeps its two spatial axes, anything else gives
  ``(n, 1, values per channel, size)``."""
  if tap.spatial == 1 and value.ndim == 4:
    a = _float32(jnp.moveaxis(value, (tap.x_batch, tap.x_feature), (0, -1)))
    return a[..., tap.offset:tap.offset + tap.size]
  return jnp.swapaxes(_cut(value, tap), 1, 2)[:, None]


class _Tapper:
  """A model's traced programs (one per input shape) and the jitted pass that reads one batch's taps."""

  def __init__(self, model: nnx.Module, first: tuple[Any, ...], *, bn_mode: str,
               groups: Sequence[ChannelGroup] | None, decs: Sequence[Decision] | None) -> None:
    self.apply, self.pure = pure_apply(model, bn_mode)
    self.leaves = jax.tree_util.tree_leaves(self.pure)
    self.first = first
    self._programs: dict[Any, _Program] = {}
    program = self.program(first)
    if decs is None:
      decs = _decisions(program, _prunable(model, groups, first))
    decs = list(decs)
    if not decs or any(not isinstance(d, Decision) for d in decs):
      raise ValueError(f"decisions must be a non-empty sequence of Decision (from hsic_jax.taps.decisions), got "
                       f"{decs!r:.200}")
    self.decisions = decs
    self._passes: dict[Any, Any] = {}

  def program(self, args: tuple[Any, ...]) -> _Program:
    key = tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in jax.tree_util.tree_leaves(args))
    if key not in self._programs:
      self._programs[key] = _Program(self.apply, self.pure, args)
    return self._programs[key]

  def jitted(self, args: tuple[Any, ...], what: str, target: Any = "pre_bn", consumers: Consumers = "first"):
    """A jitted ``(leaves, args) -> {decision: [value per tap]}`` for this input shape."""
    program = self.program(args)
    key = (id(program), what, repr(target), repr(consumers))
    if key not in self._passes:
      plan = _plan(program, self.decisions, target, consumers)
      if what == "activations":
        plan = {name: taps[:1] for name, taps in _plan(program, self.decisions, "pre_bn", "first").items()}
      keep = {t.x for taps in plan.values() for t in taps}
      keep |= {t.y for taps in plan.values() for t in taps if t.y is not None and what == "features"}
      closed = program.closed

      def run(leaves: list[Any], arg_leaves: list[Any]) -> dict[str, list[Any]]:
        kept, outs = _evaluate(closed, [*leaves, *arg_leaves], keep)
        out = {}
        for name, taps in plan.items():
          if what == "activations":
            out[name] = [_channels_last(kept[t.x], t) for t in taps]
          else:
            out[name] = [(_cut(kept[t.x], t), _per_image(outs[0] if t.y is None else kept[t.y], t.y_batch))
                         for t in taps]
        return out

      self._passes[key] = jax.jit(run)
    return self._passes[key]

  def __call__(self, args: tuple[Any, ...], what: str, target: Any = "pre_bn", consumers: Consumers = "first"):
    fn = self.jitted(args, what, target, consumers)
    return fn(self.leaves, [jnp.asarray(a) for a in jax.tree_util.tree_leaves(args)])


def _tapper(model: nnx.Module, batches: Any, bn_mode: str, groups: Any, decs: Any
            ) -> tuple[_Tapper, list[tuple[Any, ...]]]:
  batch_list = _batch_list(batches)
  if not batch_list:
    raise ValueError("batches is empty; expected at least one calibration batch")
  for i, b in enumerate(batch_list):
    _check_batch(i, b, batch_list[0] if i else None)
  return _Tapper(model, batch_list[0], bn_mode=bn_mode, groups=groups, decs=decs), batch_list


# ----------------------------------------------------------------------------------------------------------------
# Public entry points.


def features(model: nnx.Module, batch: Any, *, decisions: Sequence[Decision] | None = None,
             groups: Sequence[ChannelGroup] | None = None, target: Target | Mapping[str, Target] = "pre_bn",
             consumers: Consumers = "first", bn_mode: str = "batch") -> dict[str, list[tuple[jax.Array, jax.Array]]]:
  """``{decision: [(X, Y) per chosen consumer]}`` on one batch: ``X`` ``(n, c, s)`` and ``Y`` ``(n, values)``
  (see the module docstring for ``target`` and ``consumers``).

  Args:
    model: an NNX model.
    batch: the model's input (an array), or a tuple of a multi-input model's arrays.
    decisions: the decisions to tap (default: :func:`decisions` of the batch).
    groups: the channel groups when ``decisions`` is not given (default: derived).
    target, consumers: what ``Y`` is and which consumers give ``X`` and ``Y``.
    bn_mode: ``"batch"`` or ``"running"`` statistics for BatchNorm.

  Raises:
    ValueError: bad arguments (named), as :func:`decisions`.
  """
  tapper, (args,) = _tapper(model, [batch], bn_mode, groups, decisions)
  return tapper(args, "features", target, consumers)


def feature_fn(model: nnx.Module, example: Any, *, decisions: Sequence[Decision] | None = None,
               groups: Sequence[ChannelGroup] | None = None, target: Target | Mapping[str, Target] = "pre_bn",
               consumers: Consumers = "first", bn_mode: str = "batch"
               ) -> Callable[[Any], dict[str, list[tuple[jax.Array, jax.Array]]]]:
  """:func:`features` as a reusable function: ``batch -> {decision: [(X, Y) per chosen consumer]}``, traced once per
  input shape and jitted (for timing the taps apart from the problems, or feeding them to your own builder).
  ``example`` is a batch of the model's input (its shape is traced; a batch of another shape is traced again).
  The model's parameters are read when this is called: later changes to the model are not seen.

  Raises:
    ValueError: as :func:`features`.
  """
  tapper, _ = _tapper(model, [example], bn_mode, groups, decisions)

  def run(batch: Any) -> dict[str, list[tuple[jax.Array, jax.Array]]]:
    args = _as_args(batch)
    _check_batch(0, args, None)
    return tapper(args, "features", target, consumers)

  return run


def calibration_problems(model: nnx.Module, batches: Any, *, decisions: Sequence[Decision] | None = None,
                         groups: Sequence[ChannelGroup] | None = None,
                         target: Target | Mapping[str, Target] = "pre_bn", consumers: Consumers = "first",
                         bandwidth: kernels.Bandwidth = "apib", normalized: bool = False,
                         bn_mode: str = "batch", progress: Callable[[], None] | None = None
                         ) -> tuple[list[str], list[LassoProblem]]:
  """One HSIC Lasso problem per decision, summed over calibration batches (block HSIC Lasso, one block a batch).

  For decision ``d`` and batch ``b`` with taps ``(X_k, Y_k)`` of its chosen consumers ``k``,
  ``P_d = sum_b sum_k problem_from_features(X_k^b, Y_k^b)``: ``Q``, ``q``, ``||L̄||^2`` and the row counts add
  (:func:`hsic_jax.combine_problems`). Each batch is one jitted forward pass keeping only the taps.

  Args:
    model: an NNX model (not changed).
    batches: an array (one batch), or an iterable of batches (arrays, or tuples of a multi-input model's arrays);
      every batch has the same shape apart from its number of images (at least 2).
    decisions: the decisions (default: :func:`decisions` of the first batch).
    groups: the channel groups when ``decisions`` is not given (default: derived).
    target: ``Y``: ``"pre_bn"``, ``"logits"``, a :class:`Site`, or a mapping of decision names (``fnmatch``
      patterns) to those.
    consumers: ``"first"``, ``"sum"`` or a mapping of decision or group names to consumer paths.
    bandwidth: the Gaussian bandwidth rule of ``X``'s channels and ``Y`` (:func:`hsic_jax.problem_from_features`).
    normalized: Frobenius-normalised Grams (pyHSICLasso) or not (APIB).
    bn_mode: ``"batch"`` or ``"running"``.
    progress: called once per batch, after its problems are dispatched (a progress bar's update).

  Returns:
    ``(names, problems)``: the decisions' names and their problems, in the decisions' order.

  Raises:
    ValueError: bad arguments (named); batches of different shapes; no prunable group; a forward pass that
      branches on a traced value; problems that are not finite (naming the decisions).
  """
  tapper, batch_list = _tapper(model, batches, bn_mode, groups, decisions)
  names = [d.name for d in tapper.decisions]
  per: dict[str, list[LassoProblem]] = {n: [] for n in names}
  for args in batch_list:
    taps = tapper(args, "features", target, consumers)
    for name in names:
      # Dispatched without waiting for each build's check; the sums are validated once below.
      per[name] += [problem_from_features(x, y, bandwidth=bandwidth, normalized=normalized, check=False)
                    for x, y in taps[name]]
    if progress is not None:
      progress()
  return names, sum_batches(per)


def sum_batches(per: Mapping[str, Sequence[LassoProblem]]) -> list[LassoProblem]:
  """Each decision's batch problems summed (:func:`combine_problems`), then checked finite once for all of them.

  Raises:
    ValueError: naming the decisions whose summed problems hold NaN or Inf.
  """
  problems = [ps[0] if len(ps) == 1 else combine_problems(list(ps)) for ps in per.values()]
  finite = np.asarray(jnp.stack([jnp.all(jnp.isfinite(p.quad)) & jnp.all(jnp.isfinite(p.lin)) & jnp.isfinite(p.const)
                                 for p in problems]))
  if not finite.all():
    bad = [n for n, ok in zip(per, finite) if not ok]
    raise ValueError(f"the calibration problems of {bad} are not finite: the model's activations there hold NaN or "
                     "Inf, or values too large for float32 Gram products (check the weights and the input "
                     "normalisation)")
  return problems


def activations(model: nnx.Module, batches: Any, *, decisions: Sequence[Decision] | None = None,
                groups: Sequence[ChannelGroup] | None = None, bn_mode: str = "batch") -> list[jax.Array]:
  """Each decision's activation on all calibration images: its first consumer's input, the group's channels,
  ``(n, h, w, c)`` for a conv (``(n, 1, s, c)`` for a dense layer reading ``s`` values per channel), concatenated
  over batches (this holds the activations of every image: what ITPruner's Gram matrices and the activation
  criteria of :mod:`hsic_jax.criteria` read).

  Arguments as :func:`calibration_problems`.
  """
  tapper, batch_list = _tapper(model, batches, bn_mode, groups, decisions)
  parts = [tapper(args, "activations") for args in batch_list]
  return [jnp.concatenate([p[d.name][0] for p in parts]) if len(parts) > 1 else parts[0][d.name][0]
          for d in tapper.decisions]


def similarity(model: nnx.Module, batches: Any, *, kernel: str = "linear",
               decisions: Sequence[Decision] | None = None, groups: Sequence[ChannelGroup] | None = None,
               bn_mode: str = "batch", acts: Sequence[jax.Array] | None = None) -> np.ndarray:
  """ITPruner's ``(l, l)`` normalised HSIC between the decisions' :func:`activations` (each flattened per image):
  ``S_ij = HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i) HSIC(K_j, K_j))``, linear CKA for ``kernel="linear"``.

  ``acts``: the activations when the caller has them already (then ``model`` and ``batches`` are not read).
  """
  if acts is None:
    acts = activations(model, batches, decisions=decisions, groups=groups, bn_mode=bn_mode)
  return np.asarray(kernels.hsic_matrix(list(acts), kernel=kernel, normalized=True), np.float64)

