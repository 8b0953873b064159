"""Mixture of experts: the dense-equivalence oracle, routing and aux losses against a direct implementation
and transformers' Mixtral, export/import parity with ``MixtralForCausalLM``, config checks, counts."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import (
    MixtralTopKRouter,
    load_balancing_loss_func,
)

from tanuki.config import ConfigError, ModelConfig, PretrainConfig, from_dict
from tanuki.fused import apply_kernels, kernel_summary
from tanuki.hf import export_hf, import_hf, load_hf, to_hf_name
from tanuki.model import (
    MLP,
    MoEMLP,
    build_model,
    count_parameters,
    expert_load,
    moe_losses,
    param_counts_formula,
)

DENSE = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=320, max_seq_len=64)
MOE = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=320, max_seq_len=64,
                  n_experts=4, top_k=2, router_aux_loss_coef=0.01, router_z_loss_coef=0.002)


def moe_from_dense(dense, cfg: ModelConfig, router_std: float = 1.0, seed: int = 0):
    """An MoE whose every expert is the dense model's MLP, with a random router."""
    moe = build_model(cfg, seed=seed)
    sd = moe.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for name, t in dense.state_dict().items():
        if ".mlp." in name:
            layer, w = name.split(".mlp.")
            for e in range(cfg.n_experts):
                sd[f"{layer}.mlp.experts.{e}.{w}"] = t.clone()
        else:
            sd[name] = t
    for name in sd:
        if name.endswith("router.weight"):
            sd[name] = torch.randn(sd[name].shape, generator=gen) * router_std
    moe.load_state_dict(sd)
    return moe


def router_logits_of(model, tokens):
    """Each layer's router logits (tokens, n_experts) in a forward of ``model``."""
    logits = []
    hooks = [m.router.register_forward_hook(lambda mod, i, o: logits.append(o.detach()))
             for m in model.modules() if isinstance(m, MoEMLP)]
    with torch.no_grad():
        out = model(tokens)
    for h in hooks:
        h.remove()
    return out, logits


# -- the exact oracle: equal experts make the router irrelevant ------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_of_equal_experts_is_the_dense_model_for_any_router(top_k):
    dense = build_model(DENSE, seed=1)
    cfg = ModelConfig(**{**MOE.__dict__, "top_k": top_k})
    tokens = torch.randint(0, DENSE.vocab_size, (3, 21))
    with torch.no_grad():
        expected = dense(tokens)
        for seed, router_std in ((0, 1.0), (1, 30.0), (2, 1e-3)):
            got = moe_from_dense(dense, cfg, router_std, seed)(tokens)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and one MLP on its own, where only the weight sum can differ from 1 by rounding
    x = torch.randn(50, DENSE.dim)
    moe = moe_from_dense(dense, cfg).layers[0].mlp
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense.layers[0].mlp(x), rtol=1e-6, atol=1e-7)


# -- routing -------------------------------------------------------------------------------------------


