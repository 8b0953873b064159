"""What the kernel tests (``test_kernels_*.py``) share: the bf16 oracle, and compiling for an H100.

Their fixtures (``seeded``, ``poisoned_empty``) are in ``conftest.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at the magnitude of ``t`` (8 significant bits)."""
    exponent = torch.floor(torch.log2(t.float().abs().clamp(min=2.0**-126)))
    return torch.pow(2.0, exponent - 7)


def assert_within_bf16_ulp(
    actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0
) -> None:
    """Same dtype and shape, finite, and every element within ``ulps`` bf16 ulps of the expected one."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (actual.float() - expected.float()).abs()
    bound = ulps * torch.maximum(bf16_ulp(actual), bf16_ulp(expected))
    assert torch.isfinite(actual).all()
    excess = f"max excess {(diff - bound).max().item()} at {int((diff > bound).sum())} elements"
    assert (diff <= bound).all(), excess


needs_nvidia_backend = pytest.mark.skipif(
    "nvidia" not in triton.backends.backends,
    reason="Triton's NVIDIA backend is not installed",
)


def compile_for_h100(
    kernel,
    constexprs: dict,
    dtype: str,
    num_warps: int,
    scalar: str = "i32",
    types: dict | None = None,
) -> None:
    """Compile ``kernel`` to sm_90 machine code: no GPU needed, only Triton's bundled ptxas. Catches
    what the interpreter accepts but the compiler rejects (types, constexpr use). Needs a process in
    which triton was imported without the interpreter (:func:`assert_compiles_without_interpreter`).

    The signature: the ``constexprs``, then the argument types named in ``types``; other upper-case
    arguments (the tensors) are pointers to ``dtype``, lower-case ones (sizes, strides) ``scalar``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = types or {}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            signature[name] = f"*{dtype}" if name.isupper() else scalar
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    assert compiled.asm["cubin"]


def assert_compiled_matches_eager(f, *inputs: torch.Tensor) -> None:
    """``torch.compile(f, fullgraph=True)`` (so a graph break raises) gives eager's value and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager = f(*inputs)
    got = compiled(*inputs)
    torch.testing.assert_close(got, eager)
    for a, b in zip(
        torch.autograd.grad(got, inputs), torch.autograd.grad(eager, inputs)
    ):
        torch.testing.assert_close(a, b)


def assert_compiles_without_interpreter(
    test_file: str, function: str = "compile_kernels_for_h100"
) -> None:
    """Call ``function`` of the test module ``test_file`` in a new process without ``TRITON_INTERPRET``:
    Triton fixes interpreted-or-compiled when it is imported, so this process cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Today's default, stated to silence Triton's warning about it.
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    path = Path(test_file)
    code = f"import sys; sys.path.insert(0, {str(path.parent)!r}); import {path.stem} as t; t.{function}()"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
