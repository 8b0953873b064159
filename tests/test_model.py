"""The model against a tiny random Hugging Face ``LlamaForCausalLM`` built in the test, and formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, compose
from transformers import LlamaConfig, LlamaForCausalLM

from tanuki.config import ModelConfig, PretrainConfig, from_dict
from tanuki.hf import export_hf, import_hf
from tanuki.losses import causal_lm_loss
from tanuki.model import (
    RMSNorm,
    Transformer,
    build_model,
    count_parameters,
    param_counts_formula,
)

# GQA, MHA, multi-query, odd vocabulary sizes, an explicit head_dim that differs from dim / heads.
SHAPES = {
    "gqa": ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=301, max_seq_len=64),
    "mha": ModelConfig(n_layers=3, dim=48, n_heads=3, n_kv_heads=3, ffn_dim=80, vocab_size=257, max_seq_len=64,
                       rope_theta=500000.0, norm_eps=1e-6),
    "mqa": ModelConfig(n_layers=1, dim=64, n_heads=8, n_kv_heads=1, ffn_dim=128, vocab_size=128, max_seq_len=64),
    "head_dim": ModelConfig(n_layers=2, dim=40, n_heads=4, n_kv_heads=2, ffn_dim=72, vocab_size=99, head_dim=16,
                            max_seq_len=64),
}


def hf_config_for(cfg: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.attn_head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
    )


@pytest.fixture(params=sorted(SHAPES))
def shape(request):
    return SHAPES[request.param]


def test_tanuki_to_transformers_logits_and_loss(shape, tmp_path):
    torch.manual_seed(0)
    model = build_model(shape, seed=1)
    export_hf(model.state_dict(), shape, tmp_path / "hf", dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, shape.vocab_size, (2, 23))
    with torch.no_grad():
        ours = model(tokens)
        out = hf(tokens, labels=tokens)
    torch.testing.assert_close(ours, out.logits, rtol=1e-5, atol=1e-5)
    # HF shifts inside its loss; tanuki's loss takes aligned labels.
    loss = causal_lm_loss(ours[:, :-1], tokens[:, 1:]).loss
    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=1e-6)


def test_transformers_to_tanuki_logits(shape, tmp_path):
    torch.manual_seed(2)
    hf = LlamaForCausalLM(hf_config_for(shape)).eval()
    # HF initialises norms to one; randomise them so a swapped norm would show.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf").eval()
    assert model.cfg == shape
    tokens = torch.randint(0, shape.vocab_size, (3, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_parameter_counts_of_every_size_match_the_formula():
    sizes = sorted(p.stem for p in (CONF / "size").glob("*.yaml"))
    assert {"tiny", "1.8b", "3.7b", "8b", "13b"} <= set(sizes)
    for size in sizes:
        cfg = from_dict(PretrainConfig, compose("pretrain", [f"+size={size}"])).model
        with torch.device("meta"):
            model = Transformer(cfg)
        assert count_parameters(model) == param_counts_formula(cfg), size


@pytest.mark.parametrize(
    "size, embedding, non_embedding",
    [  # published on the llm-jp-3 model cards
        ("1.8b", 407_896_064, 1_459_718_144),
        ("3.7b", 611_844_096, 3_171_068_928),
        ("13b", 1_019_740_160, 12_688_184_320),
    ],
)
def test_llm_jp_parameter_counts_are_the_published_ones(size, embedding, non_embedding):
    cfg = from_dict(PretrainConfig, compose("pretrain", [f"+size={size}"])).model
    with torch.device("meta"):
        counts = count_parameters(Transformer(cfg))
    assert (counts.embedding, counts.non_embedding) == (embedding, non_embedding)


def test_meta_build_allocates_nothing():
    cfg = from_dict(PretrainConfig, compose("pretrain", ["+size=13b"])).model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())


def test_init_is_deterministic_and_scales_output_projections():
    cfg = ModelConfig(n_layers=8, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512, init_std=0.02)
    a, b = build_model(cfg, seed=7), build_model(cfg, seed=7)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    c = build_model(cfg, seed=8)
    assert not torch.equal(a.layers[0].attn.wq.weight, c.layers[0].attn.wq.weight)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    for layer in a.layers:
        assert layer.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert layer.attn.wo.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert layer.mlp.w_down.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert torch.equal(layer.attn_norm.weight, torch.ones(cfg.dim))
    assert a.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_rmsnorm_casting_order_matches_hf_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(96, 1e-5), LlamaRMSNorm(96, eps=1e-5)
    w = torch.rand(96) + 0.5
    ours.weight.data.copy_(w)
    theirs.weight.data.copy_(w)
    x = torch.randn(5, 7, 96).bfloat16()
    assert torch.equal(ours.bfloat16()(x), theirs.bfloat16()(x))
    # the fused residual form returns (norm(x + r), x + r)
    r = torch.randn_like(x)
    y, h = ours.bfloat16()(x, residual=r)
    assert torch.equal(h, x + r) and torch.equal(y, theirs.bfloat16()(x + r))


def test_kv_cache_decoding_equals_full_forward():
    cfg = SHAPES["gqa"]
    model = build_model(cfg, seed=3).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, :8], cache=cache), model(tokens[:, 8:13], cache=cache)]
        parts += [model(tokens[:, t : t + 1], cache=cache) for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_packed_segments_equal_separate_sequences():
    cfg = SHAPES["gqa"]
    model = build_model(cfg, seed=4).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 9))
    b = torch.randint(0, cfg.vocab_size, (1, 6))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 9 + [1] * 6])
    positions = torch.tensor([list(range(9)) + list(range(6))])
    with torch.no_grad():
        out = model(packed, positions=positions, segment_ids=segments)
        torch.testing.assert_close(out[:, :9], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 9:], model(b), rtol=1e-5, atol=1e-5)


def test_backward_reaches_every_parameter():
    cfg = SHAPES["gqa"]
    model = build_model(cfg, seed=5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_ignores_labels_and_padded_vocab():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12)
    labels = torch.randint(0, 10, (2, 5))
    labels[0, :2] = -100
    out = causal_lm_loss(logits, labels, vocab_limit=10)
    keep = labels != -100
    ref = F.cross_entropy(logits[..., :10][keep], labels[keep])
    torch.testing.assert_close(out.loss, ref)
    assert out.tokens.item() == keep.sum().item()


def test_z_loss_is_mean_squared_log_normaliser():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 9) * 3
    labels = torch.randint(0, 9, (3, 4))
    labels[1, 1] = -100
    out = causal_lm_loss(logits, labels, z_loss=1e-4)
    keep = labels != -100
    lse = torch.logsumexp(logits[keep], dim=-1)
    ce = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, ce + 1e-4 * (lse**2).mean())
    torch.testing.assert_close(out.z, (lse**2).mean())


def test_loss_normalizer_sums_across_micro_batches():
    """Dividing by the global token count makes the sum over micro-batches the global mean."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[0, 3:] = -100
    labels[2, 1:] = -100
    total = (labels != -100).sum()
    parts = sum(causal_lm_loss(logits[i : i + 1], labels[i : i + 1], normalizer=total).loss for i in range(4))
    torch.testing.assert_close(parts, causal_lm_loss(logits, labels).loss)


def test_rotary_frequencies_stay_fp32_when_the_model_is_cast():
    cfg = SHAPES["gqa"]
    model = build_model(cfg, dtype=torch.bfloat16)
    rotary = model.layers[0].attn.rotary
    assert rotary.inv_freq.dtype == torch.float32
    expected = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.attn_head_dim, 2, dtype=torch.float64) / cfg.attn_head_dim)
    torch.testing.assert_close(rotary.inv_freq.double(), expected, rtol=1e-6, atol=0)
