"""hsic_jax.taps: decisions and calibration taps read from the jaxpr equal the zoo's hand-declared ones, and on
user-style CNNs equal values computed by an explicit forward pass."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
import models
from hsic_jax import taps
from train import calibrate, train as train_lib

CALIB = types.SimpleNamespace(batch_size=4, bn_mode="batch", resnet50_conv3_y="block")
SELECT = types.SimpleNamespace(bandwidth="apib", normalized=False)


def _images(n, size, seed=0, c=3):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, c)).astype(np.float32))


def _assert_problems_equal(a, b, rtol=1e-5):
  for p, q in zip(a, b, strict=True):
    for field in ("quad", "lin", "const", "rows"):
      np.testing.assert_allclose(np.asarray(getattr(p, field)), np.asarray(getattr(q, field)), rtol=rtol, atol=1e-6)


def _declared(model, images, bn_mode="batch"):
  """The zoo's hand-declared taps, ``model(x, capture=True)``, on a copy in the BatchNorm mode asked for."""
  split = train_lib.split_model(model)
  graphdef = split.train_def if bn_mode == "batch" else split.eval_def
  return jax.jit(lambda p, s, x: train_lib.merge(graphdef, p, s)(x, capture=True)[1])(
      split.params, split.batch_stats, images)


def _hand_taps(model, images, conv3_y="block", bn_mode="batch"):
  """``{decision: (X (n, c, h*w), Y (n, values))}`` from the hand-declared taps (APIB's layout)."""
  declared = _declared(model, images, bn_mode)
  out = {}
  for d in model.decisions():
    n, h, w, c = declared[d].input.shape
    y = declared["fc"].input if conv3_y == "pooled" and d.endswith("/conv3") else declared[d].output
    out[d] = (jnp.transpose(declared[d].input.reshape(n, h * w, c), (0, 2, 1)), y.reshape(n, -1))
  return out


def _assert_taps_equal(feats, hand, names):
  for d in names:
    (x, y), = feats[d]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(hand[d][0]))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(hand[d][1]))


# ----------------------------------------------------------------------------------------------------------------
# The zoo: derived decisions and taps equal the hand-declared ones.

