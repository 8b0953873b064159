"""Hugging Face export/import: sharding, tokenizer files, atomicity, bad directories, the CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tanuki.checkpoint import load_model_file, save_model_file
from tanuki.config import ModelConfig, pad_vocab_size
from tanuki.hf import (
    HFFormatError,
    export_hf,
    from_hf_name,
    import_hf,
    load_hf,
    to_hf_name,
)
from tanuki.model import build_model

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=320, max_seq_len=64)


def make_tokenizer(path: Path) -> Path:
    """A small word-level tokenizer with the special tokens tanuki's tokenizers carry."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in "the cat sat on mat 猫 が いる".split():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    return path


def test_names_round_trip():
    model = build_model(CFG)
    for name in model.state_dict():
        assert from_hf_name(to_hf_name(name)) == name
    with pytest.raises(KeyError):
        to_hf_name("layers.0.attn.unknown.weight")


def test_sharded_export_loads_in_transformers(tmp_path):
    model = build_model(CFG, seed=3)
    out = export_hf(model.state_dict(), CFG, tmp_path / "hf", dtype=torch.float32, max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert len(index["weight_map"]) == len(model.state_dict())
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(hf, LlamaForCausalLM)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
    # and back
    cfg2, sd2 = load_hf(out)
    assert cfg2 == CFG
    for k, v in model.state_dict().items():
        assert torch.equal(sd2[k], v), k


def test_export_bf16_with_tokenizer(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    model = build_model(CFG, seed=4)
    out = export_hf(model.state_dict(), CFG, tmp_path / "hf", tokenizer_dir=tok_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert config["rope_theta"] == CFG.rope_theta
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    # trimmed to the tokenizer's 12 ids (the default export.vocab=trim)
    assert torch.equal(hf.model.embed_tokens.weight, model.embed.weight[:12].bfloat16())
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).eos_token_id == 2


def test_export_refuses_non_empty_output_and_overwrites_when_asked(tmp_path):
    out = tmp_path / "hf"
    sd = build_model(CFG).state_dict()
    export_hf(sd, CFG, out)
    (out / "keep.txt").write_text("stale")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(sd, CFG, out)
    assert (out / "keep.txt").read_text() == "stale"
    export_hf(sd, CFG, out, overwrite=True)  # an earlier export is replaced
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("contents", [{"notes.txt": "user data"}, {"config.json": "{}", "notes.txt": "x"},
                                      {"train.bin": "x", "train.idx": "x"}])
def test_overwrite_refuses_a_directory_that_is_not_a_model_export(tmp_path, contents):
    """overwrite=true pointed at a dataset directory once wiped it: only an export (config.json with
    weights) is replaced."""
    from tanuki.hf import write_peft_adapter

    out = tmp_path / "data"
    out.mkdir()
    for name, text in contents.items():
        (out / name).write_text(text)
    with pytest.raises(FileExistsError, match=f"{out} is not empty and is not a model export"):
        export_hf(build_model(CFG).state_dict(), CFG, out, overwrite=True)
    with pytest.raises(FileExistsError, match="not a model export"):
        write_peft_adapter({}, {}, out, overwrite=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary directory either


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_export_keeps_the_users_umask(tmp_path, umask):
    import os

    previous = os.umask(umask)
    try:
        out = export_hf(build_model(CFG).state_dict(), CFG, tmp_path / "hf", max_shard_size="40KB")
    finally:
        os.umask(previous)
    # the oracle: what the kernel gives mkdir/open under this umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    calls = {"n": 0}
    real = safetensors.torch.save_file

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(build_model(CFG).state_dict(), CFG, tmp_path / "hf", max_shard_size="40KB")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


@pytest.mark.parametrize("err,cause", [("ENOSPC", "the disk is full (ENOSPC)"),
                                       ("EROFS", "the file system is read-only (EROFS)")])
def test_a_full_disk_or_read_only_output_during_export_is_named_and_leaves_nothing(tmp_path, monkeypatch, err, cause):
    import errno

    import safetensors.torch

    from tanuki import fileio
    from tanuki.fileio import WriteError

    code = getattr(errno, err)
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(code, os.strerror(code), str(filename))
        return real(tensors, filename, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(WriteError, match=rf"writing {tmp_path / 'hf'} \(nothing was left there\) failed at .*{re.escape(cause)}"):
        export_hf(build_model(CFG).state_dict(), CFG, tmp_path / "hf", max_shard_size="40KB")
    assert list(tmp_path.iterdir()) == []

    # a directory that cannot be written at all (what a read-only mount gives; chmod does not stop root)
    def no_dir(*args, **kwargs):
        raise OSError(code, os.strerror(code), kwargs.get("dir"))

    monkeypatch.setattr(fileio.tempfile, "mkdtemp", no_dir)
    with pytest.raises(WriteError, match=re.escape(cause)):
        export_hf(build_model(CFG).state_dict(), CFG, tmp_path / "hf")


def test_a_truncated_safetensors_file_is_named_on_import(tmp_path):
    from tanuki.hf import HFFormatError, load_hf

    out = export_hf(build_model(CFG).state_dict(), CFG, tmp_path / "hf", dtype=torch.float32)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(HFFormatError, match=rf"{f}: not a readable safetensors file: damaged, truncated"):
        load_hf(out)


def test_export_checks_the_state_dict(tmp_path):
    sd = build_model(CFG).state_dict()
    del sd["layers.1.mlp.w_up.weight"]
    with pytest.raises(KeyError, match="layers.1.mlp.w_up.weight"):
        export_hf(sd, CFG, tmp_path / "a")
    sd = build_model(CFG).state_dict()
    sd["norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="norm.weight"):
        export_hf(sd, CFG, tmp_path / "b")


def test_import_rejects_a_model_that_is_not_llama(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(HFFormatError, match=r"config.json: model_type='gpt2' .* is not supported"):
        import_hf(tmp_path / "gpt2")


def test_import_errors_name_the_problem(tmp_path):
    with pytest.raises(HFFormatError, match="not a directory"):
        import_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFFormatError, match=r"empty/config.json: missing"):
        import_hf(tmp_path / "empty")

    hf_cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "ok")

    (tmp_path / "ok" / "model.safetensors").rename(tmp_path / "weights.bak")
    with pytest.raises(HFFormatError, match="no model.safetensors"):
        import_hf(tmp_path / "ok")
    (tmp_path / "weights.bak").rename(tmp_path / "ok" / "model.safetensors")

    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    bad = dict(config, intermediate_size=65)
    (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(HFFormatError, match="mlp.gate_proj.weight' has shape"):
        import_hf(tmp_path / "ok")
    bad = dict(config, rope_parameters={"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0})
    (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(HFFormatError, match="rope_scaling.rope_type='longrope' is not supported"):
        import_hf(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(HFFormatError, match="invalid JSON at line 1"):
        import_hf(tmp_path / "ok")


def test_import_of_tied_embeddings_keeps_them_tied(tmp_path):
    hf_cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "tied")
    model = import_hf(tmp_path / "tied").eval()
    tokens = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    assert model.cfg.tie_embeddings and model.head.weight is model.embed.weight


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)


def test_model_file_round_trip_and_export_cli(tmp_path):
    model = build_model(CFG, seed=9)
    save_model_file(model.state_dict(), CFG, tmp_path / "model.safetensors")
    cfg, sd = load_model_file(tmp_path / "model.safetensors")
    assert cfg == CFG and torch.equal(sd["head.weight"], model.head.weight)

    tok = make_tokenizer(tmp_path / "tok")
    r = _run(["launch/export_hf.py", f"checkpoint={tmp_path / 'model.safetensors'}", f"output={tmp_path / 'hf'}",
              f"tokenizer={tok}", "dtype=float32"])
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stdout
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokens = torch.randint(0, 12, (1, 11))  # the tokenizer's 12 ids: the export is trimmed to them
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[..., :12], rtol=1e-5, atol=1e-5)
    r = _run(["launch/export_hf.py", f"checkpoint={tmp_path / 'model.safetensors'}", f"output={tmp_path / 'hf-padded'}",
              f"tokenizer={tok}", "dtype=float32", "vocab=padded"])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf-padded" / "config.json").read_text())["vocab_size"] == CFG.vocab_size

    # bad input: a checkpoint that does not exist, a file that is not a tanuki model, a missing key
    r = _run(["launch/export_hf.py", f"checkpoint={tmp_path / 'missing.safetensors'}", f"output={tmp_path / 'x'}"])
    assert r.returncode == 2 and "missing.safetensors: no such model file" in r.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    r = _run(["launch/export_hf.py", f"checkpoint={tmp_path / 'junk.safetensors'}", f"output={tmp_path / 'x'}"])
    assert r.returncode == 2 and "junk.safetensors: not a readable safetensors file" in r.stderr
    r = _run(["launch/export_hf.py", f"output={tmp_path / 'x'}"])
    assert r.returncode == 2 and "config key 'checkpoint': is required" in r.stderr
    assert not (tmp_path / "x").exists()


# -- vocabulary rows: trimmed to the tokenizer by default, padded back on import -------------------

MOE_CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=320, max_seq_len=64,
                      n_experts=4, top_k=2)


@pytest.mark.parametrize("cfg", [CFG, MOE_CFG], ids=["llama", "mixtral"])
def test_trimmed_export_scores_text_as_tanuki_and_never_produces_a_padded_id(tmp_path, cfg):
    from transformers import AutoTokenizer

    tok_dir = make_tokenizer(tmp_path / "tok")
    n = len(AutoTokenizer.from_pretrained(tok_dir))  # 12 ids; the model has 320 rows
    model = build_model(cfg, seed=5).eval()
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", dtype=torch.float32, tokenizer_dir=tok_dir)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.vocab_size == n and hf.lm_head.weight.shape[0] == n
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["the cat sat on the mat", "猫 が いる the mat", "mat mat cat 猫"]
    ids = torch.tensor([tok(t).input_ids[:4] for t in texts])
    ids = torch.cat([ids, torch.randint(0, n, (3, 10), generator=torch.Generator().manual_seed(0))], dim=1)
    with torch.no_grad():
        theirs = torch.log_softmax(hf(ids).logits, dim=-1)
        full = model(ids)
        # the oracle: tanuki's log-probs, the padded rows kept out of the softmax as vocab_limit does
        ours = torch.log_softmax(full[..., :n], dim=-1)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # the untrimmed model's argmax lands on padded ids (random rows); the export's never can
    assert (full.argmax(-1) >= n).any()
    assert (theirs.argmax(-1) < n).all()
    generated = hf.generate(ids[:, :4], max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert int(generated.max()) < n


def test_padded_export_keeps_the_shape_with_zero_rows(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    model = build_model(CFG, seed=6)
    out = export_hf(model.state_dict(), CFG, tmp_path / "hf", dtype=torch.float32, tokenizer_dir=tok_dir,
                    vocab="padded")
    cfg, sd = load_hf(out)
    assert cfg == CFG
    for name in ("embed.weight", "head.weight"):
        assert torch.equal(sd[name][:12], model.state_dict()[name][:12])
        assert not sd[name][12:].any()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([[4, 5, 6]])).logits
    assert not logits[..., 12:].any()  # exactly 0: for engines that mask by the tokenizer's size
    with pytest.raises(ValueError, match="vocab="):
        export_hf(model.state_dict(), CFG, tmp_path / "hf2", tokenizer_dir=tok_dir, vocab="round")


def test_export_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    small = ModelConfig(n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=8, max_seq_len=64)
    with pytest.raises(ValueError, match="12 ids.*8 embedding rows"):
        export_hf(build_model(small).state_dict(), small, tmp_path / "hf", tokenizer_dir=tok_dir)


def test_export_import_export_round_trip_with_padding_for_tp(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    model = build_model(CFG, seed=7)
    first = export_hf(model.state_dict(), CFG, tmp_path / "a", dtype=torch.float32, tokenizer_dir=tok_dir)
    # as a stage imports it for training with tp=2: padded to a multiple of 128 x 2 by zero rows
    rows = pad_vocab_size(12, tp=2)
    cfg, sd = load_hf(first, vocab_size=rows)
    assert rows == 256 and cfg.vocab_size == rows
    for name in ("embed.weight", "head.weight"):
        assert sd[name].shape[0] == rows and not sd[name][12:].any()
        assert torch.equal(sd[name][:12], model.state_dict()[name][:12])
    imported = import_hf(first, vocab_size=rows)
    x = torch.randint(0, 12, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(imported(x)[..., :12], -1),
                                   torch.log_softmax(model(x)[..., :12], -1), rtol=0, atol=1e-6)
    second = export_hf(sd, cfg, tmp_path / "b", dtype=torch.float32, tokenizer_dir=tok_dir)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    _, a = load_hf(first)
    _, b = load_hf(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="cannot pad"):
        load_hf(first, vocab_size=8)
