"""Tests for hsic_jax.surgery: physical channel removal checked against masking, on toy and registry models.

The oracle is the dense model with the removed channels zeroed (``mask``): zeroing every consumer slice of a
channel removes its contribution exactly, so the physically pruned model ``Model(new_widths)`` must produce the
same eval-mode logits. Parameters and BatchNorm statistics are random (a fresh init has mean 0 / var 1 and zero
biases, which would hide slicing mistakes).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice, flatten_state
from hsic_jax.surgery import PrunePlan, PruneResult, apply_plan, keep_top_k, mask, prune, round_width

# ----------------------------------------------------------------------------------------------------------------
# Toy models (also used by test_jaxpr_groups.py). Each takes a width list and declares its channel groups.


def _conv(i: int, o: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, groups: int = 1, bias: bool = True):
  return nnx.Conv(i, o, (k, k), strides=(stride, stride), padding="SAME", feature_group_count=groups, use_bias=bias,
                  rngs=rngs)


def _out(name: str, *, bias: bool = True, axis: int = 3) -> list[ChannelSlice]:
  return [ChannelSlice((name, "kernel"), axis, "out")] + ([ChannelSlice((name, "bias"), 0, "out")] if bias else [])


def _bn(name: str, offset: int = 0) -> list[ChannelSlice]:
  return [ChannelSlice((name, leaf), 0, "out", offset=offset) for leaf in ("scale", "bias", "mean", "var")]


def _in(name: str, axis: int = 2, *, offset: int = 0, spatial: int = 1) -> list[ChannelSlice]:
  return [ChannelSlice((name, "kernel"), axis, "in", offset=offset, spatial=spatial)]


def _group(name: str, size: int, members: list[ChannelSlice], idx: int, prunable: bool = True) -> ChannelGroup:
  return ChannelGroup(name, size, tuple(members), prunable=prunable, width_indices=(idx,))


class _Toy(nnx.Module):
  DEFAULT: tuple[int, ...] = ()

  def _set_widths(self, widths: Sequence[int] | None) -> tuple[int, ...]:
    self._widths = tuple(widths) if widths is not None else self.DEFAULT
    return self._widths

  @property
  def widths(self) -> list[int]:
    return list(self._widths)


class ChainNet(_Toy):
  """conv-BN-ReLU, strided conv-BN-ReLU, global mean, Dense."""

  DEFAULT = (6, 8)

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 5, rngs: nnx.Rngs):
    w = self._set_widths(widths)
    self.conv1, self.bn1 = _conv(3, w[0], 3, rngs), nnx.BatchNorm(w[0], rngs=rngs)
    self.conv2, self.bn2 = _conv(w[0], w[1], 3, rngs, stride=2), nnx.BatchNorm(w[1], rngs=rngs)
    self.fc = nnx.Linear(w[1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.fc(x.mean(axis=(1, 2)))

  def channel_groups(self) -> list[ChannelGroup]:
    w = self._widths
    return [_group("conv1", w[0], _out("conv1") + _bn("bn1") + _in("conv2"), 0),
            _group("conv2", w[1], _out("conv2") + _bn("bn2") + _in("fc", 0), 1)]


class ResidualNet(_Toy):
  """Stem, a block with a 1x1 projection shortcut, a block with an identity shortcut: the stream is prunable."""

  DEFAULT = (6, 5, 8, 7)

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 5, rngs: nnx.Rngs):
    w = self._set_widths(widths)
    self.stem, self.stem_bn = _conv(3, w[0], 3, rngs), nnx.BatchNorm(w[0], rngs=rngs)
    self.conv_a, self.bn_a = _conv(w[0], w[1], 3, rngs, bias=False), nnx.BatchNorm(w[1], rngs=rngs)
    self.conv_b, self.bn_b = _conv(w[1], w[2], 3, rngs, bias=False), nnx.BatchNorm(w[2], rngs=rngs)
    self.proj, self.bn_p = _conv(w[0], w[2], 1, rngs, bias=False), nnx.BatchNorm(w[2], rngs=rngs)
    self.conv_c, self.bn_c = _conv(w[2], w[3], 3, rngs, bias=False), nnx.BatchNorm(w[3], rngs=rngs)
    self.conv_d, self.bn_d = _conv(w[3], w[2], 3, rngs, bias=False), nnx.BatchNorm(w[2], rngs=rngs)
    self.fc = nnx.Linear(w[2], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem(x)))
    h = nnx.relu(self.bn_a(self.conv_a(x)))
    x = nnx.relu(self.bn_b(self.conv_b(h)) + self.bn_p(self.proj(x)))
    h = nnx.relu(self.bn_c(self.conv_c(x)))
    x = nnx.relu(self.bn_d(self.conv_d(h)) + x)
    return self.fc(x.mean(axis=(1, 2)))

  def channel_groups(self) -> list[ChannelGroup]:
    w = self._widths
    return [
        _group("stem", w[0], _out("stem") + _bn("stem_bn") + _in("conv_a") + _in("proj"), 0),
        _group("mid1", w[1], _out("conv_a", bias=False) + _bn("bn_a") + _in("conv_b"), 1),
        _group("stream", w[2], _out("conv_b", bias=False) + _bn("bn_b") + _out("proj", bias=False) + _bn("bn_p")
               + _in("conv_c") + _out("conv_d", bias=False) + _bn("bn_d") + _in("fc", 0), 2),
        _group("mid2", w[3], _out("conv_c", bias=False) + _bn("bn_c") + _in("conv_d"), 3),
    ]


class ConcatNet(_Toy):
  """Two branches concatenated on the channel axis, a BatchNorm over the concatenation, a 1x1 mixing conv."""

  DEFAULT = (6, 4, 5, 7)

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 5, rngs: nnx.Rngs):
    w = self._set_widths(widths)
    self.stem, self.stem_bn = _conv(3, w[0], 3, rngs), nnx.BatchNorm(w[0], rngs=rngs)
    self.b1, self.b1_bn = _conv(w[0], w[1], 1, rngs), nnx.BatchNorm(w[1], rngs=rngs)
    self.b2, self.b2_bn = _conv(w[0], w[2], 3, rngs), nnx.BatchNorm(w[2], rngs=rngs)
    self.cat_bn = nnx.BatchNorm(w[1] + w[2], rngs=rngs)
    self.mix, self.mix_bn = _conv(w[1] + w[2], w[3], 1, rngs), nnx.BatchNorm(w[3], rngs=rngs)
    self.fc = nnx.Linear(w[3], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem(x)))
    a = nnx.relu(self.b1_bn(self.b1(x)))
    b = nnx.relu(self.b2_bn(self.b2(x)))
    x = nnx.relu(self.cat_bn(jnp.concatenate([a, b], axis=-1)))
    x = nnx.relu(self.mix_bn(self.mix(x)))
    return self.fc(x.mean(axis=(1, 2)))

  def channel_groups(self) -> list[ChannelGroup]:
    w = self._widths
    return [
        _group("stem", w[0], _out("stem") + _bn("stem_bn") + _in("b1") + _in("b2"), 0),
        _group("b1", w[1], _out("b1") + _bn("b1_bn") + _bn("cat_bn") + _in("mix"), 1),
        _group("b2", w[2], _out("b2") + _bn("b2_bn") + _bn("cat_bn", w[1]) + _in("mix", offset=w[1]), 2),
        _group("mix", w[3], _out("mix") + _bn("mix_bn") + _in("fc", 0), 3),
    ]


class SeparableNet(_Toy):
  """Stem, depthwise 3x3 conv (channel i in = channel i out), pointwise 1x1 conv."""

  DEFAULT = (6, 8)

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 5, rngs: nnx.Rngs):
    w = self._set_widths(widths)
    self.stem, self.stem_bn = _conv(3, w[0], 3, rngs, bias=False), nnx.BatchNorm(w[0], rngs=rngs)
    self.dw, self.dw_bn = _conv(w[0], w[0], 3, rngs, groups=w[0]), nnx.BatchNorm(w[0], rngs=rngs)
    self.pw, self.pw_bn = _conv(w[0], w[1], 1, rngs, bias=False), nnx.BatchNorm(w[1], rngs=rngs)
    self.fc = nnx.Linear(w[1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem(x)))
    x = nnx.relu(self.dw_bn(self.dw(x)))
    x = nnx.relu(self.pw_bn(self.pw(x)))
    return self.fc(x.mean(axis=(1, 2)))

  def channel_groups(self) -> list[ChannelGroup]:
    w = self._widths
    return [_group("stem", w[0], _out("stem", bias=False) + _bn("stem_bn") + _out("dw") + _bn("dw_bn") + _in("pw"), 0),
            _group("pw", w[1], _out("pw", bias=False) + _bn("pw_bn") + _in("fc", 0), 1)]


class FlattenNet(_Toy):
  """conv-BN-ReLU, 2x2 max-pool, channels-last flatten, Dense-BN1d-ReLU, Dense (input 8x8)."""

  DEFAULT = (6, 9)

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 5, rngs: nnx.Rngs):
    w = self._set_widths(widths)
    self.conv, self.bn = _conv(3, w[0], 3, rngs), nnx.BatchNorm(w[0], rngs=rngs)
    self.fc1, self.bn1d = nnx.Linear(16 * w[0], w[1], rngs=rngs), nnx.BatchNorm(w[1], rngs=rngs)
    self.fc2 = nnx.Linear(w[1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.fc2(nnx.relu(self.bn1d(self.fc1(x))))

  def channel_groups(self) -> list[ChannelGroup]:
    w = self._widths
    return [_group("conv", w[0], _out("conv") + _bn("bn") + _in("fc1", 0, spatial=16), 0),
            _group("hidden", w[1], _out("fc1", axis=1) + _bn("bn1d") + _in("fc2", 0), 1)]


class ConcatFlattenNet(_Toy):
  """Two branches concatenated, 2x2 average pool, flatten, Dense: offsets and spatial factors together."""

  DEFAULT = (5, 4, 6)

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 5, rngs: nnx.Rngs):
    w = self._set_widths(widths)
    self.stem = _conv(3, w[0], 3, rngs)
    self.b1 = _conv(w[0], w[1], 1, rngs)
    self.b2 = _conv(w[0], w[2], 3, rngs)
    self.fc = nnx.Linear(16 * (w[1] + w[2]), num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem(x))
    x = jnp.concatenate([nnx.relu(self.b1(x)), jnp.tanh(self.b2(x))], axis=-1)
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    return self.fc(x.reshape(x.shape[0], -1))

  def channel_groups(self) -> list[ChannelGroup]:
    w = self._widths
    return [_group("stem", w[0], _out("stem") + _in("b1") + _in("b2"), 0),
            _group("b1", w[1], _out("b1") + _in("fc", 0, spatial=16), 1),
            _group("b2", w[2], _out("b2") + _in("fc", 0, offset=w[1], spatial=16), 2)]


# name -> (constructor(widths, rngs=...), input (h, w)).
TOYS: dict[str, tuple[Callable[..., nnx.Module], tuple[int, int]]] = {
    "chain": (ChainNet, (8, 8)),
    "residual": (ResidualNet, (8, 8)),
    "concat": (ConcatNet, (8, 8)),
    "separable": (SeparableNet, (8, 8)),
    "flatten": (FlattenNet, (8, 8)),
    "concat_flatten": (ConcatFlattenNet, (8, 8)),
}

# ----------------------------------------------------------------------------------------------------------------
# Helpers.


def abstract_model(build: Callable[[], nnx.Module]) -> nnx.Module:
  """The model with shape-only parameters (no initialisation cost), switched to evaluation mode."""
  model = nnx.eval_shape(build)
  model.eval()
  return model


def random_state(model: nnx.Module, seed: int) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """Graphdef and a pure state of random values: He-scaled kernels, random biases and BatchNorm statistics."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def fill(kp: Any, leaf: Any) -> Any:
    name = str(kp[-1].key) if hasattr(kp[-1], "key") else str(kp[-1])
    shape, dtype = leaf.shape, leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not jnp.issubdtype(dtype, jnp.floating):
      return jnp.zeros(shape, dtype)
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:  # biases, BatchNorm bias and mean
      value = rng.normal(size=shape) * 0.3
    return jnp.asarray(value, dtype)

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
  return graphdef, pure


