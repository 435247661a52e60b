"""The data layer of the pruning program: TFDS datasets in array_record files, read without TensorFlow, fed by grain.

Datasets (``cfg.name``):

* ``"digits"``, ``"cifar10_folder"``, ``"cifar100_folder"``: the project's builders (:mod:`train.datasets`),
  prepared into ``cfg.data_dir`` by :func:`prepare` (seconds: nothing is downloaded; the folder builders read the
  binary files in ``cfg.source_dir``);
* ``"cifar10"``, ``"cifar100"``, ``"imagenet2012"``: TFDS's own datasets, read where they have been prepared in
  array_record format (``tfds build <name> --file_format=array_record``; :func:`prepare` says how when they are
  not).

``cfg`` is the data section of the program's config (an ``ml_collections.ConfigDict``; any object with these
attributes will do): ``name``, ``data_dir``, ``source_dir``, ``train_split``, ``eval_split``, ``calib_split``,
``image_size``, ``mean``, ``std``, ``augment`` (``"cifar"``, ``"imagenet"`` or ``"none"``), ``val_fraction`` and
``num_workers``.

Images are read encoded (the PNG/JPEG bytes as stored), decoded and preprocessed on the host by
:mod:`train.augment` (evaluation crops, CIFAR and Inception augmentation; a JPEG decoded at a reduced DCT scale where
the output size allows) in grain worker processes (``cfg.num_workers``; 0: threads of this process), and returned
as uint8 NHWC: a quarter of float32's bytes to move, and the float conversion and normalisation ``(x / 255 - mean)
/ std`` run on the accelerator (:func:`train.train.device_batches`). :func:`calibration_batch` alone returns
normalised float32 (a single small batch, used on the host).

Determinism: the order of epoch ``e`` is ``np.random.default_rng([seed, 0, e]).permutation(n)`` and the
augmentation of the example at global position ``g`` (``step * batch_size + row``) draws from
``np.random.default_rng([seed, 1, g])``. Nothing depends on where an iterator started, how many processes share
the batch or how many workers decode it, so a run resumed at step ``k`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from train.augment import Preprocess
from train.datasets import Cifar10Folder, Cifar100Folder, Digits, convert_tfrecord

PROJECT_DATASETS = {"digits": Digits, "cifar10_folder": Cifar10Folder, "cifar100_folder": Cifar100Folder}
TFDS_DATASETS = ("cifar10", "cifar100", "imagenet2012")
NAMES = (*PROJECT_DATASETS, *TFDS_DATASETS)

# Independent random streams: np.random.default_rng([seed, stream, ...]).
_PERMUTATION, _AUGMENT, _CALIB_CHOICE, _CALIB_AUGMENT = 0, 1, 2, 3

_PREPARE_HELP = {
    "cifar10": ("On a machine with internet (the tfds command line needs TensorFlow: pip install tensorflow "
                "tensorflow-datasets), run\n  tfds build cifar10 --data_dir={data_dir} --file_format=array_record\n"
                "and copy {data_dir}/cifar10 here. A local cifar-10-batches-bin folder works without any download: "
                "name='cifar10_folder', source_dir=<that folder>."),
    "cifar100": ("On a machine with internet (the tfds command line needs TensorFlow: pip install tensorflow "
                 "tensorflow-datasets), run\n  tfds build cifar100 --data_dir={data_dir} --file_format=array_record\n"
                 "and copy {data_dir}/cifar100 here. A local cifar-100-binary folder works without any download: "
                 "name='cifar100_folder', source_dir=<that folder>."),
    "imagenet2012": ("ImageNet cannot be downloaded automatically: download ILSVRC2012_img_train.tar and "
                     "ILSVRC2012_img_val.tar from https://image-net.org/ into a folder MANUAL_DIR, then run (the tfds "
                     "command line needs TensorFlow: pip install tensorflow tensorflow-datasets)\n"
                     "  tfds build imagenet2012 --data_dir={data_dir} --manual_dir=MANUAL_DIR "
                     "--file_format=array_record"),
}


# --------------------------------------------------------------------------------------------------------------
# Config and builders


def _check_name(cfg: Any) -> str:
  name = cfg.name
  if name not in NAMES:
    raise ValueError(f"data.name={name!r} is not a known dataset; expected one of {list(NAMES)}")
  return name


def _data_dir(cfg: Any) -> str:
  data_dir = os.fspath(cfg.data_dir) if cfg.data_dir else ""
  if not data_dir:
    raise ValueError("data.data_dir is empty; set it to the TFDS data dir (e.g. ~/tensorflow_datasets)")
  # Remote paths (gs://...) go to TFDS untouched; local ones are made absolute so cache keys are stable.
  return data_dir if "://" in data_dir else os.path.abspath(os.path.expanduser(data_dir))


def _source_dir(cfg: Any) -> str | None:
  source = getattr(cfg, "source_dir", None)
  return os.path.abspath(os.path.expanduser(os.fspath(source))) if source else None


def _val_fraction(cfg: Any) -> float:
  return float(getattr(cfg, "val_fraction", 0.1))


def _num_workers(cfg: Any) -> int:
  workers = int(getattr(cfg, "num_workers", 0) or 0)
  if workers < 0:
    raise ValueError(f"data.num_workers={workers} must be >= 0 (0: decode in threads of this process)")
  return workers


def _check_tfds_prepared(builder: tfds.core.DatasetBuilder, name: str, data_dir: str) -> None:
  if not builder.is_prepared():
    hint = ""
    if convert_tfrecord.has_tfrecord_shards(data_dir, name):
      hint = (f" {data_dir} itself holds TFRecord shards of {name}: data.data_dir must be the folder above "
              f"{name}/<version>/ (the TFDS data dir), whose shards are then converted with\n  "
              f"{convert_tfrecord.command('DATA_DIR', name)}\n")
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in data_dir {data_dir!r} (no "
                            f"{builder.data_dir}/dataset_info.json).{hint} "
                            + _PREPARE_HELP[name].format(data_dir=data_dir))
  formats = {f.value for f in builder.info.available_file_formats()}
  if "array_record" in formats:
    return
  if not formats or "tfrecord" in formats or convert_tfrecord.has_tfrecord_shards(builder.data_dir, name):
    raise FileNotFoundError(f"TFDS dataset {name!r} in {builder.data_dir} is stored as TFRecord files, which cannot "
                            "be read by random access (and so by this program). Convert it once (no TensorFlow "
                            f"needed; the TFRecord files are kept):\n  {convert_tfrecord.command(data_dir, name)}")
  raise FileNotFoundError(f"TFDS dataset {name!r} in {builder.data_dir} is stored as {sorted(formats)}, not "
                          "array_record, which random access (and so this program) needs. Prepare it again with "
                          f"--file_format=array_record: {_PREPARE_HELP[name].format(data_dir=data_dir)}")


# (name, data_dir) -> a builder reading the prepared dataset; filled by prepare() and by _reading_builder().
_BUILDERS: dict[tuple[str, str], tfds.core.DatasetBuilder] = {}
# (name, data_dir, split) -> the split's ArrayRecordDataSource; per process (worker processes open their own).
_SOURCES: dict[tuple[str, str, str], Sequence[dict[str, Any]]] = {}
# (name, data_dir) -> the (source_dir, val_fraction) this process last prepared or checked it against.
_CHECKED: dict[tuple[str, str], tuple[str | None, float]] = {}
_LOCK = threading.RLock()


def _forget(name: str, data_dir: str) -> None:
  with _LOCK:
    _BUILDERS.pop((name, data_dir), None)
    for key in [k for k in _SOURCES if k[:2] == (name, data_dir)]:
      del _SOURCES[key]


def _reading_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """A builder reading the prepared ``name`` in ``data_dir`` (FileNotFoundError if it is not prepared)."""
  with _LOCK:
    builder = _BUILDERS.get((name, data_dir))
    if builder is None:
      if name in PROJECT_DATASETS:
        builder = PROJECT_DATASETS[name](data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
          raise FileNotFoundError(f"dataset {name!r} is not prepared in data_dir {data_dir!r}; call "
                                  "train.data.prepare(cfg) first")
      else:
        builder = tfds.builder(name, data_dir=data_dir)
        _check_tfds_prepared(builder, name, data_dir)
      _BUILDERS[(name, data_dir)] = builder
    return builder


def prepare(cfg: Any) -> None:
  """Makes ``cfg``'s dataset readable from ``cfg.data_dir``.

  A project dataset is built there if it is not yet (array_record, a few seconds). A folder dataset
  (``*_folder``) is also compared with ``cfg.source_dir`` and ``cfg.val_fraction``: if it was prepared from other
  files (path, names, sizes or SHA-256 differ) or another ``val_fraction``, it is deleted and prepared again, with
  a warning. With ``source_dir`` empty, an already prepared folder dataset is used as it is. A TFDS dataset
  (``cifar10``, ``cifar100``, ``imagenet2012``) is only checked: this program does not download it.

  Call it from one process at a time per ``data_dir`` (e.g. process 0, then a barrier).

  Raises:
    ValueError: unknown ``cfg.name``.
    FileNotFoundError: a TFDS dataset is not prepared in ``data_dir`` (the message gives the command that
      prepares it), ``source_dir`` is missing or lacks the binary files, or ``source_dir`` is empty and the
      folder dataset is not prepared.
  """
  name = _check_name(cfg)
  data_dir = _data_dir(cfg)
  if name in TFDS_DATASETS:
    _forget(name, data_dir)
    _reading_builder(name, data_dir)
    return
  cls = PROJECT_DATASETS[name]
  if name == "digits":
    builder = cls(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare(file_format="array_record")
    _forget(name, data_dir)
    return

  source = _source_dir(cfg)
  val_fraction = _val_fraction(cfg)
  if source is None:
    builder = cls(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      raise FileNotFoundError(f"data.source_dir is empty and {name!r} is not prepared in data_dir {data_dir!r}; "
                              f"set data.source_dir to a {cls.LAYOUT} binary folder holding "
                              f"{', '.join(cls.TRAIN_FILES)} (and optionally {cls.TEST_FILE})")
    _forget(name, data_dir)
    return
  # JSON round trip: the stored metadata comes back from metadata.json with lists, not tuples.
  wanted = _json_ready(cls.fingerprint(source, val_fraction))
  builder = cls(data_dir=data_dir, source_dir=source, val_fraction=val_fraction, file_format="array_record")
  if builder.is_prepared():
    stored = builder.info.metadata.get("source") if builder.info.metadata is not None else None
    if stored == wanted:
      _CHECKED[(name, data_dir)] = (source, val_fraction)
      _forget(name, data_dir)
      return
    warnings.warn(f"{name} in {builder.data_dir} was prepared from {_describe_source(stored)}, not from "
                  f"{_describe_source(wanted)}: preparing it again", stacklevel=2)
    builder.data_path.rmtree()
    builder = cls(data_dir=data_dir, source_dir=source, val_fraction=val_fraction, file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  _CHECKED[(name, data_dir)] = (source, val_fraction)
  _forget(name, data_dir)


def _json_ready(value: Any) -> Any:
  return json.loads(json.dumps(value))


def _describe_source(fingerprint: dict | None) -> str:
  if not fingerprint:
    return "an unrecorded source"
  files = ", ".join(f"{f['name']} ({f['bytes']} bytes)" for f in fingerprint.get("files", []))
  return f"{fingerprint.get('source_dir')} [{files}] with val_fraction={fingerprint.get('val_fraction')}"


def _builder(cfg: Any) -> tfds.core.DatasetBuilder:
  """The reading builder of ``cfg``'s dataset, preparing a project dataset first if this process has not."""
  name = _check_name(cfg)
  data_dir = _data_dir(cfg)
  if name in PROJECT_DATASETS:
    wanted = (_source_dir(cfg), _val_fraction(cfg)) if name != "digits" else (None, 0.0)
    with _LOCK:
      if _CHECKED.get((name, data_dir)) != wanted:
        prepare(cfg)
        _CHECKED[(name, data_dir)] = wanted
  return _reading_builder(name, data_dir)


