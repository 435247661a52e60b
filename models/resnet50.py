"""ResNet-50 for ImageNet in torchvision's layout (v1.5: the stride sits on the 3x3 conv).

Architecture (NHWC, 224x224 input): stem conv7x7/2 (no bias) + BN + ReLU + max pool 3x3/2; four stages of
(3, 4, 6, 3) bottleneck blocks ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + shortcut(x))`` with
conv1 1x1, conv2 3x3 (stride 2 in the first block of stages 2-4), conv3 1x1; the first block of every stage has a
projection shortcut ``downsample = bn(conv1x1/stride(x))``; global average pool; ``fc``. Dense: 4089.18M MACs,
25.557M params.

Width list (37 ints, the layout of ITPruner's ResNet-50 width lists):
``[stem, s1b0.p1, s1b0.p2, W1, s1b1.p1, s1b1.p2, s1b2.p1, s1b2.p2,
s2b0.p1, s2b0.p2, W2, ...]``: per block its conv1 width p1 and conv2 width p2, with the stage (residual stream)
width W_s inserted after the first block's pair, i.e. at indices 3, 10, 19 and 32. Default
``[64, 64, 64, 256, 64, 64, ..., 512, 512, 2048, ...]``. APIB prunes p1 and p2; ITPruner also changes the stem and
the stage widths.

Parameter paths: ``stem/{conv,bn}``, ``stage{s}/block{j}/{conv1,bn1,conv2,bn2,conv3,bn3}``,
``stage{s}/block0/downsample/{conv,bn}``, ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice
from models import _common as c
from models.resnet_cifar import ConvBN, Stage

BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64 * 4, 128 * 4, 256 * 4, 512 * 4)
INNER_WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)


def layout() -> tuple[int, list[tuple[int, list[tuple[int, int]]]]]:
  """Width-list indices: ``(stem_index, [(stage_width_index, [(p1_index, p2_index) per block]) per stage])``."""
  i = 1
  stages = []
  for n in BLOCKS:
    pairs = [(i, i + 1)]
    w_idx = i + 2
    i += 3
    for _ in range(n - 1):
      pairs.append((i, i + 1))
      i += 2
    stages.append((w_idx, pairs))
  return 0, stages


def default_widths() -> list[int]:
  ws = [0] * 37
  ws[0] = 64
  for (w_idx, pairs), w, p_ in zip(layout()[1], STAGE_WIDTHS, INNER_WIDTHS):
    ws[w_idx] = w
    for a, b in pairs:
      ws[a] = ws[b] = p_
  return ws


def validate_widths(widths: Sequence[int] | None) -> list[int]:
  """Checks a 37-entry width list (``None``: dense); raises ValueError on a wrong length or an entry < 1."""
  if widths is None:
    return default_widths()
  return c.check_widths("resnet50", widths, 37,
                        "[stem, (p1, p2) per block with the stage widths inserted at indices 3, 10, 19, 32]")


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride) -> 1x1 bottleneck with an optional projection shortcut."""

  def __init__(self, in_ch: int, p1: int, p2: int, out: int, stride: int, project: bool, *, rngs: nnx.Rngs):
    self.conv1 = c.conv(in_ch, p1, 1, rngs=rngs)
    self.bn1 = c.batch_norm(p1, rngs=rngs)
    self.conv2 = c.conv(p1, p2, 3, stride=stride, rngs=rngs)
    self.bn2 = c.batch_norm(p2, rngs=rngs)
    self.conv3 = c.conv(p2, out, 1, rngs=rngs)
    self.bn3 = c.batch_norm(out, rngs=rngs)
    self.downsample = ConvBN(in_ch, out, 1, stride=stride, rngs=rngs) if project else None

  def __call__(self, x: jax.Array, taps: c.Taps | None = None, name: str = "") -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.conv2(h)
    if taps is not None:
      taps[f"{name}/conv2"] = c.Tap(h, y)
    h = jax.nn.relu(self.bn2(y))
    y = self.conv3(h)
    if taps is not None:
      taps[f"{name}/conv3"] = c.Tap(h, y)
    y = self.bn3(y)
    shortcut = self.downsample(x) if self.downsample is not None else x
    return jax.nn.relu(y + shortcut)


