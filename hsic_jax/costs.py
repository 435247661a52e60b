"""Multiply-accumulates (MACs) and parameter counts of any NNX model, at any channel widths, from its jaxpr.

Counted at batch 1 (the leading axis of every example input is set to 1; the other axes are the inputs' own):

- a convolution (every ``conv_general_dilated`` whose kernel is read from a parameter, strided, dilated, grouped,
  depthwise or transposed): ``MACs = P * prod(kernel.shape)`` with ``P`` its output positions (``H_out * W_out``)
  and ``kernel.shape = (k_h, k_w, C_in / feature_group_count, C_out)``; a transposed convolution counts the
  multiplications of its dilated input, zeros included, as most counters do;
- a dense layer (every ``dot_general`` with a parameter operand): ``MACs = P * prod(kernel.shape)``, with ``P`` the
  positions it is applied at (1 after a global pool, ``H * W`` for a per-pixel Dense);
- params: every element of every ``nnx.Param`` (kernels, biases, norm scales and offsets; BatchNorm running
  statistics are not parameters). Norms, activations, pooling and additions cost no MACs.

Widths. A channel group (:class:`hsic_jax.ChannelGroup`) lists the parameter axes its channels index, so giving
group ``g`` the width ``w`` shrinks each member axis by ``(g.size - w) * spatial``; a depthwise convolution whose
kernel's output axis shrinks keeps one group per channel (its ``feature_group_count`` follows). Output positions do
not depend on the widths, so :func:`cost_fn` traces the model once and then counts any width vector with integer
arithmetic (about a millisecond): what a width search needs. :func:`count_macs` is one such call.

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> model = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu, nnx.Conv(8, 4, (1, 1), rngs=nnx.Rngs(0)))
>>> x = jnp.zeros((2, 16, 16, 3))
>>> count_macs(model, x).macs == 16 * 16 * (3 * 3 * 3 * 8 + 8 * 4)
True
>>> count_macs(model, x, widths={"layers/0": 5}).macs == 16 * 16 * (3 * 3 * 3 * 5 + 5 * 4)
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np
from flax import nnx

from hsic_jax import _jaxpr_walk
from hsic_jax.groups import ChannelGroup, path_str
from hsic_jax.jaxpr_groups import derive_model_groups

__all__ = [
    "Cost",
    "LayerCost",
    "cost_fn",
    "count_macs",
]

_Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One layer's row of a :class:`Cost`.

  Attributes:
    name: the layer's module path, e.g. ``"stage1/block0/conv1"`` (its kernel's path without ``kernel``).
    kind: ``"conv"``, ``"dwconv"`` (grouped or depthwise conv), ``"fc"`` (dense), ``"bn"`` (a module owning
      parameters and running statistics: a BatchNorm) or ``"other"`` (another module owning parameters).
    in_ch: input channels (conv: the kernel's input axis times the feature groups; fc: the contracted features).
    out_ch: output channels or features.
    kernel: the spatial kernel size (``(k_h, k_w)``) of a conv, else ``None``.
    out_hw: output positions ``(H_out, W_out)`` of a conv, of a per-pixel Dense, ``(1, 1)`` for a Dense on pooled
      features; ``None`` for a module without MACs.
    macs: multiply-accumulates of one forward pass at batch 1.
    params: parameter elements owned by the layer's module (kernel + bias, or scale + bias).
  """

  name: str
  kind: str
  in_ch: int
  out_ch: int
  kernel: tuple[int, ...] | None
  out_hw: tuple[int, ...] | None
  macs: int
  params: int


@dataclasses.dataclass(frozen=True)
class Cost:
  """MACs and params of one model at one width vector.

  Attributes:
    macs: total multiply-accumulates at batch 1 (the sum of the rows' ``macs``).
    params: total ``nnx.Param`` elements (the sum of the rows' ``params``).
    layers: one row per conv and dense layer, and one per other module owning parameters, in forward order.
  """

  macs: int
  params: int
  layers: tuple[LayerCost, ...]


# ------------------------------------------------------------------------------------------------------------------
# Tracing.


