"""The fused SwiGLU activation (``tanuki_kernels.swiglu``) against eager PyTorch ``silu(gate) * up``.

Without a GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py
before triton is imported). bf16: the kernels round to nearest even explicitly where eager PyTorch
rounds (the interpreter's own bf16 cast truncates), so results agree to one bf16 ulp; the only source of
difference is the last bit of the fp32 exponential.
"""

import pytest
import tanuki_kernels
import torch
import triton.language as tl
from kernel_helpers import (
    DEVICE,
    assert_compiled_matches_eager,
    assert_compiles_without_interpreter,
    assert_within_bf16_ulp,
    compile_for_h100,
    needs_nvidia_backend,
)
from tanuki_kernels import SwiGLU, swiglu_ref
from tanuki_kernels.swiglu import (
    _swiglu_backward_kernel,
    _swiglu_forward_kernel,
    swiglu,
    swiglu_forward,
)

# cotangents drawn below: the same in any test order
pytestmark = pytest.mark.usefixtures("seeded")


def gate_up(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # both tails of silu
    gate = (3 * torch.randn(shape, generator=g)).to(dtype).to(DEVICE).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).to(DEVICE).requires_grad_()
    return gate, up


SHAPES = [(1,), (7, 129), (2, 5, 352), (3000,)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_forward_and_gradients_match_reference(shape):
    gate, up = gate_up(shape)
    got = swiglu(gate, up, block_size=256)  # several programs, a ragged last
    want = swiglu_ref(gate, up)
    torch.testing.assert_close(got, want)
    cot = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, (gate, up), cot),
        torch.autograd.grad(want, (gate, up), cot),
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_bf16_within_one_ulp_of_reference(shape):
    gate, up = gate_up(shape, torch.bfloat16, seed=1)
    got, want = swiglu(gate, up), swiglu_ref(gate, up)
    assert_within_bf16_ulp(got, want)
    assert (got == want).float().mean() > 0.99
    cot = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, (gate, up), cot),
        torch.autograd.grad(want, (gate, up), cot),
    ):
        assert_within_bf16_ulp(a, b)


def test_gradcheck_fp64():
    gate, up = gate_up((3, 7), torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda g, u: swiglu(g, u, block_size=8), (gate, up))


def test_non_contiguous_inputs():
    both = torch.randn(4, 6, 2 * 24, device=DEVICE, requires_grad=True)
    gate, up = both[..., :24], both[..., 24:]  # halves of one fused gate/up output
    got, want = swiglu(gate, up), swiglu_ref(gate, up)
    torch.testing.assert_close(got, want)
    cot = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, both, cot)[0], torch.autograd.grad(want, both, cot)[0]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(poisoned_empty, dtype):
    gate, up = gate_up((5, 77), dtype)
    out = swiglu(gate, up, block_size=64)
    out.float().sum().backward()
    for t in (out, gate.grad, up.grad):
        assert torch.isfinite(t).all()


def test_padded_inputs_and_sentinel_output():
    gate, up = gate_up((9, 40), seed=3)
    big_out = torch.full((9 * 40 + 64,), 12345.0, device=DEVICE)
    out = big_out[32 : 32 + 9 * 40].view(9, 40)
    nan_pad = torch.full((9, 40 + 8), float("nan"), device=DEVICE)
    nan_pad[:, :40] = gate.detach()
    swiglu_forward(nan_pad[:, :40], up.detach(), block_size=128, out=out)
    torch.testing.assert_close(out, swiglu_ref(gate, up).detach())
    assert (big_out[:32] == 12345.0).all() and (big_out[32 + 9 * 40 :] == 12345.0).all()


def test_shared_incoming_gradient_is_not_modified():
    gate, up = gate_up((4, 16), seed=4)
    z = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    out = swiglu(gate, up) + z * 3.0
    cot = torch.randn_like(out)
    out.backward(cot)
    torch.testing.assert_close(z.grad, cot * 3.0)


def test_custom_ops_pass_opcheck():
    gate, up = gate_up((3, 10))
    dp = torch.randn(3, 10, device=DEVICE)
    for op, args in [
        (torch.ops.tanuki.swiglu.default, (gate, up, 0)),
        (
            torch.ops.tanuki.swiglu_backward.default,
            (dp, gate.detach(), up.detach(), 16),
        ),
    ]:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_fullgraph_matches_eager():
    gate, up = gate_up((2, 3, 40), seed=5)

    def f(g, u):
        return (swiglu(g * 2.0, u) * u).sum()

    assert_compiled_matches_eager(f, gate, up)


def test_module_and_errors():
    gate, up = gate_up((2, 8))
    torch.testing.assert_close(SwiGLU()(gate, up), swiglu_ref(gate, up))
    assert swiglu(gate[:0], up[:0]).shape == (0, 8)
    with pytest.raises(ValueError, match="must match"):
        swiglu(gate, up[:, :4])
    with pytest.raises(ValueError, match="power of two"):
        swiglu(gate, up, block_size=100)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU error path")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(tanuki_kernels, "_TRITON_INTERPRETED", False)
    gate, up = gate_up((2, 8))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        swiglu(gate, up)


def compile_kernels_for_h100() -> None:
    """Compile both kernels, bf16 and fp32, to sm_90 machine code (see kernel_helpers.compile_for_h100)."""
    for dtype in ("bf16", "fp32"):
        constexprs = {
            "COMPUTE": tl.float32,
            "IS_BF16": dtype == "bf16",
            "BLOCK_SIZE": 1024,
        }
        for kernel in (_swiglu_forward_kernel, _swiglu_backward_kernel):
            compile_for_h100(kernel, constexprs, dtype, num_warps=4, scalar="i64")


@needs_nvidia_backend
def test_kernels_compile_for_an_h100():
    assert_compiles_without_interpreter(__file__)
