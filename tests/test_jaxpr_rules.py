"""Tests of the public channel-rule registry of hsic_jax.jaxpr_groups.

A primitive of the user's own (made with ``jax.extend.core.Primitive``) is opaque to derivation until a rule is
registered for it: the channel sets it touches are fixed and a warning names it. With a rule, the derived groups
follow it, checked against a masked forward written by hand (the pruned function equals the dense function with
the removed channels zeroed where they are produced).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

from hsic_jax import jaxpr_groups
from hsic_jax.groups import ChannelGroup
from hsic_jax.jaxpr_groups import GroupDerivationWarning, derive_groups
from hsic_jax.surgery import prune

# y = 2 x, channel by channel: a primitive of the user's own that derivation knows nothing about.
_scale_p = jcore.Primitive("test_rules_channel_scale")
_scale_p.def_impl(lambda x: 2.0 * x)
_scale_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))


@jax.custom_jvp
def _scaled(x: jax.Array) -> jax.Array:
  return _scale_p.bind(x)


_scaled.defjvp(lambda primals, tangents: (_scaled(primals[0]), 2.0 * tangents[0]))


@pytest.fixture
def clean_registry() -> Iterator[None]:
  before = jaxpr_groups.channel_rules()
  yield
  for name in set(jaxpr_groups.channel_rules()) - set(before):
    jaxpr_groups.unregister_channel_rule(name)
  for name, rule in before.items():
    jaxpr_groups.register_channel_rule(name, rule, replace=True)


def _conv(x: jax.Array, k: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _params() -> dict[str, Any]:
  rng = np.random.default_rng(0)
  return {"c1": {"kernel": rng.normal(size=(3, 3, 3, 6)).astype(np.float32)},
          "c2": {"kernel": rng.normal(size=(1, 1, 6, 4)).astype(np.float32)},
          "fc": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}}


def _fwd(p: dict[str, Any], x: jax.Array, drop: np.ndarray | None = None, *, inner: Any = _scale_p.bind
         ) -> jax.Array:
  """conv -> relu -> the custom primitive -> conv -> mean -> dense; ``drop`` zeroes c1's channels where made."""
  h = jax.nn.relu(_conv(x, p["c1"]["kernel"]))
  if drop is not None:
    h = h * drop
  h = _conv(inner(h), p["c2"]["kernel"])
  return jnp.mean(h, axis=(1, 2)) @ p["fc"]["kernel"]


def _x() -> jax.Array:
  return jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 3)), jnp.float32)


def _c1_group(groups: list[ChannelGroup]) -> ChannelGroup:
  (g,) = [g for g in groups if any(m.path == ("c1", "kernel") and m.axis == 3 for m in g.members)]
  return g


def _derive(fwd: Any, *, expect: str | None) -> list[ChannelGroup]:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    groups = derive_groups(fwd, _params(), _x())
  messages = [str(w.message) for w in caught if issubclass(w.category, GroupDerivationWarning)]
  if expect is None:
    assert messages == []
  else:
    assert any(expect in m for m in messages), messages
  return groups


@pytest.mark.parametrize("inner", [_scale_p.bind, _scaled], ids=["primitive", "custom_jvp"])
def test_unknown_primitive_is_conservative(clean_registry: None, inner: Any) -> None:
  groups = _derive(lambda p, x: _fwd(p, x, inner=inner), expect="'test_rules_channel_scale' is not understood")
  g = _c1_group(groups)
  assert not g.prunable and "test_rules_channel_scale" in g.note
  # The channels after the primitive have lost their identity: c2's input axis is fixed too.
  (after,) = [g for g in groups if any(m.path == ("c2", "kernel") and m.axis == 2 for m in g.members)]
  assert not after.prunable


@pytest.mark.parametrize("inner", [_scale_p.bind, _scaled], ids=["primitive", "custom_jvp"])
def test_registered_rule_changes_the_groups(clean_registry: None, inner: Any) -> None:
  jaxpr_groups.register_channel_rule(_scale_p, lambda ctx, eqn, ins: ctx.elementwise(eqn, ins))
  groups = _derive(lambda p, x: _fwd(p, x, inner=inner), expect=None)
  g = _c1_group(groups)
  assert g.prunable and g.size == 6
  assert {(m.path, m.axis, m.role) for m in g.members} == {(("c1", "kernel"), 3, "out"), (("c2", "kernel"), 2, "in")}
  # Oracle: the pruned function equals the dense one with the removed channels zeroed where c1 makes them.
  keep = np.array([0, 2, 3, 5])
  pruned = prune(_params(), groups, {g.name: keep}).state
  drop = np.zeros(6, np.float32)
  drop[keep] = 1
  x = _x()
  y_pruned = _fwd(pruned, x, inner=inner)
  y_masked = _fwd(_params(), x, drop, inner=inner)
  np.testing.assert_allclose(y_pruned, y_masked, rtol=1e-5, atol=1e-5)
  assert not np.allclose(y_masked, _fwd(_params(), x, inner=inner), atol=1e-3)


def test_rule_that_mixes_channels_fixes_them_without_a_warning(clean_registry: None) -> None:
  jaxpr_groups.register_channel_rule(
      "test_rules_channel_scale", lambda ctx, eqn, ins: ctx.mix_axes(eqn, ins, [-1], "mixed by my primitive"))
  g = _c1_group(_derive(_fwd, expect=None))
  assert not g.prunable and "mixed by my primitive" in g.note


def test_pass_through_rule(clean_registry: None) -> None:
  jaxpr_groups.register_channel_rule(_scale_p, lambda ctx, eqn, ins: ctx.pass_through(eqn, ins))
  assert _c1_group(_derive(_fwd, expect=None)).prunable


def test_registry_arguments_are_checked(clean_registry: None) -> None:
  with pytest.raises(ValueError, match="already has a channel rule"):
    jaxpr_groups.register_channel_rule("add", lambda ctx, eqn, ins: ctx.opaque(eqn, ins))
  with pytest.raises(ValueError, match="primitive must be"):
    jaxpr_groups.register_channel_rule(3, lambda ctx, eqn, ins: ins)  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="rule must be callable"):
    jaxpr_groups.register_channel_rule("test_rules_other", None)  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="has no channel rule"):
    jaxpr_groups.unregister_channel_rule("test_rules_never_registered")
  # A built-in rule may be replaced on purpose: an opaque 'add' fixes the residual-style sum below.
  jaxpr_groups.register_channel_rule("add", lambda ctx, eqn, ins: ctx.opaque(eqn, ins), replace=True)
  jaxpr_groups.register_channel_rule(_scale_p, lambda ctx, eqn, ins: ctx.elementwise(eqn, ins))
  g = _c1_group(_derive(lambda p, x: _fwd(p, x) + 1.0, expect="primitive 'add' is not understood"))
  assert g.prunable  # the opaque add is after the dense layer: c1's channels never reach it


def test_rule_returning_the_wrong_values_is_reported(clean_registry: None) -> None:
  jaxpr_groups.register_channel_rule(_scale_p, lambda ctx, eqn, ins: [])
  with pytest.raises(ValueError, match="'test_rules_channel_scale' returned 0 values"):
    derive_groups(_fwd, _params(), _x())
  jaxpr_groups.register_channel_rule(_scale_p, lambda ctx, eqn, ins: ["not a value"], replace=True)
  with pytest.raises(ValueError, match="expected an abstract value of rank 4"):
    derive_groups(_fwd, _params(), _x())