def random_keep(groups: Sequence[ChannelGroup], seed: int, *, only_prunable: bool = True) -> dict[str, np.ndarray]:
  """A random non-empty, strictly smaller (where possible) kept set for each prunable group."""
  rng = np.random.default_rng(seed)
  keep = {}
  for g in groups:
    if g.prunable or not only_prunable:
      k = int(rng.integers(1, max(g.size, 2)))
      keep[g.name] = np.sort(rng.choice(g.size, size=min(k, g.size), replace=False))
  return keep


# id(graphdef) -> (graphdef, compiled forward). The graphdef is kept so that its id cannot be reused by another
# object after it is freed, which would hand a later model the compiled forward of an earlier one.
_FORWARDS: dict[int, tuple[nnx.GraphDef, Callable[..., jax.Array]]] = {}


def forward(graphdef: nnx.GraphDef, state: Any, x: jax.Array) -> np.ndarray:
  """Eval-mode logits, compiled once per graphdef (XLA backend optimisations off: compiling dominates here)."""
  entry = _FORWARDS.get(id(graphdef))
  if entry is None or entry[0] is not graphdef:
    lowered = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x)).lower(state, x)
    entry = _FORWARDS[id(graphdef)] = (graphdef, lowered.compile(
        compiler_options={"xla_backend_optimization_level": 0}))
  return np.asarray(entry[1](state, x))


def shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def assert_parity(build: Callable[[Sequence[int] | None], nnx.Module], hw: tuple[int, int], seed: int,
                  groups: Sequence[ChannelGroup] | None = None) -> None:
  """Pruned ``Model(new_widths)`` == masked dense model, and the pruned state has ``Model(new_widths)``'s shapes."""
  dense_model = abstract_model(lambda: build(None))
  graphdef, dense = random_state(dense_model, seed)
  groups = dense_model.channel_groups() if groups is None else groups
  keep = random_keep(groups, seed)
  assert keep, "the model has no prunable group"
  res = prune(dense, groups, keep, widths=dense_model.widths)
  masked = mask(dense, groups, keep)
  pruned_model = abstract_model(lambda: build(res.widths))
  pruned_graphdef, pruned_abstract = nnx.split(pruned_model)
  expected = nnx.to_pure_dict(pruned_abstract)
  assert jax.tree.structure(res.state) == jax.tree.structure(expected)
  assert shapes(res.state) == shapes(expected)
  x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(2, *hw, 3)), jnp.float32)
  y_mask = forward(graphdef, masked, x)
  y_prune = forward(pruned_graphdef, res.state, x)
  scale = max(1.0, float(np.abs(y_mask).max()))
  np.testing.assert_allclose(y_prune, y_mask, rtol=1e-4, atol=1e-4 * scale)
  # The test can fail: pruning changed the function (else slicing mistakes could hide).
  y_dense = forward(graphdef, dense, x)
  assert not np.allclose(y_dense, y_mask, atol=1e-4 * scale)


# ----------------------------------------------------------------------------------------------------------------
# Parity on toy models.


@pytest.mark.parametrize("name", sorted(TOYS))
@pytest.mark.parametrize("seed", [0, 1])
def test_toy_parity(name: str, seed: int) -> None:
  cls, hw = TOYS[name]
  assert_parity(lambda w: cls(w, rngs=nnx.Rngs(0)), hw, seed)


