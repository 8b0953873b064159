"""Supervised fine-tuning: chat data, loss on assistant turns only, full fine-tuning or LoRA.

The stage reuses the pretraining loop (:func:`tanuki.train.train`), its checkpoints, resume, logging
and export; what differs is the data (:mod:`tanuki.data.sft`: rendered chat templates, offset-based
masks, packing with restarting positions and block-diagonal attention) and the loss normalisation:
every loss token of the global batch weighs the same, however the batch is split into micro-batches
and ranks (the loop passes the global count of loss tokens; see :func:`sft_step`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tanuki import stage as plumbing
from tanuki.build import build_training_model
from tanuki.chunked_loss import has_chunked_head
from tanuki.checkpoint import consolidate_checkpoint, plan_resume
from tanuki.config import ConfigError, ModelConfig, StageConfig, TrainConfig, to_dict
from tanuki.data.sft import SFTDataConfig, SFTDataLoader, build_sft_datasets, exact_match, read_eval_prompts
from tanuki.generate import generate
from tanuki.fileio import check_output_dir
from tanuki.hf import export_hf, import_hf, read_hf_config, trim_vocab_rows
from tanuki.info import flops_per_token
from tanuki.lisa import LisaConfig, LisaScheduler
from tanuki.lora import LoraConfig, count_trainable_parameters, merge_lora_state_dict, save_peft_adapter
from tanuki.losses import LossOutput, causal_lm_loss
from tanuki.model import moe_losses
from tanuki.parallel.env import DistEnv
from tanuki.parallel.zero import build_engine
from tanuki.tokenizer.jinja_template import resolve_template, template_label
from tanuki.tokenizer.templates import AUTO, ChatTemplate, check_template_name, write_chat_template
from tanuki.train import Stage, StepOutput, train_and_close

#: settings a resumed SFT run must share with the run that wrote the checkpoint
RESUME_KEYS = ("init", "method", "lora", "lisa", "template", "parallel.tp", "parallel.zero_stage", "train.seq_len")


def fine_tuning_train_config(lr: float, min_lr: float) -> TrainConfig:
    """The ``train`` defaults of the fine-tuning stages: longer rows, smaller micro-batches, a small
    learning rate and no weight decay."""
    return TrainConfig(seq_len=512, micro_batch_size=4, lr=lr, min_lr=min_lr, weight_decay=0.0)


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
    #: the embedding and head rows written: trim = the tokenizer's ids only (the export scores text as
    #: tanuki does); padded = the model's padded rows, those beyond the tokenizer zeroed (for engines that
    #: mask logits by the tokenizer's size; see tanuki/hf.py, "Vocabulary rows")
    vocab: Literal["trim", "padded"] = "trim"


@dataclass(frozen=True)
class FineTuningConfig(StageConfig):
    """The sections SFT and DPO share: the model to start from, how to render chats, which weights
    train (``method``, ``lora``), kernels and the export."""

    #: the Hugging Face directory to fine-tune (a tanuki export or a supported checkpoint)
    init: str
    #: chat template: auto (the model's own chat template, any Jinja template; SFT falls back to alpaca_ja
    #: when the tokenizer has none) | alpaca_ja | llmjp | tulu (a named one is written into the exported
    #: tokenizer's config)
    template: str = AUTO
    #: full (every weight trains) | lora (adapters on a frozen base) | lisa (SFT only: sampled layers)
    method: Literal["full", "lora", "lisa"] = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    #: tokenizer directory; default: the one in ``init``
    tokenizer: Optional[str] = None
    #: kernels of the model: auto (Triton on CUDA) | triton | torch
    kernels: Literal["auto", "triton", "torch"] = "auto"
    export: SFTExportConfig = field(default_factory=SFTExportConfig)

    def __post_init__(self) -> None:
        check_template_name(self.template)  # an unknown name fails here, naming the key
        if self.method == "lora" and self.parallel.tp > 1:
            raise ConfigError("method", "LoRA with tensor parallelism (parallel.tp > 1) is not supported; use tp=1")


@dataclass(frozen=True)
class SFTConfig(FineTuningConfig):
    """``conf/sft.yaml``."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    train: TrainConfig = field(default_factory=lambda: fine_tuning_train_config(2e-5, 2e-6), kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "lisa" and self.parallel.zero_stage != 0:
            raise ConfigError(
                "parallel.zero_stage",
                f"LISA needs parallel.zero_stage=0, got {self.parallel.zero_stage}: ZeRO flattens the parameters "
                "into partitions when the engine is built, so layers cannot be frozen and their optimizer state "
                "dropped per period (see tanuki/lisa.py)",
            )


@dataclass
class PreparedFineTuning:
    """A fine-tuning stage's config (SFT or DPO) after its start-up checks."""

    cfg: FineTuningConfig
    model: ModelConfig
    tokenizer_dir: str
    grad_accumulation: int
    #: ``cfg.template`` resolved against the tokenizer (see :func:`tanuki.tokenizer.jinja_template.resolve_template`)
    template: ChatTemplate


