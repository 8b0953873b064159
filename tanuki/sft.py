"""Supervised fine-tuning: chat data, loss on assistant turns only, full fine-tuning or LoRA.

The stage reuses the pretraining loop (:func:`tanuki.train.train`), its checkpoints, resume, logging
and export; what differs is the data (:mod:`tanuki.data.sft`: rendered chat templates, offset-based
masks, packing with restarting positions and block-diagonal attention) and the loss normalisation:
every loss token of the global batch weighs the same, however the batch is split into micro-batches
and ranks (the loop passes the global count of loss tokens; see :func:`sft_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from tanuki.config import (
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    to_dict,
)
from tanuki.data.sft import SFTDataConfig
from tanuki.lisa import LisaConfig
from tanuki.lora import LoraConfig
from tanuki.parallel.env import DistEnv

#: settings a resumed SFT run must share with the run that wrote the checkpoint
RESUME_KEYS = ("init", "method", "lora", "lisa", "template", "parallel.tp", "parallel.zero_stage", "train.seq_len")


@dataclass(frozen=True)
class SFTExportConfig:
    """``export``: what to write at the end (always from the final checkpoint)."""

    #: a full Hugging Face model (LoRA: base + merged adapters)
    hf: bool = True
    #: LoRA: also the PEFT adapter directory
    adapter: bool = True
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: default: <run dir>/hf (and <run dir>/adapter)
    dir: Optional[str] = None


@dataclass(frozen=True)
class SFTConfig:
    """``conf/sft.yaml``."""

    #: the Hugging Face Llama directory to fine-tune (a tanuki export or any Llama checkpoint)
    init: str
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    #: chat template: alpaca_ja | llmjp | tulu (written into the exported tokenizer's config)
    template: str = "alpaca_ja"
    method: Literal["full", "lora", "lisa"] = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    #: tokenizer directory; default: the one in ``init``
    tokenizer: Optional[str] = None
    #: kernels of the model: auto (Triton on CUDA) | triton | torch
    kernels: Literal["auto", "triton", "torch"] = "auto"
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: SFTExportConfig = field(default_factory=SFTExportConfig)
    resume: str = "auto"
    seed: int = 1234

    def __post_init__(self) -> None:
        from tanuki.tokenizer.templates import get_template

        get_template(self.template)  # an unknown name fails here, naming the key
        if self.method == "lora" and self.parallel.tp > 1:
            raise ConfigError("method", "LoRA with tensor parallelism (parallel.tp > 1) is not supported; use tp=1")
        if self.method == "lisa" and self.parallel.zero_stage != 0:
            raise ConfigError(
                "parallel.zero_stage",
                f"LISA needs parallel.zero_stage=0, got {self.parallel.zero_stage}: ZeRO flattens the parameters "
                "into partitions when the engine is built, so layers cannot be frozen and their optimizer state "
                "dropped per period (see tanuki/lisa.py)",
            )


@dataclass
class PreparedSFT:
    cfg: SFTConfig
    model: ModelConfig
    tokenizer_dir: str
    grad_accumulation: int


def prepare(cfg: SFTConfig, env: DistEnv) -> PreparedSFT:
    """Checks needing files or the world size (before any process group)."""
    from tanuki.hf import HFFormatError, model_config_from_hf, read_hf_config
    from tanuki.parallel.zero import grad_accumulation_steps

    try:
        model = model_config_from_hf(read_hf_config(cfg.init), source=f"{cfg.init}/config.json")
    except (FileNotFoundError, HFFormatError) as e:
        raise ConfigError("init", str(e)) from None
    model = dataclasses.replace(model, kernels=cfg.kernels)
    if cfg.train.seq_len > model.max_seq_len:
        raise ConfigError("train.seq_len", f"{cfg.train.seq_len} exceeds the context of {cfg.init} ({model.max_seq_len})")
    tok = cfg.tokenizer or cfg.init
    if not (Path(tok) / "tokenizer.json").is_file():
        raise ConfigError("tokenizer", f"no tokenizer.json in {tok} (give tokenizer=<dir>)")
    if not cfg.data.paths:
        raise ConfigError("data.path", "is required: data.path=<file.jsonl>[,...]")
    for p in cfg.data.paths:
        if not Path(p).exists() and not any(c in p for c in "*?["):
            raise ConfigError("data.path", f"no such file: {p}")
    if env.world_size % cfg.parallel.tp:
        raise ConfigError("parallel.tp", f"tp={cfg.parallel.tp} does not divide the {env.world_size} ranks of this job")
    gas = grad_accumulation_steps(cfg.train, env.world_size // cfg.parallel.tp)
    return PreparedSFT(cfg, model, tok, gas)


def sft_step(model, batch: dict[str, torch.Tensor], *, z_loss: float, vocab_limit: int | None, vocab_parallel=None,
             autocast: torch.dtype | None = None, packed: bool = True):
    """One micro-batch: the loss on the labelled (assistant) tokens of packed rows.

    With ``batch["loss_normalizer"]`` (set by the loop from the global count of loss tokens), the
    summed loss is divided by it, so every token of the global batch weighs the same; evaluation
    batches have none and report the per-token mean of the batch. ``autocast``: compute in that dtype
    over fp32 weights (LISA's mixed precision). Unpacked rows (one sample, then padding that carries no
    loss) need no block-diagonal mask: plain causal attention is cheaper and gives the same loss.
    """
    from tanuki.losses import causal_lm_loss
    from tanuki.model import moe_losses
    from tanuki.train import StepOutput

    tokens = batch["tokens"]
    with torch.autocast(tokens.device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(tokens, positions=batch["positions"], segment_ids=batch["segment_ids"] if packed else None)
    out = causal_lm_loss(logits, batch["labels"], z_loss=z_loss, vocab_limit=vocab_limit,
                         normalizer=batch.get("loss_normalizer"), vocab_parallel=vocab_parallel)
    router_loss, router_stats = moe_losses(model)  # (0, {}) for a dense model
    return StepOutput(loss=out.loss + router_loss, stats={"loss": out.ce, **router_stats})


def build_sft_model(cfg: SFTConfig, device: torch.device, groups=None):
    """The model from ``init``, in the fixed order: load -> kernels -> LoRA or TP -> checkpointing."""
    from tanuki.fused import apply_kernels
    from tanuki.hf import import_hf

    model = import_hf(cfg.init, device=device, dtype=torch.float32)
    model = apply_kernels(model, cfg.kernels, device=device)
    if cfg.method == "lora":
        from tanuki.lora import apply_lora

        model = apply_lora(model, cfg.lora, seed=cfg.seed)
    if groups is not None and groups.tp > 1:
        from tanuki.parallel.tensor_parallel import apply_tensor_parallel

        model = apply_tensor_parallel(model, groups, cfg.parallel.sp)
    if cfg.train.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        model.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
    return model


def export_sft(checkpoint: Path, cfg: SFTConfig, out_dir: Path, tokenizer_dir: str) -> list[Path]:
    """The final checkpoint as a Hugging Face model (LoRA merged) and, for LoRA, a PEFT adapter."""
    from tanuki.checkpoint import consolidate_checkpoint
    from tanuki.hf import export_hf
    from tanuki.tokenizer.templates import write_chat_template

    model_cfg, sd = consolidate_checkpoint(checkpoint)
    written = []
    if cfg.method == "lora":
        from tanuki.lora import merge_lora_state_dict, save_peft_adapter

        if cfg.export.adapter:
            adapter_dir = out_dir.parent / "adapter" if cfg.export.dir is None else Path(str(out_dir) + "-adapter")
            written.append(save_peft_adapter(sd, cfg.lora, str(Path(cfg.init).resolve()), adapter_dir, overwrite=True))
        sd = merge_lora_state_dict(sd, cfg.lora)
    if cfg.export.hf:
        out = export_hf(sd, model_cfg, out_dir, dtype=getattr(torch, cfg.export.dtype), tokenizer_dir=tokenizer_dir,
                        overwrite=True)
        write_chat_template(out, cfg.template)
        written.append(out)
    return written


def run(prep: PreparedSFT, env: DistEnv, run_dir: Path, print_fn: Callable[[str], None] = print):
    """Fine-tune inside an initialised process group; returns the TrainResult."""
    from transformers import PreTrainedTokenizerFast

    from tanuki.data.sft import SFTDataLoader, build_sft_datasets
    from tanuki.info import flops_per_token
    from tanuki.lora import count_trainable_parameters
    from tanuki.metrics import MetricsLogger
    from tanuki.parallel.groups import build_process_groups
    from tanuki.parallel.zero import build_engine
    from tanuki.pretrain import precision_is_bf16
    from tanuki.train import RunSettings, Stage, train_and_close, write_run_files

    cfg, tc = prep.cfg, prep.cfg.train
    groups = build_process_groups(cfg.parallel.tp)
    dp_size, dp_rank = groups.dp, groups.dp_rank
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed + dp_rank)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(prep.tokenizer_dir)
    total_steps = tc.total_steps()
    data = build_sft_datasets(cfg.data, tokenizer, cfg.template, tc.seq_len, min_rows=total_steps * tc.global_batch_size)
    loader = SFTDataLoader(data.train, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    valid_batches = None
    if data.valid is not None and tc.eval_iters > 0:
        def valid_batches():
            import itertools

            return itertools.islice(SFTDataLoader(data.valid, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank,
                                                  dp_size=dp_size), tc.eval_iters)

    model = build_sft_model(cfg, device, groups)
    trainable = count_trainable_parameters(model)
    bf16 = precision_is_bf16(tc.precision)
    # LISA keeps fp32 weights (DeepSpeed's bf16 mode flattens them) and computes in bf16 by autocast.
    autocast = torch.bfloat16 if bf16 and cfg.method == "lisa" else None
    engine, optimizer = build_engine(model, tc, cfg.parallel, dp_size=dp_size, bf16=bf16 and autocast is None,
                                     mpu=groups if groups.tp > 1 else None)
    lisa = None
    if cfg.method == "lisa":
        from tanuki.lisa import LisaScheduler

        lisa = LisaScheduler(model.layers, cfg.lisa, optimizer)  # after the optimizer knows every layer

    # The model's architecture goes into every checkpoint, so that export needs nothing but the checkpoint.
    config = {**to_dict(cfg), "model": to_dict(prep.model)}
    logger = None
    if env.is_main:
        write_run_files(config, prep.tokenizer_dir, run_dir)
        logger = MetricsLogger(run_dir, wandb=cfg.logging.wandb, config=config, print_fn=print_fn)
        print_fn(
            f"SFT ({cfg.method}, template {cfg.template}) of {cfg.init}: {trainable:,} trainable parameters"
            + (f" ({cfg.lisa.active_layers} of {len(model.layers)} layers at a time, new draw every "
               f"{cfg.lisa.interval_steps} steps)" if lisa is not None else "")
            + f" on "
            f"{env.world_size} rank(s) = tp {groups.tp} x dp {dp_size}, ZeRO-{cfg.parallel.zero_stage}, "
            f"{'bf16' if bf16 else 'fp32'}; data: {data.train_stats.summary()}; "
            f"{len(data.train):,} rows of {tc.seq_len} ({'packed' if cfg.data.packing else 'one sample per row'}); "
            f"{total_steps} steps; run dir {run_dir}"
        )

    out_dir = Path(cfg.export.dir) if cfg.export.dir else run_dir / "hf"

    def on_finish(checkpoint: Path) -> None:
        if cfg.export.hf or (cfg.method == "lora" and cfg.export.adapter):
            for p in export_sft(checkpoint, cfg, out_dir, str(run_dir / "tokenizer")):
                print_fn(f"exported {p}")

    vocab = len(tokenizer)
    stage = Stage(
        name="sft",
        model=model,
        step_fn=functools.partial(sft_step, z_loss=tc.z_loss, vocab_limit=vocab,
                                  vocab_parallel=getattr(model, "vocab_parallel", None), autocast=autocast,
                                  packed=cfg.data.packing),
        train_loader=loader,
        valid_batches=valid_batches,
        tokens_per_step=tc.global_batch_size * tc.seq_len,
        flops_per_token=flops_per_token(prep.model, tc.seq_len),
        config=config,
        resume_keys=RESUME_KEYS,
        on_finish=on_finish,
        loss_tokens=loader.global_loss_tokens,
        on_step_start=lisa.on_step_start if lisa is not None else None,
    )
    return train_and_close(stage, RunSettings.from_config(cfg), env, run_dir, engine=engine, optimizer=optimizer,
                           logger=logger, print_fn=print_fn)


def main(cfg: SFTConfig, env: DistEnv) -> int:
    """The body of ``launch/sft.py`` after Hydra."""
    from tanuki.parallel.env import init_distributed, resolve_run_dir
    from tanuki.pretrain import stdout_and_log

    prep = prepare(cfg, env)
    init_distributed(env, "nccl" if torch.cuda.is_available() else "gloo")
    run_dir = resolve_run_dir(cfg.run.dir, "sft", env).resolve()
    print_fn = stdout_and_log(run_dir) if env.is_main else (lambda *a, **k: None)
    result = run(prep, env, run_dir, print_fn=print_fn)
    if env.is_main:
        print_fn(f"done: step {result.step}, last checkpoint {result.last_checkpoint}")
    sys.stdout.flush()
    return 0


def evaluate_exact_match(model_dir: str | Path, eval_path: str | Path, *, max_new_tokens: int = 32,
                         limit: int | None = None) -> dict:
    """Greedy answers of a Hugging Face model to held-out prompts (``{"messages", "answer", "task"}``
    records, e.g. the bundled ``sft_eval.jsonl``), scored by exact match.

    The prompt is rendered with the model's own chat template (as a user of the exported model would).
    Returns ``{"correct": n, "total": n, "by_task": {task: [correct, total]}, "predictions": [...]}``.
    """
    from transformers import AutoTokenizer

    from tanuki.data.sft import exact_match, read_eval_prompts
    from tanuki.generate import generate
    from tanuki.hf import import_hf

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = import_hf(model_dir).eval()
    prompts = read_eval_prompts(eval_path)[:limit]
    by_task: dict[str, list[int]] = {}
    predictions = []
    for p in prompts:
        ids = tok.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        out = generate(model, list(ids), max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
        text = tok.decode(out, skip_special_tokens=True)
        ok = exact_match(text, p.answer)
        counts = by_task.setdefault(p.task, [0, 0])
        counts[0] += int(ok)
        counts[1] += 1
        predictions.append({"task": p.task, "answer": p.answer, "prediction": text, "correct": ok})
    correct = sum(c for c, _ in by_task.values())
    return {"correct": correct, "total": len(prompts), "by_task": by_task, "predictions": predictions}
