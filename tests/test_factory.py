"""Models from a user's factory (models.factory, train.network): how the path is resolved and called, its errors,
and the checkpoint of a factory model, dense and cut to a plan, rebuilt by models.load_pruned."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
import models
from models import checkpoint, factory
from tests._models import masked_copy
from train import network


class SmallCNN(nnx.Module):
  """A user's CNN: conv-BN-ReLU twice, a stride-2 conv, global pooling, a classifier."""

  def __init__(self, *, num_classes: int, width: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, width, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
    self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


def small_cnn(*, num_classes: int = 10, width: int = 6, rngs: nnx.Rngs) -> SmallCNN:
  return SmallCNN(num_classes=num_classes, width=width, rngs=rngs)


def no_rngs(width: int = 4) -> SmallCNN:  # a factory that seeds itself and has a fixed class count
  return SmallCNN(num_classes=3, width=width, rngs=nnx.Rngs(7))


NOT_CALLABLE = 3
NAME = "tests.test_factory:small_cnn"


def not_a_module(**kwargs):
  return {"weights": 1}


def _config(name: str, kwargs=None, widths=None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": {"name": name, "kwargs": kwargs or {}, "widths": widths},
                                    "data": {"image_size": 8, "mean": (0.5, 0.5, 0.5)}})


def test_factory_paths_resolve_and_their_errors_name_the_problem(tmp_path):
  assert factory.import_factory(NAME) is small_cnn
  src = tmp_path / "my_models.py"
  src.write_text("from tests.test_factory import small_cnn as make\n")
  assert factory.import_factory(f"{src}:make") is small_cnn
  for name, match in [("tests.test_factory", "must read"), ("a:b:c", "must read"), (":f", "must read"),
                      ("no_such_package_x.mod:f", "cannot import module 'no_such_package_x.mod'"),
                      ("tests.test_factory:missing", "has no attribute 'missing'"),
                      ("tests.test_factory:NOT_CALLABLE", "not a callable"),
                      (f"{tmp_path}/absent.py:f", "does not exist")]:
    with pytest.raises(ValueError, match=match):
      factory.import_factory(name)


def test_build_passes_num_classes_and_rngs_where_taken_and_refuses_bad_kwargs():
  m = factory.build(NAME, {"width": 5}, num_classes=4, rngs=nnx.Rngs(0))
  assert isinstance(m, SmallCNN) and m.conv1.kernel.shape == (3, 3, 3, 5) and m.head.kernel.shape == (10, 4)
  m = factory.build("tests.test_factory:no_rngs", {"width": 2}, num_classes=4, rngs=nnx.Rngs(0))
  assert m.head.kernel.shape == (4, 3)  # takes neither: its own class count, which the program then checks
  with pytest.raises(ValueError, match=r"takes no argument\(s\) \['depth'\]"):
    factory.build(NAME, {"depth": 3}, num_classes=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.kwargs sets 'num_classes'"):
    factory.build(NAME, {"num_classes": 3}, num_classes=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="returned a dict; expected a flax.nnx.Module"):
    factory.build("tests.test_factory:not_a_module", {}, num_classes=4, rngs=nnx.Rngs(0))


def test_network_from_config_refuses_what_does_not_fit_the_model():
  assert network.Network.from_config(_config(NAME, {"width": 4})).factory.input_shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match="unknown model.name 'resnet21'"):
    network.Network.from_config(_config("resnet21"))
  with pytest.raises(ValueError, match=r"model.kwargs \['width'\] is for a factory model"):
    network.Network.from_config(_config("resnet20", {"width": 4}))
  with pytest.raises(ValueError, match="model.widths is for the zoo's models"):
    network.Network.from_config(_config(NAME, widths=(4, 4)))
  net = network.Network.from_config(_config(NAME, {"width": 4}))
  with pytest.raises(ValueError, match="has 10 classes but the data set has 3"):
    net.check(net.build(num_classes=10, seed=0), 3, "here")
  bad = network.Network(NAME, {"width": 4}, None, (2, 8, 8, 5))  # five input channels: the model takes three
  with pytest.raises(ValueError, match=r"fails on an input of shape \(2, 8, 8, 5\)"):
    bad.check(bad.build(num_classes=10, seed=0), 10, "here")


def _leaves(model):
  return [np.asarray(v) for v in jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(model)))]


