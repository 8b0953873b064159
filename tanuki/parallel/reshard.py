"""Resume a checkpoint on another topology ("reshard on load"): another TP size and/or DP size.

A ZeRO checkpoint holds each rank's partition of the fp32 master weights and the Adam moments
(``*_optim_states.pt``), cut by the TP and DP sizes that wrote it. To continue on another shape we use
DeepSpeed's *universal checkpoint*:

1. ``deepspeed.checkpoint.ds_to_universal`` joins the partitions of every parameter into one folder
   per parameter, ``universal/zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``, holding the full
   (TP-merged) tensors. How the TP slices join comes from the ``universal_checkpoint_info`` that
   DeepSpeed saved with the checkpoint (set on the model by
   :func:`tanuki.parallel.tensor_parallel.universal_checkpoint_info`: row-parallel weights along dim 1,
   replicated norm gains from TP rank 0, everything else along dim 0).
2. An engine built with ``"checkpoint": {"load_universal": true}`` cuts those tensors for its own TP
   rank (along the recorded dim) and its own ZeRO partition; weights, moments and the step counter
   come back exactly, so the resumed run continues the original one (up to fp32 reduction order).

The conversion runs once per checkpoint, on rank 0, into ``<checkpoint>/universal`` (written under a
temporary name and renamed, so a crash leaves no half-written cache; it is pruned with the checkpoint).

Supported: ZeRO stages 1-3 with any change of DP size, and any change of TP size for stages 1-2 and for
ZeRO-3 runs that continue with tp=1 (the ZeRO stage itself must stay: it is a resume key). Stage 0
needs no conversion for a new DP size (every rank holds everything). Refused with a
:class:`~tanuki.config.ConfigError` naming ``parallel.tp``, before anything is built: stage 0 across TP
sizes (no ZeRO shards, one torch optimizer state per TP rank); ZeRO-3 continuing with tp>1 on a new
shape (DeepSpeed's ZeRO-3 universal loader cuts TP shards only for its own AutoTP layers, not for
tanuki's); and a TP change involving tp>1 for a checkpoint saved without the join rules.

Two slips of DeepSpeed's ZeRO-3 universal loader are repaired after loading
(:func:`repair_optimizer_after_load`); without them the resumed run drifts from the original at the
first update.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from tanuki.config import ConfigError

#: the converted checkpoint, inside the checkpoint directory it was made from
UNIVERSAL_DIR = "universal"
_WORK_PREFIX = ".universal."


def topology(state: dict) -> tuple[int, int]:
    """``(tp, world_size)`` of the run that wrote a checkpoint (from its ``tanuki_state.json``)."""
    return int(state["config"].get("parallel", {}).get("tp", 1)), int(state["world_size"])


def needs_reshard(state: dict, *, tp: int, world_size: int) -> bool:
    """True when a ZeRO checkpoint must go through the universal format to be loaded on this shape.

    Stage 0 keeps the whole model and optimizer on every DP rank, so a new DP size loads it as is."""
    return state["zero_stage"] > 0 and topology(state) != (tp, world_size)


def _model_states_file(checkpoint: Path, zero_stage: int) -> Path:
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    return checkpoint / name


def _has_universal_info(checkpoint: Path, zero_stage: int) -> bool:
    # deepspeed stays lazy: it is slow to import, and tanuki.checkpoint / tanuki.train import this module
    # (needs_reshard, check_reshardable) also where no DeepSpeed engine is built
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    path = _model_states_file(checkpoint, zero_stage)
    if not path.is_file():
        return False
    from tanuki.checkpoint import CheckpointError  # tanuki.checkpoint imports this module
    from tanuki.fileio import load_pt

    # mmap: only the small metadata is read, not the weights the file also holds.
    sd = load_pt(path, CheckpointError, mmap=True)
    return bool(sd.get(UNIVERSAL_CHECKPOINT_INFO))


def check_reshardable(checkpoint: Path, state: dict, *, tp: int, world_size: int) -> None:
    """Raise :class:`ConfigError` (naming the key) if this checkpoint cannot be resumed with ``tp`` on
    ``world_size`` ranks; return if it can, as is or through :func:`ensure_universal`."""
    src_tp, src_world = topology(state)
    zero_stage = state["zero_stage"]
    if (src_tp, src_world) == (tp, world_size):
        return
    where = f"the checkpoint {checkpoint} was written with tp={src_tp} on {src_world} ranks (ZeRO-{zero_stage})"
    if zero_stage == 0:
        if src_tp != tp:
            raise ConfigError(
                "parallel.tp",
                f"{where}; this run has tp={tp}. ZeRO-0 checkpoints keep one optimizer state per TP rank and "
                f"cannot be resharded: resume with parallel.tp={src_tp}, or use ZeRO stage 1-3",
            )
        return  # stage 0: every DP rank holds everything, a new DP size loads it unchanged
    if zero_stage == 3 and tp > 1:
        raise ConfigError(
            "parallel.tp",
            f"{where}; this run has tp={tp} on {world_size} ranks. A ZeRO-3 checkpoint can be resharded onto "
            f"tp=1 only (DeepSpeed's ZeRO-3 universal loader does not cut tanuki's TP shards): resume with "
            f"parallel.tp=1, or with tp={src_tp} on {src_world} ranks",
        )
    # Without the join rules DeepSpeed would concatenate every TP slice along dim 0 (and cut it so
    # for a new TP size): row-parallel weights and replicated norms would come back scrambled.
    if max(src_tp, tp) > 1 and not _has_universal_info(checkpoint, zero_stage):
        raise ConfigError(
            "parallel.tp",
            f"{where}; this run has tp={tp}. The checkpoint carries no universal_checkpoint_info (written "
            f"before tanuki recorded how its TP shards join), so it can be resharded only between tp=1 "
            f"shapes: resume with tp={src_tp} on {src_world} ranks" + (", or with tp=1" if src_tp == 1 else ""),
        )


def universal_path(checkpoint: Path) -> Path:
    return Path(checkpoint) / UNIVERSAL_DIR


def convert_to_universal(checkpoint: Path) -> Path:
    """(One process) write ``<checkpoint>/universal`` with DeepSpeed's ``ds_to_universal``; return it.

    Idempotent: a finished conversion is reused. The work happens in a temporary directory inside the
    checkpoint, renamed into place when complete."""
    from deepspeed.checkpoint import ds_to_universal  # lazy, as in _has_universal_info

    from tanuki.fileio import safe_torch_loads

    checkpoint = Path(checkpoint)
    target = universal_path(checkpoint)
    if (target / "zero" / "optimizer_state.pt").is_file():
        return target
    for stale in checkpoint.glob(_WORK_PREFIX + "*"):  # an interrupted conversion
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=checkpoint))
    try:
        # DeepSpeed walks its input folder recursively: give it a view holding only DeepSpeed's files
        # (not the universal cache, RNG states or tanuki_state.json).
        source = work / "source"
        source.mkdir()
        for f in checkpoint.glob("*_states.pt"):
            os.symlink(f.resolve(), source / f.name)
        out = work / UNIVERSAL_DIR
        args = argparse.Namespace(
            input_folder=str(source),
            output_folder=str(out),
            num_extract_workers=1,  # no process pool inside a training rank
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,  # every TP pattern must match a parameter
            inject_missing_state=True,  # tp=1 checkpoints need no join rules (tp>1 ones are checked first)
        )
        log = io.StringIO()
        try:
            # ds_to_universal calls torch.load(weights_only=False) itself: forced to weights_only=True
            # (the files were checked one by one when the resume was planned).
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), safe_torch_loads():
                ds_to_universal.main(args)
        except Exception as e:
            raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed: {e}\n{log.getvalue()[-4000:]}") from e
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def ensure_universal(checkpoint: Path, is_main: bool, device: torch.device | str = "cpu") -> Path:
    """Every rank calls this: rank 0 converts (if not done before), the others wait; all return the path.
    ``device`` is where the process group communicates (cuda under NCCL)."""
    error = None
    if is_main:
        try:
            convert_to_universal(checkpoint)
        except Exception as e:  # noqa: BLE001 (any failure: tell the other ranks, not leave them waiting)
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        failed = torch.tensor(float(error is not None), device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise RuntimeError(f"rank 0 failed to convert {checkpoint} to a universal checkpoint (see its log)")
    if error is not None:
        raise error
    return universal_path(checkpoint)


def repair_optimizer_after_load(optimizer: torch.optim.Optimizer, universal: Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (``stage3.py``,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``, DeepSpeed 0.19) on ``optimizer`` (the torch
    optimizer ZeRO wraps); harmless after the ZeRO-1/2 loader, which does neither.

    * It gives every parameter group the hyperparameters of the *first* saved group, which would put
      weight decay on tanuki's no-decay group (norm gains, ...). The converted checkpoint keeps all
      groups, in order, in ``zero/optimizer_state.pt``: each group gets its own back.
    * It stores *one* ``step`` tensor object in the state of every group. Torch's Adam increments
      ``step`` in place, once per group, so the shared counter would run ahead by the number of groups
      each step and the bias correction of every group but the first would be wrong. Each group gets
      its own copy.
    """
    from tanuki.checkpoint import CheckpointError  # tanuki.checkpoint imports this module
    from tanuki.fileio import load_pt

    saved = load_pt(Path(universal) / "zero" / "optimizer_state.pt", CheckpointError, mmap=True)["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise RuntimeError(f"{universal}: {len(saved)} saved parameter groups, the optimizer has "
                           f"{len(optimizer.param_groups)}")
    for group, hyper in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
