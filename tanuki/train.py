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
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch import nn

from tanuki.checkpoint import (
    CheckpointError,
    ResumePlan,
    check_checkpoint_files,
    latest_checkpoint,
    load_rng_state,
    rng_file,
    save_checkpoint,
    set_rng_state,
)
from tanuki.config import StageConfig
from tanuki.evaluate import evaluate_checkpoint
from tanuki.fileio import safe_torch_loads
from tanuki.metrics import MetricsLogger, format_duration, read_metrics
from tanuki.optim import Schedule, lr_at
from tanuki.parallel.env import DistEnv, all_reduce, barrier
from tanuki.parallel.reshard import ensure_universal, repair_optimizer_after_load, topology

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
    #: called by rank 0 with the final checkpoint directory after training (e.g. Hugging Face export)
    on_finish: Callable[[Path], None] | None = None
    #: called with the 0-based index of every optimizer step before its first micro-batch (LISA's
    #: layer sampling counts periods in optimizer steps)
    on_step_start: Callable[[int], None] | None = None
    #: report exp(validation loss) as perplexity (the loss is a per-token cross entropy)
    perplexity: bool = True


@dataclass
class TrainResult:
    step: int
    skipped_steps: int
    last_checkpoint: Path | None
    #: ``{"step": .., "loss": ..}`` of every logged interval, as written to metrics.jsonl
    history: list[dict] = field(default_factory=list)
    stopped_by_signal: bool = False


