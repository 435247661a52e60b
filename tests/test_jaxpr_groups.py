"""Tests for hsic_jax.jaxpr_groups: channel groups derived from the jaxpr agree with hand-declared ones.

The oracles are the groups written by hand for the toy models in test_surgery.py and for every registry model,
plus hand-derived expectations for patterns that must not be pruned (grouped convs, channel shuffles, LayerNorm
over channels, channels-first flattens, zero-padded shortcuts, primitives the derivation does not know).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice
from hsic_jax.jaxpr_groups import GroupDerivationWarning, check_groups, derive_groups, derive_model_groups
from hsic_jax.surgery import mask, prune
from tests.test_surgery import (TOYS, ChainNet, ConcatNet, ResidualNet, _registry, abstract_model, assert_parity,
                                random_state, registry_input, registry_names)


def _x(hw: tuple[int, int] = (8, 8), channels: int = 3) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((2, *hw, channels), jnp.float32)


def _derive(model: nnx.Module, hw: tuple[int, int] = (8, 8), *, expect_warning: bool = False) -> list[ChannelGroup]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    groups = derive_model_groups(model, _x(hw))
  derivation = [w for w in caught if issubclass(w.category, GroupDerivationWarning)]
  assert bool(derivation) == expect_warning, [str(w.message) for w in derivation]
  return groups


def _by_member(groups: list[ChannelGroup], path: tuple[Any, ...], axis: int) -> ChannelGroup:
  hits = [g for g in groups if any(m.path == path and m.axis == axis for m in g.members)]
  assert len(hits) == 1, (path, axis, [g.name for g in hits])
  return hits[0]


# ----------------------------------------------------------------------------------------------------------------
# Toy models: derived == declared.


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_groups_match_declared(name: str) -> None:
  cls, hw = TOYS[name]
  model = abstract_model(lambda: cls(rngs=nnx.Rngs(0)))
  derived = _derive(model, hw)
  assert check_groups(model.channel_groups(), derived) == []
  boundary = [g for g in derived if not g.prunable]
  assert [g.name for g in boundary] == ["input", "fc2" if name == "flatten" else "fc"]
  assert "network input" in boundary[0].note and "network output" in boundary[1].note
  assert len(derived) == len(model.channel_groups()) + 2


def test_toy_groups_hand_checked_members() -> None:
  sep = _derive(abstract_model(lambda: TOYS["separable"][0](rngs=nnx.Rngs(0))))
  g = _by_member(sep, ("dw", "kernel"), 3)
  assert g.name == "stem" and g.size == 6 and g.prunable
  assert ChannelSlice(("pw", "kernel"), 2, "in") in g.members
  assert not any(m.path == ("dw", "kernel") and m.axis == 2 for h in sep for m in h.members)  # the size-1 axis

  flat = _derive(abstract_model(lambda: TOYS["flatten"][0](rngs=nnx.Rngs(0))))
  assert ChannelSlice(("fc1", "kernel"), 0, "in", spatial=16) in _by_member(flat, ("conv", "kernel"), 3).members
  hidden = _by_member(flat, ("fc1", "kernel"), 1)
  assert {m.path for m in hidden.members} >= {("bn1d", "scale"), ("bn1d", "var"), ("fc1", "bias")}

  cat = _derive(abstract_model(lambda: ConcatNet(rngs=nnx.Rngs(0))))
  b2 = _by_member(cat, ("b2", "kernel"), 3)
  assert ChannelSlice(("cat_bn", "mean"), 0, "out", offset=4) in b2.members
  assert ChannelSlice(("mix", "kernel"), 2, "in", offset=4) in b2.members

  res = _derive(abstract_model(lambda: ResidualNet(rngs=nnx.Rngs(0))))
  stream = _by_member(res, ("proj", "kernel"), 3)
  assert stream.prunable and stream.name == "conv_b"
  assert {("conv_b", "kernel"), ("conv_d", "kernel"), ("bn_p", "bias"), ("fc", "kernel")} <= {
      m.path for m in stream.members}


def test_derived_groups_drive_surgery() -> None:
  """A user's model pruned with derived groups (no hand-written ones) matches the masked dense model."""
  def build(w: Any) -> nnx.Module:
    return ConcatNet(w, rngs=nnx.Rngs(0))

  model = abstract_model(lambda: build(None))
  derived = derive_model_groups(model, _x())
  # The derived groups know nothing about the width list: borrow width_indices from the declared twins.
  twins = {frozenset(g.members): g for g in model.channel_groups()}
  groups = [dataclasses.replace(g, width_indices=twins[frozenset(g.members)].width_indices)
            if frozenset(g.members) in twins else g for g in derived]
  assert_parity(build, (8, 8), seed=4, groups=groups)


