"""Kernel selection (``tanuki.fused.apply_kernels``): the module swap, and the model trained with the
Triton kernels (through the interpreter on CPU) against the same model with the PyTorch modules."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import tanuki.fused
from tanuki.config import ModelConfig
from tanuki.fused import (
    TritonMLP,
    TritonRMSNorm,
    TritonRotary,
    apply_kernels,
    kernel_summary,
    resolve_kernels,
)
from tanuki.losses import causal_lm_loss
from tanuki.model import MLP, RMSNorm, Rotary, Transformer, build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=64)


def tiny_model(dtype=torch.float32) -> Transformer:
    return build_model(TINY, device=DEVICE, seed=1, dtype=dtype)


def test_triton_mode_swaps_every_instance_and_keeps_parameters_and_state_dict():
    model = tiny_model()
    params_before = list(model.parameters())
    state_before = model.state_dict()
    gate = model.layers[0].mlp.w_gate
    assert apply_kernels(model, "triton") is model
    assert isinstance(model.layers[0].mlp, TritonMLP) and model.layers[0].mlp.w_gate is gate
    n = TINY.n_layers
    assert kernel_summary(model) == {"TritonRMSNorm": 2 * n + 1, "TritonRotary": n, "TritonMLP": n}
    # The same Parameter objects, in the same order: optimizers and sharding built earlier stay valid.
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    assert all(state_after[k].data_ptr() == state_before[k].data_ptr() for k in state_before)
    assert model.layers[0].attn.rotary.inv_freq is not None


def test_torch_mode_restores_the_plain_modules_and_swapping_is_idempotent():
    model = tiny_model()
    apply_kernels(model, "triton")
    apply_kernels(model, "triton")
    assert kernel_summary(model) == {"TritonRMSNorm": 5, "TritonRotary": 2, "TritonMLP": 2}
    apply_kernels(model, "torch")
    assert kernel_summary(model) == {"RMSNorm": 5, "Rotary": 2, "MLP": 2}
    assert {type(m) for m in model.modules() if isinstance(m, (RMSNorm, Rotary, MLP))} == {RMSNorm, Rotary, MLP}


def test_auto_picks_triton_exactly_on_cuda():
    assert resolve_kernels("auto", torch.device("cuda")) == "triton"
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"
    assert resolve_kernels("torch", torch.device("cuda")) == "torch"
    model = apply_kernels(tiny_model(), "auto")
    expected = "TritonRMSNorm" if DEVICE == "cuda" else "RMSNorm"
    assert expected in kernel_summary(model)


def test_meta_model_resolves_to_the_device_it_will_be_materialised_on():
    with torch.device("meta"):
        model = Transformer(TINY)
    apply_kernels(model, "auto")
    expected = "TritonRMSNorm" if torch.cuda.is_available() else "RMSNorm"
    assert expected in kernel_summary(model)
    apply_kernels(model, "auto", device="cuda")
    assert "TritonRMSNorm" in kernel_summary(model)


def test_forcing_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setattr(tanuki.fused, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_kernels("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="one of auto, triton, torch"):
        resolve_kernels("cuda", torch.device("cpu"))


def test_shared_modules_stay_shared_and_hooks_survive():
    norm = RMSNorm(8)
    calls = []
    norm.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    container = nn.ModuleDict({"a": norm, "b": nn.Sequential(norm)})
    apply_kernels(container, "triton", device=DEVICE)
    assert isinstance(container["a"], TritonRMSNorm)
    assert container["a"] is container["b"][0]
    assert container["a"].weight is norm.weight and container["a"].eps == norm.eps
    container["a"](torch.randn(2, 8, device=DEVICE))
    assert calls == ["TritonRMSNorm"]
    assert isinstance(apply_kernels(Rotary(8), "triton", device=DEVICE), TritonRotary)  # a bare module


def test_nested_swappable_modules_are_rebuilt_inside_out():
    """A swapped parent must hold the swapped child, not the old one (children are rebuilt first)."""
    outer = RMSNorm(8)
    outer.inner = RMSNorm(8)  # an RMSNorm that owns another one
    root = nn.Sequential(outer)
    apply_kernels(root, "triton", device=DEVICE)
    assert isinstance(root[0], TritonRMSNorm) and isinstance(root[0].inner, TritonRMSNorm)
    assert root[0].inner.weight is outer.inner.weight


def train(mode: str, steps: int = 3, checkpoint: bool = False) -> tuple[list[float], Transformer]:
    model = apply_kernels(tiny_model(), mode)
    if checkpoint:
        model.checkpoint_fn = lambda layer, *args: torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=g).to(DEVICE)
    # Packed rows: the second document's positions restart at 0 in the middle of the row.
    positions = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, 32).to(DEVICE)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1], positions=positions)
        loss = causal_lm_loss(logits, tokens[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("checkpoint", [False, True])
def test_training_with_triton_kernels_matches_torch(checkpoint):
    losses_torch, model_torch = train("torch")
    losses_triton, model_triton = train("triton", checkpoint=checkpoint)
    assert losses_torch[-1] < losses_torch[0]  # the steps do train
    torch.testing.assert_close(losses_triton, losses_torch, rtol=1e-5, atol=0)
    for (name, a), b in zip(model_triton.named_parameters(), model_torch.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_compiled_model_with_triton_kernels_has_no_graph_break_and_matches():
    model, reference = apply_kernels(tiny_model(), "triton"), tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break would raise
    out, ref = compiled(tokens), reference(tokens)
    torch.testing.assert_close(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_bf16_model_logits_match_torch():
    model, reference = apply_kernels(tiny_model(torch.bfloat16), "triton"), tiny_model(torch.bfloat16)
    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        out, ref = model(tokens), reference(tokens)
    # The kernels round bf16 as PyTorch does, so outputs are nearly all bit-identical; an fp32 sum
    # taken in another order may still move a value by one bf16 ulp, which later layers carry on.
    assert (out == ref).float().mean() > 0.9
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / "bench_kernels.py"


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the script runs the full benchmark")
def test_kernel_benchmark_script_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plain = subprocess.run([sys.executable, str(BENCH)], env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "needs a CUDA GPU" in plain.stdout

    # The functional smoke run goes through every implementation and writes the table.
    out = tmp_path / "kernels.md"
    smoke = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--compile-backend", "aot_eager", "--out", str(out)],
        env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    table = out.read_text()
    assert "error" not in table
    for op in ("| rms_norm |", "| rms_norm + residual |", "| rotary q+k |", "| swiglu |"):
        for impl in ("eager", "compile", "**triton**"):
            assert sum(op in line and f"| {impl} |" in line for line in table.splitlines()) == 2  # fwd, fwd+bwd
