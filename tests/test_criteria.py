"""Baseline criteria and the scores' scale against values derived by hand, numpy and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

import models
from hsic_jax import criteria
from hsic_jax.groups import ChannelGroup, ChannelSlice


def _conv_group(name: str = "conv", size: int = 3, bn: bool = False, bias: bool = False) -> ChannelGroup:
  members = [ChannelSlice(("conv", "kernel"), 3, "out")]
  if bias:
    members.append(ChannelSlice(("conv", "bias"), 0, "out"))
  if bn:
    members += [ChannelSlice(("bn", k), 0, "out") for k in ("scale", "bias", "mean", "var")]
  members.append(ChannelSlice(("next", "kernel"), 2, "in"))
  return ChannelGroup(name, size, tuple(members))


def _kernel() -> np.ndarray:
  # Three 1x1x2 filters: w0 = (1, -1), w1 = (3, 4), w2 = (0, 0.5).
  k = np.zeros((1, 1, 2, 3))
  k[0, 0, :, 0] = [1.0, -1.0]
  k[0, 0, :, 1] = [3.0, 4.0]
  k[0, 0, :, 2] = [0.0, 0.5]
  return k


def _state(**extra) -> dict:
  st = {"conv": {"kernel": _kernel()}, "next": {"kernel": np.ones((1, 1, 3, 2))}}
  st.update(extra)
  return st


def test_l1_l2_fpgm_by_hand():
  g, st = _conv_group(), _state()
  np.testing.assert_allclose(criteria.channel_scores("l1", g, state=st), [2.0, 7.0, 0.5])
  np.testing.assert_allclose(criteria.channel_scores("l2", g, state=st), [math.sqrt(2), 5.0, 0.5])
  d01, d02, d12 = math.hypot(2, 5), math.hypot(1, 1.5), math.hypot(3, 3.5)
  fpgm = criteria.channel_scores("fpgm", g, state=st)
  np.testing.assert_allclose(fpgm, [d01 + d02, d01 + d12, d02 + d12], rtol=1e-6)
  assert np.argsort(fpgm).tolist() == [2, 0, 1]  # 1.80 + 4.61 < 5.39 + 1.80 < 5.39 + 4.61: w2 is nearest the median


def test_fpgm_matches_scipy_with_chunking(monkeypatch):
  from scipy.spatial.distance import cdist
  rng = np.random.default_rng(0)
  k = rng.normal(size=(3, 3, 4, 7))
  g = ChannelGroup("c", 7, (ChannelSlice(("conv", "kernel"), 3, "out"),))
  w = np.moveaxis(k, 3, 0).reshape(7, -1)
  monkeypatch.setattr(criteria, "CHUNK_ELEMENTS", 7 * 36 * 3)  # 3 rows per block: 7 rows padded to 9
  np.testing.assert_allclose(criteria.channel_scores("fpgm", g, state={"conv": {"kernel": k}}),
                             cdist(w, w).sum(1), rtol=1e-5)


def test_l1_sums_kernel_members_and_spatial_offset():
  # Two producing kernels; the second holds the group's channels at offset 1 of 4 on its axis.
  a, b = np.arange(6.0).reshape(3, 2), np.arange(8.0).reshape(2, 4) - 3
  g = ChannelGroup("g", 2, (ChannelSlice(("a",), 1, "out"), ChannelSlice(("b",), 1, "out", offset=1)))
  expect = np.abs(a).sum(0) + np.abs(b[:, 1:3]).sum(0)
  np.testing.assert_allclose(criteria.channel_scores("l1", g, state={"a": a, "b": b}), expect)


def test_bn_scale_and_no_bn():
  st = _state(bn={"scale": np.array([0.2, -0.7, 0.1]), "bias": np.zeros(3), "mean": np.zeros(3),
                  "var": np.ones(3)})
  np.testing.assert_allclose(criteria.channel_scores("bn_scale", _conv_group(bn=True), state=st), [0.2, 0.7, 0.1])
  with pytest.raises(ValueError, match="BatchNorm"):
    criteria.channel_scores("bn_scale", _conv_group(), state=_state())


def test_taylor_bn_gate_and_kernel_form():
  st = _state(bn={"scale": np.array([2.0, 1.0, -1.0]), "bias": np.array([0.5, 0.0, 1.0]), "mean": np.zeros(3),
                  "var": np.ones(3)})
  grads = {"bn": {"scale": np.array([1.0, -2.0, 0.5]), "bias": np.array([2.0, 9.0, 1.0]),
                  "mean": np.zeros(3), "var": np.zeros(3)}, "conv": {"kernel": np.ones((1, 1, 2, 3))}}
  # (2*1 + 0.5*2)^2 = 9, (1*-2 + 0*9)^2 = 4, (-1*0.5 + 1*1)^2 = 0.25; the conv kernel does not enter.
  np.testing.assert_allclose(criteria.channel_scores("taylor", _conv_group(bn=True), state=st, grads=grads),
                             [9.0, 4.0, 0.25])
  st2 = _state(conv={"kernel": _kernel(), "bias": np.array([1.0, 2.0, 3.0])})
  g2 = {"conv": {"kernel": np.full((1, 1, 2, 3), 2.0), "bias": np.array([1.0, 1.0, -1.0])}}
  # sum of w * g over the filter and its bias: (2*0 + 1)^2, (2*7 + 2)^2, (2*0.5 - 3)^2.
  np.testing.assert_allclose(criteria.channel_scores("taylor", _conv_group(bias=True), state=st2, grads=g2),
                             [1.0, 256.0, 4.0])
  with pytest.raises(ValueError, match="grads"):
    criteria.channel_scores("taylor", _conv_group(bias=True), state=st2,
                            grads={"conv": {"kernel": g2["conv"]["kernel"]}})


def test_hrank_known_ranks():
  rng = np.random.default_rng(1)
  n, h = 2, 5
  acts = np.zeros((n, h, h, 4), np.float32)
  u, v = rng.normal(size=h), rng.normal(size=h)
  acts[:, :, :, 0] = np.outer(u, v)  # rank 1
  acts[:, :, :, 1] = np.eye(h)  # rank h
  acts[0, :, :, 2] = rng.normal(size=(h, h))  # full rank in image 0, zero (rank 0) in image 1
  acts[:, :, :, 3] = np.outer(u, v) + np.outer(v, u)  # rank 2
  got = criteria.channel_scores("hrank", ChannelGroup("g", 4, ()), activations=acts)
  oracle = [np.mean([np.linalg.matrix_rank(acts[i, :, :, c]) for i in range(n)]) for c in range(4)]
  np.testing.assert_allclose(got, [1.0, h, h / 2, 2.0])
  np.testing.assert_allclose(got, oracle)


def _nuc(a: np.ndarray) -> float:
  return float(np.linalg.svd(a, compute_uv=False).sum())


@pytest.mark.parametrize("hw", [(1, 2), (3, 4)])  # h*w < c (no reduction) and h*w > c (the QR reduction)
def test_chip_against_svd(hw, monkeypatch):
  h, w = hw
  c, n = 5, 3
  rng = np.random.default_rng(2)
  acts = rng.normal(size=(n, h, w, c)).astype(np.float32)
  acts[..., 1] = acts[..., 0]  # a copy
  acts[..., 3] = 0.0  # a zero channel
  monkeypatch.setattr(criteria, "CHUNK_ELEMENTS", 2 * c * min(c, h * w))  # 2 channels per call, 1 image per call
  got = criteria.channel_scores("chip", ChannelGroup("g", c, ()), activations=acts)
  oracle = np.zeros(c)
  for i in range(n):
    a = acts[i].reshape(h * w, c).T.astype(np.float64)
    for k in range(c):
      b = a.copy()
      b[k] = 0.0
      oracle[k] += (_nuc(a) - _nuc(b)) / n
  np.testing.assert_allclose(got, oracle, rtol=1e-4, atol=1e-4)
  assert abs(got[3]) < 1e-4


def test_chip_copy_by_hand():
  # Rows a, a, b with a = (3, 0, 0, 0), b = (0, 0, 2, 0): sigma = (3 sqrt 2, 2), removing a copy leaves (3, 2).
  acts = np.zeros((1, 2, 2, 3), np.float32)
  acts[0, 0, 0, :2] = 3.0
  acts[0, 1, 0, 2] = 2.0
  got = criteria.channel_scores("chip", ChannelGroup("g", 3, ()), activations=acts)
  np.testing.assert_allclose(got, [3 * math.sqrt(2) - 3, 3 * math.sqrt(2) - 3, 2.0], rtol=1e-5)


def test_random_seeded_per_group():
  a = criteria.channel_scores("random", ChannelGroup("a", 50, ()), seed=3)
  assert np.array_equal(a, criteria.channel_scores("random", ChannelGroup("a", 50, ()), seed=3))
  assert not np.array_equal(a, criteria.channel_scores("random", ChannelGroup("b", 50, ()), seed=3))
  assert not np.array_equal(a, criteria.channel_scores("random", ChannelGroup("a", 50, ()), seed=4))
  assert np.all((a >= 0) & (a < 1))


def test_registry():
  names = criteria.criterion_names()
  assert set(names) >= {"random", "l1", "l2", "fpgm", "bn_scale", "taylor", "hrank", "chip"}
  criteria.register_criterion("test_last", lambda g, *, state, **_: np.arange(g.size, 0, -1.0),
                              needs=frozenset({"weights"}))
  try:
    assert criteria.criterion_needs("test_last") == {"weights"}
    np.testing.assert_array_equal(criteria.channel_scores("test_last", _conv_group(), state=_state()), [3, 2, 1])
    with pytest.raises(ValueError, match="already registered"):
      criteria.register_criterion("test_last", lambda g, **_: np.zeros(g.size))
    with pytest.raises(ValueError, match=r"\['weights'\]"):
      criteria.channel_scores("test_last", _conv_group())
    criteria.register_criterion("test_last", lambda g, **_: np.array([1.0, np.nan, 0.0]), replace=True)
    with pytest.raises(ValueError, match="test_last.*non-finite.*conv"):
      criteria.channel_scores("test_last", _conv_group())
    criteria.register_criterion("test_last", lambda g, **_: np.zeros(2), replace=True)
    with pytest.raises(ValueError, match="shape"):
      criteria.channel_scores("test_last", _conv_group())
  finally:
    criteria.unregister_criterion("test_last")
  assert "test_last" not in criteria.criterion_names()
  with pytest.raises(ValueError, match="unknown criterion 'nope'.*l1"):
    criteria.channel_scores("nope", _conv_group())
  with pytest.raises(ValueError, match="needs"):
    criteria.register_criterion("x", lambda g, **_: 0, needs=frozenset({"labels"}))
  with pytest.raises(ValueError, match="activations"):
    criteria.channel_scores("hrank", _conv_group())
  with pytest.raises(ValueError, match=r"\(n, h, w, 3\)"):
    criteria.channel_scores("hrank", _conv_group(), activations=np.ones((2, 4, 4, 5)))


def test_keep_for_widths():
  keep = criteria.keep_for_widths([np.array([0.3, 0.1, 0.9, 0.9]), np.array([1.0, 2.0])], [2, 1])
  assert [k.tolist() for k in keep] == [[2, 3], [1]]
  keep = criteria.keep_for_widths([np.array([0.3, 0.1, 0.9, 0.5])], [1], multiple=3)
  assert keep[0].tolist() == [0, 2, 3]
  with pytest.raises(ValueError, match="widths"):
    criteria.keep_for_widths([np.ones(3)], [4])


def test_l1_on_resnet20_group():
  model = models.get_model("resnet20", rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(model))
  kernel = ("stage2", "block1", "conv2", "kernel")
  group = next(g for g in model.channel_groups()
               if g.prunable and any(m.role == "in" and tuple(m.path) == kernel for m in g.members))
  conv1 = np.asarray(state["stage2"]["block1"]["conv1"]["kernel"])  # (3, 3, c_in, c_out)
  expect = np.abs(conv1).reshape(-1, conv1.shape[-1]).sum(0)
  np.testing.assert_allclose(criteria.channel_scores("l1", group, state=state), expect, rtol=1e-6)
  np.testing.assert_allclose(criteria.channel_scores("bn_scale", group, state=state),
                             np.abs(np.asarray(state["stage2"]["block1"]["bn1"]["scale"])))
