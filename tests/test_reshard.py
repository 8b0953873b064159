"""Resuming a checkpoint on another shape (reshard on load) continues the original run.

Oracle: the uninterrupted run on the original shape. A checkpoint of step 2 is resumed on another TP
size or number of ranks and must give the original run's losses and gradient norms at steps 3 and 4,
which needs the weights, both Adam moments and the step counter to come back exactly (a fresh
optimizer state, or a wrong join of the TP shards, changes the step-3 loss at the 1e-3 level).
"""

import pytest
from conftest import compose, tiny_train_overrides
from dist_helpers import run_ranks

from tanuki.config import ConfigError, PretrainConfig, from_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = ["train.max_steps=4", "checkpoint.every=2"]


def train_on_rank(rank, world, corpus, run_dir, extra):
    from pathlib import Path

    from tanuki import pretrain
    from tanuki.parallel.env import dist_env

    cfg = from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(corpus, run_dir, *STEPS, *extra)))
    env = dist_env()
    prep = pretrain.prepare(cfg, env)
    lines = []
    result = pretrain.run(prep, env, Path(run_dir).resolve(), print_fn=lines.append)
    return [r for r in result.history if "loss" in r], lines


def _resume_and_compare(corpus, tmp_path, world, extra, new_world, new_extra):
    original = tmp_path / "original"
    history, _ = run_ranks(train_on_rank, world, corpus, str(original), extra)[0]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    step2 = original / "checkpoints" / "step_00000002"
    resumed, lines = run_ranks(train_on_rank, new_world, corpus, str(tmp_path / "resumed"),
                               [*new_extra, f"resume={step2}"])[0]
    assert any("resharded from" in ln for ln in lines), lines
    assert [r["step"] for r in resumed] == [3, 4]
    for got, want in zip(resumed, history[2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (got, want)
    assert (step2 / "universal" / "zero" / "optimizer_state.pt").is_file()  # the conversion is kept
    return history, resumed


@pytest.mark.parametrize(
    "world, extra, new_world, new_extra",
    [
        (2, ["parallel.tp=2", "parallel.zero_stage=1"], 1, ["parallel.tp=1", "parallel.zero_stage=1"]),
        (1, ["parallel.zero_stage=3"], 2, ["parallel.zero_stage=3"]),
        (1, ["parallel.zero_stage=2"], 2, ["parallel.tp=2", "parallel.zero_stage=2"]),
    ],
    ids=["tp2-zero1-to-one-process", "zero3-one-process-to-dp2", "zero2-one-process-to-tp2"],
)
def test_a_checkpoint_resumed_on_another_shape_continues_the_run(tiny_corpus, tmp_path, world, extra, new_world,
                                                                  new_extra):
    _resume_and_compare(tiny_corpus, tmp_path, world, extra, new_world, new_extra)


def test_unsupported_reshards_fail_before_anything_is_built(tiny_corpus, tmp_path):
    """ZeRO-0 across TP sizes, and ZeRO-3 onto tp>1: a ConfigError naming the key, from the checks
    run before process groups split, the model is built or any conversion is written."""
    from tanuki.checkpoint import commit_checkpoint
    from tanuki.config import to_dict
    from tanuki.parallel.env import DistEnv
    from tanuki.pretrain import RESUME_KEYS
    from tanuki.checkpoint import check_resumable

    def checkpoint(name, zero_stage, tp, world_size):
        cfg = from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(
            tiny_corpus, tmp_path, f"parallel.zero_stage={zero_stage}", f"parallel.tp={tp}")))
        root = tmp_path / name / "checkpoints"
        (root / "step_00000002.partial").mkdir(parents=True)
        state = {"step": 2, "skipped_steps": 0, "loader": {}, "world_size": world_size, "zero_stage": zero_stage,
                 "config": to_dict(cfg)}
        return commit_checkpoint(root, 2, state, keep_last=0)

    def resume(ckpt, zero_stage, tp, world_size):
        cfg = from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(
            tiny_corpus, tmp_path, f"parallel.zero_stage={zero_stage}", f"parallel.tp={tp}")))
        return check_resumable(ckpt, to_dict(cfg), RESUME_KEYS, DistEnv(0, world_size, 0, "test"), cfg.parallel)

    zero0 = checkpoint("zero0", 0, 2, 2)
    with pytest.raises(ConfigError, match=r"parallel\.tp.*ZeRO-0.*cannot be resharded"):
        resume(zero0, 0, 1, 1)
    resume(zero0, 0, 2, 4)  # stage 0 on more DP ranks: loads as is
    zero3 = checkpoint("zero3", 3, 1, 1)
    with pytest.raises(ConfigError, match=r"parallel\.tp.*resharded onto tp=1 only"):
        resume(zero3, 3, 2, 2)
    resume(zero3, 3, 1, 2)
    zero1 = checkpoint("zero1", 1, 2, 2)  # no DeepSpeed files: written before the join rules existed
    with pytest.raises(ConfigError, match=r"parallel\.tp.*universal_checkpoint_info"):
        resume(zero1, 1, 1, 1)
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage"):  # still a resume key
        resume(zero1, 2, 1, 1)
    tp1 = checkpoint("tp1", 1, 1, 1)  # without join rules only tp=1 shapes are safe
    resume(tp1, 1, 1, 2)
    with pytest.raises(ConfigError, match=r"parallel\.tp.*only between tp=1 shapes"):
        resume(tp1, 1, 2, 2)
    assert not any(p.name.startswith(".universal") or p.name == "universal" for p in zero1.iterdir())


def test_universal_checkpoint_info_names_the_join_of_every_parameter():
    import re

    from tanuki.config import ModelConfig
    from tanuki.model import build_model
    from tanuki.parallel.tensor_parallel import split_dim, universal_checkpoint_info

    names = [n for n, _ in build_model(ModelConfig(n_layers=3, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                                   vocab_size=256, max_seq_len=16)).named_parameters()]
    info = universal_checkpoint_info(names)
    for name in names:
        replicated = [p for p in info["tp_replicated_parameter_patterns"] if re.match(p, name)]
        row = [p for p in info["parameter_with_row_parallelism_patterns"] if re.match(p, name)]
        assert len(replicated) == (split_dim(name) is None), name
        assert len(row) == (split_dim(name) == 1), name


def test_a_crafted_file_in_the_universal_checkpoint_is_refused_before_deepspeed_reads_it(tiny_corpus, tmp_path):
    """DeepSpeed's universal loader calls torch.load itself: the converted files are checked first."""
    import builtins

    import torch

    from tanuki.parallel.reshard import convert_to_universal

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(tmp_path / "marker"), "w")

    run_ranks(train_on_rank, 1, tiny_corpus, str(tmp_path / "original"), ["parallel.zero_stage=1"])
    step2 = tmp_path / "original" / "checkpoints" / "step_00000002"
    universal = convert_to_universal(step2)
    bad = sorted((universal / "zero").glob("*/fp32.pt"))[0]
    torch.save({"param": Payload()}, bad)
    with pytest.raises(AssertionError) as e:
        run_ranks(train_on_rank, 2, tiny_corpus, str(tmp_path / "resumed"), ["parallel.zero_stage=1", f"resume={step2}"])
    assert f"{bad}: refused to load" in str(e.value)
    assert not (tmp_path / "marker").exists()
