"""A reader for offline W&B runs (``.wandb`` files), without W&B's servers, for the tests.

The tests compare what :class:`tanuki.metrics.MetricsLogger` sent to W&B with ``metrics.jsonl``: this
module decodes exactly what was logged. Import it as ``from wandb_reader import ...`` (``tests/`` is on
``sys.path``, as for ``conftest``).
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

# The .wandb file is W&B's variant of the LevelDB log format: a 7-byte file header (":W&B", a 2-byte
# magic, a version byte), then 32 KiB blocks of records, each with a 7-byte header (CRC-32 of the type
# byte and payload, little-endian length, type: FULL=1, FIRST=2, MIDDLE=3, LAST=4). Payloads are
# ``wandb.proto.wandb_internal_pb2.Record`` messages.
_BLOCK = 32 * 1024
_FILE_HEADER = 7
_RECORD_HEADER = 7


def _wandb_payloads(data: bytes, source: str):
    if data[:4] != b":W&B":
        raise ValueError(f"{source}: not a .wandb file (bad magic)")
    pos, pending = _FILE_HEADER, b""
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left_in_block
            continue
        payload = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        if len(payload) < length:
            break  # a record still being written
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{source}: corrupt record at byte {pos}")
        pos += _RECORD_HEADER + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""


def read_wandb_history(path: str | os.PathLike, wait_for_exit: float = 0.0) -> list[dict]:
    """The history rows (``run.log`` calls) of an offline ``.wandb`` file, as dicts of plain values.

    W&B's writer is a separate service process that may still be flushing after ``run.finish()``
    returns; ``wait_for_exit`` seconds are spent waiting for the run's final ``exit`` record.
    """
    path = Path(path)
    deadline = time.monotonic() + wait_for_exit
    while True:
        records = []
        for payload in _wandb_payloads(path.read_bytes(), str(path)):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def find_wandb_files(run_dir: str | os.PathLike) -> list[Path]:
    """Offline ``.wandb`` files under a run directory, oldest first (one per resumed segment)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
