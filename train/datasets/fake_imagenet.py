"""A tiny fake ``imagenet2012`` in the real dataset's on-disk format, for tests of the ImageNet code paths.

:func:`make_fake_imagenet` writes ``<data_dir>/imagenet2012/<VERSION>/`` with the features, version, split names
and array_record file names of TFDS's registered ``imagenet2012`` builder, so that
``tfds.data_source("imagenet2012", data_dir=data_dir)`` (and :mod:`train.data` with ``name="imagenet2012"``) read
it exactly as they would read the real, prepared dataset. The builder that writes it subclasses the registered one
(inheriting its ``_info``: ``image`` JPEG of any size, ``label`` ClassLabel of the 1,000 synsets, ``file_name``
Text) and replaces only the example generation, which would otherwise read ILSVRC2012 tar files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from train.datasets._common import encode_jpeg

# (height, width) of the fake images, cycled: landscape and portrait, none square, so that resizing and cropping
# code cannot get away with mixing up the axes.
SIZES = ((40, 56), (64, 48), (36, 90), (75, 50))
# ILSVRC2012's training images: mean about 400 x 350 (width x height), most 500 x 375 or 375 x 500; JPEG quality
# about 90. Used with realistic=True, where decoding cost matters (benchmarks.input_pipeline).
REALISTIC_QUALITY = 90


def realistic_size(rng: np.random.Generator) -> tuple[int, int]:
  """An ImageNet-like ``(height, width)``: half 375 x 500 landscape or portrait, the rest spread around 350 x 400."""
  if rng.random() < 0.5:
    return (375, 500) if rng.random() < 0.75 else (500, 375)
  height = int(np.clip(rng.normal(300, 70), 120, 500))
  width = int(np.clip(height * np.exp(rng.normal(0.15, 0.25)), 120, 500))
  return height, width


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A uint8 ``(height, width, 3)`` image with a photograph's spread of detail: noise at octaves 2 ... 256 pixels
  with amplitude growing as the square root of the scale, fine luminance grain and a few hard-edged discs. At
  quality 90 a 500 x 375 one takes about 100 KB, ImageNet's average file, so JPEG decoding costs what it costs on
  photographs (flat colour or smooth gradients decode several times faster)."""
  out = np.zeros((height, width, 3), np.float32)
  scale = 256
  while scale >= 2:
    small = rng.normal(0, 1, (max(2, height // scale + 2), max(2, width // scale + 2), 3)).astype(np.float32)
    layers = [np.asarray(Image.fromarray(small[..., c], mode="F").resize((width, height), Image.BICUBIC))
              for c in range(3)]
    out += scale ** 0.5 * np.stack(layers, -1)
    scale //= 2
  out = 128 + 60 * out / out.std()
  yy, xx = np.mgrid[0:height, 0:width]
  for _ in range(int(rng.integers(3, 8))):
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, min(height, width) / 3)
    out[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] += rng.uniform(-80, 80, 3)
  out += rng.normal(0, 22, (height, width, 1))
  return np.clip(out, 0, 255).astype(np.uint8)


_REAL = tfds.builder_cls("imagenet2012")

with tfds.core.registered.skip_registration():

  class FakeImagenet2012(_REAL):  # type: ignore[misc,valid-type]
    """``imagenet2012``'s builder with random JPEG images instead of the ILSVRC2012 archives."""

    name = "imagenet2012"  # the registered name, so that the folder is where the real builder looks
    VERSION = _REAL.VERSION
    # TFDS 4.9.10 finds a builder's source file (to look up download checksums) through `importlib_resources`, a
    # backport that is not installed on Python >= 3.9; this builder downloads nothing, so it needs no checksums.
    code_path = None

    def __init__(self, *, num_train: int = 16, num_validation: int = 8, seed: int = 0, realistic: bool = False,
                 **kwargs):
      self._counts = {"train": num_train, "validation": num_validation}
      self._seed = seed
      self._realistic = realistic
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
      del dl_manager  # nothing to download or extract
      return {split: self._generate_examples(split, n) for split, n in self._counts.items() if n > 0}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[str, dict]]:  # pylint: disable=arguments-differ
      rng = np.random.default_rng([self._seed, 0 if split == "train" else 1])
      names = self.info.features["label"].names
      for i in range(n):
        if self._realistic:
          image = natural_image(rng, *realistic_size(rng))
          encoded = encode_jpeg(image, quality=REALISTIC_QUALITY)
        else:
          height, width = SIZES[i % len(SIZES)]
          # Smooth colour gradients plus noise: JPEG keeps them recognisable, unlike pure noise.
          yy, xx = np.mgrid[0:height, 0:width]
          base = rng.uniform(0, 255, 3) + rng.uniform(-2, 2, 3) * (yy[..., None] + xx[..., None])
          encoded = encode_jpeg(np.clip(base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8))
        label = int(rng.integers(0, len(names)))
        file_name = (f"{names[label]}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        yield file_name, {"image": encoded, "label": label, "file_name": file_name}


def make_fake_imagenet(data_dir: str | os.PathLike[str], *, train: int = 16, validation: int = 8,
                       seed: int = 0, realistic: bool = False) -> None:
  """Prepares a fake ``imagenet2012`` (array_record) with ``train`` and ``validation`` random JPEG images.

  Image sizes cycle through :data:`SIZES`; labels are drawn uniformly from the 1,000 classes; the records are
  written in TFDS's shuffled order, like the real dataset's. If ``data_dir`` already holds a prepared
  ``imagenet2012`` (fake or real) it is left as it is.

  Args:
    data_dir: the TFDS data dir to write ``imagenet2012/<version>/`` into.
    train: number of ``train`` examples.
    validation: number of ``validation`` examples.
    seed: seed of the images and labels.
    realistic: ImageNet-sized images (:func:`realistic_size`) of natural-looking content (:func:`natural_image`)
      at JPEG quality 90, instead of the tiny :data:`SIZES` ones (for measuring decoding cost).
  """
  if train < 0 or validation < 0 or train + validation == 0:
    raise ValueError(f"train={train} and validation={validation} must be >= 0 and not both 0")
  builder = FakeImagenet2012(data_dir=os.fspath(data_dir), file_format="array_record", num_train=train,
                             num_validation=validation, seed=seed, realistic=realistic)
  builder.download_and_prepare(file_format="array_record")