@dataclasses.dataclass(frozen=True)
class _Split:
  """One split of a prepared dataset; pickles as three strings and opens its data source lazily per process."""

  name: str
  data_dir: str
  split: str

  def source(self) -> Sequence[dict[str, Any]]:
    key = (self.name, self.data_dir, self.split)
    source = _SOURCES.get(key)
    if source is None:
      with _LOCK:
        source = _SOURCES.get(key)
        if source is None:
          # The images stay encoded: train.augment decodes them, at a reduced JPEG scale where it can.
          source = _reading_builder(self.name, self.data_dir).as_data_source(
              split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
          _SOURCES[key] = source
    return source

  def read(self, index: int) -> tuple[bytes, int, int]:
    """``(encoded image, label, id)`` of the example at ``index`` in file order (the JPEG/PNG bytes as stored)."""
    example = self.source()[index]
    return bytes(example["image"]), int(example["label"]), _example_id(example, index)


def _example_id(example: dict[str, Any], index: int) -> int:
  """The ``id`` feature as an int (TFDS's cifar ids are strings like ``b"train_16399"``: the trailing number);
  ``index`` where there is none or it holds no number."""
  value = example.get("id")
  if value is None:
    return int(index)
  if isinstance(value, (bytes, str)):
    text = value.decode() if isinstance(value, bytes) else value
    match = re.search(r"(\d+)$", text)
    return int(match.group(1)) if match else int(index)
  return int(value)


def _split(cfg: Any, split: str) -> _Split:
  builder = _builder(cfg)
  base = split.split("[", 1)[0]
  if base not in builder.info.splits:
    available = sorted(builder.info.splits)
    hint = ""
    if cfg.name in ("cifar10_folder", "cifar100_folder") and base == "test":
      test_file = PROJECT_DATASETS[cfg.name].TEST_FILE
      hint = (f"; the source folder had no {test_file} when it was prepared, so there is no test split: evaluate on "
              f"'validation' (the last {_val_fraction(cfg):g} of each train file) or add {test_file} to the folder")
    raise ValueError(f"split {split!r} is not a split of {cfg.name} in {builder.data_dir}; available: "
                     f"{available}{hint}")
  return _Split(cfg.name, _data_dir(cfg), split)


# --------------------------------------------------------------------------------------------------------------
# Facts about the dataset


def num_examples(cfg: Any, split: str) -> int:
  """The number of examples of ``split`` (a TFDS split name, slices such as ``"train[:10%]"`` allowed)."""
  return len(_split(cfg, split).source())


def num_classes(cfg: Any) -> int:
  """The number of classes of the ``label`` feature."""
  return int(_builder(cfg).info.features["label"].num_classes)


def steps_per_epoch(cfg: Any, *, batch_size: int) -> int:
  """Full global batches per epoch of ``cfg.train_split``: ``num_examples // batch_size`` (the rest is dropped)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  return num_examples(cfg, cfg.train_split) // batch_size


def split_info(cfg: Any) -> dict[str, Any]:
  """What a report should say about the data (JSON-ready).

  Returns:
    ``name``, ``tfds_name``, ``version``, ``data_dir``, ``source_dir`` (folder datasets, else None),
    ``source_files`` (folder datasets: name, bytes, SHA-256 of each file prepared from), ``splits`` (name ->
    size), ``num_classes``, the ``train_split`` / ``eval_split`` / ``calib_split`` in use, and ``validation``:
    how the evaluation splits were made.
  """
  builder = _builder(cfg)
  name = cfg.name
  info: dict[str, Any] = {
      "name": name,
      "tfds_name": builder.name,
      "version": str(builder.version),
      "data_dir": _data_dir(cfg),
      "source_dir": None,
      "source_files": None,
      "splits": {s: int(builder.info.splits[s].num_examples) for s in sorted(builder.info.splits)},
      "num_classes": int(builder.info.features["label"].num_classes),
      "train_split": cfg.train_split,
      "eval_split": cfg.eval_split,
      "calib_split": cfg.calib_split,
  }
  if name in ("cifar10_folder", "cifar100_folder"):
    metadata = builder.info.metadata or {}
    source = metadata.get("source") or {}
    carve = metadata.get("carve") or []
    info["source_dir"] = source.get("source_dir")
    info["source_files"] = source.get("files")
    per_file = ", ".join(f"{c['validation']} of {c['records']} in {c['file']}" for c in carve)
    has_test = "test" in builder.info.splits
    info["validation"] = (f"validation = the last {source.get('val_fraction')} of each train file ({per_file}); "
                          f"train = the rest; ids are positions in the concatenated train files. "
                          + ("test = the folder's test file." if has_test else "No test file: no test split."))
  elif name == "digits":
    info["validation"] = ("no validation split; test = every 5th example of each class of scikit-learn's digits "
                          "(stratified, deterministic), train = the rest; ids are indices in load_digits()")
  elif name == "imagenet2012":
    info["validation"] = "TFDS's 'validation' split: the 50,000 official ILSVRC2012 validation images"
  else:
    info["validation"] = f"TFDS's own {name} splits (train, test); no validation split"
  return info


# --------------------------------------------------------------------------------------------------------------
# Iterators


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  order = np.random.default_rng([seed, _PERMUTATION, epoch]).permutation(n)
  order.flags.writeable = False
  return order


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (the global batch) must be a positive multiple of "
                     f"process_count={process_count}")
  return batch_size // process_count


def _check_seed(seed: int) -> int:
  if int(seed) < 0:
    raise ValueError(f"seed={seed} must be >= 0")
  return int(seed)


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """Local example ``i`` of the training stream -> ``{"image", "label"}`` (picklable, for grain workers)."""

  split: _Split
  n: int
  global_batch: int
  local_batch: int
  offset: int
  start_step: int
  seed: int
  preprocess: Preprocess

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    step = self.start_step + i // self.local_batch
    position = step * self.global_batch + self.offset + i % self.local_batch
    epoch, within = divmod(position, (self.n // self.global_batch) * self.global_batch)
    image, label, _ = self.split.read(int(_permutation(self.seed, epoch, self.n)[within]))
    rng = np.random.default_rng([self.seed, _AUGMENT, position])
    return {"image": self.preprocess.train_encoded(image, rng), "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """Local example ``i`` of the evaluation pass -> ``{"image", "label", "mask"}``; zeros past the split's end."""

  split: _Split
  n: int
  global_batch: int
  local_batch: int
  offset: int
  preprocess: Preprocess

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    step, row = divmod(i, self.local_batch)
    position = step * self.global_batch + self.offset + row
    if position >= self.n:
      s = self.preprocess.size
      return {"image": np.zeros((s, s, 3), np.uint8), "label": np.int32(0), "mask": np.bool_(False)}
    image, label, _ = self.split.read(position)
    return {"image": self.preprocess.eval_encoded(image), "label": np.int32(label), "mask": np.bool_(True)}


@dataclasses.dataclass(frozen=True)
class _CalibExample:
  """Calibration example ``r`` -> ``{"image", "label", "id"}``."""

  split: _Split
  indices: tuple[int, ...]
  seed: int
  augment: bool
  preprocess: Preprocess

  def __call__(self, r: int) -> dict[str, np.ndarray]:
    image, label, example_id = self.split.read(self.indices[r])
    if self.augment:
      image = self.preprocess.train_encoded(image, np.random.default_rng([self.seed, _CALIB_AUGMENT, r]))
    else:
      image = self.preprocess.eval_encoded(image)
    return {"image": self.preprocess.normalize(image), "label": np.int32(label), "id": np.int64(example_id)}


def _iterate(dataset: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
  """Iterates ``dataset`` (whose elements are batches) in order: in ``num_workers`` grain worker processes,
  or in threads of this process when 0; a few batches are prefetched either way."""
  if num_workers > 0:
    # grain's worker start-up reads an absl flag, which raises unless the flags were parsed (absl.app.run does it);
    # a program parsing its own command line would fail there, so take the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Each worker decodes whole batches; two threads each overlap the record reads with PIL's decoding.
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
  else:
    threads = max(1, min(8, os.cpu_count() or 1))
    # The buffer counts batches, not images: keep it small (an ImageNet batch of 256 is 38 MB of uint8).
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads + 1))
  return iter(stream)


