"""Fused RMSNorm, optionally with the residual add in front of it: Triton forward and backward.

For one row ``h`` of length ``N`` (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")::

    r = 1 / sqrt(mean(h^2) + eps)        statistics in fp32
    n = h * r                            fp32
    c = n rounded to the dtype of x      the Hugging Face Llama casting order ...
    y = w * c                            ... weight applied after the cast; dtype = promote(w, x)

With a residual, ``h = x + residual`` (rounded to the dtype of x, as the eager add is) and both ``y`` and
``h`` are returned: every pre-norm block does ``h = x + attn(...)`` followed by ``norm(h)``, so reading
``x`` and ``residual`` once and writing ``y`` and ``h`` saves a full pass over the residual stream.

Backward, for one row, given ``dy``. Autograd through the reference casts the gradient reaching ``c``
to the dtype of x and passes it through the cast unchanged; we do the same::

    dc  = round_x(dy * w)                gradient of y = w * c with respect to c
    dw  = sum over rows of dy * c        accumulated in fp32 per program, then summed in fp32

    n_j = h_j r,  r = (m + eps)^(-1/2),  m = (1/N) sum_i h_i^2
    dr/dh_j = -1/2 (m + eps)^(-3/2) * 2 h_j / N = -r^3 h_j / N
    dh_j = r dc_j + sum_i dc_i h_i * dr/dh_j
         = r dc_j - (r^3 h_j / N) sum_i dc_i h_i
         = r (dc_j - n_j * (1/N) sum_i dc_i n_i)

With the residual add, ``dx = dresidual = dh + dh_out`` where ``dh_out`` is the gradient of the returned
sum. ``r`` is not saved by the forward: the backward loads the row anyway, and recomputing the reduction
costs no memory traffic in a memory-bound kernel.

Each program handles ``ROWS_PER_PROGRAM`` rows as one [rows, BLOCK_SIZE] tile (BLOCK_SIZE = hidden size
rounded up to a power of two, masked). The backward grid is persistent: a fixed number of programs walk
over the row tiles and each keeps its partial weight gradient in fp32 registers, written once at the end;
the partials are summed in fp32 by PyTorch (summing them in bf16 is a known source of bad weight
gradients). On a GPU the rows per program and warps are autotuned; in the interpreter they are chosen to
keep tiles large, since there every tile is one numpy operation.

The kernels are registered as ``torch.library`` custom ops (``tanuki::rms_norm``,
``tanuki::rms_norm_residual``, ``tanuki::rms_norm_backward``) with fake (meta) implementations, so
``torch.compile`` traces through them without a graph break; the autograd formula is attached with
``register_autograd`` (which wraps it in a ``torch.autograd.Function``).

bf16 rounding: the kernels round fp32 values to bf16 with an explicit round-to-nearest-even on the bit
pattern (add 0x7FFF plus the lowest kept bit, clear the low 16 bits) before every bf16 store and every
intermediate cast. On a GPU this equals the hardware conversion; Triton's CPU interpreter instead
truncates on ``.to(tl.bfloat16)`` and on bf16 stores, so the explicit rounding is what makes the
interpreter tests bit-comparable with PyTorch. NaNs produced by arithmetic are quiet (bit 22 set) and
stay NaN through the trick.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from tanuki_kernels import check_launchable, num_sms, on_gpu

#: Widest row kept in registers by one program.
MAX_HIDDEN = 65536


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
):
    """RMSNorm in PyTorch with the Hugging Face Llama casting order (the oracle of the kernels).

    Returns ``norm(x)``, or ``(norm(x + residual), x + residual)`` when ``residual`` is given.
    """
    if residual is not None:
        h = x + residual
        return rms_norm_ref(h, weight, eps), h
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_forward_kernel(
    X, RES, W, Y, H_OUT,
    stride_x, stride_res, stride_y, stride_h,
    n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 when every input is fp64 (gradcheck)
    X_IS_BF16: tl.constexpr,
    Y_IS_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
):
    # int64 row offsets: rows * stride overflows int32 past 2^31 elements.
    rows = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]

    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    if HAS_RESIDUAL:
        h += tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        if X_IS_BF16:  # round to nearest even (module docstring)
            bits = h.to(tl.uint32, bitcast=True)
            h = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            h = h.to(X.dtype.element_ty).to(COMPUTE)
        tl.store(H_OUT + rows[:, None] * stride_h + cols[None, :], h, mask=mask)

    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    n = h * rstd[:, None]
    if X_IS_BF16:
        bits = n.to(tl.uint32, bitcast=True)
        c = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        c = n.to(X.dtype.element_ty).to(COMPUTE)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE)
    y = w[None, :] * c
    if Y_IS_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY, DH_OUT, H, W, DX, DW_PARTIAL,
    stride_dy, stride_dh_out, stride_h, stride_dx,
    n_rows, n_cols, eps,
    HAS_DH_OUT: tl.constexpr,
    COMPUTE: tl.constexpr,
    X_IS_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(COMPUTE)
    dw = tl.zeros([BLOCK_SIZE], dtype=COMPUTE)

    # Persistent loop: program p takes row tiles p, p + n_programs, p + 2 n_programs, ...
    n_tiles = tl.cdiv(n_rows, ROWS_PER_PROGRAM)
    for tile in range(pid, n_tiles, n_programs):
        # Tile indices stay far below 2^31; the int64 cast is for the element offsets below.
        rows = (tile * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]

        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
        n = h * rstd[:, None]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)

        # dw += dy * c with c = round_x(n), as in the forward
        if X_IS_BF16:
            bits = n.to(tl.uint32, bitcast=True)
            c = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            c = n.to(DX.dtype.element_ty).to(COMPUTE)
        dw += tl.sum(dy * c, axis=0)

        # dc = round_x(dy * w); dh = r (dc - n mean(dc n))
        dc = dy * w[None, :]
        if X_IS_BF16:
            bits = dc.to(tl.uint32, bitcast=True)
            dc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            dc = dc.to(DX.dtype.element_ty).to(COMPUTE)
        dot = tl.sum(dc * n, axis=1) / n_cols
        dh = rstd[:, None] * (dc - n * dot[:, None])
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + rows[:, None] * stride_dh_out + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        if X_IS_BF16:
            bits = dh.to(tl.uint32, bitcast=True)
            dh = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dh, mask=mask)

    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _block_size(n_cols: int) -> int:
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n_cols} exceeds the {MAX_HIDDEN} a row tile holds")
    return triton.next_power_of_2(n_cols)


def _check_rows(rows_per_program: int) -> None:
    if rows_per_program < 0 or rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rms_norm: rows_per_program must be 0 (automatic) or a power of two, got {rows_per_program}")


def _interpreter_rows(n_rows: int, block_size: int) -> int:
    # The interpreter runs one numpy operation per tile: about 16k elements per tile keeps it fast.
    return max(1, min(triton.next_power_of_2(n_rows), 16384 // block_size))


def _gpu_configs(block_size: int) -> list:
    # Rows per program x warps, keeping 4 to 64 elements of a tile per thread (fewer wastes threads,
    # more spills registers); several rows per program pay off for narrow rows only.
    configs = []
    for rows in (1, 2, 4, 8, 16):
        for warps in (4, 8, 16):
            if 4 <= rows * block_size // (32 * warps) <= 64:
                configs.append(triton.Config({"ROWS_PER_PROGRAM": rows}, num_warps=warps))
    return configs or [triton.Config({"ROWS_PER_PROGRAM": 1}, num_warps=4)]


@functools.lru_cache(maxsize=None)
def _autotuned(kernel_name: str, block_size: int):
    kernel = {"forward": _rms_norm_forward_kernel, "backward": _rms_norm_backward_kernel}[kernel_name]
    return triton.autotune(configs=_gpu_configs(block_size), key=["n_cols"])(kernel)


def _compute_dtype(*tensors: torch.Tensor):
    return tl.float64 if all(t.dtype == torch.float64 for t in tensors) else tl.float32


def _rows_2d(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    # (..., N) -> (rows, N) without a copy when the leading dims collapse; unit column stride required.
    t = t.reshape(-1, n_cols)
    return t if t.stride(1) == 1 else t.contiguous()


def _output(out: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"rms_norm: out must be {dtype} of shape {tuple(shape)} on {device}")
    return out


def _rows_view(out: torch.Tensor, n_cols: int) -> torch.Tensor:
    # Outputs are written through this view, so it must not be a copy.
    rows = out.view(-1, n_cols)
    if rows.stride(1) != 1:
        raise ValueError("rms_norm: outputs need a unit stride along the hidden dimension")
    return rows


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    rows_per_program: int = 0,
    *,
    out: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the forward kernel: returns ``(y, h)`` with ``h = x + residual`` (``None`` without residual).

    ``rows_per_program`` = 0 chooses automatically (autotuned on a GPU). ``out`` and ``residual_out``
    are optional preallocated outputs (any row stride, unit column stride).
    """
    n_cols = x.shape[-1]
    _check_rows(rows_per_program)
    if weight.shape != (n_cols,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("rms_norm: residual must have the shape and dtype of x")
    check_launchable(_rms_norm_forward_kernel, x, weight, *([] if residual is None else [residual]))

    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = _output(out, x.shape, out_dtype, x.device)
    h = None if residual is None else _output(residual_out, x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return y, h
    x2 = _rows_2d(x, n_cols)
    n_rows = x2.shape[0]
    r2 = x2 if residual is None else _rows_2d(residual, n_cols)
    y2 = _rows_view(y, n_cols)
    h2 = y2 if h is None else _rows_view(h, n_cols)  # unused pointer without residual
    block = _block_size(n_cols)
    args = (x2, r2, weight, y2, h2, x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), n_rows, n_cols, eps)
    flags = dict(
        HAS_RESIDUAL=residual is not None,
        COMPUTE=_compute_dtype(x, weight),
        X_IS_BF16=x.dtype == torch.bfloat16,
        Y_IS_BF16=out_dtype == torch.bfloat16,
        BLOCK_SIZE=block,
    )
    if on_gpu(x) and rows_per_program == 0:
        kernel = _autotuned("forward", block)
        kernel[lambda meta: (triton.cdiv(n_rows, meta["ROWS_PER_PROGRAM"]),)](*args, **flags)
    else:
        rows = rows_per_program or (_interpreter_rows(n_rows, block) if not on_gpu(x) else 1)
        _rms_norm_forward_kernel[(triton.cdiv(n_rows, rows),)](*args, **flags, ROWS_PER_PROGRAM=rows)
    return y, h


def rms_norm_backward(
    dy: torch.Tensor,
    dh_out: Optional[torch.Tensor],
    h: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    rows_per_program: int = 0,
    num_programs: int = 0,
    *,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns ``(dh, dweight)``.

    ``h`` is the normalised input (``x``, or ``x + residual``); ``dh`` is the gradient of both ``x`` and
    ``residual``; ``dh_out`` is the gradient of the returned sum (``None`` without residual). The
    persistent grid has ``num_programs`` programs (0: twice the SM count on a GPU). ``out`` is an
    optional preallocated ``dh``.
    """
    n_cols = h.shape[-1]
    _check_rows(rows_per_program)
    check_launchable(_rms_norm_backward_kernel, dy, h, weight, *([] if dh_out is None else [dh_out]))
    dx = _output(out, h.shape, h.dtype, h.device)
    if h.numel() == 0:
        return dx, torch.zeros_like(weight)
    h2 = _rows_2d(h, n_cols)
    dy2 = _rows_2d(dy, n_cols)
    dho2 = dy2 if dh_out is None else _rows_2d(dh_out, n_cols)  # unused pointer without residual
    dx2 = _rows_view(dx, n_cols)
    n_rows = h2.shape[0]
    block = _block_size(n_cols)
    gpu = on_gpu(h)
    rows = rows_per_program or (1 if gpu else _interpreter_rows(n_rows, block))
    if num_programs == 0:
        num_programs = 2 * num_sms(h.device.index or 0) if gpu else 4
    # Never more programs than rows, and with explicit rows never more than tiles.
    num_programs = max(1, min(num_programs, n_rows if gpu and rows_per_program == 0 else triton.cdiv(n_rows, rows)))
    compute = _compute_dtype(h, weight)
    dw_partial = torch.empty(
        (num_programs, n_cols), dtype=torch.float64 if compute == tl.float64 else torch.float32, device=h.device
    )
    args = (dy2, dho2, h2, weight, dx2, dw_partial, dy2.stride(0), dho2.stride(0), h2.stride(0), dx2.stride(0),
            n_rows, n_cols, eps)
    flags = dict(HAS_DH_OUT=dh_out is not None, COMPUTE=compute, X_IS_BF16=h.dtype == torch.bfloat16,
                 BLOCK_SIZE=block)
    if gpu and rows_per_program == 0:
        _autotuned("backward", block)[(num_programs,)](*args, **flags)
    else:
        _rms_norm_backward_kernel[(num_programs,)](*args, **flags, ROWS_PER_PROGRAM=rows)
    # Cross-program reduction of the weight gradient in fp32 (fp64 for fp64 inputs), then one cast.
    return dx, dw_partial.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake implementations and autograd formulas)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("tanuki::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, rows_per_program: int) -> torch.Tensor:
    return rms_norm_forward(x, weight, eps, None, rows_per_program)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps, rows_per_program):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("tanuki::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, rows_per_program: int
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = rms_norm_forward(x, weight, eps, residual, rows_per_program)
    return y, h


@_rms_norm_residual_op.register_fake
def _(x, residual, weight, eps, rows_per_program):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), torch.empty_like(x)


@torch.library.custom_op("tanuki::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    dh_out: Optional[torch.Tensor],
    h: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    rows_per_program: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, dh_out, h, weight, eps, rows_per_program)


@_rms_norm_backward_op.register_fake
def _(dy, dh_out, h, weight, eps, rows_per_program):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    ctx.eps, ctx.rows_per_program = inputs[-2], inputs[-1]
    weight = inputs[-3]
    h = inputs[0] if isinstance(output, torch.Tensor) else output[1]  # the sum is saved, not recomputed
    ctx.save_for_backward(h, weight)


def _rms_norm_grad(ctx, dy):
    h, weight = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, None, h, weight, ctx.eps, ctx.rows_per_program)
    return dx, dw, None, None


def _rms_norm_residual_grad(ctx, dy, dh_out):
    h, weight = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, dh_out, h, weight, ctx.eps, ctx.rows_per_program)
    # x and residual enter through the same sum, so they get the same gradient (as for torch.add).
    return dx, dx, dw, None, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_setup_context)
_rms_norm_residual_op.register_autograd(_rms_norm_residual_grad, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    *,
    rows_per_program: int = 0,
):
    """Fused RMSNorm of ``x`` (..., N) with ``weight`` (N,), differentiable, same results as :func:`rms_norm_ref`.

    With ``residual`` returns ``(norm(x + residual), x + residual)``; when the two dtypes differ (an fp32
    residual stream with bf16 block outputs under autocast) both are promoted first, as ``x + residual``
    would. ``rows_per_program`` = 0 picks the tile height automatically (autotuned on a GPU).
    """
    if residual is None:
        return _rms_norm_op(x, weight, float(eps), rows_per_program)
    if residual.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    return _rms_norm_residual_op(x, residual, weight, float(eps), rows_per_program)


class RMSNorm(nn.Module):
    """RMSNorm module running the fused kernel: ``forward(x, residual=None)`` as :func:`rms_norm`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
