"""Tests of hsic_jax.surgery.thin_model: the thin model computes what the masked dense model computes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
import models
from hsic_jax.groups import ChannelGroup, ChannelSlice


def _randomized(cls, *args, seed: int = 0, **kwargs) -> nnx.Module:
  """``cls(*args, rngs=...)`` built abstractly, its arrays drawn in NumPy (kernels ~ N(0, 1/fan_in), BatchNorm
  statistics and affine terms random, variances positive), in eval mode: no initializer is compiled."""
  rng = np.random.default_rng(seed)
  model = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **kwargs))

  def draw(path, leaf):
    name, shape = str(getattr(path[-1], "key", path[-1])), tuple(leaf.shape)
    if name == "kernel":
      return jnp.asarray(rng.normal(size=shape) / math.sqrt(max(1, math.prod(shape[:-1]))), jnp.float32)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, size=shape), jnp.float32)
    return jnp.asarray(rng.normal(scale=0.5, size=shape) + (1.0 if name == "scale" else 0.0), jnp.float32)

  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(model)))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def _run(model: nnx.Module, state=None, x=None):
  graphdef, own = nnx.split(model)
  if state is not None:
    nnx.replace_by_pure_dict(own, state)
  return nnx.merge(graphdef, own)(x)


# ------------------------------------------------------------------------------------------------------------------
# User-style CNNs.


class Plain(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.c1, self.b1 = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.c2, self.b2 = nnx.Conv(8, 12, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs), nnx.BatchNorm(12, rngs=rngs)
    self.c3 = nnx.Conv(12, 6, (1, 1), rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b1(self.c1(x)))
    h = nnx.relu(self.b2(self.c2(h)))
    return self.head(nnx.relu(self.c3(h)).mean(axis=(1, 2)))


class Residual(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.stem, self.bn0 = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.a, self.bna = nnx.Conv(8, 5, (3, 3), rngs=rngs), nnx.BatchNorm(5, rngs=rngs)
    self.b, self.bnb = nnx.Conv(5, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn0(self.stem(x)))
    h = nnx.relu(h + self.bnb(self.b(nnx.relu(self.bna(self.a(h))))))
    return self.head(h.mean(axis=(1, 2)))


class Concat(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.left = nnx.Conv(3, 4, (1, 1), rngs=rngs)
    self.right = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(10, rngs=rngs)
    self.mix = nnx.Conv(10, 7, (3, 3), rngs=rngs)
    self.head = nnx.Linear(7, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(jnp.concatenate([self.left(x), self.right(x)], axis=-1)))
    return self.head(nnx.relu(self.mix(h)).mean(axis=(1, 2)))


class Depthwise(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.expand, self.bn1 = nnx.Conv(3, 12, (1, 1), rngs=rngs), nnx.BatchNorm(12, rngs=rngs)
    self.dw, self.bn2 = nnx.Conv(12, 12, (3, 3), feature_group_count=12, rngs=rngs), nnx.BatchNorm(12, rngs=rngs)
    self.project = nnx.Conv(12, 6, (1, 1), rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn1(self.expand(x)))
    h = nnx.relu(self.bn2(self.dw(h)))
    return self.head(self.project(h).mean(axis=(1, 2)))


class GroupedNorm(nnx.Module):
  """A grouped conv (its channels stay) between prunable convs, and a GroupNorm."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
    self.gn = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.c3 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.bn3 = nnx.BatchNorm(6, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.gn(self.grouped(nnx.relu(self.c1(x)))))
    return self.head(nnx.relu(self.bn3(self.c3(h))).mean(axis=(1, 2)))


class SqueezeExcite(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.c1, self.bn = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.fc1, self.fc2 = nnx.Linear(8, 4, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)
    self.c2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.c1(x)))
    gate = nnx.sigmoid(self.fc2(nnx.relu(self.fc1(h.mean(axis=(1, 2))))))
    h = h * gate[:, None, None, :]
    return self.head(nnx.relu(self.c2(h)).mean(axis=(1, 2)))