@dataclasses.dataclass(frozen=True)
class _Op:
  """A conv or dense op of the jaxpr whose weight operand is a parameter."""

  kernel_path: _Path
  kind: str  # "conv" or "fc"
  positions: int  # MACs = positions * prod(kernel shape)
  out_hw: tuple[int, ...]
  groups: int
  kernel_shape: tuple[int, ...]
  in_axes: tuple[int, ...]  # kernel axes read as input channels / features
  out_axes: tuple[int, ...]  # kernel axes that are output channels / features
  spatial_axes: tuple[int, ...]


# Ops that keep a parameter's identity (a kernel may be cast or reshaped on its way to the conv).
_PASS_THROUGH = frozenset({"convert_element_type", "reshape", "transpose", "copy", "squeeze", "expand_dims",
                           "copy_p", "rev"})


def _conv_op(eqn: jcore.JaxprEqn, path: _Path) -> _Op:
  dn = eqn.params["dimension_numbers"]
  out_shape = tuple(eqn.outvars[0].aval.shape)
  rhs_shape = tuple(eqn.invars[1].aval.shape)
  positions = math.prod(out_shape) // out_shape[dn.out_spec[1]]
  return _Op(path, "conv", positions, tuple(out_shape[d] for d in dn.out_spec[2:]), eqn.params["feature_group_count"],
             rhs_shape, (dn.rhs_spec[1],), (dn.rhs_spec[0],), tuple(dn.rhs_spec[2:]))


def _dot_op(eqn: jcore.JaxprEqn, path: _Path, w: int) -> _Op:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  contract, batch = (lc, lb) if w == 0 else (rc, rb)
  lhs_shape = tuple(eqn.invars[0].aval.shape)
  k_shape = tuple(eqn.invars[w].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  macs = math.prod(out_shape) * math.prod(lhs_shape[d] for d in lc)
  free = tuple(d for d in range(len(k_shape)) if d not in contract and d not in batch)
  out_hw = out_shape[1:3] if len(out_shape) == 4 else (1, 1)  # a Dense applied per pixel
  return _Op(path, "fc", macs // max(1, math.prod(k_shape)), tuple(out_hw), 1, k_shape, tuple(contract), free, ())


def _walk(jaxpr: jcore.Jaxpr, origin: Sequence[_Path | None], ops: list[_Op], first_use: dict[_Path, int]) -> None:
  """Finds conv/dense ops whose weight operand derives from a parameter; records the first use of every parameter.

  Each value carries the path of the parameter it was read from (through casts, reshapes and transposes) or
  ``None``; call-like equations (``pjit``, ``custom_jvp``, ...) are inlined by the shared walker, and the bodies of
  other equations with sub-jaxprs (``scan``, ``while``) are entered with the operands' paths when their inputs match
  the operands one-to-one (each such body's ops are counted once).
  """

  def on_eqn(eqn: jcore.JaxprEqn, in_paths: list[_Path | None]) -> None:
    for pth in in_paths:
      if pth is not None and pth not in first_use:
        first_use[pth] = len(first_use)

  def rule(eqn: jcore.JaxprEqn, in_paths: list[_Path | None]) -> list[_Path | None]:
    name = eqn.primitive.name
    out: list[_Path | None] = [None] * len(eqn.outvars)
    if name == "conv_general_dilated" and in_paths[1] is not None:
      ops.append(_conv_op(eqn, in_paths[1]))
    elif name == "dot_general" and (in_paths[0] is not None or in_paths[1] is not None):
      w = 1 if in_paths[1] is not None else 0
      ops.append(_dot_op(eqn, in_paths[w], w))
    elif name in _PASS_THROUGH and in_paths and in_paths[0] is not None:
      out[0] = in_paths[0]
    for sub in _jaxpr_walk.sub_jaxprs(eqn):
      if len(sub.invars) == len(eqn.invars):
        _walk(sub, in_paths, ops, first_use)
    return out

  _jaxpr_walk.interpret(jaxpr, [None] * len(jaxpr.constvars), list(origin), rule, default=lambda v: None,
                        on_eqn=on_eqn)


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(key)


def _batch_one(arg: Any) -> Any:
  """An abstract copy of an example input with its leading (batch) axis set to 1."""
  def one(leaf: Any) -> Any:
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      return leaf
    return jax.ShapeDtypeStruct((1, *shape[1:]) if shape else (), dtype)
  return jax.tree_util.tree_map(one, arg)


@dataclasses.dataclass(frozen=True)
class _Trace:
  ops: tuple[_Op, ...]
  first_use: Mapping[_Path, int]
  shapes: Mapping[_Path, tuple[int, ...]]
  is_param: Mapping[_Path, bool]


def _trace(model: nnx.Module, example_args: tuple[Any, ...], eval_mode: bool) -> _Trace:
  """Traces ``model(*example_args)`` at batch 1 on abstract leaves (nothing is computed or allocated)."""
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model must be an nnx.Module, got {type(model).__name__}")
  if not example_args:
    raise ValueError("example_args must hold the model's inputs (e.g. jnp.zeros((1, 32, 32, 3))); got none")
  graphdef, state = nnx.split(model)
  if eval_mode:
    copy = nnx.merge(graphdef, state)  # new module objects: the caller's model keeps its mode
    copy.eval()
    graphdef, state = nnx.split(copy)
  keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
  paths = [tuple(_key_str(k) for k in kp if not isinstance(k, jax.tree_util.GetAttrKey)) for kp, _ in keyed]
  leaves = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for _, leaf in keyed]
  is_param = {tuple(str(k) for k in pth): issubclass(type(var), nnx.Param) for pth, var in nnx.to_flat_state(state)}

  def forward(leaves: list[Any], *args: Any) -> Any:
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))(*args)

  closed = jax.make_jaxpr(forward)(leaves, *[_batch_one(a) for a in example_args])
  origin: list[_Path | None] = [*paths, *[None] * (len(closed.jaxpr.invars) - len(paths))]
  ops: list[_Op] = []
  first_use: dict[_Path, int] = {}
  _walk(closed.jaxpr, origin, ops, first_use)
  if not ops:
    raise ValueError(f"model {type(model).__name__} has no convolution or dense layer reading a parameter "
                     "(no conv_general_dilated or dot_general with a parameter operand in its traced forward pass); "
                     "expected a CNN whose layers read their kernels from its nnx.Param state")
  shapes = {pth: tuple(leaf.shape) for pth, leaf in zip(paths, leaves)}
  return _Trace(tuple(ops), first_use, shapes, {p: is_param.get(p, False) for p in paths})


