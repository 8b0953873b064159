"""Tensor and sequence parallelism on CPU (gloo, several processes) against one process.

Layer level: the parallel attention, MLP, embedding and vocab-parallel cross entropy give the outputs
and gradients of the unsharded modules. Model level: TP 2 and 4, with and without SP, give the loss
and gradients of the full model. Training: DeepSpeed runs with TP (ZeRO-1, ZeRO-3, DP x TP = 2 x 2)
give the single process's losses, gradient norms and (merged, exported) weights.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, tiny_train_overrides
from dist_helpers import run_ranks

from tanuki.config import ConfigError, ModelConfig, PretrainConfig, from_dict
from tanuki.parallel.env import DistEnv
from tanuki.parallel.tensor_parallel import merge_state_dicts, shard_state_dict

pytestmark = pytest.mark.distributed

# Odd but valid: 12 heads over 4 kv heads, head_dim 4, ffn 72, a vocabulary padded to 384 with 301 real ids.
ODD = ModelConfig(n_layers=2, dim=48, n_heads=12, n_kv_heads=4, ffn_dim=72, vocab_size=384, max_seq_len=64)
VOCAB_LIMIT = 301


def _groups(tp):
    from tanuki.parallel.groups import build_process_groups

    return build_process_groups(tp)


# -- layer level ------------------------------------------------------------------------------------


def layers_on_rank(rank, world, sp):
    """Every parallel piece on this rank, with the inputs and cotangents every rank shares."""
    from tanuki.losses import causal_lm_loss
    from tanuki.model import build_model
    from tanuki.parallel.comm import scatter_to_sequence
    from tanuki.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_slice

    groups = _groups(world)
    model = apply_tensor_parallel(build_model(ODD, seed=3), groups, sp)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, ODD.dim, generator=gen)
    cot = torch.randn(2, 8, ODD.dim, generator=gen)
    positions = torch.arange(8).expand(2, 8)
    out = {}
    for name, module in (("attn", model.layers[0].attn), ("mlp", model.layers[0].mlp)):
        xi = x.clone().requires_grad_()
        inp = scatter_to_sequence(xi, groups.tp_group) if sp else xi
        y = module(inp, positions) if name == "attn" else module(inp)
        # with SP each rank holds its chunk of the positions, and the loss gradient arrives per chunk
        y.backward(cot.chunk(world, dim=1)[rank] if sp else cot)
        out[name] = (y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()})
    ids = torch.randint(0, VOCAB_LIMIT, (2, 8), generator=gen)
    e = model.embed(ids)
    e.backward(cot.chunk(world, dim=1)[rank] if sp else cot)
    out["embed"] = (e.detach(), model.embed.weight.grad)
    # vocab-parallel cross entropy (with z-loss) on this rank's logits slice
    logits = torch.randn(2, 8, ODD.vocab_size, generator=gen)
    labels = torch.randint(0, VOCAB_LIMIT, (2, 8), generator=gen)
    labels[0, :3] = -100
    rows = ODD.vocab_size // world
    local = logits[..., rank * rows:(rank + 1) * rows].clone().requires_grad_()
    loss = causal_lm_loss(local, labels, vocab_limit=VOCAB_LIMIT, z_loss=0.1, vocab_parallel=vocab_parallel_slice(model, groups))
    loss.loss.backward()
    out["ce"] = (loss.loss.detach(), loss.ce, local.grad)
    return out


def layers_reference():
    from tanuki.losses import causal_lm_loss
    from tanuki.model import build_model

    model = build_model(ODD, seed=3)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, ODD.dim, generator=gen)
    cot = torch.randn(2, 8, ODD.dim, generator=gen)
    positions = torch.arange(8).expand(2, 8)
    out = {}
    for name, module in (("attn", model.layers[0].attn), ("mlp", model.layers[0].mlp)):
        xi = x.clone().requires_grad_()
        y = module(xi, positions) if name == "attn" else module(xi)
        y.backward(cot)
        out[name] = (y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()})
    ids = torch.randint(0, VOCAB_LIMIT, (2, 8), generator=gen)
    e = model.embed(ids)
    e.backward(cot)
    out["embed"] = (e.detach(), model.embed.weight.grad)
    logits = torch.randn(2, 8, ODD.vocab_size, generator=gen).requires_grad_()
    labels = torch.randint(0, VOCAB_LIMIT, (2, 8), generator=gen)
    labels[0, :3] = -100
    loss = causal_lm_loss(logits, labels, vocab_limit=VOCAB_LIMIT, z_loss=0.1)
    loss.loss.backward()
    out["ce"] = (loss.loss.detach(), loss.ce, logits.grad)
    # the oracle of the oracle: torch's own cross entropy over the real vocabulary
    flat = logits.detach()[..., :VOCAB_LIMIT].reshape(-1, VOCAB_LIMIT)
    torch.testing.assert_close(loss.ce, F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100))
    return out


@pytest.mark.parametrize("tp, sp", [(2, False), (2, True), (4, False), (4, True)])
def test_parallel_layers_equal_the_unsharded_ones(tp, sp):
    ref = layers_reference()
    results = run_ranks(layers_on_rank, tp, sp)
    tol = dict(rtol=1e-5, atol=1e-6)

    def mine(full, rank):  # the part of a (batch, seq, ...) activation a rank holds
        return full.chunk(tp, dim=1)[rank] if sp else full

    for name in ("attn", "mlp"):
        ref_y, ref_dx, ref_dw = ref[name]
        for rank, r in enumerate(results):
            y, dx, dw = r[name]
            torch.testing.assert_close(y, mine(ref_y, rank), **tol, msg=f"{name} output, rank {rank}")
            torch.testing.assert_close(dx, ref_dx, **tol, msg=f"{name} input gradient, rank {rank}")
        for pname in ref_dw:
            full = f"layers.0.{name}.{pname}"
            merged = merge_state_dicts([{full: r[name][2][pname]} for r in results])[full]
            torch.testing.assert_close(merged, ref_dw[pname], **tol, msg=f"{name}.{pname} weight gradient")
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["embed"][0], mine(ref["embed"][0], rank), **tol)
        torch.testing.assert_close(r["ce"][0], ref["ce"][0], **tol)
        torch.testing.assert_close(r["ce"][1], ref["ce"][1], **tol)
    torch.testing.assert_close(torch.cat([r["embed"][1] for r in results]), ref["embed"][1], **tol)
    grad = torch.cat([r["ce"][2] for r in results], dim=-1)
    torch.testing.assert_close(grad, ref["ce"][2], **tol)
    assert grad[..., VOCAB_LIMIT:].abs().max() == 0  # padded columns take no probability


# -- model level ------------------------------------------------------------------------------------


def model_grads(rank, world, tp, sp, kernels="torch"):
    from tanuki.fused import apply_kernels
    from tanuki.losses import causal_lm_loss
    from tanuki.model import build_model
    from tanuki.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_slice

    model = apply_kernels(build_model(ODD, seed=0), kernels)  # the order the training builder uses
    vocab_parallel = None
    if tp > 1:
        model = apply_tensor_parallel(model, _groups(tp), sp)
        vocab_parallel = vocab_parallel_slice(model, _groups(tp))
    tokens = torch.randint(0, VOCAB_LIMIT, (2, 17), generator=torch.Generator().manual_seed(1))
    out = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:], vocab_limit=VOCAB_LIMIT, z_loss=1e-2,
                         vocab_parallel=vocab_parallel)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tp, sp", [(2, False), (2, True), (4, True)])
def test_model_loss_and_gradients_equal_one_process(tp, sp):
    ref_loss, ref_grads = model_grads(0, 1, 1, False)
    results = run_ranks(model_grads, tp, tp, sp)
    for loss, _ in results:
        assert loss == pytest.approx(ref_loss, rel=1e-6)
    merged = merge_state_dicts([g for _, g in results])
    assert sorted(merged) == sorted(ref_grads)
    for k in ref_grads:
        torch.testing.assert_close(merged[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)


def test_triton_kernels_compose_with_tensor_and_sequence_parallelism():
    """The fused RMSNorm (on sequence shards), rotary and SwiGLU (on head / column shards) under TP=2 + SP."""
    ref_loss, ref_grads = model_grads(0, 1, 1, False)
    results = run_ranks(model_grads, 2, 2, True, "triton")
    assert all(loss == pytest.approx(ref_loss, rel=1e-5) for loss, _ in results)
    merged = merge_state_dicts([g for _, g in results])
    for k in ref_grads:
        torch.testing.assert_close(merged[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_shard_and_merge_are_inverse():
    from tanuki.model import build_model

    sd = build_model(ODD, seed=0).state_dict()
    for tp in (2, 4):
        merged = merge_state_dicts([shard_state_dict(sd, tp, r) for r in range(tp)])
        assert all(torch.equal(merged[k], sd[k]) for k in sd)
    assert shard_state_dict(sd, 4, 1)["layers.0.attn.wk.weight"].shape == (ODD.n_kv_heads // 4 * 4, ODD.dim)
    assert shard_state_dict(sd, 4, 1)["layers.0.attn.wo.weight"].shape == (ODD.dim, ODD.dim // 4)


# -- training under DeepSpeed -----------------------------------------------------------------------


def train_on_rank(rank, world, corpus, run_dir, extra):
    from pathlib import Path

    from tanuki import pretrain
    from tanuki.parallel.env import dist_env

    cfg = from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(corpus, run_dir, *extra)))
    env = dist_env()
    prep = pretrain.prepare(cfg, env)
    result = pretrain.run(prep, env, Path(run_dir).resolve(), print_fn=lambda *a, **k: None)
    return [r for r in result.history if "loss" in r], str(result.last_checkpoint)


STEPS = ["train.max_steps=3", "checkpoint.every=3", "model.n_heads=8", "model.n_kv_heads=4"]


@pytest.fixture(scope="module")
def one_process(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp1")
    return run_ranks(train_on_rank, 1, tiny_corpus, str(run_dir), STEPS)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, extra",
    [
        (2, ["parallel.tp=2", "parallel.zero_stage=1"]),
        (2, ["parallel.tp=2", "parallel.sp=true", "parallel.zero_stage=3"]),
        (4, ["parallel.tp=2", "parallel.zero_stage=3", "train.micro_batch_size=1"]),
        (4, ["parallel.tp=2", "parallel.sp=true", "parallel.zero_stage=2", "train.micro_batch_size=1"]),
    ],
    ids=["tp2-zero1", "tp2-sp-zero3", "dp2xtp2-zero3", "dp2xtp2-sp-zero2"],
)
def test_deepspeed_training_with_tp_equals_one_process(tiny_corpus, one_process, tmp_path, world, extra):
    from tanuki.checkpoint import consolidate_checkpoint

    results = run_ranks(train_on_rank, world, tiny_corpus, str(tmp_path), STEPS + extra)
    ref_history, ref_ckpt = one_process
    history, ckpt = results[0]
    assert [r["step"] for r in history] == [1, 2, 3]
    for got, want in zip(history, ref_history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        # the global norm counts each TP shard once and each replicated weight once
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    _, merged = consolidate_checkpoint(ckpt)
    _, ref = consolidate_checkpoint(ref_ckpt)
    # Adam divides by sqrt(v): a near-zero gradient summed in another order can move its weight by a
    # few 1e-6 after three steps at lr 3e-3, so the bound is a small fraction of one update.
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-4, atol=3e-5, msg=k)


@pytest.mark.slow
def test_export_of_a_tp2_run_reproduces_the_logits_in_transformers(tiny_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from tanuki.checkpoint import consolidate_checkpoint
    from tanuki.model import Transformer
    from tanuki.pretrain import export_checkpoint

    _, ckpt = run_ranks(train_on_rank, 2, tiny_corpus, str(tmp_path / "run"),
                        STEPS + ["parallel.tp=2", "parallel.zero_stage=1"])[0]
    out = export_checkpoint(ckpt, tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg, sd = consolidate_checkpoint(ckpt)
    model = Transformer(cfg).eval()
    model.load_state_dict(sd, strict=False)
    x = torch.randint(0, 1280, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)
    assert hf.config.num_attention_heads == 8  # the full model, not one rank's shard


# -- configuration ------------------------------------------------------------------------------------


def test_bad_tensor_parallel_configs_fail_before_any_process_group(tiny_corpus, tmp_path):
    from tanuki import pretrain

    def cfg(*extra):
        return from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(tiny_corpus, tmp_path, *extra)))

    with pytest.raises(ConfigError, match=r"parallel.tp.*model.n_kv_heads"):
        cfg("parallel.tp=4")  # 2 kv heads
    with pytest.raises(ConfigError, match=r"parallel.sp.*tp > 1"):
        cfg("parallel.sp=true")
    with pytest.raises(ConfigError, match=r"parallel.sp.*seq_len=31"):
        cfg("parallel.tp=2", "parallel.sp=true", "train.seq_len=31", "model.n_heads=8")
    with pytest.raises(ConfigError, match=r"parallel.tp.*3 ranks"):
        pretrain.prepare(cfg("parallel.tp=2"), DistEnv(0, 3, 0, "torchrun/deepspeed"))
    with pytest.raises(ConfigError, match=r"parallel.tp.*MoE"):
        cfg("parallel.tp=2", "model.n_experts=4")
    with pytest.raises(ConfigError, match=r"padded vocabulary"):
        cfg("parallel.tp=2", "model.vocab_size=1279")


def test_vocab_padding_keeps_the_loss_independent_of_tp():
    """Padding the vocabulary to 128 x tp adds only columns the loss masks out."""
    from tanuki.config import pad_vocab_size

    assert pad_vocab_size(65000, tp=2) == 65024 and pad_vocab_size(99487, tp=4) == 99840


# -- continued pretraining from a trimmed export -------------------------------------------------------


@pytest.fixture(scope="module")
def trimmed_export(tiny_corpus, tmp_path_factory):
    """A tokenizer of 1200 ids (not a multiple of 128 x 2), the sample data encoded with it, and a model
    exported trimmed to those 1200 rows (what export.vocab=trim writes)."""
    import io

    from tanuki.config import ModelConfig
    from tanuki.data.config import PreprocessConfig
    from tanuki.data.preprocess import preprocess
    from tanuki.hf import export_hf
    from tanuki.model import build_model
    from tanuki.tokenizer import BuildTokenizerConfig, build_tokenizer

    tmp = tmp_path_factory.mktemp("trimmed")
    build_tokenizer(BuildTokenizerConfig(input=str(tiny_corpus["dir"] / "corpus.jsonl"), output=str(tmp / "tok"),
                                         vocab_size=1200, progress=False, threads=1, report_documents=5),
                    log=io.StringIO())
    preprocess(PreprocessConfig(input=str(tiny_corpus["dir"] / "corpus.jsonl"), tokenizer=str(tmp / "tok"),
                                output_prefix=str(tmp / "data" / "sample"), progress=False))
    cfg = ModelConfig(n_layers=2, dim=64, n_heads=8, n_kv_heads=4, ffn_dim=128, vocab_size=1280, max_seq_len=128)
    hf = export_hf(build_model(cfg, seed=11).state_dict(), cfg, tmp / "hf", dtype=torch.float32,
                   tokenizer_dir=tmp / "tok")
    return {"tokenizer": str(tmp / "tok"), "prefix": str(tmp / "data" / "sample"), "hf": str(hf)}


@pytest.mark.slow
def test_tp2_training_from_a_trimmed_export_equals_one_process(trimmed_export, tmp_path):
    """A trimmed export (1200 rows) continues pretraining under TP=2: its vocabulary is padded back to
    1280 = 5 x 128 x 2 by zero rows that never train, the loss equals the one-process run's, and the
    export of the result is trimmed to the tokenizer again."""
    from tanuki.checkpoint import consolidate_checkpoint
    from tanuki.hf import load_hf
    from tanuki.pretrain import export_checkpoint

    steps = STEPS + [f"init={trimmed_export['hf']}", "train.seq_len=32"]
    one, one_ckpt = run_ranks(train_on_rank, 1, trimmed_export, str(tmp_path / "tp1"), steps)[0]
    two, two_ckpt = run_ranks(train_on_rank, 2, trimmed_export, str(tmp_path / "tp2"),
                              steps + ["parallel.tp=2", "parallel.zero_stage=1"])[0]
    assert [r["step"] for r in two] == [1, 2, 3]
    for got, want in zip(two, one):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    cfg, sd = consolidate_checkpoint(two_ckpt)
    assert cfg.vocab_size == 1280
    _, init_sd = load_hf(trimmed_export["hf"])
    for name in ("embed.weight", "head.weight"):
        assert not sd[name][1200:].any(), f"{name}: a padded row moved"
        assert not torch.equal(sd[name][:1200], init_sd[name])  # the real rows trained
    out = export_checkpoint(two_ckpt, tmp_path / "hf", dtype="float32")
    cfg_out, sd_out = load_hf(out)
    assert cfg_out.vocab_size == 1200 and torch.equal(sd_out["head.weight"], sd["head.weight"][:1200])
