"""The training loop shared by pretraining, SFT and DPO.

A stage (``tanuki/pretrain.py``, ...) builds the model and the datasets and supplies a *step function*
``step_fn(model, batch) -> StepOutput``: the forward pass and the loss of one micro-batch. Everything
else is here and reads top to bottom in :func:`train`:

    resume? -> for each optimizer step:
        set the learning rate -> gradient-accumulation micro-steps (batch, forward, loss, backward)
        -> optimizer step (DeepSpeed: reduce, clip, update; skipped if a gradient is not finite)
        -> log -> validate -> checkpoint
    -> final validation, checkpoint, optional Hugging Face export

Resume is exact: the data position is one number (consumed samples), the learning rate a function of
the step, and model, optimizer and every rank's RNG state come back from the checkpoint, so on CPU an
interrupted and resumed run reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tanuki.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    check_compatible,
    commit_checkpoint,
    latest_checkpoint,
    read_state,
    resolve_checkpoint,
    rng_file,
    rng_state,
    set_rng_state,
    step_tag,
)
from tanuki.config import ConfigError, ParallelConfig, TrainConfig
from tanuki.metrics import MetricsLogger, format_duration, read_metrics
from tanuki.optim import Schedule, lr_at
from tanuki.parallel.env import DistEnv
from tanuki.parallel.reshard import (
    check_reshardable,
    ensure_universal,
    needs_reshard,
    repair_optimizer_after_load,
    topology,
)

GIB = 1024**3


@dataclass
class StepOutput:
    """What a step function returns for one micro-batch."""

    #: the scalar to backpropagate (DeepSpeed divides it by the accumulation steps)
    loss: torch.Tensor
    #: detached scalars to report (averaged over micro-batches and ranks), e.g. {"loss": ce}
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


StepFn = Callable[[nn.Module, dict[str, torch.Tensor]], StepOutput]


@dataclass
class Stage:
    """What a stage hands to :func:`train`."""

    name: str
    model: nn.Module
    step_fn: StepFn
    #: yields this rank's micro-batches; has ``state_dict``/``load_state_dict`` (consumed samples)
    train_loader: Any
    #: builds a fresh iterator over this rank's validation micro-batches (None: no validation)
    valid_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None
    #: tokens one optimizer step processes (all ranks), and model FLOPs per token (for MFU)
    tokens_per_step: int
    flops_per_token: float
    #: the run's config as plain data: stored in checkpoints and logged to W&B
    config: dict
    #: config keys that must match a checkpoint to resume from it (sections or dotted keys)
    resume_keys: tuple[str, ...] = ("model",)
    #: called by rank 0 with the final checkpoint directory after training (e.g. Hugging Face export)
    on_finish: Callable[[Path], None] | None = None
    #: loss tokens in the next ``n`` micro-steps of all ranks (the loader's position is the start of an
    #: optimizer step). When given, each micro-batch carries ``loss_normalizer`` so that the summed loss
    #: of every token of the global batch is divided by the same count (SFT with uneven rows).
    loss_tokens: Callable[[int], int] | None = None
    #: called with the 0-based index of every optimizer step before its first micro-batch (LISA's
    #: layer sampling counts periods in optimizer steps)
    on_step_start: Callable[[int], None] | None = None
    #: report exp(validation loss) as perplexity (the loss is a per-token cross entropy)
    perplexity: bool = True


@dataclass
class RunSettings:
    """The sub-configs the loop reads (every stage config has these sections)."""

    train: TrainConfig
    parallel: ParallelConfig
    checkpoint_every: int
    keep_last: int
    log_every: int
    peak_tflops: float
    resume: str

    @classmethod
    def from_config(cls, cfg) -> "RunSettings":
        """From a stage config with ``train``, ``parallel``, ``checkpoint``, ``logging`` and ``resume``."""
        return cls(train=cfg.train, parallel=cfg.parallel, checkpoint_every=cfg.checkpoint.every,
                   keep_last=cfg.checkpoint.keep_last, log_every=cfg.logging.every,
                   peak_tflops=cfg.logging.peak_tflops, resume=cfg.resume)


@dataclass
class TrainResult:
    step: int
    skipped_steps: int
    last_checkpoint: Path | None
    #: ``{"step": .., "loss": ..}`` of every logged interval, as written to metrics.jsonl
    history: list[dict] = field(default_factory=list)
    stopped_by_signal: bool = False


class _StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption): finish the step,
    write a checkpoint, exit. The flag is all-reduced so that every rank stops at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    import psutil

    return psutil.Process().memory_info().rss / GIB


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def save_checkpoint(engine, root: Path, step: int, state: dict, env: DistEnv, keep_last: int) -> Path:
    """Write a complete checkpoint of ``step`` (all ranks call this); see tanuki.checkpoint for the layout."""
    if env.is_main:
        begin_checkpoint(root, step)
    _barrier()
    tag = step_tag(step) + ".partial"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), root / tag / rng_file(env.rank))
    _barrier()  # every rank's shards are on disk before the checkpoint becomes visible
    path = root / step_tag(step)
    if env.is_main:
        commit_checkpoint(root, step, state, keep_last)
    _barrier()
    return path


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
    :mod:`tanuki.parallel.reshard` can reshard it on load; otherwise a ConfigError names the key."""
    state = read_state(checkpoint)
    check_compatible(state["config"], config, checkpoint, resume_keys)
    check_reshardable(checkpoint, state, tp=parallel.tp, world_size=env.world_size)
    return state


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def evaluate(engine, stage: Stage) -> dict[str, float]:
    """Every stat of the step function averaged over the same validation micro-batches each time and
    over the ranks, as ``val_<name>``; with ``stage.perplexity``, also ``val_ppl`` = exp(val_loss)."""
    engine.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad():
        for batch in stage.valid_batches():
            out = stage.step_fn(engine, _to(batch, engine.device))
            stats = dict(out.stats) if out.stats else {}
            stats.setdefault("loss", out.loss.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.double()
            count += 1
    engine.train()
    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], device=engine.device).double() for k in keys] +
                         [torch.tensor(float(count), device=engine.device, dtype=torch.float64)])
    _all_reduce(packed)
    n = packed[-1].clamp(min=1)
    out = {f"val_{k}": (packed[i] / n).item() for i, k in enumerate(keys)}
    if stage.perplexity:
        out["val_ppl"] = math.exp(min(out["val_loss"], 80.0))
    return out


