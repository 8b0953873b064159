"""DPO losses, sequence log-probs and metrics against their oracles: the formulas of the reference (TRL
semantics) written out independently here, naive log_softmax + gather, transformers' own causal-LM loss on
the exported weights, and the one-process value under vocabulary parallelism."""

import math

import pytest
import torch
from dist_helpers import run_ranks

from tanuki.config import ModelConfig
from tanuki.losses import (
    DPO_LOSS_TYPES,
    IGNORE_INDEX,
    VocabParallel,
    chosen_nll,
    dpo_loss,
    dpo_metrics,
    sequence_logps,
)

BETA = 0.3


def _logps(seed, n=16):
    """Policy log-probs, and reference ones near them (|beta x| stays moderate, so log(sigmoid) in the
    oracle is accurate, and no pair sits on the hinge's kink)."""
    gen = torch.Generator().manual_seed(seed)
    pc, pr = (-20 * torch.rand(n, generator=gen, dtype=torch.float64) - 1 for _ in range(2))
    rc, rr = (p + 2 * torch.randn(n, generator=gen, dtype=torch.float64) for p in (pc, pr))
    return pc, pr, rc, rr


def _formula(pc, pr, rc, rr, beta, loss_type, eps):
    """The reference's formulas, one per line, in plain math on the log-ratio x."""
    x = (pc - pr) - (rc - rr)
    sig = torch.sigmoid
    if loss_type == "sigmoid":
        return -(1 - eps) * torch.log(sig(beta * x)) - eps * torch.log(sig(-beta * x))
    if loss_type == "ipo":
        return (x - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.clamp(1 - beta * x, min=0)
    if loss_type == "robust":
        return (-(1 - eps) * torch.log(sig(beta * x)) + eps * torch.log(sig(-beta * x))) / (1 - 2 * eps)
    raise AssertionError(loss_type)


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2)]


@pytest.mark.parametrize("loss_type, eps", CASES)
def test_losses_and_rewards_equal_the_formulas(loss_type, eps):
    pc, pr, rc, rr = _logps(1)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, _formula(pc, pr, rc, rr, BETA, loss_type, eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, BETA * (pc - rc))
    torch.testing.assert_close(rj, BETA * (pr - rr))
    assert losses.shape == cr.shape == rj.shape == (16,)


@pytest.mark.parametrize("loss_type, eps", CASES)
def test_gradients_match_finite_differences(loss_type, eps):
    gen = torch.Generator().manual_seed(2)
    pc, pr = (torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    rc, rr = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    if loss_type == "hinge":  # away from the kink at beta x = 1, where finite differences are meaningless
        x = (pc - pr - rc + rr).detach()
        assert ((1 - BETA * x).abs() > 1e-3).all()

    def f(a, b):
        return dpo_loss(a, b, rc, rr, beta=BETA, loss_type=loss_type, label_smoothing=eps)[0]

    assert torch.autograd.gradcheck(f, (pc, pr))


def test_sigmoid_gradient_has_the_closed_form():
    """d/dx -log sigmoid(beta x) = -beta sigmoid(-beta x); chosen gets +, rejected gets -, reference none."""
    pc, pr, rc, rr = _logps(3)
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in (pc, pr, rc, rr))
    losses, *_ = dpo_loss(pc, pr, rc, rr, beta=BETA)
    losses.sum().backward()
    x = (pc - pr - rc + rr).detach()
    expected = -BETA * torch.sigmoid(-BETA * x)
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)
    assert rc.grad is None and rr.grad is None  # the reference is a constant


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    pc, pr, _, _ = _logps(4)
    losses, cr, rj = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    assert (cr == 0).all() and (rj == 0).all()
    m = dpo_metrics(losses, pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert m["loss"].item() == pytest.approx(math.log(2))
    assert m["rewards/accuracies"].item() == 0.0 and m["rewards/margins"].item() == 0.0


def test_metrics_are_trl_named_batch_means():
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in _logps(5, n=8))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=BETA)
    m = dpo_metrics(losses, pc, pr, rc, rr, beta=BETA)
    assert list(m) == ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                       "logps/chosen", "logps/rejected", "loss"]
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    c, r = BETA * (pc - rc).detach(), BETA * (pr - rr).detach()
    wins = sum(1 for i in range(8) if c[i] > r[i])
    assert m["rewards/accuracies"].item() == pytest.approx(wins / 8)
    assert m["rewards/chosen"].item() == pytest.approx(c.mean().item())
    assert m["rewards/rejected"].item() == pytest.approx(r.mean().item())
    assert m["rewards/margins"].item() == pytest.approx((c - r).mean().item())
    assert m["logps/chosen"].item() == pytest.approx(pc.mean().item())
    assert m["logps/rejected"].item() == pytest.approx(pr.mean().item())
    assert m["loss"].item() == pytest.approx(losses.mean().item())


