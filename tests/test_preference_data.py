"""Preference (DPO) data pipeline. Oracles: transformers' ``apply_chat_template`` for the rendered text and
the ids; decoding the label tokens gives exactly the assistant content + one EOS; sequence log-probs
from a padded micro-batch equal those of each sequence run alone; a tokenizer that merges across the
prompt/completion boundary; the single-rank stream for the loader; ``sft_eval.jsonl`` for the held-out
sample data."""

import json
import runpy

import numpy as np
import pytest
import torch
from conftest import REPO

from tanuki.config import ConfigError, ModelConfig, from_dict
from tanuki.data.preference import (
    COMPLETIONS,
    PREFERENCE_BATCH_KEYS,
    PreferenceDataConfig,
    PreferenceDataError,
    PreferenceDataLoader,
    PreferenceDataset,
    PreferencePair,
    PreferenceStats,
    TokenizedPair,
    build_preference_datasets,
    collate_pairs,
    load_tokenized_pairs,
    read_preference_pairs,
    render_pair,
    split_pairs,
    tokenize_pairs,
    truncate_pairs,
)
from tanuki.data.records import read_eval_prompts
from tanuki.losses import IGNORE_INDEX
from tanuki.model import build_model
from tanuki.tokenizer import load, sample_data_path
from tanuki.tokenizer.templates import TEMPLATES

USER = {"role": "user", "content": "日本の首都は？"}
PAIRS = [
    PreferencePair((USER,), "東京です。", "大阪です。", "t:1"),
    # multi-turn with a system prompt; a completion starting with a byte-fallback character, one with
    # a leading space and newlines inside
    PreferencePair(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "りんごが3個あります。5個もらうと？"},
                    {"role": "assistant", "content": "8個です。"}, {"role": "user", "content": "絵文字で答えて。"}),
                   "😀🦝 はい。", " Eight  apples.\nThat is all.", "t:2"),
    PreferencePair(({"role": "user", "content": "Say hi."},), "Hi!", "Hi!!", "t:3"),
]


@pytest.fixture(scope="module")
def tok(tiny_corpus):
    return load(tiny_corpus["tokenizer"])


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------------------------------
# Rendering, ids and labels
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_and_ids_equal_apply_chat_template(tok, name):
    jinja = TEMPLATES[name].jinja
    samples = tokenize_pairs(PAIRS, tok, name)
    assert len(samples) == len(PAIRS)
    for pair, s in zip(PAIRS, samples):
        prompt = list(pair.prompt)
        r = render_pair(pair, name, bos_token=tok.bos_token, eos_token=tok.eos_token)
        assert r.prompt == tok.apply_chat_template(prompt, chat_template=jinja, add_generation_prompt=True, tokenize=False)
        assert s.prompt_ids.tolist() == _ids(tok.apply_chat_template(prompt, chat_template=jinja,
                                                                    add_generation_prompt=True, tokenize=True))
        for which, content in zip(COMPLETIONS, (pair.chosen, pair.rejected)):
            full = prompt + [{"role": "assistant", "content": content}]
            assert r.prompt + getattr(r, which) == tok.apply_chat_template(full, chat_template=jinja, tokenize=False)
            assert getattr(r, which) == content + tok.eos_token
            ids = s.completion_ids(which)
            assert s.prompt_ids.tolist() + ids.tolist() == _ids(tok.apply_chat_template(full, chat_template=jinja,
                                                                                         tokenize=True))
            # the labels are the completion: content + exactly one EOS (decoded after the prompt, since a
            # sentencepiece decoder drops the space of a leading "▁" at the start of what it decodes)
            tokens, labels = s.row(which)
            assert len(tokens) == len(labels) == s.length(which)
            prompt_text = tok.decode(s.prompt_ids)
            decoded = tok.decode(np.concatenate([s.prompt_ids, labels[labels != IGNORE_INDEX]]))
            assert decoded.startswith(prompt_text) and decoded[len(prompt_text):] == content + tok.eos_token
            assert (labels != IGNORE_INDEX).sum() == len(ids) and (ids == tok.eos_token_id).sum() == 1
            assert ids[-1] == tok.eos_token_id


