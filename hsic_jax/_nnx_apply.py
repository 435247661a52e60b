"""A model's forward pass as a pure function of its state, in a chosen BatchNorm mode (shared by the calibration
taps and the one-call pruning): ``apply(pure, *args) == model(*args)`` on a copy, the model itself untouched."""

from __future__ import annotations

from typing import Any

from flax import nnx

BN_MODES = ("batch", "running")


def pure_apply(model: nnx.Module, bn_mode: str) -> tuple[Any, Any]:
  """``(apply, pure)``: ``apply(pure, *args)`` is ``model(*args)`` on a copy in evaluation mode (dropout off), with
  BatchNorm on each batch's own statistics for ``bn_mode="batch"`` or on the running ones for ``"running"``;
  ``pure`` is ``nnx.to_pure_dict`` of the copy's state (the paths channel groups name).

  Raises:
    ValueError: an unknown ``bn_mode``.
  """
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be one of {list(BN_MODES)}, got {bn_mode!r}")
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  if bn_mode == "batch":
    copy.set_attributes(use_running_average=False, raise_if_not_found=False)
  graphdef, state = nnx.split(copy)
  pure = nnx.to_pure_dict(state)

  def apply(p: Any, *args: Any) -> Any:
    return nnx.merge(graphdef, p)(*args)

  return apply, pure