def test_toy_parity_residual_stream_alone() -> None:
  """Cutting only the residual stream (projection + identity shortcut) keeps every block consistent."""
  model = abstract_model(lambda: ResidualNet(rngs=nnx.Rngs(0)))
  graphdef, dense = random_state(model, 3)
  groups = model.channel_groups()
  keep = {"stream": np.array([1, 4, 6])}
  res = prune(dense, groups, keep, widths=model.widths)
  assert res.widths == [6, 5, 3, 7]
  pruned = abstract_model(lambda: ResidualNet(res.widths, rngs=nnx.Rngs(0)))
  g2, _ = nnx.split(pruned)
  x = jnp.ones((2, 8, 8, 3))
  np.testing.assert_allclose(forward(g2, res.state, x), forward(graphdef, mask(dense, groups, keep), x),
                             rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Exact slicing on a hand-built state (an oracle independent of the forward pass).


def test_offsets_and_spatial_select_the_documented_positions() -> None:
  # A Dense kernel reading a channels-last flatten of concat([a (3 ch), b (2 ch)]) over 4 positions: row
  # p * 5 + offset + c. Group "a" keeps [0, 2], group "b" keeps [1]; a conv kernel carries "a" on its out axis.
  rows = np.arange(20)
  state = {"fc": {"kernel": np.stack([rows, -rows], axis=1).astype(np.float32)},
           "conv": {"kernel": np.arange(2 * 3).reshape(1, 1, 2, 3).astype(np.float32)}}
  groups = [ChannelGroup("a", 3, (ChannelSlice(("conv", "kernel"), 3, "out"),
                                  ChannelSlice(("fc", "kernel"), 0, "in", offset=0, spatial=4))),
            ChannelGroup("b", 2, (ChannelSlice(("fc", "kernel"), 0, "in", offset=3, spatial=4),))]
  res = prune(state, groups, {"a": [2, 0], "b": [1]})  # unsorted input is sorted
  assert isinstance(res, PruneResult)
  expected_rows = [p * 5 + c for p in range(4) for c in (0, 2, 4)]
  np.testing.assert_array_equal(res.state["fc"]["kernel"][:, 0], expected_rows)
  np.testing.assert_array_equal(res.state["conv"]["kernel"], state["conv"]["kernel"][..., [0, 2]])
  assert res.plan.keep == {"a": (0, 2), "b": (1,)}
  masked = mask(state, groups, {"a": [0, 2], "b": [1]})
  zero_rows = [p * 5 + c for p in range(4) for c in (1, 3)]
  assert np.all(masked["fc"]["kernel"][zero_rows] == 0)
  assert np.all(masked["fc"]["kernel"][expected_rows[1:]] != 0)
  assert np.all(masked["conv"]["kernel"][..., 1] == 0)


def test_two_groups_on_two_axes_of_one_leaf() -> None:
  state = {"conv": {"kernel": np.arange(3 * 4, dtype=np.float32).reshape(1, 1, 3, 4)}}
  groups = [ChannelGroup("in", 3, (ChannelSlice(("conv", "kernel"), 2, "in"),)),
            ChannelGroup("out", 4, (ChannelSlice(("conv", "kernel"), -1, "out"),))]
  res = prune(state, groups, {"in": [0, 2], "out": [1, 3]})
  np.testing.assert_array_equal(res.state["conv"]["kernel"][0, 0], [[1, 3], [9, 11]])


def test_inputs_are_not_modified_and_kinds_are_kept() -> None:
  model = abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0)))
  _, dense = random_state(model, 0)
  before = jax.tree.map(np.array, dense)
  groups = model.channel_groups()
  keep = {"conv1": [0, 3], "conv2": [1, 2, 7]}
  res = prune(dense, groups, keep)
  mask(dense, groups, keep)
  jax.tree.map(np.testing.assert_array_equal, dense, before)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(res.state))
  numpy_res = prune(jax.tree.map(np.asarray, dense), groups, keep)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(numpy_res.state))
  assert res.widths is None and res.opt_state is None


def test_nnx_state_input_gives_nnx_state() -> None:
  graphdef, pure = random_state(abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0))), 0)
  model = nnx.merge(graphdef, pure)
  state = nnx.state(model)
  groups = model.channel_groups()
  keep = {"conv1": [1, 2, 5]}
  res = prune(state, groups, keep, widths=model.widths)
  assert isinstance(res.state, nnx.State)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(res.state), prune(pure, groups, keep).state)
  assert nnx.state(model)["conv1"]["kernel"].shape == (3, 3, 3, 6)  # the model is untouched
  pruned = abstract_model(lambda: ChainNet(res.widths, rngs=nnx.Rngs(1)))
  nnx.update(pruned, res.state)
  assert pruned.conv1.kernel.shape == (3, 3, 3, 3) and pruned.conv2.kernel.shape == (3, 3, 3, 8)
  assert isinstance(pruned.conv1.kernel[...], jax.Array)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer state.


def _overlay(state: dict[str, Any], sub: Any) -> dict[str, Any]:
  """A numpy copy of ``state`` with the leaves of ``sub`` (a subtree with state paths) written over it."""
  out = jax.tree.map(np.array, state)
  for path, leaf in flatten_state(sub).items():
    node = out
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = np.asarray(leaf)
  return out


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


@pytest.mark.parametrize("make_opt, n_moments", [(lambda: optax.sgd(0.1, momentum=0.9), 1),
                                                 (lambda: optax.adamw(1e-3), 2)], ids=["sgd_momentum", "adamw"])
