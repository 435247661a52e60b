"""Tests of the model zoo: shapes, parameter names, width lists, capture taps and declared channel groups.

Channel groups are checked against independent facts: the actual leaf shapes, a coverage count of every channel
axis, and two functional tests. (1) Dead channels: zero one channel's BatchNorm scale and bias in every group, so
the channel is exactly 0 wherever it is read; then randomly perturbing every other member slice of that channel
must leave the logits unchanged (and perturbing a neighbouring channel must change them). (2) Removal: deleting the
dead channel from every member gives exactly the parameter shapes of the model built with that width reduced by
one, and the same logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from hsic_jax import ChannelGroup

ALL = sorted(models.MODELS)
# A model per architecture for the (compiled) functional tests, with its input side and a width divisor (narrower
# nets run faster; the channel-group structure does not depend on the widths).
FUNCTIONAL = {"resnet20": (32, 1), "vgg16": (32, 4), "resnet50": (32, 4), "googlenet": (32, 1),
              "mobilenetv2": (32, 2)}
PRUNABLE_COUNT = {"resnet20": 9, "resnet32": 15, "resnet44": 21, "resnet56": 27, "resnet110": 54, "vgg16": 13,
                  "resnet50": 32, "googlenet": 27, "mobilenetv2": 16, "mobilenetv2_imagenet": 16}


# ------------------------------------------------------------------------------------------------------------------
# Helpers.


def abstract(name: str, widths: Sequence[int] | None = None, **kw) -> nnx.Module:
  """The model built abstractly (``nnx.eval_shape``: shapes only), cached; treat it as read-only."""
  return _abstract(name, None if widths is None else tuple(widths), tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _abstract(name: str, widths: tuple[int, ...] | None, kw: tuple) -> nnx.Module:
  model = nnx.eval_shape(lambda: models.get_model(name, widths, rngs=nnx.Rngs(0), **dict(kw)))
  model.eval()
  return model


def pure_shapes(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  return {tuple(k.key for k in kp): tuple(leaf.shape) for kp, leaf in flat}


def numpy_model(name: str, widths: Sequence[int] | None = None, seed: int = 0) -> nnx.Module:
  """A concrete model in eval mode with numpy-drawn weights (fast: no per-shape JAX init compilation)."""
  model = abstract(name, widths)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    key, shape = path[-1].key, leaf.shape
    if key == "kernel":
      fan_in = math.prod(shape[:-1])
      return rng.normal(0.0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)
    if key in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0.0, 0.1, shape).astype(np.float32)

  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, pure))
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


# Cheap XLA compilation: these tests run each program a few times on tiny batches.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def _jitted(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x), compiler_options=FAST_COMPILE)


def _forward(model: nnx.Module, x: jax.Array) -> jax.Array:
  """Jitted eval forward; one compilation per architecture and widths, shared by all tests."""
  graphdef, state = nnx.split(model)
  return _jitted(graphdef)(state, x)


def get_leaf(pure: dict, path: tuple) -> np.ndarray:
  for k in path:
    pure = pure[k]
  return pure


def set_leaf(pure: dict, path: tuple, value: np.ndarray) -> None:
  for k in path[:-1]:
    pure = pure[k]
  pure[path[-1]] = value


def member_index(m, c: int, axis_len: int) -> np.ndarray:
  """Indices along ``m.axis`` of channel ``c`` of the group (ChannelSlice semantics)."""
  total = axis_len // m.spatial
  return np.array([p * total + m.offset + c for p in range(m.spatial)])


def is_bn_affine(pure: dict, path: tuple) -> bool:
  parent = get_leaf(pure, path[:-1])
  return path[-1] in ("scale", "bias") and "mean" in parent


def numpy_pure(model: nnx.Module) -> dict:
  return jax.tree_util.tree_map(lambda a: np.array(a), nnx.to_pure_dict(nnx.state(model)))


def with_pure(model: nnx.Module, pure: dict) -> nnx.Module:
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, pure))
  out = nnx.merge(graphdef, state)
  out.eval()
  return out


def zero_channels(pure: dict, chosen: dict[str, tuple[ChannelGroup, int]]) -> None:
  """Kills channel c of each group: BN scale and bias 0 at that channel in every BN the group names."""
  for g, c in chosen.values():
    for m in g.members:
      if is_bn_affine(pure, tuple(m.path)):
        leaf = get_leaf(pure, tuple(m.path))
        idx = member_index(m, c, leaf.shape[m.axis])
        np.moveaxis(leaf, m.axis, 0)[idx] = 0.0


def perturb_channels(pure: dict, chosen: dict[str, tuple[ChannelGroup, int]], rng: np.random.Generator,
                     shift: int = 0) -> None:
  """Randomises every non-BN-affine member slice at channel ``c + shift`` (``var`` kept positive)."""
  for g, c in chosen.values():
    for m in g.members:
      path = tuple(m.path)
      if is_bn_affine(pure, path):
        continue
      leaf = get_leaf(pure, path)
      idx = member_index(m, (c + shift) % g.size, leaf.shape[m.axis])
      view = np.moveaxis(leaf, m.axis, 0)
      if path[-1] == "var":
        view[idx] *= rng.uniform(0.5, 2.0, view[idx].shape).astype(np.float32)
      else:
        view[idx] += rng.normal(0.0, 1.0, view[idx].shape).astype(np.float32)


def remove_channels(pure: dict, chosen: dict[str, tuple[ChannelGroup, int]]) -> dict:
  """Deletes channel c of each group from every member (all groups at once; offsets refer to the dense axes)."""
  drop: dict[tuple[tuple, int], set[int]] = {}
  for g, c in chosen.values():
    for m in g.members:
      path = tuple(m.path)
      leaf = get_leaf(pure, path)
      axis = m.axis % leaf.ndim
      drop.setdefault((path, axis), set()).update(member_index(m, c, leaf.shape[axis]).tolist())
  out = jax.tree_util.tree_map(lambda a: a, pure)
  for (path, axis), idx in drop.items():
    set_leaf(out, path, np.delete(get_leaf(out, path), sorted(idx), axis=axis))
  return out


def logits_close(a: jax.Array, b: jax.Array, rtol: float = 1e-4) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b))) <= rtol * max(1.0, float(np.max(np.abs(a))))


# ------------------------------------------------------------------------------------------------------------------
# Registry and bad input.


def test_registry_names():
  for name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16", "resnet50", "googlenet",
               "mobilenetv2"):
    assert name in models.MODELS


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="unknown model name 'resnet18'.*resnet56"):
    models.get_model("resnet18", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown model name"):
    models.default_widths("alexnet")


@pytest.mark.parametrize("name, widths, match", [
    ("resnet20", [16] * 18, "must have 19 entries"),
    ("resnet20", [16] * 18 + [0], "must all be >= 1"),
    ("resnet56", [16] * 22 + [17] + [16] * 32, "equal within stage 2"),
    ("vgg16", [64] * 12, "must have 13 entries"),
    ("vgg16", [64] * 12 + [-3], ">= 1"),
    ("resnet50", [64] * 36, "must have 37 entries"),
    ("googlenet", [8] * 28, "must have 27 entries"),
    ("mobilenetv2", [32, 16, 96, 24, 144, 25] + [64] * 28 + [1280], r"equal within stage 2.*\[3, 5\]"),
])
def test_bad_widths(name: str, widths: list[int], match: str):
  with pytest.raises(ValueError, match=match):
    abstract(name, widths)
  with pytest.raises(ValueError, match=match):
    models.validate_widths(name, widths)


def test_resnet_cifar_width_rules():
  ws = models.default_widths("resnet20")
  unequal = list(ws)
  unequal[4] = 15  # stage-1 block 1 out width
  with pytest.raises(ValueError, match=r"equal within stage 1.*indices \[2, 4, 6\]"):
    abstract("resnet20", unequal)
  stem = list(ws)
  stem[0] = 8
  with pytest.raises(ValueError, match="stem width"):
    abstract("resnet20", stem)
  shrink = list(ws)
  for i in (14, 16, 18):  # stage-3 residual width below stage 2's
    shrink[i] = 24
  with pytest.raises(ValueError, match="cannot remove channels"):
    abstract("resnet20", shrink)


def test_default_width_lists():
  assert models.default_widths("resnet56") == [16] + [16] * 18 + [32] * 18 + [64] * 18
  r50 = models.default_widths("resnet50")
  assert len(r50) == 37 and r50[0] == 64
  assert [r50[i] for i in (3, 10, 19, 32)] == [256, 512, 1024, 2048]
  assert r50[1:3] == [64, 64] and r50[8:10] == [128, 128] and r50[33:37] == [512] * 4
  assert models.default_widths("vgg16") == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  g = models.default_widths("googlenet")
  assert len(g) == 27 and g[:3] == [96, 16, 32] and g[-3:] == [192, 48, 128]
  mb = models.default_widths("mobilenetv2")
  assert len(mb) == 35 and mb[:4] == [32, 16, 96, 24] and mb[-1] == 1280


# ------------------------------------------------------------------------------------------------------------------
# Shapes and names.


@pytest.mark.parametrize("name", ALL)
def test_output_and_capture_shapes(name: str):
  model = abstract(name)
  model.eval()
  h, w = models.input_size(name)
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
  logits, taps = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x, capture=True), state, x)
  classes = 1000 if name.endswith("imagenet") or name == "resnet50" else 10
  assert logits.shape == (2, classes)
  extra = {"fc"} if name == "resnet50" else set()
  assert set(taps) == set(model.decisions()) | extra
  assert len(model.decisions()) == PRUNABLE_COUNT[name]
  # Each tap's channels match the width list: input channels = the decided group's size.
  groups = {m.path[:-1]: g for g in model.channel_groups() if g.prunable for m in g.members if m.role == "in"}
  for d in model.decisions():
    tap = taps[d]
    assert tap.input.ndim == 4 and tap.input.shape[0] == 2
    assert tap.input.shape[-1] == groups[tuple(d.split("/"))].size, d


def test_capture_shapes_by_hand():
  """Tap shapes derived by hand from the architectures (n = 2)."""
  def taps_of(name):
    model = abstract(name)
    graphdef, state = nnx.split(model)
    h, w = models.input_size(name)
    x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
    return jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x, capture=True), state, x)[1]

  t = taps_of("resnet20")
  assert t["stage1/block0/conv2"].input.shape == (2, 32, 32, 16)
  assert t["stage2/block0/conv2"].input.shape == (2, 16, 16, 32)
  assert t["stage3/block2/conv2"].output.shape == (2, 8, 8, 64)
  t = taps_of("vgg16")
  side = {2: 32, 3: 16, 4: 16, 5: 8, 6: 8, 7: 8, 8: 4, 9: 4, 10: 4, 11: 2, 12: 2, 13: 2}
  chans = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  for k, s in side.items():
    assert t[f"conv{k}"].input.shape == (2, s, s, chans[k - 2])
    assert t[f"conv{k}"].output.shape == (2, s, s, chans[k - 1])
  assert t["fc1"].input.shape == (2, 1, 1, 512) and t["fc1"].output.shape == (2, 512)
  t = taps_of("resnet50")
  assert t["stage1/block0/conv2"].input.shape == (2, 56, 56, 64)
  assert t["stage2/block0/conv2"].input.shape == (2, 56, 56, 128)
  assert t["stage2/block0/conv2"].output.shape == (2, 28, 28, 128)
  assert t["stage4/block2/conv3"].input.shape == (2, 7, 7, 512)
  assert t["stage4/block2/conv3"].output.shape == (2, 7, 7, 2048)
  assert t["fc"].input.shape == (2, 1, 1, 2048)
  t = taps_of("googlenet")
  assert t["a3/branch3x3/conv2"].input.shape == (2, 32, 32, 96)
  assert t["a3/branch5x5/conv3"].output.shape == (2, 32, 32, 32)
  assert t["e4/branch5x5/conv2"].input.shape == (2, 16, 16, 32)
  assert t["b5/branch3x3/conv2"].output.shape == (2, 8, 8, 384)


def _expected_resnet_cifar(n: int) -> set[tuple]:
  mods = {("stem", "conv"), ("stem", "bn"), ("fc",)}
  for s in (1, 2, 3):
    for j in range(n):
      mods |= {(f"stage{s}", f"block{j}", layer) for layer in ("conv1", "bn1", "conv2", "bn2")}
  return mods


def _expected_resnet50() -> set[tuple]:
  mods = {("stem", "conv"), ("stem", "bn"), ("fc",)}
  for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)):
    for j in range(n):
      mods |= {(f"stage{s}", f"block{j}", f"{k}{i}") for k in ("conv", "bn") for i in (1, 2, 3)}
    mods |= {(f"stage{s}", "block0", "downsample", "conv"), (f"stage{s}", "block0", "downsample", "bn")}
  return mods


def _expected_vgg() -> set[tuple]:
  return {(f"{k}{i}",) for k in ("conv", "bn") for i in range(1, 14)} | {("fc1",), ("fc1_bn",), ("fc2",)}


def _expected_googlenet() -> set[tuple]:
  mods = {("stem", "conv"), ("stem", "bn"), ("fc",)}
  for m in ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5"):
    mods |= {(m, "branch1x1", "conv"), (m, "branch1x1", "bn"), (m, "branch_pool", "conv"), (m, "branch_pool", "bn")}
    mods |= {(m, "branch3x3", f"{k}{i}") for k in ("conv", "bn") for i in (1, 2)}
    mods |= {(m, "branch5x5", f"{k}{i}") for k in ("conv", "bn") for i in (1, 2, 3)}
  return mods


def _expected_mobilenetv2() -> set[tuple]:
  mods = {("stem", "conv"), ("stem", "bn"), ("head", "conv"), ("head", "bn"), ("fc",)}
  for s, n in enumerate((1, 2, 3, 4, 3, 3, 1), start=1):
    for j in range(n):
      layers = ["depthwise", "depthwise_bn", "project", "project_bn"] + (["expand", "expand_bn"] if s > 1 else [])
      mods |= {(f"stage{s}", f"block{j}", layer) for layer in layers}
  return mods


@pytest.mark.parametrize("name, expected", [
    ("resnet20", _expected_resnet_cifar(3)), ("resnet56", _expected_resnet_cifar(9)),
    ("resnet110", _expected_resnet_cifar(18)), ("resnet50", _expected_resnet50()), ("vgg16", _expected_vgg()),
    ("googlenet", _expected_googlenet()), ("mobilenetv2", _expected_mobilenetv2()),
])
def test_param_paths(name: str, expected: set[tuple]):
  shapes = pure_shapes(abstract(name))
  assert {p[:-1] for p in shapes} == expected
  leaves = {p[-1] for p in shapes}
  assert leaves == {"kernel", "bias", "scale", "mean", "var"}


def test_param_shapes_by_hand():
  s = pure_shapes(abstract("resnet56"))
  assert s[("stage1", "block0", "conv1", "kernel")] == (3, 3, 16, 16)
  assert s[("stage2", "block0", "conv1", "kernel")] == (3, 3, 16, 32)
  assert s[("stage3", "block8", "bn2", "var")] == (64,)
  assert s[("fc", "kernel")] == (64, 10)
  s = pure_shapes(abstract("resnet50"))
  assert s[("stem", "conv", "kernel")] == (7, 7, 3, 64)
  assert s[("stage1", "block0", "downsample", "conv", "kernel")] == (1, 1, 64, 256)
  assert s[("stage3", "block5", "conv2", "kernel")] == (3, 3, 256, 256)
  assert ("bias",) not in {p[-1:] for p in s if p[-2].startswith("conv")}
  s = pure_shapes(abstract("googlenet"))
  assert s[("b3", "branch5x5", "conv3", "kernel")] == (3, 3, 96, 96)
  assert s[("a4", "branch1x1", "conv", "kernel")] == (1, 1, 480, 192)
  assert s[("a4", "branch1x1", "conv", "bias")] == (192,)
  assert s[("fc", "kernel")] == (1024, 10)
  s = pure_shapes(abstract("mobilenetv2"))
  assert s[("stage2", "block0", "depthwise", "kernel")] == (3, 3, 1, 96)
  assert s[("stage1", "block0", "depthwise", "kernel")] == (3, 3, 1, 32)
  s = pure_shapes(abstract("vgg16"))
  assert s[("fc1", "kernel")] == (512, 512) and s[("fc1_bn", "scale")] == (512,)


def test_param_count_with_num_classes():
  model = abstract("resnet20", num_classes=100)
  assert pure_shapes(model)[("fc", "kernel")] == (64, 100)
  assert model.num_classes == 100
  for bad in (2.5, 0, True, "10"):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
      abstract("resnet20", num_classes=bad)


# ------------------------------------------------------------------------------------------------------------------
# Width round trip and channel groups (shapes).


def thin_widths(name: str, model: nnx.Module, frac: float = 0.5) -> list[int]:
  """Shrinks every prunable group's width entries to ``frac`` (at least 1)."""
  ws = list(model.widths)
  for g in model.channel_groups():
    if g.prunable:
      for i in g.width_indices:
        ws[i] = max(1, int(ws[i] * frac))
  return ws


