"""train.datasets.tfrecord and train.datasets.convert_tfrecord: TFRecord framing and CRC32C without TensorFlow, and
a TFRecord-prepared imagenet2012 converted to array_record and read back through the program's reader.

Oracles: RFC 3720's CRC32C check values and a bit-at-a-time CRC written here; a TFRecord writer written here
(``struct`` framing, that bitwise CRC), independent of the module's; the images and labels of the same examples
prepared directly as array_record by TFDS.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader

from train import data
from train.datasets import convert_tfrecord, make_fake_imagenet, tfrecord


def bitwise_crc32c(payload: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in payload:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
  return crc ^ 0xFFFFFFFF


def masked(payload: bytes) -> int:
  c = bitwise_crc32c(payload)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path: Path, records: list[bytes]) -> None:
  with open(path, "wb") as f:
    for r in records:
      length = struct.pack("<Q", len(r))
      f.write(length + struct.pack("<I", masked(length)) + r + struct.pack("<I", masked(r)))


def test_crc32c_check_values_and_lengths():
  # RFC 3720, B.4: 32 zero bytes, 32 0xFF bytes, 0..31 ascending; and the usual "123456789".
  assert tfrecord.crc32c(b"\x00" * 32) == 0x8A9136AA
  assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E
  assert tfrecord.crc32c(b"123456789") == 0xE3069283
  assert tfrecord.crc32c(b"") == 0
  rng = np.random.default_rng(0)
  # Short (Python loop), long (NumPy rows, odd and even row counts, leading zero padding) and zero-led data.
  for n in (1, 7, 255, 256, 257, 1000, 4097, 65 * 2048 + 3):
    payload = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tfrecord.crc32c(payload) == bitwise_crc32c(payload), n
  assert tfrecord.crc32c(b"\x00" * 5000 + b"x") == bitwise_crc32c(b"\x00" * 5000 + b"x")


def test_records_round_trip_and_errors_name_the_record(tmp_path):
  records = [b"", b"a", bytes(range(256)) * 5, b"last"]
  write_tfrecord(tmp_path / "ours.tfrecord", records)
  assert list(tfrecord.read_records(tmp_path / "ours.tfrecord")) == records
  tfrecord.write_records(tmp_path / "module.tfrecord", records)
  assert (tmp_path / "module.tfrecord").read_bytes() == (tmp_path / "ours.tfrecord").read_bytes()

  raw = bytearray((tmp_path / "ours.tfrecord").read_bytes())
  offset = 2 * 16 + 1  # record 2 starts after two empty-ish records: 16 bytes of framing each, plus b"a"
  bad = bytearray(raw)
  bad[offset + 12 + 100] ^= 1  # a data byte of record 2
  (tmp_path / "bad.tfrecord").write_bytes(bytes(bad))
  with pytest.raises(ValueError, match=r"record 2 at byte 33: the data's CRC does not match"):
    list(tfrecord.read_records(tmp_path / "bad.tfrecord"))
  bad = bytearray(raw)
  bad[offset] ^= 1  # record 2's length
  (tmp_path / "bad.tfrecord").write_bytes(bytes(bad))
  with pytest.raises(ValueError, match=r"record 2 at byte 33: the length's CRC"):
    list(tfrecord.read_records(tmp_path / "bad.tfrecord"))
  (tmp_path / "short.tfrecord").write_bytes(bytes(raw[:-3]))
  with pytest.raises(ValueError, match=r"record 3 .* truncated"):
    list(tfrecord.read_records(tmp_path / "short.tfrecord"))
  with pytest.raises(ValueError, match="not a tf.train.Example"):
    tfrecord.parse_example(b"\xff\xff\xff")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
  """``(array_record data_dir, TFRecord data_dir)`` of the same fake imagenet2012, the latter as `tfds build`
  writes by default (TFRecord shards, 2 per split here, and ``fileFormat: tfrecord``)."""
  reference = tmp_path_factory.mktemp("tfds_array_record")
  make_fake_imagenet(reference, train=10, validation=5, seed=3)
  [src] = list((reference / "imagenet2012").iterdir())
  tf_dir = tmp_path_factory.mktemp("tfds_tfrecord")
  dst = tf_dir / "imagenet2012" / src.name
  dst.mkdir(parents=True)
  for f in src.iterdir():
    if ".array_record-" not in f.name:
      shutil.copy(f, dst / f.name)
  info = json.loads((src / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  for split in info["splits"]:
    reader = ArrayRecordReader(str(src / f"imagenet2012-{split['name']}.array_record-00000-of-00001"))
    records = [reader.read() for _ in range(reader.num_records())]
    reader.close()
    half = len(records) // 2
    for i, part in enumerate((records[:half], records[half:])):
      write_tfrecord(dst / f"imagenet2012-{split['name']}.tfrecord-{i:05d}-of-00002", part)
    split["shardLengths"] = [str(half), str(len(records) - half)]
  (dst / "dataset_info.json").write_text(json.dumps(info, indent=2))
  return reference, tf_dir


def imagenet_cfg(data_dir: Path) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=str(data_dir), source_dir="", train_split="train", eval_split="validation",
      calib_split="train", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment="imagenet",
      val_fraction=0.1, num_workers=0))


def test_tfrecord_dataset_is_refused_with_the_command_then_converted_and_read_back(prepared, tmp_path):
  reference, original = prepared
  tf_dir = tmp_path / "tfds"
  shutil.copytree(original, tf_dir)
  cfg = imagenet_cfg(tf_dir)
  with pytest.raises(FileNotFoundError) as err:
    data.prepare(cfg)
  assert f"python -m train.datasets.convert_tfrecord --data_dir={tf_dir} --dataset=imagenet2012" in str(err.value)
  [version] = list((tf_dir / "imagenet2012").iterdir())
  with pytest.raises(FileNotFoundError, match=r"data.data_dir must be the folder above imagenet2012/<version>/"):
    data.prepare(imagenet_cfg(version))

  convert_tfrecord.main([f"--data_dir={tf_dir}", "--num_workers=1"])
  assert sorted(p.name for p in version.glob("*.array_record-*")) == [
      f"imagenet2012-{s}.array_record-{i:05d}-of-00002" for s in ("train", "validation") for i in range(2)]
  assert len(list(version.glob("*.tfrecord-*"))) == 4  # kept
  data.prepare(cfg)
  ref_cfg = imagenet_cfg(reference)
  for split in ("train", "validation"):
    ours = tfds.builder("imagenet2012", data_dir=str(tf_dir)).as_data_source(split=split)
    want = tfds.data_source("imagenet2012", split=split, data_dir=str(reference))
    assert len(ours) == len(want) == data.num_examples(cfg, split)
    for i in range(len(want)):
      np.testing.assert_array_equal(ours[i]["image"], want[i]["image"])
      assert ours[i]["label"] == want[i]["label"] and ours[i]["file_name"] == want[i]["file_name"]
  # Through the program's reader: the same training and evaluation batches as from the directly prepared copy.
  for a, b in zip(data.eval_batches(cfg, "validation", batch_size=4), data.eval_batches(ref_cfg, "validation",
                                                                                         batch_size=4)):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])
  a, b = next(data.train_batches(cfg, batch_size=4, seed=1)), next(data.train_batches(ref_cfg, batch_size=4, seed=1))
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  with pytest.raises(ValueError, match="already readable as array_record"):
    convert_tfrecord.convert(tf_dir)
  assert "tensorflow" not in sys.modules


def test_conversion_checks_counts_crcs_and_examples(prepared, tmp_path):
  _, original = prepared
  tf_dir = tmp_path / "tfds"
  shutil.copytree(original, tf_dir)
  [version] = list((tf_dir / "imagenet2012").iterdir())
  info_before = (version / "dataset_info.json").read_text()
  shard = version / "imagenet2012-train.tfrecord-00001-of-00002"
  records = list(tfrecord.read_records(shard))
  example = tfrecord.parse_example(records[0])
  assert set(example) == {"image", "label", "file_name"} and example["image"][0][:2] == b"\xff\xd8"  # a JPEG
  assert 0 <= example["label"][0] < 1000

  write_tfrecord(shard, records[:-1])
  with pytest.raises(ValueError, match=r"tfrecord-00001-of-00002 holds 4 records; dataset_info.json says 5"):
    convert_tfrecord.convert(tf_dir)
  write_tfrecord(shard, records[:-1] + [b"\x08\x96\x01"])  # a valid proto, but not an Example with these features
  with pytest.raises(ValueError, match=r"record 4 has features \[\]"):
    convert_tfrecord.convert(tf_dir)
  raw = bytearray(shard.read_bytes())
  raw[40] ^= 0xFF
  shard.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="CRC does not match"):
    convert_tfrecord.convert(tf_dir)
  assert (version / "dataset_info.json").read_text() == info_before  # a failed run leaves the dataset as it was
  shard.unlink()
  with pytest.raises(FileNotFoundError, match="1 TFRecord shard"):
    convert_tfrecord.convert(tf_dir)
  with pytest.raises(FileNotFoundError, match="no TFRecord shards of 'imagenet2012'"):
    convert_tfrecord.convert(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="num_workers=0"):
    convert_tfrecord.convert(tf_dir, num_workers=0)