# ------------------------------------------------------------------------------------------------------------------
# Counting.


def _module_rows(tr: _Trace, shapes: Mapping[_Path, tuple[int, ...]]) -> tuple[dict[_Path, list[_Path]],
                                                                               dict[_Path, int]]:
  by_module: dict[_Path, list[_Path]] = {}
  for pth in tr.shapes:
    by_module.setdefault(pth[:-1], []).append(pth)
  params_of = {mod: sum(math.prod(shapes[q]) for q in leaves if tr.is_param[q]) for mod, leaves in by_module.items()}
  return by_module, params_of


def _new_groups(op: _Op, shape: tuple[int, ...]) -> int:
  """Feature groups of a conv at new widths: a depthwise-like conv (groups > 1, the kernel's per-group input
  unchanged) keeps its channels per group, so the group count follows the output channels; others keep theirs."""
  if op.kind != "conv" or op.groups == 1:
    return op.groups
  out_old, out_new = op.kernel_shape[op.out_axes[0]], shape[op.out_axes[0]]
  if out_new != out_old and (out_new * op.groups) % out_old == 0:
    return out_new * op.groups // out_old
  return op.groups


def _count(tr: _Trace, shapes: Mapping[_Path, tuple[int, ...]]) -> Cost:
  by_module, params_of = _module_rows(tr, shapes)
  rows: list[tuple[int, LayerCost]] = []
  seen: set[_Path] = set()
  total_macs = 0
  for op in tr.ops:
    mod = op.kernel_path[:-1]
    seen.add(mod)
    ks = shapes[op.kernel_path]
    macs = op.positions * math.prod(ks)
    total_macs += macs
    in_ch = math.prod(ks[a] for a in op.in_axes)
    out_ch = math.prod(ks[a] for a in op.out_axes)
    if op.kind == "conv":
      groups = _new_groups(op, ks)
      row = LayerCost(path_str(mod), "dwconv" if groups > 1 else "conv", in_ch * groups, out_ch,
                      tuple(ks[a] for a in op.spatial_axes), op.out_hw, macs, params_of.get(mod, 0))
    else:
      row = LayerCost(path_str(mod), "fc", in_ch, out_ch, None, op.out_hw, macs, params_of.get(mod, 0))
    rows.append((tr.first_use.get(op.kernel_path, 1 << 30), row))
  for mod, leaves in by_module.items():
    if mod in seen or params_of[mod] == 0:
      continue
    names = {q[-1] for q in leaves}
    kind = "bn" if {"scale", "mean", "var"} <= names or {"bias", "mean", "var"} <= names else "other"
    ch = shapes[leaves[0]][0] if shapes[leaves[0]] else 1
    order = min(tr.first_use.get(q, 1 << 30) for q in leaves)
    rows.append((order, LayerCost(path_str(mod), kind, ch, ch, None, None, 0, params_of[mod])))
  rows.sort(key=lambda r: r[0])
  params = sum(math.prod(s) for pth, s in shapes.items() if tr.is_param[pth])
  return Cost(total_macs, params, tuple(r for _, r in rows))


