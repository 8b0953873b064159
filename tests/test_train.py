"""The training loop in one process: ZeRO stages agree, accumulation is exact, NaN steps are skipped,
checkpoints resume exactly and survive a crash mid-save, export reproduces the engine's logits."""

import math

import pytest
import torch
from conftest import compose, tiny_train_overrides

from tanuki import checkpoint as ckpt_mod
from tanuki.checkpoint import consolidate_checkpoint, latest_checkpoint, read_state
from tanuki.config import ConfigError, PretrainConfig, from_dict
from tanuki.optim import Schedule, lr_at
from tanuki.parallel.env import DistEnv

pytestmark = pytest.mark.distributed

ENV = DistEnv(0, 1, 0, "single")


@pytest.fixture(scope="module", autouse=True)
def process_group(single_process_group):
    yield


def config(corpus, run_dir, *extra) -> PretrainConfig:
    return from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(corpus, run_dir, *extra)))


def train(corpus, run_dir, *extra):
    """Run tanuki.pretrain in this process; returns (result, printed lines, losses by step)."""
    from tanuki import pretrain

    lines = []
    prep = pretrain.prepare(config(corpus, run_dir, *extra), ENV)
    result = pretrain.run(prep, ENV, run_dir.resolve(), print_fn=lines.append)
    losses = {r["step"]: r["loss"] for r in result.history if "loss" in r}
    return result, lines, losses


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """Six steps with ZeRO-3 (the default), checkpoints every two steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    result, lines, losses = train(tiny_corpus, run_dir)
    return {"dir": run_dir, "result": result, "lines": lines, "losses": losses}


def test_loss_falls_and_the_run_dir_is_complete(reference):
    losses = reference["losses"]
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1] - 0.3
    # a freshly initialised model predicts ~uniformly over the 1280 rows: loss ~ ln(1280)
    assert abs(losses[1] - math.log(1280)) < 0.2
    run_dir = reference["dir"]
    for name in ("config.yaml", "metrics.jsonl", "tokenizer/tokenizer.json", "checkpoints/latest"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000004", "step_00000006"]
    state = read_state(run_dir / "checkpoints/step_00000006")
    assert state["step"] == 6 and state["loader"]["consumed_samples"] == 48


def test_progress_lines_and_learning_rate_follow_the_schedule(reference):
    lines = [ln for ln in reference["lines"] if ln.startswith("step ") and "loss" in ln and "validation" not in ln]
    assert len(lines) == 6
    for field in ("lr", "gnorm", "tok/s", "TFLOP/s/dev", "MFU", "mem", "ETA"):
        assert field in lines[0]
    schedule = Schedule(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6)
    records = [r for r in reference["result"].history if "loss" in r]
    assert [r["lr"] for r in records] == [lr_at(s, schedule) for s in range(6)]
    assert [r["tokens"] for r in records] == [8 * 32 * s for s in range(1, 7)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_give_the_same_losses(tiny_corpus, tmp_path, reference, stage):
    _, _, losses = train(tiny_corpus, tmp_path, f"parallel.zero_stage={stage}", "train.max_steps=6",
                         "checkpoint.every=100")
    ref = reference["losses"]
    for s in ref:
        assert losses[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (stage, s)


def test_gradient_accumulation_1x8_equals_4x2(tiny_corpus, tmp_path):
    # The loop's accumulation on the full-logits head; the chunked head's is the test below.
    a, _, la = train(tiny_corpus, tmp_path / "a", "train.micro_batch_size=1", "train.max_steps=2", "checkpoint.every=100",
                     "train.loss_chunk_size=0")
    b, _, lb = train(tiny_corpus, tmp_path / "b", "train.micro_batch_size=4", "train.max_steps=2", "checkpoint.every=100",
                     "train.loss_chunk_size=0")
    assert la[1] == pytest.approx(lb[1], rel=1e-6)
    assert la[2] == pytest.approx(lb[2], rel=1e-5)
    _, wa = consolidate_checkpoint(a.last_checkpoint)
    _, wb = consolidate_checkpoint(b.last_checkpoint)
    # Adam divides by sqrt(v): a near-zero gradient summed in another order can move its weight by a
    # few 1e-6 after two steps at lr 3e-3 (one of 8192 entries of w_down did, by 3.4e-6, once the
    # documents started with BOS), so the bound is a small fraction of one update
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)


def test_chunked_head_accumulation_and_equality_with_full_logits(tiny_corpus, tmp_path):
    """The default chunked head + loss: 1x8 and 4x2 accumulate to the same update, and the run equals the
    full-logits run. The chunk boundaries move with the micro-batch size (another order of the fp32
    sums), and Adam's first steps divide gradients by their own magnitude, so weights agree to the
    rounding of fp32 sums carried through two Adam updates: the bound of the full-logits test above
    (measured: 4.6e-6 chunked, 3.4e-6 with full logits, absolute, at most)."""
    runs = {}
    for name, extra in (("1x8", ("train.micro_batch_size=1",)), ("4x2", ("train.micro_batch_size=4",)),
                        ("full", ("train.micro_batch_size=4", "train.loss_chunk_size=0"))):
        result, _, losses = train(tiny_corpus, tmp_path / name, *extra, "train.max_steps=2", "checkpoint.every=100")
        runs[name] = (losses, consolidate_checkpoint(result.last_checkpoint)[1])
    for name in ("4x2", "full"):
        assert runs[name][0][1] == pytest.approx(runs["1x8"][0][1], rel=1e-6)
        assert runs[name][0][2] == pytest.approx(runs["1x8"][0][2], rel=1e-5)
        for k, w in runs["1x8"][1].items():
            torch.testing.assert_close(runs[name][1][k], w, rtol=1e-5, atol=1e-5, msg=k)


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_corpus, tmp_path, reference):
    run_dir = tmp_path / "run"
    first, _, _ = train(tiny_corpus, run_dir, "train.max_steps=6", "checkpoint.every=2")
    # Pretend the job died after the checkpoint at step 4: drop what came after it.
    import shutil

    shutil.rmtree(run_dir / "checkpoints/step_00000006")
    (run_dir / "checkpoints/latest").write_text("step_00000004\n")
    second, lines, losses = train(tiny_corpus, run_dir)
    assert any("resumed from" in ln and "step 4" in ln for ln in lines)
    assert sorted(losses) == [5, 6]
    ref = reference["losses"]
    assert losses[5] == ref[5] and losses[6] == ref[6]  # bitwise


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, reference, monkeypatch):
    run_dir = tmp_path / "run"
    real_commit = ckpt_mod.commit_checkpoint

    def crash_at_step_4(root, step, state, keep_last):
        if step == 4:
            raise KeyboardInterrupt("killed while saving")
        return real_commit(root, step, state, keep_last)

    monkeypatch.setattr("tanuki.checkpoint.commit_checkpoint", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_corpus, run_dir)
    root = run_dir / "checkpoints"
    assert (root / "step_00000004.partial").is_dir()  # DeepSpeed's shards are there ...
    assert latest_checkpoint(root) == root / "step_00000002"  # ... but the checkpoint never became visible
    monkeypatch.setattr("tanuki.checkpoint.commit_checkpoint", real_commit)
    _, lines, losses = train(tiny_corpus, run_dir)
    assert any("resumed from" in ln and "step_00000002" in ln for ln in lines)
    assert [losses[s] for s in (3, 4, 5, 6)] == [reference["losses"][s] for s in (3, 4, 5, 6)]
    assert not list(root.glob("*.partial"))  # the leftover is cleaned up by the next complete save


def test_resume_refuses_an_incompatible_model(tiny_corpus, reference):
    with pytest.raises(ConfigError, match="model.n_layers"):
        train(tiny_corpus, reference["dir"], "model.n_layers=3", "train.max_steps=8")


def test_resume_never_refuses_a_dir_with_checkpoints(tiny_corpus, reference):
    with pytest.raises(ConfigError, match="resume"):
        train(tiny_corpus, reference["dir"], "resume=never")


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_corpus, tmp_path, monkeypatch):
    from tanuki import pretrain

    real_step = pretrain.lm_step
    calls = {"n": 0}

    def poisoned(model, batch, *, bad, **kw):
        out = real_step(model, batch, **kw)
        calls["n"] += 1
        step = (calls["n"] - 1) // 4 + 1  # 4 micro-batches per step
        if bad(step):
            out.loss = out.loss * float("nan")
        return out

    import functools

    monkeypatch.setattr(pretrain, "lm_step", functools.partial(poisoned, bad=lambda s: s == 2))
    result, lines, _ = train(tiny_corpus, tmp_path / "one", "train.max_steps=4", "checkpoint.every=100")
    assert result.skipped_steps == 1 and result.step == 4
    assert any("skipped 1" in ln for ln in lines)
    _, weights = consolidate_checkpoint(result.last_checkpoint)
    assert all(torch.isfinite(w).all() for w in weights.values())

    calls["n"] = 0
    monkeypatch.setattr(pretrain, "lm_step", functools.partial(poisoned, bad=lambda s: s >= 2))
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        train(tiny_corpus, tmp_path / "all", "train.max_steps=8", "train.max_skipped_steps=3", "checkpoint.every=100")


def test_activation_checkpointing_and_z_loss(tiny_corpus, tmp_path, reference):
    _, _, losses = train(tiny_corpus, tmp_path / "ckpt", "train.activation_checkpointing=true", "train.max_steps=3",
                         "checkpoint.every=100")
    # same model and data: recomputation changes nothing but memory
    for s in (1, 2):
        assert losses[s] == pytest.approx(reference["losses"][s], rel=1e-6)
    result, _, _ = train(tiny_corpus, tmp_path / "z", "train.z_loss=1e-2", "train.max_steps=1", "checkpoint.every=100")
    assert result.history[0]["z_loss"] > 0  # reported next to the cross entropy


def test_validation_loss_and_perplexity(tiny_corpus, tmp_path):
    result, lines, _ = train(tiny_corpus, tmp_path, "data.valid_fraction=0.1", "train.eval_every=2", "train.eval_iters=2",
                             "train.max_steps=4", "checkpoint.every=100")
    val = [r for r in result.history if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert val[1]["val_loss"] < val[0]["val_loss"]
    assert any("validation loss" in ln for ln in lines)


def test_export_after_zero3_reproduces_the_engine_logits(tiny_corpus, reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tanuki.model import Transformer
    from tanuki.pretrain import export_checkpoint

    out = export_checkpoint(reference["dir"], tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template  # the run's tokenizer, with its chat template, travels with the model
    cfg, sd = consolidate_checkpoint(reference["dir"] / "checkpoints/step_00000006")
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=False)
    model.eval()
    x = torch.randint(0, 1280, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)
    # the consolidated weights are the trained ones: on training text they beat a uniform guess
    import json

    # (the mean over four documents: one document's loss varies by 0.4 nats after six steps)
    lines = (tiny_corpus["dir"] / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    losses = []
    for line in lines:
        ids = torch.tensor([tok(json.loads(line)["text"]).input_ids[:64]])
        with torch.no_grad():
            losses.append(float(hf(ids, labels=ids).loss))
    assert sum(losses) / len(losses) < math.log(1280) - 0.4


def test_config_errors_come_before_any_process_group(tiny_corpus, tmp_path):
    from tanuki import pretrain

    def prep(*extra, env=ENV):
        return pretrain.prepare(config(tiny_corpus, tmp_path, *extra), env)

    with pytest.raises(ConfigError, match=r"data.prefixes\[0\].*missing"):
        prep(f"data.prefixes=[{tmp_path}/nope]")
    with pytest.raises(ConfigError, match="tokenizer.path"):
        prep(f"tokenizer.path={tmp_path}/nope")
    with pytest.raises(ConfigError, match="model.vocab_size.*1280"):
        prep("model.vocab_size=1024")
    with pytest.raises(ConfigError, match="train.seq_len"):
        config(tiny_corpus, tmp_path, "train.seq_len=256")
    with pytest.raises(ConfigError, match=r"train.global_batch_size.*2 x 3"):
        prep(env=DistEnv(0, 3, 0, "torchrun/deepspeed"))
    with pytest.raises(ConfigError, match="train.max_steps"):
        config(tiny_corpus, tmp_path, "train.max_steps=0")


def test_sigterm_saves_a_checkpoint_and_stops(tiny_corpus, tmp_path, monkeypatch, reference):
    """SLURM sends SIGTERM (or --signal=USR1) before a time limit or preemption."""
    import functools
    import os
    import signal

    from tanuki import pretrain

    real_step = pretrain.lm_step
    calls = {"n": 0}

    def signalling(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(model, batch, **kw)

    monkeypatch.setattr(pretrain, "lm_step", functools.partial(signalling))
    result, lines, _ = train(tiny_corpus, tmp_path, "checkpoint.every=100")
    assert result.stopped_by_signal and result.step == 3
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    assert any("stop requested" in ln for ln in lines)
    monkeypatch.setattr(pretrain, "lm_step", real_step)
    _, _, losses = train(tiny_corpus, tmp_path, "checkpoint.every=100")
    assert [losses[s] for s in (4, 5, 6)] == [reference["losses"][s] for s in (4, 5, 6)]


def test_ctrl_c_saves_a_checkpoint_and_stops_and_a_second_one_aborts(tiny_corpus, tmp_path, monkeypatch, capfd,
                                                                     reference):
    """The first SIGINT is a stop request like SIGTERM (one line says so); a second aborts at once."""
    import functools
    import os
    import signal

    from tanuki import pretrain

    real_step = pretrain.lm_step
    calls = {"n": 0}

    def interrupting(model, batch, *, at, **kw):
        calls["n"] += 1
        if calls["n"] in at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(model, batch, **kw)

    monkeypatch.setattr(pretrain, "lm_step", functools.partial(interrupting, at={9}))
    result, lines, _ = train(tiny_corpus, tmp_path, "checkpoint.every=100")
    assert result.stopped_by_signal and result.step == 3
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    err = capfd.readouterr().err
    assert err.count("interrupted (Ctrl-C)") == 1 and "Ctrl-C again to abort" in err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run

    # the run continues exactly
    monkeypatch.setattr(pretrain, "lm_step", real_step)
    _, _, losses = train(tiny_corpus, tmp_path, "checkpoint.every=100")
    assert [losses[s] for s in (4, 5, 6)] == [reference["losses"][s] for s in (4, 5, 6)]

    # two Ctrl-C: KeyboardInterrupt at once, in the step of the second, with no new checkpoint
    calls["n"] = 0
    monkeypatch.setattr(pretrain, "lm_step", functools.partial(interrupting, at={1, 2}))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_corpus, tmp_path / "again", "checkpoint.every=100")
    assert calls["n"] == 2 and latest_checkpoint(tmp_path / "again" / "checkpoints") is None


def test_keyboard_interrupt_in_a_launch_script_is_one_line_and_status_130(capsys):
    from tanuki.cli import user_errors

    @user_errors()
    def task():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        task()
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aborted by Ctrl-C" in err


def test_init_from_a_hugging_face_model_and_export_at_the_end(tiny_corpus, reference, tmp_path):
    """Continue pretraining from an HF directory: the first loss is transformers' loss on the first batch."""
    from transformers import AutoModelForCausalLM

    from tanuki.data import DataLoader, build_pretrain_datasets
    from tanuki.pretrain import export_checkpoint

    hf_dir = export_checkpoint(reference["dir"], tmp_path / "hf-in", dtype="float32")
    # the HF config decides the architecture, whatever model.* says
    result, lines, losses = train(tiny_corpus, tmp_path / "run", f"init={hf_dir}", "model.n_layers=7",
                                  "train.max_steps=2", "export.hf=true", "checkpoint.every=100")
    cfg = config(tiny_corpus, tmp_path / "x")
    data = build_pretrain_datasets(cfg.data, seq_len=32, train_samples=16)
    first = next(iter(DataLoader(data.train, micro_batch_size=8)))["tokens"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            hf(first[:, :-1]).logits.reshape(-1, 1280), first[:, 1:].reshape(-1))
    assert losses[1] == pytest.approx(float(expected), rel=1e-5)
    assert losses[1] < reference["losses"][1] - 0.3  # it starts from the trained weights
    out = tmp_path / "run" / "hf"
    assert any(f"exported the final checkpoint to {out}" in ln for ln in lines)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2