def direct_moe(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """Mixtral routing token by token: softmax over all experts, top-k, renormalise, weighted sum."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = torch.softmax(moe.router.weight @ x[t], dim=0)
        order = sorted(range(moe.n_experts), key=lambda e: -p[e].item())[: moe.top_k]
        total = sum(p[e] for e in order)
        for e in order:
            out[t] += p[e] / total * moe.experts[e](x[t][None])[0]
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routing_equals_a_direct_implementation_and_transformers_router(top_k):
    cfg = ModelConfig(**{**MOE.__dict__, "top_k": top_k})
    moe = build_model(cfg, seed=3).layers[1].mlp
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
        x = torch.randn(2, 13, cfg.dim)
        torch.testing.assert_close(moe(x).reshape(-1, cfg.dim), direct_moe(moe, x.reshape(-1, cfg.dim)),
                                   rtol=1e-5, atol=1e-6)
        hf_router = MixtralTopKRouter(MixtralConfig(hidden_size=cfg.dim, num_local_experts=cfg.n_experts,
                                                    num_experts_per_tok=top_k))
        hf_router.weight.copy_(moe.router.weight)
        hf_logits, hf_scores, hf_idx = hf_router(x)
        logits, _, weights, experts = moe.route(x.reshape(-1, cfg.dim))
    assert torch.equal(experts, hf_idx)
    torch.testing.assert_close(weights, hf_scores, rtol=0, atol=0)
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=0)
    assert torch.allclose(weights.sum(-1), torch.ones(x.shape[0] * x.shape[1]))


def test_aux_and_z_losses_equal_the_formula_and_transformers():
    model = build_model(MOE, seed=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEMLP):
                m.router.weight.normal_(0, 0.3)  # an unbalanced router
    tokens = torch.randint(0, MOE.vocab_size, (3, 17))
    _, logits = router_logits_of(model, tokens)
    E, k = MOE.n_experts, MOE.top_k

    def switch_loss(layer_logits):  # Switch Transformer eq. 4-6, with Mixtral's f over top-k assignments
        p = torch.softmax(layer_logits, dim=-1)
        chosen = p.topk(k, dim=-1).indices
        f = torch.stack([(chosen == e).sum() for e in range(E)]).float() / p.shape[0]
        return E * (f * p.mean(0)).sum()

    stats = [m.router_stats for m in model.modules() if isinstance(m, MoEMLP)]
    for s, lg in zip(stats, logits):
        torch.testing.assert_close(s.aux_loss(), switch_loss(lg))
        torch.testing.assert_close(s.aux_loss(), load_balancing_loss_func((lg,), E, k))
        torch.testing.assert_close(s.z_loss(), (torch.logsumexp(lg, -1) ** 2).mean())
        assert torch.equal(s.load, torch.bincount(lg.topk(k).indices.reshape(-1), minlength=E) / (lg.shape[0] * k))

    loss, out = model.moe_losses()
    pooled_aux = load_balancing_loss_func(tuple(logits), E, k)  # what MixtralForCausalLM reports as aux_loss
    pooled_z = (torch.logsumexp(torch.cat(logits), -1) ** 2).mean()
    torch.testing.assert_close(out["moe_aux_loss"], pooled_aux)
    torch.testing.assert_close(out["moe_z_loss"], pooled_z)
    torch.testing.assert_close(loss.detach(), MOE.router_aux_loss_coef * pooled_aux + MOE.router_z_loss_coef * pooled_z)
    assert out["moe_load_max"] == expert_load(model).max()
    assert set(out) == {"moe_aux_loss", "moe_z_loss", "moe_load_max", "moe_load_max/layer0", "moe_load_max/layer1"}
    # a balanced, uniform router reaches the minimum, top_k
    model.layers[0].mlp.router.weight.data.zero_()
    model(tokens)
    assert model.layers[0].mlp.router_stats.aux_loss().item() == pytest.approx(k)


def test_dense_model_has_no_router_losses_and_moe_needs_a_forward():
    loss, stats = moe_losses(build_model(DENSE))
    assert loss.item() == 0 and stats == {}
    with pytest.raises(RuntimeError, match="run a forward first"):
        build_model(MOE).moe_losses()


def test_gradients_reach_router_and_every_expert_even_unused_ones():
    model = build_model(MOE, seed=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEMLP):
                m.router.weight[2:] = -100 * m.router.weight[:1].sign()  # experts 2, 3 never chosen...
                m.router.weight[:2] = 100 * m.router.weight[:1].sign()  # ...for tokens aligned with row 0
    tokens = torch.randint(0, MOE.vocab_size, (2, 11))
    logits = model(tokens)
    loss, _ = model.moe_losses()
    (logits.square().mean() + loss).backward()
    mlp = model.layers[0].mlp
    assert mlp.router.weight.grad is not None and mlp.router.weight.grad.abs().sum() > 0
    for e, expert in enumerate(mlp.experts):
        assert expert.w_gate.weight.grad is not None, e  # zeros when unused: every rank reduces the same set
    assert expert_load(model).shape == (2, 4)


def test_aux_loss_gradient_survives_activation_checkpointing():
    tokens = torch.randint(0, MOE.vocab_size, (2, 15))
    grads = []
    for ckpt in (False, True):
        model = build_model(MOE, seed=4)
        model.train()
        if ckpt:
            model.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
        logits = model(tokens)
        loss, _ = model.moe_losses()
        (logits.mean() + 10 * loss).backward()
        grads.append(model.layers[0].mlp.router.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_triton_swap_reaches_every_expert():
    model = build_model(MOE, seed=6)
    tokens = torch.randint(0, MOE.vocab_size, (1, 9))
    with torch.no_grad():
        expected = model(tokens)
        model = apply_kernels(model, "triton", device="cpu")
        assert kernel_summary(model)["TritonMLP"] == MOE.n_layers * MOE.n_experts
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_init_is_seeded_and_scales_every_down_projection():
    cfg = ModelConfig(**{**MOE.__dict__, "n_layers": 8, "dim": 256, "ffn_dim": 512})
    a, b = build_model(cfg, seed=1), build_model(cfg, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    mlp = a.layers[3].mlp
    assert mlp.router.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert mlp.experts[2].w_down.weight.std().item() == pytest.approx(cfg.init_std / 4, rel=0.05)
    assert not torch.equal(mlp.experts[0].w_gate.weight, mlp.experts[1].w_gate.weight)
    assert isinstance(mlp.experts[0], MLP)


# -- Hugging Face MixtralForCausalLM ----------------------------------------------------------------------


def test_export_loads_as_mixtral_with_equal_logits_and_aux_loss(tmp_path):
    model = build_model(MOE, seed=7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEMLP):
                m.router.weight.normal_(0, 0.2)
    out = export_hf(model.state_dict(), MOE, tmp_path / "hf", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["router_aux_loss_coef"] == MOE.router_aux_loss_coef
    assert config["output_router_logits"] is False and config["sliding_window"] is None
    assert config["rope_theta"] == MOE.rope_theta
    assert to_hf_name("layers.1.mlp.experts.3.w_up.weight") == "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf, MixtralForCausalLM)
    tokens = torch.randint(0, MOE.vocab_size, (2, 19))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens, output_router_logits=True)
    torch.testing.assert_close(ours, theirs.logits, rtol=1e-5, atol=1e-5)
    _, stats = model.moe_losses()
    torch.testing.assert_close(stats["moe_aux_loss"], theirs.aux_loss, rtol=1e-6, atol=1e-6)
    cfg2, sd2 = load_hf(out)
    assert cfg2 == ModelConfig(**{**MOE.__dict__, "router_z_loss_coef": 0.0})  # z-loss is not a Mixtral field
    assert all(torch.equal(sd2[k], v) for k, v in model.state_dict().items())


def test_mixtral_imports_with_equal_logits_in_both_namings(tmp_path):
    torch.manual_seed(8)
    hf_cfg = MixtralConfig(vocab_size=200, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
                           max_position_embeddings=64, rope_theta=5e5, tie_word_embeddings=False)
    hf = MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "v4")  # transformers writes the block_sparse_moe naming on disk
    model = import_hf(tmp_path / "v4").eval()
    assert (model.cfg.n_experts, model.cfg.top_k, model.cfg.ffn_dim) == (3, 2, 80)
    tokens = torch.randint(0, 200, (2, 23))
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)

    # transformers 5's in-memory naming (fused gate_up_proj / down_proj) is read too
    (tmp_path / "v5").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "v5" / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "v4" / "config.json").read_text())
    assert any("gate_up_proj" in k for k in hf.state_dict())
    _, sd4 = load_hf(tmp_path / "v4")
    _, sd5 = load_hf(tmp_path / "v5")
    assert sd4.keys() == sd5.keys() and all(torch.equal(sd4[k], sd5[k]) for k in sd4)


def test_mixtral_import_rejects_sliding_window(tmp_path):
    from tanuki.hf import HFFormatError, model_config_from_hf

    cfg = json.loads(json.dumps(MixtralConfig(sliding_window=16, max_position_embeddings=64).to_dict()))
    with pytest.raises(HFFormatError, match="sliding_window=16"):
        model_config_from_hf(cfg)


# -- config, sizes, counts -----------------------------------------------------------------------------


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'model.top_k'"):
        ModelConfig(n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="'model.top_k'"):
        ModelConfig(n_experts=4, top_k=0)
    with pytest.raises(ConfigError, match="'model.n_experts'"):
        ModelConfig(n_experts=1)
    with pytest.raises(ConfigError, match="'model.router_aux_loss_coef'"):
        ModelConfig(n_experts=4, router_aux_loss_coef=-1.0)
    with pytest.raises(ConfigError, match="'model.router_z_loss_coef'"):
        ModelConfig(router_z_loss_coef=float("nan"))
    ModelConfig(n_experts=0, top_k=8)  # dense: top_k is not used


def test_sizes_8x8b_and_tiny_moe():
    m = from_dict(PretrainConfig, compose("pretrain", ["+size=8x8b"])).model
    dense = from_dict(PretrainConfig, compose("pretrain", ["+size=8b"])).model
    assert (m.n_experts, m.top_k, m.router_aux_loss_coef) == (8, 2, 0.001)
    assert ModelConfig(**{**m.__dict__, "n_experts": 0}) == dense  # the 8b shape
    counts = param_counts_formula(m)
    # Tanuki-8x8B: about 47B parameters, 13B active per token
    assert counts.total == pytest.approx(47.0e9, rel=0.01) and counts.active == pytest.approx(13.2e9, rel=0.01)
    tiny = from_dict(PretrainConfig, compose("pretrain", ["+size=tiny-moe"])).model
    assert (tiny.n_experts, tiny.top_k) == (4, 2)
    model = build_model(tiny)
    assert count_parameters(model) == param_counts_formula(tiny)
    assert count_parameters(model).active == count_parameters(model).total - tiny.n_layers * 2 * 3 * 256 * 704


def test_tiny_moe_trains():
    torch.manual_seed(0)
    model = build_model(MOE, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 32, (2, 17))  # a small vocabulary subset: learnable in a few steps
    losses = []
    for _ in range(10):
        logits = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, MOE.vocab_size), tokens[:, 1:].reshape(-1))
        aux, _ = model.moe_losses()
        opt.zero_grad()
        (ce + aux).backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < 0.7 * losses[0]