def test_opt_state_is_cut_like_the_params(make_opt: Callable[[], optax.GradientTransformation],
                                          n_moments: int) -> None:
  model = abstract_model(lambda: ResidualNet(rngs=nnx.Rngs(0)))
  graphdef, dense = random_state(model, 0)
  params = nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, dense), nnx.Param))  # no BatchNorm statistics
  opt = make_opt()
  treedef = jax.tree.structure(params)

  def is_moment(n: Any) -> bool:
    return isinstance(n, dict) and jax.tree.structure(n) == treedef

  # Distinct random moments (a fresh init is all zeros, which any slice would reproduce) and a non-zero count.
  # numpy draws: jax.random (optax.tree.random_like) would compile once per leaf shape.
  rng = np.random.default_rng(0)
  opt_state = jax.tree.map(
      lambda n: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), n) if is_moment(n) else n,
      opt.init(params), is_leaf=is_moment)
  if optax.tree.get_all_with_path(opt_state, "count"):
    opt_state = optax.tree.set(opt_state, count=jnp.asarray(7, jnp.int32))
  groups = model.channel_groups()
  keep = random_keep(groups, 5)
  res = prune(dense, groups, keep, widths=model.widths, opt_state=opt_state)

  pruned_graphdef, _ = nnx.split(abstract_model(lambda: ResidualNet(res.widths, rngs=nnx.Rngs(0))))
  fresh = opt.init(nnx.to_pure_dict(nnx.state(nnx.merge(pruned_graphdef, res.state), nnx.Param)))
  assert jax.tree.structure(res.opt_state) == jax.tree.structure(fresh)
  assert shapes(res.opt_state) == shapes(fresh)
  old_moments = jax.tree.leaves(opt_state, is_leaf=is_moment)
  new_moments = jax.tree.leaves(res.opt_state, is_leaf=lambda n: isinstance(n, dict))
  old_moments = [m for m in old_moments if is_moment(m)]
  new_moments = [m for m in new_moments if isinstance(m, dict)]
  assert len(old_moments) == len(new_moments) == n_moments
  for old, new in zip(old_moments, new_moments):
    expected = prune(_overlay(dense, old), groups, keep).state  # the moment laid out as a state, cut alike
    for path, leaf in flatten_state(new).items():
      np.testing.assert_array_equal(np.asarray(leaf), _get(expected, path))
  for _, count in optax.tree.get_all_with_path(res.opt_state, "count"):
    assert int(count) == 7


def test_nnx_optimizer_state_is_cut() -> None:
  graphdef, pure = random_state(abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0))), 0)
  model = nnx.merge(graphdef, pure)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  res = prune(nnx.state(model), model.channel_groups(), {"conv1": [0, 4]}, opt_state=nnx.state(optimizer))
  moments = nnx.to_pure_dict(res.opt_state)["opt_state"][0]
  for name in ("mu", "nu"):
    assert moments[name]["conv1"]["kernel"].shape == (3, 3, 3, 2)
    assert moments[name]["conv2"]["kernel"].shape == (3, 3, 2, 8)
    assert moments[name]["bn1"]["scale"].shape == (2,)
  assert nnx.state(optimizer)["opt_state"][0]["mu"]["conv1"]["kernel"].shape == (3, 3, 3, 6)  # input untouched


def _small_state(fc_out: int) -> tuple[dict[str, Any], list[ChannelGroup]]:
  """conv (3 -> 8 channels) feeding fc (8 -> fc_out), plus an embedding (5, 4) that no group touches."""
  rng = np.random.default_rng(0)
  state = {"conv": {"kernel": rng.normal(size=(3, 3, 3, 8)), "bias": rng.normal(size=8)},
           "fc": {"kernel": rng.normal(size=(8, fc_out)), "bias": rng.normal(size=fc_out)},
           "emb": {"table": rng.normal(size=(5, 4))}}
  state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state)
  group = ChannelGroup("conv", 8, (ChannelSlice(("conv", "kernel"), 3, "out"), ChannelSlice(("conv", "bias"), 0, "out"),
                                   ChannelSlice(("fc", "kernel"), 0, "in")), width_indices=(0,))
  return state, [group]


def _random_moments(opt_state: Any) -> Any:
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype) if a.ndim else a, opt_state)


@pytest.mark.parametrize("make_opt", [lambda: optax.adafactor(1e-3),
                                      lambda: optax.adafactor(1e-3, min_dim_size_to_factor=4),
                                      lambda: optax.sgd(0.1, momentum=0.9), lambda: optax.adam(1e-3)],
                         ids=["adafactor", "adafactor_factored_emb", "sgd_momentum", "adam"])
def test_opt_state_whose_subtrees_partly_mirror_the_params_is_cut(make_opt: Callable[[], Any]) -> None:
  # Adafactor keeps v of the parameter's shape for small parameters and (1,) placeholders in v_row / v_col; with
  # min_dim_size_to_factor=4 the untouched (5, 4) embedding is factored, so its v is a (1,) placeholder among the
  # mirrored leaves of v. Every mirrored leaf is cut, and the pruned model's first optimizer step runs.
  state, groups = _small_state(fc_out=3)  # fc (8, 3): 3 < 4, never factored
  opt = make_opt()
  opt_state = _random_moments(opt.init(state))
  keep = {"conv": [0, 2, 5]}
  res = prune(state, groups, keep, opt_state=opt_state)
  fresh = opt.init(res.state)
  assert jax.tree.structure(res.opt_state) == jax.tree.structure(fresh)
  assert shapes(res.opt_state) == shapes(fresh)
  before = flatten_state(opt_state)
  checked = 0
  for path, leaf in flatten_state(res.opt_state).items():  # mirrored leaves hold the kept channels' moments
    old = np.asarray(before[path])
    if path[-2:] == ("conv", "kernel") and old.shape == (3, 3, 3, 8):
      np.testing.assert_array_equal(np.asarray(leaf), old[..., keep["conv"]])
      checked += 1
    elif path[-2:] == ("fc", "kernel") and old.shape == (8, 3):
      np.testing.assert_array_equal(np.asarray(leaf), old[keep["conv"]])
      checked += 1
    elif path[-2:] == ("emb", "table"):
      np.testing.assert_array_equal(np.asarray(leaf), old)  # untouched
  assert checked >= 2
  grads = jax.tree.map(jnp.ones_like, res.state)
  updates, _ = opt.update(grads, res.opt_state, res.state)
  assert shapes(updates) == shapes(res.state)


