"""``hsic_cifar10_folder`` / ``hsic_cifar100_folder``: TFDS datasets prepared from a local CIFAR binary folder.

The source folder is in the official binary layout:

* CIFAR-10 (``cifar-10-batches-bin``): ``data_batch_{1..5}.bin`` (those present, at least one), optionally
  ``test_batch.bin`` and ``batches.meta.txt`` (class names); 3,073-byte records, one label byte then 3,072 pixel
  bytes (read by :func:`models.cifar10.read_batch_file`).
* CIFAR-100 (``cifar-100-binary``): ``train.bin``, optionally ``test.bin``, ``fine_label_names.txt`` and
  ``coarse_label_names.txt``; 3,074-byte records, a coarse label byte (0..19), a fine label byte (0..99), then the
  same 3,072 pixel bytes. The fine label is ``label``; the coarse one is kept as ``coarse_label``.

Features: ``image`` (32x32x3, PNG), ``label`` (ClassLabel), ``id`` (int64: the position in the concatenated train
files for ``train`` and ``validation``, the position in the test file for ``test``).

Splits:

* ``validation``: the last ``val_fraction`` (default 0.1, rounded to the nearest record) of *each* train file,
  carved whether or not a test file exists, so that a model can be tuned without touching the test set;
* ``train``: the rest of the train files;
* ``test``: the test file, only where the folder has one.

Records are stored in ``id`` order. The dataset's metadata (``metadata.json`` beside ``dataset_info.json``)
records the source folder, its files (name, bytes, SHA-256) and ``val_fraction``: :func:`train.data.prepare`
compares it with the folder it is given and prepares again when they differ, instead of reusing stale data.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from models import cifar10
from train.datasets._common import encode_png

CIFAR100_RECORD_BYTES = 2 + 32 * 32 * 3


def read_cifar100_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads one CIFAR-100 binary file (``train.bin`` / ``test.bin``).

  Returns:
    ``(images, fine_labels, coarse_labels)``: uint8 ``(n, 32, 32, 3)`` NHWC images, int64 ``(n,)`` fine labels
    in 0..99 and int64 ``(n,)`` coarse labels in 0..19.

  Raises:
    ValueError: the file size is not a multiple of 3,074 bytes, or a label is out of range.
  """
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size % CIFAR100_RECORD_BYTES:
    raise ValueError(f"{path}: size {raw.size} bytes is not a multiple of the {CIFAR100_RECORD_BYTES}-byte "
                     "CIFAR-100 record; is this a CIFAR-10 file?")
  records = raw.reshape(-1, CIFAR100_RECORD_BYTES)
  coarse, fine = records[:, 0].astype(np.int64), records[:, 1].astype(np.int64)
  if coarse.size and (coarse.max() > 19 or fine.max() > 99):
    raise ValueError(f"{path}: coarse label {coarse.max()} or fine label {fine.max()} outside 0..19 / 0..99")
  images = records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), fine, coarse


def num_validation(n: int, val_fraction: float) -> int:
  """How many of a train file's ``n`` records go to ``validation``: ``n * val_fraction``, halves rounded up."""
  # The epsilon absorbs binary rounding (e.g. 10000 * 0.1 = 1000.0000000000001), which floor would keep.
  return int(math.floor(n * val_fraction + 0.5 + 1e-9))


def _names_file(folder: Path, name: str) -> list[str] | None:
  path = folder / name
  if not path.exists():
    return None
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