# An axis at new widths: dense size - sum((group size - width) * spatial) over the groups indexing it.
_Terms = tuple[tuple[str, int], ...]


def _axis_terms(tr: _Trace, groups: Sequence[ChannelGroup]) -> dict[tuple[_Path, int], _Terms]:
  terms: dict[tuple[_Path, int], list[tuple[str, int]]] = {}
  for g in groups:
    if not isinstance(g, ChannelGroup):
      raise ValueError(f"groups must hold ChannelGroup entries, got {type(g).__name__}")
    for m in g.members:
      pth = tuple(str(k) for k in m.path)
      if pth not in tr.shapes:
        raise ValueError(f"channel group {g.name!r} names {path_str(pth)!r}, which is not a leaf of the model's state; "
                         "expected groups of this model (hsic_jax.derive_model_groups(model, *example_args))")
      shape = tr.shapes[pth]
      if not -len(shape) <= m.axis < len(shape):
        raise ValueError(f"channel group {g.name!r}: {path_str(pth)!r} has shape {shape}, no axis {m.axis}")
      terms.setdefault((pth, m.axis % len(shape)), []).append((g.name, m.spatial))
  for (pth, axis), ts in terms.items():
    covered = sum(next(g.size for g in groups if g.name == name) * sp for name, sp in ts)
    if covered > tr.shapes[pth][axis]:
      raise ValueError(f"channel groups cover {covered} positions of axis {axis} of {path_str(pth)!r}, which has "
                       f"{tr.shapes[pth][axis]}; expected groups of this model")
  return {k: tuple(v) for k, v in terms.items()}


def _check_widths(widths: Any, sizes: Mapping[str, int]) -> dict[str, int]:
  if not isinstance(widths, Mapping):
    raise ValueError(f"widths must be a mapping from channel-group name to width, e.g. {{'conv1': 8}}, got "
                     f"{type(widths).__name__}")
  out: dict[str, int] = {}
  for name, w in widths.items():
    if name not in sizes:
      known = sorted(sizes)
      shown = f"{known[:12]}" + (f" and {len(known) - 12} more" if len(known) > 12 else "")
      raise ValueError(f"widths names unknown channel group {name!r}; expected one of {shown}")
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
      raise ValueError(f"widths[{name!r}] must be an integer, got {w!r}")
    iw = int(w)
    if not 1 <= iw <= sizes[name]:
      raise ValueError(f"widths[{name!r}] = {iw}; expected an integer in [1, {sizes[name]}] (the group's dense "
                       "width)")
    out[name] = iw
  return out


