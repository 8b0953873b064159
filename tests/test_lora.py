"""LoRA: PEFT adapters that transformers + PEFT load with the same logits, merging, freezing, config errors.

Oracles: a tiny random model exported with ``export_hf`` and loaded by ``AutoModelForCausalLM`` and
``peft.PeftModel`` (fp32); PEFT's own ``get_peft_model`` (parameter count, adapter keys, an adapter PEFT
writes); the formula ``W + B @ A * scale``; the unadapted model (B = 0); the torch kernels (for Triton).
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tanuki.config import ConfigError, ModelConfig, from_dict
from tanuki.hf import HFFormatError, export_hf, from_peft_name, to_peft_name
from tanuki.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_trainable_parameters,
    load_peft_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    merge_lora_state_dict,
    save_peft_adapter,
)
from tanuki.losses import causal_lm_loss
from tanuki.model import build_model

peft = pytest.importorskip("peft")

CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=320, max_seq_len=64)
#: HF name -> (in, out) of the adapted layer in CFG
SHAPES = {
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base model's state dict and its Hugging Face export (fp32)."""
    model = build_model(CFG, seed=7)
    out = export_hf(model.state_dict(), CFG, tmp_path_factory.mktemp("lora") / "base", dtype=torch.float32)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "dir": out}


def base_model(base):
    model = build_model(CFG)
    model.load_state_dict(base["state"])
    return model


