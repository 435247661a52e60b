"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, section 4.2) with parameter-free "option A" shortcuts.

Architecture (NHWC, 32x32 input): a 3x3 stem conv + BN + ReLU, then three stages of ``n = (depth - 2) / 6`` basic
blocks at 32x32, 16x16 and 8x8 (the first block of stages 2 and 3 has stride 2 on its first conv), global average
pool, and a Dense classifier. A basic block computes

  y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)),

where ``shortcut`` is the identity, or, when the block changes resolution or width, "option A":
``x[:, ::2, ::2, :]`` (stride 2) followed by zero-padding the channel axis from ``c_in`` to ``c_out`` channels,
``(c_out - c_in) // 2`` zeros before and the rest after. This is exactly the architecture of the pretrained
weights in ``shared/weights/resnet{20,56}_cifar10.npz``.

Width list (``1 + 2 * 3n`` ints): ``[stem, mid_1, out_1, mid_2, out_2, ...]``, blocks in order. ``mid_j`` is block
``j``'s inner width (conv1's output, pruned by APIB); ``out_j`` is the residual stream width of its stage, which
must be equal within a stage and equal to ``stem`` in stage 1 (the stem feeds the stage-1 stream directly).
Stream widths may not shrink from one stage to the next (zero-padding can only add channels).

Parameter paths: ``stem/{conv,bn}``, ``stage{s}/block{j}/{conv1,bn1,conv2,bn2}``, ``fc`` (s = 1..3, j from 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hsic_jax.groups import ChannelGroup, ChannelSlice
from models import _common as c

DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)


class ConvBN(nnx.Module):
  """conv -> BatchNorm (the activation is applied by the caller)."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1,
               bias: bool = False, rngs: nnx.Rngs):
    self.conv = c.conv(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=bias, rngs=rngs)
    self.bn = c.batch_norm(out_ch, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus an option-A shortcut, then ReLU."""

  def __init__(self, in_ch: int, mid: int, out: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = c.conv(in_ch, mid, 3, stride=stride, rngs=rngs)
    self.bn1 = c.batch_norm(mid, rngs=rngs)
    self.conv2 = c.conv(mid, out, 3, rngs=rngs)
    self.bn2 = c.batch_norm(out, rngs=rngs)
    self.stride = stride
    self.pad = ((out - in_ch) // 2, out - in_ch - (out - in_ch) // 2)

  def __call__(self, x: jax.Array, taps: c.Taps | None = None, name: str = "") -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.conv2(h)
    if taps is not None:
      taps[f"{name}/conv2"] = c.Tap(h, y)
    y = self.bn2(y)
    shortcut = x[:, ::self.stride, ::self.stride, :] if self.stride != 1 else x
    if self.pad != (0, 0):
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), self.pad))
    return jax.nn.relu(y + shortcut)


class Stage(nnx.Module):
  """A run of blocks named ``block0``, ``block1``, ... applied in order."""

  def __init__(self, blocks: Sequence[nnx.Module]):
    self.num_blocks = len(blocks)
    for j, block in enumerate(blocks):
      setattr(self, f"block{j}", block)

  def __call__(self, x: jax.Array, taps: c.Taps | None = None, name: str = "") -> jax.Array:
    for j in range(self.num_blocks):
      x = getattr(self, f"block{j}")(x, taps, f"{name}/block{j}")
    return x


def default_widths(depth: int) -> list[int]:
  """``[16, (mid, out) per block]`` with mid = out = 16/32/64 by stage."""
  n = _blocks_per_stage(depth)
  widths = [STAGE_WIDTHS[0]]
  for w in STAGE_WIDTHS:
    widths += [w, w] * n
  return widths


def _blocks_per_stage(depth: int) -> int:
  if depth not in DEPTHS:
    raise ValueError(f"depth must be one of {DEPTHS} for a CIFAR ResNet, got {depth}")
  return (depth - 2) // 6


def validate_widths(depth: int, widths: Sequence[int] | None) -> list[int]:
  """Checks a width list (``None``: dense) and returns it as a list of ints.

  Raises:
    ValueError: wrong length, an entry < 1, unequal residual widths within a stage, a stem width different from the
      stage-1 width, or a stage narrower than the one before.
  """
  n = _blocks_per_stage(depth)
  name = f"resnet{depth}"
  if widths is None:
    return default_widths(depth)
  ws = c.check_widths(name, widths, 1 + 6 * n, "[stem, (mid_j, out_j) for each of the 3*n blocks]")
  stage_w = []
  for s in range(3):
    outs = [ws[2 + 2 * (s * n + j)] for j in range(n)]
    if len(set(outs)) != 1:
      raise ValueError(f"widths for {name!r}: residual widths out_j must be equal within stage {s + 1}, "
                       f"got {outs} at indices {[2 + 2 * (s * n + j) for j in range(n)]}")
    stage_w.append(outs[0])
  if ws[0] != stage_w[0]:
    raise ValueError(f"widths for {name!r}: the stem width (index 0, {ws[0]}) must equal the stage-1 residual "
                     f"width {stage_w[0]}, since the stem feeds the stage-1 stream")
  for s in (1, 2):
    if stage_w[s] < stage_w[s - 1]:
      raise ValueError(f"widths for {name!r}: stage {s + 1} residual width {stage_w[s]} is smaller than stage "
                       f"{s} width {stage_w[s - 1]}; option-A zero-padding shortcuts cannot remove channels")
  return ws


