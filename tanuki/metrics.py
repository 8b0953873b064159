"""Training metrics: one line per log interval on stdout, ``metrics.jsonl``, and Weights & Biases.

W&B runs offline by default (``logging.wandb.mode=offline``), so no API key is ever needed to train;
``wandb sync <run dir>/wandb/offline-run-*`` uploads a run later. The W&B run id is stored in the run
directory, so a resumed job continues the same W&B run instead of starting a new one.

:func:`read_metrics` reads ``metrics.jsonl`` back (after resumes); the tests read the offline ``.wandb``
files with ``tests/wandb_reader.py``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
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
        # Lazy: wandb takes ~0.5 s to import and is not needed with wandb.mode=disabled nor by tanuki.plot.
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


#: how metrics.jsonl spells the non-finite floats JSON cannot hold
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class MetricsError(ValueError):
    """metrics.jsonl cannot be read; the message names the file (and the line)."""


def _parse_record(text: str, where: str) -> dict:
    record = json.loads(text)
    if not isinstance(record, dict):
        raise MetricsError(
            f"{where}: expected a JSON object, got {type(record).__name__}"
        )
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise MetricsError(f"{where}: the record has no integer 'step' (got {step!r})")
    return {
        k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()
    }


def _after_fragment(line: str, where: str) -> dict | None:
    """The record at the end of ``line`` when a partial record precedes it (a killed run's last write,
    then the resumed run's first): records are flat objects, so it starts at the first ``{`` from
    which the rest of the line parses."""
    start = line.find("{", 1)
    while start != -1:
        try:
            return _parse_record(line[start:], where)
        except json.JSONDecodeError:
            start = line.find("{", start + 1)
    return None


def is_train(record: dict) -> bool:
    """Training records carry ``loss``; validation records ``val_loss`` (and no ``loss``)."""
    return "loss" in record


def _kind(record: dict) -> tuple:
    """What a record is, besides its step: training, validation, or another set of keys."""
    if is_train(record):
        return ("train",)
    if "val_loss" in record:
        return ("val",)
    return tuple(sorted(k for k in record if k not in ("step", "tokens")))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl`` in logged order, after resumes.

    A resumed run appends to the same file and recomputes the steps after its checkpoint, so a
    training record whose step is not after the previous one's starts a new segment: every earlier
    record at or after that step is dropped (the later record of a step wins, and steps a killed
    segment logged past its checkpoint are dropped until recomputed). A partial last line (a kill
    mid-write) is ignored; a record appended to such a fragment by the resumed run is kept.
    ``"nan"``/``"inf"``/``"-inf"`` strings are read back as floats.

    Raises FileNotFoundError when the file is missing and :class:`MetricsError` for a line that is
    not a record (naming the file and the line number), except a partial last line, which is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is this a run directory?)")
    # The text after the last newline is a record cut short by a kill, unless it parses.
    lines = path.read_text(encoding="utf-8").split("\n")
    records: list[dict] = []
    last_train_step: int | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        is_last = number == len(lines)
        try:
            record = _parse_record(line, where)
        except json.JSONDecodeError as e:
            record = _after_fragment(line, where)
            if record is None and is_last:
                break  # cut short by a kill
            if record is None:
                message = f"{where}: not a JSON record ({e.msg}): {line[:80]!r}"
                raise MetricsError(message) from None
        if is_train(record):
            step = record["step"]
            if last_train_step is not None and step <= last_train_step:
                # A resume: the steps from here on are recomputed.
                records = [r for r in records if r["step"] < step]
            last_train_step = step
        records.append(record)
    # Any other record logged twice for a step (e.g. validation): the later one wins.
    kept, seen = [], set()
    for r in reversed(records):
        key = (r["step"], _kind(r))
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept[::-1]


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