def prepare(cfg: SFTConfig, env: DistEnv) -> PreparedFineTuning:
    """Checks needing files or the world size (before any process group)."""
    model, tok, grad_accumulation = plumbing.prepare_fine_tuning(cfg, env, "<file.jsonl>")
    return PreparedFineTuning(cfg, model, tok, grad_accumulation, resolve_template(cfg.template, tok, fallback="alpaca_ja"))


def sft_step(model, batch: dict[str, torch.Tensor], *, z_loss: float, vocab_limit: int | None, vocab_parallel=None,
             autocast: torch.dtype | None = None, packed: bool = True):
    """One micro-batch: the loss on the labelled (assistant) tokens of packed rows.

    With ``batch["loss_normalizer"]`` (set by :class:`~tanuki.data.sft.SFTDataLoader` from the global
    count of loss tokens of the optimizer step), the summed loss is divided by it, so every token of the
    global batch weighs the same; evaluation batches have none and report the per-token mean of the
    batch. ``autocast``: compute in that dtype over fp32 weights (LISA's mixed precision). Unpacked rows
    (one sample, then padding that carries no loss) need no block-diagonal mask: plain causal attention
    is cheaper and gives the same loss.
    """
    tokens = batch["tokens"]
    segments = batch["segment_ids"] if packed else None
    kw = dict(z_loss=z_loss, vocab_limit=vocab_limit, normalizer=batch.get("loss_normalizer"),
              vocab_parallel=vocab_parallel)
    chunked = has_chunked_head(model)  # the head computes the loss a chunk at a time: no full logits
    with torch.autocast(tokens.device.type, dtype=autocast, enabled=autocast is not None):
        result = model(tokens, positions=batch["positions"], segment_ids=segments,
                       labels=batch["labels"] if chunked else None, head_kwargs=kw if chunked else None)
    out = LossOutput(*result) if chunked else causal_lm_loss(result, batch["labels"], **kw)
    router_loss, router_stats = moe_losses(model)  # (0, {}) for a dense model
    return StepOutput(loss=out.loss + router_loss, stats={"loss": out.ce, **router_stats})


def export_fine_tuned(checkpoint: Path, *, init: str, method: str, lora: LoraConfig, export: SFTExportConfig,
                      template: ChatTemplate, out_dir: Path, tokenizer_dir: str) -> list[Path]:
    """The final checkpoint of a fine-tuning run (SFT or DPO) as a Hugging Face model (LoRA merged) and,
    for LoRA, a PEFT adapter. A tanuki template is written into the exported tokenizer; a template read
    from the tokenizer (``auto``) is already there, as it was."""
    model_cfg, sd = consolidate_checkpoint(checkpoint)
    written = []
    if method == "lora":
        # an adapter's whole embedding / head (modules_to_save) has the rows of the base it applies to
        base_vocab = read_hf_config(init)["vocab_size"]
        if base_vocab < model_cfg.vocab_size:
            sd, model_cfg = trim_vocab_rows(sd, model_cfg, base_vocab)
        if export.adapter:
            adapter_dir = out_dir.parent / "adapter" if export.dir is None else Path(str(out_dir) + "-adapter")
            written.append(save_peft_adapter(sd, lora, str(Path(init).resolve()), adapter_dir, overwrite=True))
        sd = merge_lora_state_dict(sd, lora)
    if export.hf:
        out = export_hf(sd, model_cfg, out_dir, dtype=getattr(torch, export.dtype), tokenizer_dir=tokenizer_dir,
                        overwrite=True, vocab=export.vocab)
        if template.source is None:
            write_chat_template(out, template.name)
        written.append(out)
    return written


def export_hook(cfg: StageConfig, template: ChatTemplate, run_dir: Path,
                print_fn: Callable[[str], None]) -> Callable[[Path], None] | None:
    """What a fine-tuning stage runs on rank 0 with its final checkpoint: the exports of ``cfg.export``
    into ``export.dir`` (default ``<run dir>/hf``); None when nothing is to be written. ``cfg``: an
    :class:`SFTConfig` or a :class:`tanuki.dpo.DPOConfig` (both have init, method, lora and export)."""
    if not (cfg.export.hf or (cfg.method == "lora" and cfg.export.adapter)):
        return None
    out_dir = Path(cfg.export.dir) if cfg.export.dir else run_dir / "hf"
    # Checked now, not after training: the export replaces only an earlier export.
    try:
        check_output_dir(out_dir, overwrite=True)
    except FileExistsError as e:
        raise ConfigError("export.dir", str(e)) from None

    def on_finish(checkpoint: Path) -> None:
        for p in export_fine_tuned(checkpoint, init=cfg.init, method=cfg.method, lora=cfg.lora, export=cfg.export,
                                   template=template, out_dir=out_dir, tokenizer_dir=str(run_dir / "tokenizer")):
            print_fn(f"exported {p}")

    return on_finish


