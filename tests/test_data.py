"""train.data and train.datasets: the TFDS builders, the grain pipelines, determinism, preprocessing and errors.

Oracles are independent of the code under test where possible: scikit-learn's digits array resized by PIL in
float mode, :func:`models.cifar10.read_batch_file` for the CIFAR files, a NumPy parse of hand-written CIFAR-100
records, hand-built shifted copies for the crops, and the documented permutation for the batch order.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from models import cifar10
from train import augment, data
from train.datasets import fake_imagenet, make_fake_imagenet

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_cfg(**overrides: object) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name="digits", data_dir="", source_dir="", train_split="train", eval_split="test", calib_split="train",
      image_size=32, mean=MEAN, std=STD, augment="none", val_fraction=0.1, num_workers=0))
  cfg.update(overrides)
  return cfg


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Training and evaluation batches are uint8 as they are; calibration batches are normalised: undone here (exact
  up to float rounding, so rounding gives the uint8 pixels back)."""
  if images.dtype == np.uint8:
    return images
  return np.round((images * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)) * 255).astype(np.uint8)


def take(iterator: Iterator[dict[str, np.ndarray]], k: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(k)]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: each dataset is prepared once per session into its own tmp data_dir.


@pytest.fixture(scope="session")
def digits_cfg(tmp_path_factory) -> ml_collections.ConfigDict:
  cfg = make_cfg(data_dir=str(tmp_path_factory.mktemp("tfds_digits")))
  data.prepare(cfg)
  return cfg


@pytest.fixture(scope="session")
def cifar_src(shared: Path) -> Path:
  folder = shared / "data/cifar10-subset/cifar-10-batches-bin"
  if not folder.is_dir():
    pytest.skip(f"CIFAR-10 subset not found at {folder}")
  return folder


@pytest.fixture(scope="session")
def cifar_cfg(cifar_src: Path, tmp_path_factory) -> ml_collections.ConfigDict:
  cfg = make_cfg(name="cifar10_folder", data_dir=str(tmp_path_factory.mktemp("tfds_cifar")), source_dir=str(cifar_src),
                 eval_split="validation", augment="cifar")
  data.prepare(cfg)
  return cfg


@pytest.fixture(scope="session")
def imagenet_cfg(tmp_path_factory) -> ml_collections.ConfigDict:
  data_dir = tmp_path_factory.mktemp("tfds_imagenet")
  make_fake_imagenet(data_dir, train=12, validation=6, seed=0)
  return make_cfg(name="imagenet2012", data_dir=str(data_dir), eval_split="validation", augment="imagenet")


def write_records(path: Path, records: list[bytes]) -> None:
  path.write_bytes(b"".join(records))


def cifar10_records(path: Path, start: int, stop: int) -> list[bytes]:
  raw = path.read_bytes()
  return [raw[i * cifar10.RECORD_BYTES:(i + 1) * cifar10.RECORD_BYTES] for i in range(start, stop)]


# ----------------------------------------------------------------------------------------------------------------
# digits


