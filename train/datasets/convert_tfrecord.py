"""A TFDS dataset prepared as TFRecord files, given array_record copies so that it can be read by random access.

``python -m train.datasets.convert_tfrecord --data_dir=DATA_DIR [--dataset=imagenet2012] [--num_workers=N]``

``tfds convert_format`` does the same but imports TensorFlow; this reads the TFRecord framing itself
(:mod:`train.datasets.tfrecord`, every CRC checked), checks that every record is a ``tf.train.Example`` with the
same features and every shard holds the number of examples ``dataset_info.json`` gives, and writes each shard's
records unchanged (TFDS stores the same serialized Examples in both formats) to
``{dataset}-{split}.array_record-{shard}-of-{shards}`` beside it. ``dataset_info.json`` names ``array_record`` as
its file format (TFRecord as an alternative) only once every shard is written, so an interrupted run leaves the
dataset as it was (run it again); the TFRecord files are kept. ``DATA_DIR`` may be any ``etils.epath`` path
(``gs://bucket/tfds``): each shard is written to a local temporary file and then streamed to its place.

Expected layout: ``DATA_DIR/<dataset>/<version>/`` holding ``dataset_info.json``, ``features.json`` and
``<dataset>-<split>.tfrecord-00000-of-01024`` ... (what ``tfds build`` writes by default).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from etils import epath
from tqdm import tqdm

from train.datasets import tfrecord

DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
INFO = "dataset_info.json"


def command(data_dir: str | os.PathLike[str], dataset: str) -> str:
  """The command line that converts ``dataset`` in ``data_dir``."""
  return f"python -m train.datasets.convert_tfrecord --data_dir={data_dir} --dataset={dataset}"


def has_tfrecord_shards(folder: str | os.PathLike[str], dataset: str) -> bool:
  """Whether ``folder`` holds files named like ``<dataset>-<split>.tfrecord-00000-of-00001``."""
  folder = epath.Path(folder)
  return folder.is_dir() and any(folder.glob(f"{dataset}-*.tfrecord-*-of-*"))


def version_dirs(data_dir: str | os.PathLike[str], dataset: str) -> list[epath.Path]:
  """The version folders ``data_dir/<dataset>/<version>/`` that hold a ``dataset_info.json``, oldest first."""
  root = epath.Path(data_dir) / dataset
  if not root.is_dir():
    return []
  found = [p for p in root.iterdir() if p.is_dir() and (p / INFO).exists()]
  return sorted(found, key=lambda p: tuple(int(v) if v.isdigit() else -1 for v in p.name.split(".")))


def _shard_name(template: str, dataset: str, split: str, file_format: str, index: int, count: int) -> str:
  return (template.replace("{DATASET}", dataset).replace("{SPLIT}", split).replace("{FILEFORMAT}", file_format)
          .replace("{SHARD_X_OF_Y}", f"{index:05d}-of-{count:05d}"))


def plan(version_dir: str | os.PathLike[str], dataset: str) -> list[dict[str, Any]]:
  """One entry per shard: ``{"split", "source", "target", "examples"}`` (paths as strings).

  Raises:
    FileNotFoundError: no ``dataset_info.json``, or a TFRecord shard it lists is missing.
    ValueError: the dataset is already in array_record format, or its info lists no splits.
  """
  version_dir = epath.Path(version_dir)
  info_path = version_dir / INFO
  if not info_path.exists():
    raise FileNotFoundError(f"{info_path} does not exist; expected a TFDS dataset folder <data_dir>/{dataset}/"
                            "<version>/ as `tfds build` writes it")
  info = json.loads(info_path.read_text())
  formats = {info.get("fileFormat") or "tfrecord", *info.get("alternativeFileFormats", [])}
  if "array_record" in formats:
    raise ValueError(f"{version_dir} is already readable as array_record (dataset_info.json lists {sorted(formats)})")
  if not info.get("splits"):
    raise ValueError(f"{info_path} lists no splits")
  shards, missing = [], []
  for split in info["splits"]:
    template = split.get("filepathTemplate") or DEFAULT_TEMPLATE
    lengths = [int(n) for n in split.get("shardLengths", [])]
    for i, n in enumerate(lengths):
      source = version_dir / _shard_name(template, dataset, split["name"], "tfrecord", i, len(lengths))
      if not source.exists():
        missing.append(source.name)
      shards.append({"split": split["name"], "source": os.fspath(source), "examples": n,
                     "target": os.fspath(version_dir / _shard_name(template, dataset, split["name"], "array_record",
                                                                   i, len(lengths)))})
  if missing:
    raise FileNotFoundError(f"{version_dir}: {len(missing)} TFRecord shard(s) listed in {INFO} are missing, e.g. "
                            f"{missing[:3]}; copy the whole dataset folder")
  return shards


def convert_shard(shard: dict[str, Any]) -> int:
  """Copies one TFRecord shard's records into its array_record shard; returns the number of records.

  Raises:
    ValueError: a CRC mismatch or truncation (from :func:`train.datasets.tfrecord.read_records`), a record that is
      not an Example or has other features than the shard's first, or a count other than ``shard["examples"]``.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  source, target = epath.Path(shard["source"]), epath.Path(shard["target"])
  keys = None
  with tempfile.TemporaryDirectory(prefix="convert_tfrecord_") as tmp:
    local = os.path.join(tmp, target.name)
    # group_size:1, as TFDS writes them: every record its own chunk, so that reading one decodes only that one.
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    count = 0
    try:
      for record in tfrecord.read_records(source):
        these = sorted(tfrecord.parse_example(record))
        if keys is None:
          keys = these
        elif these != keys:
          raise ValueError(f"{source}: record {count} has features {these}, the first record {keys}")
        writer.write(record)
        count += 1
    finally:
      writer.close()
    if count != shard["examples"]:
      raise ValueError(f"{source} holds {count} records; {INFO} says {shard['examples']}")
    with open(local, "rb") as src, target.open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
  return count


