"""``hsic_digits``: scikit-learn's bundled 8x8 digits as a 32x32 RGB TFDS dataset (nothing is downloaded).

Each of the 1,797 images of :func:`sklearn.datasets.load_digits` (pixel values 0..16) is scaled to 0..255
(``round(v * 255 / 16)``, uint8), upscaled to 32x32 with PIL's bilinear filter and copied to three channels.
Features: ``image`` (32x32x3, PNG), ``label`` (ClassLabel, 10) and ``id`` (the index in scikit-learn's arrays).

Splits, stratified and deterministic: within each class, in scikit-learn's order, every 5th example (ranks 4, 9,
14, ...) is ``test`` and the others are ``train`` (about 80/20: 1,442 + 355). Records are stored in ``id`` order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from train.datasets._common import encode_png

SIZE = 32
TEST_EVERY = 5


def upscale(digit: np.ndarray) -> np.ndarray:
  """One 8x8 digit (values 0..16) as the uint8 ``(32, 32, 3)`` image stored in the dataset."""
  if digit.shape != (8, 8):
    raise ValueError(f"digit must be an 8x8 array, got shape {digit.shape}")
  grey = np.round(np.asarray(digit, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  big = np.asarray(Image.fromarray(grey, mode="L").resize((SIZE, SIZE), Image.BILINEAR))
  return np.repeat(big[:, :, None], 3, axis=2)


def split_ids(targets: np.ndarray) -> dict[str, np.ndarray]:
  """The stratified split: ``{"train": ids, "test": ids}``, each ascending.

  Within each class (in index order) every ``TEST_EVERY``-th example, ranks ``TEST_EVERY - 1, 2 * TEST_EVERY - 1,
  ...``, goes to test, so each class keeps its share in both splits.
  """
  targets = np.asarray(targets)
  is_test = np.zeros(targets.shape, bool)
  for c in np.unique(targets):
    members = np.flatnonzero(targets == c)
    is_test[members[TEST_EVERY - 1::TEST_EVERY]] = True
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits, 32x32 RGB, split 80/20 per class (see the module docstring)."""

  name = "hsic_digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # TFDS 4.9.10 finds a builder's source file (to look up download checksums) through `importlib_resources`, a
  # backport that is not installed on Python >= 3.9; this builder downloads nothing, so it needs no checksums.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            "id": np.int64,
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        # Records in id order: the eval pass and the tests can rely on file order; training shuffles anyway.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # the data ships with scikit-learn
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    data = load_digits()
    ids = split_ids(data.target)
    return {split: self._generate_examples(data.images, data.target, ids[split]) for split in ("train", "test")}

  def _generate_examples(self, images: np.ndarray, targets: np.ndarray,  # pylint: disable=arguments-differ
                         ids: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i in ids:
      yield int(i), {"image": encode_png(upscale(images[i])), "label": int(targets[i]), "id": int(i)}
