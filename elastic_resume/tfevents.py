"""TensorBoard event files, written without TensorBoard (so ``report --tensorboard`` needs no
extra package): scalar summaries as ``Event`` protocol-buffer messages in TFRecord framing, which
TensorBoard, ``tensorboard.backend.event_processing`` and TensorFlow's readers open.

Framing of each record: ``u64 length``, ``u32 masked CRC-32C of the length``, the message,
``u32 masked CRC-32C of the message`` (little-endian). The messages use four fields of
``tensorflow/core/util/event.proto``: ``wall_time`` (1, double), ``step`` (2, int64),
``file_version`` (3, string) and ``summary`` (5: ``Summary.value`` (1) of ``tag`` (1, string)
and ``simple_value`` (2, float)).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes it (a negative step takes ten bytes)
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: Mapping[str, float] | None = None) -> bytes:
    """One ``Event`` message."""
    body = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        body += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        body += _bytes_field(5, values)
    return body


def record(message: bytes) -> bytes:
    """``message`` in TFRecord framing."""
    length = struct.pack("<Q", len(message))
    return length + _masked(length) + message + _masked(message)


class EventFileWriter:
    """A new event file in ``logdir`` (created), named the way TensorBoard looks for them."""

    def __init__(self, logdir: str) -> None:
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.elastic-resume"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "xb")  # create-only; closed by close()
        self._file.write(record(event(time.time(), 0, file_version="brain.Event:2")))

    def scalars(self, step: int, values: Mapping[str, float], *, wall_time: float) -> None:
        if values:
            self._file.write(record(event(wall_time, step, scalars=values)))

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
