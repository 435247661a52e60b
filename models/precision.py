"""Mixed precision for the zoo: convolutions and matmuls computed in a lower dtype, everything stored in float32.

A policy applied to a built model rather than a constructor argument of every architecture: the models are built
(and checkpointed) in float32 as ever, and :func:`set_compute_dtype` sets the computation dtype of every
``nnx.Conv`` and ``nnx.Linear`` (their ``dtype``; ``param_dtype`` stays float32). Such a layer casts its input and
its float32 parameters to the compute dtype and returns its output in it; the gradient flows back to the float32
parameters through the cast. BatchNorm is left at float32 (its ``dtype`` unset: the promotion of a bfloat16 input
with float32 statistics), so batch statistics are reduced, and running statistics stored and applied, in float32,
and so are the ReLUs and residual adds that XLA fuses into the normalisation. The logits come out in the compute
dtype; the program takes its losses in float32.

>>> import jax.numpy as jnp, models
>>> m = models.set_compute_dtype(models.random_model("resnet20"), jnp.bfloat16)
>>> m(jnp.zeros((1, 32, 32, 3))).dtype, m.fc.kernel.dtype
(dtype(bfloat16), dtype('float32'))
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

COMPUTE_LAYERS = (nnx.Conv, nnx.Linear)
"""The layers whose computation a compute dtype applies to."""

_ALLOWED = ("float32", "bfloat16", "float16")


def set_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
  """Sets the computation dtype of every conv and dense layer of ``model`` in place (as ``.eval()`` sets a mode)
  and returns it. Parameters, BatchNorm statistics and the checkpoint format are unchanged.

  Args:
    model: any NNX model (the zoo's or another).
    dtype: ``jnp.bfloat16`` (or ``float16``) for mixed precision; ``None`` or ``jnp.float32`` for full float32.

  Raises:
    ValueError: a dtype other than float32, bfloat16 or float16.
  """
  resolved = None if dtype is None else jnp.dtype(dtype)
  if resolved is not None and resolved.name not in _ALLOWED:
    raise ValueError(f"dtype must be one of {list(_ALLOWED)} or None (float32), got {dtype!r}")
  if resolved is not None and resolved == jnp.float32:
    resolved = None  # the layers' own default: float32 inputs and parameters compute in float32
  for _, module in nnx.iter_modules(model):
    if isinstance(module, COMPUTE_LAYERS):
      module.dtype = resolved
  return model


def compute_dtype(model: nnx.Module) -> str:
  """The name of the computation dtype of ``model``'s conv and dense layers (``"float32"`` when unset).

  Raises:
    ValueError: layers computing in different dtypes (a model set up by hand), or a model without such layers.
  """
  names = {jnp.dtype(m.dtype).name if m.dtype is not None else "float32"
           for _, m in nnx.iter_modules(model) if isinstance(m, COMPUTE_LAYERS)}
  if len(names) != 1:
    raise ValueError(f"expected one compute dtype over the model's conv and dense layers, found {sorted(names)}")
  return names.pop()
