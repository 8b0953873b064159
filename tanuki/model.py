"""The tanuki model: a Llama-style decoder in plain PyTorch, and the other families as configuration.

Pre-norm RMSNorm, rotary position embedding (half-split layout, fp32 angle tables), grouped-query
attention through ``torch.nn.functional.scaled_dot_product_attention``, SwiGLU MLP, untied input
embedding and output head, no biases (Touvron et al. 2023, "LLaMA"; the llm-jp-3 and Tanuki-8B shapes in
``conf/size/``). With ``n_experts`` > 0 every MLP is a Mixtral-style mixture of experts (:class:`MoEMLP`;
Tanuki-8x8B), whose router losses :func:`moe_losses` returns for the training step.

The other families are flags of :class:`~tanuki.config.ModelConfig` (litgpt's one model with config
flags), each checked against transformers' modelling code of that family: :class:`LayerNorm` (Cohere),
the parallel block (Cohere), :class:`InterleavedRotary` (Cohere), rope scaling (``linear``, Llama 3.1's
``llama3``, ``yarn``), q/k/v biases (Qwen2), per-head q/k norms (Qwen3: one RMSNorm gain over head_dim; Command R+:
a LayerNorm gain per head), tied embedding and head, a logit scale (Cohere), a sliding window kept for
the export (Mistral; tanuki attends to the full context and refuses longer inputs).

This file knows nothing about distribution, DeepSpeed, Hydra or Hugging Face weight names. It uses
ordinary ``nn.Linear`` / ``nn.Embedding`` modules so that tensor parallelism (``tanuki.parallel``) and the
fused kernels (``tanuki.fused.apply_kernels``) can find and swap them by name and type.

Building on the meta device allocates nothing, which is how large sizes are inspected and how training
builds them before sharding::

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cuda")
    model.init_weights(seed=1234)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tanuki.config import ModelConfig

# ``enable_gqa`` lets SDPA broadcast kv heads without copying them (torch >= 2.5).
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class _GainNorm(nn.Module):
    """What RMSNorm and LayerNorm share: a gain of shape ``dim``, ``eps``, and ``forward(x, residual)``
    fusing the residual add of a pre-norm block (``(norm(x + residual), x + residual)``); a subclass
    gives ``_norm``."""

    def __init__(self, dim: int | tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RMSNorm(_GainNorm):
    """Root-mean-square layer norm (Zhang & Sennrich 2019) with the Hugging Face Llama casting order.

    Statistics are computed in fp32; the normalised activations are cast back to the input dtype
    *before* the weight is applied, exactly as ``LlamaRMSNorm`` does, so bf16 outputs round the same way.

    ``forward(x, residual)`` fuses the residual add of a pre-norm block: it returns
    ``(norm(x + residual), x + residual)``. The fused Triton module (``tanuki_kernels.rms_norm``) keeps the
    same signature.
    """

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(_GainNorm):
    """Layer norm (Ba et al. 2016) with a gain and no bias, as transformers' ``CohereLayerNorm``.

    ``(x - mean) / sqrt(var + eps)`` over the last dimension, computed in fp32 and multiplied by the fp32
    weight *before* the cast back (Cohere's order, unlike :class:`RMSNorm`). A weight of shape
    ``(heads, head_dim)`` gives every head its own gain (Command R+'s q/k norms). Same ``forward(x,
    residual)`` signature as :class:`RMSNorm`; there is no fused kernel for it.
    """

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


def make_norm(cfg: ModelConfig, shape: int | tuple[int, ...]) -> nn.Module:
    """The norm ``cfg.norm`` selects, with gain ``shape``."""
    return (LayerNorm if cfg.norm == "layernorm" else RMSNorm)(shape, cfg.norm_eps)


def rope_inv_freq(head_dim: int, theta: float, scaling=None, device=None) -> torch.Tensor:
    """Rotary inverse frequencies ``theta ** (-2i / head_dim)`` (fp32), rescaled by ``scaling`` (a
    :class:`~tanuki.config.RopeScaling`): ``linear`` divides them by ``factor``; ``llama3`` (Llama 3.1)
    divides the low-frequency band (wavelength > L / low_freq_factor, L the original context) by
    ``factor``, keeps the high one (wavelength < L / high_freq_factor), and interpolates between with
    ``s = (L / wavelength - low) / (high - low)``: ``(1 - s) f / factor + s f``
    (transformers.modeling_rope_utils ``_compute_llama3_parameters``)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        L, lo, hi, factor = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                             scaling.high_freq_factor, scaling.factor)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > L / lo, inv_freq / factor, inv_freq)
        smooth = (L / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < L / hi) * ~(wavelen > L / lo)
        return torch.where(medium, smoothed, scaled)
    if scaling.rope_type == "yarn":  # transformers.modeling_rope_utils ``_compute_yarn_parameters``
        def correction_dim(rotations):
            L = scaling.original_max_position_embeddings
            return head_dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        pos_freqs = theta**exponent
        return 1.0 / (scaling.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    raise ValueError(f"unknown rope scaling type {scaling.rope_type!r}")


def rope_attention_scaling(scaling) -> float:
    """The factor yarn multiplies cos and sin by (1 for the other rope types)."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(factor, m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return float(mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim))
    return mscale(scaling.factor)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) in the half-split layout of HF Llama (``rotate_half``).

    Angles are ``position * theta ** (-2i / head_dim)`` computed in fp32 from explicit positions, so
    packed sequences whose positions restart at each document work, and long positions keep their
    precision (cos/sin tables built in bf16 lose it). The rotation is done in fp32 and cast back.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling=None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        #: a :class:`~tanuki.config.RopeScaling` folded into the frequencies (so the fused kernel applies)
        self.scaling = scaling
        #: cos and sin are multiplied by this (yarn; 1 otherwise, and then only is the fused kernel used)
        self.attention_scaling = rope_attention_scaling(scaling)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        if self.scaling is None:  # the original fp32 arange, bit for bit
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            return 1.0 / (self.theta**exponent)
        return rope_inv_freq(self.head_dim, self.theta, self.scaling, device)

    def reset_parameters(self) -> None:
        # After ``to_empty`` (meta-device build) the buffer holds garbage: recompute it.
        self.inv_freq = self._inv_freq(device=self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` casts buffers too; bf16 frequencies are off by tens of radians
        # at position 32k. The frequencies stay fp32 whatever dtype the model is cast to.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            self.inv_freq = self._inv_freq(device=self.inv_freq.device)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` of the angles at ``positions`` (B, T), shaped (B, T, 1, D/2) for the heads
        (fp32; scaled by yarn's attention factor)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (B, T, D/2)
        cos = angles.cos()[:, :, None, :]
        sin = angles.sin()[:, :, None, :]
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """Rotate ``q`` (B, T, Hq, D) and ``k`` (B, T, Hk, D) at ``positions`` (B, T)."""
        cos, sin = self.cos_sin(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def extra_repr(self) -> str:
        scaling = f", scaling={self.scaling.rope_type}" if self.scaling is not None else ""
        return f"head_dim={self.head_dim}, theta={self.theta}{scaling}"


class InterleavedRotary(Rotary):
    """Rotary in the interleaved layout of Cohere (and GPT-J): the pairs are ``(x[2i], x[2i+1])``
    (transformers' Cohere ``rotate_half`` and ``repeat_interleave`` of the angles). Same frequencies as
    :class:`Rotary`; its own class, so the fused (half-split) kernel is never swapped in for it."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.cos_sin(positions)
        return _rotate_interleaved(q, cos, sin), _rotate_interleaved(k, cos, sin)


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.float()
    x1, x2 = h[..., 0::2], h[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the two halves of the head dimension.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding, (B, Hk, T, D) each."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Grouped-query self-attention: ``n_kv_heads`` key/value heads shared by ``n_heads`` query heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.attn_head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # Per-head q/k norms before rotary. One gain over head_dim shared by the heads (Qwen3) is
        # ``q_norm``; a gain per head (Command R+) is ``q_head_norm``, a distinct name because tensor
        # parallelism splits it with the heads while it replicates the shared one.
        if cfg.qk_norm == "shared":
            self.q_norm = make_norm(cfg, self.head_dim)
            self.k_norm = make_norm(cfg, self.head_dim)
        elif cfg.qk_norm == "per_head":
            self.q_head_norm = make_norm(cfg, (cfg.n_heads, self.head_dim))
            self.k_head_norm = make_norm(cfg, (cfg.n_kv_heads, self.head_dim))
        self.qk_norm = cfg.qk_norm
        rotary = InterleavedRotary if cfg.rope_interleaved else Rotary
        self.rotary = rotary(self.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the weight shapes so that a tensor-parallel rewrite, which shards the
        # projections by heads, needs no change here.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.qk_norm == "shared":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "per_head":
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        q, k = self.rotary(q, k, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)

        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
            if mask is None and T > 1 and past > 0:
                # Chunked prefill after a cached prefix: causal within the chunk, full over the past.
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            is_causal = mask is None and T > 1 and past == 0
        else:
            is_causal = mask is None

        rep = q.shape[1] // k.shape[1]
        if rep > 1 and not _SDPA_HAS_GQA:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        kwargs = {"enable_gqa": True} if rep > 1 and _SDPA_HAS_GQA else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kwargs)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.wo(out)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


@dataclass
class RouterStats:
    """What one :class:`MoEMLP` router did in its latest forward: the inputs of the aux losses.

    Kept as sums so that layers (and micro-batches) pool by adding before dividing, as transformers'
    ``load_balancing_loss_func`` pools the router logits of all layers.
    """

    #: (n_experts,) top-k assignments per expert, as floats (they sum to rows x top_k); no gradient
    assignments: torch.Tensor
    #: (n_experts,) sum over the tokens of each expert's router probability (fp32, differentiable)
    prob_sum: torch.Tensor
    #: sum over the tokens of logsumexp(router logits)^2 (fp32, differentiable)
    z_sum: torch.Tensor
    #: tokens routed
    rows: int

    @property
    def load(self) -> torch.Tensor:
        """(n_experts,) fraction of the top-k assignments each expert received (sums to 1)."""
        return self.assignments / self.assignments.sum().clamp(min=1)

    def aux_loss(self) -> torch.Tensor:
        """This layer's load-balancing loss, ``n_experts * sum_e f_e * P_e`` (see :class:`MoEMLP`)."""
        f = self.assignments / max(self.rows, 1)
        p = self.prob_sum / max(self.rows, 1)
        return f.numel() * (f * p).sum()

    def z_loss(self) -> torch.Tensor:
        return self.z_sum / max(self.rows, 1)


class MoEMLP(nn.Module):
    """Mixtral-style sparse MLP (Jiang et al. 2024, "Mixtral of Experts"): ``n_experts`` SwiGLU experts,
    each token processed by ``top_k`` of them.

    Routing, exactly as transformers' ``MixtralTopKRouter``: ``p = softmax(router(x))`` over *all* experts
    (in fp32), the ``top_k`` largest ``p`` choose the experts, and their ``p`` renormalised to sum to 1
    weight the experts' outputs: ``y = sum_{e in topk} p_e / sum_{topk} p * expert_e(x)``.

    Dispatch is by index: tokens are sorted by expert, each expert runs once on its rows, the weighted
    outputs are added back with ``index_add_``. There is no capacity factor, so no token is ever dropped
    (and none is padded). Every expert runs in every forward, on zero rows if no token chose it, so that
    all data-parallel ranks call the same modules in the same order (DeepSpeed ZeRO-3 gathers parameters
    per module call) and every expert gets a gradient (zeros when unused).

    The experts are :class:`MLP` modules, so ``tanuki.fused.apply_kernels`` swaps each for the fused
    SwiGLU one.

    Each forward stores :class:`RouterStats` in ``self.router_stats`` (the latest forward only); the
    training step turns them into losses with :func:`moe_losses` right after the forward. The
    load-balancing loss is the Switch Transformer one (Fedus et al. 2021, eq. 4-6) as Mixtral computes it:
    ``n_experts * sum_e f_e * P_e``, ``f_e`` = top-k assignments to expert e / tokens (so sum_e f_e =
    top_k), ``P_e`` = mean router probability of e. Its minimum, ``top_k``, is reached by a uniform
    router. The router z-loss is ST-MoE's (Zoph et al. 2022, eq. 5): mean over tokens of
    ``logsumexp(router logits)^2``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.aux_loss_coef = cfg.router_aux_loss_coef
        self.z_loss_coef = cfg.router_z_loss_coef
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.router_stats: Optional[RouterStats] = None

    def route(self, x: torch.Tensor):
        """``(logits, probs, weights, experts)`` for tokens ``x`` (N, dim): router logits (N, E), their
        fp32 softmax (N, E), the renormalised top-k weights (N, k, fp32) and the chosen experts (N, k),
        in descending weight order."""
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, weights, experts = self.route(x)

        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, in token order
        counts = torch.bincount(flat, minlength=self.n_experts)
        rows = order // self.top_k
        sizes = counts.tolist()  # one host sync per layer
        inputs = x[rows].split(sizes)
        gates = weights.reshape(-1)[order].split(sizes)
        outputs = [(expert(xe) * ge[:, None]).to(x.dtype) for expert, xe, ge in zip(self.experts, inputs, gates)]
        out = torch.zeros_like(x).index_add_(0, rows, torch.cat(outputs))

        self.router_stats = RouterStats(
            assignments=counts.detach().float(),
            prob_sum=probs.sum(dim=0),
            z_sum=torch.logsumexp(logits.float(), dim=-1).pow(2).sum(),
            rows=x.shape[0],
        )
        return out.view(shape)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"


def moe_losses(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The router losses of the latest forward of ``model`` (or of a DeepSpeed engine wrapping it).

    Returns ``(loss, stats)``: ``loss = router_aux_loss_coef * aux + router_z_loss_coef * z``, to be added
    to the LM loss; ``stats`` (detached scalars) has ``moe_aux_loss``, ``moe_z_loss``, ``moe_load_max``
    (largest fraction of top-k assignments any expert of any layer got; 1 / n_experts is balanced) and
    ``moe_load_max/layer{i}`` per layer. A dense model gives ``(0, {})``.

    Layers pool as in transformers' ``load_balancing_loss_func`` (the model's ``aux_loss``, which
    ``MixtralForCausalLM`` scales by the same ``router_aux_loss_coef``): ``f`` and ``P`` are summed over
    layers and divided by layers x tokens before the product, ``aux = E * sum_e f_e * P_e``. That is the
    per-layer loss for one layer, and not in general the mean of the per-layer losses (which are
    ``RouterStats.aux_loss``). The z-loss is the mean over layers and tokens. Every token of the batch
    counts (there is no padding mask).
    """
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    if not layers:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu"), {}
    stats = [m.router_stats for m in layers]
    if any(s is None for s in stats):
        raise RuntimeError("moe_losses: run a forward first (an MoE layer has no router statistics)")
    rows = sum(s.rows for s in stats)
    f = torch.stack([s.assignments for s in stats]).sum(0) / rows
    p = torch.stack([s.prob_sum for s in stats]).sum(0) / rows
    aux = layers[0].n_experts * (f * p).sum()
    z = torch.stack([s.z_sum for s in stats]).sum() / rows
    loss = torch.zeros((), device=aux.device)
    if layers[0].aux_loss_coef:
        loss = loss + layers[0].aux_loss_coef * aux
    if layers[0].z_loss_coef:
        loss = loss + layers[0].z_loss_coef * z
    loads = torch.stack([s.load for s in stats]).max(dim=1).values
    out = {"moe_aux_loss": aux.detach(), "moe_z_loss": z.detach(), "moe_load_max": loads.max()}
    for i, v in enumerate(loads):
        out[f"moe_load_max/layer{i}"] = v
    return loss, out


def expert_load(model: nn.Module) -> torch.Tensor:
    """(MoE layers, n_experts): the fraction of top-k assignments per expert in the latest forward."""
    return torch.stack([m.router_stats.load for m in model.modules() if isinstance(m, MoEMLP)])


class Block(nn.Module):
    """One pre-norm decoder layer: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``; with
    ``cfg.parallel_block`` (Cohere) ``y = norm(x); out = x + attn(y) + mlp(y)`` (no ``mlp_norm``).

    ``mlp`` is a dense :class:`MLP`, or a :class:`MoEMLP` when ``cfg.n_experts`` > 0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg, cfg.dim)
        self.attn = Attention(cfg)
        if not self.parallel:
            self.mlp_norm = make_norm(cfg, cfg.dim)
        self.mlp = MoEMLP(cfg) if cfg.n_experts else MLP(cfg)

    def parallel_branches(self, y, positions, mask=None, cache=None):
        """``attn(y) + mlp(y)`` of a parallel block: one tensor-parallel region (one reduction)."""
        return self.attn(y, positions, mask, cache) + self.mlp(y)

    def forward(self, x, positions, mask=None, cache=None):
        if self.parallel:
            return x + self.parallel_branches(self.attn_norm(x), positions, mask, cache)
        a = self.attn(self.attn_norm(x), positions, mask, cache)
        y, h = self.mlp_norm(a, residual=x)  # h = x + a, y = norm(h): one fused kernel on GPU
        return h + self.mlp(y)


class Transformer(nn.Module):
    """Llama-style decoder-only language model. ``forward`` returns logits over ``vocab_size`` rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one parameter, under both names in the state dict
            self.head.weight = self.embed.weight
        #: wraps each block's forward (activation checkpointing); identity by default
        self.checkpoint_fn = None

    def _apply(self, fn, recurse=True):
        # ``to_empty`` (meta-device build) makes a new tensor per module and so unties the head: tie again.
        super()._apply(fn, recurse)
        if self.cfg.tie_embeddings and self.head.weight is not self.embed.weight:
            self.head.weight = self.embed.weight
        return self

    # -- initialisation -----------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: Optional[float] = None,
                     gather: Optional[Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]] = None) -> None:
        """Initialise every parameter deterministically from ``seed``.

        Linear and embedding weights (MoE routers included) ~ N(0, std); the residual output projections
        (``attn.wo`` and every ``w_down``, each expert's too) use ``std / sqrt(2 * n_layers)`` so the residual stream's variance does not grow
        with depth (GPT-2, Radford et al. 2019; Megatron-LM's ``scaled_init_method_normal``, as used by
        llm-jp and Tanuki). Norm weights are ones. Parameters are drawn in a fixed order from one CPU
        generator and then copied to their device, so the values do not depend on the device or on how
        the model is later sharded. Module order fixes the draws: per layer attention, then the router,
        then experts 0, 1, ... (gate, up, down each).

        ``gather(params)``: for parameters that are partitioned as they are created (DeepSpeed ZeRO-3's
        ``zero.Init``), a context manager in which ``params`` are whole (``deepspeed.zero.
        GatheredParameters(params, modifier_rank=0)``; what rank 0 writes is scattered on exit). Every
        rank draws the same numbers in the same order, so the generator state, and the values, are those
        of an unpartitioned model.
        """
        std = self.cfg.init_std if std is None else std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        done: set[int] = set()  # a tied head is the embedding: drawn once
        for name, module in self.named_modules():
            if isinstance(module, (RMSNorm, LayerNorm, Rotary, nn.Linear, nn.Embedding)):
                params = list(module.parameters(recurse=False))
                with gather(params) if gather is not None and params else contextlib.nullcontext():
                    if isinstance(module, (RMSNorm, LayerNorm, Rotary)):
                        module.reset_parameters()
                    elif id(module.weight) not in done:
                        done.add(id(module.weight))
                        s = out_std if name.endswith(("attn.wo", "w_down")) else std
                        w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, s, generator=gen)
                        module.weight.copy_(w)
                        if getattr(module, "bias", None) is not None:
                            module.bias.zero_()

    # -- forward ------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        cache: Optional[list[KVCache]] = None,
        labels: Optional[torch.Tensor] = None,
        head_kwargs: Optional[dict] = None,
    ):
        """Logits ``(B, T, vocab_size)`` for ``tokens`` ``(B, T)``.

        Args:
            positions: ``(B, T)`` rotary positions; default ``0..T-1`` (after the cached length).
            segment_ids: ``(B, T)`` ids of packed samples: attention stays causal *within* equal ids
                (block-diagonal causal mask), so several samples share one row without seeing each other.
            cache: one :class:`KVCache` per layer for incremental decoding.
            labels: ``(B, T)`` targets for a head that computes its loss itself, a chunk of tokens at a
                time (``tanuki.chunked_loss.ChunkedLMHead``): what it returns is returned instead of the
                logits, which then never exist whole. ``head_kwargs`` go to that head.
        """
        h = self.hidden_states(tokens, positions, segment_ids, cache)
        if labels is not None:
            # The head is linear without bias: (W h) * s = W (h * s), so the logit scale goes first.
            if self.cfg.logit_scale != 1.0:
                h = h * self.cfg.logit_scale
            return self.head(h, labels, **(head_kwargs or {}))
        logits = self.head(h)
        if self.cfg.logit_scale != 1.0:
            logits = logits * self.cfg.logit_scale
        return logits

    def hidden_states(self, tokens, positions=None, segment_ids=None, cache=None) -> torch.Tensor:
        """Final-norm hidden states ``(B, T, dim)``: ``forward`` without the output head."""
        B, T = tokens.shape
        window = self.cfg.sliding_window
        if window is not None and (cache[0].length if cache else 0) + T > window:
            raise ValueError(
                f"{(cache[0].length if cache else 0) + T} positions exceed model.sliding_window={window}: tanuki "
                "attends to the full context, which equals the windowed attention only within the window"
            )
        if positions is None:
            start = cache[0].length if cache else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        mask = None if segment_ids is None else segment_mask(segment_ids)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            c = cache[i] if cache is not None else None
            if self.checkpoint_fn is not None and self.training:
                x = self.checkpoint_fn(layer, x, positions, mask, c)
            else:
                x = layer(x, positions, mask, c)
        return self.norm(x)

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def moe_losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted router losses and stats of the latest forward: :func:`moe_losses`."""
        return moe_losses(self)


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``(B, 1, T, T)``: causal, and only between positions of the same segment."""
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


