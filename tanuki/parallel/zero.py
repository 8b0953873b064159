"""The DeepSpeed side of a run: the ZeRO config, the optimizer it wraps, and the engine.

tanuki builds its own model and AdamW parameter groups and hands both to ``deepspeed.initialize``;
DeepSpeed then owns gradient accumulation, the data-parallel gradient reduction, ZeRO partitioning of
optimizer states / gradients / parameters (stage 1 / 2 / 3), clipping and mixed precision. The learning
rate is set by the training loop from :func:`tanuki.optim.lr_at` before each optimizer step, so the
schedule is a pure function of the step count and needs no scheduler state in checkpoints.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

from tanuki.config import ConfigError, ParallelConfig, TrainConfig
from tanuki.optim import build_optimizer


def grad_accumulation_steps(train: TrainConfig, dp_size: int) -> int:
    """``global_batch_size / (micro_batch_size x dp_size)``; a remainder is a config error."""
    per_step = train.micro_batch_size * dp_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            f"{train.global_batch_size} is not divisible by train.micro_batch_size x data-parallel size "
            f"({train.micro_batch_size} x {dp_size} = {per_step})",
        )
    return train.global_batch_size // per_step


def deepspeed_config(train: TrainConfig, parallel: ParallelConfig, *, dp_size: int, bf16: bool,
                     load_universal: bool = False) -> dict:
    """The DeepSpeed config dict of a run (batch geometry, ZeRO stage, clipping, precision).

    ``load_universal``: the run resumes from a universal checkpoint (a checkpoint written on another
    TP/DP shape, converted by :mod:`tanuki.parallel.reshard`)."""
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8)
    if parallel.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e8,
            stage3_param_persistence_threshold=1e5,
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            # tanuki consolidates fp32 weights from the shards itself (tanuki.checkpoint); gathering
            # 16-bit weights into every save would only cost time and memory.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation_steps(train, dp_size),
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # the client optimizer is torch's AdamW (with the skip guard below), which ZeRO handles fine
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # tanuki prints its own progress line
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips an update whose gradients hold a NaN or Inf on any rank.

    DeepSpeed's ZeRO-1/2 optimizers skip such steps, but ZeRO-3 and stage 0 only do so in fp16, and a
    single non-finite gradient would poison every weight through Adam's moments. The check runs on the
    gradients this rank's optimizer holds (its ZeRO partition) and is all-reduced, so all ranks skip
    together. :attr:`skipped` tells the loop what the last ``step`` did.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), device=device, dtype=torch.float32)
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.skipped = bool(bad.item())
        if self.skipped:
            return None
        return super().step(closure)


class _KnownNoise(logging.Filter):
    # GuardedAdamW is torch's AdamW; DeepSpeed warns about any client optimizer it does not know.
    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger  # lazy, as in build_engine

    if not any(isinstance(f, _KnownNoise) for f in logger.filters):
        logger.addFilter(_KnownNoise())
    # ZeRO calls the deprecated torch.distributed collective names on every step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning)


def safe_checkpoint_engine(engine) -> None:
    """Give ``engine`` a checkpoint engine whose ``load`` reads with ``weights_only=True`` (allowing
    only :func:`tanuki.fileio.torch_allowlist`) instead of DeepSpeed's ``weights_only=False``
    (``torch_checkpoint_engine.py``), so that resuming from a crafted checkpoint cannot run code; its
    errors name the file. Saving is DeepSpeed's, unchanged."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from tanuki.checkpoint import CheckpointError
    from tanuki.fileio import load_pt

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_pt(path, CheckpointError, map_location=map_location)

    if engine.checkpoint_engine is None:
        return  # a frozen ZeRO-3 engine (no optimizer): DeepSpeed gives it no checkpoint engine to load with
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__} "
                           "(tanuki's DeepSpeed config selects the torch one)")
    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)


def build_engine(model: torch.nn.Module, train: TrainConfig, parallel: ParallelConfig, *, dp_size: int, bf16: bool,
                 mpu=None, load_universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine; returns ``(engine, optimizer)`` (the client AdamW, whose
    ``param_groups`` the loop sets the learning rate on and whose ``skipped`` flag it reads).

    ``mpu`` (a :class:`~tanuki.parallel.groups.ProcessGroups`) tells DeepSpeed the tensor- and
    data-parallel groups under TP: ZeRO then partitions over the DP group only. ``load_universal``: see
    :func:`deepspeed_config`."""
    # deepspeed stays lazy: it is slow to import, and grad_accumulation_steps / deepspeed_config are
    # used while checking a config, without it
    import deepspeed

    _quiet_deepspeed()
    optimizer = build_optimizer(
        model,
        train.lr,
        train.weight_decay,
        tuple(train.betas),
        train.eps,
        decay_embeddings=train.decay_embeddings,
        decay_norms=train.decay_norms,
        optimizer_class=GuardedAdamW,
    )
    config = deepspeed_config(train, parallel, dp_size=dp_size, bf16=bf16, load_universal=load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu,
                                           dist_init_required=False)
    safe_checkpoint_engine(engine)
    return engine, optimizer
