"""hsic_jax.prune_model: user-style CNNs pruned in one call; the thin model computes what the masked dense model
computes, its counted MACs land on the target, and the plan rebuilds it from the dense state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
from tests._models import masked_copy


def _bn(c, rngs):
  return nnx.BatchNorm(c, rngs=rngs)


def _pool(h):
  return jnp.mean(h, axis=(1, 2))


class Plain(nnx.Module):
  def __init__(self, rngs):
    self.c1, self.b1 = nnx.Conv(3, 8, (3, 3), rngs=rngs), _bn(8, rngs)
    self.c2, self.b2 = nnx.Conv(8, 8, (3, 3), rngs=rngs), _bn(8, rngs)
    self.fc = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b1(self.c1(x)))
    return self.fc(_pool(nnx.relu(self.b2(self.c2(h)))))


class Concat(nnx.Module):
  def __init__(self, rngs):
    self.a, self.ba = nnx.Conv(3, 4, (3, 3), rngs=rngs), _bn(4, rngs)
    self.b, self.bb = nnx.Conv(3, 6, (1, 1), rngs=rngs), _bn(6, rngs)
    self.c, self.bc = nnx.Conv(10, 6, (3, 3), rngs=rngs), _bn(6, rngs)
    self.fc = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = jnp.concatenate([nnx.relu(self.ba(self.a(x))), nnx.relu(self.bb(self.b(x)))], axis=-1)
    return self.fc(_pool(nnx.relu(self.bc(self.c(h)))))


class Depthwise(nnx.Module):
  def __init__(self, rngs):
    self.c1, self.b1 = nnx.Conv(3, 8, (1, 1), rngs=rngs), _bn(8, rngs)
    self.dw, self.b2 = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs), _bn(8, rngs)
    self.pw, self.b3 = nnx.Conv(8, 6, (1, 1), rngs=rngs), _bn(6, rngs)
    self.fc = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b2(self.dw(nnx.relu(self.b1(self.c1(x))))))
    return self.fc(_pool(nnx.relu(self.b3(self.pw(h)))))


class Grouped(nnx.Module):
  def __init__(self, rngs):
    self.c1, self.b1 = nnx.Conv(3, 8, (3, 3), rngs=rngs), _bn(8, rngs)
    self.g, self.b2 = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs), _bn(8, rngs)
    self.c3, self.b3 = nnx.Conv(8, 6, (3, 3), rngs=rngs), _bn(6, rngs)
    self.c4, self.b4 = nnx.Conv(6, 6, (3, 3), rngs=rngs), _bn(6, rngs)
    self.fc = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b2(self.g(nnx.relu(self.b1(self.c1(x))))))
    h = nnx.relu(self.b3(self.c3(h)))
    return self.fc(_pool(nnx.relu(self.b4(self.c4(h)))))


class SEGate(nnx.Module):
  def __init__(self, rngs):
    self.c1, self.b1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs), _bn(8, rngs)
    self.se1, self.se2 = nnx.Linear(8, 4, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)
    self.c2, self.b2 = nnx.Conv(8, 6, (3, 3), rngs=rngs), _bn(6, rngs)
    self.fc = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b1(self.c1(x)))
    g = nnx.sigmoid(self.se2(nnx.relu(self.se1(_pool(h)))))
    return self.fc(_pool(nnx.relu(self.b2(self.c2(h * g[:, None, None, :])))))


class Transposed(nnx.Module):
  def __init__(self, rngs):
    self.c1, self.b1 = nnx.Conv(3, 8, (3, 3), strides=(2, 2), rngs=rngs), _bn(8, rngs)
    self.up, self.b2 = nnx.ConvTranspose(8, 6, (3, 3), strides=(2, 2), rngs=rngs), _bn(6, rngs)
    self.c3 = nnx.Conv(6, 4, (3, 3), rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b2(self.up(nnx.relu(self.b1(self.c1(x))))))
    return self.c3(h)  # a dense prediction: (n, 8, 8, 4)


class GroupNormNet(nnx.Module):
  def __init__(self, rngs):
    self.c1, self.gn = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.c2, self.b2 = nnx.Conv(8, 8, (3, 3), rngs=rngs), _bn(8, rngs)
    self.c3, self.b3 = nnx.Conv(8, 6, (3, 3), rngs=rngs), _bn(6, rngs)
    self.fc = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b2(self.c2(nnx.relu(self.gn(self.c1(x))))))
    return self.fc(_pool(nnx.relu(self.b3(self.c3(h)))))


class Split(nnx.Module):
  def __init__(self, rngs):
    self.a, self.b = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn = _bn(10, rngs)
    self.pa, self.pb = nnx.Conv(4, 8, (3, 3), rngs=rngs), nnx.Conv(6, 8, (1, 1), rngs=rngs)
    self.b2 = _bn(8, rngs)
    self.fc = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(jnp.concatenate([self.a(x), self.b(x)], axis=-1)))
    left, right = jnp.split(h, [self.a.out_features], axis=-1)  # follows the thin model's width
    return self.fc(_pool(nnx.relu(self.b2(self.pa(left) + self.pb(right)))))


class Residual(nnx.Module):
  def __init__(self, rngs):
    self.stem, self.b0 = nnx.Conv(3, 8, (3, 3), rngs=rngs), _bn(8, rngs)
    self.c1, self.b1 = nnx.Conv(8, 8, (3, 3), rngs=rngs), _bn(8, rngs)
    self.c2, self.b2 = nnx.Conv(8, 8, (3, 3), rngs=rngs), _bn(8, rngs)
    self.d1, self.db1 = nnx.Conv(8, 12, (3, 3), strides=(2, 2), rngs=rngs), _bn(12, rngs)
    self.d2, self.db2 = nnx.Conv(12, 12, (3, 3), rngs=rngs), _bn(12, rngs)
    self.proj, self.pbn = nnx.Conv(8, 12, (1, 1), strides=(2, 2), rngs=rngs), _bn(12, rngs)
    self.fc = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.b0(self.stem(x)))
    h = nnx.relu(h + self.b2(self.c2(nnx.relu(self.b1(self.c1(h))))))
    h = nnx.relu(self.pbn(self.proj(h)) + self.db2(self.d2(nnx.relu(self.db1(self.d1(h))))))
    return self.fc(_pool(h))


class TwoInputs(nnx.Module):
  def __init__(self, rngs):
    self.a, self.ba = nnx.Conv(3, 6, (3, 3), rngs=rngs), _bn(6, rngs)
    self.b, self.bb = nnx.Conv(1, 6, (3, 3), rngs=rngs), _bn(6, rngs)
    self.c, self.bc = nnx.Conv(6, 4, (3, 3), strides=(2, 2), rngs=rngs), _bn(4, rngs)
    self.fc = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

  def __call__(self, x1, x2):
    h = nnx.relu(self.ba(self.a(x1))) + nnx.relu(self.bb(self.b(x2)))
    h = nnx.relu(self.bc(self.c(h)))
    return self.fc(h.reshape(h.shape[0], -1))  # a channels-last flatten into the classifier


def _inputs(model, n=16, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 8, 8, 3)).astype(np.float32))
  if isinstance(model, TwoInputs):
    return (x, jnp.asarray(rng.normal(size=(n, 8, 8, 1)).astype(np.float32)))
  return (x,)


def _check(model_cls, method):
  model = model_cls(nnx.Rngs(0))
  args = _inputs(model)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  batches = [tuple(a[:8] for a in args), tuple(a[8:] for a in args)]
  tol = 0.1  # tiny models: a width step moves the MACs by several percent
  res = hj.prune_model(model, batches, target={"macs": 0.6}, method=method, settings={"tolerance": tol})
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))))
  assert any(w.pruned < w.dense for w in res.widths.values()), res.widths
  thin = res.model
  thin.eval()
  out = thin(*args)
  ref = masked_copy(model, res.groups, res.report["keep"])(*args)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
  counted = hj.count_macs(thin, *args)
  assert counted.macs == res.pruned.macs and counted.params == res.pruned.params
  target = 0.6 * res.dense.macs
  if method == "itpruner":  # a budget
    assert counted.macs <= target
  else:
    assert abs(counted.macs - target) <= tol * target, (counted.macs, target)
  rebuilt = hj.apply_plan(nnx.to_pure_dict(nnx.state(model)), res.groups, res.plan).state
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rebuilt),
               jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(thin))))


FAST = [Plain]
SLOW = [Concat, Depthwise, Grouped, SEGate, Transposed, GroupNormNet, Split, Residual, TwoInputs]


@pytest.mark.parametrize("method", ["apib", "itpruner"])
@pytest.mark.parametrize("model_cls", FAST)
def test_user_cnn_pruned_in_one_call(model_cls, method):
  _check(model_cls, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["apib", "itpruner"])
@pytest.mark.parametrize("model_cls", SLOW)
def test_user_cnn_pruned_in_one_call_slow(model_cls, method):
  _check(model_cls, method)


def test_unreachable_target_and_bad_arguments_are_named():
  model = Plain(nnx.Rngs(0))
  (x,) = _inputs(model)
  with pytest.raises(ValueError, match=r"target macs .* is outside what .* can reach: reachable range \["):
    hj.prune_model(model, x, target={"macs": 0.01}, method="uniform")
  with pytest.raises(ValueError, match="target must be a one-entry mapping"):
    hj.prune_model(model, x, target=0.5)
  with pytest.raises(ValueError, match="above the dense model's"):
    hj.prune_model(model, x, target={"params": 1e12})
  with pytest.raises(ValueError, match="needs loss gradients"):
    hj.prune_model(model, x, method="uniform", criterion="taylor")
  with pytest.raises(ValueError, match="unknown criterion"):
    hj.prune_model(model, x, criterion="nope")


def test_labels_feed_the_taylor_criterion_and_a_params_target():
  model = Plain(nnx.Rngs(1))
  (x,) = _inputs(model, seed=1)
  labels = np.arange(16) % 4
  res = hj.prune_model(model, [(x[:8], labels[:8]), (x[8:], labels[8:])], target={"params": 0.7}, method="global",
                       criterion="taylor", settings={"tolerance": 0.05})
  assert res.report["criterion"] == "taylor" and res.report["target_key"] == "params"
  assert abs(res.pruned.params - 0.7 * res.dense.params) <= 0.05 * 0.7 * res.dense.params
