"""Fused SwiGLU activation ``silu(gate) * up``: Triton forward and backward.

The MLP of a Llama block is ``down(silu(gate(x)) * up(x))`` (Shazeer 2020, "GLU Variants Improve
Transformer"). Between the projections everything is elementwise. Eager PyTorch reads ``gate``, writes
``silu(gate)``, reads that back with ``up`` and writes the product (five passes over an ffn-sized
tensor), and autograd keeps ``gate``, ``silu(gate)`` and ``up`` for the backward. The fused kernel reads
``gate`` and ``up`` once and writes the product (three passes); the backward keeps only ``gate`` and
``up`` and recomputes the sigmoid.

Rounding follows eager PyTorch in the inputs' dtype, so bf16 results agree bit for bit up to the last
ulp of the exponential::

    s = round(silu(g)),  silu(g) = g * sigmoid(g)    evaluated in fp32
    p = round(s * u)

Backward, given ``dp`` (the formulas autograd applies to ``mul`` and ``silu``)::

    du = round(dp * s)
    ds = round(dp * u)
    dg = round(ds * dsilu(g)),  dsilu(g) = d/dg [g sigmoid(g)] = sigmoid(g) * (1 + g * (1 - sigmoid(g)))

``round`` is to nearest even in bf16 through the bit pattern, as in :mod:`tanuki_kernels.rms_norm`
(Triton's CPU interpreter truncates on its own bf16 casts).

The kernels are registered as the ``torch.library`` custom ops ``tanuki::swiglu`` and
``tanuki::swiglu_backward`` with fake (meta) implementations, so ``torch.compile`` traces through them
without a graph break; the autograd formula is attached with ``register_autograd`` (which wraps it in a
``torch.autograd.Function``). Each program handles ``BLOCK_SIZE`` consecutive elements of the flattened
tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from tanuki_kernels import check_launchable, on_gpu

# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in eager PyTorch (the oracle of the kernels)."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_forward_kernel(
    G, U, P,
    n_elements,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs (gradcheck)
    IS_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    g = tl.load(G + offsets, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(COMPUTE)
    s = g / (1.0 + tl.exp(-g))
    if IS_BF16:  # round to nearest even, as the eager silu output is
        bits = s.to(tl.uint32, bitcast=True)
        s = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        s = s.to(P.dtype.element_ty).to(COMPUTE)
    p = s * u
    if IS_BF16:
        bits = p.to(tl.uint32, bitcast=True)
        p = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(P + offsets, p, mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    DP, G, U, DG, DU,
    n_elements,
    COMPUTE: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dp = tl.load(DP + offsets, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(COMPUTE)
    sig = 1.0 / (1.0 + tl.exp(-g))
    s = g * sig
    if IS_BF16:  # s, du and ds are bf16 tensors in eager autograd
        bits = s.to(tl.uint32, bitcast=True)
        s = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        s = s.to(DG.dtype.element_ty).to(COMPUTE)
    du = dp * s
    ds = dp * u
    if IS_BF16:
        bits = du.to(tl.uint32, bitcast=True)
        du = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = ds.to(tl.uint32, bitcast=True)
        ds = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        ds = ds.to(DG.dtype.element_ty).to(COMPUTE)
    dg = ds * sig * (1.0 + g * (1.0 - sig))  # aten's silu_backward, in its order
    if IS_BF16:
        bits = dg.to(tl.uint32, bitcast=True)
        dg = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(DG + offsets, dg, mask=mask)
    tl.store(DU + offsets, du, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _block_size(n_elements: int, gpu: bool, block_size: int) -> int:
    if block_size:
        if block_size & (block_size - 1):
            raise ValueError(f"swiglu: block_size must be a power of two, got {block_size}")
        return block_size
    # GPU: 1024 elements per program (8 per thread at 4 warps); interpreter: large tiles, one numpy
    # operation each.
    return 1024 if gpu else min(16384, triton.next_power_of_2(max(n_elements, 1)))


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must match, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, block_size: int = 0,
                   *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the forward kernel: ``silu(gate) * up`` as a new contiguous tensor (or into ``out``).

    ``block_size`` = 0 chooses the elements per program automatically.
    """
    _check(gate, up)
    check_launchable(_swiglu_forward_kernel, gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    if out is None:
        out = torch.empty_like(gate)
    elif out.shape != gate.shape or out.dtype != gate.dtype or not out.is_contiguous():
        raise ValueError("swiglu: out must be contiguous with the shape and dtype of gate")
    n = gate.numel()
    if n == 0:
        return out
    block = _block_size(n, on_gpu(gate), block_size)
    _swiglu_forward_kernel[(triton.cdiv(n, block),)](
        gate, up, out, n,
        COMPUTE=tl.float64 if gate.dtype == torch.float64 else tl.float32,
        IS_BF16=gate.dtype == torch.bfloat16,
        BLOCK_SIZE=block,
    )
    return out


def swiglu_backward(dp: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    block_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns ``(dgate, dup)`` for the gradient ``dp`` of the product."""
    _check(gate, up)
    check_launchable(_swiglu_backward_kernel, dp, gate, up)
    dp, gate, up = dp.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n == 0:
        return dg, du
    block = _block_size(n, on_gpu(gate), block_size)
    _swiglu_backward_kernel[(triton.cdiv(n, block),)](
        dp, gate, up, dg, du, n,
        COMPUTE=tl.float64 if gate.dtype == torch.float64 else tl.float32,
        IS_BF16=gate.dtype == torch.bfloat16,
        BLOCK_SIZE=block,
    )
    return dg, du


# --------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake implementations and autograd formula)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("tanuki::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, block_size: int) -> torch.Tensor:
    return swiglu_forward(gate, up, block_size)


@_swiglu_op.register_fake
def _(gate, up, block_size):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("tanuki::swiglu_backward", mutates_args=())
def _swiglu_backward_op(
    dp: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward(dp, gate, up, block_size)


@_swiglu_backward_op.register_fake
def _(dp, gate, up, block_size):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device), torch.empty(
        up.shape, dtype=up.dtype, device=up.device
    )


def _setup_context(ctx, inputs, output):
    gate, up, block_size = inputs
    ctx.save_for_backward(gate, up)
    ctx.block_size = block_size


def _swiglu_grad(ctx, dp):
    gate, up = ctx.saved_tensors
    dg, du = _swiglu_backward_op(dp, gate, up, ctx.block_size)
    return dg, du, None


_swiglu_op.register_autograd(_swiglu_grad, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, block_size: int = 0) -> torch.Tensor:
    """Fused ``silu(gate) * up``, differentiable, same results as :func:`swiglu_ref`."""
    return _swiglu_op(gate, up, block_size)


class SwiGLU(nn.Module):
    """The SwiGLU activation as a module: ``forward(gate, up) = silu(gate) * up`` through the fused kernel."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)
