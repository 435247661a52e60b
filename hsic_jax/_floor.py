"""The width floor every allocator respects: a count of channels, or a fraction of each decision's dense width."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def min_widths(omega: Any, sizes: Sequence[int], *, name: str = "omega") -> np.ndarray:
  """The fewest channels each decision keeps: ``min(omega, c_d)`` for a count, ``ceil(omega * c_d)`` for a fraction.

  Args:
    omega: an integer ``>= 1`` (a count; an integral float such as ``2.0`` is one too), a float in ``(0, 1)`` (a
      fraction of each dense width, e.g. ``0.1``), or one count ``>= 1`` per decision.
    sizes: the dense width ``c_d`` of every decision.
    name: the argument's name in error messages.

  Returns:
    Per-decision counts (int64), each in ``[1, c_d]``.

  Raises:
    ValueError: zero, a negative, NaN or infinity, a float ``>= 1`` that is not an integer, a boolean, or a sequence
      of the wrong length or with a value that is not an integer ``>= 1``.

  >>> min_widths(0.1, [16, 64]).tolist(), min_widths(3, [16, 2]).tolist()
  ([2, 7], [3, 2])
  """
  sizes_arr = np.asarray([int(s) for s in sizes], np.int64)
  if isinstance(omega, (bool, np.bool_)):
    raise ValueError(f"{name} must be an integer >= 1 or a fraction in (0, 1), got {omega!r}")
  if isinstance(omega, (int, np.integer, float, np.floating)):
    value = float(omega)
    if not math.isfinite(value) or value <= 0 or (value >= 1 and not value.is_integer()):
      raise ValueError(f"{name} must be an integer >= 1 (a count of channels) or a fraction in (0, 1) of each "
                       f"decision's dense width, got {omega!r}")
    if value < 1:
      # The slack keeps a product such as 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
      per = np.ceil(value * sizes_arr - 1e-9).astype(np.int64)
    else:
      per = np.full(sizes_arr.shape, int(value), np.int64)
  else:
    try:
      seq = list(omega)
    except TypeError as err:
      raise ValueError(f"{name} must be an integer >= 1, a fraction in (0, 1) or one count per decision, got "
                       f"{omega!r}") from err
    if len(seq) != sizes_arr.size or any(isinstance(v, (bool, np.bool_)) or not float(v).is_integer() or v < 1
                                         for v in seq):
      raise ValueError(f"{name} as a sequence must hold one integer >= 1 per decision ({sizes_arr.size}), got "
                       f"{seq!r}")
    per = np.asarray(seq, np.int64)
  return np.clip(per, 1, sizes_arr)
