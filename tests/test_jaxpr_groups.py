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
import pytest
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice
from hsic_jax.jaxpr_groups import GroupDerivationWarning, check_groups, derive_groups, derive_model_groups
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
