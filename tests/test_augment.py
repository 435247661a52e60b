"""train.augment: the CIFAR pad-crop-flip, resizing and Inception crops (from arrays and from encoded bytes) against
hand-built and PIL oracles."""

import io

import numpy as np
import pytest
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


def _encoded(image: np.ndarray, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w]
  rng = np.random.default_rng(seed)
  phase = rng.uniform(0, 6, 3)
  return (127 + 100 * np.sin(yy[..., None] / 17.0 + xx[..., None] / 23.0 + phase)).astype(np.uint8)


def test_crops_from_encoded_bytes_match_the_array_path():
  image = _smooth(90, 140)
  png = _encoded(image, "PNG")
  np.testing.assert_array_equal(augment.decode(png), image)
  for s in range(20):
    window = augment.crop_window(90, 140, np.random.default_rng(s))
    top, left, ch, cw = window
    assert 0 <= top <= 90 - ch and 0 <= left <= 140 - cw
    ours = augment.random_resized_crop_encoded(png, np.random.default_rng(s), 24)
    ref = augment.random_resized_crop(image, np.random.default_rng(s), 24)  # same draws
    assert ours.shape == ref.shape == (24, 24, 3) and ours.dtype == np.uint8
    # Resizing the window in place reads the pixels just outside it near its edge; inside, the two agree.
    assert np.abs(ours[3:-3, 3:-3].astype(int) - ref[3:-3, 3:-3]).max() <= 1
  # Evaluation from the bytes is the array path exactly where no DCT scaling applies (a PNG).
  np.testing.assert_array_equal(augment.resize_center_crop_encoded(png, 32, 36),
                                augment.resize_center_crop(image, 32, 36))
  grey = _encoded(image[..., 0], "JPEG", quality=95)
  assert augment.decode(grey).shape == (90, 140, 3)
  with pytest.raises(ValueError, match="resize_to=30 must be >= size=32"):
    augment.resize_center_crop_encoded(png, 32, 30)


def test_dct_scaled_decode_is_close_to_the_full_decode():
  image = _smooth(800, 1040, seed=1)
  jpeg = _encoded(image, "JPEG", quality=95)
  for s in range(4):
    fast = augment.random_resized_crop_encoded(jpeg, np.random.default_rng(s), 64)
    full = augment.random_resized_crop_encoded(jpeg, np.random.default_rng(s), 64, draft=False)
    assert np.abs(fast.astype(int) - full).mean() < 3.0
  fast = augment.resize_center_crop_encoded(jpeg, 64, 73)
  full = augment.resize_center_crop_encoded(jpeg, 64, 73, draft=False)
  assert fast.shape == full.shape == (64, 64, 3) and np.abs(fast.astype(int) - full).mean() < 3.0
