"""ITPruner's own cost model, in its own units, for checking against the FLOPs figures its authors publish.

ITPruner (Zheng et al., 2021) states its budgets ("ResNet-56 at 60M", "ResNet-50 at 2.3G", ...) in a unit of its
own: conv multiply-accumulates mixed with a few operations per element for BatchNorm, ReLU and pooling, and a
``2 * in + 1`` per output for the classifier. Neither MACs nor thop's FLOPs, these numbers only make sense in that
unit, so this module writes the model out, as a function of the widths, to check the published width lists
against the published budgets. **The program itself never uses these units**: it budgets and reports with the
exact counter :func:`models.flops.count` (conv + fc MACs, every parameter).

Two functions per architecture, since ITPruner computes its cost twice:

- :func:`constraint_flops` is ``F(w)``, the quadratic its optimiser constrains (``F(w) <= target``). Its
  coefficients are built once from the dense widths ``c`` and then scaled by the kept fractions ``x = w / c``, so
  terms that are constants or depend on which widths differ are frozen at the dense network's structure.
- :func:`printed_flops` is the count it prints for a width list (and that the published budgets are compared
  with); it is evaluated at the given widths.

Width variables (ITPruner's, which are not always the project's width lists):

- ``resnet20`` / ``resnet56`` (CIFAR, 32x32): one width per residual block (9 / 27), the block's output and inner
  width alike; dense 16, 32, 64 per stage. (The project's CIFAR ResNets share one width per stage's residual
  stream, so these lists are not the project's.)
- ``vgg16`` (CIFAR VGG-16-BN): the 13 conv widths, the same list as the project's ``vgg16``.
- ``resnet50`` (ImageNet, 224x224): the 37-entry list ``[stem, s1b0.p1, s1b0.p2, W1, s1b1.p1, s1b1.p2, ...]``
  (p1/p2 the widths of a bottleneck's conv1/conv2, W_s the stage width after the stage's first block), the same
  list as the project's ``resnet50``.

What the units count (spatial side ``s`` of a layer's output):

- CIFAR ResNet: conv ``C_in * 9 * C_out * s^2``; each BN ``4 * C * s^2``; a block whose input and output widths
  differ pays ``C_in * C_out * s^2`` for its shortcut as if it were a 1x1 conv (it is a zero-pad, costing
  nothing); fc ``(2 * C + 1) * 10``. The constraint leaves out the stem conv and BN, pays the shortcut only where
  the dense widths differ (stage starts), and costs the fc as ``2 * 10 * w_last``.
- VGG: conv ``9 * C_in * C_out * s^2``; BN 4 and ReLU 1 per output element; a 2x2 max pool 2 per output element;
  the 2x2 average pool 3 per channel; fc1 ``(2 * C_13 - 1) * 512``, BatchNorm1d ``4 * C_13``, ReLU 512 and fc2
  ``(2 * 512 - 1) * 10``. The constraint costs the classifier as ``3 w13 + 2 * 512 * w13 + 4 * w13`` and
  nothing else of it.
- ResNet-50: conv ``C_in * k^2 * C_out * s^2`` plus 5 per output element (BN + ReLU, also after convs followed by
  no ReLU); stem pool ``9 * C * 56^2``; fc ``(2 * C + 1) * 1000`` with ``C`` the **last entry of the list** (the
  last block's p2, not the 2048-wide stage). Every stage's first-block conv1 is costed at twice the side of the
  stage's output, which is right for stages 2-4 (the stride sits on the 3x3) but makes stage 1's conv1 (no stride,
  at 56x56) four times too large. The constraint is the same quadratic with the fc scaled by ``x_last``.

Dense values (checked in ``tests/test_itpruner_costs.py``): printed 41.57M (ResNet-20), 127.88M (ResNet-56),
315.18M (VGG-16), 4187.1M (ResNet-50).

>>> round(printed_flops("resnet56", base_widths("resnet56")) / 1e6, 2)
127.88
"""

from __future__ import annotations

from collections.abc import Sequence

MODELS = ("resnet20", "resnet56", "vgg16", "resnet50")

_CIFAR_BLOCKS = {"resnet20": 3, "resnet56": 9}
_VGG_BASE = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_VGG_POOL_AFTER = (2, 4, 7, 10)  # 1-indexed convs followed by a 2x2 max pool
_R50_BLOCKS = (3, 4, 6, 3)
_R50_BASE_P = (64, 128, 256, 512)  # dense p1 = p2 per stage
_R50_BASE_W = (256, 512, 1024, 2048)  # dense stage widths


def _check_name(name: str) -> None:
  if name not in MODELS:
    raise ValueError(f"name must be one of {list(MODELS)}, got {name!r}")


def base_widths(name: str) -> list[int]:
  """ITPruner's dense width variables for ``name`` (see the module docstring for their meaning).

  >>> base_widths("resnet20")
  [16, 16, 16, 32, 32, 32, 64, 64, 64]
  """
  _check_name(name)
  if name in _CIFAR_BLOCKS:
    n = _CIFAR_BLOCKS[name]
    return [c for c in (16, 32, 64) for _ in range(n)]
  if name == "vgg16":
    return list(_VGG_BASE)
  out = [64]
  for s, blocks in enumerate(_R50_BLOCKS):
    p, w = _R50_BASE_P[s], _R50_BASE_W[s]
    out += [p, p, w] + [p] * (2 * (blocks - 1))
  return out


