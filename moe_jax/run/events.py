"""TensorBoard event files without TensorFlow: a small writer of scalars and histograms.

An event file is a TFRecord file (length, masked CRC-32C, bytes, masked CRC-32C per record) of
`tensorflow.Event` protocol buffers, encoded here by hand: the first event names the file
version, each later one holds a `Summary` of (tag, simple_value | histo) values at a step.

`RunEvents` keeps a run directory's event file in step with its metrics.jsonl: each record
becomes summaries (`record_summaries`), and a resumed run rewrites the file from the records it
kept, so no point past the restored step is shown twice. `tensorboard --logdir runs/` then shows
every run under runs/ (a sweep's members side by side).
"""
from __future__ import annotations

import pathlib
import socket
import struct
import time

PATTERN = 'events.out.tfevents.*'


# --- CRC-32C and protocol-buffer encoding ------------------------------------------------------


def _crc_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord files."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  return bytes(out + bytes([n]))


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + payload


def _message(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def _double(number: int, value: float) -> bytes:
  return _field(number, 1, struct.pack('<d', value))


def _event(step: int, *, version: str | None = None, values: tuple[bytes, ...] = ()) -> bytes:
  """Event{wall_time=1, step=2, file_version=3, summary=5{value=1...}}."""
  event = _double(1, time.time()) + _field(2, 0, _varint(step))
  if version is not None:
    event += _message(3, version.encode())
  if values:
    event += _message(5, b''.join(_message(1, value) for value in values))
  return event


def _scalar(tag: str, value: float) -> bytes:
  """Summary.Value{tag=1, simple_value=2 (float)}."""
  return _message(1, tag.encode()) + _field(2, 5, struct.pack('<f', value))


def _histogram(tag: str, counts: list[float]) -> bytes:
  """Summary.Value{tag=1, histo=5}: bucket i = [i - 0.5, i + 0.5) holds counts[i]."""
  n = len(counts)
  histo = (_double(1, -0.5) + _double(2, n - 0.5) + _double(3, sum(counts))
           + _double(4, sum(i * c for i, c in enumerate(counts)))
           + _double(5, sum(i * i * c for i, c in enumerate(counts)))
           + _message(6, struct.pack(f'<{n}d', *(i + 0.5 for i in range(n))))
           + _message(7, struct.pack(f'<{n}d', *counts)))
  return _message(1, tag.encode()) + _message(5, histo)


# --- Writer ------------------------------------------------------------------------------------


class EventWriter:
  """Appends summaries to a new event file in `logdir` (created if needed)."""

  def __init__(self, logdir: str | pathlib.Path):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}'
    self._file = self.path.open('wb')
    self._write(_event(0, version='brain.Event:2'))

  def _write(self, event: bytes) -> None:
    length = struct.pack('<Q', len(event))
    self._file.write(length + _masked_crc(length) + event + _masked_crc(event))

  def summaries(self, step: int, scalars: dict[str, float] = None,
                histograms: dict[str, list[float]] = None) -> None:
    """One event at `step`: scalars {tag: value} and histograms {tag: [count per bucket]}."""
    values = tuple(_scalar(tag, float(v)) for tag, v in (scalars or {}).items())
    values += tuple(_histogram(tag, [float(c) for c in counts])
                    for tag, counts in (histograms or {}).items())
    if values:
      self._write(_event(step, values=values))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# --- A run directory's events ------------------------------------------------------------------


def _tag(key: str) -> str:
  """metrics.jsonl key -> tag: 'eval_loss' -> 'eval/loss', 'lr' -> 'train/learning_rate',
  'grad_norm' -> 'train/grad_norm'; 'moe/<block>/<metric>' as it is."""
  if '/' in key:
    return key
  for prefix in ('train', 'eval'):
    if key.startswith(prefix + '_'):
      return f'{prefix}/{key[len(prefix) + 1:]}'
  return 'train/' + {'lr': 'learning_rate'}.get(key, key)


def record_summaries(writer: EventWriter, record: dict) -> None:
  """Writes a metrics.jsonl record at its step: numbers as scalars, lists (a layer's
  tokens_per_expert) as histograms over the expert index; None values are left out."""
  items = [(_tag(key), value) for key, value in record.items()
           if key != 'step' and value is not None]
  writer.summaries(record['step'],
                   scalars={tag: value for tag, value in items if not isinstance(value, list)},
                   histograms={tag: value for tag, value in items if isinstance(value, list)})


class RunEvents:
  """The event file of a run directory, in step with metrics.jsonl's `records`: older event files
  are replaced by one holding `records`, and each later `write(record)` is appended."""

  def __init__(self, workdir: pathlib.Path, records: list[dict]):
    for old in pathlib.Path(workdir).glob(PATTERN):
      old.unlink()
    self.writer = EventWriter(workdir)
    for record in records:
      record_summaries(self.writer, record)
    self.writer.flush()

  def write(self, record: dict) -> None:
    record_summaries(self.writer, record)
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
