"""merge_moe: upcycling is exactly the dense base, merged experts and routers are what the docstring says,
outputs load in transformers with tanuki-equal logits, bad inputs fail naming the key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    MixtralForCausalLM,
)

from tanuki.config import ConfigError, ModelConfig, from_dict
from tanuki.hf import export_hf, import_hf, load_hf
from tanuki.merge_moe import PROMPT_SETS, MergeError, MergeMoEConfig, merge_moe

REPO = Path(__file__).resolve().parents[1]
DENSE = ModelConfig(n_layers=2, dim=48, n_heads=4, n_kv_heads=2, ffn_dim=80, vocab_size=128, max_seq_len=64)
#: ids of make_tokenizer's tokenizer: the exports are trimmed to them (export_hf's vocab="trim")
N_IDS = 20


def make_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in "the cat sat on a mat def return x + 1 = 2 猫 が いる".split():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)
    return path


def dense_dir(path: Path, seed: int, cfg: ModelConfig = DENSE, tokenizer: Path | None = None) -> Path:
    model = build(cfg, seed)
    return export_hf(model.state_dict(), cfg, path, dtype=torch.float32, tokenizer_dir=tokenizer)


def build(cfg, seed):
    from tanuki.model import build_model

    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # non-trivial norms, so a norm taken from the wrong model would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    tok = make_tokenizer(root / "tok")
    return {
        "base": dense_dir(root / "base", 1, tokenizer=tok),
        "a": dense_dir(root / "a", 2, tokenizer=tok),
        "b": dense_dir(root / "b", 3, tokenizer=tok),
        "c": dense_dir(root / "c", 4, tokenizer=tok),
        "root": root,
    }


def merge(**kw):
    return merge_moe(from_dict(MergeMoEConfig, kw), log=lambda *_: None)


def test_upcycle_without_noise_is_exactly_the_dense_base(dirs, tmp_path):
    out = merge(base=str(dirs["base"]), gate="upcycle", n_experts=4, top_k=2, output=str(tmp_path / "moe"),
                router_std=1.0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    assert (out / "tokenizer.json").is_file() and AutoTokenizer.from_pretrained(out).eos_token_id == 2
    tokens = torch.randint(0, N_IDS, (2, 17))
    dense = import_hf(dirs["base"]).eval()
    moe = import_hf(out).eval()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(hf, MixtralForCausalLM)
    with torch.no_grad():
        expected = dense(tokens)
        torch.testing.assert_close(moe(tokens), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=1e-5, atol=1e-6)


def test_upcycle_noise_is_seeded_and_relative(dirs, tmp_path):
    kw = dict(base=str(dirs["base"]), gate="upcycle", n_experts=2, noise_std=0.1)
    _, a = load_hf(merge(**kw, seed=1, output=str(tmp_path / "a")))
    _, b = load_hf(merge(**kw, seed=1, output=str(tmp_path / "b")))
    _, c = load_hf(merge(**kw, seed=2, output=str(tmp_path / "c")))
    _, base = load_hf(dirs["base"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = base["layers.1.mlp.w_up.weight"]
    for e in range(2):
        d = a[f"layers.1.mlp.experts.{e}.w_up.weight"] - w
        assert d.std().item() == pytest.approx(0.1 * w.std().item(), rel=0.1)
    assert not torch.equal(a["layers.1.mlp.experts.0.w_up.weight"], a["layers.1.mlp.experts.1.w_up.weight"])
    assert not torch.equal(a["layers.1.mlp.experts.0.w_up.weight"], c["layers.1.mlp.experts.0.w_up.weight"])
    assert torch.equal(a["layers.0.attn.wq.weight"], base["layers.0.attn.wq.weight"])


def test_random_gate_takes_each_expert_from_its_model(dirs, tmp_path):
    experts = [str(dirs[k]) for k in "abc"]
    out = merge(base=str(dirs["base"]), experts=experts, gate="random", top_k=2, seed=5, router_std=0.5,
                output=str(tmp_path / "moe"), dtype="bfloat16")
    cfg, sd = load_hf(out)
    assert (cfg.n_experts, cfg.top_k) == (3, 2)
    _, base = load_hf(dirs["base"])
    for name in ("embed.weight", "head.weight", "norm.weight", "layers.1.attn.wk.weight", "layers.1.mlp_norm.weight"):
        assert torch.equal(sd[name], base[name].bfloat16()), name
    for e, key in enumerate("abc"):
        _, dense = load_hf(dirs[key])
        for w in ("w_gate", "w_up", "w_down"):
            assert torch.equal(sd[f"layers.0.mlp.experts.{e}.{w}.weight"], dense[f"layers.0.mlp.{w}.weight"].bfloat16())
    router = sd["layers.0.mlp.router.weight"].float()
    assert router.shape == (3, DENSE.dim) and router.std().item() == pytest.approx(0.5, rel=0.2)
    _, again = load_hf(merge(base=str(dirs["base"]), experts=experts, seed=5, router_std=0.5,
                             output=str(tmp_path / "again"), dtype="bfloat16"))
    assert torch.equal(again["layers.1.mlp.router.weight"], sd["layers.1.mlp.router.weight"])

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = import_hf(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, N_IDS, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_hidden_gate_rows_follow_the_formula(dirs, tmp_path):
    prompts = [["the cat sat on a mat", "猫 が いる"], "code"]
    out = merge(base=str(dirs["base"]), experts=[str(dirs["a"]), str(dirs["b"])], gate="hidden",
                prompts=prompts, output=str(tmp_path / "moe"), device="cpu")
    _, sd = load_hf(out)

    # The formula, computed with transformers' Llama: the post-attention norm's output is the MLP input.
    hf = LlamaForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dirs["base"])
    captured = []
    for layer in hf.model.layers:
        layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    expected = []
    for texts in (prompts[0], PROMPT_SETS["code"]):
        per_prompt = []
        for text in texts:
            captured.clear()
            with torch.no_grad():
                hf(torch.tensor([tok(text)["input_ids"]]))
            per_prompt.append(torch.stack([h.mean(0) for h in captured]))
        m = torch.stack(per_prompt).mean(0)  # (layers, dim)
        expected.append(m / m.norm(dim=-1, keepdim=True))
    for layer in range(DENSE.n_layers):
        router = sd[f"layers.{layer}.mlp.router.weight"]
        torch.testing.assert_close(router, torch.stack([x[layer] for x in expected]), rtol=1e-5, atol=1e-6)
        assert torch.allclose(router.norm(dim=-1), torch.ones(2))

    hf_moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, N_IDS, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf_moe(tokens).logits, import_hf(out).eval()(tokens), rtol=1e-5, atol=1e-5)


def test_bad_configs_name_the_key():
    def cfg(**kw):
        return from_dict(MergeMoEConfig, {"base": "b", "output": "o", **kw})

    with pytest.raises(ConfigError, match="'experts': gate=random needs at least 2 expert models"):
        cfg(experts=["a"])
    with pytest.raises(ConfigError, match="'top_k': must be between 1 and the number of experts \\(2\\)"):
        cfg(experts=["a", "b"], top_k=3)
    with pytest.raises(ConfigError, match="'n_experts': gate=upcycle needs n_experts >= 2"):
        cfg(gate="upcycle")
    with pytest.raises(ConfigError, match="'experts': gate=upcycle copies the base MLP"):
        cfg(gate="upcycle", n_experts=2, experts=["a", "b"])
    with pytest.raises(ConfigError, match="'prompts': gate=hidden needs one prompt set per expert"):
        cfg(experts=["a", "b"], gate="hidden", prompts=["ja"])
    with pytest.raises(ConfigError, match="'prompts\\[1\\]': 'klingon' is not a bundled set"):
        cfg(experts=["a", "b"], gate="hidden", prompts=["ja", "klingon"])
    with pytest.raises(ConfigError, match="'prompts': is only used with gate=hidden"):
        cfg(experts=["a", "b"], prompts=["ja", "en"])
    with pytest.raises(ConfigError, match="'noise_std': is only used with gate=upcycle"):
        cfg(experts=["a", "b"], noise_std=0.1)


def test_bad_directories_name_the_expert(dirs, tmp_path):
    base = str(dirs["base"])
    wide = dense_dir(tmp_path / "wide", 6, ModelConfig(**{**DENSE.__dict__, "ffn_dim": 96}))
    with pytest.raises(MergeError, match=r"experts\[1\] \(.*wide\): ffn_dim=96 differs from the base's 80"):
        merge(base=base, experts=[str(dirs["a"]), str(wide)], output=str(tmp_path / "o"))
    with pytest.raises(MergeError, match=r"experts\[0\]: .*nope: not a directory"):
        merge(base=base, experts=[str(tmp_path / "nope"), str(dirs["a"])], output=str(tmp_path / "o"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((dirs["a"] / "config.json").read_text())
    with pytest.raises(MergeError, match=r"experts\[1\]: .*broken: no model.safetensors"):
        merge(base=base, experts=[str(dirs["a"]), str(broken)], output=str(tmp_path / "o"))
    moe = merge(base=base, gate="upcycle", n_experts=2, output=str(tmp_path / "moe"))
    with pytest.raises(MergeError, match=r"base \(.*moe\): is already a mixture of experts"):
        merge(base=str(moe), gate="upcycle", n_experts=2, output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_upcycles_and_reports_errors(dirs, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def run(*args):
        return subprocess.run([sys.executable, "launch/merge_moe.py", *args], cwd=REPO, env=env,
                              capture_output=True, text=True)

    r = run(f"base={dirs['base']}", "gate=upcycle", "n_experts=3", "top_k=2", f"output={tmp_path / 'moe'}")
    assert r.returncode == 0, r.stderr
    assert "wrote 3 experts" in r.stdout
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_experts_per_tok"] == 2
    r = run(f"base={dirs['base']}", f"experts=[{dirs['a']},{dirs['b']}]", "top_k=3", f"output={tmp_path / 'x'}")
    assert r.returncode == 2 and "config key 'top_k'" in r.stderr
    r = run(f"base={tmp_path / 'missing'}", "gate=upcycle", "n_experts=2", f"output={tmp_path / 'x'}")
    assert r.returncode == 2 and "base:" in r.stderr and "not a directory" in r.stderr
    assert not (tmp_path / "x").exists()