def check_groups(model: nnx.Module) -> None:
  shapes = pure_shapes(model)
  widths = model.widths
  coverage: dict[tuple[tuple, int], int] = {}
  names = set()
  for g in model.channel_groups():
    assert g.name not in names, f"duplicate group name {g.name}"
    names.add(g.name)
    assert g.size >= 1 and g.members
    for i in g.width_indices:
      assert widths[i] == g.size, (g.name, i)
    roles = {m.role for m in g.members}
    assert roles == {"in", "out"}, (g.name, roles)
    for m in g.members:
      path = tuple(m.path)
      assert path in shapes, (g.name, path)
      shape = shapes[path]
      axis = m.axis % len(shape)
      assert shape[axis] % m.spatial == 0, (g.name, path, shape, m)
      assert m.offset + g.size <= shape[axis] // m.spatial, (g.name, path, shape, m)
      coverage[(path, axis)] = coverage.get((path, axis), 0) + g.size * m.spatial
  # Every channel axis is covered exactly, except the image channels (stem in) and the logits (classifier out).
  for path, shape in shapes.items():
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:
      axes = [3] if shape[2] == 1 and path[-2] == "depthwise" else [2, 3]
    elif leaf == "kernel":
      axes = [0, 1]
    else:
      axes = [0]
    for a in axes:
      got = coverage.get((path, a), 0)
      external = (path[:-1] in (("stem", "conv"), ("conv1",)) and leaf == "kernel" and a == 2) or (
          path[0] in ("fc", "fc2") and ((leaf == "kernel" and a == 1) or leaf == "bias"))
      assert got == (0 if external else shape[a]), (path, a, got, shape)
  assert sum(g.prunable for g in model.channel_groups()) == PRUNABLE_COUNT[model_name(model)]