def convert(data_dir: str | os.PathLike[str], *, dataset: str = "imagenet2012", version: str | None = None,
            num_workers: int = 1) -> epath.Path:
  """Adds array_record shards to the TFRecord dataset ``data_dir/<dataset>/<version>`` (default: the newest
  version folder holding TFRecord shards) and lists the format in its ``dataset_info.json``.

  Returns:
    The version folder.

  Raises:
    FileNotFoundError: no such dataset folder, or shards are missing.
    ValueError: bad records (see :func:`convert_shard`), ``num_workers < 1``, or nothing to convert.
  """
  if num_workers < 1:
    raise ValueError(f"num_workers={num_workers} must be >= 1")
  candidates = version_dirs(data_dir, dataset)
  if version is not None:
    candidates = [p for p in candidates if p.name == version]
  with_shards = [p for p in candidates if has_tfrecord_shards(p, dataset)]
  if not with_shards:
    raise FileNotFoundError(f"no TFRecord shards of {dataset!r} found under {epath.Path(data_dir) / dataset}"
                            + (f" (version {version})" if version else "")
                            + f"; expected {dataset}/<version>/{dataset}-train.tfrecord-00000-of-NNNNN and "
                            f"{INFO} there, with --data_dir the folder above {dataset}/")
  version_dir = with_shards[-1]
  shards = plan(version_dir, dataset)
  desc = f"{dataset} {version_dir.name} -> array_record"
  if num_workers == 1:
    for shard in tqdm(shards, desc=desc, unit="shard"):
      convert_shard(shard)
  else:
    # spawn, not fork: the parent may hold TFDS's and grain's threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      for _ in tqdm(pool.map(convert_shard, shards), total=len(shards), desc=desc, unit="shard"):
        pass
  info_path = version_dir / INFO
  info = json.loads(info_path.read_text())
  # The main format, not only an alternative one: a builder registered in code (TFDS's imagenet2012) restores
  # fileFormat from this file but not alternativeFileFormats.
  info["alternativeFileFormats"] = sorted({*info.get("alternativeFileFormats", []), info.get("fileFormat")
                                           or "tfrecord"} - {"array_record"})
  info["fileFormat"] = "array_record"
  info_path.write_text(json.dumps(info, indent=2))
  return version_dir


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="the TFDS data dir (local or gs://), above <dataset>/")
  parser.add_argument("--dataset", default="imagenet2012", help="the dataset's folder name (default imagenet2012)")
  parser.add_argument("--version", default=None, help="the version folder (default: the newest with TFRecords)")
  parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="shards converted in parallel processes (default: up to 8, one per core)")
  args = parser.parse_args(argv)
  folder = convert(args.data_dir, dataset=args.dataset, version=args.version, num_workers=args.num_workers)
  print(f"{folder}: array_record shards written; {args.dataset} is ready for data.data_dir={args.data_dir}")


if __name__ == "__main__":
  main()
