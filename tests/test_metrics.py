"""metrics.jsonl and the offline W&B run hold the same series; a resumed run keeps its W&B id."""

import json
import struct
import zlib

import pytest

from tanuki.metrics import MetricsLogger, WandbConfig, format_duration
from wandb_reader import find_wandb_files, read_wandb_history


def _log_some(run_dir, steps, start=0, **kw):
    logger = MetricsLogger(run_dir, wandb=WandbConfig(mode="offline", project="test"), config={"seed": 1}, **kw)
    for s in range(start, start + steps):
        logger.log({"step": s, "tokens": 1024 * (s + 1), "loss": 5.0 / (s + 1), "lr": 1e-3 * s})
    logger.close()


def test_jsonl_and_offline_wandb_contain_the_same_series(tmp_path):
    _log_some(tmp_path, 7, print_fn=lambda *a, **k: None)
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    files = find_wandb_files(tmp_path)
    assert len(files) == 1
    history = read_wandb_history(files[0], wait_for_exit=60)
    assert len(history) == len(jsonl) == 7
    for row, rec in zip(history, jsonl):
        assert row["_step"] == rec["step"]
        for key in ("step", "tokens", "loss", "lr"):
            assert row[key] == pytest.approx(rec[key], rel=1e-12), key


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    _log_some(tmp_path, 3, print_fn=lambda *a, **k: None)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    _log_some(tmp_path, 3, start=3, print_fn=lambda *a, **k: None)
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    files = find_wandb_files(tmp_path)
    assert files and all(f.name == f"run-{run_id}.wandb" for f in files)
    steps = [row["_step"] for f in files for row in read_wandb_history(f, wait_for_exit=60)]
    assert steps == list(range(6))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_disabled_wandb_writes_only_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path, wandb=WandbConfig(mode="disabled"))
    lines = []
    logger._print = lambda line, flush=False: lines.append(line)
    logger.log({"step": 0, "loss": float("nan")}, line="step 0 loss nan")
    logger.close()
    assert not (tmp_path / "wandb").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "loss": "nan"}
    assert lines == ["step 0 loss nan"]


def test_wandb_reader_follows_records_across_blocks(tmp_path):
    """Records split over 32 KiB blocks (FIRST/MIDDLE/LAST) are reassembled; bad CRCs are reported."""
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.Record()
    item = rec.history.item.add()
    item.key, item.value_json = "blob", json.dumps("x" * 70000)
    payload = rec.SerializeToString()

    def header(kind, chunk):
        return struct.pack("<IHB", zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF, len(chunk), kind)

    data = bytearray(b":W&B\xe1\xbe\x00")
    block, first = 32 * 1024, True
    rest = payload
    while rest:
        room = block - len(data) % block - 7
        chunk, rest = rest[:room], rest[room:]
        kind = (2 if rest else 1) if first else (3 if rest else 4)
        data += header(kind, chunk) + chunk
        first = False
    path = tmp_path / "run-x.wandb"
    path.write_bytes(bytes(data))
    rows = read_wandb_history(path)
    assert len(rows) == 1 and rows[0]["blob"] == "x" * 70000

    data[20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt record at byte 7"):
        read_wandb_history(path)
    path.write_bytes(b"not wandb")
    with pytest.raises(ValueError, match="not a .wandb file"):
        read_wandb_history(path)


def test_format_duration():
    assert format_duration(59) == "0:59"
    assert format_duration(3 * 3600 + 7 * 60 + 5) == "3:07:05"
    assert format_duration(float("inf")) == "?"
