"""Model arithmetic for planning a run: parameter counts, FLOPs per token, memory per GPU.

Everything here is computed from the config and a model built on the ``meta`` device, so a 13B plan
costs nothing. The numbers are estimates with stated assumptions; they are meant to answer "does this
size fit my cluster, and roughly how long will it take" before a job is queued.

Memory model (per GPU, bf16 mixed precision with AdamW; Rajbhandari et al. 2020, "ZeRO", section 3):
16 bytes per parameter = 2 (bf16 weights) + 2 (bf16 gradients) + 4 (fp32 master weights) + 4 + 4
(Adam moments). ZeRO stage 1 partitions the 12 optimizer bytes over the data-parallel ranks, stage 2
also the gradients, stage 3 also the weights. Tensor parallelism divides everything by ``tp`` first.

Activation model (per token, per layer, bf16 tensors saved for backward by tanuki's block): the two
norm inputs and the two normalised outputs (4h), q and the attention output (2h), k and v (2 h_kv),
and the SwiGLU gate, silu(gate), up and their product (4f): ``2 * (6h + 2h_kv + 4f)`` bytes; an MoE
layer keeps the SwiGLU tensors of each of the ``top_k`` experts a token visits (``4f x top_k``) plus
the gathered expert inputs and weighted outputs (``2h x top_k``); its router tensors are negligible. Fused
attention kernels keep no T x T score matrix. The tensor-parallel parts are divided by ``tp``; the norm
parts only with sequence parallelism (Korthikanti et al. 2022). With activation checkpointing each layer
keeps only its input (2h bytes) and one layer's activations are live during recomputation. The head
and loss with full logits (``train.loss_chunk_size=0``) add about 10 bytes per vocabulary entry per
token at their peak (bf16 logits, fp32 copy, fp32 log-softmax). The chunked head (the default,
:mod:`tanuki.chunked_loss`, strategy ``stored``) keeps instead the fp32 gradient of its input (4h bytes
per token) and of its weight (4 x vocab x h bytes, once), and one chunk's fp32 logits, softmax and logit
gradient (about 12 bytes per vocabulary entry for ``loss_chunk_size`` tokens).

Fine-tuning (``init=<HF dir>``: the architecture of its ``config.json``; no weight is read). Full
fine-tuning is the plan above. LoRA (Hu et al. 2021; ``method=lora``) trains ``r x (in + out)``
parameters per adapted linear layer (the ``lora.target_modules`` of every layer, shapes from the model
built on the meta device), plus the embedding / head when ``lora.train_embeddings`` / ``train_head``:
those take the 16 bytes per parameter above under the same ZeRO stage, while the frozen base keeps only
its bf16 weights (2 bytes per parameter, partitioned over the data-parallel ranks by ZeRO-3, whole on
every GPU otherwise): no gradients and no optimizer state. The activations are those of full
fine-tuning (gradients still flow back through every layer to the adapters) plus, per adapted layer
and token, the rank-``r`` product ``A x`` (``2r`` bytes) and with ``lora.dropout > 0`` the dropped-out
input and its mask (``3 x in`` bytes). LoRA runs without tensor parallelism (``tanuki.lora``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from tanuki.config import ConfigError, ModelConfig, PlanConfig, PretrainConfig, require
from tanuki.hf import HFFormatError, model_config_from_hf, read_hf_config
from tanuki.lora import TARGET_PATHS, LoraConfig
from tanuki.model import ParamCounts, Transformer, count_parameters

GIB = 1024**3


@dataclass(frozen=True)
class ModelInfoConfig(PretrainConfig):
    """``conf/model_info.yaml``: the pretraining config plus the cluster to plan for. With ``init`` (a
    Hugging Face directory; only its ``config.json`` is read) its architecture replaces ``model``. (It
    lives here, not in :mod:`tanuki.config`, because it holds a :class:`~tanuki.lora.LoraConfig`.)"""

    plan: PlanConfig = field(default_factory=PlanConfig)
    #: what trains: ``full`` (every weight: pretraining or full fine-tuning) | ``lora`` (adapters on a
    #: frozen bf16 base; the full fine-tuning plan is printed beside it)
    method: Literal["full", "lora"] = "full"
    #: the adapters of ``method=lora`` (the keys of ``conf/sft.yaml``'s ``lora``)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.init is None:  # else the same checks are made on init's architecture (planned_model)
            super().__post_init__()
        require(self.method != "lora" or self.parallel.tp == 1, "method",
                "LoRA with tensor parallelism (parallel.tp > 1) is not supported; plan it with parallel.tp=1")


def planned_model(cfg: ModelInfoConfig) -> ModelConfig:
    """``model``, or the architecture of ``init``'s ``config.json`` (checked against ``train`` and
    ``parallel`` as a pretraining config checks ``model``)."""
    if cfg.init is None:
        return cfg.model
    try:
        model = model_config_from_hf(read_hf_config(cfg.init), source=f"{cfg.init}/config.json")
    except (FileNotFoundError, HFFormatError) as e:
        raise ConfigError("init", str(e)) from None
    PretrainConfig.__post_init__(replace(cfg, init=None, model=model))  # type: ignore[misc]
    return model


def lora_adapted_shapes(cfg: ModelConfig, lora: LoraConfig) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every linear layer :func:`tanuki.lora.apply_lora` adapts: the
    ``lora.target_modules`` of each decoder layer, read from the model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    suffixes = tuple("." + TARGET_PATHS[t] for t in lora.target_modules)
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ("." + name).endswith(suffixes)]


def lora_trainable_parameters(cfg: ModelConfig, lora: LoraConfig) -> int:
    """Parameters LoRA trains: ``r x (in + out)`` per adapted layer, plus the embedding and the head
    when trained (``vocab x dim`` each)."""
    adapters = sum(lora.r * (i + o) for i, o in lora_adapted_shapes(cfg, lora))
    return adapters + (int(lora.train_embeddings) + int(lora.train_head)) * cfg.vocab_size * cfg.dim


def lora_activation_bytes(cfg: ModelConfig, lora: LoraConfig, micro_batch: int, seq_len: int) -> float:
    """Activation bytes the adapters add to a micro-batch, all layers (see the module docstring)."""
    per_token = sum(2 * lora.r + (3 * i if lora.dropout > 0 else 0) for i, _ in lora_adapted_shapes(cfg, lora))
    return per_token * micro_batch * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token.

    ``6 x`` the parameters that multiply every token (all linear layers including the output head; the
    embedding lookup is not a matmul) plus ``12 x layers x (heads x head_dim) x seq_len`` for the
    attention scores and weighted sum (Kaplan et al. 2020; Chowdhery et al. 2022, appendix B). For an
    MoE model the MLP parameters a token multiplies are its ``top_k`` experts and the router (the active
    parameters); the routing weights' elementwise products are not counted.
    """
    d, hd = cfg.dim, cfg.attn_head_dim
    mlp = 3 * d * cfg.ffn_dim
    if cfg.n_experts:
        mlp = cfg.top_k * mlp + d * cfg.n_experts
    linear = cfg.n_layers * (2 * d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + mlp)
    linear += cfg.vocab_size * d  # output head
    attention = 12 * cfg.n_layers * cfg.n_heads * hd * seq_len
    return 6.0 * linear + attention


