"""examples/user_cnns.py: CNNs outside the zoo. Their channel groups and decisions are the ones read off the
architecture by hand; pruned in one call, the thin model computes what the masked dense model computes, its counted
MACs are the reported ones and land on the target, and the plan rebuilds its state from the dense state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
from examples import user_cnns
from hsic_jax.groups import path_str
from tests._models import masked_copy

WIDTH = 8


def _images(n=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 16, 16, 3)), jnp.float32)


def _se_resnet_groups(width, blocks_per_stage, reduction):
  """The prunable groups of an SEResNet, by hand: ``{frozenset((layer, role)): size}``.

  Stage ``s``'s residual stream is one set of channels: its producer (the stem, or the first block's projection)
  and every block's conv2 -> bn2, times the SE gate (fc2's outputs), plus the shortcut add; it is read by the SE
  squeeze (fc1), by the stage's later blocks, by the next stage's first block (conv1 and the projection) or the
  head. Every block's conv1 output (read by conv2) and SE hidden width (fc1 out, read by fc2) are groups of their
  own.
  """
  groups = {}
  for s in (1, 2, 3):
    c = width * 2 ** (s - 1)
    stage = [f"stage{s}/{j}" for j in range(blocks_per_stage)]
    stream = {("stem", "out"), ("stem_bn", "out"), (f"{stage[0]}/conv1", "in")} if s == 1 else \
        {(f"{stage[0]}/proj", "out"), (f"{stage[0]}/proj_bn", "out")}
    for j, b in enumerate(stage):
      stream |= {(f"{b}/conv2", "out"), (f"{b}/bn2", "out"), (f"{b}/se/fc2", "out"), (f"{b}/se/fc1", "in")}
      if j > 0:
        stream.add((f"{b}/conv1", "in"))
      groups[frozenset({(f"{b}/conv1", "out"), (f"{b}/bn1", "out"), (f"{b}/conv2", "in")})] = c
      groups[frozenset({(f"{b}/se/fc1", "out"), (f"{b}/se/fc2", "in")})] = c // reduction
    stream |= {(f"stage{s + 1}/0/conv1", "in"), (f"stage{s + 1}/0/proj", "in")} if s < 3 else {("head", "in")}
    groups[frozenset(stream)] = c
  return groups


def _depthwise_net_groups(width):
  """The prunable groups of a DepthwiseNet, by hand: a depthwise conv passes its input channels through, so each
  pointwise conv's (or the stem's) outputs, the next depthwise conv and its BN, and the next pointwise conv's inputs
  are one group; the last block's outputs are read by the head."""
  producers = ["stem"] + [f"blocks/{j}/pw" for j in range(4)]
  bns = ["stem_bn"] + [f"blocks/{j}/pw_bn" for j in range(4)]
  sizes = [width, width, 2 * width, 2 * width, 4 * width]
  groups = {}
  for j, (p, bn, size) in enumerate(zip(producers, bns, sizes)):
    members = {(p, "out"), (bn, "out")}
    members |= {(f"blocks/{j}/dw", "out"), (f"blocks/{j}/dw_bn", "out"), (f"blocks/{j}/pw", "in")} if j < 4 else \
        {("head", "in")}
    groups[frozenset(members)] = size
  return groups


NETS = {
    "se_resnet": (lambda: user_cnns.se_resnet(num_classes=10, width=WIDTH, rngs=nnx.Rngs(0)),
                  lambda: _se_resnet_groups(WIDTH, 1, 4)),
    "se_resnet_2blocks": (lambda: user_cnns.se_resnet(num_classes=10, width=WIDTH, blocks_per_stage=2, reduction=2,
                                                      rngs=nnx.Rngs(0)),
                          lambda: _se_resnet_groups(WIDTH, 2, 2)),
    "depthwise_net": (lambda: user_cnns.depthwise_net(num_classes=10, width=WIDTH, rngs=nnx.Rngs(0)),
                      lambda: _depthwise_net_groups(WIDTH)),
}


def _layers(group):
  return frozenset((path_str(m.path[:-1]), m.role) for m in group.members)