def test_chosen_nll_is_the_token_mean():
    logps = torch.tensor([-6.0, -1.0, 0.0])
    n = torch.tensor([3, 1, 0])
    assert chosen_nll(logps, n).item() == pytest.approx(7.0 / 4)


def test_bad_options_raise_naming_the_option():
    a = torch.zeros(2)
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(a, a, a, a, beta=beta)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(a, a, a, a, beta=0.1, label_smoothing=eps)
    for lt in ("ipo", "hinge"):  # they do not use smoothing; silently ignoring it would mislead
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(a, a, a, a, beta=0.1, loss_type=lt, label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type.*'kto'"):
        dpo_loss(a, a, a, a, beta=0.1, loss_type="kto")
    assert DPO_LOSS_TYPES == ("sigmoid", "ipo", "hinge", "robust")
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


# -- sequence log-probs ------------------------------------------------------------------------------

V, LIMIT = 48, 41


def _batch(seed, dtype=torch.float32, B=3, T=7):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=gen)).to(dtype)
    labels = torch.randint(0, LIMIT, (B, T), generator=gen)
    labels[0, :2] = IGNORE_INDEX  # prompt positions
    labels[1, 5:] = IGNORE_INDEX  # right padding
    labels[2, :] = IGNORE_INDEX   # a row with no completion at all
    return logits, labels


def _naive(logits, labels, limit=LIMIT):
    """log_softmax over the real vocabulary, gather, mask, sum per row."""
    lp = torch.log_softmax(logits.double()[..., :limit], dim=-1)
    valid = labels != IGNORE_INDEX
    tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * valid).sum(-1), valid.sum(-1)


def test_sequence_logps_equal_naive_log_softmax_with_padding_and_ignored_labels():
    logits, labels = _batch(0)
    logits.requires_grad_()
    logps, n = sequence_logps(logits, labels, vocab_limit=LIMIT)
    ref, ref_n = _naive(logits, labels)
    torch.testing.assert_close(logps, ref.float(), rtol=1e-6, atol=1e-5)
    assert n.tolist() == ref_n.tolist() == [5, 5, 0] and logps[2].item() == 0.0
    # gradients, including zero on the padded columns and on ignored positions
    w = torch.tensor([0.5, -2.0, 1.0])
    (logps * w).sum().backward()
    x = logits.detach().double().requires_grad_()
    (_naive(x, labels)[0] * w.double()).sum().backward()
    torch.testing.assert_close(logits.grad, x.grad.float(), rtol=1e-5, atol=1e-6)
    assert (logits.grad[..., LIMIT:] == 0).all() and (logits.grad[0, :2] == 0).all()
    # average divides by the token count (an empty row stays 0)
    avg, _ = sequence_logps(logits.detach(), labels, vocab_limit=LIMIT, average=True)
    torch.testing.assert_close(avg, torch.stack([ref[0] / 5, ref[1] / 5, ref[2]]).float(), rtol=1e-6, atol=1e-6)
    # without a limit every column counts
    torch.testing.assert_close(sequence_logps(logits.detach(), labels)[0], _naive(logits.detach(), labels, V)[0].float())


def test_sequence_logps_fd_gradient_and_chunking(monkeypatch):
    import tanuki.losses as losses

    logits, labels = _batch(1, dtype=torch.float64, T=4)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * LIMIT)  # chunks of 3 of the 12 rows, so the loop and its seams are exercised
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sequence_logps(z, labels, vocab_limit=LIMIT)[0], (x,))
    torch.testing.assert_close(sequence_logps(x, labels, vocab_limit=LIMIT)[0], _naive(x, labels)[0])