@dataclass(frozen=True)
class MemoryPlan:
    states_per_gpu: float  # bytes: weights, gradients, optimizer states
    activations: float  # bytes, without activation checkpointing
    activations_ckpt: float  # bytes, with activation checkpointing
    working: float  # bytes: ZeRO-3 gathered parameters of the layers in flight
    dp: int

    @property
    def total(self) -> float:
        return self.states_per_gpu + self.activations + self.working

    @property
    def total_ckpt(self) -> float:
        return self.states_per_gpu + self.activations_ckpt + self.working


def model_state_bytes(params: int, gpus: int, tp: int, zero_stage: int) -> float:
    """Bytes per GPU of bf16 weights + bf16 grads + fp32 master + Adam moments under a ZeRO stage."""
    dp = gpus // tp
    p = params / tp
    weights, grads, optim = 2 * p, 2 * p, 12 * p
    if zero_stage >= 1:
        optim /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    return weights + grads + optim


def head_loss_bytes(cfg: ModelConfig, tokens: int, tp: int = 1, loss_chunk_size: int = 0) -> float:
    """Peak bytes of the output head + loss for ``tokens`` tokens (module docstring): full logits when
    ``loss_chunk_size`` is 0, else the chunked head."""
    vocab = cfg.vocab_size / tp
    if loss_chunk_size <= 0:
        return 10 * vocab * tokens
    return 4 * cfg.dim * tokens + 4 * vocab * cfg.dim + 12 * vocab * min(loss_chunk_size, tokens)


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, tp: int = 1, sp: bool = False,
                     checkpointing: bool = False, loss_chunk_size: int = 0) -> float:
    """Peak activation bytes of one micro-batch (see the module docstring for the model)."""
    tokens = micro_batch * seq_len
    h, hkv, f = cfg.dim, cfg.n_kv_heads * cfg.attn_head_dim, cfg.ffn_dim
    hq = cfg.n_heads * cfg.attn_head_dim
    replicated = 4 * h / (tp if sp else 1)
    mlp = 4 * f if not cfg.n_experts else cfg.top_k * (4 * f + 2 * h)
    sharded = (2 * hq + 2 * hkv + mlp) / tp
    per_layer = 2 * (replicated + sharded) * tokens
    loss = head_loss_bytes(cfg, tokens, tp, loss_chunk_size)
    if not checkpointing:
        return cfg.n_layers * per_layer + loss
    kept = cfg.n_layers * 2 * h / (tp if sp else 1) * tokens
    return kept + per_layer + loss