def train_batches(cfg: Any, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The infinite stream of training batches of ``cfg.train_split``, from global step ``start_step`` on.

  Global step ``k`` covers positions ``k * batch_size ... (k + 1) * batch_size - 1`` of the concatenation of the
  epochs (each a fresh permutation; the last ``n % batch_size`` examples of a permutation are dropped, so every
  batch is full). Process ``p`` of ``P`` gets rows ``p * b ... (p + 1) * b - 1`` of each global batch,
  ``b = batch_size // P``. Batches depend only on ``(seed, step)``: ``start_step=k`` yields exactly batches
  ``k, k + 1, ...`` of ``start_step=0``, whatever ``cfg.num_workers``.

  Args:
    cfg: the data config.
    batch_size: the global batch size (all processes together).
    seed: the data seed (>= 0).
    start_step: the first global step to yield.
    process_index: this process's index.
    process_count: the number of processes sharing each global batch.

  Returns:
    An iterator of ``{"image": uint8 (b, s, s, 3) NHWC, "label": int32 (b,)}``, ``s = cfg.image_size``
    (:func:`train.train.device_batches` normalises them on the accelerator). With ``cfg.num_workers > 0`` it is a
    grain iterator backed by worker processes: call its ``close()`` when done to stop them early.

  Raises:
    ValueError: ``batch_size`` is not a multiple of ``process_count``, is larger than the split, or an argument is
      out of range.
  """
  local = _check_processes(batch_size, process_index, process_count)
  seed = _check_seed(seed)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  preprocess = Preprocess.from_config(cfg)
  split = _split(cfg, cfg.train_split)
  n = len(split.source())
  if n < batch_size:
    raise ValueError(f"batch_size={batch_size} is larger than the {n} examples of {cfg.name} "
                     f"split {cfg.train_split!r}; use at most {n}")
  example = _TrainExample(split, n, batch_size, local, process_index * local, int(start_step), seed, preprocess)
  # An index space no run can exhaust: grain's MapDataset needs a length, and maps index -> example.
  dataset = grain.MapDataset.range(sys.maxsize // 2).map(example).batch(local, drop_remainder=True)
  return _iterate(dataset, _num_workers(cfg))


def eval_batches(cfg: Any, split: str, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over ``split`` in file order, without augmentation, in ``ceil(n / batch_size)`` global batches.

  Global batch ``k`` holds positions ``k * batch_size ...``; process ``p`` gets its rows ``p * b ... (p + 1) * b
  - 1`` (``b = batch_size // process_count``). Positions past the end are padding: zero images, label 0 and
  ``mask`` False, so every example is seen exactly once, shapes stay static and all processes run the same
  number of steps.

  Returns:
    An iterator of ``{"image": uint8 (b, s, s, 3), "label": int32 (b,), "mask": bool (b,)}``.

  Raises:
    ValueError: unknown split, or ``batch_size`` not a multiple of ``process_count``.
  """
  local = _check_processes(batch_size, process_index, process_count)
  preprocess = Preprocess.from_config(cfg)
  split_ = _split(cfg, split)
  n = len(split_.source())
  steps = -(-n // batch_size)
  example = _EvalExample(split_, n, batch_size, local, process_index * local, preprocess)
  dataset = grain.MapDataset.range(steps * local).map(example).batch(local)
  return _iterate(dataset, _num_workers(cfg))


def calibration_batch(cfg: Any, n: int, *, seed: int,
                      augment: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``n`` distinct examples of ``cfg.calib_split``, drawn by ``default_rng([seed, 2]).choice(size, n,
  replace=False)`` (in that drawn order).

  Args:
    cfg: the data config.
    n: how many examples.
    seed: the draw's seed (>= 0).
    augment: preprocess with the training augmentation ``cfg.augment`` (randomness from ``(seed, row)``) instead
      of the evaluation preprocessing.

  Returns:
    ``(images, labels, ids)``: float32 ``(n, s, s, 3)`` normalised, int32 ``(n,)``, int64 ``(n,)``; ids are the
    dataset's ``id`` feature (the trailing number of TFDS's string ids) where it has one, else the index in the
    split (imagenet2012).

  Raises:
    ValueError: ``n`` is not in ``[1, size of the split]``.
  """
  seed = _check_seed(seed)
  preprocess = Preprocess.from_config(cfg)
  split = _split(cfg, cfg.calib_split)
  size = len(split.source())
  if not 1 <= n <= size:
    raise ValueError(f"calibration_batch: n={n} must be in [1, {size}], the size of {cfg.name} split "
                     f"{cfg.calib_split!r}")
  indices = np.random.default_rng([seed, _CALIB_CHOICE]).choice(size, n, replace=False)
  example = _CalibExample(split, tuple(int(i) for i in indices), seed, bool(augment), preprocess)
  rows = list(_iterate(grain.MapDataset.range(n).map(example), 0))
  return (np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows], np.int32),
          np.array([r["id"] for r in rows], np.int64))