def _check_widths(name: str, widths: Sequence[int]) -> list[float]:
  n = len(base_widths(name))
  ws = list(widths)
  if len(ws) != n:
    raise ValueError(f"widths for {name} must have {n} entries (ITPruner's width variables), got {len(ws)}")
  for i, w in enumerate(ws):
    if not (isinstance(w, (int, float)) or hasattr(w, "__float__")) or not float(w) >= 0:
      raise ValueError(f"widths[{i}] must be a number >= 0, got {w!r}")
  return [float(w) for w in ws]


def _cifar(name: str, w: list[float], *, constraint: bool) -> float:
  n = _CIFAR_BLOCKS[name]
  base = base_widths(name)
  total = 0.0 if constraint else (3 * 9 * 16 + 4 * 16) * 32 * 32  # stem conv + BN, left out of the constraint
  prev, prev_base = 16.0, 16
  for k, c in enumerate(w):
    s2 = (32 >> (k // n)) ** 2
    total += (prev * 9 * c + 9 * c * c + 2 * 4 * c) * s2
    # The shortcut is costed as a 1x1 conv wherever the widths differ: in the constraint, where the dense widths do.
    if (base[k] != prev_base) if constraint else (c != prev):
      total += prev * c * s2
    prev, prev_base = c, base[k]
  return total + (2 * 10 * w[-1] if constraint else (2 * w[-1] + 1) * 10)


def _vgg(w: list[float], *, constraint: bool) -> float:
  total, side, c_in = 0.0, 32, 3.0
  for k, c in enumerate(w, start=1):
    total += (9 * c_in * c + 4 * c + c) * side * side
    if k in _VGG_POOL_AFTER:
      side //= 2
      total += 2 * side * side * c
    c_in = c
  # After conv13 at 2x2, a 2x2 average pool to 1x1, then the classifier.
  c13 = w[-1]
  if constraint:
    return total + 3 * c13 + 2 * c13 * 512 + 4 * c13
  return total + 3 * c13 + (2 * c13 - 1) * 512 + 4 * c13 + 512 + (2 * 512 - 1) * 10


def _resnet50(w: list[float], *, constraint: bool) -> float:
  total = (3 * 49 * w[0] + 5 * w[0]) * 112 * 112 + 9 * w[0] * 56 * 56
  in_w, i, side = w[0], 1, 56
  for s, blocks in enumerate(_R50_BLOCKS):
    if s > 0:
      side //= 2
    s2 = side * side
    p1, p2, stage_w = w[i], w[i + 1], w[i + 2]
    total += (in_w * stage_w + 5 * stage_w) * s2  # downsample 1x1
    total += (in_w * p1 + 5 * p1) * (2 * side) ** 2  # conv1 at twice the side: 4x too large in stage 1
    total += (9 * p1 * p2 + 5 * p2) * s2 + (p2 * stage_w + 5 * stage_w) * s2
    i += 3
    for _ in range(blocks - 1):
      p1, p2 = w[i], w[i + 1]
      total += (stage_w * p1 + 5 * p1 + 9 * p1 * p2 + 5 * p2 + p2 * stage_w + 5 * stage_w) * s2
      i += 2
    in_w = stage_w
  fc = (2 * 512 + 1) * 1000 * w[-1] / 512 if constraint else (2 * w[-1] + 1) * 1000
  return total + fc


def printed_flops(name: str, widths: Sequence[int]) -> float:
  """ITPruner's printed cost of ``widths`` in its own units (see the module docstring for what it counts).

  >>> round(printed_flops("vgg16", base_widths("vgg16")) / 1e6, 2)
  315.18

  Raises:
    ValueError: an unknown ``name`` or a width list of the wrong length or with a negative entry.
  """
  _check_name(name)
  w = _check_widths(name, widths)
  if name in _CIFAR_BLOCKS:
    return _cifar(name, w, constraint=False)
  return _vgg(w, constraint=False) if name == "vgg16" else _resnet50(w, constraint=False)


def constraint_flops(name: str, widths: Sequence[int]) -> float:
  """ITPruner's constraint ``F(w)``, the quadratic its optimiser keeps under the target, in its own units.

  ``F(w) = sum_i u_i x_i + sum_i q_i x_i^2 + sum_{i>j} D_ij x_i x_j`` with ``x = w / c`` and coefficients built
  from the dense widths ``c`` (see the module docstring for how it differs from :func:`printed_flops`).

  >>> round(constraint_flops("resnet56", [10] * 8 + [11] + [22] + [21] * 7 + [22] + [44] + [42] * 6 + [64, 64]) / 1e6, 2)
  59.57

  Raises:
    ValueError: an unknown ``name`` or a width list of the wrong length or with a negative entry.
  """
  _check_name(name)
  w = _check_widths(name, widths)
  if name in _CIFAR_BLOCKS:
    return _cifar(name, w, constraint=True)
  return _vgg(w, constraint=True) if name == "vgg16" else _resnet50(w, constraint=True)
