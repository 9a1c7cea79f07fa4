"""Read the history records of an offline W&B run file (run-*.wandb) without the network.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a
7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) whose payload is a
protobuf `Record` from wandb.proto.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768


def record_kinds(path: Path) -> dict[str, int]:
    """How many records of each type the file holds (for failure messages)."""
    from collections import Counter

    return dict(Counter(rec.WhichOneof("record_type") for rec in _records(path)))


def history(path: Path) -> list[dict]:
    rows = []
    for rec in _records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            )
    return rows


def _records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, payloads, pending = 7, [], b""
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        data, pos = raw[pos : pos + length], pos + length
        if kind == 1:
            payloads.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            payloads.append(pending + data)
    out = []
    for data in payloads:
        rec = pb.Record()
        rec.ParseFromString(data)
        out.append(rec)
    return out
