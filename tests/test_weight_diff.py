"""Weight diffs: recover(make(tuned)) is the tuned model bit for bit; a wrong raw model, other shapes and
missing tensors fail naming the checksum or the tensor; the CLI; why float32 alone is not enough."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tanuki.config import ModelConfig
from tanuki.hf import HFFormatError, export_hf
from tanuki.model import build_model
from tanuki.weight_diff import (
    FIXUPS_FILE,
    MANIFEST_FILE,
    WeightDiffError,
    add_diff,
    checksum,
    make_diff,
    make_tensor_diff,
    recover,
)

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=1280, max_seq_len=64)
INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INTS[t.element_size()])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory, read with safetensors alone (the oracle does not use weight_diff)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != FIXUPS_FILE:
            out.update(load_file(f))
    return out


def assert_bit_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


@pytest.fixture(scope="module")
def models(tiny_corpus, tmp_path_factory):
    """Tiny Llama exports: raw and tuned (independent seeds: the hardest case for the arithmetic) in
    bfloat16 (tuned sharded) and float32, and a third model as the wrong raw."""
    root = tmp_path_factory.mktemp("weight_diff")
    tok = tiny_corpus["tokenizer"]
    dirs = {}
    for key, seed, dtype, shard in [
        ("raw_bf16", 0, torch.bfloat16, "5GB"),
        ("tuned_bf16", 1, torch.bfloat16, "100KB"),
        ("wrong_bf16", 2, torch.bfloat16, "5GB"),
        ("raw_fp32", 0, torch.float32, "5GB"),
        ("tuned_fp32", 1, torch.float32, "5GB"),
    ]:
        sd = build_model(CFG, seed=seed).state_dict()
        dirs[key] = export_hf(sd, CFG, root / key, dtype=dtype, max_shard_size=shard, tokenizer_dir=tok)
    dirs["root"] = root
    return dirs


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_recover_of_make_is_the_tuned_model_bit_for_bit(models, tmp_path, dtype):
    raw, tuned = models[f"raw_{dtype}"], models[f"tuned_{dtype}"]
    diff = make_diff(raw, tuned, tmp_path / "diff", max_shard_size="150KB")
    out = recover(raw, diff, tmp_path / "recovered")

    # the diff is an ordinary sharded HF directory holding tuned - raw in the documented precision
    manifest = json.loads((diff / MANIFEST_FILE).read_text())
    index = json.loads((diff / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    work = torch.float32 if dtype == "bf16" else torch.float64
    raw_t, tuned_t, diff_t = tensors(raw), tensors(tuned), tensors(diff)
    for name, d in diff_t.items():
        assert d.dtype == work and torch.equal(d, tuned_t[name].to(work) - raw_t[name].to(work)), name
    assert json.loads((diff / "config.json").read_text())["dtype"] == str(work).removeprefix("torch.")
    assert manifest["tuned_checksum"] == checksum(tuned_t)
    assert manifest["raw_checksum"] == checksum(raw_t)
    assert {n: e["dtype"] for n, e in manifest["tensors"].items()} == {
        n: str(t.dtype).removeprefix("torch.") for n, t in tuned_t.items()}
    assert (diff / "tokenizer.json").is_file() and (diff / "generation_config.json").is_file()
    hf_diff = AutoModelForCausalLM.from_pretrained(diff, dtype=work)  # loads as any HF model does
    assert torch.equal(hf_diff.lm_head.weight, diff_t["lm_head.weight"])

    # the recovered directory is the tuned one: tensors, shard layout, config and other files
    assert_bit_equal(tensors(out), tuned_t)
    assert checksum(tensors(out)) == manifest["tuned_checksum"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tuned.iterdir())
    for f in tuned.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((tuned / name).read_text()), name
    hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    ref = AutoModelForCausalLM.from_pretrained(tuned, dtype="auto")
    assert hf.dtype == ref.dtype == tuned_t["lm_head.weight"].dtype
    for (n, p), (_, q) in zip(hf.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n


def test_a_mixtral_saved_by_transformers_round_trips(tmp_path):
    # no model class involved: a sparse MoE written by save_pretrained (experts, router) works by name
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "raw")
    with torch.no_grad():  # a fine-tune: small updates
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model.save_pretrained(tmp_path / "tuned", max_shard_size="50KB")
    diff = make_diff(tmp_path / "raw", tmp_path / "tuned", tmp_path / "diff")
    out = recover(tmp_path / "raw", diff, tmp_path / "out")
    assert_bit_equal(tensors(out), tensors(tmp_path / "tuned"))
    assert any("block_sparse_moe.gate" in n for n in tensors(out))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, MixtralForCausalLM)
    for (n, p), q in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), n


def test_a_wrong_raw_model_fails_the_checksum_and_writes_nothing(models, tmp_path):
    diff = make_diff(models["raw_bf16"], models["tuned_bf16"], tmp_path / "diff")
    with pytest.raises(WeightDiffError) as e:
        recover(models["wrong_bf16"], diff, tmp_path / "out")
    msg = str(e.value)
    expected = json.loads((diff / MANIFEST_FILE).read_text())["raw_checksum"]
    actual = checksum(tensors(models["wrong_bf16"]))
    assert "raw model is probably not the one the diff was made against" in msg
    assert f"expected {expected}, got {actual}" in msg
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff"]  # no temporary directory left either

    # an existing output is replaced only by a verified recovery
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(WeightDiffError):
        recover(models["wrong_bf16"], diff, tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError, match="not empty"):
        recover(models["raw_bf16"], diff, tmp_path / "out")


def test_a_raw_model_in_another_dtype_with_the_same_values_still_recovers(models, tmp_path):
    # bfloat16 raw widened to float32: other bytes (other raw checksum), same values, same sums
    raw32 = tmp_path / "raw32"
    raw32.mkdir()
    shutil.copy(models["raw_bf16"] / "config.json", raw32)
    save_file({n: t.float() for n, t in tensors(models["raw_bf16"]).items()}, raw32 / "model.safetensors")
    diff = make_diff(models["raw_bf16"], models["tuned_bf16"], tmp_path / "diff")
    logged = []
    out = recover(raw32, diff, tmp_path / "out", log=logged.append)
    assert_bit_equal(tensors(out), tensors(models["tuned_bf16"]))
    assert any("differs from the raw model the diff was made against" in line for line in logged)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a HF directory as one safetensors file, its tensors changed by ``edit(dict)``."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    sd = tensors(src)
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_other_shapes_and_missing_tensors_are_named(models, tmp_path):
    raw, tuned = models["raw_bf16"], models["tuned_bf16"]
    wide = _rewrite(raw, tmp_path / "wide", lambda sd: sd.update({"model.norm.weight": torch.ones(65, dtype=torch.bfloat16)}))
    with pytest.raises(WeightDiffError, match=r"tensor 'model.norm.weight' has shape \[64\] in tuned=.* but \[65\] in raw="):
        make_diff(wide, tuned, tmp_path / "d1")
    headless = _rewrite(raw, tmp_path / "headless", lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(WeightDiffError, match=r"1 tensors of tuned=.* are missing from raw=.*: 'lm_head.weight'"):
        make_diff(headless, tuned, tmp_path / "d2")
    extra = _rewrite(raw, tmp_path / "extra", lambda sd: sd.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(WeightDiffError, match=r"tensors of raw=.* are missing from tuned=.*: 'model.extra.weight'"):
        make_diff(extra, tuned, tmp_path / "d3")

    diff = make_diff(raw, tuned, tmp_path / "diff")
    with pytest.raises(WeightDiffError, match="'model.norm.weight' has shape"):
        recover(wide, diff, tmp_path / "r1")
    with pytest.raises(WeightDiffError, match="missing from raw=.*'lm_head.weight'"):
        recover(headless, diff, tmp_path / "r2")
    with pytest.raises(WeightDiffError, match="is a weight diff"):
        recover(diff, diff, tmp_path / "r3")
    with pytest.raises(HFFormatError, match="weight_diff.json: missing"):
        recover(raw, tuned, tmp_path / "r4")
    with pytest.raises(HFFormatError, match="not a directory"):
        make_diff(tmp_path / "nowhere", tuned, tmp_path / "d4")
    assert not any(p.name.startswith((".d", ".r", "d1", "d2", "d3", "d4", "r")) for p in tmp_path.iterdir())


def test_float32_alone_does_not_round_trip_float32_weights():
    # Why the diff of float32 weights is float64: fl(r + fl(t - r)) != t for about a third of the
    # elements of two independent float32 tensors, while bfloat16 / float16 through float32 and
    # float32 through float64 fail only where |t| << |r| (none in this draw).
    g = torch.Generator().manual_seed(0)
    r, t = torch.randn(100_000, generator=g) * 0.02, torch.randn(100_000, generator=g) * 0.02
    plain = r + (t - r)
    assert (bits(plain) != bits(t)).float().mean() > 0.2
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        d, fix = make_tensor_diff(r.to(dtype), t.to(dtype))
        assert d.dtype == (torch.float64 if dtype == torch.float32 else torch.float32)
        assert fix is None or fix[0].numel() < 5
        assert torch.equal(bits(add_diff(r.to(dtype), d, dtype, fix)), bits(t.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_elements_no_precision_recovers_are_stored_exactly(dtype):
    # a tuned value far below the raw one, a negative zero, NaN, infinities: fixed up bit for bit
    info = torch.finfo(dtype)
    r = torch.tensor([info.max / 2, 0.5, 1.0, 3.0, float("inf"), 0.25, info.max, 2.0]).to(dtype)
    t = torch.tensor([info.tiny, -0.0, float("nan"), float("inf"), 1.0, 0.3, -info.max, 2.0]).to(dtype)
    d, fix = make_tensor_diff(r, t)
    assert fix is not None and 0 in fix[0].tolist() and 1 in fix[0].tolist()
    assert 7 not in fix[0].tolist() and 5 not in fix[0].tolist()  # ordinary elements need no fixup
    assert torch.equal(bits(add_diff(r, d, dtype, fix)), bits(t))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "launch/weight_diff.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_cli_end_to_end_and_errors_exit_2(models, tmp_path):
    raw, tuned, wrong = models["raw_bf16"], models["tuned_bf16"], models["wrong_bf16"]
    r = _run("mode=make", f"raw={raw}", f"tuned={tuned}", f"output={tmp_path / 'diff'}")
    assert r.returncode == 0, r.stderr
    assert "tuned checksum" in r.stdout
    r = _run("mode=recover", f"raw={raw}", f"diff={tmp_path / 'diff'}", f"output={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    assert "tuned checksum verified" in r.stdout
    assert_bit_equal(tensors(tmp_path / "out"), tensors(tuned))

    r = _run("mode=recover", f"raw={wrong}", f"diff={tmp_path / 'diff'}", f"output={tmp_path / 'bad'}")
    assert r.returncode == 2 and "probably not the one the diff was made against" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("overrides, key, message", [
    (["mode=make", "raw=a", "output=o"], "tuned", "mode=make needs tuned="),
    (["mode=make", "raw=a", "tuned=b", "diff=c", "output=o"], "diff", "is read by mode=recover"),
    (["mode=recover", "raw=a", "output=o"], "diff", "mode=recover needs diff="),
    (["mode=recover", "raw=a", "diff=c", "tuned=b", "output=o"], "tuned", "is read by mode=make"),
    (["mode=recover", "raw=a", "diff=c", "output=c"], "output", "would replace the input directory"),
    (["mode=make", "raw=a", "tuned=b", "output=o", "max_shard_size=lots"], "max_shard_size", "expected a size"),
    (["mode=merge", "raw=a", "output=o"], "mode", ""),
    (["raw=a", "output=o"], "mode", "is required"),
])
def test_config_cross_field_checks_name_the_key(overrides, key, message):
    # the CLI turns these into one line and exit status 2 (tanuki.cli.user_errors, checked above)
    from conftest import compose

    from tanuki.config import ConfigError, from_dict
    from tanuki.weight_diff import WeightDiffConfig

    with pytest.raises(ConfigError, match=f"config key '{key}': .*{message}") as e:
        from_dict(WeightDiffConfig, compose("weight_diff", overrides))
    assert e.value.key == key