def test_factored_moments_of_a_cut_axis_are_refused() -> None:
  # fc (8, 6) is factored (both sizes >= 4): v_row (6,) averages over the cut input axis (kept), v_col (8,) is
  # indexed by it and has no per-channel layout that surgery can know: refused, naming opt_state and the leaf.
  state, groups = _small_state(fc_out=6)
  opt = optax.adafactor(1e-3, min_dim_size_to_factor=4)
  opt_state = opt.init(state)
  with pytest.raises(ValueError, match=r"^opt_state leaf '0/v_col/fc/kernel' has shape \(8,\), which has the length "
                     r"8 of axis 0 of parameter 'fc/kernel' \(8, 6\) that the pruning cuts to 3.*opt_state=None"):
    prune(state, groups, {"conv": [0, 2, 5]}, opt_state=opt_state)
  # Keeping every channel cuts nothing, and the state passes through.
  res = prune(state, groups, {"conv": list(range(8))}, opt_state=opt_state)
  assert shapes(res.opt_state) == shapes(opt_state)


# ----------------------------------------------------------------------------------------------------------------
# Plans.


def test_plan_json_round_trip_and_apply_plan_equals_prune() -> None:
  model = abstract_model(lambda: ConcatNet(rngs=nnx.Rngs(0)))
  _, dense = random_state(model, 0)
  groups = model.channel_groups()
  keep = random_keep(groups, 2)
  res = prune(dense, groups, keep, widths=model.widths)
  text = res.plan.to_json()
  json.loads(text)
  plan = PrunePlan.from_json(text)
  assert plan == res.plan
  assert plan.new_widths == tuple(res.widths)
  again = apply_plan(dense, groups, plan)
  assert again.widths == res.widths
  jax.tree.map(np.testing.assert_array_equal, again.state, res.state)


def test_apply_plan_rejects_other_groups() -> None:
  model = abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0)))
  _, dense = random_state(model, 0)
  groups = model.channel_groups()
  plan = prune(dense, groups, {"conv1": [0, 1]}, widths=model.widths).plan
  with pytest.raises(ValueError, match="plan group 'conv1'"):
    apply_plan(dense, [dataclasses.replace(groups[0], name="other"), groups[1]], plan)
  with pytest.raises(ValueError, match="had 6 channels"):
    apply_plan(dense, [dataclasses.replace(groups[0], size=5), groups[1]], plan)
  with pytest.raises(ValueError, match="PrunePlan JSON"):
    PrunePlan.from_json('{"format": 1}')
  with pytest.raises(ValueError, match="^plan format 99 is not supported"):
    PrunePlan.from_json('{"format": 99, "groups": []}')
  with pytest.raises(ValueError, match=r"^the plan's group sizes must be >= 1, got \{'a': 0\}"):
    PrunePlan.from_json('{"format": 1, "groups": [{"name": "a", "size": 0, "keep": []}], "widths": null, '
                        '"new_widths": null}')
  for bad in ('{"format": 1, "groups": [{"name": "a", "size": "six", "keep": [0]}], "widths": null, '
              '"new_widths": null}',
              '[1, 2]', 'not json'):
    with pytest.raises(ValueError, match="is not a PrunePlan JSON"):
      PrunePlan.from_json(bad)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.fixture(scope="module")
def chain() -> tuple[dict[str, Any], list[ChannelGroup], list[int]]:
  model = abstract_model(lambda: ChainNet(rngs=nnx.Rngs(0)))
  return random_state(model, 0)[1], model.channel_groups(), model.widths


@pytest.mark.parametrize("keep, match", [
    ({"conv1": []}, "never emptied"),
    ({"conv1": [0, 0, 1]}, "repeats indices \\[0\\]"),
    ({"conv1": [0, 6]}, "out of range; expected 0 <= i < 6"),
    ({"conv1": [-1]}, "out of range"),
    ({"nope": [0]}, "unknown group 'nope'; expected one of \\['conv1', 'conv2'\\]"),
    ({"conv1": [[0, 1]]}, "1-D"),
    ({"conv1": [0.5]}, "integer"),
    ({"conv1": np.ones(6, bool)}, "boolean mask"),
    ({"conv1": ["a"]}, "integer channel indices"),
    ({"conv1": [0, np.nan]}, "integer channel indices"),
])
def test_bad_keep_is_rejected(chain: Any, keep: dict[str, Any], match: str) -> None:
  state, groups, widths = chain
  with pytest.raises(ValueError, match=match):
    prune(state, groups, keep, widths=widths)
  with pytest.raises(ValueError, match=match):
    mask(state, groups, keep)


