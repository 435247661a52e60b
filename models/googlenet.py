"""GoogLeNet for CIFAR, the HRank variant that APIB prunes.

Architecture (NHWC, 32x32 input): a pre-layer conv3x3 (3 -> 192) + BN + ReLU; inception modules a3, b3 at 32x32,
max pool 3x3/2 (padding 1), a4..e4 at 16x16, max pool, a5, b5 at 8x8; global average pool; ``fc``. Every conv is
biased and followed by BN + ReLU. An inception module concatenates, in this order along channels:

  - ``branch1x1``: ``conv`` 1x1 (n1x1),
  - ``branch3x3``: ``conv1`` 1x1 (n3x3red) -> ``conv2`` 3x3 (n3x3),
  - ``branch5x5``: ``conv1`` 1x1 (n5x5red) -> ``conv2`` 3x3 (n5x5red2) -> ``conv3`` 3x3 (n5x5); the "5x5" is two 3x3,
  - ``branch_pool``: max pool 3x3/1 (padding 1) -> ``conv`` 1x1 (pool_planes).

Dense: 1521.76M MACs, 6.166M params.

Width list (27 ints): per module, in order a3, b3, a4, b4, c4, d4, e4, a5, b5, the three inner widths
``[n3x3red, n5x5red, n5x5red2]`` (APIB's 9x3 list, flattened row-major). These are the only widths APIB prunes;
module outputs (n1x1, n3x3, n5x5, pool_planes) are fixed. Default
``[96, 16, 32, 128, 32, 96, 96, 16, 48, 112, 24, 64, 128, 24, 64, 144, 32, 64, 160, 32, 128, 160, 32, 128, 192, 48,
128]``.

Parameter paths: ``stem/{conv,bn}``, ``{module}/branch1x1/{conv,bn}``, ``{module}/branch3x3/{conv1,bn1,conv2,bn2}``,
``{module}/branch5x5/{conv1,bn1,conv2,bn2,conv3,bn3}``, ``{module}/branch_pool/{conv,bn}``, ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice
from models import _common as c

STEM = 192


class Spec(NamedTuple):
  """Fixed widths of one inception module (``n5x5red2`` defaults to ``n5x5``)."""

  name: str
  n1x1: int
  n3x3red: int
  n3x3: int
  n5x5red: int
  n5x5red2: int
  n5x5: int
  pool: int
  size: int  # spatial side at which the module runs


SPECS = (
    Spec("a3", 64, 96, 128, 16, 32, 32, 32, 32),
    Spec("b3", 128, 128, 192, 32, 96, 96, 64, 32),
    Spec("a4", 192, 96, 208, 16, 48, 48, 64, 16),
    Spec("b4", 160, 112, 224, 24, 64, 64, 64, 16),
    Spec("c4", 128, 128, 256, 24, 64, 64, 64, 16),
    Spec("d4", 112, 144, 288, 32, 64, 64, 64, 16),
    Spec("e4", 256, 160, 320, 32, 128, 128, 128, 16),
    Spec("a5", 256, 160, 320, 32, 128, 128, 128, 8),
    Spec("b5", 384, 192, 384, 48, 128, 128, 128, 8),
)
POOL_AFTER = ("b3", "e4")


def default_widths() -> list[int]:
  return [w for s in SPECS for w in (s.n3x3red, s.n5x5red, s.n5x5red2)]


def validate_widths(widths: Sequence[int] | None) -> list[int]:
  """Checks a 27-entry width list (``None``: dense); raises ValueError on a wrong length or an entry < 1."""
  if widths is None:
    return default_widths()
  return c.check_widths("googlenet", widths, 27,
                        "[n3x3red, n5x5red, n5x5red2] for each of the 9 inception modules a3..b5")


def _out_width(s: Spec) -> int:
  return s.n1x1 + s.n3x3 + s.n5x5 + s.pool


class ConvBNReLU(nnx.Module):
  """Biased conv -> BN -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs):
    self.conv = c.conv(in_ch, out_ch, kernel, bias=True, rngs=rngs)
    self.bn = c.batch_norm(out_ch, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class Chain(nnx.Module):
  """Biased convs ``conv1, conv2, ...`` each followed by ``bn{k}`` and ReLU; records taps for convs 2.."""

  def __init__(self, channels: Sequence[int], kernels: Sequence[int], *, rngs: nnx.Rngs):
    self.num_convs = len(kernels)
    for k, (i, o, ks) in enumerate(zip(channels[:-1], channels[1:], kernels), start=1):
      setattr(self, f"conv{k}", c.conv(i, o, ks, bias=True, rngs=rngs))
      setattr(self, f"bn{k}", c.batch_norm(o, rngs=rngs))

  def __call__(self, x: jax.Array, taps: c.Taps | None = None, name: str = "") -> jax.Array:
    for k in range(1, self.num_convs + 1):
      y = getattr(self, f"conv{k}")(x)
      if taps is not None and k > 1:
        taps[f"{name}/conv{k}"] = c.Tap(x, y)
      x = jax.nn.relu(getattr(self, f"bn{k}")(y))
    return x


class Inception(nnx.Module):
  """Four parallel branches concatenated along channels: 1x1, 1x1->3x3, 1x1->3x3->3x3, pool->1x1."""

  def __init__(self, in_ch: int, spec: Spec, n3x3red: int, n5x5red: int, n5x5red2: int, *, rngs: nnx.Rngs):
    self.branch1x1 = ConvBNReLU(in_ch, spec.n1x1, 1, rngs=rngs)
    self.branch3x3 = Chain((in_ch, n3x3red, spec.n3x3), (1, 3), rngs=rngs)
    self.branch5x5 = Chain((in_ch, n5x5red, n5x5red2, spec.n5x5), (1, 3, 3), rngs=rngs)
    self.branch_pool = ConvBNReLU(in_ch, spec.pool, 1, rngs=rngs)

  def __call__(self, x: jax.Array, taps: c.Taps | None = None, name: str = "") -> jax.Array:
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3(x, taps, f"{name}/branch3x3"),
        self.branch5x5(x, taps, f"{name}/branch5x5"),
        self.branch_pool(c.max_pool(x, 3, 1, 1)),
    ], axis=-1)


