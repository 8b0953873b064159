"""Model families (Cohere, Llama 3.1 rope scaling, Qwen2, Qwen3, Mistral) against transformers' own classes.

The oracle of every test is a tiny random model of the transformers class, built here with odd but
valid shapes (grouped-query attention, head_dim != dim / heads, tied and untied heads, biases, rope
scaling factors, per-head q/k norms) and every parameter perturbed away from its default (norm gains
of one and biases of zero would hide a missing op): import -> tanuki's logits equal transformers';
export -> transformers (the same class) reproduces tanuki's logits; greedy decoding is the same; a
tanuki LoRA adapter loads in PEFT with the same logits; TP=2 (with and without SP) equals one process;
the fused kernels where they apply equal the PyTorch path. Everything runs in fp32 on CPU.
"""

import json

import peft
import pytest
import torch
import transformers
from dist_helpers import run_ranks
from transformers import AutoModelForCausalLM

from tanuki.config import ConfigError, ModelConfig, PretrainConfig, from_dict
from tanuki.fused import apply_kernels, kernel_summary
from tanuki.generate import generate
from tanuki.hf import FAMILY_ARCHITECTURES, HFFormatError, export_hf, import_hf
from tanuki.lora import LoraConfig, apply_lora, lora_modules, save_peft_adapter
from tanuki.model import InterleavedRotary, LayerNorm, build_model, count_parameters, param_counts_formula
from tanuki.stage import check_context

