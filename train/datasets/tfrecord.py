"""TFRecord files read without TensorFlow: the framing, its CRC32C checksums, and ``tf.train.Example`` protos.

A TFRecord file is a sequence of records, each framed as

  ``uint64 length`` (little-endian) | ``uint32 masked_crc32c(length bytes)`` | ``data`` | ``uint32 masked_crc32c(data)``

where ``crc32c`` is CRC-32C (Castagnoli: reflected polynomial ``0x82F63B78``, initial value and final XOR
``0xFFFFFFFF``) and ``masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8 (mod 2^32)``.

No CRC32C extension is installed here, and one per byte in Python would read ImageNet's 150 GB in days, so
:func:`crc32c` runs in NumPy: the data, padded in front with zeros, is cut into ``k`` rows whose register-only CRCs
(initial value 0) advance together one byte column at a time, then are folded pairwise, ``crc(a || b) =
Z_|b|(crc(a)) xor crc(b)``, where ``Z_m`` (appending ``m`` zero bytes) is linear over GF(2) and applied through four
256-entry tables. Leading zeros leave a register-only CRC at 0, and the initial value enters as ``Z_n(0xFFFFFFFF)``.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from etils import epath

POLY = 0x82F63B78
MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
# Rows advanced together: NumPy's per-call overhead is paid once per column, so more rows mean fewer columns.
_ROWS = 2048
# Below this many bytes the table loop in Python is quicker than setting the NumPy path up.
_SMALL = 256


def _byte_table() -> np.ndarray:
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(POLY), table >> 1).astype(np.uint32)
  return table


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _raw_small(data: bytes, crc: int) -> int:
  table = _TABLE_LIST
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc


@functools.lru_cache(maxsize=None)
def _zeros_operator(m: int) -> np.ndarray:
  """``Z_m`` (the register after ``m`` zero bytes) as ``(4, 256)`` tables: ``Z_m(x) = xor_p T[p, byte_p(x)]``."""
  if m == 0:
    images = np.array([1 << i for i in range(32)], np.uint32)
  elif m == 1:
    basis = np.array([1 << i for i in range(32)], np.uint32)
    images = _TABLE[basis & 0xFF] ^ (basis >> 8)
  else:
    half = _zeros_operator(m // 2)
    images = _apply(half, _images(half))
    if m % 2:
      images = _apply(_zeros_operator(1), images)
  return _tables(images)


def _images(tables: np.ndarray) -> np.ndarray:
  """The images of the 32 basis bits under the operator given by ``tables``."""
  return np.array([tables[i // 8, 1 << (i % 8)] for i in range(32)], np.uint32)


def _tables(images: np.ndarray) -> np.ndarray:
  values = np.arange(256)
  bits = (values[:, None] >> np.arange(8)[None, :]) & 1  # (256, 8)
  out = np.zeros((4, 256), np.uint32)
  for p in range(4):
    chosen = np.where(bits.astype(bool), images[8 * p:8 * p + 8][None, :], np.uint32(0))
    out[p] = np.bitwise_xor.reduce(chosen, axis=1)
  return out


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.uint32)
  return (tables[0][x & 0xFF] ^ tables[1][(x >> 8) & 0xFF] ^ tables[2][(x >> 16) & 0xFF]
          ^ tables[3][x >> 24]).astype(np.uint32)


def _shift(x: int, m: int) -> int:
  """``Z_m(x)`` for any ``m``, through the power-of-two operators (cached)."""
  out = np.array([x], np.uint32)
  bit = 0
  while m >> bit:
    if (m >> bit) & 1:
      out = _apply(_zeros_operator(1 << bit), out)
    bit += 1
  return int(out[0])


def _raw(data: bytes) -> int:
  """The register-only CRC of ``data`` (initial value 0, no final XOR)."""
  n = len(data)
  if n <= _SMALL:
    return _raw_small(data, 0)
  rows = min(_ROWS, max(1, n // 64))
  cols = -(-n // rows)
  padded = np.zeros(rows * cols, np.uint8)
  padded[rows * cols - n:] = np.frombuffer(data, np.uint8)
  columns = np.ascontiguousarray(padded.reshape(rows, cols).T).astype(np.uint32)
  crc = np.zeros(rows, np.uint32)
  table = _TABLE
  for column in columns:
    crc = table[(crc ^ column) & 0xFF] ^ (crc >> 8)
  length = cols
  while crc.size > 1:
    if crc.size % 2:
      crc = np.concatenate([np.zeros(1, np.uint32), crc])  # a leading zero row: the CRC of zeros, 0
    crc = _apply(_zeros_operator(length), crc[0::2]) ^ crc[1::2]
    length *= 2
  return int(crc[0])


def crc32c(data: bytes) -> int:
  """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``, RFC 3720's check value)."""
  data = bytes(data)
  return _raw(data) ^ _shift(0xFFFFFFFF, len(data)) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked checksum: ``((c >> 15) | (c << 17)) + 0xA282EAD8 mod 2^32``, ``c = crc32c(data)``."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + MASK_DELTA) & 0xFFFFFFFF


