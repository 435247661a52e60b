"""The registry of channel rules, one per primitive, and the built-in rules: how channel sets flow through convs,
dots, elementwise ops, reshapes, concatenations, pads, slices and reductions (stated in
:mod:`hsic_jax.jaxpr_groups`)."""

from __future__ import annotations

from typing import Any

import jax.extend.core as jcore
import numpy as np

from hsic_jax._jaxpr_context import SPATIAL, AbstractValue, Act, ChannelRule, ChannelRuleContext, Layout, Par, Seg
from hsic_jax._jaxpr_context import Source, var_shape


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


RULES: dict[str, ChannelRule] = {}


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
  if name in RULES and not replace:
    raise ValueError(f"primitive {name!r} already has a channel rule; pass replace=True to replace it")
  RULES[name] = rule


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
  if name not in RULES:
    raise ValueError(f"primitive {name!r} has no channel rule to unregister")
  del RULES[name]


def channel_rules() -> dict[str, ChannelRule]:
  """A copy of the registry ``{primitive name: rule}``.

  >>> channel_rules()["add"] is channel_rules()["mul"]
  True
  """
  return dict(RULES)


def _in_shapes(eqn: jcore.JaxprEqn) -> list[tuple[int, ...]]:
  return [var_shape(v) for v in eqn.invars]


def _out_shape(eqn: jcore.JaxprEqn) -> tuple[int, ...]:
  return var_shape(eqn.outvars[0])


