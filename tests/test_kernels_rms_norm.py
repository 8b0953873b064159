"""The fused RMSNorm kernel (``tanuki_kernels.rms_norm``) against its PyTorch reference ``rms_norm_ref``.

Without a GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py
before triton is imported). Shapes stay small: the interpreter executes one numpy operation per tile.

bf16 oracle: the kernel rounds to nearest even explicitly (the interpreter's own fp32 -> bf16 cast
truncates), so outputs agree with PyTorch bit for bit except where the fp32 sum of squares, summed in
another order, moves a value across a rounding boundary: the tolerance is one bf16 ulp.
"""

import pytest
import tanuki_kernels
import torch
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import (
    DEVICE,
    assert_compiled_matches_eager,
    assert_compiles_without_interpreter,
    assert_within_bf16_ulp,
    compile_for_h100,
    needs_nvidia_backend,
)
from tanuki_kernels import RMSNorm, rms_norm_ref
from tanuki_kernels.rms_norm import (
    _rms_norm_backward_kernel,
    _rms_norm_forward_kernel,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)

# cotangents drawn below: the same in any test order
pytestmark = pytest.mark.usefixtures("seeded")
EPS = 1e-5


def inputs(shape, dtype=torch.float32, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    return [t if t is None else t.to(DEVICE).requires_grad_() for t in (x, w, r)]


def grads(outputs, inputs_, cotangents):
    wanted = [t for t in inputs_ if t is not None]
    return torch.autograd.grad(outputs, wanted, cotangents)


# Hidden sizes that are and are not powers of two, one row, one column, many rows.
SHAPES = [(1, 1), (1, 64), (7, 100), (3, 5, 130), (300, 96)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_forward_and_gradients_match_reference(shape, residual):
    x, w, r = inputs(shape, residual=residual)
    got = rms_norm(x, w, EPS, r)
    want = rms_norm_ref(x, w, EPS, r)
    got, want = (got, want) if residual else ((got,), (want,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    cot = [torch.randn_like(t) for t in want]
    *dx, dw = grads(got, (x, r, w), cot)
    *dx_ref, dw_ref = grads(want, (x, r, w), cot)
    for a, b in zip(dx, dx_ref):
        torch.testing.assert_close(a, b)
    # A sum over up to 300 rows in fp32, in another order than PyTorch's: on these shapes both land up to
    # about 5e-5 from the fp64 value.
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 64), (37, 100), (4, 9, 256)])
@pytest.mark.parametrize("residual", [False, True])
def test_bf16_within_one_ulp_of_reference(shape, residual):
    x, w, r = inputs(shape, torch.bfloat16, residual=residual, seed=1)
    got = rms_norm(x, w, EPS, r)
    want = rms_norm_ref(x, w, EPS, r)
    got, want = (got, want) if residual else ((got,), (want,))
    for a, b in zip(got, want):
        assert_within_bf16_ulp(a, b)
    # Nearly everything is bit-identical: the rounding is round-to-nearest-even, not truncation.
    assert (got[0] == want[0]).float().mean() > 0.99

    cot = [torch.randn_like(t) for t in want]
    dgot = dict(
        zip(["x", "r", "w"] if residual else ["x", "w"], grads(got, (x, r, w), cot))
    )
    # Input gradient oracle: the reference's gradient reaching the fp32 copy of h (before PyTorch casts
    # it to bf16), plus the gradient of the returned sum, rounded once. PyTorch's bf16 autograd rounds
    # twice when adding the two, which can be several ulps off after cancellation.
    h = ((x + r) if residual else x).detach()
    hf = h.float().requires_grad_()
    y_ref = w.detach() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(
        torch.bfloat16
    )
    dh = torch.autograd.grad(y_ref, hf, cot[0])[0] + (
        cot[1].float() if residual else 0.0
    )
    assert_within_bf16_ulp(dgot["x"], dh.to(torch.bfloat16))
    if residual:
        assert torch.equal(dgot["r"], dgot["x"])
    # Weight gradient oracle: the fp64 sum over rows of dy * c, c = the bf16-rounded normalised input
    # (PyTorch's own bf16 autograd rounds every product before summing, which is less accurate).
    hd = h.double()
    c = (
        (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + EPS))
        .float()
        .to(torch.bfloat16)
        .double()
    )
    dw_exact = (cot[0].double() * c).reshape(-1, shape[-1]).sum(0)
    assert_within_bf16_ulp(dgot["w"], dw_exact.to(torch.bfloat16))


