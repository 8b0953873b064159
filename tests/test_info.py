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

from tanuki.config import ModelConfig, from_dict
from tanuki.info import (
    GIB,
    ModelInfoConfig,
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


def saved_activation_bytes(layer, B: int, T: int, dim: int, dtypes=(torch.bfloat16,)) -> int:
    """Bytes of the tensors of ``dtypes`` (not parameters) autograd keeps for backward of one layer's forward."""
    saved = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    x = torch.randn(B, T, dim, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, torch.arange(T).expand(B, T))
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    return sum(n for (ptr, dtype), n in saved.items() if ptr not in params and dtype in dtypes)


def test_activation_estimate_matches_the_tensors_saved_for_backward():
    """The activation model counts what autograd keeps; measure it on a bf16 model (no checkpointing)."""
    cfg = ModelConfig(n_layers=3, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=352, vocab_size=512)
    model = build_model(cfg, dtype=torch.bfloat16)
    B, T = 2, 64
    measured = saved_activation_bytes(model.layers[1], B, T, cfg.dim)
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


# Fine-tuning plans: init=<HF dir> (config.json only) and method=lora.

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.mark.parametrize("lora", [
    dict(r=4),
    dict(r=8, target_modules=("q_proj", "v_proj")),
    dict(r=2, target_modules=("o_proj", "down_proj"), train_embeddings=True, train_head=True),
])
@pytest.mark.parametrize("cfg", [
    ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=256),
    ModelConfig(n_layers=3, dim=48, n_heads=3, n_kv_heads=3, ffn_dim=80, vocab_size=130, head_dim=32),
], ids=["gqa", "head_dim"])
def test_lora_parameter_formula_equals_the_adapted_model(cfg, lora):
    from tanuki.info import lora_trainable_parameters
    from tanuki.lora import LoraConfig, apply_lora, count_trainable_parameters

    lora = LoraConfig(**lora)
    assert lora_trainable_parameters(cfg, lora) == count_trainable_parameters(apply_lora(build_model(cfg), lora))


def test_lora_activation_estimate_matches_the_tensors_saved_for_backward():
    """Full fine-tuning's activations plus the adapters' (A x, and with dropout its input and mask),
    measured on one bf16 layer with adapters in training mode, as the test above measures the base."""
    from tanuki.info import lora_activation_bytes
    from tanuki.lora import LoraConfig, apply_lora

    cfg = ModelConfig(n_layers=3, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=352, vocab_size=512)
    for dropout in (0.0, 0.1):
        lora = LoraConfig(r=16, dropout=dropout)
        model = apply_lora(build_model(cfg, dtype=torch.bfloat16), lora).train()
        B, T = 2, 64
        # bf16 activations and LoRA dropout's bool masks
        measured = saved_activation_bytes(model.layers[1], B, T, cfg.dim, dtypes=(torch.bfloat16, torch.bool))
        per_layer = (activation_bytes(cfg, B, T) - 10 * cfg.vocab_size * B * T + lora_activation_bytes(cfg, lora, B, T)) / cfg.n_layers
        assert measured == pytest.approx(per_layer, rel=0.2), dropout


def test_lora_plan_of_a_hf_directory_with_only_its_config(tmp_path):
    import json

    from tanuki.hf import model_config_from_hf
    from tanuki.info import meta_param_counts

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    overrides = [f"init={tmp_path}", "method=lora", "lora.r=64", "plan.gpus=4", "plan.gpu_memory_gib=48",
                 "train.seq_len=4096", "train.micro_batch_size=1", "parallel.zero_stage=3"]
    r = model_report(from_dict(ModelInfoConfig, compose("model_info", overrides)))
    params = meta_param_counts(model_config_from_hf(LLAMA3_8B)).total
    assert r["params"] == params == 8_030_261_248  # Llama 3 8B
    lora = r["lora"]
    # r x (in + out) over q, k, v, o (4096 -> 4096 / 1024) and gate, up, down (4096 <-> 14336), 32 layers;
    # the count PEFT prints for Llama 3 8B with r=64 on every projection
    assert lora["trainable_params"] == 32 * 64 * (2 * 8192 + 2 * 5120 + 3 * 18432) == 167_772_160
    assert lora["adapted_layers"] == 32 * 7 and lora["frozen_params"] == params
    # ZeRO-3 over 4 ranks: bf16 base (2 bytes) and adapters with grads + AdamW (16 bytes), partitioned
    assert lora["memory"]["model_states_gib"] == pytest.approx((2 * params + 16 * 167_772_160) / 4 / GIB)
    assert r["memory"]["model_states_gib"] == pytest.approx(16 * params / 4 / GIB)
    assert lora["memory"]["fits_checkpointed"] and not r["memory"]["fits"]
    text = format_report(str(tmp_path), r)
    assert "LoRA r 64" in text and "167,772,160" in text and "full fine-tuning memory plan" in text
    # the embedding and the head trained as well: 16 bytes each instead of the frozen 2
    both = model_report(from_dict(ModelInfoConfig, compose("model_info", overrides + ["lora.train_embeddings=true",
                                                                                      "lora.train_head=true"])))
    tables = 2 * 128256 * 4096
    assert both["lora"]["trainable_params"] == 167_772_160 + tables and both["lora"]["frozen_params"] == params - tables


def test_fine_tuning_plan_errors_name_the_key(tmp_path):
    import json

    from tanuki.config import ConfigError

    with pytest.raises(ConfigError, match="init"):
        model_report(from_dict(ModelInfoConfig, compose("model_info", [f"init={tmp_path}"])))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    with pytest.raises(ConfigError, match="train.seq_len"):
        model_report(from_dict(ModelInfoConfig, compose("model_info", [f"init={tmp_path}", "train.seq_len=16384"])))
    with pytest.raises(ConfigError, match="method"):
        from_dict(ModelInfoConfig, compose("model_info", [f"init={tmp_path}", "method=lora", "parallel.tp=2"]))


def test_model_info_cli_plans_lora_for_a_hf_directory(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "launch/model_info.py", f"init={tmp_path}", "method=lora", "lora.r=64", "plan.gpus=4",
         "plan.gpu_memory_gib=48"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert f"model {tmp_path}" in r.stdout and "8,030,261,248" in r.stdout and "167,772,160" in r.stdout
    assert "LoRA memory plan per GPU: 4 GPUs" in r.stdout and "full fine-tuning memory plan" in r.stdout