def tokens(seed=0, shape=(2, 17)):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=1e-2, seed=0):
    """A few Adam steps on random tokens, so that B != 0 and the update is visible in the logits."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tokens(seed, (2, 25))
    losses = []
    for _ in range(steps):
        loss = causal_lm_loss(model(batch[:, :-1]), batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def hf_logits(model, batch):
    with torch.no_grad():
        return model.eval()(batch).logits


def tanuki_logits(model, batch):
    with torch.no_grad():
        return model.eval()(batch)


def trained_lora(base, cfg, seed=1):
    model = apply_lora(base_model(base), cfg, seed=seed)
    train_steps(model)
    return model


# --------------------------------------------------------------------------------------------------
# (a) PEFT loads tanuki's adapter with the same logits, and tanuki loads PEFT's
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        LoraConfig(r=4, alpha=8, dropout=0.1),
        LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=True, target_modules=("q_proj", "v_proj", "down_proj"),
                   train_embeddings=True, train_head=True),
    ],
    ids=["all-linears", "rslora-some-linears-embeddings-head"],
)
def test_peft_loads_the_adapter_with_the_same_logits(base, cfg, tmp_path):
    model = trained_lora(base, cfg)
    assert all(m.lora_B.weight.abs().max() > 0 for m in lora_modules(model).values())
    adapter = save_peft_adapter(model, cfg, str(base["dir"]), tmp_path / "adapter")

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config) == {
        "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
        "base_model_name_or_path", "fan_in_fan_out", "use_rslora", "use_dora", "modules_to_save", "inference_mode",
    }
    assert config["use_rslora"] is cfg.use_rslora and config["base_model_name_or_path"] == str(base["dir"])
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.lm_head.weight" in keys) is cfg.train_head

    hf = AutoModelForCausalLM.from_pretrained(base["dir"], dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter)
    batch = tokens(3)
    ours = tanuki_logits(model, batch)
    theirs = hf_logits(peft_model, batch)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # The adapter matters: the update is far above the tolerance.
    assert (ours - tanuki_logits(base_model(base), batch)).abs().max() > 1e-2

    # Back into a fresh tanuki model (resume / inspection).
    again = load_peft_adapter(base_model(base), adapter)
    assert again.lora_config == cfg
    torch.testing.assert_close(tanuki_logits(again, batch), ours, rtol=0, atol=0)


def test_tanuki_loads_an_adapter_written_by_peft(base, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(base["dir"], dtype=torch.float32)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                               task_type="CAUSAL_LM", use_rslora=True, modules_to_save=["lm_head"])
    peft_model = peft.get_peft_model(hf, peft_cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp_path / "peft_adapter")

    model = load_peft_adapter(base_model(base), tmp_path / "peft_adapter")
    assert model.lora_config == LoraConfig(r=4, alpha=16, dropout=0.0, target_modules=("k_proj", "o_proj", "up_proj"),
                                           use_rslora=True, train_head=True)
    batch = tokens(4)
    torch.testing.assert_close(tanuki_logits(model, batch), hf_logits(peft_model, batch), rtol=1e-5, atol=1e-5)


def test_peft_names_and_trainable_count_match_get_peft_model(base):
    """(c) the trainable parameters: only the factors (and embedding/head when asked), r * (in + out) each."""
    for cfg in (LoraConfig(r=8), LoraConfig(r=3, target_modules=("o_proj", "gate_proj"), train_embeddings=True),
                LoraConfig(r=2, target_modules=("v_proj",), train_head=True)):
        model = apply_lora(base_model(base), cfg)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {n for n in trainable if n.endswith((".lora_A.weight", ".lora_B.weight"))}
        assert len(expected) == 2 * CFG.n_layers * len(cfg.target_modules)
        expected |= {"embed.weight"} if cfg.train_embeddings else set()
        expected |= {"head.weight"} if cfg.train_head else set()
        assert trainable == expected
        formula = CFG.n_layers * sum(cfg.r * sum(SHAPES[t]) for t in cfg.target_modules)
        formula += CFG.vocab_size * CFG.dim * (cfg.train_embeddings + cfg.train_head)
        assert count_trainable_parameters(model) == formula

        hf = AutoModelForCausalLM.from_pretrained(base["dir"], dtype=torch.float32)
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                                     modules_to_save=list(cfg.modules_to_save) or None,
                                                     task_type="CAUSAL_LM"))
        assert pm.get_nb_trainable_parameters()[0] == formula
        peft_keys = set(peft.get_peft_model_state_dict(pm))
        assert {to_peft_name(n) for n in lora_state_dict(model)} == peft_keys
        assert all(to_peft_name(from_peft_name(k)) == k for k in peft_keys)


# --------------------------------------------------------------------------------------------------
# (b) merging
# --------------------------------------------------------------------------------------------------


def test_merged_export_is_base_plus_scaled_update_and_loads_in_transformers(base, tmp_path):
    cfg = LoraConfig(r=4, alpha=12, dropout=0.1, target_modules=("q_proj", "k_proj", "o_proj", "down_proj"),
                     train_head=True)
    model = trained_lora(base, cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora_state_dict(state, cfg)
    assert set(merged) == set(base["state"])
    scale = cfg.alpha / cfg.r
    for module in lora_modules(model):
        A, B = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        assert torch.equal(merged[f"{module}.weight"], base["state"][f"{module}.weight"] + (B @ A) * scale)
    untouched = {"layers.0.attn.wv.weight", "layers.1.mlp.w_up.weight", "embed.weight", "norm.weight"}
    assert all(torch.equal(merged[k], base["state"][k]) for k in untouched)
    assert not torch.equal(merged["head.weight"], base["state"]["head.weight"])  # trained whole

    out = export_hf(merged, CFG, tmp_path / "merged", dtype=torch.float32)
    batch = tokens(6)
    ours = tanuki_logits(model, batch)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(hf_logits(hf, batch), ours, rtol=1e-5, atol=1e-5)

    # In place: plain nn.Linear layers again, the same weights as the state-dict merge.
    merge_lora(model)
    assert not lora_modules(model) and not hasattr(model, "lora_config")
    assert type(model.layers[0].attn.wq) is torch.nn.Linear
    assert model.state_dict().keys() == merged.keys()
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())


def test_unmerged_state_dict_is_not_exported(base, tmp_path):
    model = apply_lora(base_model(base), LoraConfig(r=2))
    with pytest.raises(KeyError, match="lora_A"):
        export_hf(model.state_dict(), CFG, tmp_path / "x")


# --------------------------------------------------------------------------------------------------
# (e) initialisation, (d) config errors
# --------------------------------------------------------------------------------------------------


def test_at_init_the_adapted_model_equals_the_base_model(base):
    cfg = LoraConfig(r=8, dropout=0.2)
    model = apply_lora(base_model(base), cfg, seed=3)
    for name, m in lora_modules(model).items():
        assert torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight))
        bound = 1 / math.sqrt(m.in_features)  # kaiming-uniform with a = sqrt 5
        assert 0.5 * bound < m.lora_A.weight.abs().max() <= bound
        assert m.weight is not None and torch.equal(m.weight, base["state"][f"{name}.weight"])
    batch = tokens(1)
    ref = base_model(base).eval()(batch)
    assert torch.equal(model.eval()(batch), ref)
    assert torch.equal(model.train()(batch), ref)  # dropout acts on the adapter's input only
    # Seeded: the same seed gives the same A, another seed another.
    a = lora_state_dict(apply_lora(base_model(base), cfg, seed=3))
    b = lora_state_dict(apply_lora(base_model(base), cfg, seed=4))
    assert all(torch.equal(v, a[k]) for k, v in lora_state_dict(model).items())
    assert not torch.equal(a["layers.0.attn.wq.lora_A.weight"], b["layers.0.attn.wq.lora_A.weight"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'lora.target_modules\[2\]': 'qkv_proj' is not .* valid: q_proj, k_proj"):
        from_dict(LoraConfig, {"target_modules": ["q_proj", "k_proj", "qkv_proj"]}, prefix="lora")
    with pytest.raises(ConfigError, match=r"'lora.target_modules\[1\]': 'q_proj' is listed twice"):
        LoraConfig(target_modules=["q_proj", "q_proj"])
    with pytest.raises(ConfigError, match=r"'lora.target_modules': must name at least one"):
        LoraConfig(target_modules=[])
    with pytest.raises(ConfigError, match=r"'lora.r': must be an integer >= 1"):
        from_dict(LoraConfig, {"r": 0}, prefix="lora")
    with pytest.raises(ConfigError, match=r"'lora.dropout': must be in \[0, 1\)"):
        from_dict(LoraConfig, {"dropout": 1.0}, prefix="lora")
    with pytest.raises(ConfigError, match=r"'lora.alpha'"):
        LoraConfig(alpha=0)
    cfg = from_dict(LoraConfig, {"r": 64, "alpha": 128, "use_rslora": True}, prefix="lora")
    assert cfg.scale == 128 / 8 and LoraConfig(r=64, alpha=128).scale == 2.0


def test_tensor_parallel_models_and_double_application_are_refused(base):
    model = base_model(base)
    shard = model.layers[0].attn.wq.weight
    shard.tensor_model_parallel = True  # what apply_tensor_parallel marks its shards with
    with pytest.raises(ValueError, match=r"tensor parallelism \(a model sharded over parallel.tp > 1 ranks\) is not supported"):
        apply_lora(model, LoraConfig())
    del shard.tensor_model_parallel
    apply_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


# --------------------------------------------------------------------------------------------------
# Adapter files: atomic, refuse to clobber, reject what tanuki cannot run
# --------------------------------------------------------------------------------------------------


def test_adapter_directory_is_written_atomically_and_not_clobbered(base, tmp_path, monkeypatch):
    import safetensors.torch

    cfg = LoraConfig(r=2)
    model = apply_lora(base_model(base), cfg)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        save_peft_adapter(model, cfg, None, tmp_path / "out")
    # overwrite replaces an earlier adapter or model export only, never a directory of user files
    with pytest.raises(FileExistsError, match="not a model export"):
        save_peft_adapter(model, cfg, None, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    (tmp_path / "out" / "keep.txt").unlink()
    save_peft_adapter(model, cfg, None, tmp_path / "out")
    save_peft_adapter(model, cfg, None, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(model, cfg, None, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(ValueError, match="targets"):  # the config does not describe these adapters
        save_peft_adapter(model, LoraConfig(r=2, target_modules=("q_proj",)), None, tmp_path / "other")


def test_unsupported_adapters_are_rejected(base, tmp_path):
    cfg = LoraConfig(r=2, target_modules=("q_proj",))
    adapter = save_peft_adapter(apply_lora(base_model(base), cfg), cfg, None, tmp_path / "a")
    config_file = adapter / "adapter_config.json"
    original = json.loads(config_file.read_text())
    for change, message in (({"use_dora": True}, "use_dora=True is not supported"),
                            ({"target_modules": ["q_proj", "qkv"]}, r"lora.target_modules\[1\]"),
                            ({"target_modules": ".*q_proj"}, "needs a list"),
                            ({"modules_to_save": ["score"]}, "modules_to_save")):
        config_file.write_text(json.dumps({**original, **change}))
        with pytest.raises(HFFormatError, match=message):
            load_peft_adapter(base_model(base), adapter)
    config_file.write_text(json.dumps(original))
    with pytest.raises(ValueError, match="differs"):
        load_peft_adapter(apply_lora(base_model(base), LoraConfig(r=4, target_modules=("q_proj",))), adapter)


# --------------------------------------------------------------------------------------------------
# (f) composition with the Triton kernels and activation checkpointing
# --------------------------------------------------------------------------------------------------


def test_composes_with_triton_kernels_and_activation_checkpointing(base):
    from torch.utils.checkpoint import checkpoint

    from tanuki.fused import TritonMLP, apply_kernels

    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, train_embeddings=True)

    def run(kernels: str, checkpointing: bool):
        model = apply_kernels(base_model(base), kernels, device="cpu")
        model = apply_lora(model, cfg, seed=2)
        if checkpointing:
            model.checkpoint_fn = lambda layer, *args: checkpoint(layer, *args, use_reentrant=False)
        torch.manual_seed(0)  # the dropout masks
        return train_steps(model, steps=2), model

    losses_ref, ref = run("torch", False)
    losses, model = run("triton", True)
    assert isinstance(model.layers[0].mlp, TritonMLP) and isinstance(model.layers[0].mlp.w_up, LoraLinear)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-5, atol=1e-5)
    assert losses[1] < losses[0]
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.requires_grad == q.requires_grad, name
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(model.embed.weight, base["state"]["embed.weight"])  # trained
    assert torch.equal(model.norm.weight, base["state"]["norm.weight"])  # frozen


def test_meta_device_build_then_materialise_gives_the_same_model(base):
    """Build on meta, adapt, materialise, initialise: the same as adapting a built model (init_weights
    leaves the factors alone and draws the base weights in the same order)."""
    from tanuki.lora import reset_lora_parameters
    from tanuki.model import Transformer

    cfg = LoraConfig(r=4)
    with torch.device("meta"):
        model = Transformer(CFG)
    apply_lora(model, cfg, seed=9)
    model.to_empty(device="cpu")
    model.init_weights(seed=7)
    reset_lora_parameters(model, seed=9)
    ref = apply_lora(build_model(CFG, seed=7), cfg, seed=9)
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in ref.named_parameters() if p.requires_grad
    ]


def test_fp32_adapters_on_a_bf16_base(base):
    model = base_model(base).to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, dropout=0.0), seed=1)
    for m in lora_modules(model).values():
        m.lora_A.float()
        m.lora_B.float()
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    out = model(tokens(2))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(m.lora_B.weight.grad.dtype == torch.float32 for m in lora_modules(model).values())


def test_adapters_disabled_gives_the_base_model(base):
    """DPO's reference for a LoRA policy: the same module with every update skipped."""
    from tanuki.lora import adapters_disabled

    model = trained_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0)).eval()
    batch = tokens(2)
    ref = base_model(base).eval()(batch)
    with torch.no_grad():
        assert (model(batch) - ref).abs().max() > 1e-4
        with adapters_disabled(model):
            assert torch.equal(model(batch), ref)
        assert (model(batch) - ref).abs().max() > 1e-4  # back on after the block