def model_name(model: nnx.Module) -> str:
  return models.model_name(model)


@pytest.mark.parametrize("name", ALL)
def test_channel_groups_match_shapes(name: str):
  check_groups(abstract(name))


@pytest.mark.parametrize("name", ALL)
def test_width_round_trip(name: str):
  dense = abstract(name)
  ws = thin_widths(name, dense)
  thin = abstract(name, ws)
  assert thin.widths == ws
  assert models.validate_widths(name, ws) == ws
  check_groups(thin)
  # Prunable groups shrank; everything else kept its size.
  dense_sizes = {g.name: g.size for g in dense.channel_groups()}
  for g in thin.channel_groups():
    expect = max(1, int(dense_sizes[g.name] * 0.5)) if g.prunable else dense_sizes[g.name]
    assert g.size == expect, g.name


def test_decisions_are_prunable_consumers():
  for name in ALL:
    model = abstract(name)
    consumers = {tuple(m.path[:-1]) for g in model.channel_groups() if g.prunable for m in g.members
                 if m.role == "in"}
    assert consumers == {tuple(d.split("/")) for d in model.decisions()}, name


def test_resnet_cifar_group_layout():
  groups = {g.name: g for g in abstract("resnet20").channel_groups()}
  mid = groups["stage2/block1/mid"]
  assert mid.prunable and mid.size == 32 and mid.width_indices == (9,)
  assert {(m.path, m.axis, m.role) for m in mid.members} == {
      (("stage2", "block1", "conv1", "kernel"), 3, "out"), (("stage2", "block1", "conv2", "kernel"), 2, "in"),
      *{(("stage2", "block1", "bn1", k), 0, "out") for k in ("scale", "bias", "mean", "var")}}
  s1 = groups["stage1/stream"]
  assert not s1.prunable and s1.width_indices == (0, 2, 4, 6)
  readers = {m.path[:-1] for m in s1.members if m.role == "in"}
  assert readers == {("stage1", f"block{j}", "conv1") for j in range(3)} | {("stage2", "block0", "conv1")}
  s3 = groups["stage3/stream"]
  assert any(m.path == ("fc", "kernel") and m.axis == 0 for m in s3.members)


