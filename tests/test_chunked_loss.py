"""The chunked output head + loss (``tanuki.chunked_loss``) against the full-logits path.

Oracle: ``tanuki.losses.causal_lm_loss`` / ``sequence_logps`` on ``F.linear(h, W)`` (the
``*_ref`` functions), in one process; under tensor parallelism (gloo, several processes, with and
without sequence parallelism) the one-process full-logits values of the same unsharded model.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks

from tanuki.chunked_loss import (
    STRATEGIES,
    ChunkedLMHead,
    causal_lm_loss_ref,
    chunked_causal_lm_loss,
    chunked_sequence_logps,
    sequence_logps_ref,
    use_chunked_head,
)
from tanuki.config import ModelConfig
from tanuki.losses import LossOutput, causal_lm_loss

N, D, V, LIMIT = 37, 24, 96, 83  # 13 padded vocabulary rows


def _inputs(dtype=torch.float32, seed=0, shape=(N,)):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=gen).to(dtype)
    w = (torch.randn(V, D, generator=gen) * 0.5).to(dtype)  # logits of std ~2.5: a peaked softmax
    labels = torch.randint(0, LIMIT, shape, generator=gen)
    labels.view(-1)[::5] = -100
    return h, w, labels


def _loss_and_grads(fn, h0, w0, labels, **kw):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    out = fn(h, w, labels, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def _close(got, want, rtol, msg=""):
    # Elementwise rtol with an absolute floor of rtol x the largest entry: entries that cancel to ~0
    # carry the rounding of their larger neighbours.
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * want.abs().max().item(), msg=msg)


# -- one process, fp32 -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [1, 7, N, N + 5])
def test_loss_and_gradients_equal_the_full_logits(strategy, chunk):
    h, w, labels = _inputs()
    kw = dict(z_loss=1e-2, vocab_limit=LIMIT)
    ref, ref_h, ref_w = _loss_and_grads(causal_lm_loss_ref, h, w, labels, **kw)
    out, gh, gw = _loss_and_grads(chunked_causal_lm_loss, h, w, labels, chunk_size=chunk, strategy=strategy, **kw)
    for name in ("loss", "ce", "z"):
        _close(getattr(out, name), getattr(ref, name), 1e-6, name)
    assert out.tokens == ref.tokens == (labels != -100).sum()
    assert ref.z > 0 and not out.ce.requires_grad and not out.z.requires_grad
    _close(gh, ref_h, 1e-6, "grad h")
    _close(gw, ref_w, 1e-6, "grad W")
    assert gh[labels == -100].abs().max() == 0  # ignored tokens: no gradient
    assert gw[LIMIT:].abs().max() == 0  # padded vocabulary rows: no probability, no gradient


@pytest.mark.parametrize("normalizer", [None, 50.0, torch.tensor(61.0)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_normalizer_and_z_loss_off(normalizer, z_loss):
    h, w, labels = _inputs(seed=1)
    kw = dict(z_loss=z_loss, vocab_limit=LIMIT, normalizer=normalizer)
    ref, ref_h, ref_w = _loss_and_grads(causal_lm_loss_ref, h, w, labels, **kw)
    out, gh, gw = _loss_and_grads(chunked_causal_lm_loss, h, w, labels, chunk_size=8, **kw)
    for name in ("loss", "ce", "z"):
        _close(getattr(out, name), getattr(ref, name), 1e-6, name)
    if z_loss == 0:
        assert out.z == 0
    _close(gh, ref_h, 1e-6)
    _close(gw, ref_w, 1e-6)


def test_batched_hidden_states_and_the_whole_vocabulary():
    h, w, labels = _inputs(seed=2, shape=(3, 11))
    ref, ref_h, ref_w = _loss_and_grads(causal_lm_loss_ref, h, w, labels, z_loss=1e-3)
    for strategy in STRATEGIES:
        out, gh, gw = _loss_and_grads(chunked_causal_lm_loss, h, w, labels, z_loss=1e-3, chunk_size=4,
                                      strategy=strategy)
        _close(out.loss, ref.loss, 1e-6)
        assert gh.shape == h.shape
        _close(gh, ref_h, 1e-6)
        _close(gw, ref_w, 1e-6)


def test_every_label_ignored_gives_zero_loss_and_gradients():
    h, w, labels = _inputs(seed=3)
    labels[:] = -100
    ref, _, _ = _loss_and_grads(causal_lm_loss_ref, h, w, labels, z_loss=1e-2, vocab_limit=LIMIT)
    out, gh, gw = _loss_and_grads(chunked_causal_lm_loss, h, w, labels, z_loss=1e-2, vocab_limit=LIMIT)
    assert ref.loss == out.loss == 0 and out.tokens == 0
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_no_grad_forward_equals_the_reference():
    h, w, labels = _inputs(seed=4)
    with torch.no_grad():
        ref = causal_lm_loss_ref(h, w, labels, z_loss=1e-2, vocab_limit=LIMIT)
        for strategy in STRATEGIES:
            out = chunked_causal_lm_loss(h, w, labels, z_loss=1e-2, vocab_limit=LIMIT, chunk_size=5, strategy=strategy)
            _close(out.loss, ref.loss, 1e-6)


def test_frozen_head_gets_no_gradient_and_stored_gradients_serve_one_backward():
    h, w, labels = _inputs(seed=5)
    h = h.requires_grad_()
    out = chunked_causal_lm_loss(h, w, labels, vocab_limit=LIMIT, chunk_size=8)  # w does not require grad
    ref = causal_lm_loss_ref(h, w, labels, vocab_limit=LIMIT)
    gh, = torch.autograd.grad(out.loss, h, retain_graph=True)
    ref_h, = torch.autograd.grad(ref.loss, h)
    _close(gh, ref_h, 1e-6)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        torch.autograd.grad(out.loss, h)
    # recompute keeps nothing it changes: a second backward gives the same gradient
    out = chunked_causal_lm_loss(h, w, labels, vocab_limit=LIMIT, chunk_size=8, strategy="recompute")
    first, = torch.autograd.grad(out.loss * 3.0, h, retain_graph=True)
    second, = torch.autograd.grad(out.loss * 3.0, h)
    assert torch.equal(first, second)
    _close(first, 3.0 * ref_h, 1e-6)


def test_bad_arguments_are_refused():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="strategy"):
        chunked_causal_lm_loss(h, w, labels, strategy="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_causal_lm_loss(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        chunked_causal_lm_loss(h, w, labels[:-1])


# -- bf16 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_autocast_on_cpu_matches_the_autocast_full_logits(strategy):
    h, w, labels = _inputs(seed=6)
    kw = dict(z_loss=1e-2, vocab_limit=LIMIT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_h, ref_w = _loss_and_grads(causal_lm_loss_ref, h, w, labels, **kw)
        out, gh, gw = _loss_and_grads(chunked_causal_lm_loss, h, w, labels, chunk_size=6, strategy=strategy, **kw)
    assert gh.dtype == gw.dtype == torch.float32  # gradients in the leaves' dtype, as autocast gives
    # Both compute the logits as the same bf16 matmul: the loss agrees to fp32 rounding; the gradient
    # matmuls round to bf16 (the reference once, the chunks per chunk into an fp32 sum).
    _close(out.loss, ref.loss, 1e-5)
    _close(gh, ref_h, 1e-2)
    _close(gw, ref_w, 1e-2)
    # and both are near the fp32 value
    fp32 = causal_lm_loss_ref(h, w, labels, **kw).loss
    _close(out.loss, fp32, 2e-2)


def test_bf16_weights_and_hidden_states():
    h, w, labels = _inputs(torch.bfloat16, seed=7)
    kw = dict(z_loss=1e-2, vocab_limit=LIMIT)
    ref, ref_h, ref_w = _loss_and_grads(causal_lm_loss_ref, h, w, labels, **kw)
    out, gh, gw = _loss_and_grads(chunked_causal_lm_loss, h, w, labels, chunk_size=10, **kw)
    assert gh.dtype == gw.dtype == torch.bfloat16
    _close(out.loss, ref.loss, 1e-5)
    _close(gh, ref_h, 2e-2)
    _close(gw, ref_w, 2e-2)


# -- DPO sequence log-probs ---------------------------------------------------------------------------------


def _logps_and_grads(fn, h0, w0, labels, cot, **kw):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    logps, n = fn(h, w, labels, **kw)
    (logps * cot).sum().backward()
    return logps, n, h.grad, w.grad


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_sequence_logps_and_gradients_equal_the_full_logits(average, chunk):
    h, w, labels = _inputs(seed=8, shape=(4, 9))
    labels[:, :3] = -100  # the prompt
    labels[2] = -100  # a row without completion tokens
    cot = torch.tensor([1.0, -2.0, 0.5, 3.0])  # chosen / rejected weights of a DPO loss
    kw = dict(average=average, vocab_limit=LIMIT)
    ref = _logps_and_grads(sequence_logps_ref, h, w, labels, cot, **kw)
    got = _logps_and_grads(chunked_sequence_logps, h, w, labels, cot, chunk_size=chunk, **kw)
    _close(got[0], ref[0], 1e-6, "logps")
    assert torch.equal(got[1], ref[1]) and got[0][2] == 0
    _close(got[2], ref[2], 1e-6, "grad h")
    _close(got[3], ref[3], 1e-6, "grad W")
    assert got[3][LIMIT:].abs().max() == 0


def test_sequence_logps_under_bf16_autocast_and_without_grad():
    h, w, labels = _inputs(seed=9, shape=(2, 12))
    cot = torch.tensor([1.0, -1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _logps_and_grads(sequence_logps_ref, h, w, labels, cot, vocab_limit=LIMIT)
        got = _logps_and_grads(chunked_sequence_logps, h, w, labels, cot, vocab_limit=LIMIT, chunk_size=5)
    _close(got[0], ref[0], 1e-5)
    _close(got[2], ref[2], 1e-2)
    _close(got[3], ref[3], 1e-2)
    with torch.no_grad():  # the DPO reference model's pass
        logps, _ = chunked_sequence_logps(h, w, labels, vocab_limit=LIMIT, chunk_size=5)
    _close(logps, sequence_logps_ref(h, w, labels, vocab_limit=LIMIT)[0], 1e-6)


# -- the head module in the model ---------------------------------------------------------------------------

# Odd but valid (as in test_tensor_parallel.py): a vocabulary padded to 384 with 301 real ids.
ODD = ModelConfig(n_layers=2, dim=48, n_heads=12, n_kv_heads=4, ffn_dim=72, vocab_size=384, max_seq_len=64)
VOCAB_LIMIT = 301


def _tokens():
    return torch.randint(0, VOCAB_LIMIT, (2, 17), generator=torch.Generator().manual_seed(1))


def test_chunked_head_in_the_model_equals_the_logits_path():
    from tanuki.model import build_model

    ref_model, model = build_model(ODD, seed=0), build_model(ODD, seed=0)
    tokens = _tokens()
    ref = causal_lm_loss(ref_model(tokens[:, :-1]), tokens[:, 1:], vocab_limit=VOCAB_LIMIT, z_loss=1e-2)
    ref.loss.backward()
    head = use_chunked_head(model.head, chunk_size=5)
    assert isinstance(model.head, ChunkedLMHead) and head is model.head
    assert sorted(model.state_dict()) == sorted(ref_model.state_dict())
    with torch.no_grad():  # without labels it is the plain head
        torch.testing.assert_close(model(tokens), ref_model(tokens), rtol=0, atol=0)
    out = LossOutput(*model.head(model.hidden_states(tokens[:, :-1]), tokens[:, 1:], vocab_limit=VOCAB_LIMIT,
                                 z_loss=1e-2))
    out.loss.backward()
    _close(out.loss, ref.loss, 1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        _close(p.grad, q.grad, 1e-5, name)
    with pytest.raises(TypeError):
        use_chunked_head(model.layers[0].attn)


# -- tensor (and sequence) parallelism ------------------------------------------------------------------------


def _groups(tp):
    from tanuki.parallel.groups import build_process_groups

    return build_process_groups(tp)


def _head_inputs():
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(2, 8, ODD.dim, generator=gen)
    labels = torch.randint(0, 250, (2, 8), generator=gen)  # below both vocabulary limits used
    labels[0, :3] = -100
    cot = torch.tensor([1.5, -0.5])
    return h, labels, cot


def tp_on_rank(rank, world):
    """Head level (both strategies, two vocabulary limits, DPO log-probs) and model level, SP off and on."""
    from tanuki.model import build_model
    from tanuki.parallel.comm import scatter_to_sequence
    from tanuki.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_slice

    groups = _groups(world)
    h0, labels, cot = _head_inputs()
    tokens = _tokens()
    out = {}
    for sp in (False, True):
        model = apply_tensor_parallel(build_model(ODD, seed=3), groups, sp)
        vp = vocab_parallel_slice(model, groups)
        head = use_chunked_head(model.head, chunk_size=5)
        enter = (lambda x: scatter_to_sequence(x, groups.tp_group)) if sp else (lambda x: x)
        # 250: on 4 ranks the last slice (rows 288..383) is all padding
        for limit in (VOCAB_LIMIT, 250):
            for strategy in STRATEGIES:
                head.strategy = strategy
                head.weight.grad = None
                h = h0.clone().requires_grad_()
                loss = LossOutput(*head(enter(h), labels, z_loss=1e-2, vocab_limit=limit, vocab_parallel=vp))
                loss.loss.backward()
                out[sp, limit, strategy] = (loss.loss.detach(), loss.ce, loss.z, h.grad, head.weight.grad.clone())
        head.weight.grad = None
        h = h0.clone().requires_grad_()
        logps, n = head(enter(h), labels, logps=True, average=True, vocab_limit=VOCAB_LIMIT, vocab_parallel=vp)
        (logps * cot).sum().backward()
        out[sp, "logps"] = (logps.detach(), n, h.grad, head.weight.grad.clone())
        # model level: every parameter's gradient through the chunked head
        model.zero_grad()
        head.strategy = "stored"
        loss = LossOutput(*head(model.hidden_states(tokens[:, :-1]), tokens[:, 1:], vocab_limit=VOCAB_LIMIT,
                                z_loss=1e-2, vocab_parallel=vp))
        loss.loss.backward()
        out[sp, "model"] = (loss.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    return out


def tp_reference():
    from tanuki.model import build_model

    h0, labels, cot = _head_inputs()
    w0 = build_model(ODD, seed=3).head.weight.detach()
    ref = {}
    for limit in (VOCAB_LIMIT, 250):
        out, gh, gw = _loss_and_grads(causal_lm_loss_ref, h0, w0, labels, z_loss=1e-2, vocab_limit=limit)
        ref[limit] = (out.loss.detach(), out.ce, out.z, gh, gw)
    ref["logps"] = _logps_and_grads(sequence_logps_ref, h0, w0, labels, cot, average=True, vocab_limit=VOCAB_LIMIT)
    model = build_model(ODD, seed=3)
    tokens = _tokens()
    loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:], vocab_limit=VOCAB_LIMIT, z_loss=1e-2)
    loss.loss.backward()
    ref["model"] = (loss.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    return ref


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_chunked_loss_equals_one_process_full_logits(tp):
    from tanuki.parallel.tensor_parallel import merge_state_dicts

    ref = tp_reference()
    results = run_ranks(tp_on_rank, tp)
    tol = 1e-5  # the all-gathered log-sum-exp and the split matmuls round differently

    def merged_head(key):
        return torch.cat([r[key][-1] for r in results], dim=0)

    for sp in (False, True):
        for limit in (VOCAB_LIMIT, 250):
            want = ref[limit]
            for strategy in STRATEGIES:
                key = (sp, limit, strategy)
                for r in results:
                    for got, exp, name in zip(r[key][:4], want[:4], ("loss", "ce", "z", "grad h")):
                        _close(got, exp, tol, f"{name} {key}")
                _close(merged_head(key), want[4], tol, f"grad W {key}")
        for r in results:
            _close(r[sp, "logps"][0], ref["logps"][0], tol, "logps")
            assert torch.equal(r[sp, "logps"][1], ref["logps"][1])
            _close(r[sp, "logps"][2], ref["logps"][2], tol, "logps grad h")
        _close(merged_head((sp, "logps")), ref["logps"][3], tol, "logps grad W")
        ref_loss, ref_grads = ref["model"]
        for r in results:
            _close(r[sp, "model"][0], ref_loss, 1e-6, "model loss")
        merged = merge_state_dicts([r[sp, "model"][1] for r in results])
        assert sorted(merged) == sorted(ref_grads)
        for k in ref_grads:
            _close(merged[k], ref_grads[k], tol, f"{k} sp={sp}")


# -- the benchmark script -------------------------------------------------------------------------------------------


def test_benchmark_quick_run(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_memory_bench.py"
    out = tmp_path / "loss_memory.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert "error" not in table
    for method in ("full logits", "transformers", "chunked `stored`", "chunked `recompute`"):
        assert method in table
    assert sum(line.startswith(("| stored |", "| recompute |")) for line in table.splitlines()) == 8
    assert "within 1e-6: **True**" in table
