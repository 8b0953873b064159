"""Model arithmetic against measurements (FLOP counter, saved tensors) and published ZeRO numbers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tanuki.config import ModelConfig, ModelInfoConfig, from_dict
from tanuki.info import (
    GIB,
    activation_bytes,
    flops_per_token,
    format_report,
    model_report,
    model_state_bytes,
)
from tanuki.losses import causal_lm_loss
from tanuki.model import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=256),
        ModelConfig(n_layers=3, dim=48, n_heads=3, n_kv_heads=3, ffn_dim=80, vocab_size=130, head_dim=32),
        # MoE: the experts a token visits (top_k of n_experts) and the router
        ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=256, n_experts=4, top_k=2),
    ],
    ids=["gqa", "head_dim", "moe"],
)
def test_flops_per_token_equals_the_flop_counter(cfg):
    """torch's FLOP counter sees every matmul of forward + backward (attention counted unmasked).

    The math SDPA backend spells attention as batched matmuls, which the counter sees on any device.
    """
    model = build_model(cfg)
    B, T = 2, 32
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        causal_lm_loss(model(tokens), tokens).loss.backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, T) * B * T, rel=1e-9)


def test_zero_memory_matches_the_paper():
    """Rajbhandari et al. 2020, Figure 1: 7.5B parameters on 64 GPUs, mixed-precision Adam (K = 12)."""
    p, n = 7.5e9, 64
    assert model_state_bytes(p, n, 1, 0) / 1e9 == pytest.approx(120, rel=1e-3)
    assert model_state_bytes(p, n, 1, 1) / 1e9 == pytest.approx(31.4, rel=1e-2)
    assert model_state_bytes(p, n, 1, 2) / 1e9 == pytest.approx(16.6, rel=1e-2)
    assert model_state_bytes(p, n, 1, 3) / 1e9 == pytest.approx(1.9, rel=2e-2)


def test_activation_estimate_matches_the_tensors_saved_for_backward():
    """The activation model counts what autograd keeps; measure it on a bf16 model (no checkpointing)."""
    cfg = ModelConfig(n_layers=3, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=352, vocab_size=512)
    model = build_model(cfg, dtype=torch.bfloat16)
    B, T = 2, 64
    saved = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    layer = model.layers[1]
    x = torch.randn(B, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(T).expand(B, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, positions)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    measured = sum(n for (ptr, dtype), n in saved.items() if ptr not in params and dtype == torch.bfloat16)
    per_layer = (activation_bytes(cfg, B, T) - 10 * cfg.vocab_size * B * T) / cfg.n_layers
    # bf16 tensors only: the estimate leaves out fp32 per-row statistics and rotary tables, which are
    # a small fraction at real sizes. It must not be off by more than a fifth.
    assert measured == pytest.approx(per_layer, rel=0.2)


def test_report_for_8b_on_a_node():
    cfg = from_dict(ModelInfoConfig, compose("model_info", ["+size=8b", "plan.gpus=8", "plan.train_tokens=1e12"]))
    r = model_report(cfg)
    assert r["params"] == 7_512_264_704
    assert r["memory"]["model_states_gib"] == pytest.approx(16 * r["params"] / 8 / GIB)
    assert r["memory"]["fits_checkpointed"]
    expected_days = 1e12 * r["flops_per_token"] / (8 * 989e12 * 0.4) / 86400
    assert r["time"]["days"] == pytest.approx(expected_days)


def test_report_for_8x8b_counts_active_parameters():
    cfg = from_dict(ModelInfoConfig, compose("model_info", ["+size=8x8b", "plan.gpus=16"]))
    r = model_report(cfg)
    assert r["params"] == 46_973_325_312 and r["active_params"] == 13_150_457_856
    dense = model_report(from_dict(ModelInfoConfig, compose("model_info", ["+size=8b", "plan.gpus=16"])))
    assert dense["active_params"] == dense["params"]
    # FLOPs follow the active parameters: between the dense 8b and a dense model of all 47B
    assert dense["flops_per_token"] < r["flops_per_token"] < 6 * r["params"]
    assert "active per token" in format_report("8x8b", r) and "active per token" not in format_report("8b", dense)


def test_model_info_cli_prints_counts_and_plan():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "launch/model_info.py", "+size=1.8b", "plan.gpus=16"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "407,896,064" in r.stdout and "1,459,718,144" in r.stdout
    assert "16 GPUs" in r.stdout and "GiB" in r.stdout
    bad = subprocess.run(
        [sys.executable, "launch/model_info.py", "+size=8b", "model.n_kv_heads=5"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert bad.returncode == 2
    assert "config key 'model.n_kv_heads'" in bad.stderr
