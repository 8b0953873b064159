"""What every training stage (pretraining, SFT, DPO) does around the loop, written once.

A stage module keeps what is its own (its config, data, step function and export) and calls these:

* before any process group, in its ``prepare``: :func:`model_config_from_init`,
  :func:`check_tokenizer_dir`, :func:`check_data_paths`, :func:`check_layout` (each raises
  :class:`~tanuki.config.ConfigError` naming the key);
* inside the process group, in its ``run``: :func:`start_stage` (process groups, device, seeds,
  precision), :func:`~tanuki.checkpoint.plan_resume`, :func:`~tanuki.build.build_training_model`,
  :func:`open_run` (rank 0's run files, metrics logger and summary line), then
  :func:`~tanuki.train.train_and_close`;
* :func:`main`: the body of ``launch/<stage>.py`` after Hydra; it holds :func:`lock_run_dir` (one
  run per run directory) for the run's life.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from tanuki.config import ConfigError, ModelConfig, StageConfig, check_sliding_window
from tanuki.fileio import umask_mode, write_error
from tanuki.hf import HFFormatError, copy_tokenizer_files, model_config_from_hf, read_hf_config, training_vocab_size
from tanuki.metrics import MetricsLogger
from tanuki.parallel.env import DistEnv, init_distributed, resolve_run_dir
from tanuki.parallel.groups import ProcessGroups, build_process_groups
from tanuki.parallel.zero import grad_accumulation_steps

# --------------------------------------------------------------------------------------------------
# Checks before any process group
# --------------------------------------------------------------------------------------------------


def model_config_from_init(init: str, kernels: str, key: str = "init") -> ModelConfig:
    """The architecture of the Hugging Face directory ``init`` (its ``config.json``), with the user's
    kernel choice."""
    try:
        model = model_config_from_hf(read_hf_config(init), source=f"{init}/config.json")
    except (FileNotFoundError, HFFormatError) as e:
        raise ConfigError(key, str(e)) from None
    return replace(model, kernels=kernels)


def tokenizer_vocab_size(path: str, key: str = "tokenizer.path") -> int:
    """Number of ids of a tokenizer directory (its ``tokenizer.json``, as written by build_tokenizer)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(key, f"no tokenizer directory at '{path}'")
    tj = p / "tokenizer.json"
    if not tj.is_file():
        raise ConfigError(key, f"'{path}' has no tokenizer.json (build one with launch/build_tokenizer.py)")
    try:
        return Tokenizer.from_file(str(tj)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises a plain Exception on bad JSON
        raise ConfigError(key, f"{tj}: unreadable ({e})") from None


def check_tokenizer_dir(path: str, key: str = "tokenizer") -> None:
    """A fine-tuning stage's tokenizer directory has a ``tokenizer.json``."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise ConfigError(key, f"no tokenizer.json in {path} (give {key}=<dir>)")


def check_data_paths(paths: Sequence[str], example: str, key: str = "data.path") -> None:
    """At least one data file is given and each exists (glob patterns are expanded later)."""
    if not paths:
        raise ConfigError(key, f"is required: {key}={example}[,...]")
    for p in paths:
        if not Path(p).exists() and not any(c in p for c in "*?["):
            raise ConfigError(key, f"no such file: {p}")


def check_layout(cfg: StageConfig, env: DistEnv) -> int:
    """The parallel layout fits the job's ranks and the batch geometry; returns the accumulation steps."""
    if env.world_size % cfg.parallel.tp:
        raise ConfigError("parallel.tp", f"tp={cfg.parallel.tp} does not divide the {env.world_size} ranks of this job")
    return grad_accumulation_steps(cfg.train, env.world_size // cfg.parallel.tp)


def check_context(seq_len: int, model: ModelConfig, init: str) -> None:
    """A fine-tuning run's ``train.seq_len`` fits the context of the model it starts from."""
    if seq_len > model.max_seq_len:
        raise ConfigError("train.seq_len", f"{seq_len} exceeds the context of {init} ({model.max_seq_len})")
    check_sliding_window(seq_len, model, init)


def prepare_fine_tuning(cfg, env: DistEnv, data_example: str) -> tuple[ModelConfig, str, int]:
    """The start-up checks of a fine-tuning stage (SFT, DPO): the architecture of ``cfg.init`` (a trimmed
    export's vocabulary padded back to a multiple of 128 x tp: zero rows, masked by ``vocab_limit``),
    its context against ``train.seq_len``, the tokenizer directory (``cfg.tokenizer`` or ``init``), the
    data files and the layout. Returns (model config, tokenizer dir, accumulation steps)."""
    model = training_vocab_size(model_config_from_init(cfg.init, cfg.kernels), cfg.parallel.tp)
    check_context(cfg.train.seq_len, model, cfg.init)
    tok = cfg.tokenizer or cfg.init
    check_tokenizer_dir(tok)
    check_data_paths(cfg.data.paths, data_example)
    return model, tok, check_layout(cfg, env)


# --------------------------------------------------------------------------------------------------
# Inside the process group
# --------------------------------------------------------------------------------------------------


def precision_is_bf16(precision: str) -> bool:
    """``train.precision``: auto = bf16 exactly when a GPU is there."""
    if precision == "auto":
        return torch.cuda.is_available()
    return precision == "bf16"


@dataclass
class StageSetup:
    """This rank's place in the job, its device and the run's precision."""

    groups: ProcessGroups
    device: torch.device
    bf16: bool

    @property
    def dp_size(self) -> int:
        return self.groups.dp

    @property
    def dp_rank(self) -> int:
        return self.groups.dp_rank

    @property
    def mpu(self) -> ProcessGroups | None:
        """What DeepSpeed gets as ``mpu``: the groups under tensor parallelism, else nothing."""
        return self.groups if self.groups.tp > 1 else None


def start_stage(cfg: StageConfig, env: DistEnv) -> StageSetup:
    """Process groups (TP innermost), this rank's device, and the seed of every other random draw."""
    groups = build_process_groups(cfg.parallel.tp)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The recipes have no dropout by default; any other randomness (LoRA dropout) is seeded per
    # data-parallel rank, so the ranks of one TP group draw the same numbers.
    torch.manual_seed(cfg.seed + groups.dp_rank)
    return StageSetup(groups=groups, device=device, bf16=precision_is_bf16(cfg.train.precision))


def write_run_files(config: dict, tokenizer_dir: str | None, run_dir: Path) -> None:
    """(Rank 0) the resolved config and a copy of the tokenizer, so the run dir is self-contained."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    tmp.replace(run_dir / "config.yaml")
    if tokenizer_dir and not (run_dir / "tokenizer").is_dir():
        tmp_tok = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=run_dir))
        try:
            os.chmod(tmp_tok, umask_mode(0o777))  # mkdtemp's 0700 otherwise
            copy_tokenizer_files(tokenizer_dir, tmp_tok)
            tmp_tok.replace(run_dir / "tokenizer")
        except BaseException:
            shutil.rmtree(tmp_tok, ignore_errors=True)
            raise


def open_run(cfg: StageConfig, env: DistEnv, config: dict, tokenizer_dir: str | None, run_dir: Path,
             summary: str, print_fn: Callable[[str], None]) -> MetricsLogger | None:
    """Rank 0: write the run files, open the metrics logger (JSONL + W&B) and print the run's summary
    line. Other ranks get None."""
    if not env.is_main:
        return None
    write_run_files(config, tokenizer_dir, run_dir)
    logger = MetricsLogger(run_dir, wandb=cfg.logging.wandb, config=config, print_fn=print_fn)
    print_fn(summary)
    return logger


def describe_layout(setup: StageSetup, env: DistEnv, cfg: StageConfig) -> str:
    """``2 rank(s) [deepspeed] = tp 1 x dp 2, ZeRO-3, fp32``: the part of every summary line about ranks."""
    sp = " (sequence parallel)" if cfg.parallel.sp else ""
    return (f"{env.world_size} rank(s) [{env.launcher}] = tp {setup.groups.tp}{sp} x dp {setup.dp_size}, "
            f"ZeRO-{cfg.parallel.zero_stage}, {'bf16' if setup.bf16 else 'fp32'}")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def stdout_and_log(run_dir: Path) -> Callable[[str], None]:
    """A print function that also appends to ``<run dir>/train.log`` (rank 0's progress log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the run)

    def emit(line: str, **_) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    emit.file = log  # type: ignore[attr-defined]
    return emit


LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another live run holds the run directory (its ``.lock``)."""


def _try_lock(run_dir: Path) -> tuple[int | None, str]:
    """(Rank 0) ``flock`` ``<run_dir>/.lock`` without waiting: ``(fd, "")`` holding it, with this
    process written in it, or ``(None, holder)`` when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "an unknown process"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
              .encode(), 0)
    return fd, ""


@contextlib.contextmanager
def lock_run_dir(run_dir: Path, env: DistEnv) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` for the block: one run per run directory.

    Rank 0 takes an exclusive ``flock`` (the kernel drops it when the process dies, so a killed run
    leaves no stale lock) and writes its pid, host and start time in the file; the outcome is shared
    with every rank, so all of them stop with :class:`RunDirLocked` naming the directory and the holder
    when another run has it. Without the lock a second run would "resume" from the first one's
    checkpoints and both would write the same steps."""
    fd, holder, failure = None, "", None
    if env.is_main:
        try:
            fd, holder = _try_lock(run_dir)
        except OSError as e:  # e.g. a read-only run dir: tell the other ranks too
            failure = write_error(f"the run directory {run_dir}", e)
    if env.world_size > 1 and dist.is_initialized():
        shared = [holder, None if failure is None else str(failure)]
        # under NCCL the objects travel through this rank's GPU (start_stage has not set it yet)
        device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else None
        dist.broadcast_object_list(shared, src=0, device=device)
        holder = shared[0]
        if shared[1] is not None and failure is None:
            raise RunDirLocked(f"rank 0 could not lock {run_dir}: {shared[1]}")
    if failure is not None:
        raise failure
    if holder:
        raise RunDirLocked(f"{run_dir} is in use by another run ({holder}); wait for it to end, stop it, "
                           "or give this run another run.dir")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock; the file stays (a later run reuses it)


def main(cfg: StageConfig, env: DistEnv, *, name: str, prepare: Callable, run: Callable) -> int:
    """The body of ``launch/<name>.py`` after Hydra: ``prepare`` (config and file errors surface here,
    before any process group), start the process group, lock the run directory, ``run`` in it."""
    prep = prepare(cfg, env)
    init_distributed(env, "nccl" if torch.cuda.is_available() else "gloo", timeout_s=prep.cfg.parallel.timeout_s)
    run_dir = resolve_run_dir(prep.cfg.run.dir, name, env).resolve()
    with lock_run_dir(run_dir, env):
        print_fn = stdout_and_log(run_dir) if env.is_main else (lambda *a, **k: None)
        result = run(prep, env, run_dir, print_fn=print_fn)
        if env.is_main:
            print_fn(f"done: step {result.step}, last checkpoint {result.last_checkpoint}")
    sys.stdout.flush()
    return 0