def test_googlenet_offsets():
  groups = {g.name: g for g in abstract("googlenet").channel_groups()}
  g = groups["a3/branch5x5/out"]
  offs = {m.path[:-1]: m.offset for m in g.members if m.role == "in"}
  assert offs[("b3", "branch1x1", "conv")] == 64 + 128 and g.size == 32
  g = groups["b5/branch_pool/out"]
  assert [(m.path, m.offset) for m in g.members if m.role == "in"] == [(("fc", "kernel"), 384 + 384 + 128)]


# ------------------------------------------------------------------------------------------------------------------
# Functional tests (compiled forward passes on random weights).


def choose_channels(model: nnx.Module, seed: int) -> dict[str, tuple[ChannelGroup, int]]:
  """A random channel per group. In an option-A ResNet, a stage-2/3 stream channel is only dead if it is one of the
  zero-padded ones (channel 0 is: the shortcut pads (w_s - w_{s-1}) // 2 zeros in front)."""
  rng = np.random.default_rng(seed)
  chosen = {g.name: (g, int(rng.integers(g.size))) for g in model.channel_groups() if g.size > 1}
  if isinstance(model, models.ResNetCifar):
    for s in ("stage2/stream", "stage3/stream"):
      chosen[s] = (chosen[s][0], 0)
  return chosen


