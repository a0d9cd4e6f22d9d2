"""Metrics a person can follow: TensorBoard event files (no TensorFlow needed) and log lines.

The event files are TFRecord-framed ``Event`` protocol buffers with scalar summaries, the
format TensorBoard reads; the few fields needed are encoded here directly, so that the
project does not depend on TensorFlow or tensorboard.
"""
from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  key = _varint((number << 3) | wire)
  if wire == 2:
    return key + _varint(len(payload)) + payload
  return key + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  """Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5{value=1{tag=1, simple_value=2}}}."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                      for tag, value in scalars.items())
    out += _field(5, 2, values)
  return out


class SummaryWriter:
  """Appends scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>``."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    self._file = open(self.path, "ab")
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                     + struct.pack("<I", _masked_crc(record)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Writes ``values`` (tag → number) at ``step`` and flushes."""
    self._write(_event(time.time(), int(step), scalars={k: float(v) for k, v in values.items()}))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = value = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, i


def _fields(buf: bytes):
  i = 0
  while i < len(buf):
    key, i = _read_varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _read_varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    elif wire == 2:
      n, i = _read_varint(buf, i)
      value, i = buf[i:i + n], i + n
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield number, value


def read_scalars(path: str) -> list[tuple[int, str, float]]:
  """Reads an event file back as (step, tag, value), checking every record's CRC."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked_crc(header):
      raise ValueError(f"{path}: corrupt record header at byte {i}")
    record = data[i + 12:i + 12 + length]
    if struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] != _masked_crc(record):
      raise ValueError(f"{path}: corrupt record at byte {i}")
    i += 16 + length
    step = 0
    for number, value in _fields(record):
      if number == 2:
        step = value
      elif number == 5:
        for _, summary_value in _fields(value):
          parts = dict(_fields(summary_value))
          out.append((step, parts[1].decode(), struct.unpack("<f", parts[2])[0]))
  return out


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