def memory_plan(cfg: ModelConfig, params: int, gpus: int, tp: int, sp: bool, zero_stage: int,
                micro_batch: int, seq_len: int, loss_chunk_size: int = 0) -> MemoryPlan:
    dp = gpus // tp
    layer_params = (params - 2 * cfg.vocab_size * cfg.dim) / cfg.n_layers
    # ZeRO-3 all-gathers each layer before use and prefetches the next: about two layers of bf16
    # weights (and the output head at the end) are whole on every GPU at once.
    working = 2 * max(2 * layer_params, cfg.vocab_size * cfg.dim) / tp if zero_stage == 3 else 0.0
    return MemoryPlan(
        states_per_gpu=model_state_bytes(params, gpus, tp, zero_stage),
        activations=activation_bytes(cfg, micro_batch, seq_len, tp, sp, False, loss_chunk_size),
        activations_ckpt=activation_bytes(cfg, micro_batch, seq_len, tp, sp, True, loss_chunk_size),
        working=working,
        dp=dp,
    )


def lora_memory_plan(cfg: ModelConfig, lora: LoraConfig, params: int, gpus: int, sp: bool, zero_stage: int,
                     micro_batch: int, seq_len: int, loss_chunk_size: int = 0) -> MemoryPlan:
    """The per-GPU plan of LoRA (no tensor parallelism): the frozen base in bf16 (2 bytes per parameter,
    partitioned by ZeRO-3), the trained parameters with their gradients and AdamW states (16 bytes per
    parameter under ``zero_stage``), and the activations of full fine-tuning plus the adapters'."""
    full = memory_plan(cfg, params, gpus, 1, sp, zero_stage, micro_batch, seq_len, loss_chunk_size)
    adapters = sum(lora.r * (i + o) for i, o in lora_adapted_shapes(cfg, lora))
    trainable = lora_trainable_parameters(cfg, lora)
    frozen = params - (trainable - adapters)  # the trained embedding / head are not frozen
    base = 2 * frozen / (full.dp if zero_stage >= 3 else 1)
    extra = lora_activation_bytes(cfg, lora, micro_batch, seq_len)
    return MemoryPlan(
        states_per_gpu=base + model_state_bytes(trainable, gpus, 1, zero_stage),
        activations=full.activations + extra,
        activations_ckpt=full.activations_ckpt + extra / cfg.n_layers,  # one layer recomputed at a time
        working=full.working,
        dp=full.dp,
    )