class GoogLeNet(c.WidthModel):
  """CIFAR GoogLeNet (HRank variant; see the module docstring for the 27-entry width list)."""

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 10, rngs: nnx.Rngs):
    ws = validate_widths(widths)
    self._set_widths(ws, num_classes)
    self.stem = ConvBNReLU(3, STEM, 3, rngs=rngs)
    in_ch = STEM
    for m, spec in enumerate(SPECS):
      setattr(self, spec.name, Inception(in_ch, spec, *ws[3 * m:3 * m + 3], rngs=rngs))
      in_ch = _out_width(spec)
    self.fc = nnx.Linear(in_ch, num_classes, rngs=rngs)

  def decisions(self) -> list[str]:
    """APIB decisions in forward order: per module ``{m}/branch3x3/conv2`` (decides n3x3red),
    ``{m}/branch5x5/conv2`` (n5x5red) and ``{m}/branch5x5/conv3`` (n5x5red2)."""
    return [f"{s.name}/{conv}" for s in SPECS
            for conv in ("branch3x3/conv2", "branch5x5/conv2", "branch5x5/conv3")]

  def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array | tuple[jax.Array, c.Taps]:
    """Logits for NHWC images ``(n, 32, 32, 3)``; with ``capture=True`` also the taps of every decision (the
    conv's input and its pre-BN output, both ``(n, s, s, c)``)."""
    taps: c.Taps | None = {} if capture else None
    h = self.stem(x)
    for spec in SPECS:
      h = getattr(self, spec.name)(h, taps, spec.name)
      if spec.name in POOL_AFTER:
        h = c.max_pool(h, 3, 2, 1)
    logits = self.fc(c.global_avg_pool(h))
    return (logits, taps) if capture else logits

  def channel_groups(self) -> list[ChannelGroup]:
    """Groups: the 27 inner widths (prunable), the stem, and each module branch's output channels (fixed).

    A branch-output group ``{m}/{branch}/out`` holds the branch's last conv and BN output and, at the branch's
    offset in the concatenation (1x1, 3x3, 5x5, pool), the input axis of the four first convs of the next module
    (the pool branch's max pool keeps channels in place), or fc's rows after b5.
    """
    ws = self._widths
    groups = []
    names = [s.name for s in SPECS]

    def readers(m: int, offset: int) -> list[tuple[ChannelSlice, ...]]:
      if m == len(SPECS):
        return [c.dense_in(("fc",), offset=offset)]
      nxt = names[m]
      return [c.conv_in(c.p(f"{nxt}/{conv}"), offset=offset)
              for conv in ("branch1x1/conv", "branch3x3/conv1", "branch5x5/conv1", "branch_pool/conv")]

    groups.append(c.group("stem", STEM, c.conv_out(("stem", "conv"), bias=True), c.bn(("stem", "bn")),
                          *readers(0, 0), prunable=False))
    for m, spec in enumerate(SPECS):
      n = spec.name
      inner = [("branch3x3/n3x3red", "branch3x3/conv1", "branch3x3/bn1", "branch3x3/conv2"),
               ("branch5x5/n5x5red", "branch5x5/conv1", "branch5x5/bn1", "branch5x5/conv2"),
               ("branch5x5/n5x5red2", "branch5x5/conv2", "branch5x5/bn2", "branch5x5/conv3")]
      for i, (gname, prod, norm, cons) in enumerate(inner):
        groups.append(c.group(f"{n}/{gname}", ws[3 * m + i], c.conv_out(c.p(f"{n}/{prod}"), bias=True),
                              c.bn(c.p(f"{n}/{norm}")), c.conv_in(c.p(f"{n}/{cons}")), prunable=True,
                              width_indices=(3 * m + i,)))
      offset = 0
      for branch, last, size in (("branch1x1", "", spec.n1x1), ("branch3x3", "2", spec.n3x3),
                                 ("branch5x5", "3", spec.n5x5), ("branch_pool", "", spec.pool)):
        groups.append(c.group(f"{n}/{branch}/out", size, c.conv_out(c.p(f"{n}/{branch}/conv{last}"), bias=True),
                              c.bn(c.p(f"{n}/{branch}/bn{last}")), *readers(m + 1, offset), prunable=False))
        offset += size
    return groups