class ResNetCifar(c.WidthModel):
  """CIFAR ResNet with option-A shortcuts (see the module docstring for the width list)."""

  def __init__(self, depth: int = 56, widths: Sequence[int] | None = None, *, num_classes: int = 10,
               rngs: nnx.Rngs):
    n = _blocks_per_stage(depth)
    ws = validate_widths(depth, widths)
    self.depth = depth
    self.blocks_per_stage = n
    self._set_widths(ws, num_classes)
    self.stem = ConvBN(3, ws[0], 3, rngs=rngs)
    in_ch = ws[0]
    for s in range(3):
      blocks = []
      for j in range(n):
        k = s * n + j
        stride = 2 if (s > 0 and j == 0) else 1
        blocks.append(BasicBlock(in_ch, ws[1 + 2 * k], ws[2 + 2 * k], stride, rngs=rngs))
        in_ch = ws[2 + 2 * k]
      setattr(self, f"stage{s + 1}", Stage(blocks))
    self.fc = nnx.Linear(in_ch, num_classes, rngs=rngs)

  def decisions(self) -> list[str]:
    """APIB decisions (consumer layers), in forward order: ``stage{s}/block{j}/conv2`` for every block."""
    n = self.blocks_per_stage
    return [f"stage{s}/block{j}/conv2" for s in (1, 2, 3) for j in range(n)]

  def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array | tuple[jax.Array, c.Taps]:
    """Logits for NHWC images ``x`` of shape ``(n, 32, 32, 3)``.

    With ``capture=True`` returns ``(logits, taps)`` where ``taps[d]`` is a :class:`models._common.Tap` for every
    decision ``d`` in :meth:`decisions`: conv2's input ``(n, s, s, mid)`` and its pre-BN output
    ``(n, s, s, out)``.
    """
    taps: c.Taps | None = {} if capture else None
    h = jax.nn.relu(self.stem(x))
    for s in (1, 2, 3):
      h = getattr(self, f"stage{s}")(h, taps, f"stage{s}")
    logits = self.fc(c.global_avg_pool(h))
    return (logits, taps) if capture else logits

  def channel_groups(self) -> list[ChannelGroup]:
    """One group per block's middle channels (prunable) and one per stage's residual stream (not prunable).

    A stream group holds the stem (stage 1) and every block's conv2/bn2 output channels of that stage, and every
    conv that reads the stream: the conv1 of the stage's blocks (stage 1's block 0 reads the stem) and the next
    stage's block-0 conv1, or the classifier's input rows. The option-A shortcut also ties stage ``s``'s stream to
    channels ``[pad, pad + w_s)`` of stage ``s + 1``'s stream (``pad = (w_{s+1} - w_s) // 2``), a coupling without
    parameters that :class:`ChannelGroup` cannot express; that is why streams are declared non-prunable.
    """
    n = self.blocks_per_stage
    ws = self._widths
    groups = []
    for s in range(3):
      for j in range(n):
        k = s * n + j
        b = f"stage{s + 1}/block{j}"
        groups.append(c.group(f"{b}/mid", ws[1 + 2 * k], c.conv_out(c.p(f"{b}/conv1")), c.bn(c.p(f"{b}/bn1")),
                              c.conv_in(c.p(f"{b}/conv2")), prunable=True, width_indices=(1 + 2 * k,)))
    for s in range(3):
      members: list[tuple[ChannelSlice, ...]] = []
      idx = []
      if s == 0:
        members += [c.conv_out(("stem", "conv")), c.bn(("stem", "bn"))]
        idx.append(0)
      for j in range(n):
        b = f"stage{s + 1}/block{j}"
        members += [c.conv_out(c.p(f"{b}/conv2")), c.bn(c.p(f"{b}/bn2"))]
        idx.append(2 + 2 * (s * n + j))
      for j in range(n):
        if j > 0 or s == 0:
          members.append(c.conv_in(c.p(f"stage{s + 1}/block{j}/conv1")))
      members.append(c.conv_in(c.p(f"stage{s + 2}/block0/conv1")) if s < 2 else c.dense_in(("fc",)))
      groups.append(c.group(f"stage{s + 1}/stream", ws[idx[-1]], *members, prunable=False, width_indices=idx))
    return groups