def run(prep: PreparedFineTuning, env: DistEnv, run_dir: Path, print_fn: Callable[[str], None] = print):
    """Fine-tune inside an initialised process group; returns the TrainResult."""
    cfg, tc = prep.cfg, prep.cfg.train
    # The model's architecture goes into every checkpoint, so that export needs nothing but the checkpoint.
    config = {**to_dict(cfg), "model": to_dict(prep.model)}
    resume = plan_resume(cfg.resume, run_dir, config, RESUME_KEYS, env, cfg.parallel)
    setup = plumbing.start_stage(cfg, env)
    dp_size, dp_rank = setup.dp_size, setup.dp_rank

    tokenizer = PreTrainedTokenizerFast.from_pretrained(prep.tokenizer_dir)
    total_steps = tc.total_steps()
    data = build_sft_datasets(cfg.data, tokenizer, prep.template, tc.seq_len, min_rows=total_steps * tc.global_batch_size)
    loader = SFTDataLoader(data.train, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                           grad_accumulation=prep.grad_accumulation)
    valid_batches = None
    if data.valid is not None and tc.eval_iters > 0:
        def valid_batches():
            return itertools.islice(SFTDataLoader(data.valid, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank,
                                                  dp_size=dp_size), tc.eval_iters)

    model = build_training_model(prep.model, init=cfg.init, seed=cfg.seed, kernels=cfg.kernels, train=tc,
                                 parallel=cfg.parallel, groups=setup.groups, device=setup.device, bf16=setup.bf16,
                                 lora=cfg.lora if cfg.method == "lora" else None)
    trainable = count_trainable_parameters(model.module)
    # LISA keeps fp32 weights (DeepSpeed's bf16 mode flattens them) and computes in bf16 by autocast.
    autocast = torch.bfloat16 if setup.bf16 and cfg.method == "lisa" else None
    engine, optimizer = build_engine(model.module, tc, cfg.parallel, dp_size=dp_size,
                                     bf16=setup.bf16 and autocast is None, mpu=setup.mpu,
                                     load_universal=resume is not None and resume.universal)
    lisa = None
    if cfg.method == "lisa":
        lisa = LisaScheduler(model.module.layers, cfg.lisa, optimizer)  # after the optimizer knows every layer

    logger = plumbing.open_run(
        cfg, env, config, prep.tokenizer_dir, run_dir, print_fn=print_fn,
        summary=f"SFT ({cfg.method}, template {template_label(prep.template)}) of {cfg.init}: {trainable:,} trainable parameters"
        + (f" ({cfg.lisa.active_layers} of {len(model.module.layers)} layers at a time, new draw every "
           f"{cfg.lisa.interval_steps} steps)" if lisa is not None else "")
        + f" on {plumbing.describe_layout(setup, env, cfg)}; data: {data.train_stats.summary()}; "
        f"{len(data.train):,} rows of {tc.seq_len} ({'packed' if cfg.data.packing else 'one sample per row'}); "
        f"{total_steps} steps; run dir {run_dir}",
    )

    stage = Stage(
        name="sft",
        step_fn=functools.partial(sft_step, z_loss=tc.z_loss, vocab_limit=len(tokenizer),
                                  vocab_parallel=model.vocab_parallel, autocast=autocast, packed=cfg.data.packing),
        train_loader=loader,
        valid_batches=valid_batches,
        tokens_per_step=tc.global_batch_size * tc.seq_len,
        flops_per_token=flops_per_token(prep.model, tc.seq_len),
        config=config,
        on_finish=export_hook(cfg, prep.template, run_dir, print_fn),
        on_step_start=lisa.on_step_start if lisa is not None else None,
    )
    return train_and_close(stage, cfg, env, run_dir, engine=engine, optimizer=optimizer, logger=logger,
                           resume=resume, print_fn=print_fn)


def main(cfg: SFTConfig, env: DistEnv) -> int:
    """The body of ``launch/sft.py`` after Hydra."""
    return plumbing.main(cfg, env, name="sft", prepare=prepare, run=run)


def evaluate_exact_match(model_dir: str | Path, eval_path: str | Path, *, max_new_tokens: int = 32,
                         limit: int | None = None) -> dict:
    """Greedy answers of a Hugging Face model to held-out prompts (``{"messages", "answer", "task"}``
    records, e.g. the bundled ``sft_eval.jsonl``), scored by exact match.

    The prompt is rendered with the model's own chat template (as a user of the exported model would).
    Returns ``{"correct": n, "total": n, "by_task": {task: [correct, total]}, "predictions": [...]}``.
    """
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
