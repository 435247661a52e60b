"""Model helpers the tests share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

import hsic_jax as hj


def masked_copy(model: nnx.Module, groups: Sequence[hj.ChannelGroup], keep: Mapping[str, Any]) -> nnx.Module:
  """A copy of ``model`` (eval mode) whose removed channels are zeroed (:func:`hsic_jax.surgery.mask`): what a
  thin model must compute, found without cutting anything."""
  copy = nnx.clone(model)
  state = nnx.state(copy)
  nnx.replace_by_pure_dict(state, hj.surgery.mask(nnx.to_pure_dict(state), groups, keep))
  nnx.update(copy, state)
  copy.eval()
  return copy
