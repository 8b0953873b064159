"""Run a function on several CPU processes joined by a gloo process group, and collect the results."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out_dir) / f"{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"{rank}.pt")
        raise
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """``[fn(rank, world, *args) for each rank]``, each in its own process; ``fn`` must be importable."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world, _free_port(), out_dir, fn, args), nprocs=world,
                               start_method="spawn", join=True)
        except mp.ProcessRaisedException:
            pass
        results = []
        for rank in range(world):
            path = Path(out_dir) / f"{rank}.pt"
            if not path.exists():
                raise AssertionError(f"rank {rank} of {world} died without a result")
            r = torch.load(path, weights_only=False)
            if "error" in r:
                raise AssertionError(f"rank {rank} of {world} failed:\n{r['error']}")
            results.append(r["ok"])
        return results
