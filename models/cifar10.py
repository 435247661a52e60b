"""Reader for CIFAR-10 in its official binary layout (``cifar-10-batches-bin/``).

Each ``data_batch_{1..5}.bin`` / ``test_batch.bin`` file is a sequence of 3,073-byte records: one label byte
(0-9), then 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue; each row-major 32x32).

>>> images, labels = load_split("shared/data/cifar10-subset/cifar-10-batches-bin", "train")  # doctest: +SKIP
>>> images.shape, images.dtype, labels.shape  # doctest: +SKIP
((4660, 32, 32, 3), dtype('uint8'), (4660,))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RECORD_BYTES = 1 + 32 * 32 * 3
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)

# Normalisation the shared pretrained ResNets were trained with (inputs scaled to [0, 1] first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_batch_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
  """Reads one binary batch file.

  Returns:
    ``(images, labels)``: uint8 ``(n, 32, 32, 3)`` NHWC images and int64 ``(n,)`` labels in 0..9.

  Raises:
    ValueError: the file size is not a multiple of 3,073 bytes, or a label is outside 0..9.
  """
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size % RECORD_BYTES:
    raise ValueError(f"{path}: size {raw.size} bytes is not a multiple of the {RECORD_BYTES}-byte CIFAR-10 record")
  records = raw.reshape(-1, RECORD_BYTES)
  labels = records[:, 0].astype(np.int64)
  if labels.size and labels.max() > 9:
    raise ValueError(f"{path}: label {labels.max()} outside 0..9; is this a CIFAR-100 file?")
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def load_split(folder: str | os.PathLike[str], split: str = "train",
               files: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads and concatenates the batch files of a split from a ``cifar-10-batches-bin`` folder.

  Args:
    folder: the folder holding the ``.bin`` files.
    split: ``"train"`` (``data_batch_*.bin``, those present; at least one) or ``"test"`` (``test_batch.bin``).
    files: explicit file names inside ``folder`` instead of ``split``'s.

  Returns:
    uint8 NHWC images ``(n, 32, 32, 3)`` and int64 labels ``(n,)``, in file order.

  Raises:
    FileNotFoundError: the folder or the split's files are missing.
    ValueError: unknown split.
  """
  root = Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"CIFAR-10 folder {root} does not exist")
  if files is None:
    if split == "train":
      files = [f for f in TRAIN_FILES if (root / f).exists()]
    elif split == "test":
      files = [f for f in TEST_FILES if (root / f).exists()]
    else:
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not files:
      expected = TRAIN_FILES if split == "train" else TEST_FILES
      raise FileNotFoundError(f"no {split} batch files {expected} in {root}")
  parts = [read_batch_file(root / f) for f in files]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def class_names(folder: str | os.PathLike[str]) -> list[str]:
  """The class names from ``batches.meta.txt`` (one per line), or the standard ten if the file is absent."""
  meta = Path(folder) / "batches.meta.txt"
  if meta.exists():
    return [line.strip() for line in meta.read_text().splitlines() if line.strip()]
  return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def normalize(images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """``(images / 255 - mean) / std`` per channel, as float32 NHWC."""
  x = images.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
