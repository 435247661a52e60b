"""The training step: 8 simulated devices equal one, the recipe's pieces against hand-derived values, BatchNorm
re-estimation against a numpy oracle, and evaluation that drops no example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import models
from train import train as train_lib


def _recipe(**kw):
  cfg = ml_collections.ConfigDict(dict(epochs=2, batch_size=16, lr=0.1, momentum=0.9, nesterov=True,
                                       warmup_epochs=0.5, weight_decay=1e-4, decay_bn_and_bias=False,
                                       label_smoothing=0.1, distill_weight=0.5, distill_temperature=4.0))
  cfg.update(kw)
  return cfg


def _model(seed=0):
  return models.get_model("resnet20", [8] * 7 + [16] * 6 + [32] * 6, rngs=nnx.Rngs(seed))


def _batch(n=16, side=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, side, side, 3)).astype(np.float32),
          "label": rng.integers(0, 10, size=n).astype(np.int32)}


def _one_step(mesh, steps=2):
  model, teacher = _model(0), _model(1)
  cfg = _recipe()
  split = train_lib.split_model(model)
  lr_fn = train_lib.create_learning_rate_fn(cfg, steps_per_epoch=4)
  tx = train_lib.create_optimizer(cfg, lr_fn, split.params)
  t_split = train_lib.split_model(teacher)
  step = train_lib.make_train_step(split, tx, cfg, lr_fn, t_split)
  state = train_lib.replicate(train_lib.init_state(split, tx), mesh)
  t_vars = train_lib.replicate((t_split.params, t_split.batch_stats), mesh)
  for k in range(steps):
    state, metrics = step(state, train_lib.shard_batch(_batch(seed=k), mesh), t_vars)
  return jax.device_get(state), jax.device_get(metrics)


def test_eight_devices_equal_one():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
  one, m1 = _one_step(train_lib.make_mesh(jax.devices()[:1]))
  eight, m8 = _one_step(train_lib.make_mesh(jax.devices()[:8]))
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(eight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  # The batch really was split: a sharded batch lives on 8 devices.
  mesh = train_lib.make_mesh(jax.devices()[:8])
  assert len(train_lib.shard_batch(_batch(), mesh)["image"].sharding.device_set) == 8


def test_batch_size_must_split_over_the_devices():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    train_lib.check_batch_size(12, train_lib.make_mesh(jax.devices()[:8]), "finetune")


def test_learning_rate_schedule_by_hand():
  cfg = _recipe(epochs=2, warmup_epochs=0.5, lr=0.4)
  fn = train_lib.create_learning_rate_fn(cfg, steps_per_epoch=10)  # 20 steps, 5 of warmup
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(5)), 0.4, rtol=1e-6)
  np.testing.assert_allclose(float(fn(5 + 15 // 2)), 0.4 * 0.5 * (1 + np.cos(np.pi * 7 / 15)), rtol=1e-5)
  np.testing.assert_allclose(float(fn(20)), 0.0, atol=1e-7)


def test_weight_decay_mask_spares_bn_and_biases():
  split = train_lib.split_model(_model())
  mask = train_lib.decay_mask(split.params, decay_bn_and_bias=False)
  assert mask["stem"]["conv"]["kernel"] and not mask["stem"]["bn"]["scale"] and not mask["fc"]["bias"]
  assert all(jax.tree_util.tree_leaves(train_lib.decay_mask(split.params, decay_bn_and_bias=True)))


def test_distillation_and_smoothing_by_hand():
  s = jnp.array([[2.0, 0.0, -1.0]])
  t = jnp.array([[0.5, 1.5, 0.0]])
  T = 2.0
  ps, pt = np.exp(np.array(s) / T), np.exp(np.array(t) / T)
  ps, pt = ps / ps.sum(), pt / pt.sum()
  want = T * T * np.sum(pt * np.log(pt / ps))
  np.testing.assert_allclose(float(train_lib.distillation(s, t, T)[0]), want, rtol=1e-5)
  # Label smoothing 0.3 over 3 classes: targets (0.8, 0.1, 0.1) for label 0.
  p = np.exp(np.array(s[0])) / np.exp(np.array(s[0])).sum()
  want_ce = -(0.8 * np.log(p[0]) + 0.1 * np.log(p[1]) + 0.1 * np.log(p[2]))
  np.testing.assert_allclose(float(train_lib.cross_entropy(s, jnp.array([0]), 0.3)[0]), want_ce, rtol=1e-5)


def test_bn_recalibration_is_the_mean_of_batch_statistics():
  model = models.get_model("vgg16", [4] * 13, num_classes=3, rngs=nnx.Rngs(0))
  batches = [_batch(n=8, side=32, seed=s) for s in range(3)]
  mesh = train_lib.make_mesh(jax.devices()[:1])
  out = train_lib.recalibrate_batch_norm(model, iter(batches), 3, mesh)
  # conv1's BN sees conv1's raw output: its statistics are those of the batches' conv outputs (numpy oracle).
  kernel = np.asarray(model.conv1.kernel[...])
  means, variances = [], []
  for b in batches:
    y = np.asarray(jax.lax.conv_general_dilated(b["image"], kernel, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")))
    means.append(y.mean(axis=(0, 1, 2)))
    variances.append(y.var(axis=(0, 1, 2)))
  np.testing.assert_allclose(np.asarray(out.bn1.mean[...]), np.mean(means, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.bn1.var[...]), np.mean(variances, 0), rtol=1e-3, atol=1e-5)


def test_evaluate_counts_every_real_example_once():
  model = _model()
  mesh = train_lib.make_mesh(jax.devices()[:1])
  b1, b2 = _batch(n=8, seed=0), _batch(n=8, seed=1)
  b1["mask"] = np.ones(8, bool)
  b2["mask"] = np.array([True] * 3 + [False] * 5)
  got = train_lib.evaluate(model, iter([b1, b2]), mesh)
  logits = np.concatenate([np.asarray(model(b1["image"])), np.asarray(model(b2["image"][:3]))])
  labels = np.concatenate([b1["label"], b2["label"][:3]])
  assert got["examples"] == 11
  np.testing.assert_allclose(got["top1"], np.mean(np.argmax(logits, -1) == labels), atol=1e-6)


def test_device_batches_normalise_on_the_mesh_in_order_and_close_the_source():
  mesh = train_lib.make_mesh(jax.devices())
  rng = np.random.default_rng(0)
  host = [{"image": rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8), "label": np.arange(8, dtype=np.int32) + k}
          for k in range(5)]
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  closed = []

  def source():
    try:
      yield from host
    finally:
      closed.append(True)

  got = list(train_lib.device_batches(source(), mesh, mean=mean, std=std, prefetch=2))
  assert len(got) == 5 and closed == [True]
  for g, h in zip(got, host):
    assert g["image"].dtype == jnp.float32 and len(g["image"].sharding.device_set) == len(jax.devices())
    # Oracle: the normalisation by hand in float64.
    want = (h["image"] / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(np.asarray(g["image"]), want, rtol=1e-5, atol=1e-5)
    # And bit for bit what the host's normalisation (calibration images) gives.
    np.testing.assert_array_equal(np.asarray(g["image"]), models.cifar10.normalize(h["image"], mean, std))
    np.testing.assert_array_equal(np.asarray(g["label"]), h["label"])
    assert train_lib.shard_batch(g, mesh)["image"] is g["image"]  # already placed: kept
  stream = train_lib.device_batches(source(), mesh, mean=mean, std=std, prefetch=0)
  next(stream)
  stream.close()
  assert closed == [True, True]
  with pytest.raises(ValueError, match="is float32; expected the data layer's uint8"):
    next(train_lib.device_batches(iter([{"image": np.zeros((8, 2, 2, 3), np.float32)}]), mesh, mean=mean, std=std))
  with pytest.raises(ValueError, match="prefetch=-1"):
    next(train_lib.device_batches(iter(host), mesh, mean=mean, std=std, prefetch=-1))