def functional_widths(name: str) -> list[int]:
  div = FUNCTIONAL[name][1]
  return [max(2, w // div) for w in models.default_widths(name)]


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_groups_dead_channel_invariance(name: str):
  size = FUNCTIONAL[name][0]
  model = numpy_model(name, functional_widths(name))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32))
  chosen = choose_channels(model, 2)
  pure = numpy_pure(model)
  zero_channels(pure, chosen)
  base = _forward(with_pure(model, pure), x)
  p2 = jax.tree_util.tree_map(np.copy, pure)
  perturb_channels(p2, chosen, np.random.default_rng(3))
  out = _forward(with_pure(model, p2), x)
  assert np.all(np.isfinite(np.asarray(base)))
  assert logits_close(base, out, 1e-5), float(np.max(np.abs(np.asarray(base) - np.asarray(out))))
  # Control: perturbing the neighbouring (live) channel of one prunable group does change the logits.
  g = next(g for g in model.channel_groups() if g.prunable and g.size > 1)
  p3 = jax.tree_util.tree_map(np.copy, pure)
  perturb_channels(p3, {g.name: chosen[g.name]}, np.random.default_rng(4), shift=1)
  assert not logits_close(base, _forward(with_pure(model, p3), x), 1e-5)


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_groups_removal_matches_thin_model(name: str):
  size = FUNCTIONAL[name][0]
  model = numpy_model(name, functional_widths(name), seed=5)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, size, size, 3)).astype(np.float32))
  # Groups whose removal keeps the function: those with width entries, except option-A residual streams (their
  # channels sit at a width-dependent offset of the next stage's stream).
  skip_streams = name.startswith("resnet") and name != "resnet50"
  chosen = {k: v for k, v in choose_channels(model, 7).items()
            if v[0].width_indices and not (skip_streams and k.endswith("stream"))}
  assert chosen
  pure = numpy_pure(model)
  zero_channels(pure, chosen)
  dense_logits = _forward(with_pure(model, pure), x)
  thin_pure = remove_channels(pure, chosen)
  ws = list(model.widths)
  for g, _ in chosen.values():
    for i in g.width_indices:
      ws[i] -= 1
  thin = abstract(name, ws)
  want = pure_shapes(thin)
  got = {tuple(k.key for k in kp): leaf.shape
         for kp, leaf in jax.tree_util.tree_flatten_with_path(thin_pure)[0]}
  assert got == want
  thin_logits = _forward(with_pure(thin, thin_pure), x)
  assert logits_close(dense_logits, thin_logits, 1e-4), float(np.max(np.abs(dense_logits - thin_logits)))


