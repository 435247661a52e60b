"""Two CNNs written as a user writes them, outside the project's model zoo, pruned by the library and the program.

The nets here are plain ``nnx.Module`` classes with ordinary constructor arguments: no width list, no declared
channel groups, no calibration hooks. Everything the pruning needs is read from their forward pass:

- :class:`SEResNet`: a CIFAR-style residual net whose basic blocks end in a squeeze-and-excitation gate, with 1x1
  projection shortcuts where a stage changes width and resolution;
- :class:`DepthwiseNet`: a MobileNet-like stack of depthwise-separable blocks (depthwise 3x3, pointwise 1x1).

:func:`hsic_jax.prune_model` prunes either one to a cost target in one call (below), and the pruning program
builds them from a ``module:function`` path, ``--config.model.name=examples.user_cnns:se_resnet`` (or
``examples.user_cnns:depthwise_net``): the factories :func:`se_resnet` and :func:`depthwise_net` take
``num_classes`` and ``rngs``, and their own keyword arguments.

>>> import hsic_jax as hj
>>> import jax.numpy as jnp, numpy as np
>>> from flax import nnx
>>> model = depthwise_net(num_classes=4, width=4, rngs=nnx.Rngs(0))
>>> images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 3)), jnp.float32)
>>> res = hj.prune_model(model, images, target={"macs": 0.6}, settings={"tolerance": 0.1})
>>> abs(res.pruned.macs / res.dense.macs - 0.6) <= 0.1 * 0.6
True
>>> res.model(images).shape
(8, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["DepthwiseNet", "SEResNet", "depthwise_net", "se_resnet"]


def _global_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


class SqueezeExcite(nnx.Module):
  """``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``: a per-channel gate from the globally pooled input.

  The hidden width is only the Linear layers' shape (``channels // reduction``), so pruning it needs no update
  here.
  """

  def __init__(self, channels: int, reduction: int, *, rngs: nnx.Rngs):
    hidden = max(1, channels // reduction)
    self.fc1 = nnx.Linear(channels, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = nnx.sigmoid(self.fc2(nnx.relu(self.fc1(_global_pool(x)))))
    return x * gate[:, None, None, :]


class SEBlock(nnx.Module):
  """``relu(shortcut(x) + se(bn2(conv2(relu(bn1(conv1(x)))))))``; the shortcut is a 1x1 conv + BN projection
  where the block changes the width or the resolution, else the identity."""

  def __init__(self, in_channels: int, channels: int, *, stride: int, reduction: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, channels, (3, 3), strides=stride, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(channels, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(channels, rngs=rngs)
    self.se = SqueezeExcite(channels, reduction, rngs=rngs)
    if stride != 1 or in_channels != channels:
      self.proj = nnx.Conv(in_channels, channels, (1, 1), strides=stride, use_bias=False, rngs=rngs)
      self.proj_bn = nnx.BatchNorm(channels, rngs=rngs)
    else:
      self.proj = self.proj_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    branch = self.se(self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(shortcut + branch)


class SEResNet(nnx.Module):
  """A small CIFAR-style ResNet with squeeze-and-excitation blocks (NHWC, float32).

  stem conv3x3 -> BN -> ReLU; three stages of ``blocks_per_stage`` :class:`SEBlock` at ``width``, ``2 * width`` and
  ``4 * width`` channels (stages 2 and 3 start with stride 2); global average pool; Linear classifier. Parameter
  paths: ``stem``, ``stem_bn``, ``stage{1,2,3}/{j}/{conv1,bn1,conv2,bn2,se/fc1,se/fc2,proj,proj_bn}``, ``head``.
  """

  def __init__(self, *, num_classes: int = 10, width: int = 16, blocks_per_stage: int = 1, reduction: int = 4,
               rngs: nnx.Rngs):
    for name, value in (("num_classes", num_classes), ("width", width), ("blocks_per_stage", blocks_per_stage),
                        ("reduction", reduction)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    self.stem = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
    in_channels = width
    for s, (channels, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
      blocks = []
      for j in range(blocks_per_stage):
        blocks.append(SEBlock(in_channels, channels, stride=stride if j == 0 else 1, reduction=reduction,
                              rngs=rngs))
        in_channels = channels
      setattr(self, f"stage{s}", nnx.List(blocks))
    self.head = nnx.Linear(in_channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(self.stem_bn(self.stem(x)))
    for stage in (self.stage1, self.stage2, self.stage3):
      for block in stage:
        h = block(h)
    return self.head(_global_pool(h))


class SeparableBlock(nnx.Module):
  """Depthwise conv3x3 -> BN -> ReLU6 -> pointwise 1x1 conv -> BN -> ReLU6."""

  def __init__(self, in_channels: int, channels: int, *, stride: int, rngs: nnx.Rngs):
    self.dw = nnx.Conv(in_channels, in_channels, (3, 3), strides=stride, feature_group_count=in_channels,
                       use_bias=False, rngs=rngs)
    self.dw_bn = nnx.BatchNorm(in_channels, rngs=rngs)
    self.pw = nnx.Conv(in_channels, channels, (1, 1), use_bias=False, rngs=rngs)
    self.pw_bn = nnx.BatchNorm(channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu6(self.dw_bn(self.dw(x)))
    return nnx.relu6(self.pw_bn(self.pw(h)))


class DepthwiseNet(nnx.Module):
  """A MobileNet-like net (NHWC, float32): stem conv3x3 -> BN -> ReLU6, four :class:`SeparableBlock` with output
  widths ``(width, 2 * width, 2 * width, 4 * width)`` and strides ``(1, 2, 1, 2)``, global average pool, Linear
  classifier. Parameter paths: ``stem``, ``stem_bn``, ``blocks/{j}/{dw,dw_bn,pw,pw_bn}``, ``head``.
  """

  def __init__(self, *, num_classes: int = 10, width: int = 16, rngs: nnx.Rngs):
    for name, value in (("num_classes", num_classes), ("width", width)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    self.stem = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
    blocks, in_channels = [], width
    for channels, stride in ((width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2)):
      blocks.append(SeparableBlock(in_channels, channels, stride=stride, rngs=rngs))
      in_channels = channels
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu6(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      h = block(h)
    return self.head(_global_pool(h))


def se_resnet(*, num_classes: int = 10, rngs: nnx.Rngs, width: int = 16, blocks_per_stage: int = 1,
              reduction: int = 4) -> SEResNet:
  """A :class:`SEResNet` (the program builds it from ``--config.model.name=examples.user_cnns:se_resnet``).

  Args:
    num_classes: outputs of the classifier.
    rngs: the initialisers' random streams.
    width: channels of stage 1 (stages 2 and 3 have ``2 * width`` and ``4 * width``).
    blocks_per_stage: basic blocks per stage.
    reduction: an SE gate's hidden width is its block's channels ``// reduction`` (at least 1).

  Raises:
    ValueError: an argument that is not an int >= 1.
  """
  return SEResNet(num_classes=num_classes, width=width, blocks_per_stage=blocks_per_stage, reduction=reduction,
                  rngs=rngs)


def depthwise_net(*, num_classes: int = 10, rngs: nnx.Rngs, width: int = 16) -> DepthwiseNet:
  """A :class:`DepthwiseNet` (the program builds it from ``--config.model.name=examples.user_cnns:depthwise_net``).

  Args:
    num_classes: outputs of the classifier.
    rngs: the initialisers' random streams.
    width: channels of the stem and the first block (the others have ``2 * width`` and ``4 * width``).

  Raises:
    ValueError: an argument that is not an int >= 1.
  """
  return DepthwiseNet(num_classes=num_classes, width=width, rngs=rngs)
