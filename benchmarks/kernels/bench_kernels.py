"""Fused RMSNorm, rotary and SwiGLU kernels against eager PyTorch, torch.compile and Liger-Kernel, on a GPU.

Usage:
    python benchmarks/kernels/bench_kernels.py                 # all shapes -> benchmarks/results/kernels.md
    python benchmarks/kernels/bench_kernels.py --quick --out /tmp/kernels.md
    python benchmarks/kernels/bench_kernels.py --ops rms_norm  # one op only

Without a CUDA GPU it says so and exits 0. ``--smoke`` instead runs tiny shapes on CPU through Triton's
interpreter (``TRITON_INTERPRET=1`` must be set) with a wall-clock timer: it checks the script, not speed.

The claim (issue 7, for RMSNorm and rotary): these memory-bound ops should run at >= 85% of the
bandwidth floor and faster than ``torch.compile`` of the PyTorch reference on every shape. Shapes come
from the real model sizes, bf16: tokens 4096-16384 x hidden 2048/4096/5120 for RMSNorm (plain and with
the fused residual add), q/k with 32/8 heads of dim 128 for rotary, and ffn 7168/14336 (the 1.8b and 8b
sizes) for SwiGLU. For each op, shape and pass (forward, forward+backward) the table gives the median
time, the achieved bandwidth counting only the bytes the op must move (every input read once, every
output written once), and that as a percentage of the *floor*: the time a device-to-device copy of the
same number of bytes takes, measured here. Every implementation's output is first checked against eager
PyTorch.

Implementations: ``eager`` = the modules of tanuki.model (what model.kernels=torch runs); ``compile`` =
torch.compile of the same reference (one compile per shape); ``triton`` = tanuki_kernels (autotuned on
first use, outside the timing); ``liger`` = Liger-Kernel's LigerRMSNorm / LigerFusedAddRMSNorm /
liger_rotary_pos_emb / LigerSiLUMulFunction in the Llama casting mode, when liger-kernel is installed.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "kernels.md"

TOKENS = (4096, 8192, 16384)
HIDDEN = (2048, 4096, 5120)
Q_HEADS, K_HEADS, HEAD_DIM, SEQ_LEN = 32, 8, 128, 4096
FFN = (7168, 14336)
EPS = 1e-5
GOAL_FRACTION_OF_FLOOR = 0.85


@dataclass
class Case:
    """One op at one shape: the implementations to time and the bytes each pass must move."""

    op: str
    shape: str
    fwd_bytes: int
    bwd_bytes: int
    # impl name -> (forward fn, forward+backward fn); each returns the tensors to check
    impls: dict[str, tuple[Callable[[], tuple], Callable[[], tuple]]]


# --------------------------------------------------------------------------------------------------
# Timing and the bandwidth floor
# --------------------------------------------------------------------------------------------------


def time_ms(fn: Callable, smoke: bool) -> float:
    """Median milliseconds of ``fn`` (CUDA events with an L2 flush on a GPU; wall clock in smoke mode)."""
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted), the floor of a memory-bound op."""
    n = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / (time_ms(lambda: dst.copy_(src), smoke) * 1e-3)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def _forward_backward(forward: Callable[[], tuple], inputs: list[torch.Tensor]) -> Callable[[], tuple]:
    """A closure running ``forward`` then the backward pass from fixed random output gradients."""
    cotangents: list[Optional[list[torch.Tensor]]] = [None]

    def run():
        outputs = forward()
        if cotangents[0] is None:
            g = torch.Generator(device=outputs[0].device).manual_seed(0)
            cotangents[0] = [torch.randn(o.shape, generator=g, device=o.device).to(o.dtype) for o in outputs]
        return torch.autograd.grad(outputs, inputs, cotangents[0])

    return run


def _compiled(fn: Callable, backend: str) -> Callable:
    # Static shapes: one graph per shape, compiled on the case's first call (run_case resets dynamo
    # before each case, so the recompile limit is never reached).
    return torch.compile(fn, backend=backend, dynamic=False)


