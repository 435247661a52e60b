"""Tests of the MACs/params counter against published values and hand-derived formulas."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import models
from models import flops, summary

# Dense conv+fc MACs and params in millions, as published with their decimals (algorithms.md section 4).
DENSE = {
    "vgg16": ("313.46", "14.99"),
    "resnet20": ("40.55", "0.270"),
    "resnet56": ("125.49", "0.853"),
    "resnet110": ("252.89", "1.728"),
    "resnet50": ("4089.18", "25.557"),
    "googlenet": ("1521.76", "6.166"),
}

# ITPruner's published ResNet-50 width lists (MAC-AutoML/ITPruner, Imagenet/run_scripts/train/
# train_resnet50_{2300m,2000m,1800m}.sh) and their real MACs/params from algorithms.md section 4.
ITPRUNER_R50 = {
    "2.3G": ([52, 55, 55, 146, 55, 55, 55, 55, 105, 111, 232, 111, 111, 111, 111, 111, 111, 211, 222, 290, 222, 222,
              222, 222, 222, 222, 222, 222, 222, 222, 423, 442, 1453, 442, 442, 442, 442], 2235.6e6, 14.71e6),
    "2.0G": ([50, 53, 54, 125, 54, 54, 54, 54, 101, 108, 179, 107, 107, 107, 107, 107, 107, 203, 216, 148, 215, 215,
              215, 215, 215, 215, 215, 215, 215, 215, 407, 429, 1341, 429, 429, 429, 428], 1943.3e6, 12.98e6),
    "1.8G": ([48, 52, 52, 110, 52, 52, 52, 52, 98, 105, 142, 105, 105, 105, 105, 105, 105, 197, 211, 48, 211, 211,
              211, 211, 211, 211, 211, 211, 211, 211, 397, 420, 1264, 419, 419, 419, 418], 1742.4e6, 11.84e6),
}


def rel(a: float, b: float) -> float:
  return abs(a - b) / b


@pytest.mark.parametrize("name", sorted(DENSE))
def test_dense_values(name: str):
  c = flops.count(name)
  for got, published in ((c.macs, DENSE[name][0]), (c.params, DENSE[name][1])):
    decimals = len(published.split(".")[1])
    assert f"{got / 1e6:.{decimals}f}" == published, (name, got)  # equal at the published precision
    assert rel(got, float(published) * 1e6) < 2e-3


def test_exact_dense_counts():
  # Exact integers (hand-checkable): VGG conv part is 313,196,544 and its two FCs 512*512 + 512*10.
  vgg = flops.count("vgg16")
  assert vgg.macs == 313_196_544 + 512 * 512 + 512 * 10
  assert sum(r.macs for r in vgg.layers if r.kind == "conv") == 313_196_544
  assert flops.count("resnet50").params == 25_557_032
  assert flops.count("mobilenetv2_imagenet").params == 3_504_872  # torchvision's mobilenet_v2
  assert rel(flops.count("mobilenetv2_imagenet").macs, 300.8e6) < 2e-3


@pytest.mark.parametrize("cfg", sorted(ITPRUNER_R50))
def test_itpruner_resnet50_cfgs(cfg: str):
  widths, macs, params = ITPRUNER_R50[cfg]
  c = flops.count("resnet50", widths)
  assert rel(c.macs, macs) < 1e-3 and rel(c.params, params) < 1e-3


def test_itpruner_vgg_cfg():
  c = flops.count("vgg16", [44, 35, 71, 71, 145, 104, 145, 290, 205, 325, 432, 429, 469])
  assert rel(c.macs, 99.48e6) < 1e-3 and rel(c.params, 6.95e6) < 1e-3


def test_resnet20_one_block_delta():
  dense = flops.count("resnet20")
  for block, side, out in ((0, 32, 16), (4, 16, 32)):
    ws = models.default_widths("resnet20")
    idx = 1 + 2 * block
    delta = -5
    ws[idx] += delta
    thin = flops.count("resnet20", ws)
    cin = out  # neither block is a stage's first block with stride, so conv1 reads its own stage's stream
    expect = 9 * cin * side * side * delta + 9 * out * side * side * delta
    assert thin.macs - dense.macs == expect
    if block == 0:
      assert expect == 2 * 9 * 16 * 32 * 32 * delta
    # params: conv1 out + bn1 (2 per channel) + conv2 in.
    assert thin.params - dense.params == (9 * cin + 2 + 9 * out) * delta


def resnet_cifar_by_hand(ws: list[int], classes: int = 10) -> tuple[int, int]:
  """MACs and params of a CIFAR ResNet from its width list, written out from the architecture."""
  n = (len(ws) - 1) // 6
  macs = 3 * ws[0] * 9 * 32 * 32
  params = 3 * ws[0] * 9 + 2 * ws[0]
  cin = ws[0]
  for k in range(3 * n):
    s = 32 >> (k // n)
    mid, out = ws[1 + 2 * k], ws[2 + 2 * k]
    macs += (cin * mid + mid * out) * 9 * s * s
    params += (cin * mid + mid * out) * 9 + 2 * mid + 2 * out
    cin = out
  return macs + cin * classes, params + cin * classes + classes


def vgg_by_hand(ws: list[int], classes: int = 10) -> tuple[int, int]:
  side, cin, macs, params = 32, 3, 0, 0
  for k, w in enumerate(ws, start=1):
    macs += cin * w * 9 * side * side
    params += cin * w * 9 + 2 * w
    if k in (2, 4, 7, 10):
      side //= 2
    cin = w
  macs += cin * 512 + 512 * classes
  params += cin * 512 + 512 + 2 * 512 + 512 * classes + classes
  return macs, params


def resnet50_by_hand(ws: list[int], classes: int = 1000) -> tuple[int, int]:
  macs = 3 * ws[0] * 49 * 112 * 112
  params = 3 * ws[0] * 49 + 2 * ws[0]
  cin, i, side = ws[0], 1, 56
  for s, n in enumerate((3, 4, 6, 3)):
    w = ws[i + 2]
    for j in range(n):
      p1, p2 = ws[i], ws[i + 1]
      i += 3 if j == 0 else 2
      out_side = side // 2 if (s > 0 and j == 0) else side
      macs += cin * p1 * side * side + p1 * p2 * 9 * out_side ** 2 + p2 * w * out_side ** 2
      params += cin * p1 + 9 * p1 * p2 + p2 * w + 2 * (p1 + p2 + w)
      if j == 0:
        macs += cin * w * out_side ** 2
        params += cin * w + 2 * w
      cin, side = w, out_side
  return macs + cin * classes, params + cin * classes + classes


def random_widths(name: str, rng: np.random.Generator) -> list[int]:
  """Random widths: every prunable group scaled independently; residual streams scaled per stage."""
  model_groups = _groups(name)
  ws = models.default_widths(name)
  for g in model_groups:
    if g.prunable or name == "resnet50":
      new = int(rng.integers(1, g.size + 1))
      for i in g.width_indices:
        ws[i] = new
  return ws


_GROUP_CACHE: dict[str, list] = {}


def _groups(name: str) -> list:
  if name not in _GROUP_CACHE:
    from flax import nnx
    _GROUP_CACHE[name] = nnx.eval_shape(lambda: models.get_model(name, rngs=nnx.Rngs(0))).channel_groups()
  return _GROUP_CACHE[name]


@pytest.mark.parametrize("name, by_hand", [("resnet56", resnet_cifar_by_hand), ("resnet20", resnet_cifar_by_hand),
                                           ("vgg16", vgg_by_hand), ("resnet50", resnet50_by_hand)])
def test_random_widths_against_hand_formula(name: str, by_hand):
  rng = np.random.default_rng(0)
  for _ in range(5):
    ws = random_widths(name, rng)
    c = flops.count(name, ws)
    assert (c.macs, c.params) == by_hand(ws), ws
  assert (flops.count(name).macs, flops.count(name).params) == by_hand(models.default_widths(name))


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "googlenet", "mobilenetv2", "resnet50"])
def test_cached_count_equals_traced_count(name: str):
  ws = random_widths(name, np.random.default_rng(1))
  fast = flops.count(name, ws)
  exact = flops.count(name, ws, exact=True)
  assert fast.macs == exact.macs and fast.params == exact.params
  assert fast.layers == exact.layers


def test_repeated_calls_do_not_trace_the_model(monkeypatch: pytest.MonkeyPatch):
  # Counting for new widths is arithmetic on the cached structure: no model is built or traced again (a search over
  # widths calls count thousands of times).
  flops.count("resnet50")  # builds the cache
  ws = ITPRUNER_R50["2.3G"][0]
  want = flops.count("resnet50", ws, exact=True)

  def no_trace(*args, **kwargs):
    raise AssertionError("count traced the model again")

  monkeypatch.setattr(jax, "make_jaxpr", no_trace)
  monkeypatch.setattr(models, "get_model", no_trace)
  got = flops.count("resnet50", ws)
  assert got.macs == want.macs and got.params == want.params


def test_layer_rows():
  c = flops.count("resnet20")
  rows = {r.name: r for r in c.layers}
  assert c.layers[0].name == "stem/conv" and c.layers[-1].name == "fc"
  assert rows["stem/conv"].macs == 3 * 16 * 9 * 32 * 32 and rows["stem/conv"].out_hw == (32, 32)
  assert rows["stage2/block0/conv1"].out_hw == (16, 16) and rows["stage2/block0/conv1"].in_ch == 16
  assert rows["stage1/block0/bn1"].kind == "bn" and rows["stage1/block0/bn1"].params == 32
  assert rows["fc"].kind == "fc" and rows["fc"].macs == 640 and rows["fc"].params == 650
  assert sum(r.macs for r in c.layers) == c.macs and sum(r.params for r in c.layers) == c.params
  mb = {r.name: r for r in flops.count("mobilenetv2").layers}
  dw = mb["stage2/block0/depthwise"]
  assert dw.kind == "dwconv" and dw.in_ch == dw.out_ch == 96 and dw.macs == 9 * 96 * 32 * 32
  assert mb["stage3/block0/depthwise"].out_hw == (16, 16)


def test_count_model_on_any_module():
  """A non-registry module: a strided grouped conv, a per-pixel Dense and a pooled Dense, counted by hand."""
  from flax import nnx

  class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)
      self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=4, use_bias=False, rngs=rngs)
      self.pixel = nnx.Linear(8, 6, rngs=rngs)
      self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      h = self.pixel(self.grouped(self.conv(x)))
      return self.head(h.mean(axis=(1, 2)))

  c = flops.count_model(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), (16, 16), name="tiny")
  rows = {r.name: r for r in c.layers}
  assert rows["conv"].macs == 8 * 8 * 3 * 8 * 9 and rows["conv"].params == 3 * 8 * 9 + 8
  assert rows["grouped"].macs == 8 * 8 * 2 * 8 * 9 and rows["grouped"].kind == "dwconv"
  assert rows["grouped"].in_ch == 8 and rows["grouped"].params == 2 * 8 * 9
  assert rows["pixel"].macs == 8 * 8 * 8 * 6 and rows["pixel"].out_hw == (8, 8)
  assert rows["head"].macs == 6 * 2
  assert c.macs == sum(r.macs for r in c.layers) and c.params == (216 + 8) + 144 + (48 + 6) + (12 + 2)


def test_bad_widths_raise():
  with pytest.raises(ValueError, match="must have 19 entries"):
    flops.count("resnet20", [16] * 3)
  with pytest.raises(ValueError, match="unknown model name"):
    flops.count("resnet18")
  ws = models.default_widths("resnet20")
  ws[2] = 12
  with pytest.raises(ValueError, match="equal within stage 1"):
    flops.count("resnet20", ws)


def test_summary_cli(capsys: pytest.CaptureFixture[str]):
  assert summary.main(["--model", "resnet20", "--json"]) == 0
  data = json.loads(capsys.readouterr().out)
  assert data["macs"] == flops.count("resnet20").macs and data["params"] == 269_722
  assert data["layers"][0]["name"] == "stem/conv" and data["layers"][0]["out_hw"] == [32, 32]
  ws = models.default_widths("resnet20")
  ws[1] = 8
  assert summary.main(["--model", "resnet20", "--widths", ",".join(map(str, ws))]) == 0
  out = capsys.readouterr().out
  assert "stage1/block0/conv1" in out and "38,191,744 MACs" in out and "vs dense" in out
  with pytest.raises(SystemExit):
    summary.main(["--model", "resnet20", "--widths", "1,2,3"])
  assert "must have 19 entries" in capsys.readouterr().err
  # With another class count the comparison is with the dense model of that class count: the dense 100-class
  # model is not "pruned" against the 10-class one, and a pruned 100-class one is compared with its own dense model.
  assert summary.main(["--model", "resnet20", "--num-classes", "100"]) == 0
  assert "vs dense" not in capsys.readouterr().out
  assert summary.main(["--model", "resnet20", "--num-classes", "100", "--widths", ",".join(map(str, ws))]) == 0
  ratio = flops.count("resnet20", ws, num_classes=100).params / flops.count("resnet20", num_classes=100).params
  assert f"{ratio:.4f} of params" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    summary.main(["--model", "resnet20", "--num-classes", "0"])
  assert "num_classes must be an integer >= 1" in capsys.readouterr().err
  # A Count carries its class count, so a table made from it alone compares with the right dense model.
  pruned = flops.count("resnet20", ws, num_classes=100)
  assert pruned.num_classes == 100 and pruned.to_dict()["num_classes"] == 100
  assert flops.count("resnet20").num_classes == 10 and flops.count("resnet50").num_classes == 1000
  assert flops.count("resnet20", ws, num_classes=100, exact=True).num_classes == 100
  assert f"{ratio:.4f} of params" in summary.format_table(pruned)
  # ... and its input size: a model counted at 64x64 is compared with the dense model at 64x64.
  from flax import nnx  # pylint: disable=import-outside-toplevel
  big = flops.count_model(models.get_model("resnet20", ws, num_classes=100, rngs=nnx.Rngs(0)), (64, 64),
                          name="resnet20")
  assert big.input_hw == (64, 64) and flops.count("resnet20").input_hw == (32, 32)
  dense32 = flops.count("resnet20", num_classes=100)
  fc = sum(layer.macs for layer in dense32.layers if layer.kind == "fc")  # after the global pool: not scaled
  dense64 = 4 * (dense32.macs - fc) + fc  # every conv sees 4x the pixels
  assert f"{big.macs / dense64:.4f} of MACs" in summary.format_table(big)
