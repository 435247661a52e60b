"""train.augment: the CIFAR pad-crop-flip, resizing and Inception crops against hand-built and PIL oracles."""

import numpy as np
from PIL import Image

from train import augment


def test_pad_crop_is_a_shifted_copy_with_zero_borders():
  image = (np.arange(6 * 5 * 3) % 250 + 1).astype(np.uint8).reshape(6, 5, 3)  # no zero pixel
  for top in range(9):
    for left in range(9):
      out = augment.pad_crop(image, top, left, pad=4)
      expected = np.zeros_like(image)
      for y in range(6):
        for x in range(5):
          sy, sx = y + top - 4, x + left - 4
          if 0 <= sy < 6 and 0 <= sx < 5:
            expected[y, x] = image[sy, sx]
      np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(augment.pad_crop(image, 4, 4), image)


def test_random_pad_crop_flip_draws_shifts_and_flips():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  candidates = {}
  for top in range(9):
    for left in range(9):
      crop = augment.pad_crop(image, top, left)
      candidates[crop.tobytes()] = (top, left, False)
      candidates[crop[:, ::-1].tobytes()] = (top, left, True)
  draws = [candidates[augment.random_pad_crop_flip(image, np.random.default_rng(s)).tobytes()] for s in range(300)]
  assert {d[2] for d in draws} == {False, True}
  assert len({d[:2] for d in draws}) > 60  # of 81 shifts


def test_resize_and_crops_shapes_and_identities():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  out = augment.resize_center_crop(wide, 32, 36)
  assert out.shape == (32, 32, 3)
  # Oracle: PIL resize of the shorter side to 36 (56 -> 50), then the centre 32x32.
  big = np.asarray(Image.fromarray(wide).resize((50, 36), Image.BILINEAR))
  np.testing.assert_array_equal(out, big[2:34, 9:41])
  square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(augment.resize_center_crop(square, 32, 32), square)
  for s in range(20):
    crop = augment.random_resized_crop(wide, np.random.default_rng(s), 24)
    assert crop.shape == (24, 24, 3) and crop.dtype == np.uint8
  whole = augment.random_resized_crop(wide, rng, 16, area=(1.0, 1.0), ratio=(56 / 40, 56 / 40))
  np.testing.assert_array_equal(whole, np.asarray(Image.fromarray(wide).resize((16, 16), Image.BILINEAR)))
  # No draw fits a 10:1 strip at ratio <= 4/3: the fallback is the centre 40x53 (ratio 4/3) of a 40x400 image.
  strip = rng.integers(0, 256, (40, 400, 3), dtype=np.uint8)
  fallback = augment.random_resized_crop(strip, rng, 16, area=(0.9, 1.0))
  np.testing.assert_array_equal(fallback, np.asarray(Image.fromarray(strip[:, 173:226]).resize((16, 16),
                                                                                               Image.BILINEAR)))


# ----------------------------------------------------------------------------------------------------------------