def test_sequence_logps_of_bf16_logits_use_an_fp32_softmax():
    logits, labels = _batch(2, dtype=torch.bfloat16)
    logps, _ = sequence_logps(logits, labels, vocab_limit=LIMIT)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, _naive(logits.float(), labels)[0].float(), rtol=1e-6, atol=1e-5)
    logits.requires_grad_()
    sequence_logps(logits, labels, vocab_limit=LIMIT)[0].sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_sequence_logps_equal_transformers_on_the_exported_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from tanuki.hf import export_hf
    from tanuki.model import build_model

    cfg = ModelConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=96, max_seq_len=32)
    model = build_model(cfg, seed=5).eval()
    hf = AutoModelForCausalLM.from_pretrained(
        export_hf(model.state_dict(), cfg, tmp_path / "hf", dtype=torch.float32), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(6)
    # (prompt length, completion length) per row; rows are right-padded to 12 tokens
    shapes = [(3, 9), (5, 4), (1, 6)]
    tokens = torch.randint(0, cfg.vocab_size, (3, 12), generator=gen)
    labels = torch.full_like(tokens, IGNORE_INDEX)  # pre-aligned: labels[t] = tokens[t + 1]
    for b, (p, c) in enumerate(shapes):
        labels[b, p - 1:p - 1 + c] = tokens[b, p:p + c]
    with torch.no_grad():
        logps, n = sequence_logps(model(tokens), labels)
        expected = []
        for b, (p, c) in enumerate(shapes):
            # transformers shifts its labels itself and returns the mean cross entropy over them
            hf_labels = torch.full((1, p + c), IGNORE_INDEX)
            hf_labels[0, p:] = tokens[b, p:p + c]
            out = hf(input_ids=tokens[b:b + 1, :p + c], labels=hf_labels)
            expected.append(-out.loss * c)
    assert n.tolist() == [c for _, c in shapes]
    torch.testing.assert_close(logps, torch.stack(expected), rtol=1e-5, atol=1e-5)


# -- vocabulary parallelism --------------------------------------------------------------------------


def logps_on_rank(rank, world):
    from tanuki.parallel.groups import build_process_groups

    groups = build_process_groups(world)
    logits, labels = _batch(3)
    cols = V // world
    vp = VocabParallel(group=groups.tp_group, start=rank * cols)
    out = {}
    for average in (False, True):
        local = logits[..., rank * cols:(rank + 1) * cols].clone().requires_grad_()
        logps, n = sequence_logps(local, labels, vocab_limit=LIMIT, vocab_parallel=vp, average=average)
        (logps * torch.tensor([0.5, -2.0, 1.0])).sum().backward()
        out[average] = (logps.detach(), n, local.grad)
    return out


def test_vocab_parallel_sequence_logps_equal_one_process():
    """Logits split by columns over 2 ranks (rank 1's slice holds the padded columns)."""
    results = run_ranks(logps_on_rank, 2)
    for average in (False, True):
        logits, labels = _batch(3)
        logits.requires_grad_()
        ref, ref_n = sequence_logps(logits, labels, vocab_limit=LIMIT, average=average)
        (ref * torch.tensor([0.5, -2.0, 1.0])).sum().backward()
        for rank, result in enumerate(results):
            logps, n, grad = result[average]
            torch.testing.assert_close(logps, ref.detach(), rtol=1e-6, atol=1e-5)
            assert torch.equal(n, ref_n)
            torch.testing.assert_close(grad, logits.grad[..., rank * 24:(rank + 1) * 24], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_step_logs_trl_quantities_under_trl_names(loss_type):
    """TRL's DPOTrainer (1.16, ``_compute_loss``) logs summed completion log-probs for every loss type:
    logps/chosen = mean of sum_t log p_policy, rewards/chosen = mean of beta (sum policy - sum ref); IPO
    divides by the completion length inside its loss only: ((c_pol - c_ref) / n_c - (r_pol - r_ref) / n_r
    - 1 / (2 beta))^2. The oracle: per-token log-probs of two tiny models by a plain log_softmax."""
    from tanuki.dpo import LossConfig, dpo_step
    from tanuki.model import build_model

    cfg = ModelConfig(n_layers=1, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=48, vocab_size=64, max_seq_len=32)
    policy, ref_model = build_model(cfg, seed=1).eval(), build_model(cfg, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    b, t = 3, 12
    tokens = torch.randint(0, 60, (2 * b, t), generator=g)
    labels = torch.randint(0, 60, (2 * b, t), generator=g)
    for row, start in enumerate([2, 5, 3, 7, 1, 9]):  # completions of different lengths
        labels[row, :start] = -100
    batch = {"tokens": tokens, "labels": labels, "positions": torch.arange(t).expand(2 * b, t)}

    def summed(model):
        with torch.no_grad():
            lp = torch.log_softmax(model(tokens).float(), -1)
        mask = labels != -100
        return (lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1), mask.sum(-1)

    pol, n = summed(policy)
    ref, _ = summed(ref_model)
    average = loss_type == "ipo"
    beta = 0.1
    out = dpo_step(policy, batch, loss=LossConfig(type=loss_type, beta=beta),
                   reference=lambda batch: ref / n if average else ref, vocab_limit=None)
    m = {k: float(v) for k, v in out.stats.items()}
    c, r = beta * (pol[:b] - ref[:b]), beta * (pol[b:] - ref[b:])
    assert m["logps/chosen"] == pytest.approx(pol[:b].mean().item(), rel=1e-5)
    assert m["logps/rejected"] == pytest.approx(pol[b:].mean().item(), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(c.mean().item(), rel=1e-4, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(r.mean().item(), rel=1e-4, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx((c - r).mean().item(), rel=1e-4, abs=1e-6)
    assert m["rewards/accuracies"] == pytest.approx((c > r).float().mean().item())
    if average:
        delta = (pol[:b] - ref[:b]) / n[:b] - (pol[b:] - ref[b:]) / n[b:]
        expected = ((delta - 1 / (2 * beta)) ** 2).mean()
    else:
        expected = -torch.nn.functional.logsigmoid(beta * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))).mean()
    assert m["loss"] == pytest.approx(expected.item(), rel=1e-5)
    # the per-token averages IPO's loss uses are not what is logged (lengths 10, 7, 9 differ)
    if average:
        assert abs(m["logps/chosen"] - (pol[:b] / n[:b]).mean().item()) > 1.0