class _CifarFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A CIFAR binary folder as a TFDS dataset (see the module docstring); subclasses fix the layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # TFDS 4.9.10 finds a builder's source file (to look up download checksums) through `importlib_resources`, a
  # backport that is not installed on Python >= 3.9; this builder downloads nothing, so it needs no checksums.
  code_path = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder holding the binary files as source_dir (or --manual_dir)."

  LAYOUT: ClassVar[str]
  TRAIN_FILES: ClassVar[tuple[str, ...]]
  TEST_FILE: ClassVar[str]
  RECORD_BYTES: ClassVar[int]
  NUM_CLASSES: ClassVar[int]

  def __init__(self, *, source_dir: str | os.PathLike[str] | None = None, val_fraction: float = 0.1,
               **kwargs: Any):
    """Builder reading ``source_dir`` when preparing; reading a prepared dataset needs neither argument.

    Args:
      source_dir: the binary folder (only needed to prepare).
      val_fraction: the share of each train file carved off as ``validation``, in ``[0, 1)``; 0: no
        validation split.
      **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``, ``file_format``, ...).
    """
    if not 0.0 <= val_fraction < 1.0:
      raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    # Set before the base constructor: it builds the DatasetInfo, whose class names come from the folder.
    self._source_dir = Path(source_dir).expanduser().resolve() if source_dir else None
    self._val_fraction = float(val_fraction)
    super().__init__(**kwargs)
    # DatasetBuilder pickles by re-running __init__ with this dict.
    self._original_state.update(source_dir=source_dir, val_fraction=val_fraction)

  @classmethod
  def source_files(cls, folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The layout's files present in ``folder``: ``{"train": [...], "test": [...]}`` (test may be empty).

    Raises:
      FileNotFoundError: the folder is missing or has none of the layout's train files.
    """
    root = Path(folder).expanduser()
    expected = f"{', '.join(cls.TRAIN_FILES)} (and optionally {cls.TEST_FILE})"
    if not root.is_dir():
      raise FileNotFoundError(f"source_dir {str(root)!r} is not a folder; expected a {cls.LAYOUT} binary folder "
                              f"holding {expected}")
    train = [f for f in cls.TRAIN_FILES if (root / f).is_file()]
    if not train:
      present = sorted(p.name for p in root.iterdir())[:20]
      raise FileNotFoundError(f"source_dir {str(root)!r} has none of the {cls.LAYOUT} train files {expected}; "
                              f"it holds {present}")
    test = [cls.TEST_FILE] if (root / cls.TEST_FILE).is_file() else []
    return {"train": train, "test": test}

  @classmethod
  def fingerprint(cls, folder: str | os.PathLike[str], val_fraction: float) -> dict[str, Any]:
    """What identifies the data prepared from ``folder``: its absolute path, layout, ``val_fraction`` and each
    file's name, size and SHA-256 (a JSON-ready dict, stored in the dataset's metadata)."""
    root = Path(folder).expanduser().resolve()
    files = cls.source_files(root)
    return {
        "source_dir": str(root),
        "layout": cls.LAYOUT,
        "val_fraction": float(val_fraction),
        "files": [{"name": f, "bytes": (root / f).stat().st_size, "sha256": _sha256(root / f)}
                  for f in files["train"] + files["test"]],
    }

  def _read_file(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(images, labels, coarse labels or None)`` of one binary file."""
    raise NotImplementedError

  def _label_features(self) -> dict[str, tfds.features.ClassLabel]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
            **self._label_features(),
            "id": np.int64,
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        metadata=tfds.core.MetadataDict(),
        # Records in id order: the eval pass and the tests can rely on file order; training shuffles anyway.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    root = self._source_dir
    if root is None:
      try:
        root = Path(dl_manager.manual_dir)
      except AssertionError as err:  # TFDS asserts the manual dir exists
        raise FileNotFoundError(f"{self.name}: no source_dir given to prepare from; pass the {self.LAYOUT} "
                                "binary folder as source_dir") from err
    fingerprint = self.fingerprint(root, self._val_fraction)
    files = self.source_files(root)
    self.info.metadata["source"] = fingerprint

    splits: dict[str, list[tuple[int, np.ndarray, int, int | None]]] = {"train": [], "validation": []}
    offset = 0
    counts = []
    for name in files["train"]:
      images, labels, coarse = self._read_file(root / name)
      n = len(labels)
      n_val = num_validation(n, self._val_fraction)
      counts.append({"file": name, "records": n, "validation": n_val})
      for i in range(n):
        split = "validation" if i >= n - n_val else "train"
        splits[split].append((offset + i, images[i], int(labels[i]), None if coarse is None else int(coarse[i])))
      offset += n
    if files["test"]:
      images, labels, coarse = self._read_file(root / files["test"][0])
      splits["test"] = [(i, images[i], int(labels[i]), None if coarse is None else int(coarse[i]))
                        for i in range(len(labels))]
    self.info.metadata["carve"] = counts
    return {split: self._generate_examples(rows) for split, rows in splits.items() if rows}

  def _generate_examples(self, rows: list) -> Iterator[tuple[int, dict]]:  # pylint: disable=arguments-differ
    for i, image, label, coarse in rows:
      example = {"image": encode_png(image), "label": label, "id": i}
      if coarse is not None:
        example["coarse_label"] = coarse
      yield i, example


class Cifar10Folder(_CifarFolder):
  """A ``cifar-10-batches-bin`` folder as a TFDS dataset."""

  name = "hsic_cifar10_folder"
  LAYOUT = "CIFAR-10"
  TRAIN_FILES = cifar10.TRAIN_FILES
  TEST_FILE = cifar10.TEST_FILES[0]
  RECORD_BYTES = cifar10.RECORD_BYTES
  NUM_CLASSES = 10

  def _read_file(self, path: Path) -> tuple[np.ndarray, np.ndarray, None]:
    images, labels = cifar10.read_batch_file(path)
    return images, labels, None

  def _label_features(self) -> dict[str, tfds.features.ClassLabel]:
    if self._source_dir is None:  # reading a prepared dataset: TFDS restores the names from its label file
      return {"label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)}
    names = cifar10.class_names(self._source_dir)
    if len(names) != self.NUM_CLASSES:
      raise ValueError(f"{self._source_dir}/batches.meta.txt lists {len(names)} class names, expected 10")
    return {"label": tfds.features.ClassLabel(names=names)}

  @classmethod
  def source_files(cls, folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    root = Path(folder).expanduser()
    try:
      return super().source_files(root)
    except FileNotFoundError as err:
      if root.is_dir() and (root / Cifar100Folder.TRAIN_FILES[0]).is_file():
        raise FileNotFoundError(f"{err}. It has {Cifar100Folder.TRAIN_FILES[0]}: a CIFAR-100 folder is read with "
                                "name='cifar100_folder'") from None
      raise


class Cifar100Folder(_CifarFolder):
  """A ``cifar-100-binary`` folder as a TFDS dataset (fine labels as ``label``, coarse as ``coarse_label``)."""

  name = "hsic_cifar100_folder"
  LAYOUT = "CIFAR-100"
  TRAIN_FILES = ("train.bin",)
  TEST_FILE = "test.bin"
  RECORD_BYTES = CIFAR100_RECORD_BYTES
  NUM_CLASSES = 100

  def _read_file(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return read_cifar100_file(path)

  def _label_features(self) -> dict[str, tfds.features.ClassLabel]:
    root = self._source_dir
    fine = _names_file(root, "fine_label_names.txt") if root else None
    coarse = _names_file(root, "coarse_label_names.txt") if root else None
    return {
        "label": tfds.features.ClassLabel(names=fine) if fine else tfds.features.ClassLabel(num_classes=100),
        "coarse_label": tfds.features.ClassLabel(names=coarse) if coarse else tfds.features.ClassLabel(num_classes=20),
    }