class _StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption) and a first SIGINT
    (Ctrl-C): finish the step, write a checkpoint, exit. The flag is all-reduced so that every rank
    stops at the same step. A second SIGINT aborts at once (``KeyboardInterrupt``, no checkpoint)."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self._announce = announce
        self._interrupts = 0
        self._previous = {}
        for sig, handler in ((signal.SIGTERM, self._handle), (signal.SIGUSR1, self._handle),
                             (signal.SIGINT, self._interrupt)):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def _interrupt(self, signum, frame):
        self._interrupts += 1
        if self._interrupts > 1:
            raise KeyboardInterrupt
        self.requested = True
        if self._announce:
            # os.write, not print: a handler that prints while the loop prints would re-enter the buffer.
            os.write(2, b"interrupted (Ctrl-C): finishing this step, writing a checkpoint and exiting; "
                        b"press Ctrl-C again to abort at once without one\n")

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return psutil.Process().memory_info().rss / GIB


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Interval:
    """The statistics of the optimizer steps since the last log line."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, step_sums: dict[str, torch.Tensor], gas: int, tokens: int, skipped: bool) -> None:
        """One optimizer step: its micro-batch sums of every stat (a skipped step's stats are dropped)."""
        if not skipped:
            for k, v in step_sums.items():
                self.sums[k] = self.sums.get(k, 0.0) + v / gas
            self.steps += 1
        self.tokens += tokens

    def record(self, device: torch.device, world_size: int) -> tuple[dict[str, float], float]:
        """The mean of every stat over the interval's applied steps and all ranks, and tokens/s."""
        keys = sorted(self.sums)
        packed = torch.stack([torch.as_tensor(self.sums[k], device=device).float() for k in keys]) if keys \
            else torch.zeros(0, device=device)
        packed = all_reduce(packed.double()) / world_size
        means = {k: (v / self.steps if self.steps else float("nan")) for k, v in zip(keys, packed.tolist())}
        return means, self.tokens / max(time.perf_counter() - self.t0, 1e-9)


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
    all_reduce(packed)
    n = packed[-1].clamp(min=1)
    out = {f"val_{k}": (packed[i] / n).item() for i, k in enumerate(keys)}
    if stage.perplexity:
        out["val_ppl"] = math.exp(min(out["val_loss"], 80.0))
    return out


def load_resume(plan: ResumePlan, stage: Stage, env: DistEnv, run_dir: Path, *, engine, optimizer,
                logger: MetricsLogger | None) -> str:
    """Load the checkpoint of ``plan`` into the engine, the loader and the RNGs; replay the metrics W&B
    may have lost to a kill. Returns a description for the log."""
    load_from = plan.checkpoint
    if plan.universal:
        # Written on another TP/DP shape: load DeepSpeed's universal form of it (made once, by rank 0).
        load_from = ensure_universal(plan.checkpoint, env.is_main, engine.device)
        check_checkpoint_files(load_from, recursive=True)  # DeepSpeed reads these with torch.load itself
    # The engine's checkpoint engine reads with weights_only=True (tanuki.parallel.zero); the context
    # also covers DeepSpeed's direct torch.load calls (the universal checkpoint readers).
    with safe_torch_loads():
        load_path, _ = engine.load_checkpoint(
            str(load_from.parent), tag=load_from.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if load_path is None:
        raise CheckpointError(f"{plan.checkpoint}: DeepSpeed found no model states to load")
    if plan.universal:
        repair_optimizer_after_load(optimizer, load_from)
    state = plan.state
    stage.train_loader.load_state_dict(state["loader"])
    rng_path = plan.checkpoint / rng_file(env.rank)
    if state["world_size"] == env.world_size and rng_path.is_file():
        set_rng_state(load_rng_state(rng_path))
    if logger is not None and (run_dir / "metrics.jsonl").is_file():
        logger.replay([r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= state["step"]])
    tp, world = topology(state)
    resharded = f", resharded from tp={tp} on {world} ranks" if plan.universal else ""
    return (f"resumed from {plan.checkpoint} at step {state['step']} "
            f"({stage.train_loader.state_dict()['consumed_samples']:,} samples consumed{resharded})"
            + (f"; note: {plan.note}" if plan.note else ""))


def train(
    stage: Stage,
    cfg: StageConfig,
    env: DistEnv,
    run_dir: Path,
    *,
    engine,
    optimizer,
    logger: MetricsLogger | None,
    resume: ResumePlan | None = None,
    print_fn: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``engine`` to ``cfg.train.total_steps()``, continuing from ``resume``; see the module docstring.

    ``logger`` is given on rank 0 only. Returns where the run ended.
    """
    tc = cfg.train
    total_steps = tc.total_steps()
    schedule = Schedule(lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps, max_steps=total_steps,
                        kind=tc.schedule, decay_fraction=tc.decay_fraction, decay_shape=tc.decay_shape)
    gas = engine.gradient_accumulation_steps()
    ckpt_root = run_dir / "checkpoints"
    device = engine.device

    # -- resume -----------------------------------------------------------------------------------
    step, skipped_total = 0, 0
    if resume is not None:
        print_fn(load_resume(resume, stage, env, run_dir, engine=engine, optimizer=optimizer, logger=logger))
        step, skipped_total = resume.state["step"], resume.state["skipped_steps"]
    if step >= total_steps:
        print_fn(f"nothing to do: the checkpoint is at step {step} and train.max_steps is {total_steps}")

    def state_dict() -> dict:
        return {"stage": stage.name, "step": step, "skipped_steps": skipped_total,
                "loader": stage.train_loader.state_dict(), "world_size": env.world_size,
                "zero_stage": cfg.parallel.zero_stage, "config": stage.config, "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    # -- train ------------------------------------------------------------------------------------
    stop = _StopRequest(announce=env.is_main)
    batches = iter(stage.train_loader)
    last_ckpt = latest_checkpoint(ckpt_root)
    history: list[dict] = []
    consecutive_skips = 0
    interval = Interval()
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
            for _ in range(gas):
                out = stage.step_fn(engine, _to(next(batches), device))
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
            interval.add(sums, gas, stage.tokens_per_step, skipped)

            # -- log ----------------------------------------------------------------------------
            if step % cfg.logging.every == 0 or step == total_steps:
                means, tokens_per_s = interval.record(device, env.world_size)
                tflops = stage.flops_per_token * tokens_per_s / env.world_size / 1e12
                consumed = stage.train_loader.state_dict()["consumed_samples"]
                grad_norm = engine.get_global_grad_norm()
                record = {"step": step, "tokens": consumed * stage.tokens_per_step // tc.global_batch_size, **means,
                          "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                          "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / cfg.logging.peak_tflops,
                          "mem_gib": _memory_gib(device), "skipped": skipped_total,
                          "elapsed_s": time.perf_counter() - t_start}
                eta = (time.perf_counter() - t_start) / max(step - start_step, 1) * (total_steps - step)
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
                interval = Interval()

            # -- validate -----------------------------------------------------------------------
            if stage.valid_batches is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == total_steps):
                val = evaluate(engine, stage)
                record = {"step": step, "tokens": history[-1]["tokens"] if history else 0, **val}
                if logger is not None:
                    extra = " | ".join(f"{k[4:]} {v:.4f}" for k, v in val.items() if k not in ("val_loss", "val_ppl"))
                    logger.log(record, f"step {step}/{total_steps} | validation loss {val['val_loss']:.4f}"
                               + (f" | perplexity {val['val_ppl']:.2f}" if "val_ppl" in val else "")
                               + (f" | {extra}" if extra else ""))
                history.append(record)

            # -- checkpoint ---------------------------------------------------------------------
            stopping = bool(all_reduce(torch.tensor(float(stop.requested), device=device), op=dist.ReduceOp.MAX).item())
            if step % cfg.checkpoint.every == 0 or step == total_steps or stopping or cfg.eval.due(step, total_steps):
                last_ckpt = save_checkpoint(engine, ckpt_root, step, state_dict(), env, cfg.checkpoint.keep_last)
                print_fn(f"step {step}/{total_steps} | checkpoint {last_ckpt}")
            if cfg.eval.due(step, total_steps):
                # Rank 0 benchmarks the saved checkpoint in no collective; the others wait at the barrier.
                if env.is_main:
                    evaluate_checkpoint(last_ckpt, run_dir, cfg.eval, print_fn, logger=logger)
                barrier()
            if stopping:
                print_fn(f"step {step}/{total_steps} | stop requested by a signal: checkpoint written, exiting "
                         "(resume=auto continues)")
                return TrainResult(step, skipped_total, last_ckpt, history, stopped_by_signal=True)
    finally:
        stop.restore()

    if last_ckpt is not None and stage.on_finish is not None and env.is_main:
        stage.on_finish(last_ckpt)
    barrier()
    return TrainResult(step, skipped_total, last_ckpt, history)


def train_and_close(stage: Stage, cfg: StageConfig, env: DistEnv, run_dir: Path, *, engine, optimizer,
                    logger: MetricsLogger | None, resume: ResumePlan | None = None,
                    print_fn: Callable[[str], None] = print) -> TrainResult:
    """:func:`train`, then close the logger (W&B flushes) and wait for every rank."""
    try:
        result = train(stage, cfg, env, run_dir, engine=engine, optimizer=optimizer, logger=logger, resume=resume,
                       print_fn=print_fn)
    finally:
        if logger is not None:
            logger.close()
    barrier()
    return result
