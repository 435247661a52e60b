"""MobileNetV2 (Sandler et al. 2018), CIFAR and ImageNet variants, in torchvision's layout.

Inverted residual block: ``expand`` 1x1 (c_in -> hidden) + BN + ReLU6 (absent when the expansion ratio is 1),
``depthwise`` 3x3 with stride (``feature_group_count = hidden``, kernel ``(3, 3, 1, hidden)``) + BN + ReLU6,
``project`` 1x1 (hidden -> c_out) + BN, plus the identity when the block keeps resolution and width (every block
of a stage but its first). Stages (expansion t, width c, blocks n, stride s):
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), then a ``head`` 1x1 conv to 1280
+ BN + ReLU6, global average pool and ``fc`` (torchvision's dropout is left out; it has no parameters).
The ImageNet variant (224x224, 1000 classes) has a stride-2 stem: 300.77M MACs, 3,504,872 params. The CIFAR
variant (32x32, 10 classes) uses stride 1 for the stem and for the second stage, so the net ends at 4x4.

Width list (35 ints): ``[stem, out_0, hidden_1, out_1, ..., hidden_16, out_16, head]`` over the 17 blocks; block 0
has no expansion (its depthwise conv runs on the stem's channels). ``out_j`` is its stage's residual width and must
be equal within a stage. The expansion widths ``hidden_j`` are the prunable ones; a depthwise conv couples its
input and output channels, so each hidden group holds expand, its BN, the depthwise conv, its BN and project's
input.

Parameter paths: ``stem/{conv,bn}``, ``stage{s}/block{j}/{expand,expand_bn,depthwise,depthwise_bn,project,
project_bn}``, ``head/{conv,bn}``, ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice
from models import _common as c
from models.resnet_cifar import ConvBN, Stage

# (expansion, width, blocks, stride) per stage, ImageNet strides.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM = 32
HEAD = 1280
NUM_BLOCKS = sum(s[2] for s in STAGES)


def default_widths() -> list[int]:
  ws = [STEM]
  in_ch = STEM
  for t, w, n, _ in STAGES:
    for _ in range(n):
      if t != 1:
        ws.append(in_ch * t)
      ws.append(w)
      in_ch = w
  return ws + [HEAD]


def _block_index() -> list[tuple[int, int, int, int | None, int]]:
  """Per block: (stage, index in stage, expansion, hidden width index or None, out width index)."""
  out = []
  i = 1
  for s, (t, _, n, _) in enumerate(STAGES):
    for j in range(n):
      if t != 1:
        out.append((s, j, t, i, i + 1))
        i += 2
      else:
        out.append((s, j, t, None, i))
        i += 1
  return out


def validate_widths(widths: Sequence[int] | None, *, imagenet: bool = False) -> list[int]:
  """Checks a 35-entry width list (``None``: dense).

  Raises:
    ValueError: wrong length, an entry < 1, or unequal residual widths within a stage.
  """
  if widths is None:
    return default_widths()
  name = "mobilenetv2_imagenet" if imagenet else "mobilenetv2"
  ws = c.check_widths(name, widths, 2 * NUM_BLOCKS + 1, "[stem, out_0, (hidden_j, out_j) for blocks 1..16, head]")
  blocks = _block_index()
  for s in range(len(STAGES)):
    idx = [o for st, _, _, _, o in blocks if st == s]
    outs = [ws[i] for i in idx]
    if len(set(outs)) != 1:
      raise ValueError(f"widths for {name!r}: residual widths out_j must be equal within stage {s + 1}, got "
                       f"{outs} at indices {idx}")
  return ws


class InvertedResidual(nnx.Module):
  """expand 1x1 -> depthwise 3x3 -> project 1x1 (linear), with an identity shortcut when ``residual``."""

  def __init__(self, in_ch: int, hidden: int | None, out: int, stride: int, residual: bool, *, rngs: nnx.Rngs):
    if hidden is None:
      self.expand = self.expand_bn = None
      hidden = in_ch
    else:
      self.expand = c.conv(in_ch, hidden, 1, rngs=rngs)
      self.expand_bn = c.batch_norm(hidden, rngs=rngs)
    self.depthwise = c.conv(hidden, hidden, 3, stride=stride, groups=hidden, rngs=rngs)
    self.depthwise_bn = c.batch_norm(hidden, rngs=rngs)
    self.project = c.conv(hidden, out, 1, rngs=rngs)
    self.project_bn = c.batch_norm(out, rngs=rngs)
    self.residual = residual

  def __call__(self, x: jax.Array, taps: c.Taps | None = None, name: str = "") -> jax.Array:
    h = x
    if self.expand is not None:
      h = jax.nn.relu6(self.expand_bn(self.expand(h)))
    h = jax.nn.relu6(self.depthwise_bn(self.depthwise(h)))
    y = self.project(h)
    if taps is not None and self.expand is not None:
      taps[f"{name}/project"] = c.Tap(h, y)
    y = self.project_bn(y)
    return x + y if self.residual else y


class MobileNetV2(c.WidthModel):
  """MobileNetV2; ``imagenet=False`` gives the CIFAR variant (see the module docstring)."""

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int | None = None,
               imagenet: bool = False, rngs: nnx.Rngs):
    ws = validate_widths(widths, imagenet=imagenet)
    num_classes = (1000 if imagenet else 10) if num_classes is None else num_classes
    blocks = _block_index()
    self.imagenet = imagenet
    self._set_widths(ws, num_classes)
    self.stem = ConvBN(3, ws[0], 3, stride=2 if imagenet else 1, rngs=rngs)
    in_ch = ws[0]
    for s, (_, _, n, stride) in enumerate(STAGES):
      if not imagenet and s == 1:
        stride = 1
      stage_blocks = []
      for st, j, _, h_idx, o_idx in blocks:
        if st != s:
          continue
        hidden = None if h_idx is None else ws[h_idx]
        stage_blocks.append(InvertedResidual(in_ch, hidden, ws[o_idx], stride if j == 0 else 1, j > 0, rngs=rngs))
        in_ch = ws[o_idx]
      setattr(self, f"stage{s + 1}", Stage(stage_blocks))
    self.head = ConvBN(in_ch, ws[-1], 1, rngs=rngs)
    self.fc = nnx.Linear(ws[-1], num_classes, rngs=rngs)

  def decisions(self) -> list[str]:
    """Consumers of the prunable expansion channels: ``stage{s}/block{j}/project`` for every expanding block."""
    return [f"stage{s + 1}/block{j}/project" for s, j, _, h, _ in _block_index() if h is not None]

  def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array | tuple[jax.Array, c.Taps]:
    """Logits for NHWC images; with ``capture=True`` also a tap per :meth:`decisions` entry (project's input
    ``(n, s, s, hidden)`` and its pre-BN output)."""
    taps: c.Taps | None = {} if capture else None
    h = jax.nn.relu6(self.stem(x))
    for s in range(1, len(STAGES) + 1):
      h = getattr(self, f"stage{s}")(h, taps, f"stage{s}")
    h = jax.nn.relu6(self.head(h))
    logits = self.fc(c.global_avg_pool(h))
    return (logits, taps) if capture else logits

  def channel_groups(self) -> list[ChannelGroup]:
    """Groups: ``stem`` (with block 0's depthwise conv), each block's ``hidden`` expansion channels (prunable),
    each stage's residual ``stream`` and the ``head`` channels.

    The depthwise conv's kernel ``(3, 3, 1, c)`` is listed once, on its output axis 3 (role ``"out"``): channel
    ``i`` of its input is channel ``i`` of its output.
    """
    ws = self._widths
    blocks = _block_index()
    groups = []
    b0 = "stage1/block0"
    groups.append(c.group("stem", ws[0], c.conv_out(("stem", "conv")), c.bn(("stem", "bn")),
                          c.depthwise(c.p(f"{b0}/depthwise")), c.bn(c.p(f"{b0}/depthwise_bn")),
                          c.conv_in(c.p(f"{b0}/project")), prunable=False, width_indices=(0,)))
    for s, j, _, h_idx, _ in blocks:
      if h_idx is None:
        continue
      b = f"stage{s + 1}/block{j}"
      groups.append(c.group(f"{b}/hidden", ws[h_idx], c.conv_out(c.p(f"{b}/expand")), c.bn(c.p(f"{b}/expand_bn")),
                            c.depthwise(c.p(f"{b}/depthwise")), c.bn(c.p(f"{b}/depthwise_bn")),
                            c.conv_in(c.p(f"{b}/project")), prunable=True, width_indices=(h_idx,)))
    for s in range(len(STAGES)):
      members: list[tuple[ChannelSlice, ...]] = []
      stage = [(j, o) for st, j, _, _, o in blocks if st == s]
      for j, _ in stage:
        b = f"stage{s + 1}/block{j}"
        members += [c.conv_out(c.p(f"{b}/project")), c.bn(c.p(f"{b}/project_bn"))]
        if j > 0:
          members.append(c.conv_in(c.p(f"{b}/expand")))
      members.append(c.conv_in(c.p(f"stage{s + 2}/block0/expand")) if s + 1 < len(STAGES)
                     else c.conv_in(("head", "conv")))
      idx = [o for _, o in stage]
      groups.append(c.group(f"stage{s + 1}/stream", ws[idx[0]], *members, prunable=False, width_indices=idx))
    groups.append(c.group("head", ws[-1], c.conv_out(("head", "conv")), c.bn(("head", "bn")),
                          c.dense_in(("fc",)), prunable=False, width_indices=(len(ws) - 1,)))
    return groups
