"""A reader of the TensorBoard event files `moe_jax.tensorboard_events` writes, for the tests:
(step, tag, value) of every summary, CRCs checked."""
from __future__ import annotations

import pathlib
import struct
from typing import Iterator

from moe_jax.run.events import PATTERN, _masked_crc


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[i]
    value |= (byte & 0x7F) << shift
    i, shift = i + 1, shift + 7
    if byte < 0x80:
      return value, i


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
  """(field number, value) of a message: an int for a varint, the bytes for any other type."""
  sizes = {1: 8, 5: 4}
  i = 0
  while i < len(data):
    key, i = _read_varint(data, i)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, i = _read_varint(data, i)
    elif wire_type == 2:
      size, i = _read_varint(data, i)
      value, i = data[i:i + size], i + size
    else:
      value, i = data[i:i + sizes[wire_type]], i + sizes[wire_type]
    yield number, value


def _records(path: pathlib.Path) -> Iterator[bytes]:
  data = path.read_bytes()
  i = 0
  while i < len(data):
    header, header_crc = data[i:i + 8], data[i + 8:i + 12]
    (size,) = struct.unpack('<Q', header)
    event, event_crc = data[i + 12:i + 12 + size], data[i + 12 + size:i + 16 + size]
    if header_crc != _masked_crc(header) or event_crc != _masked_crc(event):
      raise ValueError(f'{path}: bad CRC in the record at byte {i}')
    yield event
    i += 16 + size


def _value(data: bytes) -> tuple[str, float | list[float]]:
  fields = dict(_fields(data))
  if 2 in fields:
    return fields[1].decode(), struct.unpack('<f', fields[2])[0]
  buckets = dict(_fields(fields[5]))[7]
  return fields[1].decode(), list(struct.unpack(f'<{len(buckets) // 8}d', buckets))


def read_events(logdir: str | pathlib.Path) -> list[tuple[int, str, float | list[float]]]:
  """(step, tag, value) of every summary in `logdir`'s event files (oldest file first); a
  histogram's value is its list of bucket counts."""
  out = []
  for path in sorted(pathlib.Path(logdir).glob(PATTERN)):
    for event in _records(path):
      fields = list(_fields(event))
      step = next((v for n, v in fields if n == 2), 0)
      for number, summary in fields:
        if number == 5:
          out += [(step, *_value(value)) for n, value in _fields(summary) if n == 1]
  return out