class StoredWidth(nnx.Module):
  """Keeps a width as a Python int and reshapes with it: the library cannot see it."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.channels = 8
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.c1(x))
    h = h.reshape(h.shape[0], -1, self.channels)
    return self.head(h.mean(axis=1))


_MODELS = [Plain, Residual, Concat, Depthwise, GroupedNorm, SqueezeExcite]


def _keep(groups, rng: np.random.Generator) -> dict[str, list[int]]:
  keep = {}
  for g in groups:
    if g.prunable and g.size > 1:
      k = int(rng.integers(1, g.size))
      keep[g.name] = sorted(rng.choice(g.size, size=k, replace=False).tolist())
  return keep


@pytest.mark.parametrize("cls", _MODELS, ids=lambda c: c.__name__)
def test_thin_model_computes_the_masked_model(cls):
  model = _randomized(cls, seed=1)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 10, 10, 3)), jnp.float32)
  groups = hj.derive_model_groups(model, x)
  keep = _keep(groups, np.random.default_rng(3))
  assert keep, [(g.name, g.prunable, g.note) for g in groups]
  dense_state = nnx.to_pure_dict(nnx.state(model))
  thin = hj.thin_model(model, groups, keep, x)
  assert type(thin) is cls and thin is not model
  # The model is not changed, and the thin one holds fewer parameters.
  assert jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(model))) == jax.tree.map(np.shape, dense_state)
  assert hj.count_macs(thin, x).params < hj.count_macs(model, x).params
  masked = hj.surgery.mask(dense_state, groups, keep, zero_out=True)
  want = _run(model, masked, x)
  got = thin(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.asarray(want), np.asarray(model(x)), atol=1e-3)  # the cut changed the function
  # The recorded plan rebuilds the same thin model from the dense state.
  plan = hj.prune(dense_state, groups, keep).plan
  again = hj.thin_model(model, groups, hj.surgery.PrunePlan.from_json(plan.to_json()), x)
  np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(got))
  # Its cost is what cost_fn says of the kept widths.
  widths = {name: len(idx) for name, idx in keep.items()}
  assert hj.count_macs(thin, x) == hj.cost_fn(model, x, groups=groups)(widths)


def test_depthwise_layers_follow_the_kept_channels():
  model = _randomized(Depthwise)
  x = jnp.zeros((2, 8, 8, 3))
  thin = hj.thin_model(model, hj.derive_model_groups(model, x), {"expand": [0, 3, 4, 9, 11]}, x)
  assert (thin.dw.in_features, thin.dw.out_features, thin.dw.feature_group_count) == (5, 5, 5)
  assert thin.bn1.num_features == thin.bn2.num_features == 5 and thin.project.in_features == 5
  assert model.dw.feature_group_count == 12  # the dense model keeps its own


def test_a_width_stored_on_a_module_is_refused():
  model = _randomized(StoredWidth)
  x = jnp.zeros((2, 8, 8, 3))
  groups = hj.derive_model_groups(model, x)
  assert {g.name: g.prunable for g in groups}["c1"]
  with pytest.raises(ValueError, match=r"thin StoredWidth fails on the example input.*channels = 8"):
    hj.thin_model(model, groups, {"c1": [0, 1, 2]}, x)


class Normed(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.gn = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.c2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.grouped = nnx.Conv(6, 6, (3, 3), feature_group_count=2, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.c2(nnx.relu(self.gn(self.c1(x)))))
    return self.head(nnx.relu(self.grouped(h)).mean(axis=(1, 2)))


def test_group_norm_and_grouped_conv_by_hand():
  # Derivation keeps GroupNorm's and grouped convs' channels (their outputs mix channels); groups written by hand
  # cut them, and the layers follow as far as they can.
  model = _randomized(Normed)
  x = jnp.zeros((2, 8, 8, 3))
  gn_members = (ChannelSlice(("c1", "kernel"), 3), ChannelSlice(("c1", "bias"), 0), ChannelSlice(("gn", "scale"), 0),
                ChannelSlice(("gn", "bias"), 0), ChannelSlice(("c2", "kernel"), 2, "in"))
  thin = hj.thin_model(model, [ChannelGroup("gn", 8, gn_members)], {"gn": [0, 1, 4, 5]}, x)
  assert (thin.gn.num_groups, thin.gn.group_size) == (2, 2)
  with pytest.raises(ValueError, match="gn: GroupNorm with num_groups=2 cut from 8 to 3 channels"):
    hj.thin_model(model, [ChannelGroup("gn", 8, gn_members)], {"gn": [0, 1, 4]}, x)
  out_members = (ChannelSlice(("grouped", "kernel"), 3), ChannelSlice(("grouped", "bias"), 0),
                 ChannelSlice(("head", "kernel"), 0, "in"))
  thin = hj.thin_model(model, [ChannelGroup("grouped", 6, out_members)], {"grouped": [0, 2, 3, 5]}, x)
  assert (thin.grouped.in_features, thin.grouped.out_features, thin.grouped.feature_group_count) == (6, 4, 2)
  with pytest.raises(ValueError, match="grouped: grouped convolution .* a multiple of 2 output channels"):
    hj.thin_model(model, [ChannelGroup("grouped", 6, out_members)], {"grouped": [0, 2, 3]}, x)


def test_bad_input():
  model = _randomized(Plain)
  x = jnp.zeros((2, 8, 8, 3))
  groups = hj.derive_model_groups(model, x)
  with pytest.raises(ValueError, match="example_args are needed"):
    hj.thin_model(model, groups, {"c1": [0, 1]})
  with pytest.raises(ValueError, match="keep names unknown group 'nope'"):
    hj.thin_model(model, groups, {"nope": [0]}, x)
  with pytest.raises(ValueError, match="model must be an nnx.Module"):
    hj.thin_model(lambda x: x, groups, {"c1": [0]}, x)


# ------------------------------------------------------------------------------------------------------------------
# A class that rebuilds itself at new widths: the zoo's models.


def test_zoo_model_is_rebuilt_with_its_widths_from_derived_or_declared_groups():
  dense = models.random_model("resnet20", num_classes=5, seed=0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  declared = dense.channel_groups()
  keep = {"stage1/block0/mid": [0, 2, 5, 7, 11], "stage3/block2/mid": list(range(0, 64, 3))}
  thin = hj.thin_model(dense, declared, keep, x)
  assert type(thin) is type(dense) and thin.widths[1] == 5 and thin.widths[-2] == 22
  # The zoo's own builder gives the same model (models.checkpoint.build_with_state).
  out = hj.prune(nnx.to_pure_dict(nnx.state(dense)), declared, keep, widths=dense.widths)
  assert out.widths == thin.widths
  from models import checkpoint  # pylint: disable=import-outside-toplevel
  ref = checkpoint.build_with_state("resnet20", out.widths, 5, out.state)
  np.testing.assert_allclose(np.asarray(thin(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-6)
  # Derived groups name the same channels; their width-list entries come from the declared twins.
  derived = hj.derive_model_groups(dense, x)
  by_members = {frozenset((m.path, m.axis, m.role) for m in g.members): g.name for g in derived}
  name = {g.name: by_members[frozenset((tuple(map(str, m.path)), m.axis % 4 if "kernel" in m.path else m.axis,
                                          m.role) for m in g.members)] for g in declared if g.name in keep}
  again = hj.thin_model(dense, derived, {name[k]: v for k, v in keep.items()}, x)
  assert again.widths == thin.widths
  np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(thin(x)))


class WidthNet(nnx.Module):
  """A class of the user's own that rebuilds itself at a width list."""

  def __init__(self, widths=(8, 6), *, rngs: nnx.Rngs):
    self.widths = tuple(widths)
    self.c1, self.bn = nnx.Conv(3, widths[0], (3, 3), rngs=rngs), nnx.BatchNorm(widths[0], rngs=rngs)
    self.c2 = nnx.Conv(widths[0], widths[1], (3, 3), rngs=rngs)
    self.head = nnx.Linear(widths[1], 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.c2(nnx.relu(self.bn(self.c1(x))))).mean(axis=(1, 2)))

  def with_widths(self, widths):
    return nnx.eval_shape(lambda: WidthNet(widths, rngs=nnx.Rngs(0)))