class SENet(nnx.Module):
  """conv + GELU under jax.checkpoint, a squeeze-and-excitation gate, a custom_vjp activation: no hand groups."""

  def __init__(self, widths: Any = None, *, rngs: nnx.Rngs):
    self.widths = list(widths or (8, 3, 6))  # conv, SE bottleneck, conv2
    w = self.widths
    self.conv = nnx.Conv(3, w[0], (3, 3), rngs=rngs)
    self.down, self.up = nnx.Linear(w[0], w[1], rngs=rngs), nnx.Linear(w[1], w[0], rngs=rngs)
    self.conv2 = nnx.Conv(w[0], w[2], (1, 1), rngs=rngs)
    self.fc = nnx.Linear(w[2], 5, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.checkpoint(lambda h: jax.nn.gelu(self.conv(h)))(x)
    gate = jax.nn.sigmoid(self.up(jax.nn.silu(self.down(h.mean(axis=(1, 2))))))
    h = _leaky(self.conv2(h * gate[:, None, None, :]))
    return self.fc(h.mean(axis=(1, 2)))


@jax.custom_vjp
def _leaky(x: jax.Array) -> jax.Array:
  return jnp.maximum(x, 0.1 * x)


_leaky.defvjp(lambda x: (_leaky(x), x), lambda x, g: (jnp.where(x > 0, g, 0.1 * g),))


def test_user_model_pruned_from_derived_groups_only() -> None:
  """The whole flow for a user's model: derive groups, prune, and match the masked dense model."""
  model = abstract_model(lambda: SENet(rngs=nnx.Rngs(0)))
  derived = _derive(model)
  assert [(g.name, g.size, g.prunable) for g in derived] == [
      ("input", 3, False), ("conv", 8, True), ("down", 3, True), ("conv2", 6, True), ("fc", 5, False)]
  assert {(m.path, m.axis) for m in derived[1].members} >= {(("up", "kernel"), 1), (("down", "kernel"), 0)}
  width_index = {"conv": 0, "down": 1, "conv2": 2}
  groups = [dataclasses.replace(g, width_indices=(width_index[g.name],)) if g.name in width_index else g
            for g in derived]
  assert_parity(lambda w: SENet(w, rngs=nnx.Rngs(0)), (8, 8), seed=0, groups=groups)


def test_loops_are_not_followed() -> None:
  model = abstract_model(lambda: _Fn(lambda m, h: jax.lax.fori_loop(0, 2, lambda i, a: a * 0.5, h),
                                     rngs=nnx.Rngs(0)))
  with pytest.warns(GroupDerivationWarning, match="primitive '(while|scan)' is not understood"):
    groups = derive_model_groups(model, _x())
  assert not _by_member(groups, ("conv1", "kernel"), 3).prunable


# ----------------------------------------------------------------------------------------------------------------
# Patterns that must come out not prunable.


class PaddedShortcutNet(nnx.Module):
  """A CIFAR-ResNet "option A" block: strided slice + channel zero-padding shortcut."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem, self.stem_bn = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
    self.conv1, self.bn1 = nnx.Conv(4, 6, (3, 3), strides=(2, 2), rngs=rngs), nnx.BatchNorm(6, rngs=rngs)
    self.conv2, self.bn2 = nnx.Conv(6, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem(x)))
    h = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
    short = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))
    return self.fc(nnx.relu(h + short).mean(axis=(1, 2)))


def test_zero_padded_shortcut_fixes_both_streams() -> None:
  groups = _derive(abstract_model(lambda: PaddedShortcutNet(nnx.Rngs(0))))
  stem = _by_member(groups, ("stem", "kernel"), 3)
  stream = _by_member(groups, ("conv2", "kernel"), 3)
  mid = _by_member(groups, ("conv1", "kernel"), 3)
  assert not stem.prunable and "zero-padded shortcut" in stem.note
  assert not stream.prunable and "zero-padded shortcut" in stream.note
  assert mid.prunable and mid.size == 6
  assert ChannelSlice(("fc", "kernel"), 0, "in") in stream.members
  assert ChannelSlice(("conv1", "kernel"), 2, "in") in stem.members


class _Fn(nnx.Module):
  """conv (3 -> 8) -> BN -> ReLU -> body(h) -> conv (-> 6) -> mean -> Dense, with a pluggable body."""

  def __init__(self, body: Callable[[Any, jax.Array], jax.Array], *, mid_in: int = 8, groups: int = 1,
               scale: bool = False, rngs: nnx.Rngs):
    self.conv1, self.bn1 = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(mid_in, 6, (1, 1), feature_group_count=groups, rngs=rngs)
    self.fc = nnx.Linear(6, 5, rngs=rngs)
    if scale:  # only for bodies that read it: an unread parameter is warned about
      self.scale = nnx.Param(jnp.ones((8,)))
    self.body = body

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(self.bn1(self.conv1(x)))
    return self.fc(self.conv2(self.body(self, h)).mean(axis=(1, 2)))


def _layer_norm(m: Any, h: jax.Array) -> jax.Array:
  mu = h.mean(-1, keepdims=True)
  return (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * m.scale[...]


def _shuffle(m: Any, h: jax.Array) -> jax.Array:
  n, hh, ww, c = h.shape
  return h.reshape(n, hh, ww, 2, c // 2).swapaxes(3, 4).reshape(n, hh, ww, c)


@pytest.mark.parametrize("body, kwargs, reason", [
    (lambda m, h: h, {"groups": 2}, "grouped convolution (feature_group_count=2)"),
    (_layer_norm, {"scale": True}, "reduced over"),
    (_shuffle, {}, "split by a reshape"),
    (lambda m, h: h[..., :4], {"mid_in": 4}, "sliced into a partial channel range"),
    (lambda m, h: jnp.cumsum(h, axis=-1), {}, "cumsum along it"),
], ids=["grouped_conv", "layer_norm", "channel_shuffle", "partial_slice", "cumsum"])
def test_unfollowable_patterns_are_fixed(body: Callable[..., jax.Array], kwargs: dict[str, Any],
                                         reason: str) -> None:
  groups = _derive(abstract_model(lambda: _Fn(body, rngs=nnx.Rngs(0), **kwargs)))
  g = _by_member(groups, ("conv1", "kernel"), 3)
  assert not g.prunable and reason in g.note, g.note
  after = _by_member(groups, ("conv2", "kernel"), 3)
  # A grouped conv's outputs must keep equal group sizes, so they are fixed too; otherwise the next set is free.
  assert after.prunable == (kwargs.get("groups", 1) == 1), after.note


def test_unknown_primitive_warns_and_fixes() -> None:
  model = abstract_model(lambda: _Fn(lambda m, h: jnp.sort(h, axis=-1), rngs=nnx.Rngs(0)))
  with pytest.warns(GroupDerivationWarning, match="primitive 'sort' is not understood"):
    groups = derive_model_groups(model, _x())
  g = _by_member(groups, ("conv1", "kernel"), 3)
  assert not g.prunable and "'sort'" in g.note
  conv2_in = _by_member(groups, ("conv2", "kernel"), 2)
  assert not conv2_in.prunable  # the channels after the sort have unknown identity


def test_channels_first_flatten_is_fixed() -> None:
  class NCHWHead(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.fc = nnx.Linear(4 * 64, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
      h = nnx.relu(self.conv(x)).transpose(0, 3, 1, 2)  # PyTorch-style channel-major flatten
      return self.fc(h.reshape(h.shape[0], -1))

  groups = _derive(abstract_model(lambda: NCHWHead(nnx.Rngs(0))))
  g = _by_member(groups, ("conv", "kernel"), 3)
  assert not g.prunable and "merged into a later axis" in g.note
  assert all(not h.prunable for h in groups)


def test_parameter_used_in_an_unfollowable_way_warns() -> None:
  class WeightStandardised(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.conv2 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
      self.fc = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
      h = nnx.relu(self.conv(x))
      k = self.conv2.kernel[...]
      k = k / jnp.sqrt((k ** 2).sum(axis=(0, 1, 2), keepdims=True))  # a norm over the input channels
      h = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return self.fc(nnx.relu(h).mean(axis=(1, 2)))

  model = abstract_model(lambda: WeightStandardised(nnx.Rngs(0)))
  with pytest.warns(GroupDerivationWarning, match="conv2/kernel axis 2 is reduced over .* group 'conv' is marked"):
    groups = derive_model_groups(model, _x())
  assert not _by_member(groups, ("conv", "kernel"), 3).prunable  # the norm mixes the input channels
  assert _by_member(groups, ("conv2", "kernel"), 3).prunable  # each output channel is normalised on its own


def test_shared_layer_ties_its_input_and_output() -> None:
  class Shared(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.body = nnx.Conv(4, 4, (3, 3), rngs=rngs)
      self.fc = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
      h = self.body(nnx.relu(self.body(nnx.relu(self.stem(x)))))
      return self.fc(h.mean(axis=(1, 2)))

  groups = _derive(abstract_model(lambda: Shared(nnx.Rngs(0))))
  g = _by_member(groups, ("stem", "kernel"), 3)
  assert {(m.path, m.axis) for m in g.members} == {
      (("stem", "kernel"), 3), (("stem", "bias"), 0), (("body", "kernel"), 2), (("body", "kernel"), 3),
      (("body", "bias"), 0), (("fc", "kernel"), 0)}
  assert g.prunable


# ----------------------------------------------------------------------------------------------------------------
# API details.


def test_derive_groups_on_a_plain_function_and_nnx_state() -> None:
  model = abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0)))
  graphdef, pure = random_state(model, 0)

  def apply(state: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)

  from_pure = derive_groups(apply, pure, jnp.zeros((2, 8, 8, 3)))
  state = nnx.state(nnx.merge(graphdef, pure))
  from_state = derive_groups(apply, state, jnp.zeros((2, 8, 8, 3)))
  assert from_pure == from_state
  assert check_groups(model.channel_groups(), from_pure) == []


def test_closure_over_params_warns() -> None:
  model = abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0)))
  graphdef, pure = random_state(model, 0)
  with pytest.warns(GroupDerivationWarning, match="no parameter is indexed"):
    groups = derive_groups(lambda p, x: nnx.merge(graphdef, pure)(x), pure, jnp.zeros((2, 8, 8, 3)))
  assert groups == []


def test_derive_model_groups_leaves_the_model_alone() -> None:
  model = abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0)))
  model.train()
  derived = derive_model_groups(model, _x())
  assert model.bn1.use_running_average is False
  assert check_groups(model.channel_groups(), derived) == []
  # In training mode BatchNorm reads its running statistics only to update them: they are members all the same.
  train = derive_model_groups(model, _x(), eval_mode=False)
  assert check_groups(model.channel_groups(), train) == []


def test_check_groups_reports_differences_readably() -> None:
  model = abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0)))
  derived = derive_model_groups(model, _x())
  declared = model.channel_groups()
  conv1, conv2 = declared
  dropped = dataclasses.replace(conv1, members=conv1.members[:-1])
  (msg,) = check_groups([dropped, conv2], derived)
  assert msg == ("declared group 'conv1' (size 6) differs from derived group 'conv1' (size 6); not declared: "
                 "conv2/kernel[axis 2, in]")
  extra = dataclasses.replace(conv1, members=conv1.members + (ChannelSlice(("fc", "kernel"), 0, "in"),))
  (msg,) = check_groups([extra, conv2], derived)
  assert "declared but not in that group: fc/kernel[axis 0, in]" in msg
  (msg,) = check_groups([conv1], derived)
  assert msg.startswith("derived group 'conv2' (size 8, prunable) is not declared: ")
  assert check_groups([conv1], derived, ignore_boundary=False)[-1].startswith("derived group 'fc' (size 5, fixed)")
  (msg,) = check_groups([dataclasses.replace(conv1, size=7), conv2], derived)
  assert msg == ("declared group 'conv1' has size 7 but its channels number 6 in the forward pass (derived group "
                 "'conv1')")
  pad = abstract_model(lambda: PaddedShortcutNet(nnx.Rngs(0)))
  pad_derived = derive_model_groups(pad, _x())
  stream = _by_member(pad_derived, ("conv2", "kernel"), 3)
  declared = [dataclasses.replace(g, prunable=True) if g is stream else g for g in pad_derived]
  (msg,) = check_groups(declared, pad_derived)
  assert msg.startswith("declared group 'conv2' is prunable but the forward pass shows it is not: coupled")
  # Negative axes compare equal once the state gives the ranks.
  neg = dataclasses.replace(conv1, members=tuple(dataclasses.replace(m, axis=m.axis - 4) if m.path[-1] == "kernel"
                                                  else m for m in conv1.members))
  assert check_groups([neg, conv2], derived) != []
  _, pure = random_state(model, 0)
  assert check_groups([neg, conv2], derived, state=pure) == []
  assert check_groups([ChannelGroup("x", 2, (ChannelSlice(("nope",), 0),))], derived)[0].startswith(
      "declared group 'x' (size 2) shares no member with any derived group")


# ----------------------------------------------------------------------------------------------------------------
# Registry models.


@pytest.mark.parametrize("name", registry_names())
def test_registry_groups_match_declared(name: str) -> None:
  models = _registry()
  model = abstract_model(lambda: models.get_model(name, rngs=nnx.Rngs(0)))
  derived = _derive(model, registry_input(models, name))
  declared = model.channel_groups()
  assert check_groups(declared, derived) == []
  assert sum(g.prunable for g in declared) >= 1
  # The boundary groups (network input, logits) are the only derived groups the models do not declare.
  declared_sets = {frozenset(g.members) for g in declared}
  undeclared = [g for g in derived if frozenset(g.members) not in declared_sets]
  assert [(g.size, g.note) for g in undeclared] == [(3, "network input"), (undeclared[-1].size, "network output")]


# ----------------------------------------------------------------------------------------------------------------
# Derived groups against an independent masked forward.
#
# Each net is a pure function of a parameter dict whose shapes follow the parameters, so the pruned parameters run
# through the same code. ``fwd(p, x, drop)`` multiplies each labelled channel set by ``drop[label]`` (a 0/1
# vector) at every place the net produces it, which is what removing those channels means; the oracle is that
# the pruned parameters give the dense output with the removed channels zeroed so, for every derived group that is
# prunable, and the hand-written expectation says which groups those are.


def _conv(x: jax.Array, k: jax.Array, *, stride: int = 1, groups: int = 1) -> jax.Array:
  return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def _z(h: jax.Array, drop: dict[str, Any], label: str) -> jax.Array:
  return h * drop[label] if label in drop else h


def _head(p: dict[str, Any], h: jax.Array) -> jax.Array:
  return jnp.mean(h, axis=(1, 2)) @ p["fc"]["kernel"]


def _bn(p: dict[str, Any], h: jax.Array) -> jax.Array:
  return (h - p["mean"]) * jax.lax.rsqrt(p["var"] + 1e-5) * p["scale"] + p["bias"]


def _net_concat(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
  a = _z(jax.nn.relu(_conv(x, p["a"]["kernel"])), d, "a")
  b = _z(jax.nn.relu(_conv(x, p["b"]["kernel"])), d, "b")
  h = jax.nn.relu(_bn(p["cat_bn"], jnp.concatenate([a, b], axis=-1)))
  na = a.shape[-1]  # the BatchNorm makes each part's channels again: a removed channel is zero after it too
  h = jnp.concatenate([_z(h[..., :na], d, "a"), _z(h[..., na:], d, "b")], axis=-1)
  return _head(p, _z(jax.nn.relu(_conv(h, p["mix"]["kernel"])), d, "mix"))


def _net_depthwise(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
  h = _z(jax.nn.relu(_bn(p["bn1"], _conv(x, p["c1"]["kernel"]))), d, "c1")
  h = _conv(h, p["dw"]["kernel"], groups=h.shape[-1]) + p["dw"]["bias"]
  h = _z(jax.nn.relu(_bn(p["bn2"], h)), d, "c1")  # a depthwise conv makes the same channels again
  return _head(p, _z(jax.nn.relu(_conv(h, p["pw"]["kernel"])), d, "pw"))


def _net_residual(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
  s = _z(jax.nn.relu(_conv(x, p["stem"]["kernel"])), d, "stream")
  h = _z(jax.nn.relu(_bn(p["bn_a"], _conv(s, p["conv_a"]["kernel"]))), d, "mid")
  s = s + _z(_bn(p["bn_b"], _conv(h, p["conv_b"]["kernel"])), d, "stream")
  s = s + _z(_conv(jax.nn.relu(s), p["conv_c"]["kernel"]), d, "stream")
  return _head(p, jax.nn.relu(s))


def _net_split(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
  a = _z(jax.nn.relu(_conv(x, p["a"]["kernel"])), d, "a")
  b = _z(jax.nn.relu(_conv(x, p["b"]["kernel"])), d, "b")
  u, v = jnp.split(jnp.concatenate([a, b], axis=-1), [a.shape[-1]], axis=-1)  # back at the concat boundary
  h = _z(_conv(u, p["cu"]["kernel"]) + _conv(v, p["cv"]["kernel"]), d, "uv")
  w = _conv(h, p["whole"]["kernel"])
  w1, w2 = jnp.split(w, 2, axis=-1)  # halves of one layer's channels: fixed
  return _head(p, jax.nn.relu(w1 * w2))


def _net_transpose(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
  h = _z(jax.nn.relu(_conv(x, p["c1"]["kernel"], stride=2)), d, "c1")
  h = jax.lax.conv_transpose(h, p["up"]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = _z(jax.nn.relu(h + p["up"]["bias"]), d, "up")
  return _head(p, _z(jax.nn.relu(_conv(h, p["c3"]["kernel"])), d, "c3"))


def _net_group_norm(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
  h = _conv(x, p["c1"]["kernel"])
  n, hh, ww, c = h.shape
  g = h.reshape(n, hh, ww, 2, c // 2)  # two groups of channels normalised together
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) * jax.lax.rsqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-5)
  h = jax.nn.relu(g.reshape(n, hh, ww, c) * p["gn"]["scale"] + p["gn"]["bias"])
  return _head(p, _z(jax.nn.relu(_conv(h, p["c2"]["kernel"])), d, "c2"))


def _net_se(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
  h = _z(jax.nn.relu(_conv(x, p["c1"]["kernel"])), d, "c1")
  z = _z(jax.nn.silu(h.mean(axis=(1, 2)) @ p["down"]["kernel"] + p["down"]["bias"]), d, "down")
  gate = _z(jax.nn.sigmoid(z @ p["up"]["kernel"] + p["up"]["bias"]), d, "c1")
  h = h * gate[:, None, None, :]
  return _head(p, _z(jax.nn.relu(_conv(h, p["c2"]["kernel"])), d, "c2"))


def _coords(h: jax.Array) -> jax.Array:
  n, hh, ww, _ = h.shape
  yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, hh), jnp.linspace(-1, 1, ww), indexing="ij")
  return jnp.broadcast_to(jnp.stack([yy, xx], -1)[None], (n, hh, ww, 2))


def _after(extra: str) -> Callable[..., jax.Array]:
  """conv -> relu -> [its channels, then 2 extra channels] -> conv -> dense: the extras come *after*."""
  def net(p: dict[str, Any], x: jax.Array, d: dict[str, Any]) -> jax.Array:
    h = _z(jax.nn.relu(_conv(x, p["c1"]["kernel"])), d, "c1")
    if extra == "coords":  # CoordConv
      h = jnp.concatenate([h, _coords(h)], axis=-1)
    elif extra == "pad":
      h = jnp.pad(h, ((0, 0), (0, 0), (0, 0), (0, 2)))
    elif extra == "learned":
      learned = _z(jnp.broadcast_to(p["extra"], (*h.shape[:3], p["extra"].shape[-1])), d, "extra")
      h = jnp.concatenate([h, learned], axis=-1)
    else:  # the coordinates first, which always worked
      h = jnp.concatenate([_coords(h), h], axis=-1)
    return _head(p, _z(jax.nn.relu(_conv(h, p["c2"]["kernel"])), d, "c2"))
  return net


_K3 = (3, 3)
# name -> (net, parameter shapes, {label: (path, axis) of one of its members}, {(path, axis): reason} of fixed sets)
ORACLE_NETS: dict[str, tuple[Callable[..., jax.Array], dict[str, tuple[int, ...]], dict[str, Any], dict[Any, str]]] = {
    "concat": (_net_concat, {"a/kernel": (*_K3, 3, 4), "b/kernel": (*_K3, 3, 3), "cat_bn": (7,),
                             "mix/kernel": (1, 1, 7, 5), "fc/kernel": (5, 2)},
               {"a": ("a/kernel", 3), "b": ("b/kernel", 3), "mix": ("mix/kernel", 3)}, {}),
    "depthwise": (_net_depthwise, {"c1/kernel": (*_K3, 3, 6), "bn1": (6,), "dw/kernel": (*_K3, 1, 6), "dw/bias": (6,),
                                   "bn2": (6,), "pw/kernel": (1, 1, 6, 5), "fc/kernel": (5, 2)},
                  {"c1": ("dw/kernel", 3), "pw": ("pw/kernel", 3)}, {}),
    "residual": (_net_residual, {"stem/kernel": (*_K3, 3, 6), "conv_a/kernel": (*_K3, 6, 4), "bn_a": (4,),
                                 "conv_b/kernel": (*_K3, 4, 6), "bn_b": (6,), "conv_c/kernel": (1, 1, 6, 6),
                                 "fc/kernel": (6, 2)},
                 {"stream": ("conv_c/kernel", 3), "mid": ("conv_a/kernel", 3)}, {}),
    "split": (_net_split, {"a/kernel": (*_K3, 3, 4), "b/kernel": (*_K3, 3, 3), "cu/kernel": (1, 1, 4, 5),
                           "cv/kernel": (1, 1, 3, 5), "whole/kernel": (1, 1, 5, 6), "fc/kernel": (3, 2)},
              {"a": ("a/kernel", 3), "b": ("b/kernel", 3), "uv": ("cu/kernel", 3)},
              {("whole/kernel", 3): "sliced into a partial channel range"}),
    "transpose_conv": (_net_transpose, {"c1/kernel": (*_K3, 3, 6), "up/kernel": (*_K3, 6, 4), "up/bias": (4,),
                                        "c3/kernel": (1, 1, 4, 5), "fc/kernel": (5, 2)},
                       {"c1": ("c1/kernel", 3), "up": ("up/kernel", 3), "c3": ("c3/kernel", 3)}, {}),
    "group_norm": (_net_group_norm, {"c1/kernel": (*_K3, 3, 6), "gn/scale": (6,), "gn/bias": (6,),
                                     "c2/kernel": (1, 1, 6, 5), "fc/kernel": (5, 2)},
                   {"c2": ("c2/kernel", 3)}, {("c1/kernel", 3): "split by a reshape"}),
    "squeeze_excitation": (_net_se, {"c1/kernel": (*_K3, 3, 6), "down/kernel": (6, 3), "down/bias": (3,),
                                     "up/kernel": (3, 6), "up/bias": (6,), "c2/kernel": (1, 1, 6, 5),
                                     "fc/kernel": (5, 2)},
                           {"c1": ("c1/kernel", 3), "down": ("down/kernel", 1), "c2": ("c2/kernel", 3)}, {}),
    **{f"extra_{kind}": (_after(kind), {"c1/kernel": (*_K3, 3, 4), "c2/kernel": (1, 1, 6, 5), "fc/kernel": (5, 2),
                                        **({"extra": (1, 1, 1, 2)} if kind == "learned" else {})},
                         {"c1": ("c1/kernel", 3), "c2": ("c2/kernel", 3),
                          **({"extra": ("extra", 3)} if kind == "learned" else {})},
                         {} if kind == "learned" else {("c2/kernel", 2): "constant channels"})
       for kind in ("coords", "pad", "learned", "first")},
}


def _oracle_params(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
  """Random parameters: BatchNorm-like entries (a bare name with a 1-D shape) get scale/bias/mean/var."""
  rng = np.random.default_rng(seed)
  params: dict[str, Any] = {}
  for name, shape in shapes.items():
    if "/" not in name and len(shape) == 1:
      params[name] = {"scale": rng.uniform(0.5, 1.5, shape), "bias": rng.normal(size=shape) * 0.3,
                      "mean": rng.normal(size=shape) * 0.3, "var": rng.uniform(0.5, 1.5, shape)}
      continue
    node = params
    *parents, leaf = name.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    fan_in = int(np.prod(shape[:-1])) or 1
    node[leaf] = rng.normal(size=shape) * (np.sqrt(2.0 / fan_in) if leaf == "kernel" else 0.5)
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def _group_of(groups: list[ChannelGroup], where: tuple[str, int]) -> ChannelGroup:
  """The one group with a member at ``where`` (path, axis); of several (an axis that takes a layer's channels and
  constant ones), the one group that is not prunable."""
  path, axis = tuple(where[0].split("/")), where[1]
  hits = [g for g in groups if any(m.path == path and m.axis == axis for m in g.members)]
  if len(hits) > 1:
    hits = [g for g in hits if not g.prunable]
  assert len(hits) == 1, (where, [g.name for g in hits])
  return hits[0]


@pytest.mark.parametrize("name", sorted(ORACLE_NETS))
def test_derived_groups_match_a_masked_forward(name: str) -> None:
  net, shapes, labels, fixed = ORACLE_NETS[name]
  params = _oracle_params(shapes, seed=len(name))
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 8, 8, 3)), jnp.float32)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    groups = derive_groups(lambda p, x: net(p, x, {}), params, x)
  assert [str(w.message) for w in caught if issubclass(w.category, GroupDerivationWarning)] == []
  by_label = {label: _group_of(groups, where) for label, where in labels.items()}
  assert sorted(g.name for g in groups if g.prunable) == sorted(g.name for g in by_label.values()), [
      (g.name, g.note) for g in groups]
  for where, reason in fixed.items():
    g = _group_of(groups, where)
    assert not g.prunable and reason in g.note, (where, g.note)
  dense = net(params, x, {})
  rng = np.random.default_rng(3)
  for label, g in by_label.items():
    keep = np.sort(rng.choice(g.size, size=max(1, g.size // 2), replace=False))
    drop = np.zeros(g.size, np.float32)
    drop[keep] = 1
    pruned = prune(params, groups, {g.name: keep}).state
    masked = net(params, x, {label: drop})
    np.testing.assert_allclose(net(pruned, x, {}), masked, rtol=1e-4, atol=1e-5, err_msg=f"{name}: {label}")
    # mask(), documented as the dense equivalent of removal, computes the same with the dense shapes.
    np.testing.assert_allclose(net(mask(params, groups, {g.name: keep}), x, {}), masked, rtol=1e-4, atol=1e-5,
                               err_msg=f"{name}: {label} (mask)")
    assert not np.allclose(masked, dense, atol=1e-4), f"{name}: removing {label} changed nothing"
