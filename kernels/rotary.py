"""Fused rotary position embedding of q and k in one launch: Triton forward and backward.

Rotary embedding (Su et al. 2021, "RoFormer") in the half-split layout of Hugging Face Llama
(``rotate_half``): a head vector ``x`` of even length ``D`` is split into halves ``x1 = x[:D/2]`` and
``x2 = x[D/2:]``, and pair ``i`` is rotated by ``angle_i = position * inv_freq_i``::

    y1 = x1 cos - x2 sin
    y2 = x2 cos + x1 sin        i.e.  y = R(angle) x,  R = [[cos, -sin], [sin, cos]] per pair

Angles are ``position * inv_freq`` in fp32, exactly the product the PyTorch module forms, and cos/sin are
evaluated in fp32 inside the kernel (Triton lowers ``tl.cos``/``tl.sin`` to libdevice's accurate
``__nv_cosf``/``__nv_sinf`` on NVIDIA GPUs; the interpreter uses numpy). Building cos/sin in bf16 instead
loses the angle entirely at long positions (an ulp of bf16 at 32k is 256 radians). Computing them in the
kernel instead of reading a table saves a pass over a (tokens, D/2) fp32 table per call. The rotation is
done in fp32 and cast back to the input dtype once (bf16 rounding as in :mod:`tanuki_kernels.rms_norm`).

Positions are explicit (B, T) integers, so packed sequences whose positions restart at every document
work; q (B, T, Hq, D) and k (B, T, Hk, D) may have different head counts (grouped-query attention) and
any strides with a unit last stride (views of a fused projection output are read in place).

Backward: R is orthogonal, so the gradient is the inverse rotation ``dx = R(angle)^T dy = R(-angle) dy``::

    dx1 =  dy1 cos + dy2 sin
    dx2 =  dy2 cos - dy1 sin

which is the forward kernel with ``sin`` negated (negation is exact). Outputs are always new tensors:
nothing autograd saved is written in place, and the backward only needs the positions.

Tiling: each program rotates ``BLOCK_T`` tokens x all heads x D/2 pairs of q and then of k, sharing the
cos/sin of its tokens between them. On a GPU the tokens per program and warps are autotuned.

The kernel is registered as the ``torch.library`` custom op ``tanuki::rotary`` with a fake (meta)
implementation, so ``torch.compile`` traces through it without a graph break, and its autograd formula
is attached with ``register_autograd`` (which wraps it in a ``torch.autograd.Function``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from tanuki_kernels import check_launchable, on_gpu

# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """Rotary embedding in PyTorch, the oracle of the kernel: returns rotated ``(q, k)`` in their dtypes.

    ``q`` (B, T, Hq, D), ``k`` (B, T, Hk, D), ``positions`` (B, T) integers, ``inv_freq`` (D/2,).
    Angles and cos/sin in fp32; the rotation in fp32 (fp64 for fp64 inputs).
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (B, T, D/2)
    cos = angles.cos()[:, :, None, :]
    sin = angles.sin()[:, :, None, :]

    def rotate(x):
        compute = torch.promote_types(x.dtype, torch.float32)
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        c, s = cos.to(compute), sin.to(compute)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(
    Q, K, Q_OUT, K_OUT, POS, INV_FREQ,
    n_tokens, seq_len, n_q_heads, n_k_heads, half_dim,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_qob, stride_qot, stride_qoh,
    stride_kob, stride_kot, stride_koh,
    stride_pb, stride_pt,
    INVERSE: tl.constexpr,  # rotate by -angle (the backward)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs (gradcheck)
    OUT_IS_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat token index b * T + t
    tok_mask = tok < n_tokens
    b = tok // seq_len
    t = tok % seq_len
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half_dim

    pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=tok_mask, other=0).to(tl.float32)
    inv_freq = tl.load(INV_FREQ + d, mask=d_mask, other=0.0).to(tl.float32)
    angle = pos[:, None] * inv_freq[None, :]  # (BLOCK_T, BLOCK_HALF), fp32 as in the reference
    cos = tl.cos(angle).to(COMPUTE)[:, None, :]
    sin = tl.sin(angle).to(COMPUTE)[:, None, :]
    if INVERSE:
        sin = -sin

    # q: (BLOCK_T, BLOCK_HQ, BLOCK_HALF) tile of first halves; second halves lie half_dim further.
    hq = tl.arange(0, BLOCK_HQ)
    mask = tok_mask[:, None, None] & (hq < n_q_heads)[None, :, None] & d_mask[None, None, :]
    src = Q + b[:, None, None] * stride_qb + t[:, None, None] * stride_qt + hq[None, :, None] * stride_qh
    x1 = tl.load(src + d[None, None, :], mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(src + half_dim + d[None, None, :], mask=mask, other=0.0).to(COMPUTE)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if OUT_IS_BF16:  # round to nearest even (see tanuki_kernels.rms_norm)
        bits = y1.to(tl.uint32, bitcast=True)
        y1 = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = y2.to(tl.uint32, bitcast=True)
        y2 = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    dst = Q_OUT + b[:, None, None] * stride_qob + t[:, None, None] * stride_qot + hq[None, :, None] * stride_qoh
    tl.store(dst + d[None, None, :], y1, mask=mask)
    tl.store(dst + half_dim + d[None, None, :], y2, mask=mask)

    # k: the same with its own head count and strides.
    hk = tl.arange(0, BLOCK_HK)
    mask = tok_mask[:, None, None] & (hk < n_k_heads)[None, :, None] & d_mask[None, None, :]
    src = K + b[:, None, None] * stride_kb + t[:, None, None] * stride_kt + hk[None, :, None] * stride_kh
    x1 = tl.load(src + d[None, None, :], mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(src + half_dim + d[None, None, :], mask=mask, other=0.0).to(COMPUTE)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if OUT_IS_BF16:
        bits = y1.to(tl.uint32, bitcast=True)
        y1 = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = y2.to(tl.uint32, bitcast=True)
        y2 = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    dst = K_OUT + b[:, None, None] * stride_kob + t[:, None, None] * stride_kot + hk[None, :, None] * stride_koh
    tl.store(dst + d[None, None, :], y1, mask=mask)
    tl.store(dst + half_dim + d[None, None, :], y2, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _gpu_configs(tile_per_token: int) -> list:
    # Tokens per program x warps, keeping 4 to 64 elements of the q tile per thread.
    configs = [
        triton.Config({"BLOCK_T": tokens}, num_warps=warps)
        for tokens in (1, 2, 4, 8)
        for warps in (2, 4, 8)
        if 4 <= tokens * tile_per_token // (32 * warps) <= 64
    ]
    return configs or [triton.Config({"BLOCK_T": 1}, num_warps=4)]


@functools.lru_cache(maxsize=None)
def _autotuned(tile_per_token: int):
    configs = _gpu_configs(tile_per_token)
    return triton.autotune(configs=configs, key=["n_q_heads", "n_k_heads", "half_dim"])(_rotary_kernel)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _output(out: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or out.stride(-1) != 1:
        raise ValueError(f"rotary: out must be {like.dtype} of shape {tuple(like.shape)} with a unit last stride")
    return out


def rotary_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    inverse: bool = False,
    tokens_per_program: int = 0,
    *,
    q_out: Optional[torch.Tensor] = None,
    k_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: rotate ``q`` and ``k`` by ``+angle`` (or ``-angle`` when ``inverse``).

    Returns new contiguous tensors in the input dtypes, or writes into ``q_out`` / ``k_out`` (any
    strides with a unit last stride). ``tokens_per_program`` = 0 chooses automatically (autotuned on a
    GPU).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rotary: q and k must be (B, T, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, n_q_heads, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"rotary: k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, T or D")
    if D % 2 or inv_freq.shape != (D // 2,):
        raise ValueError(f"rotary: head dim {D} must be even with inv_freq of shape ({D // 2},)")
    if q.dtype != k.dtype:
        raise ValueError(f"rotary: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"rotary: positions must be integers, got {positions.dtype}")
    if tokens_per_program < 0 or tokens_per_program & (tokens_per_program - 1):
        raise ValueError(f"rotary: tokens_per_program must be 0 (automatic) or a power of two: {tokens_per_program}")
    positions = positions.expand(B, T)
    check_launchable(_rotary_kernel, q, k, positions, inv_freq)
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    q_out = _output(q_out, q)
    k_out = _output(k_out, k)
    n_tokens, n_k_heads, half = B * T, k.shape[2], D // 2
    if n_tokens == 0:
        return q_out, k_out
    block_hq, block_hk = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    block_half = triton.next_power_of_2(half)
    args = (
        q, k, q_out, k_out, positions, inv_freq,
        n_tokens, T, n_q_heads, n_k_heads, half,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], *positions.stride(),
    )
    flags = dict(
        INVERSE=inverse,
        COMPUTE=tl.float64 if q.dtype == torch.float64 else tl.float32,
        OUT_IS_BF16=q.dtype == torch.bfloat16,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
    )
    if on_gpu(q) and tokens_per_program == 0:
        _autotuned(block_hq * block_half)[lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]),)](*args, **flags)
    else:
        if tokens_per_program == 0:
            # Interpreter: about 16k elements per tile (one numpy operation each).
            per_token = (block_hq + block_hk) * block_half
            fit = max(1, 16384 // per_token)
            tokens_per_program = min(triton.next_power_of_2(n_tokens), 1 << (fit.bit_length() - 1))
        _rotary_kernel[(triton.cdiv(n_tokens, tokens_per_program),)](*args, **flags, BLOCK_T=tokens_per_program)
    return q_out, k_out


# --------------------------------------------------------------------------------------------------
# Custom op (opaque to torch.compile, with fake implementation and autograd formula)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("tanuki::rotary", mutates_args=())
def _rotary_op(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    inverse: bool,
    tokens_per_program: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_forward(q, k, positions, inv_freq, inverse, tokens_per_program)


@_rotary_op.register_fake
def _(q, k, positions, inv_freq, inverse, tokens_per_program):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


def _setup_context(ctx, inputs, output):
    q, k, positions, inv_freq, inverse, tokens_per_program = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.inverse, ctx.tokens_per_program = inverse, tokens_per_program


def _rotary_grad(ctx, dq, dk):
    positions, inv_freq = ctx.saved_tensors
    # The inverse rotation; through the op itself, so the backward is differentiable too.
    dq, dk = _rotary_op(dq, dk, positions, inv_freq, not ctx.inverse, ctx.tokens_per_program)
    return dq, dk, None, None, None, None


_rotary_op.register_autograd(_rotary_grad, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    tokens_per_program: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` (B, T, Hq, D) and ``k`` (B, T, Hk, D) at ``positions`` (B, T); differentiable.

    Same results as :func:`rotary_ref`. ``tokens_per_program`` = 0 picks the tile automatically.
    """
    return _rotary_op(q, k, positions, inv_freq, False, tokens_per_program)


class Rotary(nn.Module):
    """Rotary embedding module running the fused kernel; ``forward(q, k, positions)`` as :func:`apply_rotary`."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return apply_rotary(q, k, positions, self.inv_freq)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