class ResNet50(c.WidthModel):
  """torchvision-layout ResNet-50 (see the module docstring for the 37-entry width list)."""

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 1000, rngs: nnx.Rngs):
    ws = validate_widths(widths)
    self._set_widths(ws, num_classes)
    self.stem = ConvBN(3, ws[0], 7, stride=2, rngs=rngs)
    in_ch = ws[0]
    for s, (w_idx, pairs) in enumerate(layout()[1]):
      blocks = []
      for j, (a, b) in enumerate(pairs):
        stride = STRIDES[s] if j == 0 else 1
        blocks.append(Bottleneck(in_ch, ws[a], ws[b], ws[w_idx], stride, j == 0, rngs=rngs))
        in_ch = ws[w_idx]
      setattr(self, f"stage{s + 1}", Stage(blocks))
    self.fc = nnx.Linear(in_ch, num_classes, rngs=rngs)

  def decisions(self) -> list[str]:
    """APIB decisions in forward order: ``stage{s}/block{j}/conv2`` (decides p1) and ``.../conv3`` (decides p2)."""
    return [f"stage{s + 1}/block{j}/{conv}" for s, n in enumerate(BLOCKS) for j in range(n)
            for conv in ("conv2", "conv3")]

  def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array | tuple[jax.Array, c.Taps]:
    """Logits for NHWC images ``(n, h, w, 3)`` (224x224 for ImageNet; any size >= 32 works).

    With ``capture=True`` returns ``(logits, taps)`` with a :class:`models._common.Tap` for every decision (the
    conv's input and pre-BN output), plus ``taps["fc"]``: the global-pooled feature ``(n, 1, 1, W4)`` and the
    logits. APIB's reference code uses that pooled feature as the target Y of every conv3 decision, not the
    conv3's own output.
    """
    taps: c.Taps | None = {} if capture else None
    h = c.max_pool(jax.nn.relu(self.stem(x)), 3, 2, 1)
    for s in range(1, 5):
      h = getattr(self, f"stage{s}")(h, taps, f"stage{s}")
    pooled = c.global_avg_pool(h)
    logits = self.fc(pooled)
    if taps is not None:
      taps["fc"] = c.Tap(pooled[:, None, None, :], logits)
    return (logits, taps) if capture else logits

  def channel_groups(self) -> list[ChannelGroup]:
    """Groups: ``stem``; per block ``p1`` and ``p2`` (prunable); per stage its residual ``stream``.

    A stream group holds the stage's downsample conv/BN output, every block's conv3/bn3 output, and every reader:
    conv1 of blocks 1.. of the stage, the next stage's block-0 conv1 and downsample conv, or fc's rows.
    """
    ws = self._widths
    groups = []
    stem_members = [c.conv_out(("stem", "conv")), c.bn(("stem", "bn")), c.conv_in(c.p("stage1/block0/conv1")),
                    c.conv_in(c.p("stage1/block0/downsample/conv"))]
    groups.append(c.group("stem", ws[0], *stem_members, prunable=False, width_indices=(0,)))
    stages = layout()[1]
    for s, (w_idx, pairs) in enumerate(stages):
      for j, (a, b) in enumerate(pairs):
        blk = f"stage{s + 1}/block{j}"
        groups.append(c.group(f"{blk}/p1", ws[a], c.conv_out(c.p(f"{blk}/conv1")), c.bn(c.p(f"{blk}/bn1")),
                              c.conv_in(c.p(f"{blk}/conv2")), prunable=True, width_indices=(a,)))
        groups.append(c.group(f"{blk}/p2", ws[b], c.conv_out(c.p(f"{blk}/conv2")), c.bn(c.p(f"{blk}/bn2")),
                              c.conv_in(c.p(f"{blk}/conv3")), prunable=True, width_indices=(b,)))
    for s, (w_idx, pairs) in enumerate(stages):
      st = f"stage{s + 1}"
      members: list[tuple[ChannelSlice, ...]] = [c.conv_out(c.p(f"{st}/block0/downsample/conv")),
                                                 c.bn(c.p(f"{st}/block0/downsample/bn"))]
      for j in range(len(pairs)):
        members += [c.conv_out(c.p(f"{st}/block{j}/conv3")), c.bn(c.p(f"{st}/block{j}/bn3"))]
      for j in range(1, len(pairs)):
        members.append(c.conv_in(c.p(f"{st}/block{j}/conv1")))
      if s + 1 < len(stages):
        members += [c.conv_in(c.p(f"stage{s + 2}/block0/conv1")),
                    c.conv_in(c.p(f"stage{s + 2}/block0/downsample/conv"))]
      else:
        members.append(c.dense_in(("fc",)))
      groups.append(c.group(f"{st}/stream", ws[w_idx], *members, prunable=False, width_indices=(w_idx,)))
    return groups
