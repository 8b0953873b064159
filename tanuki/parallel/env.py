"""Where this process sits in a job, whichever launcher started it.

The same entry point runs as one plain ``python`` process, under ``torchrun`` and ``deepspeed``
(which export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), and as one
``srun`` task per rank (SLURM exports ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; DeepSpeed
and PyTorch do not read those, so they are mapped here). Everything in this module reads only the
environment, so the data-parallel size is known, and the config can be checked against it, before any
process group exists.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    #: how the ranks were started: "single", "torchrun/deepspeed" or "srun"
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_local_rank(argv: list[str]) -> list[str]:
    """Remove the ``--local_rank=N`` / ``--local_rank N`` argument the ``deepspeed`` launcher appends
    (Hydra would reject it), exporting its value as ``LOCAL_RANK`` if that is not set yet."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg.startswith(("--local_rank=", "--local-rank=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        else:
            out.append(arg)
        if value is not None:
            os.environ.setdefault("LOCAL_RANK", value)
        i += 1
    return out


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def dist_env() -> DistEnv:
    """This process's rank, world size and local rank, from the launcher's environment variables.

    Under ``srun`` (SLURM variables but no ``RANK``), the SLURM values are also exported as
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` so that ``torch.distributed`` finds them.
    """
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    if rank is not None and world is not None:
        local = _int_env("LOCAL_RANK")
        return DistEnv(rank, world, rank if local is None else local, "torchrun/deepspeed")
    procid, ntasks = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
    if procid is not None and ntasks is not None and ntasks > 1:
        local = _int_env("SLURM_LOCALID") or 0
        os.environ.update(RANK=str(procid), WORLD_SIZE=str(ntasks), LOCAL_RANK=str(local))
        return DistEnv(procid, ntasks, local, "srun")
    return DistEnv(0, 1, 0, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(env: DistEnv, backend: str, timeout_s: float | None = None) -> None:
    """Start the default process group (``deepspeed.init_distributed``) for ``env``.

    ``timeout_s`` (``parallel.timeout_s``): how long a collective waits for the other ranks before
    failing (None: DeepSpeed's default, 30 minutes).

    A single plain process gets a one-rank group on localhost so that the same DeepSpeed code path runs.
    Multi-rank jobs need ``MASTER_ADDR``/``MASTER_PORT`` from the launcher (or the batch script, for
    ``srun``): a missing one is reported here rather than as a rendezvous hang.
    """
    # Lazy: deepspeed is heavy and logs its accelerator detection on import; only this function needs it.
    import deepspeed

    if dist.is_initialized():
        return
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    else:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not set: a {env.world_size}-rank job started by {env.launcher} needs "
                "the address of rank 0 (export them in the batch script; see launch/slurm/)"
            )
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)


def resolve_run_dir(configured: str | None, stage: str, env: DistEnv) -> Path:
    """The one run directory all ranks share (see ``run.dir`` in conf/pretrain.yaml).

    Order: the configured value, ``$TANUKI_RUN_DIR``, ``runs/slurm-$SLURM_JOB_ID`` (a requeued job keeps
    its id and so finds its checkpoints), else a time-stamped name that rank 0 picks and broadcasts, so
    ranks started a second apart never disagree. Needs the process group when it reaches the last case.
    """
    if configured:
        return Path(configured)
    if os.environ.get("TANUKI_RUN_DIR"):
        return Path(os.environ["TANUKI_RUN_DIR"])
    if os.environ.get("SLURM_JOB_ID"):
        return Path("runs") / f"slurm-{os.environ['SLURM_JOB_ID']}"
    name = [f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if env.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    return Path("runs") / name[0]


def barrier() -> None:
    """Wait for every rank of the job (a no-op in a one-rank or group-less process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(t, op=None):
    """``t`` all-reduced in place over the job (default: sum) and returned; a no-op with one rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t