def test_bad_keep_and_groups_arguments_are_rejected(chain: Any) -> None:
  state, groups, widths = chain
  for keep, match in ((None, r"^keep must be a mapping from group name to kept channel indices.*got NoneType$"),
                      ([("conv1", [0, 1])], r"^keep must be a mapping .*got list \(dict\(pairs\)"),
                      ({"conv1": [0, 1e20]}, r"^keep\['conv1'\] has indices \[1e\+20\] out of range; expected "
                                             r"0 <= i < 6$"),
                      ({"conv1": [0, 10**20]}, r"^keep\['conv1'\] has indices \[100000000000000000000\] out of "
                                               r"range"),
                      ({"conv1": [0, -3.0]}, r"^keep\['conv1'\] has indices \[-3\] out of range")):
    with pytest.raises(ValueError, match=match):
      prune(state, groups, keep, widths=widths)
    with pytest.raises(ValueError, match=match):
      mask(state, groups, keep)
  for bad, match in ((None, r"^groups must be a sequence of ChannelGroup .*got NoneType$"),
                     (groups[0], r"^groups must be a sequence of ChannelGroup .*got ChannelGroup$"),
                     ([groups[0], ("conv2", 8)], r"^groups\[1\] must be a ChannelGroup, got tuple$")):
    with pytest.raises(ValueError, match=match):
      prune(state, bad, {"conv1": [0]})
    with pytest.raises(ValueError, match=match):
      mask(state, bad, {"conv1": [0]})
  plan = prune(state, groups, {"conv1": [0, 1]}, widths=widths).plan
  with pytest.raises(ValueError, match=r"^groups must be a sequence of ChannelGroup"):
    apply_plan(state, None, plan)
  with pytest.raises(ValueError, match=r"^plan must be a PrunePlan"):
    apply_plan(state, groups, plan.to_json())
  # Any iterable of groups works (it is read twice: a generator was exhausted after the first pass).
  assert prune(state, (g for g in groups), {"conv1": [0, 1]}, widths=widths).widths == [2, 8]


def test_widths_cannot_follow_a_cut_group_without_width_indices(chain: Any) -> None:
  # Derived groups (derive_groups) have no width_indices: the width list would come back dense for the cut group.
  state, groups, widths = chain
  derived = [dataclasses.replace(g, width_indices=()) for g in groups]
  with pytest.raises(ValueError, match=r"^widths cannot follow the cut of group 'conv1' \(6 -> 2 channels\): the "
                     r"group has no width_indices .*pass widths=None"):
    prune(state, derived, {"conv1": [0, 3]}, widths=widths)
  assert prune(state, derived, {"conv1": [0, 3]}).widths is None  # without widths the cut is fine
  assert prune(state, derived, {"conv1": list(range(6))}, widths=widths).widths == widths  # nothing cut


def test_unsorted_keep_is_sorted(chain: Any) -> None:
  state, groups, _ = chain
  a = prune(state, groups, {"conv1": [4, 1, 2]})
  b = prune(state, groups, {"conv1": np.array([1, 2, 4])})
  jax.tree.map(np.testing.assert_array_equal, a.state, b.state)
  assert a.plan.keep["conv1"] == (1, 2, 4)


def test_state_of_another_model_is_rejected(chain: Any) -> None:
  state, groups, widths = chain
  small = prune(state, groups, {"conv1": [0, 1, 2]}).state
  with pytest.raises(ValueError, match="group 'conv1' has 6 channels.*expected at least 6"):
    prune(small, groups, {"conv2": [0]})
  bigger = [dataclasses.replace(groups[0], size=4), groups[1]]
  with pytest.raises(ValueError, match="group 'conv1' has 4 channels but member .* has length 6; expected 4"):
    prune(state, bigger, {"conv2": [0]})
  renamed = {("x" if k == "conv1" else k): v for k, v in state.items()}
  with pytest.raises(ValueError, match="member path 'conv1/kernel' is not in the state"):
    prune(renamed, groups, {"conv2": [0]})
  with pytest.raises(ValueError, match="widths\\[0\\] is 5"):
    prune(state, groups, {"conv1": [0]}, widths=[5, 8])
  # A width list that disagrees with a group left uncut, or is too short for one, is refused as well.
  with pytest.raises(ValueError, match="widths\\[1\\] is 9 but group 'conv2'"):
    prune(state, groups, {"conv1": [0]}, widths=[6, 9])
  with pytest.raises(ValueError, match="group 'conv2' sets width index 1, but widths has 1 entries"):
    prune(state, groups, {"conv1": [0]}, widths=[6])
  bad_axis = [dataclasses.replace(groups[0], members=(ChannelSlice(("conv1", "kernel"), 4, "out"),))]
  with pytest.raises(ValueError, match="no axis 4"):
    prune(state, bad_axis, {"conv1": [0]})


def test_overlapping_groups_and_fixed_groups_are_rejected(chain: Any) -> None:
  state, groups, _ = chain
  clash = ChannelGroup("clash", 6, (ChannelSlice(("conv1", "kernel"), 3, "out"),))
  with pytest.raises(ValueError, match="both index positions of 'conv1/kernel'"):
    prune(state, [*groups, clash], {"conv1": [0]})
  fixed = [dataclasses.replace(groups[0], prunable=False, note="network input"), groups[1]]
  with pytest.raises(ValueError, match="'conv1' is not prunable \\(network input\\)"):
    prune(state, fixed, {"conv1": [0]})
  prune(state, fixed, {"conv1": list(range(6))})  # keeping everything is fine


# ----------------------------------------------------------------------------------------------------------------
# Rounding.


def test_round_width() -> None:
  assert [round_width(k, 64, multiple=8) for k in (0, 1, 8, 9, 63, 64, 100)] == [8, 8, 8, 16, 64, 64, 64]
  assert round_width(5, 200, multiple=128) == 128
  assert round_width(129, 200, multiple=128) == 200  # capped at the group size
  assert round_width(3, 10) == 3
  with pytest.raises(ValueError, match="multiple must be >= 1"):
    round_width(3, 10, multiple=0)