def meta_param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of the real module built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return count_parameters(model)


def model_report(cfg: ModelInfoConfig) -> dict:
    """Everything ``launch/model_info.py`` prints, as a dict (also handy in notebooks)."""
    plan, par, train = cfg.plan, cfg.parallel, cfg.train
    m = planned_model(cfg)
    if plan.gpus % par.tp:
        raise ConfigError("plan.gpus", f"{plan.gpus} GPUs is not a multiple of parallel.tp={par.tp}")
    counts = meta_param_counts(m)
    fpt = flops_per_token(m, train.seq_len)
    budget = plan.gpu_memory_gib * GIB

    def memory(mem: MemoryPlan, extra_per_sample) -> dict:
        def largest_micro_batch(checkpointing: bool) -> int:
            one, two = (activation_bytes(m, b, train.seq_len, par.tp, par.sp, checkpointing, train.loss_chunk_size)
                        for b in (1, 2))
            per_sample = two - one + extra_per_sample(checkpointing)  # the chunked head's part is mostly fixed
            fixed = mem.states_per_gpu + mem.working + one - (two - one)
            return max(0, int((budget * 0.9 - fixed) // per_sample))  # keep 10% for the allocator

        return {
            "model_states_gib": mem.states_per_gpu / GIB,
            "zero3_working_gib": mem.working / GIB,
            "activations_gib": mem.activations / GIB,
            "head_loss_gib": head_loss_bytes(m, train.micro_batch_size * train.seq_len, par.tp,
                                             train.loss_chunk_size) / GIB,
            "activations_checkpointed_gib": mem.activations_ckpt / GIB,
            "total_gib": mem.total / GIB,
            "total_checkpointed_gib": mem.total_ckpt / GIB,
            "gpu_gib": plan.gpu_memory_gib,
            "fits": mem.total <= budget * 0.9,
            "fits_checkpointed": mem.total_ckpt <= budget * 0.9,
            "max_micro_batch": largest_micro_batch(False),
            "max_micro_batch_checkpointed": largest_micro_batch(True),
        }

    mem = memory_plan(m, counts.total, plan.gpus, par.tp, par.sp, par.zero_stage, train.micro_batch_size, train.seq_len,
                      train.loss_chunk_size)
    report = {
        "model": cfg.init,
        "params": counts.total,
        "embedding_params": counts.embedding,
        "non_embedding_params": counts.non_embedding,
        "active_params": counts.active,
        "flops_per_token": fpt,
        "seq_len": train.seq_len,
        "micro_batch_size": train.micro_batch_size,
        "loss_chunk_size": train.loss_chunk_size,
        "gpus": plan.gpus,
        "tp": par.tp,
        "dp": mem.dp,
        "zero_stage": par.zero_stage,
        "memory": memory(mem, lambda checkpointing: 0.0),
    }
    if cfg.method == "lora":
        lora = cfg.lora
        lora_mem = lora_memory_plan(m, lora, counts.total, plan.gpus, par.sp, par.zero_stage, train.micro_batch_size,
                                    train.seq_len, train.loss_chunk_size)
        trainable = lora_trainable_parameters(m, lora)
        extra = lora_activation_bytes(m, lora, 1, train.seq_len)
        report["lora"] = {
            "r": lora.r,
            "target_modules": list(lora.target_modules),
            "adapted_layers": len(lora_adapted_shapes(m, lora)),
            "trainable_params": trainable,
            "frozen_params": counts.total - (trainable - sum(lora.r * (i + o) for i, o in lora_adapted_shapes(m, lora))),
            "memory": memory(lora_mem, lambda checkpointing: extra / m.n_layers if checkpointing else extra),
        }
    if plan.train_tokens > 0:
        seconds = plan.train_tokens * fpt / (plan.gpus * plan.peak_tflops * 1e12 * plan.mfu)
        report["time"] = {"train_tokens": plan.train_tokens, "mfu": plan.mfu, "days": seconds / 86400}
    return report


def format_report(name: str, r: dict) -> str:
    mem = r["memory"]

    def yes(flag: bool) -> str:
        return "fits" if flag else "DOES NOT FIT"

    lines = [
        f"model {name}",
        f"  parameters            {r['params']:>17,}",
        f"    embedding           {r['embedding_params']:>17,}   (input embedding + output head)",
        f"    non-embedding       {r['non_embedding_params']:>17,}",
    ]
    if r["active_params"] != r["params"]:
        lines.append(f"    active per token    {r['active_params']:>17,}   (mixture of experts: top-k experts)")
    lines.append(f"  FLOPs per token       {r['flops_per_token']:>17.4e}   (forward + backward, seq {r['seq_len']})")
    head = (f"chunked: train.loss_chunk_size={r['loss_chunk_size']}" if r["loss_chunk_size"]
            else "full logits: train.loss_chunk_size=0")
    layout = (f"{r['gpus']} GPUs = tp {r['tp']} x dp {r['dp']}, ZeRO-{r['zero_stage']}, bf16 + AdamW,"
              f" micro-batch {r['micro_batch_size']} x seq {r['seq_len']}")

    def plan_lines(mem: dict, states: str) -> list[str]:
        return [
            f"  {states:<23} {mem['model_states_gib']:>10.2f} GiB",
            f"  ZeRO-3 gathered layers  {mem['zero3_working_gib']:>10.2f} GiB",
            f"  activations             {mem['activations_gib']:>10.2f} GiB   "
            f"(with activation checkpointing: {mem['activations_checkpointed_gib']:.2f} GiB)",
            f"    of which head + loss  {mem['head_loss_gib']:>10.2f} GiB   ({head})",
            f"  total                   {mem['total_gib']:>10.2f} GiB   {yes(mem['fits'])} in {mem['gpu_gib']:g} GiB"
            f" (largest micro-batch: {mem['max_micro_batch']})",
            f"  total, checkpointing    {mem['total_checkpointed_gib']:>10.2f} GiB   {yes(mem['fits_checkpointed'])}"
            f" (largest micro-batch: {mem['max_micro_batch_checkpointed']})",
        ]

    if "lora" in r:
        lo = r["lora"]
        lines += [
            "",
            f"LoRA r {lo['r']} on {', '.join(lo['target_modules'])} ({lo['adapted_layers']} layers)",
            f"  trainable             {lo['trainable_params']:>17,}   ({lo['trainable_params'] / r['params']:.3%})",
            f"  frozen (bf16)         {lo['frozen_params']:>17,}",
            "",
            f"LoRA memory plan per GPU: {layout}",
            *plan_lines(lo["memory"], "frozen base+adapters"),
        ]
    lines += ["", f"{'full fine-tuning ' if 'lora' in r else ''}memory plan per GPU: {layout}",
              *plan_lines(mem, "weights+grads+optimizer")]
    if "time" in r:
        t = r["time"]
        lines.append(
            f"  time for {t['train_tokens']:.3g} tokens at {t['mfu']:.0%} MFU: {t['days']:.1f} days"
        )
    return "\n".join(lines)