VOCAB = 96
TOL = dict(rtol=1e-5, atol=1e-5)
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: name -> (transformers config class, its arguments)
FAMILIES = {
    # Command-R: LayerNorm, parallel block, interleaved rotary, tied, logit scale; head_dim 12 != 48 / 6
    "cohere": ("CohereConfig", dict(_COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                    logit_scale=0.25, layer_norm_eps=1e-5, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Command R+: the same with per-head LayerNorm q/k norms, untied
    "cohere-qk-norm": ("CohereConfig", dict(_COMMON, num_attention_heads=4, num_key_value_heads=2,
                                            use_qk_norm=True, logit_scale=0.5, tie_word_embeddings=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    # Llama 3.1 rope scaling, with a small original context so that all three bands occur
    "llama3": ("LlamaConfig", dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   rms_norm_eps=1e-5, rope_parameters={
                                       "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})),
    "llama-linear-tied": ("LlamaConfig", dict(_COMMON, num_attention_heads=4, num_key_value_heads=1,
                                              tie_word_embeddings=True, rope_parameters={
                                                  "rope_type": "linear", "rope_theta": 1e4, "factor": 2.5})),
    # Qwen2: q/k/v biases, tied (as the small Qwen2.5 sizes), theta 1e6
    "qwen2": ("Qwen2Config", dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen3: RMSNorm q/k norms over head_dim, explicit head_dim 16
    "qwen3": ("Qwen3Config", dict(_COMMON, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen3 with yarn (its long-context recipe), tied
    "qwen3-yarn": ("Qwen3Config", dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       tie_word_embeddings=True, rope_parameters={
                                           "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                           "original_max_position_embeddings": 16})),
    # Mistral: a sliding window equal to the context (full attention within it)
    "mistral": ("MistralConfig", dict(_COMMON, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                                      sliding_window=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}


def make_hf(name: str, seed: int = 0):
    """A tiny random transformers model of family ``name``, every parameter perturbed."""
    cls_name, kwargs = FAMILIES[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # (a tied head is one parameter: perturbed once)
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Every family saved with ``save_pretrained``: name -> directory."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        make_hf(name).save_pretrained(root / name)
        out[name] = root / name
    return out


def tokens(n=2, t=20, seed=1):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def ours(model, batch):
    with torch.no_grad():
        return model.eval()(batch)


# -- import and export ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_export_and_generation_match_transformers(name, hf_dirs, tmp_path):
    src = hf_dirs[name]
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = import_hf(src)
    cfg = model.cfg
    batch = tokens()
    torch.testing.assert_close(ours(model, batch), hf_logits(hf, batch), **TOL)

    # the family is configuration, and the parameter count of the closed form is the model's
    assert cfg.family == json.loads((src / "config.json").read_text())["model_type"]
    assert count_parameters(model).total == param_counts_formula(cfg).total == sum(p.numel() for p in hf.parameters())
    assert (model.head.weight is model.embed.weight) is cfg.tie_embeddings

    # export: the same architecture and model_type, the fields kept, and transformers computes tanuki's logits
    out = export_hf(model.state_dict(), cfg, tmp_path / "export", dtype=torch.float32)
    written = json.loads((out / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert written["architectures"] == original["architectures"] == [FAMILY_ARCHITECTURES[cfg.family]]
    for key in ("model_type", "rope_parameters", "tie_word_embeddings", "logit_scale", "layer_norm_eps",
                "rms_norm_eps", "use_qk_norm", "sliding_window", "head_dim", "num_key_value_heads"):
        if key in original:
            assert written[key] == original[key], key
    assert written["rope_theta"] == original["rope_parameters"]["rope_theta"]  # transformers 4 readers
    if cfg.rope_scaling is not None:
        assert written["rope_scaling"]["rope_type"] == cfg.rope_scaling.rope_type
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    torch.testing.assert_close(hf_logits(back, batch), ours(model, batch), **TOL)
    assert import_hf(out).cfg == cfg

    # greedy decoding with the KV cache equals transformers' generate
    prompt = batch[0, :7]
    mine = generate(model, prompt.tolist(), max_new_tokens=10)
    with torch.no_grad():
        theirs = hf.generate(prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, 7, dtype=torch.long))
    assert mine == theirs[0, 7:].tolist()


def test_model_file_keeps_a_tied_head_tied(hf_dirs, tmp_path):
    from tanuki.checkpoint import load_model_file, save_model_file

    model = import_hf(hf_dirs["qwen2"])
    save_model_file(model.state_dict(), model.cfg, tmp_path / "m.safetensors")
    cfg, sd = load_model_file(tmp_path / "m.safetensors")
    assert cfg == model.cfg and torch.equal(sd["head.weight"], model.embed.weight)


# -- LoRA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cohere-qk-norm", "qwen2", "llama3"])
def test_peft_loads_a_tanuki_adapter_of_each_family_with_the_same_logits(name, hf_dirs, tmp_path):
    cfg = LoraConfig(r=4, alpha=8)  # every linear, by its Hugging Face name
    model = apply_lora(import_hf(hf_dirs[name]), cfg, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(model).values():  # a trained adapter: B != 0
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)
    adapter = save_peft_adapter(model, cfg, str(hf_dirs[name]), tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float32).eval()
    batch = tokens(seed=4)
    without = hf_logits(base, batch)
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()  # (adapts ``base`` in place)
    mine = ours(model, batch)
    torch.testing.assert_close(hf_logits(peft_model, batch), mine, **TOL)
    assert (mine - without).abs().max() > 1e-2  # the adapter matters


# -- kernels ----------------------------------------------------------------------------------------


def test_fused_kernels_apply_only_where_their_op_matches(hf_dirs):
    cohere = apply_kernels(import_hf(hf_dirs["cohere-qk-norm"]), "triton")
    n = cohere.cfg.n_layers
    # LayerNorm (block, final and per-head q/k norms) and the interleaved rotary have no kernel
    assert kernel_summary(cohere) == {"LayerNorm": 3 * n + 1, "InterleavedRotary": n, "TritonMLP": n}
    assert all(type(m) is LayerNorm for m in cohere.modules() if isinstance(m, LayerNorm))
    assert all(type(m.attn.rotary) is InterleavedRotary for m in cohere.layers)

    qwen3 = import_hf(hf_dirs["qwen3"])
    batch = tokens(1, 6)
    ref = ours(qwen3, batch)
    apply_kernels(qwen3, "triton")  # Qwen3's q/k norms are RMSNorms over head_dim: fused too
    assert kernel_summary(qwen3) == {"TritonRMSNorm": 4 * n + 1, "TritonRotary": n, "TritonMLP": n}
    torch.testing.assert_close(ours(qwen3, batch), ref, **TOL)

    llama3 = import_hf(hf_dirs["llama3"])  # rope scaling lives in inv_freq: the fused rotary applies
    ref = ours(llama3, batch)
    apply_kernels(llama3, "triton")
    assert kernel_summary(llama3)["TritonRotary"] == n
    torch.testing.assert_close(ours(llama3, batch), ref, **TOL)
    # yarn scales cos and sin, which the fused rotary does not: it stays in PyTorch
    assert kernel_summary(apply_kernels(import_hf(hf_dirs["qwen3-yarn"]), "triton"))["Rotary"] == n


# -- tensor parallelism -----------------------------------------------------------------------------

TP_FAMILIES = ("cohere", "cohere-qk-norm", "qwen2", "qwen3")


def family_grads(rank, world, dirs, sp_modes):
    """Loss and gradients (full, merged over TP ranks by the caller) of each model on this rank."""
    import tanuki.parallel.tensor_parallel as tp_module
    from tanuki.losses import causal_lm_loss
    from tanuki.parallel.groups import build_process_groups

    # count the forward reductions of the TP regions (the embedding's included)
    calls = {"n": 0}
    for fn in ("reduce_from_tp", "reduce_scatter_to_sequence"):
        def counted(*args, _inner=getattr(tp_module, fn), **kwargs):
            calls["n"] += 1
            return _inner(*args, **kwargs)
        setattr(tp_module, fn, counted)

    out = {}
    for name, path in dirs.items():
        for sp in sp_modes:
            model = import_hf(path)
            vocab_parallel = None
            if world > 1:
                groups = build_process_groups(world)
                model = tp_module.apply_tensor_parallel(model, groups, sp)
                vocab_parallel = tp_module.vocab_parallel_slice(model, groups)
            batch = tokens(2, 17, seed=6)
            calls["n"] = 0
            logits = model(batch[:, :-1])
            reductions = calls["n"]
            loss = causal_lm_loss(logits, batch[:, 1:], z_loss=1e-2, vocab_parallel=vocab_parallel)
            loss.loss.backward()
            out[name, sp] = (loss.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, reductions)
    return out


@pytest.mark.distributed
def test_tensor_parallel_equals_one_process_for_cohere_and_qwen(hf_dirs):
    from tanuki.parallel.tensor_parallel import merge_state_dicts

    dirs = {name: str(hf_dirs[name]) for name in TP_FAMILIES}
    ref = family_grads(0, 1, dirs, (False,))
    results = run_ranks(family_grads, 2, dirs, (False, True))
    for name in TP_FAMILIES:
        ref_loss, ref_grads, _ = ref[name, False]
        parallel_block = name.startswith("cohere")
        for sp in (False, True):
            for r in results:
                assert r[name, sp][0] == pytest.approx(ref_loss, rel=1e-6), (name, sp)
                # one reduction per parallel block (two per sequential one), plus the embedding's
                assert r[name, sp][2] == (1 if parallel_block else 2) * 2 + 1, (name, sp)
            merged = merge_state_dicts([r[name, sp][1] for r in results])
            assert sorted(merged) == sorted(ref_grads)
            for k in ref_grads:
                torch.testing.assert_close(merged[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=f"{name} sp={sp} {k}")


# -- bad input --------------------------------------------------------------------------------------


def test_unsupported_model_type_and_rope_type_name_the_file_and_key(hf_dirs, tmp_path):
    config = json.loads((hf_dirs["llama3"] / "config.json").read_text())
    for name, bad, match in (
        ("phi", dict(config, model_type="phi3", architectures=["Phi3ForCausalLM"]),
         r"phi/config.json: model_type='phi3' .*is not supported"),
        ("longrope", dict(config, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}),
         r"longrope/config.json: rope_scaling.rope_type='longrope' is not supported"),
        ("v4-dynamic", dict({k: v for k, v in config.items() if k != "rope_parameters"}, rope_theta=1e4,
                            rope_scaling={"type": "dynamic", "factor": 2.0}),
         r"v4-dynamic/config.json: rope_scaling.rope_type='dynamic'"),
        ("o-bias", dict(config, attention_bias=True), r"o-bias/config.json: attention_bias=True"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(bad))
        with pytest.raises(HFFormatError, match=match):
            import_hf(tmp_path / name)


def test_a_sliding_window_smaller_than_the_training_sequence_is_refused():
    model = dict(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128, max_seq_len=128,
                 family="mistral", sliding_window=32)
    with pytest.raises(ConfigError, match=r"'model.sliding_window': 32 is smaller than train.seq_len=64"):
        from_dict(PretrainConfig, {"model": model, "train": {"seq_len": 64}})
    assert from_dict(PretrainConfig, {"model": model, "train": {"seq_len": 32}}).model.sliding_window == 32
    cfg = ModelConfig(**model)
    with pytest.raises(ConfigError, match=r"'model.sliding_window': 32 of /models/m is smaller than train.seq_len=33"):
        check_context(33, cfg, "/models/m")  # what the SFT and DPO stages call
    check_context(32, cfg, "/models/m")
    model = build_model(cfg)  # and the model itself refuses what the window would change
    model(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="33 positions exceed model.sliding_window=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_export_refuses_flags_the_family_cannot_express(tmp_path):
    for flags, match in ((dict(qkv_bias=True), r"model.qkv_bias=True cannot be written as LlamaForCausalLM"),
                         (dict(family="qwen3"), r"model.qk_norm='none' cannot be written as Qwen3ForCausalLM"),
                         (dict(family="cohere", norm="layernorm", parallel_block=True),
                          r"model.rope_interleaved=False cannot be written as CohereForCausalLM")):
        cfg = ModelConfig(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128, **flags)
        with pytest.raises(ValueError, match=match):
            export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "out")


# -- a stage end to end -----------------------------------------------------------------------------


@pytest.mark.distributed
def test_sft_of_a_command_r_model_exports_a_cohere_directory(tiny_corpus, single_process_group, tmp_path):
    """Fine-tuning starts from a CohereForCausalLM directory and exports one, with transformers computing
    the fine-tuned model's logits (tied head, logit scale, LayerNorm, interleaved rotary kept)."""
    from conftest import compose

    from tanuki import sft as stage
    from tanuki.checkpoint import consolidate_checkpoint
    from tanuki.hf import copy_tokenizer_files
    from tanuki.model import Transformer
    from tanuki.parallel.env import DistEnv
    from tanuki.sft import SFTConfig
    from tanuki.tokenizer import sample_data_path

    config = transformers.CohereConfig(vocab_size=1280, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       logit_scale=0.25, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "base")
    copy_tokenizer_files(tiny_corpus["tokenizer"], tmp_path / "base")
    lines = sample_data_path("sft.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    overrides = [f"init={tmp_path / 'base'}", f"data.path={tmp_path / 'chat.jsonl'}", f"run.dir={tmp_path / 'run'}",
                 "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=2",
                 "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=1", "train.eval_every=0",
                 "logging.every=1", "logging.wandb.mode=disabled", "checkpoint.every=100", "train.precision=fp32",
                 "kernels=torch", "export.dtype=float32"]
    env = DistEnv(0, 1, 0, "single")
    prep = stage.prepare(from_dict(SFTConfig, compose("sft", overrides)), env)
    result = stage.run(prep, env, (tmp_path / "run").resolve(), print_fn=lambda line: None)

    hf_dir = tmp_path / "run" / "hf"
    written = json.loads((hf_dir / "config.json").read_text())
    assert written["architectures"] == ["CohereForCausalLM"] and written["logit_scale"] == 0.25
    assert written["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "CohereForCausalLM"
    cfg, sd = consolidate_checkpoint(result.last_checkpoint)
    assert cfg.family == "cohere" and cfg.tie_embeddings
    model = Transformer(cfg).eval()
    model.load_state_dict(sd, strict=False)
    batch = torch.randint(3, 1280, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(hf, batch), ours(model, batch), **TOL)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    assert (hf_logits(base, batch) - hf_logits(hf, batch)).abs().max() > 1e-3  # it was trained