def test_keep_top_k() -> None:
  scores = np.array([0.3, 0.9, 0.1, 0.9, 0.5, 0.0, 0.7, 0.2, 0.8, 0.4])
  np.testing.assert_array_equal(keep_top_k(scores, 3), [1, 3, 8])
  np.testing.assert_array_equal(keep_top_k(scores, 3, multiple=4), [1, 3, 6, 8])
  np.testing.assert_array_equal(keep_top_k(scores, 0), [1])  # never empty
  np.testing.assert_array_equal(keep_top_k(scores, 9, multiple=8), np.arange(10))
  np.testing.assert_array_equal(keep_top_k([1.0, 1.0, 1.0], 2), [0, 1])  # ties go to the lower index
  with pytest.raises(ValueError, match="finite"):
    keep_top_k([1.0, np.nan], 1)


def test_rounded_keep_prunes_to_multiples(chain: Any) -> None:
  state, groups, widths = chain
  rng = np.random.default_rng(0)
  keep = {g.name: keep_top_k(rng.normal(size=g.size), 3, multiple=4) for g in groups}
  res = prune(state, groups, keep, widths=widths)
  assert res.widths == [4, 4]


# ----------------------------------------------------------------------------------------------------------------
# Registry models.


def _registry() -> Any:
  try:
    import models  # noqa: PLC0415 (optional: written by another engineer)
  except ImportError as e:
    pytest.skip(f"the models package cannot be imported yet ({e})")
  if not hasattr(models, "MODELS") or not hasattr(models, "get_model"):
    pytest.skip("the models package has no registry (MODELS / get_model) yet")
  return models


def registry_names() -> list[str]:
  try:
    import models  # noqa: PLC0415
    return sorted(models.MODELS)
  except (ImportError, AttributeError):
    return ["<no registry>"]


def registry_input(models: Any, name: str) -> tuple[int, int]:
  h, w = models.input_size(name) if hasattr(models, "input_size") else (32, 32)
  return (min(h, 64), min(w, 64))  # ImageNet models at 64x64 keep the test fast


# Deep variants of one architecture: the same code as resnet20/56, compiled for longer.
SLOW_MODELS = {"resnet32", "resnet44", "resnet110"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n
                                  for n in registry_names()])
def test_registry_parity(name: str) -> None:
  models = _registry()
  assert_parity(lambda w: models.get_model(name, w, rngs=nnx.Rngs(0)), registry_input(models, name), seed=0)


def test_opt_state_leaf_shaped_unlike_its_parameter_is_refused() -> None:
  # A momentum of a conv kernel with 7 output channels where the parameter has 8 (the optimizer state of another
  # model): no channel of it can be matched to the kept ones, so it is refused, naming the leaf, not passed through.
  state, groups = _small_state(fc_out=3)
  opt_state = optax.sgd(0.1, momentum=0.9).init(state)
  bad = jax.tree.map(lambda a: a, opt_state)
  bad[0].trace["conv"]["kernel"] = jnp.zeros((3, 3, 3, 7), jnp.float32)
  with pytest.raises(ValueError, match=r"^opt_state leaf '0/trace/conv/kernel' has shape \(3, 3, 3, 7\), unlike the "
                     r"shape \(3, 3, 3, 8\) of its parameter 'conv/kernel'.*opt_state=None"):
    prune(state, groups, {"conv": [0, 2, 5]}, opt_state=bad)
  # Lengths of 1 (a statistic kept with its reduced axes) stay allowed, as before.
  ok = jax.tree.map(lambda a: a, opt_state)
  ok[0].trace["conv"]["kernel"] = jnp.zeros((1, 1, 1, 1), jnp.float32)
  res = prune(state, groups, {"conv": [0, 2, 5]}, opt_state=ok)
  assert res.opt_state[0].trace["conv"]["kernel"].shape == (1, 1, 1, 1)


def test_plans_of_two_rounds_compose_into_one_plan_of_the_first_model():
  """``first.then(second)`` applied to the dense state gives what ``second`` applied to ``first``'s state gives
  (a chain conv1 -> conv2 -> head, groups derived; the second round cuts both groups again and keeps a third)."""
  import hsic_jax as hj  # pylint: disable=import-outside-toplevel
  model = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Conv(8, 6, (3, 3), rngs=nnx.Rngs(1)), nnx.relu, nnx.Conv(6, 2, (1, 1), rngs=nnx.Rngs(2)))
  x = jnp.ones((2, 6, 6, 3))
  groups = hj.derive_model_groups(model, x)
  dense = nnx.to_pure_dict(nnx.state(model))
  first = prune(dense, groups, {"layers/0": [0, 2, 3, 5, 7], "layers/2": [1, 2, 4, 5]})
  thin = hj.thin_model(model, groups, first.plan, x)
  second = prune(first.state, hj.derive_model_groups(thin, x), {"layers/0": [1, 4], "layers/2": [0, 3]})
  both = first.plan.then(second.plan)
  assert dict(both.keep) == {"layers/0": (2, 7), "layers/2": (1, 5)} and dict(both.sizes) == {"layers/0": 8,
                                                                                               "layers/2": 6}
  once = apply_plan(dense, groups, both).state
  for a, b in zip(jax.tree_util.tree_leaves(once), jax.tree_util.tree_leaves(second.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="the second plan has 8 channels, but the first kept 5"):
    first.plan.then(PrunePlan({"layers/0": 8}, {"layers/0": (0, 1)}))
