"""The fused rotary kernel (``tanuki_kernels.rotary``) against its PyTorch reference ``rotary_ref``.

Without a GPU the kernel runs through Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py
before triton is imported). Shapes stay small: the interpreter executes one numpy operation per tile.

bf16 oracle: the kernel rounds to nearest even explicitly (the interpreter's own fp32 -> bf16 cast
truncates), and angles, cos and sin are the same fp32 values as the reference's (up to an ulp of the
libm/numpy cosine), so bf16 outputs agree with PyTorch to one bf16 ulp, nearly all bit for bit.
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
from tanuki_kernels import Rotary, apply_rotary, rotary_ref
from tanuki_kernels.rotary import _rotary_kernel, rotary_forward

# cotangents drawn below: the same in any test order
pytestmark = pytest.mark.usefixtures("seeded")


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return Rotary(head_dim, theta).inv_freq.to(DEVICE)


def restarting_positions(B: int, T: int) -> torch.Tensor:
    """Packed rows: row 0 holds two documents (positions restart mid-row), later rows start mid-document."""
    rows = [torch.cat([torch.arange(T // 2 + 1), torch.arange(T - T // 2 - 1)])]
    rows += [torch.arange(T) + 5 * b for b in range(1, B)]
    return torch.stack(rows).to(DEVICE)


def qk(B, T, Hq, Hk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn(B, T, Hk, D, generator=g).to(dtype).to(DEVICE).requires_grad_()
    return q, k


# (B, T, Hq, Hk, D): the smallest head, GQA, a single kv head, heads and half-dims that are not powers
# of two, multi-head attention.
SHAPES = [
    (1, 1, 1, 1, 2),
    (2, 13, 4, 2, 32),
    (1, 9, 8, 1, 16),
    (3, 5, 5, 3, 24),
    (2, 7, 3, 3, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_forward_and_gradients_match_reference(shape):
    B, T, _, _, D = shape
    q, k = qk(*shape)
    pos, freq = restarting_positions(B, T), inv_freq(D)
    got = apply_rotary(q, k, pos, freq)
    want = rotary_ref(q, k, pos, freq)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    cot = [torch.randn_like(t) for t in want]
    for a, b in zip(
        torch.autograd.grad(got, (q, k), cot), torch.autograd.grad(want, (q, k), cot)
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_bf16_within_one_ulp_of_reference(shape):
    B, T, _, _, D = shape
    q, k = qk(*shape, dtype=torch.bfloat16, seed=1)
    pos, freq = restarting_positions(B, T), inv_freq(D)
    got = apply_rotary(q, k, pos, freq)
    want = rotary_ref(q, k, pos, freq)
    for a, b in zip(got, want):
        assert_within_bf16_ulp(a, b)
        assert (a == b).float().mean() > 0.99
    cot = [torch.randn_like(t) for t in want]
    for a, b in zip(
        torch.autograd.grad(got, (q, k), cot), torch.autograd.grad(want, (q, k), cot)
    ):
        assert_within_bf16_ulp(a, b)


def test_non_contiguous_views_and_broadcast_positions():
    """q and k as views of one fused projection output, a transposed layout, a strided last dim, and
    positions broadcast over the batch (stride 0), as the model passes them."""
    B, T, Hq, Hk, D = 2, 6, 4, 2, 16
    qkv = torch.randn(B, T, Hq + 2 * Hk, D, device=DEVICE, requires_grad=True)
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk]
    pos = torch.arange(T, device=DEVICE).expand(B, T)
    freq = inv_freq(D)
    got, want = apply_rotary(q, k, pos, freq), rotary_ref(q, k, pos, freq)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    (g,) = torch.autograd.grad(got[0].sum() + got[1].square().sum(), qkv)
    (g_ref,) = torch.autograd.grad(want[0].sum() + want[1].square().sum(), qkv)
    torch.testing.assert_close(g, g_ref)

    # (B, H, T, D) storage read as (B, T, H, D)
    bhtd = torch.randn(B, Hq, T, D, device=DEVICE)
    # last stride 2: copied first
    strided = torch.randn(B, T, Hk, 2 * D, device=DEVICE)[..., ::2]
    pos_slice = torch.randint(0, 100, (B, 2 * T), device=DEVICE)[:, ::2]
    got = apply_rotary(bhtd.transpose(1, 2), strided, pos_slice, freq)
    want = rotary_ref(bhtd.transpose(1, 2), strided, pos_slice, freq)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_long_positions_against_fp64(theta):
    """Positions up to 32k: fp32 angles keep the error at the rounding of the angle itself (about
    2^-9 rad at 32k), where cos/sin tables built in bf16 would be off by whole radians."""
    D, T = 128, 64
    pos = torch.randint(0, 32768, (1, T), device=DEVICE)
    pos[0, -1] = 32767
    q, k = qk(1, T, 2, 1, D, seed=2)
    q, k = q.detach(), k.detach()
    freq = inv_freq(D, theta)
    got = apply_rotary(q, k, pos, freq)

    # Same fp32 angles as the PyTorch module: agreement to fp32 rounding.
    for a, b in zip(got, rotary_ref(q, k, pos, freq)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # Against exact angles (fp64 throughout): bounded by the fp32 angle rounding.
    inv64 = 1.0 / theta ** (
        torch.arange(0, D, 2, dtype=torch.float64, device=DEVICE) / D
    )
    angles = pos.double()[..., None] * inv64
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]

    def rotate64(x):
        x1, x2 = x.double().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    # |angle error| <= 32767 * inv_freq * (2^-24 for rounding inv_freq + 2^-24 for rounding the product),
    # at most 32767 * 2^-23 for inv_freq <= 1; a pair (x1, x2) then moves by at most that times its norm.
    tolerance = 32767 * 2.0**-23 * 2**0.5
    for a, x in zip(got, (q, k)):
        err = (a.double() - rotate64(x)).abs().max() / x.abs().max()
        assert err < tolerance
    # The bound is tight enough to catch bf16 angle tables.
    angles_bf16 = (pos.to(torch.bfloat16)[..., None] * freq.to(torch.bfloat16)).double()
    err_bf16 = (angles_bf16 - angles).abs().max()
    assert err_bf16 > 100 * tolerance


def test_gradcheck_fp64():
    q, k = qk(1, 3, 2, 1, 6, dtype=torch.float64, seed=3)
    pos, freq = torch.tensor([[4, 0, 1]], device=DEVICE), inv_freq(6)
    f = lambda q, k: apply_rotary(q, k, pos, freq, tokens_per_program=2)
    assert torch.autograd.gradcheck(f, (q, k))
    # The backward runs through the same differentiable op (the inverse rotation).
    assert torch.autograd.gradgradcheck(f, (q, k), fast_mode=True)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 17),
    Hq=st.integers(1, 6),
    Hk=st.integers(1, 3),
    half=st.integers(1, 20),
    tokens_per_program=st.sampled_from([0, 1, 4]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(B, T, Hq, Hk, half, tokens_per_program, seed):
    q, k = qk(B, T, Hq, Hk, 2 * half, seed=seed)
    pos = torch.randint(
        0, 4096, (B, T), generator=torch.Generator().manual_seed(seed)
    ).to(DEVICE)
    freq = inv_freq(2 * half)
    got = apply_rotary(q, k, pos, freq, tokens_per_program=tokens_per_program)
    for a, b in zip(got, rotary_ref(q, k, pos, freq)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(poisoned_empty, dtype):
    # 14 tokens in tiles of 4, 3 heads in blocks of 4, half 10 of 16
    q, k = qk(2, 7, 3, 1, 20, dtype=dtype)
    pos = restarting_positions(2, 7)
    q_rot, k_rot = apply_rotary(q, k, pos, inv_freq(20), tokens_per_program=4)
    (q_rot.float().sum() + k_rot.float().sum()).backward()
    for t in (q_rot, k_rot, q.grad, k.grad):
        assert torch.isfinite(t).all()


def test_padded_inputs_and_sentinel_outputs():
    """q/k are views into NaN padding (tokens, heads, head dim), outputs views into sentinel padding."""
    B, T, Hq, Hk, D = 2, 5, 3, 2, 12
    q, k = qk(B, T, Hq, Hk, D, seed=4)
    q, k = q.detach(), k.detach()

    def padded(t, fill):
        big = torch.full((B, T + 2, t.shape[2] + 1, D + 6), fill, device=DEVICE)
        big[:, 1 : T + 1, : t.shape[2], 3 : D + 3] = t
        return big, big[:, 1 : T + 1, : t.shape[2], 3 : D + 3]

    _, qp = padded(q, float("nan"))
    _, kp = padded(k, float("nan"))
    q_big, q_out = padded(torch.zeros_like(q), 12345.0)
    k_big, k_out = padded(torch.zeros_like(k), 12345.0)
    pos, freq = restarting_positions(B, T), inv_freq(D)
    for inverse in (False, True):
        rotary_forward(
            qp, kp, pos, freq, inverse, tokens_per_program=2, q_out=q_out, k_out=k_out
        )
        sign = -1.0 if inverse else 1.0
        # rotating by -angle = rotating with -inv_freq
        want = rotary_ref(q, k, pos, sign * freq)
        torch.testing.assert_close(q_out, want[0])
        torch.testing.assert_close(k_out, want[1])
        for big, h in ((q_big, Hq), (k_big, Hk)):
            outside = torch.ones_like(big, dtype=torch.bool)
            outside[:, 1 : T + 1, :h, 3 : D + 3] = False
            assert (big[outside] == 12345.0).all()


def test_shared_incoming_gradient_is_not_modified():
    """``a + b`` hands the same gradient tensor to both branches; the rotary backward must not write into it."""
    q, k = qk(1, 4, 2, 1, 8, seed=5)
    z = torch.randn(1, 4, 2, 8, device=DEVICE, requires_grad=True)
    pos, freq = restarting_positions(1, 4), inv_freq(8)
    q_rot, _ = apply_rotary(q, k, pos, freq)
    out = q_rot + z * 3.0
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    torch.testing.assert_close(z.grad, cot * 3.0)
    torch.testing.assert_close(
        q.grad, torch.autograd.grad(rotary_ref(q, k, pos, freq)[0], q, cot)[0]
    )


def test_empty_sequence():
    q, k = qk(2, 0, 4, 2, 8)
    q_rot, k_rot = apply_rotary(
        q, k, torch.zeros(2, 0, dtype=torch.long, device=DEVICE), inv_freq(8)
    )
    assert q_rot.shape == q.shape and k_rot.shape == k.shape


def test_integer_position_dtypes():
    q, k = qk(1, 5, 2, 1, 8, seed=6)
    freq = inv_freq(8)
    pos = torch.tensor([[0, 1, 2, 0, 1]], device=DEVICE)
    want = apply_rotary(q, k, pos, freq)
    got = apply_rotary(q, k, pos.to(torch.int32), freq)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_custom_op_passes_opcheck():
    q, k = qk(2, 3, 2, 1, 8)
    pos, freq = restarting_positions(2, 3), inv_freq(8)
    for inverse in (False, True):
        results = torch.library.opcheck(
            torch.ops.tanuki.rotary.default, (q, k, pos, freq, inverse, 0)
        )
        assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_fullgraph_matches_eager():
    q, k = qk(2, 5, 4, 2, 16, seed=7)
    pos, freq = restarting_positions(2, 5), inv_freq(16)

    def f(q, k):
        q_rot, k_rot = apply_rotary(q * 2.0, k, pos, freq)
        return (q_rot.sum(2, keepdim=True) * k_rot).square().sum()

    assert_compiled_matches_eager(f, q, k)


def test_module_has_no_persistent_state():
    m = Rotary(16, 500000.0).to(DEVICE)
    assert list(m.state_dict()) == []
    q, k = qk(1, 3, 2, 2, 16)
    pos = torch.arange(3, device=DEVICE)[None]
    for a, b in zip(m(q, k, pos), rotary_ref(q, k, pos, m.inv_freq)):
        torch.testing.assert_close(a, b)


def test_bad_arguments_raise_clear_errors():
    q, k = qk(1, 3, 2, 1, 8)
    pos, freq = torch.arange(3, device=DEVICE)[None], inv_freq(8)
    with pytest.raises(ValueError, match="does not match q"):
        apply_rotary(q, k[:, :2], pos, freq)
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary(q[..., :7], k[..., :7], pos, freq)
    with pytest.raises(ValueError, match="share a dtype"):
        apply_rotary(q, k.double(), pos, freq)
    with pytest.raises(ValueError, match="power of two"):
        apply_rotary(q, k, pos, freq, tokens_per_program=3)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU error path")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(tanuki_kernels, "_TRITON_INTERPRETED", False)
    q, k = qk(1, 2, 1, 1, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        apply_rotary(q, k, torch.arange(2)[None], inv_freq(4))


def compile_kernels_for_h100() -> None:
    """Compile the kernel, bf16 and fp32, forward and inverse, to sm_90 machine code (see
    kernel_helpers.compile_for_h100)."""
    types = {"POS": "*i64", "INV_FREQ": "*fp32"}
    blocks = {"BLOCK_T": 2, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_HALF": 64}
    for dtype, inverse in (("bf16", False), ("fp32", True)):
        constexprs = {
            "INVERSE": inverse,
            "COMPUTE": tl.float32,
            "OUT_IS_BF16": dtype == "bf16",
            **blocks,
        }
        compile_for_h100(
            _rotary_kernel, constexprs, dtype, num_warps=4, scalar="i64", types=types
        )


@needs_nvidia_backend
def test_kernel_compiles_for_an_h100():
    assert_compiles_without_interpreter(__file__)