def train(
    stage: Stage,
    run: RunSettings,
    env: DistEnv,
    run_dir: Path,
    *,
    engine,
    optimizer,
    logger: MetricsLogger | None,
    print_fn: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``engine`` (wrapping ``stage.model``) to ``run.train.total_steps()``; see the module docstring.

    ``logger`` is given on rank 0 only. Returns where the run ended.
    """
    tc = run.train
    total_steps = tc.total_steps()
    schedule = Schedule(
        lr=tc.lr,
        min_lr=tc.min_lr,
        warmup_steps=tc.warmup_steps,
        max_steps=total_steps,
        kind=tc.schedule,
        decay_fraction=tc.decay_fraction,
        decay_shape=tc.decay_shape,
    )
    gas = engine.gradient_accumulation_steps()
    ckpt_root = run_dir / "checkpoints"

    # -- resume -----------------------------------------------------------------------------------
    step, skipped_total = 0, 0
    resume_from = find_resume_checkpoint(run.resume, ckpt_root)
    if resume_from is not None:
        state = check_resumable(resume_from, stage.config, stage.resume_keys, env, run.parallel)
        load_from = resume_from
        if needs_reshard(state, tp=run.parallel.tp, world_size=env.world_size):
            # Written on another TP/DP shape: load DeepSpeed's universal form of it (made once, by rank 0).
            if not engine.load_universal_checkpoint():
                raise ConfigError(
                    "parallel.tp",
                    f"{resume_from} was written with tp={topology(state)[0]} on {topology(state)[1]} ranks; resharding "
                    f"it needs an engine built with load_universal=True (tanuki.parallel.zero.build_engine)",
                )
            load_from = ensure_universal(resume_from, env.is_main, engine.device)
        load_path, _ = engine.load_checkpoint(
            str(load_from.parent), tag=load_from.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"{resume_from}: DeepSpeed found no model states to load")
        if load_from != resume_from:
            repair_optimizer_after_load(optimizer, load_from)
        step, skipped_total = state["step"], state["skipped_steps"]
        stage.train_loader.load_state_dict(state["loader"])
        rng_path = resume_from / rng_file(env.rank)
        if state["world_size"] == env.world_size and rng_path.is_file():
            set_rng_state(torch.load(rng_path, weights_only=False))
        if logger is not None and (run_dir / "metrics.jsonl").is_file():
            logger.replay([r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= step])
        resharded = f", resharded from tp={topology(state)[0]} on {topology(state)[1]} ranks" if load_from != resume_from else ""
        print_fn(f"resumed from {resume_from} at step {step} ({stage.train_loader.state_dict()['consumed_samples']:,} "
                 f"samples consumed{resharded})")
    if step >= total_steps:
        print_fn(f"nothing to do: the checkpoint is at step {step} and train.max_steps is {total_steps}")

    def state_dict() -> dict:
        return {
            "stage": stage.name,
            "step": step,
            "skipped_steps": skipped_total,
            "loader": stage.train_loader.state_dict(),
            "world_size": env.world_size,
            "zero_stage": run.parallel.zero_stage,
            "config": stage.config,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    # -- train ------------------------------------------------------------------------------------
    stop = _StopRequest()
    batches = iter(stage.train_loader)
    device = engine.device
    last_ckpt = latest_checkpoint(ckpt_root)
    history: list[dict] = []
    consecutive_skips = 0
    interval = {"sum": {}, "steps": 0, "skipped": 0, "t0": time.perf_counter(), "tokens": 0}
    start_step, t_start = step, time.perf_counter()
    engine.train()
    try:
        while step < total_steps:
            if stage.on_step_start is not None:
                stage.on_step_start(step)
            lr = lr_at(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Gradient accumulation: DeepSpeed sums the micro-batch gradients and steps on the last.
            sums: dict[str, torch.Tensor] = {}
            optimizer.skipped = False
            normalizer = None
            if stage.loss_tokens is not None:
                # DeepSpeed divides each micro-batch loss by the accumulation steps and averages the
                # gradients over the data-parallel ranks; undo both so the global token count rules.
                dp = env.world_size // run.parallel.tp
                normalizer = max(stage.loss_tokens(gas), 1) / (gas * dp)
            for _ in range(gas):
                batch = _to(next(batches), device)
                if normalizer is not None:
                    batch["loss_normalizer"] = normalizer
                out = stage.step_fn(engine, batch)
                engine.backward(out.loss)
                engine.step()
                for k, v in out.stats.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
            step += 1

            # Skipped by our guard, or by DeepSpeed's own overflow check (ZeRO-1/2, and ZeRO-3 in some
            # versions), which then never calls the optimizer.
            skipped = optimizer.skipped or not engine.was_step_applied()
            skipped_total += int(skipped)
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            if consecutive_skips >= tc.max_skipped_steps:
                raise FloatingPointError(
                    f"step {step}: {consecutive_skips} consecutive steps had a non-finite loss or gradient and were "
                    f"skipped (train.max_skipped_steps={tc.max_skipped_steps}); the last complete checkpoint is "
                    f"{last_ckpt}. Lower train.lr, raise train.warmup_steps or check the data, then resume."
                )
            if not skipped:
                for k, v in sums.items():
                    interval["sum"][k] = interval["sum"].get(k, 0.0) + v / gas
                interval["steps"] += 1
            interval["skipped"] += int(skipped)
            interval["tokens"] += stage.tokens_per_step

            # -- log ----------------------------------------------------------------------------
            if step % run.log_every == 0 or step == total_steps:
                keys = sorted(interval["sum"])
                packed = torch.stack([torch.as_tensor(interval["sum"][k], device=device).float() for k in keys]) if keys else torch.zeros(0, device=device)
                packed = _all_reduce(packed.double()) / env.world_size
                elapsed = time.perf_counter() - interval["t0"]
                tokens_per_s = interval["tokens"] / max(elapsed, 1e-9)
                tflops = stage.flops_per_token * tokens_per_s / env.world_size / 1e12
                record = {
                    "step": step,
                    "tokens": stage.train_loader.state_dict()["consumed_samples"] * stage.tokens_per_step // tc.global_batch_size,
                }
                n = max(interval["steps"], 1)
                for k, v in zip(keys, packed.tolist()):
                    record[k] = v / n if interval["steps"] else float("nan")
                grad_norm = engine.get_global_grad_norm()
                record.update(
                    lr=lr,
                    grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    tokens_per_s=tokens_per_s,
                    tflops=tflops,
                    mfu=tflops / run.peak_tflops,
                    mem_gib=_memory_gib(device),
                    skipped=skipped_total,
                    elapsed_s=time.perf_counter() - t_start,
                )
                done = step - start_step
                eta = (time.perf_counter() - t_start) / max(done, 1) * (total_steps - step)
                line = (
                    f"step {step}/{total_steps} | loss {record.get('loss', float('nan')):.4f} | lr {lr:.2e} | "
                    f"gnorm {record['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s/dev | "
                    f"MFU {100 * record['mfu']:.1f}% | mem {record['mem_gib']:.1f} GiB"
                    + (f" | skipped {skipped_total}" if skipped_total else "")
                    + f" | ETA {format_duration(eta)}"
                )
                if logger is not None:
                    logger.log(record, line)
                history.append(record)
                interval = {"sum": {}, "steps": 0, "skipped": 0, "t0": time.perf_counter(), "tokens": 0}

            # -- validate -----------------------------------------------------------------------
            if stage.valid_batches is not None and (
                (tc.eval_every and step % tc.eval_every == 0) or step == total_steps
            ):
                val = evaluate(engine, stage)
                record = {"step": step, "tokens": history[-1]["tokens"] if history else 0, **val}
                if logger is not None:
                    extra = " | ".join(f"{k[4:]} {v:.4f}" for k, v in val.items() if k not in ("val_loss", "val_ppl"))
                    logger.log(record, f"step {step}/{total_steps} | validation loss {val['val_loss']:.4f}"
                               + (f" | perplexity {val['val_ppl']:.2f}" if "val_ppl" in val else "")
                               + (f" | {extra}" if extra else ""))
                history.append(record)

            # -- checkpoint ---------------------------------------------------------------------
            flag = _all_reduce(torch.tensor(float(stop.requested), device=device), op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
            if step % run.checkpoint_every == 0 or step == total_steps or stopping:
                last_ckpt = save_checkpoint(engine, ckpt_root, step, state_dict(), env, run.keep_last)
                print_fn(f"step {step}/{total_steps} | checkpoint {last_ckpt}")
            if stopping:
                print_fn(f"step {step}/{total_steps} | stop requested by a signal: checkpoint written, exiting (resume=auto continues)")
                return TrainResult(step, skipped_total, last_ckpt, history, stopped_by_signal=True)
    finally:
        stop.restore()

    if last_ckpt is not None and stage.on_finish is not None and env.is_main:
        stage.on_finish(last_ckpt)
    _barrier()
    return TrainResult(step, skipped_total, last_ckpt, history)


def train_and_close(stage: Stage, run: RunSettings, env: DistEnv, run_dir: Path, *, engine, optimizer,
                    logger: MetricsLogger | None, print_fn: Callable[[str], None] = print) -> TrainResult:
    """:func:`train`, then close the logger (W&B flushes) and wait for every rank."""
    try:
        result = train(stage, run, env, run_dir, engine=engine, optimizer=optimizer, logger=logger, print_fn=print_fn)
    finally:
        if logger is not None:
            logger.close()
    _barrier()
    return result


def write_run_files(config: dict, tokenizer_dir: str | None, run_dir: Path) -> None:
    """(Rank 0) the resolved config and a copy of the tokenizer, so the run dir is self-contained."""
    import shutil
    import tempfile

    from omegaconf import OmegaConf

    from tanuki.hf import copy_tokenizer_files

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    tmp.replace(run_dir / "config.yaml")
    if tokenizer_dir and not (run_dir / "tokenizer").is_dir():
        tmp_tok = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=run_dir))
        try:
            copy_tokenizer_files(tokenizer_dir, tmp_tok)
            tmp_tok.replace(run_dir / "tokenizer")
        except BaseException:
            shutil.rmtree(tmp_tok, ignore_errors=True)
            raise