# ------------------------------------------------------------------------------------------------------------------
# BatchNorm modes and the eager constructor.


def test_batchnorm_train_eval_and_momentum():
  # Eager construction through the public constructor (narrow widths keep the per-shape init compilation short).
  model = models.get_model("resnet20", [4] * 19, rngs=nnx.Rngs(0))
  assert model.widths == [4] * 19
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32))
  step = nnx.jit(lambda m, x: m(x))
  stem_out = np.asarray(jax.jit(lambda k, x: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))(model.stem.conv.kernel[...], x))
  old = np.asarray(model.stem.bn.mean[...])
  model.train()
  train_logits = step(model, x)
  new = np.asarray(model.stem.bn.mean[...])
  # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch mean.
  np.testing.assert_allclose(new, 0.9 * old + 0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  model.eval()
  before = np.asarray(model.stem.bn.mean[...])
  eval_logits = step(model, x)
  np.testing.assert_array_equal(before, np.asarray(model.stem.bn.mean[...]))
  assert train_logits.shape == eval_logits.shape == (4, 10)
  assert not np.allclose(np.asarray(train_logits), np.asarray(eval_logits))
  assert model.stem.bn.epsilon == 1e-5


def test_option_a_shortcut_by_hand():
  """A stage-2 first block with zero residual branch outputs pad(x[:, ::2, ::2]) with 8 zeros each side."""
  model = numpy_model("resnet20")
  block = model.stage2.block0
  pure = nnx.to_pure_dict(nnx.state(block))
  pure = jax.tree_util.tree_map(np.array, pure)
  pure["bn2"]["scale"][:] = 0.0
  pure["bn2"]["bias"][:] = 0.0
  graphdef, state = nnx.split(block)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, pure))
  block = nnx.merge(graphdef, state)
  x = np.abs(np.random.default_rng(0).normal(size=(1, 32, 32, 16))).astype(np.float32)
  y = np.asarray(block(jnp.asarray(x)))
  assert y.shape == (1, 16, 16, 32)
  np.testing.assert_array_equal(y[..., :8], 0.0)
  np.testing.assert_array_equal(y[..., 24:], 0.0)
  np.testing.assert_allclose(y[..., 8:24], x[:, ::2, ::2, :], rtol=1e-6)