@pytest.mark.parametrize("name", ["se_resnet", "depthwise_net",
                                  pytest.param("se_resnet_2blocks", marks=pytest.mark.slow)])
def test_groups_and_decisions_are_the_hand_derived_ones(name):
  build, expected = NETS[name]
  model, x = build(), _images()
  groups = hj.derive_model_groups(model, x)
  prunable = {_layers(g): g.size for g in groups if g.prunable}
  assert prunable == expected()
  fixed = sorted((g.name, g.note) for g in groups if not g.prunable)
  assert fixed == [("head", "network output"), ("input", "network input")]
  decs = hj.taps.decisions(model, x, groups=groups)
  assert len(decs) == len(expected())
  assert {d.group.name for d in decs} == {g.name for g in groups if g.prunable}
  for d in decs:  # a decision's consumers are its group's readers (a layer read once each here)
    assert sorted(d.consumers) == sorted(layer for layer, role in _layers(d.group) if role == "in"), d
  if name == "se_resnet":  # 3 residual streams, 3 conv1 widths, 3 SE hidden widths (8 // 4, 16 // 4, 32 // 4)
    assert sorted(d.group.size for d in decs) == [2, 4, 8, 8, 8, 16, 16, 32, 32]
  elif name == "depthwise_net":
    assert [d.name for d in decs] == ["blocks/0/pw", "blocks/1/pw", "blocks/2/pw", "blocks/3/pw", "head"]


def _pure(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize("name,method", [
    # APIB on the SE-ResNet compiles its solver for each distinct decision shape (9): 12-20 s on 2 busy cores
    pytest.param("se_resnet", "apib", marks=pytest.mark.slow),
    # The SE-ResNet is pruned end to end by the program in the default run (tests/test_user_model_program.py)
    pytest.param("se_resnet", "itpruner", marks=pytest.mark.slow),
    ("depthwise_net", "apib"), ("depthwise_net", "itpruner")])
def test_pruned_in_one_call(name, method):
  model, x = NETS[name][0](), _images()
  before = _pure(model)
  tol = 0.1  # small nets: one channel moves the MACs by a few percent
  # APIB's coarse lambda grid (8 points, then bisection) keeps the test short; the target is reached all the same
  res = hj.prune_model(model, [x[:16], x[16:]], target={"macs": 0.6}, method=method,
                       settings={"tolerance": tol, "grid": 8})
  jax.tree.map(np.testing.assert_array_equal, before, _pure(model))
  thin = res.model
  assert type(thin) is type(model)
  assert any(w.pruned < w.dense for w in res.widths.values()), res.widths
  np.testing.assert_allclose(np.asarray(thin(x)), np.asarray(masked_copy(model, res.groups, res.report["keep"])(x)),
                             rtol=1e-4, atol=1e-4)
  counted = hj.count_macs(thin, x)
  assert (counted.macs, counted.params) == (res.pruned.macs, res.pruned.params)
  target = 0.6 * res.dense.macs
  if method == "itpruner":  # a budget
    assert counted.macs <= target
  else:
    assert abs(counted.macs - target) <= tol * target, (counted.macs, target)
  # the layers' shapes follow the kept counts: the SE hidden width and a depthwise conv's group count
  if name == "se_resnet":
    se = thin.stage2[0].se
    assert se.fc1.out_features == se.fc2.in_features == res.widths["stage2/0/se/fc1"].pruned
  else:
    dw = thin.blocks[1].dw
    assert dw.feature_group_count == dw.in_features == dw.out_features == res.widths["blocks/0/pw"].pruned
  rebuilt = hj.apply_plan(nnx.to_pure_dict(nnx.state(model)), res.groups, res.plan).state
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rebuilt), _pure(thin))


def test_bad_constructor_arguments_are_named():
  with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
    user_cnns.se_resnet(width=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="reduction must be an int >= 1"):
    user_cnns.SEResNet(reduction=1.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
    user_cnns.depthwise_net(num_classes=True, rngs=nnx.Rngs(0))