# --------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts as model cards report them: embedding = input embedding + output head.

    ``active`` counts the parameters each token uses: all of them for a dense model; for an MoE model
    the ``top_k`` experts of each layer out of ``n_experts`` (Mixtral 8x7B: 46.7B total, 12.9B active).
    """

    total: int
    embedding: int
    non_embedding: int
    active: int


def count_parameters(model: nn.Module) -> ParamCounts:
    """Count parameters (works on the meta device)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    if model.head.weight is not model.embed.weight:  # a tied head is counted once
        embedding += model.head.weight.numel()
    idle = 0
    for m in model.modules():
        if isinstance(m, MoEMLP):
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            idle += (m.n_experts - m.top_k) * per_expert
    return ParamCounts(total=total, embedding=embedding, non_embedding=total - embedding, active=total - idle)


def param_counts_formula(cfg: ModelConfig) -> ParamCounts:
    """Closed-form parameter counts of :class:`Transformer` for ``cfg``."""
    d, hd = cfg.dim, cfg.attn_head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o and k, v
    if cfg.qkv_bias:
        attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    if cfg.qk_norm == "shared":
        attn += 2 * hd
    elif cfg.qk_norm == "per_head":
        attn += (cfg.n_heads + cfg.n_kv_heads) * hd
    expert = 3 * d * cfg.ffn_dim
    if cfg.n_experts:
        mlp, active_mlp = cfg.n_experts * expert + d * cfg.n_experts, cfg.top_k * expert + d * cfg.n_experts
    else:
        mlp = active_mlp = expert
    per_layer = attn + mlp + (1 if cfg.parallel_block else 2) * d  # the block's norms
    non_embedding = cfg.n_layers * per_layer + d  # final norm
    embedding = (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d
    total = embedding + non_embedding
    return ParamCounts(total=total, embedding=embedding, non_embedding=non_embedding,
                       active=total - cfg.n_layers * (mlp - active_mlp))


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the model on ``meta``, materialise it on ``device`` and initialise it from ``seed``."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model.to(dtype)
