"""Reads back what W&B wrote offline: a run's ``.wandb`` file is a log of protobuf ``Record``s in
LevelDB's log format (W&B's header, then 32 KiB blocks of records, each a CRC32, a length, and a
type: whole, or the first, middle or last fragment of one record). W&B no longer ships a reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

BLOCK = 32 * 1024
HEADER = 7  # W&B's: ":W&B", magic 0xBEE1, version 0; each record's: crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    assert data[:HEADER] == b":W&B\xe1\xbe\x00", f"{path}: not a W&B log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zeros: the block's padding
            pos += BLOCK - pos % BLOCK
            continue
        body = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body


def records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    for body in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(body)
        yield record


def values(items) -> dict:
    """A history, summary or config record's items as {key: value} (a key is in ``key`` or, as
    W&B 0.2x writes it, in ``nested_key``)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
