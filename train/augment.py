"""Host-side preprocessing of the program's images: encoded bytes or uint8 in, uint8 out (normalisation runs on the
accelerator, :func:`train.train.device_batches`; :meth:`Preprocess.normalize` is the host version).

* evaluation (and ``augment="none"``): images of variable size (ImageNet) have their shorter side resized to
  ``round(image_size * 256 / 224)`` and the centre ``image_size`` square taken; the 32x32 datasets are used as
  they are (resized bilinearly to ``image_size`` if it differs);
* ``augment="cifar"``: the evaluation image zero-padded by 4 pixels, a random ``image_size`` crop of it, and a
  horizontal flip with probability 1/2;
* ``augment="imagenet"``: a random crop of 8%-100% of the area and aspect ratio 3/4-4/3 (log-uniform), resized to
  ``image_size`` (Inception-style), and a horizontal flip with probability 1/2.

The ``*_encoded`` functions start from the JPEG/PNG bytes (what :mod:`train.data` reads): the crop window is drawn
from the header's size, a JPEG is decoded at a reduced DCT scale where the output size allows it, and PIL resizes
the window without copying it out first. Every random draw comes from the ``np.random.Generator`` passed in, so
:mod:`train.data` decides determinism.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from models.cifar10 import normalize

AUGMENTS = ("cifar", "imagenet", "none")
# Datasets whose images come in any size: evaluation resizes and centre-crops them.
VARIABLE_SIZE = ("imagenet2012",)
CIFAR_PAD = 4
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)




def pad_crop(image: np.ndarray, top: int, left: int, pad: int = CIFAR_PAD) -> np.ndarray:
  """The ``(h, w)`` window at ``(top, left)`` of ``image`` zero-padded by ``pad`` on every side.

  ``top = left = pad`` gives ``image`` back; in general ``out[y, x] = image[y + top - pad, x + left - pad]`` where
  that index is inside the image and 0 elsewhere.
  """
  h, w = image.shape[:2]
  if not (0 <= top <= 2 * pad and 0 <= left <= 2 * pad):
    raise ValueError(f"top={top} and left={left} must be in [0, {2 * pad}] for pad={pad}")
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  return padded[top:top + h, left:left + w]


def random_pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD) -> np.ndarray:
  """CIFAR augmentation: :func:`pad_crop` at a uniform ``(top, left)`` in ``[0, 2 pad]^2``, then a horizontal flip
  with probability 1/2 (draws, in order: top, left, flip)."""
  top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
  out = pad_crop(image, top, left, pad)
  return out[:, ::-1] if rng.random() < 0.5 else out


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """``image`` resized to ``(height, width)`` by PIL's bilinear filter (antialiased when shrinking)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_center_crop(image: np.ndarray, size: int, resize_to: int) -> np.ndarray:
  """The shorter side resized to ``resize_to`` (aspect kept), then the centre ``size x size`` square."""
  if resize_to < size:
    raise ValueError(f"resize_to={resize_to} must be >= size={size}")
  h, w = image.shape[:2]
  scale = resize_to / min(h, w)
  new_h, new_w = (resize_to, max(resize_to, round(w * scale))) if h <= w else (max(resize_to, round(h * scale)),
                                                                              resize_to)
  big = resize(image, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return big[top:top + size, left:left + size]


def crop_window(height: int, width: int, rng: np.random.Generator, area: tuple[float, float] = CROP_AREA,
                ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
  """``(top, left, crop_height, crop_width)`` of an Inception-style crop of a ``height x width`` image: a region of
  ``area`` x the image area (uniform) and aspect ratio ``w / h`` in ``ratio`` (log-uniform), at a uniform position.

  After 10 draws that do not fit, the centre crop of the whole image clipped to the nearest allowed aspect ratio
  (torchvision's ``RandomResizedCrop`` rule).
  """
  h, w = height, width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = h * w * rng.uniform(*area)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  if w / h < ratio[0]:
    cw, ch = w, round(w / ratio[0])
  elif w / h > ratio[1]:
    cw, ch = round(h * ratio[1]), h
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        area: tuple[float, float] = CROP_AREA,
                        ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
  """The :func:`crop_window` of a decoded image, resized to ``size x size``."""
  top, left, ch, cw = crop_window(*image.shape[:2], rng, area, ratio)
  return resize(image[top:top + ch, left:left + cw], size, size)


def decode(encoded: bytes) -> np.ndarray:
  """The uint8 ``(h, w, 3)`` pixels of a JPEG or PNG (greyscale and CMYK converted to RGB)."""
  return np.asarray(_rgb(Image.open(io.BytesIO(encoded))))


def _rgb(image: Image.Image) -> Image.Image:
  return image if image.mode == "RGB" else image.convert("RGB")


def _open_scaled(encoded: bytes, at_least: tuple[float, float], draft: bool) -> tuple[Image.Image, float, float]:
  """The image decoded at the smallest JPEG DCT scale (1, 1/2, 1/4 or 1/8; full size without ``draft``) whose
  size is at least ``at_least = (fx, fy)`` times the full size, with the factors ``(sx, sy)`` from full-size to
  decoded coordinates."""
  image = Image.open(io.BytesIO(encoded))
  w, h = image.size
  if draft:
    # draft() returns the nearest scale whose size is >= the request; PNGs ignore it.
    image.draft("RGB", (math.ceil(w * at_least[0]), math.ceil(h * at_least[1])))
  image = _rgb(image)
  return image, image.size[0] / w, image.size[1] / h


def random_resized_crop_encoded(encoded: bytes, rng: np.random.Generator, size: int, *, draft: bool = True,
                                area: tuple[float, float] = CROP_AREA,
                                ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
  """:func:`crop_window` of a JPEG/PNG's full-size pixels, resized to ``size x size`` (bilinear), straight from
  the encoded bytes.

  The window is drawn from the header's size before decoding; with ``draft`` a JPEG is decoded at the smallest DCT
  scale whose crop still spans >= ``size`` pixels each way (libjpeg's scaled IDCT: a crop of 1,000 pixels resized to
  224 is decoded at 1/4 of the work), and PIL resizes the window in place (``resize(box=...)``), without cutting a
  copy first. Same draws as :func:`random_resized_crop`; pixels differ from it only by the scaled decode and
  because the filter near the window's edge reads the pixels just outside it.
  """
  header = Image.open(io.BytesIO(encoded))
  w, h = header.size
  top, left, ch, cw = crop_window(h, w, rng, area, ratio)
  image, sx, sy = _open_scaled(encoded, (size / cw, size / ch), draft)
  box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
  return np.asarray(image.resize((size, size), Image.BILINEAR, box=box))


def resize_center_crop_encoded(encoded: bytes, size: int, resize_to: int, *, draft: bool = True) -> np.ndarray:
  """:func:`resize_center_crop` from the encoded bytes, decoded (with ``draft``) at the smallest JPEG DCT scale
  that keeps the shorter side >= ``resize_to``."""
  if resize_to < size:
    raise ValueError(f"resize_to={resize_to} must be >= size={size}")
  header = Image.open(io.BytesIO(encoded))
  w, h = header.size
  scale = resize_to / min(h, w)
  new_h, new_w = (resize_to, max(resize_to, round(w * scale))) if h <= w else (max(resize_to, round(h * scale)),
                                                                              resize_to)
  image, _, _ = _open_scaled(encoded, (new_w / w, new_h / h), draft)
  if image.size != (new_w, new_h):
    image = image.resize((new_w, new_h), Image.BILINEAR)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.asarray(image)[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Turns a decoded uint8 image into the model's normalised float32 input (see the module docstring)."""

  size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  augment: str
  variable_size: bool

  @classmethod
  def from_config(cls, cfg: Any) -> Preprocess:
    size = int(cfg.image_size)
    if size < 1:
      raise ValueError(f"data.image_size={cfg.image_size} must be a positive int")
    mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise ValueError(f"data.mean={cfg.mean} and data.std={cfg.std} must be 3 floats each, std > 0")
    if cfg.augment not in AUGMENTS:
      raise ValueError(f"data.augment={cfg.augment!r} is not one of {list(AUGMENTS)}")
    return cls(size, mean, std, cfg.augment, cfg.name in VARIABLE_SIZE)  # type: ignore[arg-type]

  @property
  def resize_to(self) -> int:
    """The shorter side of a variable-size image before the evaluation centre crop (256 at 224)."""
    return round(self.size * 256 / 224)

  def eval_image(self, image: np.ndarray) -> np.ndarray:
    if self.variable_size:
      return resize_center_crop(image, self.size, self.resize_to)
    return resize(image, self.size, self.size)

  def train_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.augment == "cifar":
      return random_pad_crop_flip(self.eval_image(image), rng)
    if self.augment == "imagenet":
      out = random_resized_crop(image, rng, self.size)
      return out[:, ::-1] if rng.random() < 0.5 else out
    return self.eval_image(image)

  def eval_encoded(self, encoded: bytes) -> np.ndarray:
    """:meth:`eval_image` of a JPEG/PNG, decoding at a reduced JPEG scale where the resize allows."""
    if self.variable_size:
      return resize_center_crop_encoded(encoded, self.size, self.resize_to)
    return self.eval_image(decode(encoded))

  def train_encoded(self, encoded: bytes, rng: np.random.Generator) -> np.ndarray:
    """:meth:`train_image` of a JPEG/PNG; the Inception crop reads the window straight from the encoded bytes
    (:func:`random_resized_crop_encoded`), then flips with probability 1/2."""
    if self.augment == "imagenet":
      out = random_resized_crop_encoded(encoded, rng, self.size)
      return out[:, ::-1] if rng.random() < 0.5 else out
    return self.train_image(decode(encoded), rng)

  def normalize(self, image: np.ndarray) -> np.ndarray:
    return normalize(image, self.mean, self.std)
