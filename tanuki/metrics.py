"""Training metrics: one line per log interval on stdout, ``metrics.jsonl``, and Weights & Biases.

W&B runs offline by default (``logging.wandb.mode=offline``), so no API key is ever needed to train;
``wandb sync <run dir>/wandb/offline-run-*`` uploads a run later. The W&B run id is stored in the run
directory, so a resumed job continues the same W&B run instead of starting a new one.

:func:`read_wandb_history` decodes an offline ``.wandb`` file without W&B's servers, so tests (and
users without an account) can read back exactly what was logged.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

from tanuki.config import WandbConfig

RUN_ID_FILE = "wandb_run_id"


class MetricsLogger:
    """Writes every logged record to ``metrics.jsonl`` and W&B; prints a one-line summary.

    Only the rank that logs (rank 0) should construct one.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        wandb: WandbConfig = WandbConfig(),
        config: Optional[Mapping[str, Any]] = None,
        print_fn=None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._print = print_fn or _print_flush
        self._wandb_run = None
        if wandb.mode != "disabled":
            self._wandb_run = self._start_wandb(wandb, config)

    def _start_wandb(self, cfg: WandbConfig, config):
        import wandb as wandb_lib

        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        run = wandb_lib.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or self.run_dir.name,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            config=dict(config) if config is not None else None,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            mode=cfg.mode,
            settings=wandb_lib.Settings(silent=True, console="off"),
        )
        # Dashboards can plot every series against consumed tokens as well as against the step.
        run.define_metric("tokens")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, record: Mapping[str, Any], line: Optional[str] = None) -> None:
        """Log one record (must contain ``step``); print ``line`` if given."""
        clean = {k: _plain_number(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean, ensure_ascii=False) + "\n")
        self._jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(clean, step=int(clean["step"]))
        if line is not None:
            self._print(line)

    def replay(self, records: list[Mapping[str, Any]]) -> None:
        """Send already-written records to W&B only (not to metrics.jsonl or stdout).

        A resumed run replays the records up to its checkpoint: W&B's writer buffers, so a job killed
        with SIGKILL loses the history it had not flushed, while metrics.jsonl has every line. Steps
        the W&B run already holds are ignored by W&B (its steps only increase).
        """
        if self._wandb_run is None:
            return
        for record in records:
            clean = {k: _plain_number(v) for k, v in record.items()}
            self._wandb_run.log(clean, step=int(clean["step"]))

    def close(self) -> None:
        self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_records(path: str | os.PathLike, up_to_step: Optional[int] = None) -> list[dict]:
    """The records of a ``metrics.jsonl`` in step order, the last record of each (step, kind) kept.

    A resumed run re-logs the steps after its checkpoint, so a step can appear twice; the later line
    is the one that counts. A final line cut short by a killed process is ignored; a bad line elsewhere
    raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    kept: dict[tuple, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: a write that never finished
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e})") from None
        if up_to_step is not None and record["step"] > up_to_step:
            continue
        kind = tuple(sorted(k for k in record if k not in ("step", "tokens")))
        kept.pop((record["step"], kind), None)
        kept[(record["step"], kind)] = record
    return sorted(kept.values(), key=lambda r: r["step"])


def _print_flush(line: str) -> None:
    print(line, flush=True)


def _plain_number(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --------------------------------------------------------------------------------------------------
# Reading offline W&B runs
# --------------------------------------------------------------------------------------------------

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
    from wandb.proto import wandb_internal_pb2 as pb

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