def test_fp32_weight_with_bf16_activations_promotes_like_reference():
    x, _, r = inputs((5, 48), torch.bfloat16, residual=True)
    w = (torch.rand(48) + 0.5).to(DEVICE).requires_grad_()
    y, h = rms_norm(x, w, EPS, r)
    y_ref, h_ref = rms_norm_ref(x, w, EPS, r)
    assert y.dtype == torch.float32 and h.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(h, h_ref)
    cot = torch.randn_like(y)
    dw, dw_ref = (
        torch.autograd.grad(y, w, cot)[0],
        torch.autograd.grad(y_ref, w, cot)[0],
    )
    torch.testing.assert_close(dw, dw_ref)


def test_mixed_residual_dtypes_promote_like_the_eager_add():
    x, w, _ = inputs((3, 5, 32), torch.bfloat16)
    # an fp32 residual stream
    r = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    y, h = rms_norm(x, w, EPS, r)
    y_ref, h_ref = rms_norm_ref(x, w, EPS, r)
    assert h.dtype == torch.float32 and y.dtype == y_ref.dtype
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref)
    cot = torch.randn_like(y_ref)
    for a, b in zip(
        torch.autograd.grad(y, (x, r), cot), torch.autograd.grad(y_ref, (x, r), cot)
    ):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_empty_input():
    x, w, r = inputs((0, 16), residual=True)
    y, h = rms_norm(x, w, EPS, r)
    assert y.shape == h.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_fp64(residual):
    x, w, r = inputs((4, 9), torch.float64, residual=residual, seed=2)
    args = (x, w) if r is None else (x, w, r)
    # Several programs with two rows each exercise the persistent backward loop.
    assert torch.autograd.gradcheck(
        lambda *a: rms_norm(*a[:2], EPS, *a[2:], rows_per_program=2), args
    )


