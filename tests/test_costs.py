"""Tests of hsic_jax.costs: MACs and params from the jaxpr, against hand-derived values, the registry counter and
re-traces of models built with the counted widths."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
import models
from models import flops
from tests.test_flops import ITPRUNER_R50

# ------------------------------------------------------------------------------------------------------------------
# The zoo: derived groups (not the declared ones) at the widths of a width list give the registry counter's numbers.

# ResNet-110 is ResNet-56's code at twice the depth: slow only.
_ZOO = ["resnet20", "resnet56", pytest.param("resnet110", marks=pytest.mark.slow), "vgg16", "mobilenetv2",
        "googlenet", "resnet50"]
# Width lists the counter's own tests use (tests/test_flops.py), beside random ones.
_WIDTH_LISTS = {
    "vgg16": [[44, 35, 71, 71, 145, 104, 145, 290, 205, 325, 432, 429, 469]],
    "resnet50": [ws for ws, _, _ in ITPRUNER_R50.values()],
}


def _key(m: hj.ChannelSlice) -> tuple:
  return (tuple(str(k) for k in m.path), m.axis, m.role, m.offset, m.spatial)


@functools.lru_cache(maxsize=None)
def _zoo(name: str):
  model = nnx.eval_shape(lambda: models.get_model(name, num_classes=7, rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((2, *models.input_size(name), 3), jnp.float32)
  derived = hj.derive_model_groups(model, x)
  by_members = {frozenset(_key(m) for m in g.members): g.name for g in derived}
  twin = {}  # declared group with a width-list entry -> (its derived twin's name, width index)
  for g in model.channel_groups():
    if g.width_indices:
      twin[g.name] = (by_members[frozenset(_key(m) for m in g.members)], g.width_indices[0], g.prunable)
  return hj.cost_fn(model, x, groups=derived), twin


def _derived_widths(name: str, ws: list[int]) -> dict[str, int]:
  _, twin = _zoo(name)
  return {derived: ws[i] for derived, i, _ in twin.values()}


@pytest.mark.parametrize("name", _ZOO)
def test_zoo_counts_equal_the_registry_counter(name: str):
  cost, twin = _zoo(name)
  rng = np.random.default_rng(0)
  lists = [models.default_widths(name), *_WIDTH_LISTS.get(name, [])]
  for _ in range(2):
    ws = models.default_widths(name)
    for _, (_, i, prunable) in twin.items():
      if prunable:
        ws[i] = int(rng.integers(1, ws[i] + 1))
    lists.append(ws)
  assert len(twin) >= 1
  for ws in lists:
    got = cost(_derived_widths(name, ws))
    want = flops.count(name, ws, num_classes=7)
    assert (got.macs, got.params) == (want.macs, want.params), ws
    assert got.layers == want.layers


def test_zoo_widths_equal_a_retrace_of_the_built_model():
  # mobilenetv2: depthwise convs whose channels (and feature groups) follow the expansion widths.
  cost, twin = _zoo("mobilenetv2")
  ws = models.default_widths("mobilenetv2")
  rng = np.random.default_rng(3)
  for _, (_, i, prunable) in twin.items():
    if prunable:
      ws[i] = int(rng.integers(1, ws[i] + 1))
  built = nnx.eval_shape(lambda: models.get_model("mobilenetv2", ws, num_classes=7, rngs=nnx.Rngs(0)))
  want = hj.count_macs(built, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert cost(_derived_widths("mobilenetv2", ws)) == want
  assert any(r.kind == "dwconv" and r.out_ch < 96 for r in want.layers)


# ------------------------------------------------------------------------------------------------------------------
# User-style models, counted by hand.


class DepthwiseNet(nnx.Module):
  """conv 3x3 -> BN -> depthwise 3x3 -> pointwise 1x1 -> global mean -> dense, at widths (a, b)."""

  def __init__(self, a: int = 8, b: int = 6, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, a, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(a, rngs=rngs)
    self.dw = nnx.Conv(a, a, (3, 3), feature_group_count=a, rngs=rngs)
    self.pw = nnx.Conv(a, b, (1, 1), use_bias=False, rngs=rngs)
    self.head = nnx.Linear(b, 2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.pw(nnx.relu(self.dw(nnx.relu(self.bn(self.stem(x))))))
    return self.head(h.mean(axis=(1, 2)))


def _depthwise_by_hand(a: int, b: int, side: int = 16) -> tuple[int, int]:
  macs = side * side * (27 * a + 9 * a + a * b) + b * 2
  params = (27 * a + a) + 2 * a + (9 * a + a) + a * b + (2 * b + 2)
  return macs, params


def test_depthwise_by_hand_and_against_the_built_model():
  model = nnx.eval_shape(lambda: DepthwiseNet(rngs=nnx.Rngs(0)))
  x = jnp.zeros((2, 16, 16, 3))
  assert (hj.count_macs(model, x).macs, hj.count_macs(model, x).params) == _depthwise_by_hand(8, 6)
  groups = hj.derive_model_groups(model, x)
  names = {g.name for g in groups if g.prunable}
  assert names == {"stem", "pw"}
  cost = hj.cost_fn(model, x, groups=groups)
  for a, b in ((5, 6), (8, 1), (1, 3)):
    got = cost({"stem": a, "pw": b})
    assert (got.macs, got.params) == _depthwise_by_hand(a, b)
    rows = {r.name: r for r in got.layers}
    assert rows["dw"].kind == ("dwconv" if a > 1 else "conv") and rows["dw"].in_ch == rows["dw"].out_ch == a
    assert rows["dw"].macs == 16 * 16 * 9 * a and rows["bn"].kind == "bn" and rows["bn"].params == 2 * a
    # The same numbers from the model built at these widths, whose state is the pruned dense state's shape.
    built = nnx.eval_shape(lambda: DepthwiseNet(a, b, rngs=nnx.Rngs(0)))
    assert hj.count_macs(built, x) == got
    keep = {"stem": list(range(a)), "pw": list(range(b))}
    dense = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), nnx.to_pure_dict(nnx.state(model)))
    shapes = jax.tree.map(np.shape, hj.prune(dense, groups, keep).state)
    assert shapes == jax.tree.map(lambda v: tuple(v.shape), nnx.to_pure_dict(nnx.state(built)))
  # count_macs derives the groups itself.
  assert hj.count_macs(model, x, widths={"stem": 5}) == cost({"stem": 5})
  assert cost(None) == cost({}) == hj.count_macs(model, x)


class ConvZoo(nnx.Module):
  """A strided dilated conv, a grouped conv, a transposed conv, a per-pixel dense and a flatten head."""

  def __init__(self, c: int = 8, *, rngs: nnx.Rngs):
    self.strided = nnx.Conv(3, c, (3, 3), strides=(2, 2), kernel_dilation=(2, 2), padding="SAME", rngs=rngs)
    self.grouped = nnx.Conv(c, 12, (3, 3), feature_group_count=4, use_bias=False, rngs=rngs)
    self.up = nnx.ConvTranspose(12, 4, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
    self.pixel = nnx.Linear(4, 6, rngs=rngs)
    self.head = nnx.Linear(18 * 18 * 6, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.pixel(nnx.relu(self.up(nnx.relu(self.grouped(self.strided(x))))))
    return self.head(h.reshape(h.shape[0], -1))


def test_strided_dilated_grouped_transposed_and_dense_by_hand():
  model = nnx.eval_shape(lambda: ConvZoo(rngs=nnx.Rngs(0)))
  x = jnp.zeros((3, 17, 17, 3))
  c = hj.count_macs(model, x)
  rows = {r.name: r for r in c.layers}
  assert rows["strided"].out_hw == (9, 9) and rows["strided"].macs == 81 * 27 * 8
  assert rows["strided"].kernel == (3, 3) and rows["strided"].params == 27 * 8 + 8
  assert rows["grouped"].kind == "dwconv" and rows["grouped"].in_ch == 8 and rows["grouped"].out_ch == 12
  assert rows["grouped"].macs == 81 * 9 * 2 * 12 and rows["grouped"].params == 9 * 2 * 12
  assert rows["up"].kind == "conv" and rows["up"].out_hw == (18, 18)  # every output position reads a 3x3 window
  assert rows["up"].macs == 18 * 18 * 9 * 12 * 4
  assert rows["pixel"].out_hw == (18, 18) and rows["pixel"].macs == 18 * 18 * 4 * 6
  assert rows["head"].macs == 18 * 18 * 6 * 3 and rows["head"].in_ch == 18 * 18 * 6
  assert c.macs == sum(r.macs for r in c.layers) and c.params == sum(r.params for r in c.layers)
  assert c.params == sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  # The per-pixel dense's outputs reach the flatten head: a width moves 18 * 18 head rows per channel.
  groups = hj.derive_model_groups(model, x)
  assert {g.name: g.prunable for g in groups}["strided"] is False  # it feeds a grouped conv
  got = hj.cost_fn(model, x, groups=groups)({"pixel": 2, "up": 3})
  rows = {r.name: r for r in got.layers}
  assert rows["up"].macs == 18 * 18 * 9 * 12 * 3 and rows["pixel"].macs == 18 * 18 * 3 * 2
  assert rows["head"].macs == 18 * 18 * 2 * 3 and rows["head"].params == 18 * 18 * 2 * 3 + 3


def test_count_does_not_change_the_model_and_uses_batch_one():
  model = DepthwiseNet(rngs=nnx.Rngs(0))
  model.train()
  assert hj.count_macs(model, jnp.zeros((64, 16, 16, 3))) == hj.count_macs(model, jnp.zeros((1, 16, 16, 3)))
  assert model.bn.use_running_average is False
  abstract = nnx.eval_shape(lambda: DepthwiseNet(rngs=nnx.Rngs(0)))
  assert hj.count_macs(abstract, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)) == hj.count_macs(
      model, jnp.zeros((2, 16, 16, 3)))


def test_bad_input():
  model = nnx.eval_shape(lambda: DepthwiseNet(rngs=nnx.Rngs(0)))
  x = jnp.zeros((2, 16, 16, 3))
  cost = hj.cost_fn(model, x)
  with pytest.raises(ValueError, match="unknown channel group 'nope'"):
    cost({"nope": 3})
  with pytest.raises(ValueError, match=r"widths\['stem'\] = 0; expected an integer in \[1, 8\]"):
    cost({"stem": 0})
  with pytest.raises(ValueError, match=r"widths\['stem'\] = 9; expected an integer in \[1, 8\]"):
    cost({"stem": 9})
  with pytest.raises(ValueError, match=r"widths\['stem'\] must be an integer"):
    cost({"stem": 2.5})
  with pytest.raises(ValueError, match="widths must be a mapping"):
    hj.count_macs(model, x, widths=[3, 4])
  with pytest.raises(ValueError, match="example_args"):
    hj.count_macs(model)
  other = hj.derive_model_groups(nnx.eval_shape(lambda: ConvZoo(rngs=nnx.Rngs(0))), jnp.zeros((2, 17, 17, 3)))
  with pytest.raises(ValueError, match="not a leaf of the model's state"):
    hj.cost_fn(model, x, groups=other)

  class NormOnly(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.norm(x)

  with pytest.raises(ValueError, match="model NormOnly has no convolution or dense layer"):
    hj.count_macs(NormOnly(nnx.Rngs(0)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="model must be an nnx.Module"):
    hj.count_macs(lambda x: x, x)