def test_factory_checkpoints_dense_and_pruned_rebuild_the_same_model(tmp_path):
  net = network.Network.from_config(_config(NAME, {"width": 6}))
  dense = net.build(num_classes=10, seed=1)
  dense.eval()
  net.save(dense, tmp_path / "dense", {"stage": "dense"})
  meta = checkpoint.read_meta(tmp_path / "dense")
  assert (meta["model"], meta["kwargs"], meta["input_shape"], meta["num_classes"]) == (NAME, {"width": 6},
                                                                                         [2, 8, 8, 3], 10)
  back = models.load_pruned(tmp_path / "dense")
  assert isinstance(back, SmallCNN)
  for a, b in zip(_leaves(back), _leaves(dense), strict=True):
    np.testing.assert_array_equal(a, b)
  # Cut conv1 to channels {0, 2, 5} and conv2 to 7 of 12, saved with the plan and rebuilt from the factory.
  groups = net.groups(dense)
  names = [d.group.name for d in net.decisions(dense, groups)]
  assert names == ["conv1", "conv2"]
  thin, plan = net.thin(dense, {"conv1": [0, 2, 5], "conv2": [0, 1, 3, 4, 8, 9, 11]})
  assert thin.conv1.kernel.shape == (3, 3, 3, 3) and thin.conv2.kernel.shape == (3, 3, 3, 7)
  assert thin.head.kernel.shape == (7, 10)
  net.save(thin, tmp_path / "pruned", {"plan": json.loads(plan.to_json())})
  loaded = models.load_pruned(tmp_path / "pruned")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(thin(x)))
  # The thin model computes the dense one with the removed channels zeroed (an oracle independent of the cut).
  masked = masked_copy(dense, groups, plan.keep)
  np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(masked(x)), rtol=1e-5, atol=1e-5)


def test_a_factory_checkpoint_whose_arrays_do_not_fit_its_plan_is_refused(tmp_path):
  net = network.Network.from_config(_config(NAME, {"width": 6}))
  dense = net.build(num_classes=10, seed=1)
  thin, plan = net.thin(dense, {"conv1": [0, 2, 5]})
  other = hj.PrunePlan(plan.sizes, {"conv1": (0, 1, 2, 3)})  # a plan that builds another shape than the arrays
  net.save(thin, tmp_path / "bad", {"plan": json.loads(other.to_json())})
  with pytest.raises(ValueError, match="does not hold the state of tests.test_factory:small_cnn|corrupt"):
    models.load_pruned(tmp_path / "bad")


class OneLayer(nnx.Module):
  """A conv straight to the classes: its only channels are the input's and the output's, none prunable."""

  def __init__(self, *, num_classes: int, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, num_classes, (3, 3), rngs=rngs)

  def __call__(self, x):
    return jnp.mean(self.conv(x), axis=(1, 2))


def one_layer(*, num_classes: int = 10, rngs: nnx.Rngs) -> OneLayer:
  return OneLayer(num_classes=num_classes, rngs=rngs)


def test_a_factory_model_with_nothing_to_prune_is_refused_by_name():
  net = network.Network.from_config(_config("tests.test_factory:one_layer"))
  with pytest.raises(ValueError, match="the OneLayer has no prunable channel group"):
    net.decisions(net.build(num_classes=10, seed=0))


def test_the_programs_calibration_sums_every_reader_when_asked():
  """``calib.consumers="sum"``: a decision read by several layers (a residual stream read by an SE gate and the next
  convs) gets the sum of one problem per reader, as hsic_jax.taps computes it; ``"first"`` gets its first's."""
  import types  # pylint: disable=import-outside-toplevel
  from examples import user_cnns  # pylint: disable=import-outside-toplevel
  from train import calibrate  # pylint: disable=import-outside-toplevel
  model = user_cnns.se_resnet(num_classes=3, width=4, rngs=nnx.Rngs(0))
  images = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
  decs = network.model_decisions(model, images[:2])
  shared = [d for d in decs if len(d.consumers) > 1]
  assert shared, "the SE-ResNet's residual streams have several readers"
  select = types.SimpleNamespace(bandwidth="apib", normalized=False)
  out = {}
  for how in ("first", "sum"):
    cal = types.SimpleNamespace(batch_size=8, bn_mode="batch", resnet50_conv3_y="block", consumers=how)
    names, out[how] = calibrate.build_problems(model, images, cal, select, decisions=decs)
  _, want = hj.taps.calibration_problems(model, images, decisions=decs, consumers="sum")
  for p, q in zip(out["sum"], want, strict=True):
    np.testing.assert_allclose(np.asarray(p.quad), np.asarray(q.quad), rtol=1e-6)
  i = names.index(shared[0].name)
  assert int(out["sum"][i].rows) > int(out["first"][i].rows)  # more than one reader's rows went in
  with pytest.raises(ValueError, match="calib.consumers must be 'first' or 'sum'"):
    calibrate.build_problems(model, images, types.SimpleNamespace(batch_size=8, bn_mode="batch",
                                                                  resnet50_conv3_y="block", consumers="all"),
                             select, decisions=decs)
