"""Multiply-accumulates (MACs) and parameter counts of conv and fully-connected layers, for any widths.

Counted, per layer and in total, at batch 1 and the model's input size (32x32 CIFAR, 224x224 ImageNet):

- conv: ``MACs = H_out * W_out * C_out * (C_in / groups) * k_h * k_w`` = output positions x ``prod(kernel.shape)``;
- fully connected: ``MACs = C_in * C_out``;
- params: every ``nnx.Param`` (kernels, biases, BatchNorm scale and bias); BatchNorm running statistics are not
  parameters. BN, ReLU, pooling and additions cost no MACs (thop-style "FLOPs" add BN terms; compare ratios).

How: the forward pass is traced with :func:`jax.make_jaxpr` on an abstract model (``nnx.eval_shape``: nothing is
allocated); every ``conv_general_dilated`` and every ``dot_general`` with a parameter operand is one layer, named by
its kernel's path in the state dict. For a registry model the trace is done once (dense widths) and cached: each
layer's output resolution does not depend on the widths, and each parameter axis is a linear function of the width
list, read off the model's channel groups. :func:`count` then costs about a millisecond, fast enough for a lambda
search; ``count(..., exact=True)`` re-traces the model built with the given widths.

>>> count("resnet56").macs
125485696
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import models as registry
from hsic_jax import _jaxpr_walk
from models._common import check_num_classes

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerCount:
  """One layer's row in the count.

  Attributes:
    name: the layer's module path, e.g. ``"stage1/block0/conv1"``.
    kind: ``"conv"``, ``"dwconv"`` (grouped/depthwise conv), ``"fc"``, ``"bn"`` or ``"other"``.
    in_ch: input channels (conv: ``C_in``, the kernel's input axis times the groups; fc: input features).
    out_ch: output channels or features.
    kernel: ``(k_h, k_w)`` for a conv, else ``None``.
    out_hw: output resolution ``(H_out, W_out)`` of a conv, ``(1, 1)`` for fc (on pooled features), ``None`` for
      others.
    macs: multiply-accumulates of one forward pass at batch 1.
    params: number of ``nnx.Param`` entries owned by the layer (kernel + bias, or BN scale + bias).
  """

  name: str
  kind: str
  in_ch: int
  out_ch: int
  kernel: tuple[int, int] | None
  out_hw: tuple[int, int] | None
  macs: int
  params: int


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


# ------------------------------------------------------------------------------------------------------------------
# Tracing.


@dataclasses.dataclass(frozen=True)
class _Op:
  """A conv or dense op found in the jaxpr."""

  kernel_path: Path
  kind: str  # "conv" or "fc"
  macs: int
  out_hw: tuple[int, int]
  groups: int
  kernel_shape: tuple[int, ...]


# Ops that keep a parameter's identity (the kernel may be reshaped/cast on its way to the conv).
_PASS_THROUGH = {"convert_element_type", "reshape", "transpose", "copy", "squeeze", "expand_dims", "copy_p"}


def _walk(jaxpr: Any, origin: Sequence[Path | None], ops: list[_Op], first_use: dict[Path, int]) -> None:
  """Finds conv/dense ops whose weight operand derives from a parameter; records first use of every parameter.

  Each value carries the path of the parameter it was read from (through casts, reshapes and transposes) or
  ``None``; call-like equations (``pjit``, ``custom_jvp``, ...) are inlined by the shared walker, and the bodies of
  other equations with sub-jaxprs (``scan``, ``while``) are entered with the operands' paths when their inputs match
  the operands one-to-one (each such body's ops are counted once).
  """

  def on_eqn(eqn: Any, in_paths: list[Path | None]) -> None:
    for pth in in_paths:
      if pth is not None and pth not in first_use:
        first_use[pth] = len(first_use)

  def rule(eqn: Any, in_paths: list[Path | None]) -> list[Path | None]:
    name = eqn.primitive.name
    out: list[Path | None] = [None] * len(eqn.outvars)
    if name == "conv_general_dilated" and in_paths[1] is not None:
      # MACs = N * H_out * W_out * (C_out * C_in/groups * k_h * k_w) = N * positions * prod(kernel.shape).
      dn = eqn.params["dimension_numbers"]
      out_shape = eqn.outvars[0].aval.shape
      rhs_shape = eqn.invars[1].aval.shape
      positions = math.prod(out_shape) // out_shape[dn.out_spec[1]]
      ops.append(_Op(in_paths[1], "conv", positions * math.prod(rhs_shape),
                     tuple(out_shape[d] for d in dn.out_spec[2:]), eqn.params["feature_group_count"],
                     tuple(rhs_shape)))
    elif name == "dot_general" and (in_paths[0] is not None or in_paths[1] is not None):
      (lhs_c, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      contracted = math.prod(lhs_shape[d] for d in lhs_c)
      w = 1 if in_paths[1] is not None else 0
      out_shape = eqn.outvars[0].aval.shape
      out_hw = tuple(out_shape[1:3]) if len(out_shape) == 4 else (1, 1)  # a Dense applied per pixel
      ops.append(_Op(in_paths[w], "fc", math.prod(out_shape) * contracted, out_hw, 1,
                     tuple(eqn.invars[w].aval.shape)))
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


def _leaves(model: nnx.Module) -> tuple[Any, Any, list[Path], list[Any], dict[Path, str]]:
  graphdef, state = nnx.split(model)
  keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
  paths = [tuple(_key_str(k) for k in kp if not isinstance(k, jax.tree_util.GetAttrKey)) for kp, _ in keyed]
  leaves = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for _, leaf in keyed]
  kinds = {tuple(str(k) for k in pth): type(var).__name__ for pth, var in nnx.to_flat_state(state)}
  return graphdef, treedef, paths, leaves, kinds


def _trace(model: nnx.Module, input_hw: tuple[int, int]) -> tuple[list[_Op], dict[Path, int], dict[Path, tuple],
                                                                    dict[Path, str]]:
  """Traces ``model``'s eval forward at batch 1; returns the ops, parameter first-use order, shapes and kinds."""
  model.eval()
  graphdef, treedef, paths, leaves, kinds = _leaves(model)

  def forward(leaves: list[jax.Array], x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))(x)

  x = jax.ShapeDtypeStruct((1, *input_hw, 3), jnp.float32)
  closed = jax.make_jaxpr(forward)(leaves, x)
  origin: list[Path | None] = [*paths, *[None] * (len(closed.jaxpr.invars) - len(paths))]
  ops: list[_Op] = []
  first_use: dict[Path, int] = {}
  _walk(closed.jaxpr, origin, ops, first_use)
  shapes = {pth: tuple(leaf.shape) for pth, leaf in zip(paths, leaves)}
  return ops, first_use, shapes, kinds


def _rows(ops: list[_Op], first_use: dict[Path, int], shapes: dict[Path, tuple], kinds: dict[Path, str]
          ) -> list[LayerCount]:
  """Per-layer rows (conv/fc ops, plus one row per other module owning parameters), in forward order."""
  by_module: dict[Path, list[Path]] = {}
  for pth, kind in kinds.items():
    by_module.setdefault(pth[:-1], []).append(pth)
  params_of = {mod: sum(math.prod(shapes[q]) for q in leaves if kinds[q] == "Param")
               for mod, leaves in by_module.items()}
  rows: list[tuple[int, LayerCount]] = []
  seen: set[Path] = set()
  for op in ops:
    mod = op.kernel_path[:-1]
    seen.add(mod)
    ks = op.kernel_shape
    if op.kind == "conv":
      kind = "dwconv" if op.groups > 1 else "conv"
      row = LayerCount("/".join(mod), kind, ks[2] * op.groups, ks[3], (ks[0], ks[1]), op.out_hw, op.macs,
                       params_of.get(mod, 0))
    else:
      row = LayerCount("/".join(mod), "fc", ks[0], ks[1], None, op.out_hw, op.macs, params_of.get(mod, 0))
    rows.append((first_use.get(op.kernel_path, 1 << 30), row))
  for mod, leaves in by_module.items():
    if mod in seen or params_of[mod] == 0:
      continue
    names = {q[-1] for q in leaves}
    kind = "bn" if {"scale", "mean", "var"} <= names or {"bias", "mean", "var"} <= names else "other"
    ch = shapes[leaves[0]][0] if shapes[leaves[0]] else 1
    order = min(first_use.get(q, 1 << 30) for q in leaves)
    rows.append((order, LayerCount("/".join(mod), kind, ch, ch, None, None, 0, params_of[mod])))
  rows.sort(key=lambda r: r[0])
  return [r for _, r in rows]


def count_model(model: nnx.Module, input_hw: tuple[int, int], *, name: str = "") -> Count:
  """Counts MACs and params of any NHWC ``model`` (concrete or abstract) by tracing it at ``input_hw``.

  Note: switches ``model`` to eval mode (BatchNorm uses running statistics; this does not change the count).
  """
  ops, first_use, shapes, kinds = _trace(model, input_hw)
  layers = _rows(ops, first_use, shapes, kinds)
  params = sum(math.prod(s) for pth, s in shapes.items() if kinds[pth] == "Param")
  widths = tuple(getattr(model, "widths", ()))
  return Count(name, widths, tuple(layers), sum(op.macs for op in ops), params, getattr(model, "num_classes", None),
               tuple(input_hw))


# ------------------------------------------------------------------------------------------------------------------
# Cached structure per registry model: every parameter axis as a linear function of the width list.

# An axis size: constant + sum(widths[i] * mult).
_Axis = tuple[int, tuple[tuple[int, int], ...]]


@dataclasses.dataclass(frozen=True)
class _Structure:
  axes: dict[Path, tuple[_Axis, ...]]   # every state leaf (Params and BatchStats)
  kinds: dict[Path, str]
  ops: tuple[_Op, ...]
  first_use: dict[Path, int]
  num_classes: int


@functools.lru_cache(maxsize=None)
def _structure(name: str, num_classes: int | None, input_hw: tuple[int, int]) -> _Structure:
  model = nnx.eval_shape(lambda: registry.get_model(name, num_classes=num_classes, rngs=nnx.Rngs(0)))
  ops, first_use, shapes, kinds = _trace(model, input_hw)
  widths = model.widths
  covered: dict[tuple[Path, int], tuple[int, list[tuple[int, int]]]] = {}
  for g in model.channel_groups():
    for m in g.members:
      pth = tuple(str(k) for k in m.path)
      if pth not in shapes:
        raise ValueError(f"{name}: channel group {g.name!r} names {pth}, which is not a parameter path")
      axis = m.axis % len(shapes[pth])
      const, terms = covered.get((pth, axis), (0, []))
      if g.width_indices:
        terms = terms + [(g.width_indices[0], m.spatial)]
      else:
        const += g.size * m.spatial
      covered[(pth, axis)] = (const, terms)
  axes: dict[Path, tuple[_Axis, ...]] = {}
  for pth, shape in shapes.items():
    ax = []
    for a, size in enumerate(shape):
      const, terms = covered.get((pth, a), (0, []))
      default = const + sum(widths[i] * mult for i, mult in terms)
      if default > size:
        raise ValueError(f"{name}: channel groups cover {default} channels of axis {a} of {pth}, which has {size}")
      ax.append((const + size - default, tuple(terms)))
    axes[pth] = tuple(ax)
  return _Structure(axes, kinds, tuple(ops), first_use, model.num_classes)


def _groups(op: _Op, kernel_shape: tuple[int, ...]) -> int:
  """A depthwise conv (one group per output channel) keeps that property at any width; other group counts are fixed."""
  if op.kind == "conv" and op.groups > 1 and op.groups == op.kernel_shape[-1]:
    return kernel_shape[-1]
  return op.groups


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
  st = _structure(name, None if num_classes is None else check_num_classes(num_classes), hw)
  shapes = {pth: tuple(const + sum(ws[i] * m for i, m in terms) for const, terms in ax)
            for pth, ax in st.axes.items()}
  ops = [dataclasses.replace(op, kernel_shape=shapes[op.kernel_path],
                             macs=op.out_hw[0] * op.out_hw[1] * math.prod(shapes[op.kernel_path]),
                             groups=_groups(op, shapes[op.kernel_path]))
         for op in st.ops]
  layers = _rows(ops, st.first_use, shapes, st.kinds)
  params = sum(math.prod(s) for pth, s in shapes.items() if st.kinds[pth] == "Param")
  return Count(name, tuple(ws), tuple(layers), sum(op.macs for op in ops), params, st.num_classes, hw)