def rms_norm_cases(device, dtype, tokens_list, hidden_list, compile_backend) -> list[Case]:
    from tanuki.model import RMSNorm
    from tanuki_kernels import rms_norm_ref
    from tanuki_kernels.rms_norm import rms_norm

    liger = _liger_rms_norm()
    cases = []
    e = torch.finfo(dtype).bits // 8
    for residual in (False, True):
        for tokens in tokens_list:
            for hidden in hidden_list:
                g = torch.Generator(device=device).manual_seed(tokens + hidden)
                x = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype, requires_grad=True)
                r = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype, requires_grad=True)
                eager = RMSNorm(hidden, EPS).to(device=device, dtype=dtype)
                with torch.no_grad():
                    eager.weight.uniform_(0.5, 1.5, generator=g)
                w = eager.weight
                inputs = [x, r, w] if residual else [x, w]

                def as_tuple(out):
                    return out if isinstance(out, tuple) else (out,)

                res = r if residual else None
                compiled_ref = _compiled(rms_norm_ref, compile_backend)
                forwards = {
                    "eager": lambda res=res, eager=eager, x=x: as_tuple(eager(x, res)),
                    "compile": lambda res=res, f=compiled_ref, x=x, w=w: as_tuple(f(x, w, EPS, res)),
                    "triton": lambda res=res, x=x, w=w: as_tuple(rms_norm(x, w, EPS, res)),
                }
                if liger is not None:
                    forwards["liger"] = liger(hidden, w, residual, x, res)
                n = tokens * hidden * e
                # forward reads x (and residual), writes y (and the sum); backward reads dy (and the sum's
                # gradient) and the saved input, writes dx. The weight and per-row statistics are negligible.
                cases.append(Case(
                    op="rms_norm + residual" if residual else "rms_norm",
                    shape=f"{tokens} x {hidden}",
                    fwd_bytes=(4 if residual else 2) * n,
                    bwd_bytes=(4 if residual else 3) * n,
                    impls={k: (f, _forward_backward(f, inputs)) for k, f in forwards.items()},
                ))
    return cases


