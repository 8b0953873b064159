"""tanuki's own weight files and checkpoint reading.

A *model file* is a safetensors file with tanuki parameter names whose metadata carries the model
config (``tanuki.model_config``, JSON), so that it can be exported or reloaded without the run's config.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from tanuki.config import ConfigError, ModelConfig, ParallelConfig, from_dict, to_dict
from tanuki.parallel.env import DistEnv
from tanuki.parallel.reshard import check_reshardable, needs_reshard
from tanuki.parallel.tensor_parallel import merge_state_dicts

MODEL_CONFIG_KEY = "tanuki.model_config"


def save_model_file(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike) -> Path:
    """Write ``state_dict`` and ``cfg`` to one safetensors file, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    from tanuki.fileio import umask_mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if not k.endswith("inv_freq")}
    if cfg.tie_embeddings:  # one tensor under two names: safetensors stores it once
        tensors.pop("head.weight", None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", MODEL_CONFIG_KEY: json.dumps(to_dict(cfg))})
        os.chmod(tmp, umask_mode())  # mkstemp's 0600 otherwise
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model_file(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_model_file`: its model config and state dict."""
    from tanuki.fileio import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    meta, sd = read_safetensors(path, ValueError)
    if MODEL_CONFIG_KEY not in meta:
        raise ValueError(f"{path}: safetensors file without '{MODEL_CONFIG_KEY}' metadata (not written by tanuki)")
    cfg = from_dict(ModelConfig, json.loads(meta[MODEL_CONFIG_KEY]), prefix="model")
    if cfg.tie_embeddings and "head.weight" not in sd and "embed.weight" in sd:
        sd["head.weight"] = sd["embed.weight"]
    return cfg, sd


# --------------------------------------------------------------------------------------------------
# Resumable training checkpoints
# --------------------------------------------------------------------------------------------------
#
# Layout of ``<run dir>/checkpoints/``::
#
#     latest                      name of the newest complete checkpoint (written last, atomically)
#     step_00001000/              DeepSpeed's files (mp_rank_00_model_states.pt, ZeRO optimizer shards)
#         tanuki_state.json       step, consumed samples, the run's config, the layout that wrote it
#         rng_rank00000.pt ...    every rank's RNG states
#         universal/              made on a resume with another TP/DP shape: DeepSpeed's universal form
#                                 (tanuki.parallel.reshard), kept for the next such resume
#     step_00002000.partial/      a save in progress (or killed mid-way): never read, removed later
#     zero_to_fp32.py             DeepSpeed's consolidation script (offline; no GPU needed)
#
# A save writes everything into ``step_N.partial``; when every rank is done, rank 0 renames the
# directory to ``step_N`` and then rewrites ``latest``. A crash at any point leaves the previous
# checkpoint named by ``latest`` and loadable.

LATEST_FILE = "latest"
STATE_FILE = "tanuki_state.json"
PARTIAL_SUFFIX = ".partial"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, or written for another configuration."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    """A directory renamed into place by :func:`commit_checkpoint` (its state file is written first)."""
    p = Path(checkpoint_dir)
    return p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX) and (p / STATE_FILE).is_file()


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (the ``checkpoints/`` directory), or None.

    ``latest`` names it; if that file is missing or names something incomplete (it is rewritten after
    the rename, so a crash between the two leaves it one behind), the highest complete step wins.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    named = root / LATEST_FILE
    candidates = sorted((p for p in root.glob("step_*") if is_complete(p)), key=lambda p: p.name)
    if named.is_file():
        tag = named.read_text().strip()
        if is_complete(root / tag) and (not candidates or candidates[-1].name <= tag):
            return root / tag
    return candidates[-1] if candidates else None


def previous_checkpoint(checkpoint: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint older than ``checkpoint``, beside it (None if there is none)."""
    p = Path(checkpoint)
    older = sorted((c for c in p.parent.glob("step_*") if is_complete(c) and c.name < p.name), key=lambda c: c.name)
    return older[-1] if older else None


def skipped_newer(checkpoint: str | os.PathLike) -> str | None:
    """Why newer ``step_*`` directories beside ``checkpoint`` were passed over (None if there are none):
    a resume or export that picks the newest *complete* checkpoint says so instead of silently using
    an older one."""
    p = Path(checkpoint)
    newer = sorted((c for c in p.parent.glob("step_*") if c.name > p.name and c.is_dir() and not is_complete(c)
                    and not c.name.endswith(".old" + PARTIAL_SUFFIX)), key=lambda c: c.name)
    if not newer:
        return None
    why = [f"{c.name} ({'a save in progress or interrupted' if c.name.endswith(PARTIAL_SUFFIX) else f'no {STATE_FILE}: its save did not finish'})"
           for c in newer]
    return f"using {p.name}, the newest complete checkpoint in {p.parent}; passed over: {', '.join(why)}"


def with_previous(error: CheckpointError, checkpoint: Path, how: str) -> CheckpointError:
    """``error`` with the previous complete checkpoint named, and ``how`` to use it (``how`` is formatted
    with ``prev``)."""
    prev = previous_checkpoint(checkpoint)
    hint = f"; the previous complete checkpoint is {prev}: {how.format(prev=prev)}" if prev else \
        "; there is no earlier complete checkpoint"
    return CheckpointError(f"{error}{hint}")


def read_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The ``tanuki_state.json`` of a complete checkpoint."""
    p = Path(checkpoint_dir)
    if not is_complete(p):
        raise CheckpointError(f"{p}: not a complete tanuki checkpoint (no {STATE_FILE})")
    try:
        return json.loads((p / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / STATE_FILE}: unreadable ({e})") from None


def begin_checkpoint(root: Path, step: int) -> Path:
    """(Rank 0) the empty ``step_N.partial`` directory a save writes into."""
    import shutil

    partial = root / (step_tag(step) + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit_checkpoint(root: Path, step: int, state: dict, keep_last: int) -> Path:
    """(Rank 0, after every rank finished writing) make ``step_N`` complete and the latest; prune."""
    import shutil

    tag = step_tag(step)
    partial, final = root / (tag + PARTIAL_SUFFIX), root / tag
    _write_text_atomic(partial / STATE_FILE, json.dumps(state, indent=1, ensure_ascii=False) + "\n")
    if final.exists():  # the same step saved again (e.g. a resumed run re-reaching it): replace it
        old = root / (tag + ".old" + PARTIAL_SUFFIX)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    _write_text_atomic(root / LATEST_FILE, tag + "\n")
    # Housekeeping: leftovers of interrupted saves, and complete checkpoints beyond keep_last.
    for stale in root.glob("step_*" + PARTIAL_SUFFIX):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        complete = sorted((p for p in root.glob("step_*") if is_complete(p)), key=lambda p: p.name)
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def rng_state() -> dict:
    """Every RNG a training step may draw from (Python, NumPy, torch CPU and CUDA), as tensors and plain
    data only, so that the file loads with ``weights_only=True`` (no pickled NumPy arrays)."""
    import random

    import numpy as np

    py_version, py_keys, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "format": 2,
        "python": {"version": py_version, "state": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "state": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; also its format before tanuki stored plain data (Python's state
    tuple and NumPy's state tuple with a NumPy array, as pickled by those libraries)."""
    import random

    import numpy as np

    py, nps = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    if isinstance(nps, dict):
        nps = (nps["kind"], nps["state"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    random.setstate(py)
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(path: Path) -> dict:
    """A rank's RNG file (:func:`rng_state`, either format), read with ``weights_only=True``."""
    from tanuki.fileio import load_pt

    return load_pt(path, CheckpointError)


def check_checkpoint_files(checkpoint: Path, recursive: bool = False) -> None:
    """Read every ``.pt`` file of ``checkpoint`` (DeepSpeed's shards, the RNG files; with ``recursive``
    also those of subdirectories, as in a universal checkpoint) safely and memory-mapped (only the
    pickled structure, not the tensor bytes), before anything loads them: a crafted file (a pickle that
    would run code) or a truncated one raises :class:`CheckpointError` naming it."""
    from tanuki.fileio import load_pt

    for f in sorted(Path(checkpoint).rglob("*.pt") if recursive else Path(checkpoint).glob("*.pt")):
        load_pt(f, CheckpointError, mmap=True)


def check_compatible(saved: Mapping, current: Mapping, checkpoint_dir: Path, keys: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` naming the first key under ``keys`` whose value differs.

    ``saved``/``current`` are plain config dicts; ``keys`` are top-level sections or dotted keys.
    """
    def flat(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, Mapping):
                yield from flat(v, key)
            else:
                yield key, v

    saved_flat, current_flat = dict(flat(saved)), dict(flat(current))
    for key in sorted(set(saved_flat) | set(current_flat)):
        if not any(key == k or key.startswith(k + ".") for k in keys):
            continue
        a, b = saved_flat.get(key), current_flat.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            raise ConfigError(
                key,
                f"the checkpoint {checkpoint_dir} was written with {key}={a!r} but this run has {b!r}; "
                "resume with the same value (or start a new run.dir, e.g. with init= from an export)",
            )


def resolve_checkpoint(path: str | os.PathLike, note: Callable[[str], None] | None = None) -> Path:
    """A run directory (its latest checkpoint), a ``checkpoints/`` directory, or a checkpoint itself.

    ``note`` is told when newer checkpoint directories were passed over as incomplete
    (:func:`skipped_newer`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run or checkpoint directory")
    if is_complete(p):
        return p
    if p.name.startswith("step_"):
        raise CheckpointError(f"{p}: not a complete tanuki checkpoint (no {STATE_FILE}: its save did not finish)")
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            why = skipped_newer(found)
            if why and note is not None:
                note(f"note: {why}")
            return found
    raise CheckpointError(f"{p}: no complete checkpoint here (expected step_N/{STATE_FILE} under checkpoints/)")


def _consolidate_tp_rank(checkpoint: Path, zero_stage: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """The fp32 weights of one tensor-parallel rank (its shards, gathered over the ZeRO ranks)."""
    from tanuki.fileio import load_pt, safe_torch_loads

    mp = f"mp_rank_{tp_rank:02d}"
    if zero_stage == 0:
        module = load_pt(checkpoint / f"{mp}_model_states.pt", CheckpointError)["module"]
        return {k: v.float() for k, v in module.items()}
    # deepspeed takes seconds to import; stage 0 checkpoints and the rest of this module do not need it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's consolidation reads every *_model_states.pt / *_optim_states.pt of a directory and
    # knows nothing of TP ranks: give it a view holding only this rank's files.
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / "view"
        view.mkdir()
        for f in checkpoint.glob(f"*{mp}_*states.pt"):
            load_pt(f, CheckpointError, mmap=True)  # names a crafted or damaged file before DeepSpeed reads it
            os.symlink(f.resolve(), view / f.name)
        # zero_to_fp32 calls torch.load(weights_only=False) itself: forced to weights_only=True here.
        with contextlib.redirect_stdout(io.StringIO()), safe_torch_loads():  # it prints its progress
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag="view")


def consolidate_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The full fp32 model of a checkpoint, gathered from its shards on CPU (no GPU, no process group).

    ZeRO stages 1-3 keep the fp32 master weights partitioned in the optimizer shards; DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` (the library form of ``zero_to_fp32.py``) joins them.
    Stage 0 stores the whole module in ``mp_rank_XX_model_states.pt``. Under tensor parallelism each TP
    rank's shards are consolidated separately and then merged along the dimensions of the TP plan.
    """
    p = Path(checkpoint_dir)
    state = read_state(p)
    cfg = from_dict(ModelConfig, state["config"]["model"], prefix="model")
    tp = state["config"]["parallel"]["tp"]
    try:
        shards = [_consolidate_tp_rank(p, state["zero_stage"], r) for r in range(tp)]
    except CheckpointError as e:
        raise with_previous(e, p, "export it with checkpoint={prev}") from None
    sd = merge_state_dicts(shards) if tp > 1 else shards[0]
    return cfg, {k: v for k, v in sd.items() if not k.endswith("inv_freq")}


# --------------------------------------------------------------------------------------------------
# Saving and resuming a training run (called by tanuki.train and the stages)
# --------------------------------------------------------------------------------------------------


def _any_rank_failed(failed: bool, device) -> bool:
    """Whether ``failed`` is true on any rank (every rank calls this)."""
    import torch.distributed as dist

    flag = torch.tensor(float(failed), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def save_checkpoint(engine, root: Path, step: int, state: dict, env: DistEnv, keep_last: int) -> Path:
    """Write a complete checkpoint of ``step`` (all ranks call this): DeepSpeed's shards and every rank's
    RNG state into ``step_N.partial``, then, after a barrier, rank 0 writes the state file and renames it.

    A write that fails on any rank (a full disk, a read-only or unwritable directory) fails on every
    rank, rather than leaving the others waiting at the barrier: :class:`~tanuki.fileio.WriteError`
    naming the checkpoint, the cause and the previous complete checkpoint. The unfinished
    ``step_N.partial`` is never read (and removed by the next save)."""
    import errno
    import shutil

    from tanuki.fileio import WriteError, write_error

    tag = step_tag(step) + PARTIAL_SUFFIX
    error: Exception | None = None
    try:
        if env.is_main:
            begin_checkpoint(root, step)
    except OSError as e:
        error = e
    if not _any_rank_failed(error is not None, engine.device):
        try:
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
            torch.save(rng_state(), root / tag / rng_file(env.rank))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            error = e
    # every rank's shards are on disk before the checkpoint becomes visible
    if not _any_rank_failed(error is not None, engine.device) and env.is_main:
        try:
            commit_checkpoint(root, step, state, keep_last)
        except OSError as e:
            error = e
    if not _any_rank_failed(error is not None, engine.device):
        return root / step_tag(step)
    previous = latest_checkpoint(root)
    keep = (f"; the last complete checkpoint is {previous} (resume=auto continues from it)" if previous
            else "; there is no complete checkpoint yet")
    if error is None:
        raise WriteError(errno.EIO, f"writing the checkpoint {root / tag} failed on another rank (see its log){keep}")
    if not isinstance(error, OSError):
        try:
            full = shutil.disk_usage(root).free == 0
        except OSError:
            full = False
        error = OSError(errno.ENOSPC if full else errno.EIO, str(error).splitlines()[0] if str(error) else type(error).__name__)
    raise WriteError(error.errno, str(write_error(f"the checkpoint {root / tag}", error)) + keep) from None


def find_resume_checkpoint(resume: str, root: Path) -> Path | None:
    """The checkpoint to continue from for ``resume`` = auto | never | a path."""
    if resume == "never":
        if latest_checkpoint(root) is not None:
            raise ConfigError("resume", f"resume=never but {root} already holds checkpoints; use a new run.dir")
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    try:
        return resolve_checkpoint(resume)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConfigError("resume", str(e)) from None


def check_resumable(checkpoint: Path, config: dict, resume_keys: tuple[str, ...], env: DistEnv,
                    parallel: ParallelConfig) -> dict:
    """The checkpoint's state, after checking it was written by a compatible run (before loading).

    A checkpoint written on another shape (TP size, number of ranks) is accepted when
    :mod:`tanuki.parallel.reshard` can reshard it on load; otherwise a ConfigError names the key. Every
    ``.pt`` file of it is checked to load safely (:func:`check_checkpoint_files`)."""
    state = read_state(checkpoint)
    check_compatible(state["config"], config, checkpoint, resume_keys)
    try:
        check_checkpoint_files(checkpoint)
    except CheckpointError as e:
        raise with_previous(e, checkpoint, "resume from it with resume={prev}") from None
    check_reshardable(checkpoint, state, tp=parallel.tp, world_size=env.world_size)
    return state


@dataclass(frozen=True)
class ResumePlan:
    """Where a run continues from, checked once before anything is built."""

    checkpoint: Path
    #: its tanuki state (step, loader position, config, shape)
    state: dict
    #: written on another TP/DP shape: the engine must load DeepSpeed's universal form of it
    universal: bool
    #: newer checkpoint directories passed over as incomplete (:func:`skipped_newer`), for the log
    note: str | None = None


def plan_resume(resume: str, run_dir: Path, config: dict, resume_keys: tuple[str, ...], env: DistEnv,
                parallel: ParallelConfig) -> ResumePlan | None:
    """The checkpoint to resume from (``resume`` = auto | never | a path) after checking it fits this
    run's config and shape; None to start fresh."""
    checkpoint = find_resume_checkpoint(resume, run_dir / "checkpoints")
    if checkpoint is None:
        return None
    state = check_resumable(checkpoint, config, resume_keys, env, parallel)
    return ResumePlan(checkpoint, state, needs_reshard(state, tp=parallel.tp, world_size=env.world_size),
                      note=skipped_newer(checkpoint))