def cost_fn(model: nnx.Module, *example_args: Any, groups: Sequence[ChannelGroup] | None = None,
            eval_mode: bool = True) -> Callable[[Mapping[str, int] | None], Cost]:
  """Traces ``model`` once and returns ``cost(widths) -> Cost`` for any width vector, without tracing again.

  ``cost(widths)`` counts the model with each parameter axis shrunk as the channel groups say: an axis indexed by
  groups ``g_1 .. g_k`` (with ``spatial`` positions per channel, see :class:`hsic_jax.ChannelSlice`) has
  ``n - sum_i (g_i.size - widths[g_i.name]) * spatial_i`` entries, ``n`` its dense size; each layer's MACs are its
  output positions (fixed) times the product of its kernel's new shape. Groups left out of ``widths`` keep their
  dense size. Prunability is not checked: a cost can be asked of any width.

  Args:
    model: the NNX model (concrete, or abstract from ``nnx.eval_shape``).
    *example_args: the model's inputs (arrays or ``jax.ShapeDtypeStruct``); counted at batch 1, groups derived at
      the batch given (use 2 or more then).
    groups: the channel groups the widths name; default ``derive_model_groups(model, *example_args)``.
    eval_mode: trace the inference pass (BatchNorm on running statistics, dropout off), on a copy.

  Returns:
    ``cost(widths: Mapping[str, int] | None = None) -> Cost``; ``None`` or ``{}`` is the dense model.

  Raises:
    ValueError: ``model`` is not an nnx.Module or has no conv/dense layer reading a parameter, no example input, or
      groups that do not belong to the model; the returned function raises for an unknown group name or a width
      that is not an integer in ``[1, group size]``.
  """
  tr = _trace(model, example_args, eval_mode)
  if groups is None:
    groups = derive_model_groups(model, *example_args, eval_mode=eval_mode)
  groups = list(groups)
  sizes = {g.name: int(g.size) for g in groups}
  terms = _axis_terms(tr, groups)
  dense = _count(tr, tr.shapes)

  def cost(widths: Mapping[str, int] | None = None) -> Cost:
    ws = _check_widths({} if widths is None else widths, sizes)
    cut = {name: sizes[name] - w for name, w in ws.items() if w != sizes[name]}
    if not cut:
      return dense
    shapes = dict(tr.shapes)
    for (pth, axis), ts in terms.items():
      drop = sum(cut.get(name, 0) * sp for name, sp in ts)
      if drop:
        shape = list(shapes[pth])
        shape[axis] -= drop
        shapes[pth] = tuple(shape)
    return _count(tr, shapes)

  return cost


def count_macs(model: nnx.Module, *example_args: Any, widths: Mapping[str, int] | None = None,
               groups: Sequence[ChannelGroup] | None = None, eval_mode: bool = True) -> Cost:
  """MACs and params of ``model(*example_args)`` at batch 1, dense or with the channel groups at ``widths``.

  ``MACs = sum over conv/dense layers of P * prod(kernel.shape)`` (``P`` the layer's output positions) and
  ``params`` the elements of every ``nnx.Param`` (see the module docstring). To count many width vectors, use
  :func:`cost_fn`, which traces once.

  Args:
    model: the NNX model (concrete, or abstract from ``nnx.eval_shape``).
    *example_args: the model's inputs; only shapes and dtypes matter, and the leading (batch) axis is counted as 1.
    widths: channel-group name -> new width (1 <= width <= the group's size); ``None`` for the model as it is.
    groups: the groups ``widths`` names; default ``derive_model_groups(model, *example_args)`` (derived only when
      ``widths`` is given).
    eval_mode: count the inference pass, on a copy of the model.

  Returns:
    A :class:`Cost` with one row per layer in forward order.

  Raises:
    ValueError: as :func:`cost_fn`.
  """
  if not widths:
    if widths is not None and not isinstance(widths, Mapping):
      raise ValueError(f"widths must be a mapping from channel-group name to width, got {type(widths).__name__}")
    tr = _trace(model, example_args, eval_mode)
    return _count(tr, tr.shapes)
  return cost_fn(model, *example_args, groups=groups, eval_mode=eval_mode)(widths)