def test_a_class_with_the_hook_is_rebuilt_at_its_new_widths():
  import dataclasses  # pylint: disable=import-outside-toplevel
  model = _randomized(WidthNet)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  derived = hj.derive_model_groups(model, x)
  keep = {"c1": [1, 2, 6], "c2": [0, 5]}
  with pytest.raises(ValueError, match=r"groups \['c1', 'c2'\] are cut but set no entry of model.widths"):
    hj.thin_model(model, derived, keep, x)
  indexed = [dataclasses.replace(g, width_indices={"c1": (0,), "c2": (1,)}.get(g.name, ())) for g in derived]
  thin = hj.thin_model(model, indexed, keep)  # the class builds consistent shapes: no example input needed
  assert type(thin) is WidthNet and thin.widths == (3, 2) and thin.c2.in_features == 3
  want = _run(model, hj.surgery.mask(nnx.to_pure_dict(nnx.state(model)), indexed, keep), x)
  np.testing.assert_allclose(np.asarray(thin(x)), np.asarray(want), rtol=1e-4, atol=1e-5)
  # A hook that does not build what it is asked is caught.
  stuck = _randomized(StuckWidths)
  with pytest.raises(ValueError, match=r"model.with_widths\(\[3, 2\]\) builds 'bn/bias' with shape \(8,\), but the "
                     r"pruned state has \(3,\)"):
    hj.thin_model(stuck, indexed, keep)


class StuckWidths(WidthNet):
  def with_widths(self, widths):
    return nnx.eval_shape(lambda: StuckWidths(rngs=nnx.Rngs(0)))
