"""VGG-16-BN for CIFAR, the variant APIB prunes (HRank's ``vgg_16_bn``).

Architecture (NHWC, 32x32 input): 13 conv3x3 (padding 1, no bias) + BN + ReLU, with a 2x2 max pool after convs
2, 4, 7 and 10, so convs 11-13 run at 2x2; a 2x2 average pool to 1x1; then the classifier
``fc1 (c13 -> 512) -> BatchNorm1d -> ReLU -> fc2 (512 -> classes)``. Dense: 313.46M MACs and 14.99M params
(conv MACs 313.20M; the BatchNorm1d is what brings the count to 14,987,722).

Width list: 13 ints, the output widths of conv1..conv13 (default 64, 64, 128, 128, 256 x3, 512 x6); every one is
prunable. Parameter paths: ``conv{k}``, ``bn{k}`` (k = 1..13), ``fc1``, ``fc1_bn``, ``fc2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from hsic_jax.groups import ChannelGroup
from models import _common as c

DEFAULT_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOL_AFTER = (2, 4, 7, 10)  # 1-indexed convs followed by a 2x2 max pool.
HIDDEN = 512


def default_widths() -> list[int]:
  return list(DEFAULT_WIDTHS)


def validate_widths(widths: Sequence[int] | None) -> list[int]:
  """Checks a 13-entry width list (``None``: dense); raises ValueError on a wrong length or an entry < 1."""
  if widths is None:
    return default_widths()
  return c.check_widths("vgg16", widths, 13, "output width of each of the 13 convs")


class VGG16(c.WidthModel):
  """CIFAR VGG-16-BN with a 512-unit hidden classifier layer (see the module docstring)."""

  def __init__(self, widths: Sequence[int] | None = None, *, num_classes: int = 10, rngs: nnx.Rngs):
    ws = validate_widths(widths)
    self._set_widths(ws, num_classes)
    in_ch = 3
    for k, w in enumerate(ws, start=1):
      setattr(self, f"conv{k}", c.conv(in_ch, w, 3, rngs=rngs))
      setattr(self, f"bn{k}", c.batch_norm(w, rngs=rngs))
      in_ch = w
    self.fc1 = nnx.Linear(in_ch, HIDDEN, rngs=rngs)
    self.fc1_bn = c.batch_norm(HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, num_classes, rngs=rngs)

  def decisions(self) -> list[str]:
    """APIB decisions (consumer layers), in forward order: ``conv2`` .. ``conv13`` and ``fc1``."""
    return [f"conv{k}" for k in range(2, 14)] + ["fc1"]

  def __call__(self, x: jax.Array, *, capture: bool = False) -> jax.Array | tuple[jax.Array, c.Taps]:
    """Logits for NHWC images ``(n, 32, 32, 3)``.

    With ``capture=True`` returns ``(logits, taps)``: ``taps["conv{k}"]`` holds conv k's input (after the previous
    BN, ReLU and max pool) and its pre-BN output; ``taps["fc1"]`` holds the average-pool output as
    ``(n, 1, 1, c13)`` and fc1's output before its BatchNorm1d, ``(n, 512)``.
    """
    taps: c.Taps | None = {} if capture else None
    h = x
    for k in range(1, 14):
      y = getattr(self, f"conv{k}")(h)
      if taps is not None and k > 1:
        taps[f"conv{k}"] = c.Tap(h, y)
      h = jax.nn.relu(getattr(self, f"bn{k}")(y))
      if k in POOL_AFTER:
        h = c.max_pool(h, 2, 2, 0)
    h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
    y = self.fc1(h.reshape(h.shape[0], -1))
    if taps is not None:
      taps["fc1"] = c.Tap(h, y)
    logits = self.fc2(jax.nn.relu(self.fc1_bn(y)))
    return (logits, taps) if capture else logits

  def channel_groups(self) -> list[ChannelGroup]:
    """One prunable group per conv (its output, its BN, the next conv's input or fc1's rows) and one fixed group
    for fc1's 512 hidden units (fc1 output, its BatchNorm1d, fc2's rows)."""
    groups = []
    for k in range(1, 14):
      consumer = c.conv_in((f"conv{k + 1}",)) if k < 13 else c.dense_in(("fc1",))
      groups.append(c.group(f"conv{k}", self._widths[k - 1], c.conv_out((f"conv{k}",)), c.bn((f"bn{k}",)),
                            consumer, prunable=True, width_indices=(k - 1,)))
    groups.append(c.group("fc1/hidden", HIDDEN, c.dense_out(("fc1",)), c.bn(("fc1_bn",)), c.dense_in(("fc2",)),
                          prunable=False))
    return groups
