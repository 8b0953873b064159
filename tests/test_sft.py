"""SFT on the shared loop: loss falls on assistant tokens, token-weighted accumulation is exact across
micro-batch splits, exports load in transformers (with the chat template) and LoRA adapters in PEFT."""

import json

import pytest
import torch
from conftest import compose

from tanuki.config import ConfigError, from_dict
from tanuki.parallel.env import DistEnv

pytestmark = pytest.mark.distributed

ENV = DistEnv(0, 1, 0, "single")


@pytest.fixture(scope="module", autouse=True)
def process_group(single_process_group):
    yield


@pytest.fixture(scope="module")
def base(tiny_corpus, tmp_path_factory):
    """A tiny random Llama exported with the test tokenizer, and a small chat dataset."""
    from tanuki.config import ModelConfig
    from tanuki.hf import export_hf
    from tanuki.model import build_model
    from tanuki.tokenizer import sample_data_path

    tmp = tmp_path_factory.mktemp("sft")
    cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=1280, max_seq_len=128)
    export_hf(build_model(cfg, seed=0).state_dict(), cfg, tmp / "base", dtype=torch.float32,
              tokenizer_dir=tiny_corpus["tokenizer"])
    lines = sample_data_path("sft.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    (tmp / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp


OVERRIDES = ["train.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=4",
             "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=1", "train.eval_every=0", "logging.every=1",
             "logging.wandb.mode=disabled", "checkpoint.every=100", "train.precision=fp32", "kernels=torch",
             "export.dtype=float32"]


def config(base, run_dir, *extra):
    from tanuki.sft import SFTConfig

    return from_dict(SFTConfig, compose("sft", [f"init={base / 'base'}", f"data.path={base / 'chat.jsonl'}",
                                                f"run.dir={run_dir}", *OVERRIDES, *extra]))


def sft(base, run_dir, *extra):
    from tanuki import sft as stage

    lines = []
    prep = stage.prepare(config(base, run_dir, *extra), ENV)
    result = stage.run(prep, ENV, run_dir.resolve(), print_fn=lines.append)
    return result, lines, {r["step"]: r["loss"] for r in result.history if "loss" in r}


def test_full_sft_trains_and_exports_with_the_chat_template(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tanuki.checkpoint import consolidate_checkpoint
    from tanuki.model import Transformer
    from tanuki.tokenizer.templates import get_template

    result, lines, losses = sft(base, tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert any("trainable parameters" in ln and "packed" in ln for ln in lines)
    hf_dir = tmp_path / "hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.chat_template == get_template("alpaca_ja").jinja
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg, sd = consolidate_checkpoint(result.last_checkpoint)
    model = Transformer(cfg).eval()
    model.load_state_dict(sd, strict=False)
    ids = tok.apply_chat_template([{"role": "user", "content": "3たす4は？"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_accumulation_weighs_every_token_the_same(base, tmp_path):
    """Rows of different lengths: 1 x 4 and 4 x 1 give the same update (the HF Trainer bug would not)."""
    from tanuki.checkpoint import consolidate_checkpoint

    # With eps >> |g| Adam's first update is lr * g / (|g| + eps) ~ g: linear in the gradient, so the
    # weights compare the gradients themselves (with eps ~ 0 it would be lr * sign(g), which flips on
    # the float noise of near-zero entries).
    common = ["data.packing=false", "train.max_steps=1", "train.global_batch_size=4", "train.warmup_steps=0",
              "train.eps=1.0", "train.lr=1.0", "train.min_lr=0.0", "train.weight_decay=0.0", "train.grad_clip=0.0"]
    a, _, la = sft(base, tmp_path / "a", *common, "train.micro_batch_size=1")
    b, _, lb = sft(base, tmp_path / "b", *common, "train.micro_batch_size=4")
    assert la[1] == pytest.approx(lb[1], rel=1e-5)
    _, wa = consolidate_checkpoint(a.last_checkpoint)
    _, wb = consolidate_checkpoint(b.last_checkpoint)
    _, w0 = consolidate_checkpoint_of_base(base)
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa)
    assert moved > 1e-4  # the update is far above the tolerance below
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7, msg=k)


def consolidate_checkpoint_of_base(base):
    from tanuki.hf import load_hf

    return load_hf(base / "base", dtype=torch.float32)


def test_lora_adapter_loads_in_peft_and_matches_the_merged_export(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, lines, losses = sft(base, tmp_path, "method=lora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
                                "train.lr=1e-2")
    assert losses[4] < losses[1]
    trainable = next(ln for ln in lines if "trainable parameters" in ln)
    # r x (in + out) per adapted projection: q(64->64) k,v(64->32) o(64->64) gate,up(64->128) down(128->64)
    per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert f"{2 * per_layer:,} trainable" in trainable
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base / "base"), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, 1280, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = peft_model(x).logits, merged(x).logits
        assert (got - AutoModelForCausalLM.from_pretrained(base / "base")(x).logits).abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_sft_configs_name_the_key(base, tmp_path):
    from tanuki import sft as stage

    with pytest.raises(ConfigError, match="template"):
        config(base, tmp_path, "template=chatml")
    with pytest.raises(ConfigError, match=r"lora.target_modules\[0\]"):
        stage.prepare(config(base, tmp_path, "method=lora", "lora.target_modules=[qkv_proj]"), ENV)
    with pytest.raises(ConfigError, match="data.path"):
        stage.prepare(config(base, tmp_path, f"data.path={tmp_path}/missing.jsonl"), ENV)
    with pytest.raises(ConfigError, match="init"):
        stage.prepare(config(base, tmp_path, f"init={tmp_path}/nope"), ENV)
    with pytest.raises(ConfigError, match="method"):
        config(base, tmp_path, "method=lora", "parallel.tp=2")


def test_lisa_trains_exactly_the_sampled_layers_each_period(base, tmp_path, monkeypatch):
    """Over 3 periods of 2 steps: a sampled layer changes, every other layer is bit-for-bit unchanged
    (weight decay on: a frozen layer must get neither momentum nor decay); embedding, head and final
    norm always change; the optimizer holds state only for what is active."""
    from tanuki import lisa as lisa_mod
    from tanuki.lisa import LisaConfig, layers_for_period

    snapshots, schedulers = [], []
    real_activate = lisa_mod.LisaScheduler.activate

    def recording_activate(self, active):
        snapshots.append(([{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in self.layers],
                          None, list(active)))
        schedulers.append(self)
        return real_activate(self, active)

    monkeypatch.setattr(lisa_mod.LisaScheduler, "activate", recording_activate)
    result, lines, losses = sft(base, tmp_path, "method=lisa", "parallel.zero_stage=0", "lisa.active_layers=1",
                                "lisa.interval_steps=2", "lisa.seed=5", "train.max_steps=6", "train.weight_decay=0.1",
                                "train.lr=1e-2")
    assert any("1 of 2 layers at a time" in ln for ln in lines)
    scheduler = schedulers[-1]
    final = [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in scheduler.layers]
    ends = [s[0] for s in snapshots[1:]] + [final]
    for period, ((start, _, active), end) in enumerate(zip(snapshots, ends)):
        assert active == layers_for_period(period, 2, LisaConfig(active_layers=1, interval_steps=2, seed=5))
        for i in range(2):
            changed = any(not torch.equal(start[i][k], end[i][k]) for k in start[i])
            assert changed == (i in active), (period, i, active)
    # embedding, final norm and head train in every period
    from tanuki.checkpoint import consolidate_checkpoint

    _, trained = consolidate_checkpoint(result.last_checkpoint)
    _, start = consolidate_checkpoint_of_base(base)
    for name in ("embed.weight", "norm.weight", "head.weight"):
        assert not torch.equal(trained[name], start[name]), name
    # the state policy: only the active layer (and the always-trained parameters) hold AdamW state
    held = {id(p) for p in scheduler.optimizer.state}
    for i, layer in enumerate(scheduler.layers):
        assert all((id(p) in held) == (i in scheduler.active) for p in layer.parameters())


def test_lisa_loss_depends_on_the_active_layers_and_other_stages_are_refused(base, tmp_path):
    common = ["method=lisa", "parallel.zero_stage=0", "lisa.interval_steps=2", "train.max_steps=3", "train.lr=1e-2"]
    _, _, one = sft(base, tmp_path / "one", *common, "lisa.active_layers=1")
    _, _, two = sft(base, tmp_path / "two", *common, "lisa.active_layers=2")
    assert one[1] == pytest.approx(two[1], rel=1e-6)  # same model before the first update
    assert abs(one[3] - two[3]) > 1e-4  # the updates differ with the number of trained layers
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        config(base, tmp_path, "method=lisa", "parallel.zero_stage=1")
    with pytest.raises(ConfigError, match="lisa.active_layers"):
        from tanuki import sft as stage

        stage.run(stage.prepare(config(base, tmp_path / "x", *common, "lisa.active_layers=3"), ENV), ENV, tmp_path / "x")


def test_exact_match_evaluation_agrees_with_transformers_generate(base, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tanuki.data.sft import read_eval_prompts
    from tanuki.sft import evaluate_exact_match
    from tanuki.tokenizer import sample_data_path
    from tanuki.tokenizer.templates import write_chat_template

    model_dir = tmp_path / "model"
    shutil.copytree(base / "base", model_dir)
    write_chat_template(model_dir, "alpaca_ja")
    report = evaluate_exact_match(model_dir, sample_data_path("sft_eval.jsonl"), max_new_tokens=6, limit=4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = read_eval_prompts(sample_data_path("sft_eval.jsonl"))[:4]
    assert report["total"] == 4 and sum(t for _, t in report["by_task"].values()) == 4
    for p, pred in zip(prompts, report["predictions"]):
        ids = tok.apply_chat_template(list(p.messages), add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        out = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        assert pred["prediction"] == tok.decode(out, skip_special_tokens=True)
        assert pred["correct"] == (pred["prediction"].strip() == p.answer.strip())


def test_an_export_dir_that_is_not_a_model_export_is_refused_before_training(base, tmp_path):
    """export.dir pointed at a dataset directory: refused (naming it) before any step, not wiped after."""
    data = tmp_path / "my-data"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=f"export.dir.*{data} is not empty and is not a model export"):
        sft(base, tmp_path / "run", f"export.dir={data}")
    assert (data / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "run" / "checkpoints").exists()