def test_keep_last_prunes_old_checkpoints_and_max_tokens_sets_the_length(tiny_corpus, tmp_path):
    # 8 x 32 tokens per step: 1,300 tokens round up to 6 steps
    result, _, losses = train(tiny_corpus, tmp_path, "train.max_tokens=1300", "checkpoint.keep_last=2")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and result.step == 6
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert latest_checkpoint(root) == root / "step_00000006"


def test_tiny_moe_trains_under_zero3_and_exports_as_mixtral(tiny_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from tanuki.model import Transformer
    from tanuki.pretrain import export_checkpoint

    result, lines, losses = train(tiny_corpus, tmp_path, "model.n_experts=4", "model.top_k=2",
                                  "model.router_aux_loss_coef=0.01", "train.max_steps=4", "checkpoint.every=100")
    assert losses[4] < losses[1]
    records = [r for r in result.history if "loss" in r]
    # the balancing loss is reported (E * sum f P >= top_k, with equality for a perfectly balanced router)
    assert all(r["moe_aux_loss"] >= 2 - 1e-5 for r in records) and all(0.25 <= r["moe_load_max"] <= 1 for r in records)
    out = export_checkpoint(tmp_path, tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    cfg, sd = consolidate_checkpoint(result.last_checkpoint)
    model = Transformer(cfg).eval()
    model.load_state_dict(sd, strict=False)
    x = torch.randint(0, 1280, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_zero3_builds_partitioned_and_equals_the_whole_model_build(tiny_corpus, tmp_path, reference, monkeypatch):
    """ZeRO-3 without TP builds the model inside ``deepspeed.zero.Init`` (no rank holds it whole); the
    values, losses and trained weights are those of the old build (the whole model, then partitioned)."""
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    from tanuki import build
    from tanuki.model import build_model

    assert any("built partitioned (zero.Init)" in ln for ln in reference["lines"])
    cfg = config(tiny_corpus, tmp_path / "unused")
    assert build.builds_partitioned(cfg.parallel, cfg.init)
    # the initial values: gathered from the partitions, those of build_model(seed)
    import deepspeed

    model = build.build_partitioned_model(cfg.model, seed=cfg.seed, train=cfg.train, parallel=cfg.parallel, dp_size=1,
                                          bf16=False)
    want = build_model(cfg.model, seed=cfg.seed).state_dict()
    params = dict(model.named_parameters())
    assert all(is_zero_param(p) for p in params.values())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        got = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the run built the old way: the same losses and the same consolidated checkpoint
    monkeypatch.setattr(build, "builds_partitioned", lambda parallel, init: False)
    result, lines, losses = train(tiny_corpus, tmp_path / "whole", "train.max_steps=6", "checkpoint.every=6")
    assert not any("built partitioned" in ln for ln in lines)
    ref = reference["losses"]
    assert sorted(losses) == sorted(ref)
    for s in ref:
        assert losses[s] == pytest.approx(ref[s], rel=1e-6), s
    _, w_whole = consolidate_checkpoint(result.last_checkpoint)
    _, w_part = consolidate_checkpoint(reference["dir"] / "checkpoints/step_00000006")
    assert w_whole.keys() == w_part.keys()
    for k in w_whole:
        torch.testing.assert_close(w_part[k], w_whole[k], rtol=1e-6, atol=1e-7, msg=k)


def train_partitioned_on_rank(rank, world, corpus, run_dir, extra):
    from pathlib import Path

    from tanuki import pretrain
    from tanuki.parallel.env import dist_env

    lines = []
    env = dist_env()
    prep = pretrain.prepare(config(corpus, Path(run_dir), *extra), env)
    result = pretrain.run(prep, env, Path(run_dir).resolve(), print_fn=lines.append)
    return {r["step"]: r["loss"] for r in result.history if "loss" in r}, str(result.last_checkpoint), lines


@pytest.mark.slow
def test_zero3_built_partitioned_on_two_ranks_equals_one_process(tiny_corpus, tmp_path):
    from dist_helpers import run_ranks

    extra = ("train.max_steps=3", "checkpoint.every=3", "parallel.zero_stage=3")
    one, one_lines, one_losses = train(tiny_corpus, tmp_path / "one", *extra)
    losses, ckpt, lines = run_ranks(train_partitioned_on_rank, 2, tiny_corpus, str(tmp_path / "two"), extra)[0]
    assert any("built partitioned (zero.Init)" in ln for ln in one_lines)
    assert any("built partitioned (zero.Init)" in ln and "x dp 2" in ln for ln in lines)
    assert sorted(losses) == sorted(one_losses) == [1, 2, 3]
    for s in one_losses:  # the data-parallel mean sums in another order
        assert losses[s] == pytest.approx(one_losses[s], rel=1e-5), s
    _, two = consolidate_checkpoint(ckpt)
    _, ref = consolidate_checkpoint(one.last_checkpoint)
    assert two.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(two[k], ref[k], rtol=1e-4, atol=3e-5, msg=k)


def test_an_export_dir_that_is_not_a_model_export_is_refused_before_training(tiny_corpus, tmp_path):
    data = tmp_path / "my-data"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=f"export.dir.*{data} is not empty and is not a model export"):
        train(tiny_corpus, tmp_path / "run", "export.hf=true", f"export.dir={data}")
    assert (data / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "run" / "checkpoints").exists()