def test_digits_images_and_labels_match_sklearn(digits_cfg):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  seen = {}
  for split in ("train", "test"):
    source = tfds.data_source("hsic_digits", split=split, data_dir=digits_cfg.data_dir)
    seen[split] = [int(source[i]["id"]) for i in range(len(source))]
    for i in (0, 7, len(source) // 2, len(source) - 1):
      example = source[i]
      j = int(example["id"])
      assert example["label"] == digits.target[j]
      # Oracle: PIL's float-mode bilinear resize of the raw 0..16 digit, scaled afterwards.
      ref = np.asarray(Image.fromarray(digits.images[j].astype(np.float32), mode="F").resize((32, 32),
                                                                                              Image.BILINEAR))
      ref = ref * 255 / 16
      assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
      assert np.all(example["image"][..., 0] == example["image"][..., 2])
      assert np.abs(example["image"][..., 1].astype(float) - ref).max() <= 1.5
  train, test = set(seen["train"]), set(seen["test"])
  assert len(train) + len(test) == 1797 == len(train | test)
  assert data.num_examples(digits_cfg, "train") == len(train)
  assert data.num_examples(digits_cfg, "test") == len(test)
  for c in range(10):  # stratified: a fifth of each class (rounded down) is test
    members = np.flatnonzero(digits.target == c)
    assert sum(int(j) in test for j in members) == len(members) // 5
  assert seen["test"] == sorted(seen["test"])  # stored in id order
  assert data.num_classes(digits_cfg) == 10


def test_digits_eval_pass_sees_every_example_once_with_padding(digits_cfg):
  source = tfds.data_source("hsic_digits", split="test", data_dir=digits_cfg.data_dir)
  n = len(source)
  batch = 64
  shards = [list(data.eval_batches(digits_cfg, "test", batch_size=batch, process_index=p, process_count=2))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == math.ceil(n / batch)
  images, labels, masks = [], [], []
  for b0, b1 in zip(*shards):
    for key in ("image", "label", "mask"):
      assert b0[key].shape[0] == b1[key].shape[0] == batch // 2
    assert b0["image"].dtype == np.uint8 and b0["label"].dtype == np.int32 and b0["mask"].dtype == bool
    images.append(np.concatenate([b0["image"], b1["image"]]))
    labels.append(np.concatenate([b0["label"], b1["label"]]))
    masks.append(np.concatenate([b0["mask"], b1["mask"]]))
  images, labels, masks = np.concatenate(images), np.concatenate(labels), np.concatenate(masks)
  assert masks.sum() == n and masks[:n].all() and not masks[n:].any()
  assert np.all(images[n:] == 0) and np.all(labels[n:] == 0)
  expected = np.stack([source[i]["image"] for i in range(n)])
  np.testing.assert_array_equal(to_uint8(images[:n]), expected)
  np.testing.assert_array_equal(labels[:n], [source[i]["label"] for i in range(n)])


# ----------------------------------------------------------------------------------------------------------------
# CIFAR folders


def test_cifar_folder_splits_match_the_binary_files(cifar_cfg, cifar_src):
  files = [f for f in cifar10.TRAIN_FILES if (cifar_src / f).exists()]
  counts = [(cifar_src / f).stat().st_size // cifar10.RECORD_BYTES for f in files]
  n_val = [math.floor(c * 0.1 + 0.5) for c in counts]
  offsets = np.cumsum([0] + counts[:-1])
  expected_val_ids = {int(o + i) for o, c, v in zip(offsets, counts, n_val) for i in range(c - v, c)}
  assert data.num_examples(cifar_cfg, "validation") == sum(n_val)
  assert data.num_examples(cifar_cfg, "train") == sum(counts) - sum(n_val)

  ref_images, ref_labels = cifar10.load_split(cifar_src, "train")  # concatenated in file order
  val = tfds.data_source("hsic_cifar10_folder", split="validation", data_dir=cifar_cfg.data_dir)
  ids = [int(val[i]["id"]) for i in range(len(val))]
  assert set(ids) == expected_val_ids
  for i in range(0, len(val), 7):
    example = val[i]
    np.testing.assert_array_equal(example["image"], ref_images[example["id"]])
    assert example["label"] == ref_labels[example["id"]]
  train = tfds.data_source("hsic_cifar10_folder", split="train", data_dir=cifar_cfg.data_dir)
  for i in range(0, len(train), 97):
    example = train[i]
    np.testing.assert_array_equal(example["image"], ref_images[example["id"]])
    assert example["label"] == ref_labels[example["id"]]
  assert int(train[len(train) - 1]["id"]) not in expected_val_ids

  info = data.split_info(cifar_cfg)
  assert info["splits"] == {"train": len(train), "validation": len(val)}
  assert info["source_dir"] == str(cifar_src.resolve())
  assert [f["name"] for f in info["source_files"]] == files
  assert "last 0.1 of each train file" in info["validation"]
  assert data.num_classes(cifar_cfg) == 10


def test_cifar_folder_without_test_file_has_no_test_split(cifar_cfg):
  with pytest.raises(ValueError, match=r"no test_batch\.bin.*'validation'"):
    data.num_examples(cifar_cfg, "test")
  with pytest.raises(ValueError, match="no test_batch.bin"):
    next(data.eval_batches(cifar_cfg, "test", batch_size=8))


def test_cifar_folder_with_test_file_and_reprepare_on_other_source(cifar_src, tmp_path):
  src_a, src_b = tmp_path / "a", tmp_path / "b"
  for src, n_train in ((src_a, 30), (src_b, 20)):
    src.mkdir()
    write_records(src / "data_batch_1.bin", cifar10_records(cifar_src / "data_batch_1.bin", 0, n_train))
    write_records(src / "test_batch.bin", cifar10_records(cifar_src / "data_batch_2.bin", 0, 12))
  cfg = make_cfg(name="cifar10_folder", data_dir=str(tmp_path / "tfds"), source_dir=str(src_a))
  data.prepare(cfg)
  assert {s: data.num_examples(cfg, s) for s in ("train", "validation", "test")} == {
      "train": 27, "validation": 3, "test": 12}
  test_images, test_labels = cifar10.read_batch_file(src_a / "test_batch.bin")
  images, labels, ids = data.calibration_batch(make_cfg(**{**cfg.to_dict(), "calib_split": "test"}), 12, seed=3)
  np.testing.assert_array_equal(to_uint8(images), test_images[ids])
  np.testing.assert_array_equal(labels, test_labels[ids])
  assert sorted(ids.tolist()) == list(range(12))

  cfg.source_dir = str(src_b)  # same data_dir, other files: prepared again, not reused
  with pytest.warns(UserWarning, match="preparing it again"):
    data.prepare(cfg)
  assert data.num_examples(cfg, "train") == 18
  assert data.split_info(cfg)["source_dir"] == str(src_b.resolve())
  cfg.val_fraction = 0.25
  with pytest.warns(UserWarning, match="val_fraction=0.1"):
    assert data.num_examples(cfg, "validation") == 5  # prepared again implicitly: 20 * 0.25
  cfg.source_dir = ""  # no source: the prepared data is used as it is
  assert data.num_examples(cfg, "train") == 15


def test_cifar100_folder_reads_fine_labels(tmp_path):
  rng = np.random.default_rng(0)
  src = tmp_path / "cifar-100-binary"
  src.mkdir()
  arrays = {}
  for name, n in (("train.bin", 20), ("test.bin", 5)):
    coarse, fine = rng.integers(0, 20, n), rng.integers(0, 100, n)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    write_records(src / name, [bytes([coarse[i], fine[i]]) + pixels[i].tobytes() for i in range(n)])
    arrays[name] = (pixels.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), fine, coarse)
  cfg = make_cfg(name="cifar100_folder", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
  data.prepare(cfg)
  assert data.num_classes(cfg) == 100
  assert {s: data.num_examples(cfg, s) for s in ("train", "validation", "test")} == {
      "train": 18, "validation": 2, "test": 5}
  for split, name in (("train", "train.bin"), ("validation", "train.bin"), ("test", "test.bin")):
    source = tfds.data_source("hsic_cifar100_folder", split=split, data_dir=cfg.data_dir)
    images, fine, coarse = arrays[name]
    for i in range(len(source)):
      example = source[i]
      np.testing.assert_array_equal(example["image"], images[example["id"]])
      assert (example["label"], example["coarse_label"]) == (fine[example["id"]], coarse[example["id"]])
  batches = list(data.eval_batches(cfg, "test", batch_size=4))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:5], arrays["test.bin"][1])


# ----------------------------------------------------------------------------------------------------------------
# Training stream: order, resume, shards, augmentation


def test_train_order_is_the_documented_permutation(digits_cfg):
  cfg = make_cfg(**{**digits_cfg.to_dict(), "train_split": "train[:100]"})
  n, batch, seed = 100, 32, 5
  source = tfds.data_source("hsic_digits", split="train[:100]", data_dir=cfg.data_dir)
  assert data.steps_per_epoch(cfg, batch_size=batch) == 3
  batches = take(data.train_batches(cfg, batch_size=batch, seed=seed), 7)
  for step, b in enumerate(batches):
    epoch, s = divmod(step, 3)
    order = np.random.default_rng([seed, 0, epoch]).permutation(n)[s * batch:(s + 1) * batch]
    np.testing.assert_array_equal(to_uint8(b["image"]), np.stack([source[int(i)]["image"] for i in order]))
    np.testing.assert_array_equal(b["label"], [source[int(i)]["label"] for i in order])
    assert b["image"].shape == (batch, 32, 32, 3) and b["label"].dtype == np.int32


def test_train_resume_seeds_epochs_and_process_shards(digits_cfg):
  cfg = make_cfg(**{**digits_cfg.to_dict(), "train_split": "train[:100]", "augment": "cifar"})
  batch = 32
  ref = take(data.train_batches(cfg, batch_size=batch, seed=1), 8)
  resumed = take(data.train_batches(cfg, batch_size=batch, seed=1, start_step=5), 3)
  for a, b in zip(ref[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = next(data.train_batches(cfg, batch_size=batch, seed=2))
  assert not np.array_equal(other["image"], ref[0]["image"])
  # Epoch 1 (steps 3-5) is a new order, not epoch 0 again (labels alone already differ).
  epoch0 = np.concatenate([b["label"] for b in ref[:3]])
  epoch1 = np.concatenate([b["label"] for b in ref[3:6]])
  assert not np.array_equal(epoch0, epoch1)
  for step in (0, 4):
    shards = [take(data.train_batches(cfg, batch_size=batch, seed=1, start_step=step, process_index=p,
                                      process_count=4), 1)[0] for p in range(4)]
    assert all(s["image"].shape == (batch // 4, 32, 32, 3) for s in shards)
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), ref[step]["image"])
    np.testing.assert_array_equal(np.concatenate([s["label"] for s in shards]), ref[step]["label"])
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    data.train_batches(cfg, batch_size=32, seed=0, process_count=3)
  with pytest.raises(ValueError, match="larger than the 100 examples"):
    data.train_batches(cfg, batch_size=128, seed=0)


def test_grain_worker_processes_give_the_same_batches(digits_cfg):
  cfg = make_cfg(**{**digits_cfg.to_dict(), "train_split": "train[:100]", "augment": "cifar"})
  ref = take(data.train_batches(cfg, batch_size=16, seed=4, start_step=2), 3)
  cfg.num_workers = 1
  iterator = data.train_batches(cfg, batch_size=16, seed=4, start_step=2)
  try:
    got = take(iterator, 3)
  finally:
    iterator.close()
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_cifar_augmented_batch_images_are_crops_of_the_source(cifar_cfg):
  cfg = make_cfg(**{**cifar_cfg.to_dict(), "train_split": "validation"})
  source = tfds.data_source("hsic_cifar10_folder", split="validation", data_dir=cfg.data_dir)
  n = len(source)
  b = next(data.train_batches(cfg, batch_size=8, seed=0))
  order = np.random.default_rng([0, 0, 0]).permutation(n)[:8]
  for row, index in enumerate(order):
    image = source[int(index)]["image"]
    crops = [augment.pad_crop(image, t, l) for t in range(9) for l in range(9)]
    crops += [c[:, ::-1] for c in crops]
    got = to_uint8(b["image"][row])
    assert any(np.array_equal(got, c) for c in crops)


# Fake imagenet2012


def test_fake_imagenet_reads_like_the_real_dataset(imagenet_cfg):
  real = tfds.builder_cls("imagenet2012")
  source = tfds.data_source("imagenet2012", split="train", data_dir=imagenet_cfg.data_dir)
  assert len(source) == 12
  example = source[0]
  assert set(example) == {"image", "label", "file_name"}
  shapes = {tuple(source[i]["image"].shape) for i in range(len(source))}
  assert shapes == {(h, w, 3) for h, w in fake_imagenet.SIZES}
  builder = tfds.builder("imagenet2012", data_dir=imagenet_cfg.data_dir)
  assert builder.version == real.VERSION and builder.info.features["label"].num_classes == 1000
  assert data.num_classes(imagenet_cfg) == 1000
  assert data.num_examples(imagenet_cfg, "validation") == 6
  info = data.split_info(imagenet_cfg)
  assert info["splits"] == {"train": 12, "validation": 6} and info["tfds_name"] == "imagenet2012"


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_train_and_eval_shapes(imagenet_cfg, size):
  cfg = make_cfg(**{**imagenet_cfg.to_dict(), "image_size": size})
  b = next(data.train_batches(cfg, batch_size=4, seed=0))
  assert b["image"].shape == (4, size, size, 3) and b["image"].dtype == np.uint8
  batches = list(data.eval_batches(cfg, "validation", batch_size=4))
  assert [x["image"].shape for x in batches] == [(4, size, size, 3)] * 2
  assert sum(int(x["mask"].sum()) for x in batches) == 6
  source = tfds.data_source("imagenet2012", split="validation", data_dir=cfg.data_dir)
  image = source[1]["image"]
  h, w = image.shape[:2]
  short = round(size * 256 / 224)
  new_h, new_w = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
  big = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  np.testing.assert_array_equal(to_uint8(batches[0]["image"][1]), big[top:top + size, left:left + size])


def test_imagenet_batches_are_uint8_crops_resumable_at_a_step(imagenet_cfg):
  ref = take(data.train_batches(imagenet_cfg, batch_size=4, seed=2), 5)  # 12 images: 3 steps per epoch
  resumed = take(data.train_batches(imagenet_cfg, batch_size=4, seed=2, start_step=2), 3)
  for a, b in zip(ref[2:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert all(b["image"].dtype == np.uint8 and b["image"].shape == (4, 32, 32, 3) for b in ref)
  # Each row is the documented crop of its example: the same draws applied to the decoded source image.
  source = tfds.data_source("imagenet2012", split="train", data_dir=imagenet_cfg.data_dir)
  order = np.random.default_rng([2, 0, 0]).permutation(12)
  for row in range(4):
    rng = np.random.default_rng([2, 1, row])
    crop = augment.random_resized_crop(source[int(order[row])]["image"], rng, 32)
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    assert np.abs(ref[0]["image"][row, 3:-3, 3:-3].astype(int) - crop[3:-3, 3:-3]).max() <= 1


def test_imagenet_calibration_ids_are_split_indices(imagenet_cfg):
  images, labels, ids = data.calibration_batch(imagenet_cfg, 5, seed=0, augment=True)
  assert images.shape == (5, 32, 32, 3) and labels.dtype == np.int32 and ids.dtype == np.int64
  source = tfds.data_source("imagenet2012", split="train", data_dir=imagenet_cfg.data_dir)
  assert len(set(ids.tolist())) == 5 and all(0 <= i < 12 for i in ids)
  np.testing.assert_array_equal(labels, [source[int(i)]["label"] for i in ids])
  again = data.calibration_batch(imagenet_cfg, 5, seed=0, augment=True)
  np.testing.assert_array_equal(again[0], images)


def test_string_ids_of_tfds_cifar_become_their_number():
  # TFDS's own cifar10/cifar100 store ids as b"train_16399"; imagenet2012 has none (the index is used).
  assert data._example_id({"id": b"train_16399"}, 3) == 16399  # pylint: disable=protected-access
  assert data._example_id({"id": "test_00007"}, 3) == 7  # pylint: disable=protected-access
  assert data._example_id({"file_name": b"n01440764_1.JPEG"}, 3) == 3  # pylint: disable=protected-access


def test_calibration_batch_is_seeded_and_uses_ids(cifar_cfg):
  images, labels, ids = data.calibration_batch(cifar_cfg, 16, seed=7)
  ref_images, ref_labels = cifar10.load_split(cifar_cfg.source_dir, "train")
  np.testing.assert_array_equal(to_uint8(images), ref_images[ids])
  np.testing.assert_array_equal(labels, ref_labels[ids])
  assert len(set(ids.tolist())) == 16
  np.testing.assert_array_equal(data.calibration_batch(cifar_cfg, 16, seed=7)[2], ids)
  assert not np.array_equal(data.calibration_batch(cifar_cfg, 16, seed=8)[2], ids)
  size = data.num_examples(cifar_cfg, "train")
  with pytest.raises(ValueError, match=f"n={size + 1} must be in \\[1, {size}\\]"):
    data.calibration_batch(cifar_cfg, size + 1, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_name_lists_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match="'mnist' is not a known dataset.*'digits'.*'imagenet2012'"):
    data.prepare(make_cfg(name="mnist", data_dir=str(tmp_path)))


def test_missing_source_folder(tmp_path):
  cfg = make_cfg(name="cifar10_folder", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"nowhere.*data_batch_1\.bin"):
    data.prepare(cfg)
  (tmp_path / "c100").mkdir()
  (tmp_path / "c100" / "train.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="name='cifar100_folder'"):
    data.prepare(make_cfg(name="cifar10_folder", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "c100")))
  with pytest.raises(FileNotFoundError, match="data.source_dir is empty"):
    data.num_examples(make_cfg(name="cifar100_folder", data_dir=str(tmp_path / "tfds")), "train")


@pytest.mark.parametrize("name, needle", [
    ("cifar10", "tfds build cifar10 --data_dir={d} --file_format=array_record"),
    ("cifar100", "tfds build cifar100 --data_dir={d} --file_format=array_record"),
    ("imagenet2012", "tfds build imagenet2012 --data_dir={d} --manual_dir=MANUAL_DIR --file_format=array_record"),
])
def test_unprepared_tfds_dataset_gives_the_command(tmp_path, name, needle):
  cfg = make_cfg(name=name, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as err:
    data.prepare(cfg)
  assert needle.format(d=tmp_path) in str(err.value)
  if name == "imagenet2012":
    assert "ILSVRC2012_img_train.tar" in str(err.value)
  else:
    assert f"name='{name}_folder'" in str(err.value)
  with pytest.raises(FileNotFoundError):
    data.num_examples(cfg, "train")
  assert not (tmp_path / "downloads").exists()  # nothing was attempted


def test_bad_config_values(digits_cfg):
  with pytest.raises(ValueError, match="data.augment='random'"):
    data.train_batches(make_cfg(**{**digits_cfg.to_dict(), "augment": "random"}), batch_size=8, seed=0)
  with pytest.raises(ValueError, match="split 'validation' is not a split of digits"):
    data.num_examples(digits_cfg, "validation")


def test_no_tensorflow_imported(digits_cfg):
  data.calibration_batch(digits_cfg, 4, seed=0)
  assert "tensorflow" not in sys.modules