@pytest.mark.parametrize(
    "rows_per_program,num_programs",
    # one program for all, loop with a ragged last tile, idle programs
    [(1, 1), (2, 3), (4, 64), (16, 2)],
)
def test_backward_grid_shapes_reduce_weight_gradient_exactly_once(
    rows_per_program, num_programs
):
    x, w, _ = inputs((23, 40), torch.float64, seed=3)
    dy = torch.randn_like(x)
    dx, dw = rms_norm_backward(
        dy, None, x.detach(), w.detach(), EPS, rows_per_program, num_programs
    )
    dx_ref, dw_ref = torch.autograd.grad(rms_norm_ref(x, w, EPS), (x, w), dy)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    residual=st.booleans(),
    rows_per_program=st.sampled_from([0, 1, 2, 8]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(rows, cols, residual, rows_per_program, seed):
    x, w, r = inputs((rows, cols), residual=residual, seed=seed)
    got = rms_norm(x, w, EPS, r, rows_per_program=rows_per_program)
    want = rms_norm_ref(x, w, EPS, r)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(poisoned_empty, dtype):
    x, w, r = inputs((11, 70), dtype, residual=True)
    y, h = rms_norm(x, w, EPS, r, rows_per_program=4)  # a ragged last tile
    (y.float().sum() + h.float().sum()).backward()
    for t in (y, h, x.grad, r.grad, w.grad):
        assert torch.isfinite(t).all()


def test_padded_inputs_and_sentinel_outputs():
    """Inputs are views into NaN padding, outputs into sentinel padding: no read or write strays."""
    rows, cols, pad = 9, 50, 14
    x, w, r = inputs((rows, cols), residual=True, seed=4)

    def padded(t, fill):
        big = torch.full((rows + 2, cols + pad), fill, dtype=t.dtype, device=DEVICE)
        big[1 : rows + 1, :cols] = t.detach()
        return big, big[1 : rows + 1, :cols]

    _, xp = padded(x, float("nan"))
    _, rp = padded(r, float("nan"))
    y_big, y = padded(torch.zeros_like(x), 12345.0)
    h_big, h = padded(torch.zeros_like(x), 12345.0)
    rms_norm_forward(xp, w.detach(), EPS, rp, rows_per_program=4, out=y, residual_out=h)
    y_ref, h_ref = rms_norm_ref(x.detach(), w.detach(), EPS, r.detach())
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    for big, view in ((y_big, y), (h_big, h)):
        outside = torch.ones_like(big, dtype=torch.bool)
        outside[1 : rows + 1, :cols] = False
        assert (big[outside] == 12345.0).all()

    _, dyp = padded(torch.randn_like(x), float("nan"))
    _, dhp = padded(torch.randn_like(x), float("nan"))
    dx_big, dx = padded(torch.zeros_like(x), 12345.0)
    _, hp = padded(h_ref, float("nan"))
    _, dw = rms_norm_backward(dyp, dhp, hp, w.detach(), EPS, 2, 3, out=dx)
    hh = h_ref.detach().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(
        rms_norm_ref(hh, w, EPS), (hh, w), dyp.contiguous()
    )
    torch.testing.assert_close(dx, dx_ref + dhp)
    torch.testing.assert_close(dw, dw_ref)
    outside = torch.ones_like(dx_big, dtype=torch.bool)
    outside[1 : rows + 1, :cols] = False
    assert (dx_big[outside] == 12345.0).all()


def test_shared_incoming_gradient_is_not_modified():
    """``a + b`` hands the same gradient tensor to both branches; the norm backward must not write into it."""
    x, w, _ = inputs((6, 32), seed=5)
    z = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    out = rms_norm(x, w, EPS) + z * 3.0
    cot = torch.randn_like(out)
    out.backward(cot)
    torch.testing.assert_close(z.grad, cot * 3.0)
    torch.testing.assert_close(
        x.grad, torch.autograd.grad(rms_norm_ref(x, w, EPS), x, cot)[0]
    )


def test_in_place_change_of_a_saved_input_raises():
    x, w, _ = inputs((4, 16))
    h = x * 1.0
    y = rms_norm(h, w, EPS)
    h.add_(1.0)  # the backward would read the modified values
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_custom_ops_pass_opcheck():
    x, w, r = inputs((5, 24), residual=True)
    x, w, r = (t.detach().requires_grad_() for t in (x, w, r))
    dy = torch.randn(5, 24, device=DEVICE)
    for op, args in [
        (torch.ops.tanuki.rms_norm.default, (x, w, EPS, 0)),
        (torch.ops.tanuki.rms_norm_residual.default, (x, r, w, EPS, 2)),
        (
            torch.ops.tanuki.rms_norm_backward.default,
            (dy, dy, x.detach(), w.detach(), EPS, 0),
        ),
        (
            torch.ops.tanuki.rms_norm_backward.default,
            (dy, None, x.detach(), w.detach(), EPS, 1),
        ),
    ]:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_fullgraph_matches_eager():
    x, w, r = inputs((2, 7, 40), residual=True, seed=6)

    def f(x, r, w):
        y, h = rms_norm(x, w, EPS, r)
        return (y * h).sum() + rms_norm(h, w, EPS).square().sum()

    assert_compiled_matches_eager(f, x, r, w)


def test_module_matches_functional_and_keeps_weight_name():
    m = RMSNorm(24, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 24, device=DEVICE)
    torch.testing.assert_close(m(x), rms_norm_ref(x, m.weight, 1e-6))
    _, h = m(x, residual=x)
    torch.testing.assert_close(h, 2 * x)
    assert list(m.state_dict()) == ["weight"]


def test_bad_arguments_raise_clear_errors():
    x, w, _ = inputs((3, 8))
    with pytest.raises(ValueError, match="power of two"):
        rms_norm(x, w, EPS, rows_per_program=3)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, w[:4], EPS)
    with pytest.raises(ValueError, match="exceeds"):
        rms_norm_forward(
            torch.zeros(1, 70000, device=DEVICE), torch.ones(70000, device=DEVICE), EPS
        )


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU error path")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(tanuki_kernels, "_TRITON_INTERPRETED", False)
    x, w, _ = inputs((2, 8))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(x, w, EPS)


def compile_kernels_for_h100() -> None:
    """Compile both kernels, bf16 and fp32, to sm_90 machine code (see kernel_helpers.compile_for_h100)."""
    kw = {"num_warps": 8, "types": {"DW_PARTIAL": "*fp32", "eps": "fp32"}}
    for dtype in ("bf16", "fp32"):
        bf16 = dtype == "bf16"
        fwd = {"HAS_RESIDUAL": True, "X_IS_BF16": bf16, "Y_IS_BF16": bf16}
        fwd |= {"COMPUTE": tl.float32, "BLOCK_SIZE": 8192, "ROWS_PER_PROGRAM": 1}
        bwd = {"HAS_DH_OUT": True, "X_IS_BF16": bf16}
        bwd |= {"COMPUTE": tl.float32, "BLOCK_SIZE": 2048, "ROWS_PER_PROGRAM": 4}
        compile_for_h100(_rms_norm_forward_kernel, fwd, dtype, **kw)
        compile_for_h100(_rms_norm_backward_kernel, bwd, dtype, **kw)


@needs_nvidia_backend
def test_kernels_compile_for_an_h100():
    assert_compiles_without_interpreter(__file__)