def read_records(path: str | os.PathLike[str], *, verify: bool = True) -> Iterator[bytes]:
  """The records of the TFRecord file at ``path`` (local or any ``etils.epath`` path, e.g. ``gs://``), in order.

  Args:
    path: the file.
    verify: check both CRCs of every record.

  Raises:
    ValueError: a truncated record or a CRC that does not match, naming the file, the record and its byte offset.
  """
  path = epath.Path(path)
  with path.open("rb") as f:
    index, offset = 0, 0
    while True:
      header = f.read(_HEADER.size)
      if not header:
        return
      if len(header) < _HEADER.size:
        raise ValueError(f"{path}: record {index} at byte {offset} is truncated (a {len(header)}-byte header of "
                         f"{_HEADER.size}); the file is incomplete, copy it again")
      length, length_crc = _HEADER.unpack(header)
      if verify and masked_crc32c(header[:8]) != length_crc:
        raise ValueError(f"{path}: record {index} at byte {offset}: the length's CRC does not match; the file is "
                         "corrupt or not a TFRecord file")
      payload = f.read(length)
      footer = f.read(_FOOTER.size)
      if len(payload) < length or len(footer) < _FOOTER.size:
        raise ValueError(f"{path}: record {index} at byte {offset} is truncated ({len(payload)} of {length} data "
                         "bytes); the file is incomplete, copy it again")
      if verify and masked_crc32c(payload) != _FOOTER.unpack(footer)[0]:
        raise ValueError(f"{path}: record {index} at byte {offset}: the data's CRC does not match; the file is "
                         "corrupt")
      yield payload
      index += 1
      offset += _HEADER.size + length + _FOOTER.size


def frame(record: bytes) -> bytes:
  """One record framed as TFRecord writes it (the inverse of what :func:`read_records` reads)."""
  header = struct.pack("<Q", len(record))
  return header + _FOOTER.pack(masked_crc32c(header)) + record + _FOOTER.pack(masked_crc32c(record))


def write_records(path: str | os.PathLike[str], records: Iterable[bytes]) -> int:
  """Writes ``records`` as a TFRecord file at ``path``; returns how many."""
  count = 0
  with epath.Path(path).open("wb") as f:
    for record in records:
      f.write(frame(record))
      count += 1
  return count


def parse_example(serialized: bytes) -> dict[str, Any]:
  """A serialized ``tf.train.Example`` as ``{feature name: list of bytes | ints | floats}``.

  Uses TFDS's own Python definition of the message (``tensorflow_datasets.proto``), not TensorFlow.

  Raises:
    ValueError: ``serialized`` is not an Example proto.
  """
  from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel
  try:
    example = tf_example_pb2.Example.FromString(serialized)
  except DecodeError as err:
    raise ValueError(f"a record of {len(serialized)} bytes is not a tf.train.Example proto: {err}") from None
  out = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    out[name] = [] if kind is None else list(getattr(feature, kind).value)
  return out