def rotary_cases(device, dtype, tokens_list, compile_backend, seq_len=SEQ_LEN, heads=(Q_HEADS, K_HEADS),
                 head_dim=HEAD_DIM) -> list[Case]:
    from tanuki.model import Rotary
    from tanuki_kernels import apply_rotary, rotary_ref

    liger = _liger_rotary()
    cases = []
    e = torch.finfo(dtype).bits // 8
    for tokens in tokens_list:
        B, T = max(1, tokens // seq_len), min(tokens, seq_len)
        g = torch.Generator(device=device).manual_seed(tokens)
        q = torch.randn(B, T, heads[0], head_dim, generator=g, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, heads[1], head_dim, generator=g, device=device, dtype=dtype, requires_grad=True)
        positions = torch.arange(T, device=device).expand(B, T)
        eager = Rotary(head_dim, 10000.0).to(device)
        freq = eager.inv_freq
        compiled_ref = _compiled(rotary_ref, compile_backend)
        forwards = {
            "eager": lambda eager=eager, q=q, k=k, p=positions: eager(q, k, p),
            "compile": lambda f=compiled_ref, q=q, k=k, p=positions: f(q, k, p, freq),
            "triton": lambda q=q, k=k, p=positions: apply_rotary(q, k, p, freq),
        }
        if liger is not None:
            forwards["liger"] = liger(q, k, positions, freq)
        qk_bytes = B * T * (heads[0] + heads[1]) * head_dim * e
        cases.append(Case(
            op="rotary q+k",
            shape=f"{B * T} x ({heads[0]}+{heads[1]}) x {head_dim}",
            fwd_bytes=2 * qk_bytes + 8 * B * T,  # read q, k and the positions; write q, k
            bwd_bytes=2 * qk_bytes + 8 * B * T,
            impls={name: (f, _forward_backward(f, [q, k])) for name, f in forwards.items()},
        ))
    return cases


def swiglu_cases(device, dtype, tokens_list, ffn_list, compile_backend) -> list[Case]:
    from tanuki_kernels import swiglu_ref
    from tanuki_kernels.swiglu import swiglu

    liger = _liger_swiglu()
    cases = []
    e = torch.finfo(dtype).bits // 8
    for tokens in tokens_list:
        for ffn in ffn_list:
            g = torch.Generator(device=device).manual_seed(tokens + ffn)
            gate = torch.randn(tokens, ffn, generator=g, device=device, dtype=dtype, requires_grad=True)
            up = torch.randn(tokens, ffn, generator=g, device=device, dtype=dtype, requires_grad=True)
            compiled_ref = _compiled(swiglu_ref, compile_backend)
            forwards = {
                "eager": lambda gate=gate, up=up: (swiglu_ref(gate, up),),
                "compile": lambda f=compiled_ref, gate=gate, up=up: (f(gate, up),),
                "triton": lambda gate=gate, up=up: (swiglu(gate, up),),
            }
            if liger is not None:
                forwards["liger"] = lambda gate=gate, up=up: (liger(gate, up),)
            n = tokens * ffn * e
            cases.append(Case(
                op="swiglu",
                shape=f"{tokens} x {ffn}",
                fwd_bytes=3 * n,  # read gate, up; write the product
                bwd_bytes=5 * n,  # read the gradient, gate, up; write both input gradients
                impls={name: (f, _forward_backward(f, [gate, up])) for name, f in forwards.items()},
            ))
    return cases


def _interpreted() -> bool:
    """Liger-Kernel's launchers do not run under Triton's CPU interpreter (they fail inside their kernels,
    e.g. AttributeError: 'float' object has no attribute 'to'), so its rows are GPU-only."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _liger_swiglu():
    """Liger's fused ``silu(a) * b``, or None without liger-kernel."""
    if _interpreted():
        return None
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerSiLUMulFunction.apply


def _liger_rms_norm():
    """Factory of Liger RMSNorm forwards sharing tanuki's weight, or None without liger-kernel."""
    if _interpreted():
        return None
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError:
        return None
    try:
        from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm
    except ImportError:
        LigerFusedAddRMSNorm = None

    def make(hidden, weight, residual, x, res):
        if residual and LigerFusedAddRMSNorm is None:
            return lambda: (_ for _ in ()).throw(RuntimeError("this liger-kernel has no fused add + RMSNorm"))
        cls = LigerFusedAddRMSNorm if residual else LigerRMSNorm
        kwargs = dict(eps=EPS, casting_mode="llama")
        if "in_place" in inspect.signature(cls).parameters:
            # Liger's default writes dx into the incoming gradient; the timing loop reuses that buffer.
            kwargs["in_place"] = False
        module = cls(hidden, **kwargs).to(device=x.device, dtype=x.dtype)
        module.weight = weight  # the same Parameter, so its gradient is comparable
        if residual:
            return lambda: tuple(module(x, res))
        return lambda: (module(x),)

    return make


def _liger_rotary():
    """Factory of Liger rotary forwards on tanuki's (B, T, H, D) layout, or None without liger-kernel."""
    if _interpreted():
        return None
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None

    def make(q, k, positions, inv_freq):
        def forward():
            # Liger takes (B, H, T, D) and precomputed cos/sin (B, T, D) in the activation dtype, as Hugging
            # Face builds them; building them is part of the work timed.
            angles = positions.float()[..., None] * inv_freq
            emb = torch.cat((angles, angles), dim=-1)
            cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
            q_rot, k_rot = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

        return forward

    return make


# --------------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    shape: str
    pass_name: str
    impl: str
    ms: float
    nbytes: int
    max_diff: float  # vs eager, in the compared outputs' units
    error: str = ""


def _max_diff(got: tuple, want: tuple) -> float:
    return max(float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(got, want, strict=True))


def run_case(case: Case, smoke: bool) -> list[Row]:
    torch._dynamo.reset()
    rows = []
    for pass_name, index, nbytes in (("fwd", 0, case.fwd_bytes), ("fwd+bwd", 1, case.fwd_bytes + case.bwd_bytes)):
        reference = case.impls["eager"][index]()
        for impl, fns in case.impls.items():
            fn = fns[index]
            try:
                diff = _max_diff(fn(), reference)  # also warms up: compiles, autotunes
                rows.append(Row(case.op, case.shape, pass_name, impl, time_ms(fn, smoke), nbytes, diff))
            except Exception as exc:  # one failing implementation must not hide the others' numbers
                rows.append(Row(case.op, case.shape, pass_name, impl, float("nan"), nbytes, float("nan"),
                                error=f"{type(exc).__name__}: {exc}"[:120]))
            print(_row_text(rows[-1]), flush=True)
    return rows


def _row_text(row: Row) -> str:
    if row.error:
        return f"{row.op:20s} {row.shape:24s} {row.pass_name:8s} {row.impl:8s} error: {row.error}"
    return (f"{row.op:20s} {row.shape:24s} {row.pass_name:8s} {row.impl:8s} {row.ms * 1e3:10.1f} us "
            f"{row.nbytes / row.ms / 1e6:8.1f} GB/s  max|diff| {row.max_diff:.3g}")


def markdown(rows: list[Row], bandwidth: float, header: dict[str, str]) -> str:
    lines = ["# Fused kernels: RMSNorm, rotary embedding, SwiGLU", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        f"- copy bandwidth (device-to-device, read + write): {bandwidth / 1e9:,.0f} GB/s; floor = bytes / that",
        f"- goal: triton >= {GOAL_FRACTION_OF_FLOOR:.0%} of the floor and faster than compile on every row",
        "",
        "| op | shape | pass | impl | time (µs) | GB/s | % of floor | speed-up vs compile | max abs diff vs eager |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    compile_ms = {(r.op, r.shape, r.pass_name): r.ms for r in rows if r.impl == "compile" and not r.error}
    met, total = 0, 0
    for r in rows:
        if r.error:
            lines.append(f"| {r.op} | {r.shape} | {r.pass_name} | {r.impl} | error: {r.error} | | | | |")
            continue
        floor_ms = r.nbytes / bandwidth * 1e3
        vs_compile = compile_ms.get((r.op, r.shape, r.pass_name))
        speedup = f"{vs_compile / r.ms:.2f}x" if vs_compile else "-"
        name = f"**{r.impl}**" if r.impl == "triton" else r.impl
        lines.append(
            f"| {r.op} | {r.shape} | {r.pass_name} | {name} | {r.ms * 1e3:,.1f} | {r.nbytes / r.ms / 1e6:,.0f} | "
            f"{100 * floor_ms / r.ms:.0f}% | {speedup} | {r.max_diff:.3g} |"
        )
        if r.impl == "triton":
            total += 1
            met += floor_ms / r.ms >= GOAL_FRACTION_OF_FLOOR and (vs_compile is None or r.ms < vs_compile)
    lines += ["", f"Goal met on {met} of {total} triton rows.", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table to write")
    parser.add_argument("--ops", default="rms_norm,rotary,swiglu", help="comma-separated subset of the default")
    parser.add_argument("--quick", action="store_true", help="one shape per op (4096 tokens, hidden 4096, ffn 14336)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the reference")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU through the Triton interpreter: checks the script, not speed")
    args = parser.parse_args(argv)
    ops = set(args.ops.split(","))
    if not ops <= {"rms_norm", "rotary", "swiglu"}:
        parser.error(f"unknown op in --ops {args.ops!r}")

    if args.smoke:
        device, tokens, hidden, ffn = torch.device("cpu"), (24,), (40,), (72,)
        seq_len, heads, head_dim = 8, (4, 2), 16
    elif torch.cuda.is_available():
        device, tokens, hidden, ffn = torch.device("cuda"), TOKENS, HIDDEN, FFN
        seq_len, heads, head_dim = SEQ_LEN, (Q_HEADS, K_HEADS), HEAD_DIM
        if args.quick:
            tokens, hidden, ffn = (4096,), (4096,), (14336,)
    else:
        print("bench_kernels: needs a CUDA GPU, and none is available; nothing measured "
              "(--smoke runs a functional check on CPU through the Triton interpreter).")
        return 0

    import triton

    dtype = torch.bfloat16
    bandwidth = copy_bandwidth(device, args.smoke)
    cases = []
    if "rms_norm" in ops:
        cases += rms_norm_cases(device, dtype, tokens, hidden, args.compile_backend)
    if "rotary" in ops:
        cases += rotary_cases(device, dtype, tokens, args.compile_backend, seq_len, heads, head_dim)
    if "swiglu" in ops:
        cases += swiglu_cases(device, dtype, tokens, ffn, args.compile_backend)
    rows = [row for case in cases for row in run_case(case, args.smoke)]

    command = " ".join(["python benchmarks/kernels/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)])
    header = {
        "command": f"`{command}`",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "CPU through the Triton interpreter (smoke run: the times mean nothing)",
        "versions": f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": "bf16 activations and weights",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, bandwidth, header))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