ZOO = [
    ("resnet20", None, 16),
    pytest.param("vgg16", [8] * 13, 32, marks=pytest.mark.slow),
    # Inception branches concatenated into the next module's readers (27 decisions); about 30 s on 2 cores.
    pytest.param("googlenet", [max(1, w // 8) for w in models.default_widths("googlenet")], 16,
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,widths,size", ZOO)
def test_zoo_decisions_taps_and_problems_equal_the_hand_declared(name, widths, size):
  model = models.random_model(name, widths, seed=1)
  images = _images(8, size)
  declared = taps.decisions(model, images[:4], groups=model.channel_groups())
  assert [d.name for d in declared] == model.decisions()
  for d, (_, g) in zip(declared, calibrate.decision_groups(model)):
    assert d.group == g and d.consumers == (d.name,)
  derived = taps.decisions(model, images[:4])  # from derived groups: the hand-declared ones and maybe more
  by_name = {d.name: d for d in derived}
  key = lambda g: {(m.path, m.axis, m.role, m.offset, m.spatial) for m in g.members}  # noqa: E731
  for d in declared:
    assert key(by_name[d.name].group) == key(d.group) and by_name[d.name].group.size == d.group.size
  feats = taps.features(model, images[:4], decisions=declared)
  hand = _hand_taps(model, images[:4])
  _assert_taps_equal(feats, hand, model.decisions())
  names, problems = taps.calibration_problems(model, [images[:4], images[4:]], decisions=declared)
  hand = [_hand_taps(model, part) for part in (images[:4], images[4:])]
  ref = [hj.combine_problems([hj.problem_from_features(*h[d]) for h in hand]) for d in model.decisions()]
  assert names == model.decisions()
  _assert_problems_equal(problems, ref)
  prog_names, prog = calibrate.build_problems(model, np.asarray(images), CALIB, SELECT)  # batches of 4, as above
  assert prog_names == names
  _assert_problems_equal(prog, ref)


def test_mobilenetv2_depthwise_taps_equal_the_hand_declared():
  widths = [max(1, w // 8) for w in models.default_widths("mobilenetv2")]
  model = models.random_model("mobilenetv2", widths, seed=2)
  images = _images(4, 16)
  declared = taps.decisions(model, images, groups=model.channel_groups())
  assert [d.name for d in declared] == model.decisions()
  feats = taps.features(model, images, decisions=declared, bn_mode="running")
  hand = _hand_taps(model, images, bn_mode="running")
  _assert_taps_equal(feats, hand, model.decisions())


@pytest.mark.slow
def test_resnet50_conv3_pooled_target_equals_the_hand_declared():
  widths = [max(2, w // 16) for w in models.default_widths("resnet50")]
  model = models.random_model("resnet50", widths, seed=3)
  images = _images(4, 32)
  declared = taps.decisions(model, images, groups=model.channel_groups())
  assert [d.name for d in declared] == model.decisions()
  feats = taps.features(model, images, decisions=declared, target={"*/conv3": taps.Site("fc", "input")})
  hand = _hand_taps(model, images, conv3_y="pooled")
  _assert_taps_equal(feats, hand, model.decisions())


def test_batches_sum_like_blocks_and_activations_equal_the_program():
  model = models.random_model("resnet20", seed=4)
  images = _images(9, 8, seed=5)
  parts = [images[:5], images[5:]]  # unequal batches: the second is traced at its own size
  names, problems = taps.calibration_problems(model, parts, groups=model.channel_groups(), bn_mode="running")
  blocks = []
  for part in parts:
    hand = _hand_taps(model, part, bn_mode="running")
    blocks.append([hj.problem_from_features(*hand[d]) for d in names])
  _assert_problems_equal(problems, [hj.combine_problems([b[i] for b in blocks]) for i in range(len(names))])
  acts = taps.activations(model, parts, groups=model.channel_groups())
  hand = [_declared(model, part) for part in parts]
  ref = [jnp.concatenate([h[d].input for h in hand]) for d in names]
  for a, r in zip(acts, ref, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
  cfg = types.SimpleNamespace(batch_size=5, bn_mode="batch")  # the program's batching: 5 then 4 images
  for a, r in zip(calibrate.activations(model, np.asarray(images), cfg), ref, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
  np.testing.assert_allclose(taps.similarity(None, None, acts=acts), calibrate.layer_similarity(ref, "linear"),
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# User-style CNNs against an explicit forward pass.


class Concat(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn_a = nnx.BatchNorm(4, rngs=rngs)
    self.b = nnx.Conv(3, 6, (1, 1), rngs=rngs)
    self.bn_b = nnx.BatchNorm(6, rngs=rngs)
    self.c = nnx.Conv(10, 5, (3, 3), rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def parts(self, x):
    h = jnp.concatenate([nnx.relu(self.bn_a(self.a(x))), nnx.relu(self.bn_b(self.b(x)))], axis=-1)
    y = self.c(h)
    pooled = jnp.mean(nnx.relu(y), axis=(1, 2))
    return h, y, pooled, self.head(pooled)

  def __call__(self, x):
    return self.parts(x)[-1]


class SEGate(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.fc1 = nnx.Linear(8, 4, rngs=rngs)
    self.fc2 = nnx.Linear(4, 8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def parts(self, x):
    h = nnx.relu(self.bn1(self.conv1(x)))
    s = jnp.mean(h, axis=(1, 2))
    z = self.fc1(s)
    g = nnx.sigmoid(self.fc2(nnx.relu(z)))
    gated = h * g[:, None, None, :]
    y = self.conv2(gated)
    return h, s, z, gated, y, self.head(jnp.mean(nnx.relu(y), axis=(1, 2)))

  def __call__(self, x):
    return self.parts(x)[-1]


class TwoInputs(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.b = nnx.Conv(1, 6, (3, 3), rngs=rngs)
    self.c = nnx.Conv(6, 4, (3, 3), strides=(2, 2), rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

  def parts(self, x1, x2):
    h = nnx.relu(self.a(x1)) + nnx.relu(self.b(x2))
    y = self.c(h)
    flat = nnx.relu(y).reshape(y.shape[0], -1)  # channels-last flatten: each channel at 16 positions of fc rows
    return h, y, flat, self.head(flat)

  def __call__(self, x1, x2):
    return self.parts(x1, x2)[-1]


def _batch_stats(model):
  copy = nnx.merge(*nnx.split(model))
  copy.set_attributes(use_running_average=False, raise_if_not_found=False)
  return copy


def _x(a):
  """(n, h, w, c) -> (n, c, h*w)."""
  n, c = a.shape[0], a.shape[-1]
  return jnp.transpose(a.reshape(n, -1, c), (0, 2, 1))


def _flat(a):
  return a.reshape(a.shape[0], -1)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_concatenation_branches_are_two_decisions_of_one_consumer():
  model = Concat(nnx.Rngs(0))
  x = _images(4, 8)
  ds = taps.decisions(model, x)
  assert [(d.name, d.group.name, d.consumers) for d in ds] == [("c:a", "a", ("c",)), ("c:b", "b", ("c",)),
                                                              ("head", "c", ("head",))]
  h, y, pooled, logits = _batch_stats(model).parts(x)
  f = taps.features(model, x)
  _close(f["c:a"][0][0], _x(h[..., :4]))
  _close(f["c:b"][0][0], _x(h[..., 4:]))
  for d in ("c:a", "c:b"):
    _close(f[d][0][1], _flat(y))  # the conv's output with its bias
  _close(f["head"][0][0], pooled[:, :, None])
  _close(f["head"][0][1], logits)
  logit_y = taps.features(model, x, target="logits")
  _close(logit_y["c:a"][0][1], logits)
  site = taps.features(model, x, target={"c:*": taps.Site("head", "input")})
  _close(site["c:b"][0][1], pooled)
  _close(site["head"][0][1], logits)  # not matched: pre_bn


@pytest.mark.slow
def test_squeeze_excitation_gate_has_two_consumers_chosen_by_option():
  model = SEGate(nnx.Rngs(1))
  x = _images(6, 8, seed=2)
  ds = {d.name: d for d in taps.decisions(model, x)}
  assert ds["fc1"].consumers == ("fc1", "conv2") and ds["fc1"].group.name == "conv1"
  h, s, z, gated, y, _ = _batch_stats(model).parts(x)
  first = taps.features(model, x)["fc1"]
  _close(first[0][0], s[:, :, None])
  _close(first[0][1], z)
  chosen = taps.features(model, x, consumers={"conv1": "conv2"})["fc1"]  # by group name
  assert len(chosen) == 1
  _close(chosen[0][0], _x(gated))
  _close(chosen[0][1], _flat(y))
  names, summed = taps.calibration_problems(model, x, consumers="sum")
  i = names.index("fc1")
  ref = hj.combine_problems([hj.problem_from_features(s[:, :, None], z), hj.problem_from_features(_x(gated),
                                                                                                   _flat(y))])
  _assert_problems_equal([summed[i]], [ref], rtol=1e-4)
  with pytest.raises(ValueError, match="do not read the channels of group 'conv1'"):
    taps.features(model, x, consumers={"fc1": "head"})
  with pytest.raises(ValueError, match="neither decisions nor groups"):
    taps.features(model, x, consumers={"nope": "conv2"})


def test_two_input_model_and_a_flatten_into_dense():
  model = TwoInputs(nnx.Rngs(2))
  x1, x2 = _images(4, 8, seed=3), _images(4, 8, seed=4, c=1)
  ds = taps.decisions(model, x1, x2)
  assert [(d.name, d.group.size) for d in ds] == [("c", 6), ("head", 4)]
  h, y, flat, logits = model.parts(x1, x2)
  f = taps.features(model, (x1, x2))
  _close(f["c"][0][0], _x(h))
  _close(f["c"][0][1], _flat(y))
  # channel k of the flatten sits at rows p * 4 + k: X holds its 16 positions
  _close(f["head"][0][0], _x(nnx.relu(y)))
  _close(f["head"][0][1], logits)
  acts = taps.activations(model, [(x1, x2)])
  assert acts[0].shape == (4, 8, 8, 6) and acts[1].shape == (4, 1, 16, 4)
  _close(acts[0], h)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


class Branching(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.b = nnx.Conv(4, 2, (3, 3), rngs=rngs)

  def __call__(self, x):
    h = self.a(x)
    if jnp.mean(h) > 0:
      h = nnx.relu(h)
    return self.b(h)


def test_bad_inputs_are_named():
  model = Concat(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"calibration batch 1 has input shapes \[\(4, 16, 16, 3\)\].*same shape"):
    taps.calibration_problems(model, [_images(4, 8), _images(4, 16)])
  with pytest.raises(ValueError, match="calibration batch 0 has 1 image"):
    taps.calibration_problems(model, [_images(1, 8)])
  with pytest.raises(ValueError, match="no prunable channel group"):
    taps.decisions(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), _images(2, 8))
  with pytest.raises(ValueError, match="branches or loops in Python on a traced value"):
    taps.decisions(Branching(nnx.Rngs(0)), _images(2, 8))
  with pytest.raises(ValueError, match="bn_mode must be one of"):
    taps.features(model, _images(2, 8), bn_mode="eval")
  with pytest.raises(ValueError, match="target must be one of"):
    taps.features(model, _images(2, 8), target="block")
  with pytest.raises(ValueError, match=r"Site\('nope', 'output'\) must name a conv or dense layer"):
    taps.features(model, _images(2, 8), target=taps.Site("nope"))
  with pytest.raises(ValueError, match="consumers must be"):
    taps.features(model, _images(2, 8), consumers="all")


def test_the_model_is_not_changed():
  model = SEGate(nnx.Rngs(3))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  taps.calibration_problems(model, [_images(4, 8)], bn_mode="batch")
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert model.bn1.use_running_average is False  # as built: the mode is not touched either


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_zoo_model_has_its_declared_decisions_read_from_its_jaxpr(name):
  """The program's one path (train.network.model_decisions) finds, on every zoo model, exactly the decisions the
  model declares (``decisions()``), each with its declared group and its one consumer."""
  from train import network  # pylint: disable=import-outside-toplevel
  model = models.random_model(name)
  example = network.zoo_example(model)
  if example.shape[1] > 64:  # ImageNet models: the decisions do not depend on the input size
    example = example[:, :64, :64]
  decs = network.model_decisions(model, example)
  assert [d.name for d in decs] == model.decisions()
  declared = {g.name: g for g in model.channel_groups()}
  assert all(d.group == declared[d.group.name] and d.consumers == (d.name,) for d in decs)
