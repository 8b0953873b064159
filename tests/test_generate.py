"""Generation against transformers' ``generate`` on the same exported weights, and sampling formulas."""

import pytest
import torch
from transformers import LlamaForCausalLM

from tanuki.config import ModelConfig
from tanuki.generate import generate, sample_next
from tanuki.hf import export_hf
from tanuki.model import build_model

CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=200, max_seq_len=96)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = build_model(CFG, seed=11).eval()
    # Sharpen the output head so greedy decoding is far from ties (float noise cannot flip a choice).
    with torch.no_grad():
        model.head.weight.mul_(20)
    out = export_hf(model.state_dict(), CFG, tmp_path_factory.mktemp("g") / "hf", dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, hf


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_greedy_matches_transformers_generate(pair, prompt_len):
    model, hf = pair
    torch.manual_seed(prompt_len)
    prompt = torch.randint(0, CFG.vocab_size, (1, prompt_len))
    ours = generate(model, prompt[0].tolist(), max_new_tokens=40)
    theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()
    assert ours == theirs


def test_generation_stops_at_eos_and_streams(pair):
    model, _ = pair
    prompt = [5, 6, 7]
    free = generate(model, prompt, max_new_tokens=30)
    eos = free[4]
    streamed = []
    stopped = generate(model, prompt, max_new_tokens=30, eos_token_id=eos, on_token=streamed.append)
    assert stopped == free[: free.index(eos) + 1]
    assert streamed == stopped


def test_context_length_bounds_generation(pair):
    model, _ = pair
    out = generate(model, list(range(90)), max_new_tokens=50)
    assert len(out) == CFG.max_seq_len - 90


def test_vocab_limit_is_respected(pair):
    model, _ = pair
    out = generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.5, vocab_limit=50, seed=0)
    assert out and max(out) < 50


def test_sampling_is_reproducible_with_a_seed(pair):
    model, _ = pair
    a = generate(model, [3, 4], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, [3, 4], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)
    assert a == b


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    # top_p=0.7: 0.5 < 0.7, 0.5 + 0.25 >= 0.7 -> tokens {0, 1}
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)) for _ in range(300)}
    assert seen == {0, 1}
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.01, generator=gen)) for _ in range(50)}
    assert seen == {0}  # the most likely token is always kept


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.bincount(
        torch.stack([sample_next(logits, temperature=2.0, generator=gen) for _ in range(n)]).flatten(), minlength=3
    )
    expected = torch.softmax(logits[0] / 2.0, dim=-1)
    torch.testing.assert_close(counts.float() / n, expected, atol=0.03, rtol=0)
    assert int(sample_next(logits, temperature=0.0)) == 0
