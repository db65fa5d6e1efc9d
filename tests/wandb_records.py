"""Read an offline W&B run file (``run-<id>.wandb``) back with wandb's own record schema.

The file is wandb-core's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB log
blocks of 32 KiB whose records (4-byte CRC, 2-byte length, 1-byte type: full/first/middle/last) carry serialized
``wandb.proto.wandb_internal_pb2.Record`` messages. wandb 0.31 ships no Python reader for it (its
``wandb sync --view`` needs wandb-core), so the tests decode the framing here and the records with wandb's
protobuf classes: what W&B would upload, not a byte search.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")  # crc32c, length, record type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = 7, b""
    while pos + HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        body = data[pos + HEADER.size:pos + HEADER.size + length]
        pos += HEADER.size + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body
            pending = b""


def records(path: Path) -> list[Any]:
    """Every record of the run file, as wandb's protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        out.append(record)
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows (``run.log``), each a dict of key -> decoded JSON value."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def of_type(path: Path, kind: str) -> list[Any]:
    """The records of one type (``artifact``, ``config``, ``summary``, ...)."""
    return [getattr(r, kind) for r in records(path) if r.WhichOneof("record_type") == kind]
