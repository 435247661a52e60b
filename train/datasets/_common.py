"""Helpers shared by the project's TFDS builders."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
  """The PNG bytes of a uint8 ``(h, w, 3)`` image.

  Without TensorFlow, a TFDS ``Image`` feature only accepts encoded bytes (or a PIL image), not an array.
  PNG is lossless, so the decoded image read back equals ``image`` exactly.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 (h, w, 3), got {image.dtype} {image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """The JPEG bytes of a uint8 ``(h, w, 3)`` image (lossy: decoding gives back an approximation)."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 (h, w, 3), got {image.dtype} {image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()
