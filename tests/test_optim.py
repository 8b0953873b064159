"""Learning-rate schedules against their closed forms; parameter groups against the model's names."""

import math

import pytest
import torch

from tanuki.config import ModelConfig, ParallelConfig, TrainConfig
from tanuki.model import build_model
from tanuki.optim import Schedule, build_optimizer, lr_at, param_groups
from tanuki.parallel import zero


def test_cosine_schedule_warmup_peak_and_floor():
    s = Schedule(lr=3e-4, min_lr=3e-5, warmup_steps=10, max_steps=110, kind="cosine")
    assert lr_at(0, s) == pytest.approx(3e-5)  # 1/10 of the peak on the first step
    assert lr_at(9, s) == pytest.approx(3e-4)
    assert lr_at(10, s) == pytest.approx(3e-4)
    # halfway through the decay: the mean of peak and floor
    assert lr_at(60, s) == pytest.approx((3e-4 + 3e-5) / 2)
    assert lr_at(110, s) == pytest.approx(3e-5)
    assert lr_at(500, s) == pytest.approx(3e-5)  # stays at the floor past max_steps
    for step in (23, 47, 91):
        expected = 3e-5 + (3e-4 - 3e-5) * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert lr_at(step, s) == pytest.approx(expected)
    lrs = [lr_at(t, s) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_schedule(shape):
    s = Schedule(lr=1e-3, min_lr=0.0, warmup_steps=5, max_steps=100, kind="wsd", decay_fraction=0.2,
                 decay_shape=shape)
    assert lr_at(4, s) == pytest.approx(1e-3)
    assert all(lr_at(t, s) == pytest.approx(1e-3) for t in range(5, 80))
    assert lr_at(100, s) == pytest.approx(0.0)
    progress = 10 / 20
    factor = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
              "sqrt": 1 - math.sqrt(progress)}[shape]
    assert lr_at(90, s) == pytest.approx(1e-3 * factor)


def test_constant_schedule():
    s = Schedule(lr=2e-5, min_lr=0.0, warmup_steps=0, max_steps=10, kind="constant")
    assert [lr_at(t, s) for t in range(12)] == [2e-5] * 12


def test_no_weight_decay_on_norms_and_embeddings():
    model = build_model(ModelConfig(n_layers=2, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128))
    groups = param_groups(model.named_parameters(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert set(no_decay["names"]) == {"embed.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "mlp_norm")
    }
    assert "head.weight" in decay["names"] and "layers.1.mlp.w_down.weight" in decay["names"]
    assert len(decay["names"]) + len(no_decay["names"]) == len(list(model.parameters()))
    # configurable
    g = param_groups(model.named_parameters(), 0.1, decay_embeddings=True, decay_norms=True)
    assert len(g) == 1 and g[0]["weight_decay"] == 0.1


def test_frozen_parameters_are_left_out():
    model = build_model(ModelConfig(n_layers=2, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128))
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    names = [n for g in param_groups(model.named_parameters(), 0.1) for n in g["names"]]
    assert not any(n.startswith("layers.0.") for n in names)


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, zero.GuardedAdamW])
def test_adamw_step_leaves_no_decay_parameters_undecayed(optimizer_class):
    """With zero gradients, AdamW changes only the decayed weights (by lr * wd * w); so does the
    engine's GuardedAdamW (the gradients are finite)."""
    model = build_model(ModelConfig(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, optimizer_class=optimizer_class)
    assert type(opt) is optimizer_class
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in ("embed.weight", "norm.weight") or "norm" in n:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))


def test_the_engine_hands_deepspeed_build_optimizers_guarded_adamw(monkeypatch):
    """build_engine's client optimizer: GuardedAdamW over param_groups, with the run's hyperparameters."""
    import deepspeed

    model = build_model(ModelConfig(n_layers=2, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128))
    train = TrainConfig(lr=1e-3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6, decay_embeddings=True)
    handed = {}

    class FakeEngine:  # what build_engine touches besides handing it back: the checkpoint engine slot
        checkpoint_engine = None

    fake = FakeEngine()

    def initialize(*, model, optimizer, config, mpu, dist_init_required):
        handed.update(model=model, optimizer=optimizer, config=config)
        return fake, optimizer, None, None

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    engine, opt = zero.build_engine(model, train, ParallelConfig(zero_stage=1), dp_size=1, bf16=False)
    assert engine is fake and handed["model"] is model and handed["optimizer"] is opt
    assert type(opt) is zero.GuardedAdamW and not opt.skipped
    expected = param_groups(model.named_parameters(), 0.05, decay_embeddings=True)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in expected
    ]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert "embed.weight" in expected[0]["names"]
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"]) == (1e-3, (0.8, 0.9), 1e-6)
        assert "names" not in g
