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
keeps only its input (2h bytes) and one layer's activations are live during recomputation. The loss
adds about 10 bytes per vocabulary entry per token at its peak (bf16 logits, fp32 copy, fp32
log-softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tanuki.config import ConfigError, ModelConfig, ModelInfoConfig
from tanuki.model import ParamCounts, Transformer, count_parameters

GIB = 1024**3


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


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, tp: int = 1, sp: bool = False,
                     checkpointing: bool = False) -> float:
    """Peak activation bytes of one micro-batch (see the module docstring for the model)."""
    tokens = micro_batch * seq_len
    h, hkv, f = cfg.dim, cfg.n_kv_heads * cfg.attn_head_dim, cfg.ffn_dim
    hq = cfg.n_heads * cfg.attn_head_dim
    replicated = 4 * h / (tp if sp else 1)
    mlp = 4 * f if not cfg.n_experts else cfg.top_k * (4 * f + 2 * h)
    sharded = (2 * hq + 2 * hkv + mlp) / tp
    per_layer = 2 * (replicated + sharded) * tokens
    loss = 10 * cfg.vocab_size / tp * tokens
    if not checkpointing:
        return cfg.n_layers * per_layer + loss
    kept = cfg.n_layers * 2 * h / (tp if sp else 1) * tokens
    return kept + per_layer + loss


def memory_plan(cfg: ModelConfig, params: int, gpus: int, tp: int, sp: bool, zero_stage: int,
                micro_batch: int, seq_len: int) -> MemoryPlan:
    dp = gpus // tp
    layer_params = (params - 2 * cfg.vocab_size * cfg.dim) / cfg.n_layers
    # ZeRO-3 all-gathers each layer before use and prefetches the next: about two layers of bf16
    # weights (and the output head at the end) are whole on every GPU at once.
    working = 2 * max(2 * layer_params, cfg.vocab_size * cfg.dim) / tp if zero_stage == 3 else 0.0
    return MemoryPlan(
        states_per_gpu=model_state_bytes(params, gpus, tp, zero_stage),
        activations=activation_bytes(cfg, micro_batch, seq_len, tp, sp, False),
        activations_ckpt=activation_bytes(cfg, micro_batch, seq_len, tp, sp, True),
        working=working,
        dp=dp,
    )


def meta_param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of the real module built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return count_parameters(model)


def model_report(cfg: ModelInfoConfig) -> dict:
    """Everything ``launch/model_info.py`` prints, as a dict (also handy in notebooks)."""
    m, plan, par, train = cfg.model, cfg.plan, cfg.parallel, cfg.train
    if plan.gpus % par.tp:
        raise ConfigError("plan.gpus", f"{plan.gpus} GPUs is not a multiple of parallel.tp={par.tp}")
    counts = meta_param_counts(m)
    fpt = flops_per_token(m, train.seq_len)
    mem = memory_plan(m, counts.total, plan.gpus, par.tp, par.sp, par.zero_stage, train.micro_batch_size, train.seq_len)
    budget = plan.gpu_memory_gib * GIB

    def largest_micro_batch(checkpointing: bool) -> int:
        fixed = mem.states_per_gpu + mem.working
        per_sample = activation_bytes(m, 1, train.seq_len, par.tp, par.sp, checkpointing)
        return max(0, int((budget * 0.9 - fixed) // per_sample))  # keep 10% for the allocator

    report = {
        "params": counts.total,
        "embedding_params": counts.embedding,
        "non_embedding_params": counts.non_embedding,
        "active_params": counts.active,
        "flops_per_token": fpt,
        "seq_len": train.seq_len,
        "micro_batch_size": train.micro_batch_size,
        "gpus": plan.gpus,
        "tp": par.tp,
        "dp": mem.dp,
        "zero_stage": par.zero_stage,
        "memory": {
            "model_states_gib": mem.states_per_gpu / GIB,
            "zero3_working_gib": mem.working / GIB,
            "activations_gib": mem.activations / GIB,
            "activations_checkpointed_gib": mem.activations_ckpt / GIB,
            "total_gib": mem.total / GIB,
            "total_checkpointed_gib": mem.total_ckpt / GIB,
            "gpu_gib": plan.gpu_memory_gib,
            "fits": mem.total <= budget * 0.9,
            "fits_checkpointed": mem.total_ckpt <= budget * 0.9,
            "max_micro_batch": largest_micro_batch(False),
            "max_micro_batch_checkpointed": largest_micro_batch(True),
        },
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
    lines += [
        f"  FLOPs per token       {r['flops_per_token']:>17.4e}   (forward + backward, seq {r['seq_len']})",
        "",
        f"memory plan per GPU: {r['gpus']} GPUs = tp {r['tp']} x dp {r['dp']}, ZeRO-{r['zero_stage']}, bf16 + AdamW,"
        f" micro-batch {r['micro_batch_size']} x seq {r['seq_len']}",
        f"  weights+grads+optimizer {mem['model_states_gib']:>10.2f} GiB",
        f"  ZeRO-3 gathered layers  {mem['zero3_working_gib']:>10.2f} GiB",
        f"  activations             {mem['activations_gib']:>10.2f} GiB   "
        f"(with activation checkpointing: {mem['activations_checkpointed_gib']:.2f} GiB)",
        f"  total                   {mem['total_gib']:>10.2f} GiB   {yes(mem['fits'])} in {mem['gpu_gib']:g} GiB"
        f" (largest micro-batch: {mem['max_micro_batch']})",
        f"  total, checkpointing    {mem['total_checkpointed_gib']:>10.2f} GiB   {yes(mem['fits_checkpointed'])}"
        f" (largest micro-batch: {mem['max_micro_batch_checkpointed']})",
    ]
    if "time" in r:
        t = r["time"]
        lines.append(
            f"  time for {t['train_tokens']:.3g} tokens at {t['mfu']:.0%} MFU: {t['days']:.1f} days"
        )
    return "\n".join(lines)
