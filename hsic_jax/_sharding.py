"""Inputs split across a mesh stay split: per-channel and per-problem work runs on each device's own shard.

Channel Grams are independent per channel, and the problems of a stack are independent of each other, so an input
whose channels (for :func:`hsic_jax.channel_grams`) or whose stacked problems (for :func:`hsic_jax.solve` and
:func:`hsic_jax.select_k`) are split over a mesh axis is computed with ``shard_map``: each device works on its own
shard, in the loop-or-vmap strategy of its platform, and the result comes back split the same way, with no
gathering. Any other layout is left to XLA's partitioner.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding

from hsic_jax import _checks


def split_axis(x: Any, axis: int) -> tuple[jax.sharding.Mesh, Any] | None:
  """``(mesh, mesh axes)`` when ``x`` is a concrete JAX array whose ``NamedSharding`` splits axis ``axis`` (evenly)
  and no other axis; else ``None``."""
  if not (isinstance(x, jax.Array) and _checks.is_concrete(x)):
    return None
  sharding = x.sharding
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  entry = spec[axis]
  if entry is None or any(e is not None for i, e in enumerate(spec) if i != axis):
    return None
  names = entry if isinstance(entry, tuple) else (entry,)
  parts = math.prod(sharding.mesh.shape[n] for n in names)
  if parts <= 1 or x.shape[axis] % parts:
    return None
  return sharding.mesh, entry