def _rule_elementwise(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  return ctx.elementwise(eqn, ins)


def _rule_pass_through(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  return ctx.pass_through(eqn, ins)


_CONST_CONTRACTION = ("contracted with a constant (e.g. a channel mean written as x @ (ones / c)), which pruning "
                      "would not cut")


_ACT_CONTRACTION = ("contracted with another activation (e.g. einsum('...c,...c', a, b)): no parameter consumes "
                    "these channels, so removing them is not zeroing a consumer slice")


def _rule_conv(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shapes, out_shape = _in_shapes(eqn), _out_shape(eqn)
  lhs, rhs = ins
  if not isinstance(lhs, Act):
    return ctx.opaque(eqn, ins)
  dn = eqn.params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  groups = eqn.params["feature_group_count"]
  if not isinstance(rhs, Par) or eqn.params["batch_group_count"] != 1:
    return ctx.opaque_as("conv_general_dilated (with an activation as kernel or batch groups)", ins, [out_shape])
  feat = lhs.layouts[lhs_spec[1]]
  c_in = feat.size
  rhs_in, rhs_out = rhs.sources[rhs_spec[1]], rhs.sources[rhs_spec[0]]
  n_out = out_shape[out_spec[1]]
  for d in lhs_spec[2:]:
    ctx.flag_layout(lhs.layouts[d], SPATIAL)
  layouts: list[Layout | None] = [None] * len(out_shape)
  layouts[out_spec[0]] = lhs.layouts[lhs_spec[0]]
  for d in out_spec[2:]:
    layouts[d] = ctx.fresh(out_shape[d], SPATIAL)
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
  return [Act(tuple(lay for lay in layouts if lay is not None))]


def _rule_dot(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shapes = _in_shapes(eqn)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = ins
  lfree = [i for i in range(len(in_shapes[0])) if i not in lc and i not in lb]
  rfree = [i for i in range(len(in_shapes[1])) if i not in rc and i not in rb]
  if isinstance(lhs, Par) and isinstance(rhs, Par):
    # A product of parameters (e.g. a low-rank kernel): free axes keep their sources, contracted ones vanish.
    srcs = [lhs.sources[i] | rhs.sources[j] for i, j in zip(lb, rb)]
    return [Par(tuple(srcs + [lhs.sources[i] for i in lfree] + [rhs.sources[j] for j in rfree]))]

  def axis_layout(info: AbstractValue, axis: int, size: int) -> Layout:
    if isinstance(info, Act):
      return info.layouts[axis]
    layout = ctx.fresh(size)
    ctx.attach(layout, info.sources[axis], "out")
    return layout

  for i, j in zip(lc, rc):
    if isinstance(lhs, Act) and isinstance(rhs, Act):
      ctx.flag_layout(lhs.layouts[i], _ACT_CONTRACTION)
      ctx.flag_layout(rhs.layouts[j], _ACT_CONTRACTION)
      ctx.unify(lhs.layouts[i], rhs.layouts[j])
      continue
    act, par, ai, pj = (lhs, rhs, i, j) if isinstance(lhs, Act) else (rhs, lhs, j, i)
    assert isinstance(act, Act) and isinstance(par, Par)
    if not par.sources[pj]:
      ctx.flag_layout(act.layouts[ai], _CONST_CONTRACTION)
    ctx.attach(act.layouts[ai], par.sources[pj], "in")
  layouts = []
  for i, j in zip(lb, rb):
    if isinstance(lhs, Act) and isinstance(rhs, Act):
      layouts.append(ctx.unify(lhs.layouts[i], rhs.layouts[j]))
    else:
      act, par, ai, pj = (lhs, rhs, i, j) if isinstance(lhs, Act) else (rhs, lhs, j, i)
      assert isinstance(act, Act) and isinstance(par, Par)
      ctx.attach(act.layouts[ai], par.sources[pj], "out")
      layouts.append(act.layouts[ai])
  layouts += [axis_layout(lhs, i, in_shapes[0][i]) for i in lfree]
  layouts += [axis_layout(rhs, j, in_shapes[1][j]) for j in rfree]
  return [Act(tuple(layouts))]


def _rule_reshape(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
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
  if isinstance(info, Par):
    srcs: list[frozenset[Source]] = [frozenset()] * len(out_shape)
    for bi, bo in blocks:
      if len(bi) == 1 and len(bo) == 1:
        srcs[bo[0]] = info.sources[bi[0]]
      else:
        for a in bi:
          ctx.lose(info.sources[a], "reshaped across axes")
    return [Par(tuple(srcs))]
  layouts: list[Layout | None] = [None] * len(out_shape)
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
      layouts[bo[0]] = Layout(factor * last.repeat, last.segs)
    elif len(bi) == 1:
      src = info.layouts[bi[0]]
      last = out_shape[bo[-1]]
      if last % src.width == 0 and src.repeat % (last // src.width) == 0:
        layouts[bo[-1]] = Layout(last // src.width, src.segs)
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
  return [Act(tuple(lay if lay is not None else ctx.fresh(out_shape[d]) for d, lay in enumerate(layouts)))]


def _rule_transpose(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  return [ctx.remap(ins[0], _in_shapes(eqn)[0], _out_shape(eqn), list(eqn.params["permutation"]), [], None)]


def _rule_broadcast_in_dim(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn,
                           ins: list[AbstractValue]) -> list[AbstractValue]:
  out_shape = _out_shape(eqn)
  mapping: list[int | None] = [None] * len(out_shape)
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    mapping[d] = i
  return [ctx.remap(ins[0], _in_shapes(eqn)[0], out_shape, mapping, [], None)]


def _rule_squeeze(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shape = _in_shapes(eqn)[0]
  dims = {d % len(in_shape) for d in eqn.params["dimensions"]}
  keep = [i for i in range(len(in_shape)) if i not in dims]
  return [ctx.remap(ins[0], in_shape, _out_shape(eqn), keep, sorted(dims), None)]


def _rule_reduce(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shape = _in_shapes(eqn)[0]
  axes = sorted(eqn.params["axes"])
  keep = [i for i in range(len(in_shape)) if i not in axes]
  why = f"reduced over by {eqn.primitive.name!r} (e.g. a channel mean or softmax)"
  return [ctx.remap(ins[0], in_shape, _out_shape(eqn), keep, axes, why)]


def _rule_reduce_window(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  p = eqn.params
  in_shapes = _in_shapes(eqn)
  out_shapes = [var_shape(v) for v in eqn.outvars]
  rank = len(in_shapes[0])
  ones = (1,) * rank
  window, strides = p["window_dimensions"], p["window_strides"]
  padding = p.get("padding", ((0, 0),) * rank)
  base, wdil = p.get("base_dilation", ones), p.get("window_dilation", ones)
  changed = {d for d in range(rank) if (window[d], strides[d], tuple(padding[d]), base[d], wdil[d])
             != (1, 1, (0, 0), 1, 1)}
  return [ctx.per_axis(info, in_shapes[0], shape, changed, "pooled over")
          for info, shape in zip(ins[:len(out_shapes)], out_shapes)]


def _rule_cumulative(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  return [ctx.per_axis(ins[0], _in_shapes(eqn)[0], _out_shape(eqn), {eqn.params["axis"]},
                       f"{eqn.primitive.name} along it")]


def _rule_rev(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  return [ctx.per_axis(ins[0], _in_shapes(eqn)[0], _out_shape(eqn), set(eqn.params["dimensions"]), "reversed")]


def _rule_dynamic_slice(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shape, out_shape = _in_shapes(eqn)[0], _out_shape(eqn)
  changed = {d for d in range(len(in_shape)) if in_shape[d] != out_shape[d]}
  return [ctx.per_axis(ins[0], in_shape, out_shape, changed, "dynamically sliced")]


def _rule_concatenate(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shapes, out = _in_shapes(eqn), _out_shape(eqn)
  dim = eqn.params["dimension"]
  if not any(isinstance(i, Act) for i in ins):
    for i in ins:
      ctx.flag_info(Par((i.sources[dim],)), "concatenated with other arrays")
    return [Par(tuple(frozenset() if d == dim else frozenset().union(*[i.sources[d] for i in ins])
                       for d in range(len(out))))]
  layouts = []
  for d in range(len(out)):
    if d == dim:
      segs: list[Seg] = []
      for info, s in zip(ins, in_shapes):
        if isinstance(info, Act):
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
      layouts.append(Layout(1, tuple(segs)))
    else:
      acts = [i.layouts[d] for i in ins if isinstance(i, Act)]
      layout = ctx.unify_all(acts)
      for i in ins:
        if isinstance(i, Par) and i.sources[d]:
          ctx.attach(layout, i.sources[d], "out")
      layouts.append(layout)
  return [Act(tuple(layouts))]


def _rule_pad(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  info, in_shape, out_shape = ins[0], _in_shapes(eqn)[0], _out_shape(eqn)
  config = eqn.params["padding_config"]
  if isinstance(info, Par):
    changed = {d for d, c in enumerate(config) if tuple(c) != (0, 0, 0)}
    return [ctx.per_axis(info, in_shape, out_shape, changed, "padded")]
  if len(ins) > 1 and isinstance(ins[1], Act):
    ctx.flag_info(info, "padded with a value computed from the input")
    return [Act(tuple(ctx.fresh(s, "padded with a value computed from the input") for s in out_shape))]
  layouts = []
  for d, (lo, hi, interior) in enumerate(config):
    lay = info.layouts[d]
    if (lo, hi, interior) == (0, 0, 0):
      layouts.append(lay)
    elif interior == 0 and lo >= 0 and hi >= 0 and lay.repeat == 1:
      segs = ((ctx.constant(lo),) if lo else ()) + lay.segs + ((ctx.constant(hi),) if hi else ())
      layouts.append(Layout(1, segs))
    else:
      ctx.flag_layout(lay, "padded with interior or negative padding")
      layouts.append(ctx.fresh(out_shape[d], "padded with interior or negative padding"))
  return [Act(tuple(layouts))]


def _rule_slice(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shape, out_shape = _in_shapes(eqn)[0], _out_shape(eqn)
  strides = eqn.params.get("strides") or (1,) * len(in_shape)
  return [ctx.slice(ins[0], in_shape, out_shape, eqn.params["start_indices"], strides)]


def _rule_split(ctx: ChannelRuleContext, eqn: jcore.JaxprEqn, ins: list[AbstractValue]) -> list[AbstractValue]:
  in_shape = _in_shapes(eqn)[0]
  axis, outs, start = eqn.params["axis"], [], 0
  for v in eqn.outvars:
    shape = var_shape(v)
    starts = [0] * len(shape)
    starts[axis] = start
    outs.append(ctx.slice(ins[0], in_shape, shape, starts, (1,) * len(shape)))
    start += shape[axis]
  return outs


RULES.update({name: _rule_elementwise for name in _ELEMENTWISE})
RULES.update({name: _rule_reduce for name in _REDUCE})
RULES.update({name: _rule_reduce_window for name in _REDUCE_WINDOW})
RULES.update({name: _rule_cumulative for name in _CUMULATIVE})
RULES.update({
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