def test_row_labels_are_the_next_completion_token(tok):
    (s,) = tokenize_pairs(PAIRS[:1], tok, "alpaca_ja")
    P = len(s.prompt_ids)
    ids = np.concatenate([s.prompt_ids, s.chosen_ids]).astype(np.int64)
    tokens, labels = s.row("chosen")
    np.testing.assert_array_equal(tokens, ids[:-1])
    # labels[t] is the target after position t: the first label is at the prompt's last position
    assert (labels[: P - 1] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(labels[P - 1 :], ids[P:])


def test_sequence_logps_of_a_padded_batch_equal_each_sequence_alone(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=1280, max_seq_len=128,
                      kernels="torch")
    model = build_model(cfg, seed=0).eval()
    samples = tokenize_pairs(PAIRS, tok, "alpaca_ja")
    batch = collate_pairs(samples, [0, 1, 2], pad_id=tok.pad_token_id)
    with torch.no_grad():
        logps = torch.log_softmax(model(batch["tokens"], positions=batch["positions"]).float(), -1)
        mask = batch["labels"] != IGNORE_INDEX
        picked = logps.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
        batched = (picked * mask).sum(-1)
        for row, (which, s) in enumerate((w, s) for w in COMPLETIONS for s in samples):
            # the oracle: sum of log p(ids[j] | ids[:j]) over the completion, the sequence run alone
            ids = torch.from_numpy(np.concatenate([s.prompt_ids, s.completion_ids(which)]).astype(np.int64))
            alone = torch.log_softmax(model(ids[None]).float(), -1)[0]
            P = len(s.prompt_ids)
            expected = sum(alone[j - 1, ids[j]] for j in range(P, len(ids)))
            torch.testing.assert_close(batched[row], expected, rtol=1e-5, atol=1e-5)


def test_special_token_text_is_rejected_or_skipped(tok):
    bad = PreferencePair((USER,), "東京です。</s>", "大阪です。", "f.jsonl:4")
    with pytest.raises(PreferenceDataError, match=r"^f\.jsonl:4: .*chosen text contains the special token text '</s>'"):
        tokenize_pairs([bad], tok, "alpaca_ja")
    stats = PreferenceStats()
    assert len(tokenize_pairs([bad, PAIRS[0]], tok, "alpaca_ja", on_error="skip", stats=stats)) == 1
    assert stats.skipped == {"special_token_text": 1}


def _merging_tokenizer():
    """A character-level BPE tokenizer with one merge, "\\n" + "東": it joins the generation prompt's
    last newline and a completion starting with 東 into one token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("以下はタスクを説明する指示です。要求を適切に満たす応答を書きなさい#: \n日本の首都は？東京大阪x"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    vocab["\n東"] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "東")], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_prompt_that_is_not_a_token_prefix_names_file_and_line(tmp_path):
    merging = _merging_tokenizer()
    path = _write(tmp_path / "p.jsonl", [{"prompt": "日本の首都は？", "chosen": "大阪です。", "rejected": "京です。"},
                                         {"prompt": "日本の首都は？", "chosen": "東京です。", "rejected": "大阪です。"}])
    pairs = read_preference_pairs(path)
    # the merge really happens: the full sequence is not the prompt's ids + anything
    prompt = _ids(merging.apply_chat_template(list(pairs[1].prompt), chat_template=TEMPLATES["alpaca_ja"].jinja,
                                              add_generation_prompt=True))
    full = _ids(merging.apply_chat_template([*pairs[1].prompt, {"role": "assistant", "content": "東京です。"}],
                                            chat_template=TEMPLATES["alpaca_ja"].jinja))
    assert full[: len(prompt)] != prompt
    assert len(tokenize_pairs(pairs[:1], merging, "alpaca_ja")) == 1
    with pytest.raises(PreferenceDataError, match=rf"^{path}:2: the prompt's tokens are not a prefix of the chosen") as e:
        tokenize_pairs(pairs, merging, "alpaca_ja")
    assert e.value.reason == "not_prefix"
    stats = PreferenceStats()
    assert [s.source for s in tokenize_pairs(pairs, merging, "alpaca_ja", on_error="skip", stats=stats)] == [f"{path}:1"]
    assert stats.skipped == {"not_prefix": 1}


# --------------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------------

GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}
BAD_LINES = [
    ({"chosen": "a", "rejected": "b"}, "missing_field", "needs 'prompt'"),
    ({"prompt": "q", "rejected": "b"}, "missing_field", "needs 'chosen'"),
    ({"prompt": "q", "chosen": "a"}, "missing_field", "needs 'rejected'"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
     "bad_prompt", "must end with a user turn, not a assistant turn"),
    ({"prompt": [{"role": "tool", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown_role", "prompt: .*unknown role 'tool'"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "bad_record", "prompt: 'messages' must be a non-empty list"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "bad_record", "'prompt' must be a string or a messages list"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty_content", "empty content"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_content", "'chosen' is empty"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "bad_record", "'chosen' must be an assistant message"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}] * 2}, "bad_record", "exactly one"),
    ({"prompt": "q", "chosen": "a", "rejected": 5}, "bad_record", "'rejected' must be a string or an assistant message"),
    ({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "system": "s", "chosen": "a",
      "rejected": "b"}, "bad_record", "either as 'system' or in 'prompt'"),
    ('{"prompt": ', "invalid_json", "invalid JSON"),
    ([1, 2], "bad_record", "expected a JSON object"),
]


@pytest.mark.parametrize("record,reason,message", BAD_LINES)
def test_bad_records_name_file_and_line(tmp_path, record, reason, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD, "", record])  # the bad record is on line 3
    with pytest.raises(PreferenceDataError, match=rf"^{path}:3: .*{message}") as e:
        read_preference_pairs(path)
    assert e.value.reason == reason and e.value.source == f"{path}:3"


def test_bad_records_skipped_with_counts(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [GOOD] + [r for r, _, _ in BAD_LINES] + [GOOD])
    stats = PreferenceStats()
    pairs = read_preference_pairs(path, on_error="skip", stats=stats)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:{len(BAD_LINES) + 2}"]
    expected = {}
    for _, reason, _ in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert stats.skipped == expected and stats.records == len(BAD_LINES) + 2 and stats.pairs == 2
    assert "skipped" in stats.summary()


def test_accepted_shapes(tmp_path):
    path = _write(tmp_path / "ok.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b", "id": 7},  # extra fields are ignored
        {"system": "s", "prompt": "q", "chosen": {"role": "assistant", "content": "a"},
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
    ])
    a, b, c = read_preference_pairs(path)
    assert a.prompt == ({"role": "user", "content": "q"},) and (a.chosen, a.rejected) == ("a", "b")
    assert b.prompt == c.prompt == ({"role": "system", "content": "s"}, {"role": "user", "content": "q"})
    assert (b.chosen, b.rejected) == ("a", "b")


def test_identical_chosen_and_rejected_are_counted_skipped_or_fail(tmp_path):
    path = _write(tmp_path / "same.jsonl", [GOOD, {"prompt": "q", "chosen": "same", "rejected": "same"}, GOOD])
    stats = PreferenceStats()
    assert len(read_preference_pairs(path, stats=stats)) == 2
    assert stats.identical == 1 and stats.pairs == 2 and "1 identical" in stats.summary()
    with pytest.raises(PreferenceDataError, match=rf"^{path}:2: chosen and rejected are identical") as e:
        read_preference_pairs(path, identical="fail")
    assert e.value.reason == "identical"
    # "fail" stops even when bad records are skipped
    with pytest.raises(PreferenceDataError, match="identical"):
        read_preference_pairs(path, identical="fail", on_error="skip")


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def _pair(prompt, chosen, rejected, source=""):
    return TokenizedPair(*(np.asarray(x, dtype=np.int32) for x in (prompt, chosen, rejected)), source)


def test_truncation_keeps_the_prompt_tail_and_the_completion_head_with_counts():
    BOS = 1
    samples = [
        _pair([1, 10, 11, 12, 13, 14, 15], [20, 21, 2], [30, 2], "long prompt"),       # 7 prompt ids
        _pair([1, 10, 11], [20, 21, 22, 23, 24, 25, 26, 2], [30, 2], "long chosen"),
        _pair([1, 10], [40, 41, 42, 43, 44, 45, 46, 47, 2], [40, 41, 42, 43, 44, 45, 46, 48, 2], "same head"),
        _pair([10, 11, 12, 13, 14, 15], [20, 2], [30, 2], "no bos"),
        _pair([1, 10], [20, 2], [30, 2], "short"),
    ]
    stats = PreferenceStats()
    kept = {s.source: s for s in truncate_pairs(samples, max_length=8, max_prompt_length=4, bos_id=BOS, stats=stats)}
    assert list(kept) == ["long prompt", "long chosen", "no bos", "short"]
    assert kept["long prompt"].prompt_ids.tolist() == [1, 13, 14, 15]             # BOS + the last 3
    assert kept["long prompt"].chosen_ids.tolist() == [20, 21, 2]
    assert kept["long chosen"].chosen_ids.tolist() == [20, 21, 22, 23, 24]        # 8 - 3 prompt ids
    assert kept["long chosen"].rejected_ids.tolist() == [30, 2]
    assert kept["no bos"].prompt_ids.tolist() == [12, 13, 14, 15]
    assert kept["short"] == samples[4]
    assert (stats.prompt_truncated, stats.chosen_truncated, stats.rejected_truncated) == (2, 2, 1)
    assert stats.identical_after_truncation == 1 and stats.samples == 4
    assert stats.chosen_tokens == 3 + 5 + 2 + 2 and stats.rejected_tokens == 2 * 4
    assert stats.tokens == sum(s.length(w) for s in kept.values() for w in COMPLETIONS)
    assert all(len(s.prompt_ids) + len(s.completion_ids(w)) <= 8 for s in kept.values() for w in COMPLETIONS)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        truncate_pairs(samples, 4, 4)


def test_truncation_of_real_pairs(tok):
    full = tokenize_pairs(PAIRS[1:2], tok, "alpaca_ja")[0]
    P = len(full.prompt_ids)
    stats = PreferenceStats()
    (s,) = load_tokenized_pairs(PAIRS[1:2], tok, "alpaca_ja", max_length=P + 2, max_prompt_length=P - 5, stats=stats)
    assert s.prompt_ids.tolist() == [tok.bos_token_id] + full.prompt_ids[-(P - 6):].tolist()
    room = P + 2 - (P - 5)
    for which in COMPLETIONS:
        assert s.completion_ids(which).tolist() == full.completion_ids(which)[:room].tolist()
    assert (stats.prompt_truncated, stats.chosen_truncated, stats.rejected_truncated) == (1, 1, 1)
    assert "truncated: 1 prompts, 1 chosen, 1 rejected" in stats.summary()


# --------------------------------------------------------------------------------------------------
# Dataset and loader
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_pairs(tok):
    pairs = read_preference_pairs(sample_data_path("dpo.jsonl"))
    return load_tokenized_pairs(pairs[:96], tok, "alpaca_ja", max_length=129, max_prompt_length=64)


def _stream(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def _unpadded(batch, row):
    n = int((batch["positions"][row] > 0).sum()) + 1
    return batch["tokens"][row, :n], batch["labels"][row, :n]


def test_batches_put_chosen_rows_first_with_the_pair_index(bundled_pairs):
    ds = PreferenceDataset(bundled_pairs, seed=3)
    B = 4
    for b in _stream(PreferenceDataLoader(ds, micro_batch_size=B))[:5]:
        assert set(b) == set(PREFERENCE_BATCH_KEYS) and all(v.dtype == torch.int64 for v in b.values())
        T = b["tokens"].shape[1]
        assert b["tokens"].shape == b["labels"].shape == b["positions"].shape == (2 * B, T)
        assert b["pair_index"].shape == b["pair_mask"].shape == (B,) and (b["pair_mask"] == 1).all()
        longest = 0
        for i, j in enumerate(b["pair_index"].tolist()):
            for half, which in enumerate(COMPLETIONS):
                tokens, labels = bundled_pairs[j].row(which)
                row = half * B + i
                n = len(tokens)
                longest = max(longest, n)
                assert b["tokens"][row, :n].tolist() == tokens.tolist()
                assert b["labels"][row, :n].tolist() == labels.tolist()
                assert b["positions"][row, :n].tolist() == list(range(n))
                assert (b["labels"][row, n:] == IGNORE_INDEX).all() and (b["positions"][row, n:] == 0).all()
                assert (b["tokens"][row, n:] == ds.pad_id).all()
        assert T == longest  # padded to the longest row of the micro-batch
    fixed = next(iter(PreferenceDataLoader(ds, micro_batch_size=B, pad_to_max=True)))
    assert fixed["tokens"].shape == (2 * B, 128) == (2 * B, ds.seq_len)


def test_epochs_are_seeded_shuffles_and_min_pairs(bundled_pairs):
    n = len(bundled_pairs)
    ds = PreferenceDataset(bundled_pairs, seed=3, min_pairs=2 * n + 1)
    assert ds.num_epochs == 3 and len(ds) == 3 * n
    epochs = [[ds.pair_index(i) for i in range(e * n, (e + 1) * n)] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1]
    again = PreferenceDataset(bundled_pairs, seed=3, num_epochs=3)
    assert [again.pair_index(i) for i in range(len(again))] == sum(epochs, [])
    assert [PreferenceDataset(bundled_pairs, seed=4).pair_index(i) for i in range(n)] != epochs[0]
    assert [ds.in_order().pair_index(i) for i in range(n)] == list(range(n))


def test_loader_resume_and_data_parallel_slices(bundled_pairs):
    ds = PreferenceDataset(bundled_pairs, seed=3, num_epochs=2)
    full = _stream(PreferenceDataLoader(ds, micro_batch_size=4))
    assert len(full) == len(ds) // 4

    loader = PreferenceDataLoader(ds, micro_batch_size=4)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    assert state == {"consumed_samples": 20}
    resumed = PreferenceDataLoader(ds, micro_batch_size=4)
    resumed.load_state_dict(state)
    rest = _stream(resumed)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:]):
        for k in PREFERENCE_BATCH_KEYS:
            assert torch.equal(a[k], b[k])

    # two ranks of 2 pairs see the pairs of the single-rank stream, sliced; each rank has its own padding
    ranks = [_stream(PreferenceDataLoader(ds, micro_batch_size=2, dp_rank=r, dp_size=2)) for r in range(2)]
    for step, b in enumerate(full):
        assert torch.cat([ranks[0][step]["pair_index"], ranks[1][step]["pair_index"]]).tolist() == b["pair_index"].tolist()
        for i in range(4):
            rank, k = divmod(i, 2)
            for half in range(2):
                got = _unpadded(ranks[rank][step], half * 2 + k)
                want = _unpadded(b, half * 4 + i)
                assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_last_partial_step_is_filled_and_masked_without_drop_last(bundled_pairs):
    ds = PreferenceDataset(bundled_pairs[:10], shuffle=False)
    assert len(PreferenceDataLoader(ds, micro_batch_size=2, dp_size=2)) == 2
    ranks = [_stream(PreferenceDataLoader(ds, micro_batch_size=2, dp_rank=r, dp_size=2, drop_last=False)) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]  # the same number of forwards on every rank
    index = torch.stack([torch.cat([ranks[0][s]["pair_index"], ranks[1][s]["pair_index"]]) for s in range(3)]).flatten()
    mask = torch.stack([torch.cat([ranks[0][s]["pair_mask"], ranks[1][s]["pair_mask"]]) for s in range(3)]).flatten()
    assert index.tolist() == list(range(10)) + [0, 1] and mask.tolist() == [1] * 10 + [0, 0]


# --------------------------------------------------------------------------------------------------
# Config and the whole pipeline
# --------------------------------------------------------------------------------------------------


def test_config_from_dict_and_lengths():
    cfg = from_dict(PreferenceDataConfig, {"path": "a.jsonl,b.jsonl", "valid_fraction": 0.1}, prefix="data")
    assert cfg.paths == ["a.jsonl", "b.jsonl"] and cfg.identical == "skip" and cfg.on_error == "fail"
    assert cfg.lengths(512) == (256, 513)
    assert PreferenceDataConfig(max_length=300, max_prompt_length=200).lengths(512) == (200, 300)
    with pytest.raises(ConfigError, match="data.max_length.*more than train.seq_len=512"):
        PreferenceDataConfig(max_length=600).lengths(512)
    with pytest.raises(ConfigError, match="data.max_prompt_length.*leaves no completion"):
        PreferenceDataConfig(max_prompt_length=600).lengths(512)
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        from_dict(PreferenceDataConfig, {"max_length": 100, "max_prompt_length": 100}, prefix="data")
    with pytest.raises(ConfigError, match="data.identical"):
        from_dict(PreferenceDataConfig, {"identical": "keep"}, prefix="data")
    with pytest.raises(ConfigError, match="data.valid_path.*not both"):
        from_dict(PreferenceDataConfig, {"path": "a", "valid_path": "b", "valid_fraction": 0.1}, prefix="data")


@pytest.mark.parametrize("name", ["alpaca_ja", "tulu"])
def test_build_on_the_bundled_data(tok, name):
    cfg = PreferenceDataConfig(path=str(sample_data_path("dpo.jsonl")), valid_path=str(sample_data_path("dpo_eval.jsonl")),
                               max_prompt_length=320)
    data = build_preference_datasets(cfg, tok, name, 384, min_pairs=1500)
    stats = data.train_stats
    assert stats.records == stats.pairs == stats.samples == 1000 and not stats.skipped and stats.identical == 0
    assert stats.prompt_truncated == stats.chosen_truncated == stats.rejected_truncated == 0
    assert data.train.num_epochs == 2 and len(data.train) == 2000
    assert data.valid is not None and len(data.valid) == data.valid_stats.samples == 124
    assert (data.max_prompt_length, data.max_length) == (320, 385) and data.train.seq_len == 384
    assert "train:" in data.summary() and "valid:" in data.summary()
    # the defaults for 256 positions: prompts of at most 128 tokens (this tiny tokenizer needs more for some)
    split = build_preference_datasets(PreferenceDataConfig(path=cfg.path, valid_fraction=0.1), tok, name, 256)
    assert (split.train_stats.pairs, split.valid_stats.pairs) == (900, 100) and len(split.valid) == 100
    assert (split.max_prompt_length, split.max_length) == (128, 257)
    assert split.train_stats.prompt_truncated > 0 and split.train_stats.samples == 900
    assert all(len(p.prompt_ids) <= 128 and p.length(w) <= 256 for p in split.train.pairs for w in COMPLETIONS)


def test_split_is_seeded_and_disjoint():
    pairs = [PreferencePair((USER,), f"a{i}", "b", f"s{i}") for i in range(50)]
    train, valid = split_pairs(pairs, 0.2, seed=0)
    assert len(valid) == 10 and {p.source for p in train}.isdisjoint(p.source for p in valid)
    assert split_pairs(pairs, 0.2, seed=0)[1] == valid and split_pairs(pairs, 0.2, seed=1)[1] != valid


# --------------------------------------------------------------------------------------------------
# The bundled sample data
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_dpo():
    return runpy.run_path(str(REPO / "scripts" / "sample_data" / "make_dpo.py"))


def test_make_dpo_is_deterministic_and_matches_the_bundled_files(tmp_path, make_dpo):
    train, evals = make_dpo["generate"]()
    make_dpo["write_jsonl"](tmp_path / "dpo.jsonl", train)
    make_dpo["write_jsonl"](tmp_path / "dpo_eval.jsonl", evals)
    for name in ("dpo.jsonl", "dpo_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == sample_data_path(name).read_bytes(), name
    assert sum(sample_data_path(n).stat().st_size for n in ("dpo.jsonl", "dpo_eval.jsonl")) < 1_000_000
    assert make_dpo["generate"](50, seed=1)[0] != train[:50]


def _last_user(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _content(completion):
    if isinstance(completion, list):
        (completion,) = completion
    return completion if isinstance(completion, str) else completion["content"]


def test_bundled_pairs_hold_out_the_sft_eval_prompts(make_dpo):
    train = [json.loads(line) for line in sample_data_path("dpo.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [json.loads(line) for line in sample_data_path("dpo_eval.jsonl").read_text(encoding="utf-8").splitlines()]
    sft_eval = read_eval_prompts(sample_data_path("sft_eval.jsonl"))
    assert len(train) == 1000 and len({json.dumps(r, ensure_ascii=False) for r in train}) == 1000
    assert all(_content(r["chosen"]) != _content(r["rejected"]) for r in train + evals)
    # Japanese and English, task and style pairs, every kind of rejection
    assert {r["task"] for r in train} >= {p.task for p in sft_eval} | {"general", "rewrite"}
    assert {r["kind"] for r in train} == set(make_dpo["TASK_KINDS"]) | set(make_dpo["STYLE_KINDS"])
    # one eval pair per sft_eval prompt: the same messages, chosen = the exact answer
    for p, r in zip(sft_eval, evals):
        assert r["prompt"] == list(p.messages) and r["chosen"] == p.answer != r["rejected"] and r["task"] == p.task
    # no training question is an eval question, and no fact of an eval answer is a training distractor
    eval_questions = {p.messages[-1]["content"] for p in sft_eval} | {_last_user(r["prompt"]) for r in evals}
    facts = {p.answer for p in sft_eval if p.task in ("capital_ja", "capital_en", "prefecture_ja", "translate_ja",
                                                         "translate_en")}
    for r in train:
        assert _last_user(r["prompt"]) not in eval_questions, r
        assert _content(r["rejected"]) not in facts, r
    # the rules hold: spot-check reversed words and sums
    for r in train:
        question, chosen = _last_user(r["prompt"]), _content(r["chosen"])
        if r["task"] in ("reverse_en", "reverse_ja"):
            assert chosen == question.rsplit("\n", 1)[-1][::-1]
        if r["task"] == "add_en":
            a, b = [int(w) for w in question.replace("?", " ").split() if w.isdigit()]
            assert chosen.startswith(f"{a + b} ")
