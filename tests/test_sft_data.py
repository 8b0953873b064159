"""SFT data pipeline. Oracles: ``apply_chat_template(tokenize=True)`` for the ids; decoding the
target tokens gives exactly the assistant contents + EOS; a packed row's loss and gradients equal
those of its samples run one by one; a naive first-fit; the single-process stream for the loader."""

import json
import runpy

import numpy as np
import pytest
import torch
from conftest import REPO

from tanuki.config import ConfigError, ModelConfig, from_dict
from tanuki.data.records import Conversation, SFTDataError, exact_match, read_eval_prompts, split_conversations
from tanuki.data.sft import (
    BATCH_KEYS,
    SFTDataConfig,
    SFTDataLoader,
    SFTDataset,
    SFTSample,
    SFTStats,
    build_sft_datasets,
    count_loss_tokens,
    first_fit,
    fit_to_length,
    make_row,
    pack,
    pack_plan,
    read_conversations,
    tokenize_conversations,
)
from tanuki.losses import IGNORE_INDEX, causal_lm_loss
from tanuki.model import build_model
from tanuki.tokenizer import load, sample_data_path
from tanuki.tokenizer.templates import TEMPLATES

TRICKY = [
    # a content starting with a byte-fallback character right after the header's newline
    [{"role": "user", "content": "絵文字で答えて。"}, {"role": "assistant", "content": "😀🦝 はい。"}],
    # multi-turn with a system message, spaces, newlines and Latin text inside contents
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "りんごが3個あります。5個もらうと何個になりますか。"},
     {"role": "assistant", "content": "8個です。"}, {"role": "user", "content": "And in English?"},
     {"role": "assistant", "content": "Eight  apples.\nThat is all."}],
    # a trailing user turn (not trained on)
    [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは！"}, {"role": "user", "content": "じゃあね"}],
]


@pytest.fixture(scope="module")
def tok(tiny_corpus):
    return load(tiny_corpus["tokenizer"])


@pytest.fixture(scope="module")
def bundled():
    return read_conversations(sample_data_path("sft.jsonl"))


def _assistant_text(messages, eos):
    return "".join(m["content"] + eos for m in messages if m["role"] == "assistant")


# --------------------------------------------------------------------------------------------------
# Tokenization and masks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_ids_equal_apply_chat_template_and_targets_decode_to_assistant_text(tok, name):
    convs = [Conversation(tuple(m), f"tricky:{i}") for i, m in enumerate(TRICKY)]
    stats = SFTStats()
    samples = tokenize_conversations(convs, tok, name, stats=stats)
    for conv, s in zip(convs, samples):
        expected = tok.apply_chat_template(list(conv.messages), chat_template=TEMPLATES[name].jinja, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert s.input_ids.tolist() == list(expected)
        assert tok.decode(s.input_ids[s.target]) == _assistant_text(conv.messages, tok.eos_token)
        # BOS and every EOS are the special ids, not the characters '<', '/', 's', '>'
        assert (s.input_ids == tok.eos_token_id).sum() == sum(m["role"] == "assistant" for m in conv.messages)
        if TEMPLATES[name].writes_bos:
            assert s.input_ids[0] == tok.bos_token_id and (s.input_ids == tok.bos_token_id).sum() == 1
    assert stats.boundary_tokens == 0


@pytest.mark.parametrize("name", ["alpaca_ja", "tulu"])
def test_bundled_data_masks_decode_exactly(tok, bundled, name):
    samples = tokenize_conversations(bundled, tok, name)
    assert len(samples) == len(bundled) == 2000
    for conv, s in zip(bundled, samples):
        assert tok.decode(s.input_ids[s.target]) == _assistant_text(conv.messages, tok.eos_token), conv.source


def test_row_labels_are_the_next_target_token(tok):
    (s,) = tokenize_conversations([Conversation(tuple(TRICKY[1]))], tok, "alpaca_ja")
    tokens, labels = s.row()
    assert len(tokens) == len(labels) == s.length == len(s.input_ids) - 1
    np.testing.assert_array_equal(tokens, s.input_ids[:-1])
    np.testing.assert_array_equal(labels, np.where(s.target[1:], s.input_ids[1:], IGNORE_INDEX))
    assert tok.decode(labels[labels != IGNORE_INDEX]) == _assistant_text(TRICKY[1], tok.eos_token)
    assert s.loss_tokens == int((labels != IGNORE_INDEX).sum())


def test_special_token_text_in_content_is_rejected_or_skipped(tok):
    bad = Conversation(({"role": "user", "content": "x"}, {"role": "assistant", "content": "a</s>b"}), "f.jsonl:7")
    good = Conversation(tuple(TRICKY[0]), "f.jsonl:8")
    with pytest.raises(SFTDataError, match=r"^f\.jsonl:7: .*special token text '</s>'"):
        tokenize_conversations([bad], tok, "alpaca_ja")
    stats = SFTStats()
    assert len(tokenize_conversations([bad, good], tok, "alpaca_ja", on_error="skip", stats=stats)) == 1
    assert stats.skipped == {"special_token_text": 1}


# --------------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------------

BAD_LINES = [
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}), None),
    (json.dumps({"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]}), ("unknown_role", "unknown role 'tool'")),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), ("no_assistant", "no assistant turn")),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}), ("empty_content", "empty content")),
    ('{"messages": [', ("invalid_json", "invalid JSON")),
    (json.dumps({"instruction": "q", "output": ""}), ("empty_content", "'output' is empty")),
    (json.dumps({"instruction": "q"}), ("no_assistant", "needs 'output'")),
    (json.dumps({"prompt": "q"}), ("bad_record", "needs 'messages' or 'instruction' and 'output'")),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "a"}]}), ("system_not_first", "must come first")),
    (json.dumps([1, 2]), ("bad_record", "expected a JSON object")),
    # role order: these trained silently before
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                              {"role": "assistant", "content": "a"}]}), ("role_order", r"messages\[1\]: two user turns")),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     ("role_order", "first turn must be a user turn")),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]}),
     ("role_order", r"messages\[3\]: the conversation ends with a user turn")),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                              {"role": "assistant", "content": "a2"}]}), None),
    (json.dumps({"instruction": "q", "input": "", "output": "a"}), None),
]


def test_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    for i, (line, expected) in enumerate(BAD_LINES):
        if expected is None:
            continue
        path.write_text(BAD_LINES[0][0] + "\n\n" + line + "\n", encoding="utf-8")  # the bad record is on line 3
        with pytest.raises(SFTDataError, match=rf"^{path}:3: .*{expected[1]}") as e:
            read_conversations(str(path))
        assert e.value.reason == expected[0] and e.value.source == f"{path}:3"


def test_bad_records_skipped_with_counts(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n", encoding="utf-8")
    stats = SFTStats()
    convs = read_conversations(str(path), on_error="skip", stats=stats)
    assert [c.source for c in convs] == [f"{path}:{i + 1}" for i, (_, bad) in enumerate(BAD_LINES) if bad is None]
    expected = {}
    for _, bad in BAD_LINES:
        if bad:
            expected[bad[0]] = expected.get(bad[0], 0) + 1
    assert stats.skipped == expected and stats.records == len(BAD_LINES) and stats.conversations == 3
    assert "skipped" in stats.summary()


def test_alpaca_records_become_messages(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"instruction": "訳して", "output": "cat"}, {"instruction": "訳して", "input": "猫", "output": "cat"},
            {"instruction": "訳して", "input": "   ", "output": "cat"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    a, b, c = read_conversations(str(path))
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant"]
    assert a.messages[1]["content"] == "訳して" and a.messages[2]["content"] == "cat"
    assert "文脈のある入力" in b.messages[0]["content"] and b.messages[1]["content"] == "訳して\n\n### 入力:\n猫"
    assert c.messages == a.messages  # a blank input is no input


def test_paths_globs_and_missing_files(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(BAD_LINES[0][0] + "\n", encoding="utf-8")
    assert len(read_conversations(f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl")) == 2
    assert len(read_conversations(str(tmp_path / "*.jsonl"))) == 2
    with pytest.raises(ConfigError, match="data.path.*is not a file"):
        read_conversations(str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------------------------------
# Truncation and the validation split
# --------------------------------------------------------------------------------------------------


def _sample(n_prompt: int, n_answer: int, start_id: int = 10) -> SFTSample:
    ids = np.arange(start_id, start_id + n_prompt + n_answer, dtype=np.int32)
    target = np.zeros(len(ids), dtype=bool)
    target[n_prompt:] = True
    return SFTSample(ids, target, f"s{n_prompt}-{n_answer}")


def test_truncation_policies_are_counted():
    samples = [_sample(5, 5), _sample(6, 10), _sample(20, 5), _sample(3, 1)]  # lengths 9, 15, 24, 3; seq_len 10
    stats = SFTStats()
    kept = fit_to_length(samples, 10, "truncate", stats)
    # 6+10: truncated to 11 ids, 5 targets left; 20+5: only prompt left -> dropped
    assert [s.source for s in kept] == ["s5-5", "s6-10", "s3-1"]
    assert kept[1].length == 10 and kept[1].loss_tokens == 5
    assert (stats.too_long, stats.truncated, stats.dropped, stats.samples) == (2, 1, 1, 3)
    assert stats.tokens == 9 + 10 + 3 and stats.loss_tokens == 5 + 5 + 1
    stats = SFTStats()
    assert [s.source for s in fit_to_length(samples, 10, "drop", stats)] == ["s5-5", "s3-1"]
    assert (stats.too_long, stats.truncated, stats.dropped) == (2, 0, 2)


def test_truncation_of_real_data_keeps_the_head(tok, bundled):
    samples = tokenize_conversations(bundled[:200], tok, "alpaca_ja")
    stats = SFTStats()
    kept = fit_to_length(samples, 48, "truncate", stats)
    assert stats.too_long > 0 and stats.truncated + stats.dropped == stats.too_long
    assert all(s.length <= 48 and s.loss_tokens > 0 for s in kept)
    full = {s.source: s for s in samples}
    for s in kept:
        np.testing.assert_array_equal(s.input_ids, full[s.source].input_ids[: len(s.input_ids)])


def test_validation_split_is_seeded_and_disjoint(bundled):
    train, valid = split_conversations(bundled, 0.05, seed=0)
    assert len(valid) == 100 and len(train) == 1900
    assert {c.source for c in train}.isdisjoint(c.source for c in valid)
    assert [c.source for c in split_conversations(bundled, 0.05, seed=0)[1]] == [c.source for c in valid]
    assert [c.source for c in split_conversations(bundled, 0.05, seed=1)[1]] != [c.source for c in valid]


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def _naive_first_fit(lengths, capacity):
    rows, free = [], []
    for i, n in enumerate(lengths):
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def test_first_fit_equals_the_naive_algorithm():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 65, size=int(rng.integers(1, 300))).tolist()
        assert first_fit(lengths, 64) == _naive_first_fit(lengths, 64)
    with pytest.raises(ValueError, match="outside"):
        first_fit([65], 64)


def test_pack_plan_is_deterministic_and_covers_every_sample_once():
    lengths = np.random.default_rng(1).integers(1, 100, size=500)
    plan = pack_plan(lengths, 128, seed=3)
    assert sorted(np.concatenate(plan).tolist()) == list(range(500))
    assert all(lengths[r].sum() <= 128 for r in plan)
    assert [r.tolist() for r in plan] == [r.tolist() for r in pack_plan(lengths, 128, seed=3)]
    assert [r.tolist() for r in plan] != [r.tolist() for r in pack_plan(lengths, 128, seed=3, epoch=1)]
    unpacked = pack_plan(lengths, 128, packing=False, seed=3)
    assert len(unpacked) == 500 and all(len(r) == 1 for r in unpacked)
    assert [r.tolist() for r in pack_plan(lengths, 128, packing=False, shuffle=False)] == [[i] for i in range(500)]


def test_row_layout(tok):
    samples = tokenize_conversations([Conversation(tuple(m)) for m in TRICKY], tok, "alpaca_ja")
    seq_len = sum(s.length for s in samples) + 5
    row = make_row(samples, seq_len, pad_id=tok.pad_token_id)
    assert set(row) == set(BATCH_KEYS) and all(v.dtype == np.int64 and v.shape == (seq_len,) for v in row.values())
    pos = 0
    for k, s in enumerate(samples):
        tokens, labels = s.row()
        sl = slice(pos, pos + s.length)
        np.testing.assert_array_equal(row["tokens"][sl], tokens)
        np.testing.assert_array_equal(row["labels"][sl], labels)
        np.testing.assert_array_equal(row["positions"][sl], np.arange(s.length))
        assert (row["segment_ids"][sl] == k).all()
        pos += s.length
    assert (row["segment_ids"][pos:] == -1).all() and (row["labels"][pos:] == IGNORE_INDEX).all()
    assert (row["tokens"][pos:] == tok.pad_token_id).all()
    assert count_loss_tokens(torch.from_numpy(row["labels"])) == sum(s.loss_tokens for s in samples)


@pytest.mark.parametrize("packing", [True, False])
def test_packed_loss_and_gradients_equal_samples_one_by_one(tok, bundled, packing):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=1280, max_seq_len=128,
                      kernels="torch")
    model = build_model(cfg, seed=0)
    samples = [s for s in tokenize_conversations(bundled[:40], tok, "alpaca_ja") if s.length <= 60][:7]
    rows = pack(samples, 128, packing=packing, seed=0)
    assert len(rows) < len(samples) if packing else len(rows) == len(samples)
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in BATCH_KEYS}
    total = count_loss_tokens(batch)
    assert total == sum(s.loss_tokens for s in samples)

    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    packed = causal_lm_loss(logits, batch["labels"], normalizer=total, vocab_limit=len(tok)).loss
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone = torch.zeros(())
    for s in samples:
        tokens, labels = (torch.from_numpy(a)[None] for a in s.row())
        loss = causal_lm_loss(model(tokens), labels, normalizer=total, vocab_limit=len(tok)).loss
        loss.backward()
        alone = alone + loss.detach()
    torch.testing.assert_close(packed.detach(), alone, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------------------------
# Dataset and loader
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(tok, bundled):
    return fit_to_length(tokenize_conversations(bundled[:300], tok, "alpaca_ja"), 128, "truncate")


def test_dataset_epochs_and_min_rows(samples):
    ds = SFTDataset(samples, 128, seed=5)
    one = len(ds)
    assert ds.num_epochs == 1 and 0.85 < ds.fill <= 1.0
    big = SFTDataset(samples, 128, seed=5, min_rows=2 * one + 1)
    assert big.num_epochs == 3 and len(big) >= 2 * one + 1
    for i in range(one):  # epoch 0 is the same
        np.testing.assert_array_equal(big.row_samples(i), ds.row_samples(i))
    assert [sorted(big.row_samples(i).tolist()) for i in range(big.epoch_starts[1], big.epoch_starts[2])] != [
        sorted(ds.row_samples(i).tolist()) for i in range(one)]
    item = ds[0]
    assert set(item) == set(BATCH_KEYS) and all(v.dtype == torch.int64 and v.shape == (128,) for v in item.values())
    assert ds.loss_tokens(0) == count_loss_tokens(item)
    with pytest.raises(ValueError, match="longer than seq_len=16"):
        SFTDataset(samples, 16)


def _stream(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_loader_resume_and_data_parallel_slices(samples):
    ds = SFTDataset(samples, 128, seed=5, num_epochs=2)
    full = _stream(SFTDataLoader(ds, micro_batch_size=4))
    assert len(full) == len(ds) // 4
    assert all(b[k].shape == (4, 128) and b[k].dtype == torch.int64 for b in full for k in BATCH_KEYS)

    # resume after 5 micro-batches from the saved state: the same stream continues
    loader = SFTDataLoader(ds, micro_batch_size=4)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    assert state == {"consumed_samples": 20}
    resumed = SFTDataLoader(ds, micro_batch_size=4)
    resumed.load_state_dict(state)
    rest = _stream(resumed)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:]):
        for k in BATCH_KEYS:
            assert torch.equal(a[k], b[k])

    # two data-parallel ranks of micro-batch 2 see the rows of the single-rank stream, sliced
    ranks = [_stream(SFTDataLoader(ds, micro_batch_size=2, dp_rank=r, dp_size=2)) for r in range(2)]
    for step, b in enumerate(full):
        for k in BATCH_KEYS:
            assert torch.equal(torch.cat([ranks[0][step][k], ranks[1][step][k]]), b[k])


def test_global_loss_tokens_counts_the_whole_step(samples):
    ds = SFTDataset(samples, 128, seed=5)
    accum, dp = 3, 2
    loaders = [SFTDataLoader(ds, micro_batch_size=2, dp_rank=r, dp_size=dp, consumed_samples=8) for r in range(dp)]
    expected = loaders[0].global_loss_tokens(accum)
    assert expected == loaders[1].global_loss_tokens(accum)
    counted = 0
    for loader in loaders:
        it = iter(loader)
        counted += sum(count_loss_tokens(next(it)) for _ in range(accum))
    assert counted == expected > 0


def test_loader_loss_normalizer_is_the_step_formula_and_survives_resume(samples):
    # uneven rows (packed samples of different lengths), 2 data-parallel ranks, 3 accumulation steps
    ds = SFTDataset(samples, 128, seed=5)
    mbs, gas, dp = 2, 3, 2
    per_step = mbs * dp * gas
    assert len({ds.loss_tokens(i) for i in range(len(ds))}) > 1
    assert len(ds) // per_step >= 4

    def loop(loader, steps):
        """What the training loop computed: at the start of each optimizer step
        max(stage.loss_tokens(gas), 1) / (gas * dp), with stage.loss_tokens = loader.global_loss_tokens;
        returns it with the normalisers the loader attached to the step's micro-batches."""
        it = iter(loader)
        out = []
        for _ in range(steps):
            want = max(loader.global_loss_tokens(gas), 1) / (gas * dp)
            out.append((want, [next(it)["loss_normalizer"] for _ in range(gas)]))
        return out

    for rank in range(dp):
        def make(**kw):
            return SFTDataLoader(ds, micro_batch_size=mbs, dp_rank=rank, dp_size=dp, **kw)

        loader = make(grad_accumulation=gas)
        first = loop(loader, 2)
        assert loader.state_dict() == {"consumed_samples": 2 * per_step}
        # a checkpoint after 2 optimizer steps: the resumed loader goes on with the steps' normalisers
        resumed = make(grad_accumulation=gas)
        resumed.load_state_dict(loader.state_dict())
        rest = loop(resumed, 2)
        for k, (want, got) in enumerate(first + rest):
            start = k * per_step
            assert want == max(ds.loss_tokens_between(start, start + per_step), 1) / (gas * dp)
            assert got == [want] * gas and all(type(x) is float for x in got)
        assert len({want for want, _ in first + rest}) > 1
        # ... and when built at that position; the rows are those of a loader without the normaliser
        assert loop(make(grad_accumulation=gas, consumed_samples=2 * per_step), 2) == rest
        for a, b in zip(make(grad_accumulation=gas, consumed_samples=2 * per_step), make(consumed_samples=2 * per_step)):
            assert "loss_normalizer" not in b and all(torch.equal(a[k], b[k]) for k in BATCH_KEYS)

    # the steps are counted from where the loader starts, as the loop counted them
    assert all(got == [want] * gas for want, got in loop(
        SFTDataLoader(ds, micro_batch_size=mbs, dp_size=dp, grad_accumulation=gas, consumed_samples=4), 3))
    with pytest.raises(ValueError, match="grad_accumulation"):
        SFTDataLoader(ds, micro_batch_size=mbs, grad_accumulation=0)


# --------------------------------------------------------------------------------------------------
# Config and the whole pipeline
# --------------------------------------------------------------------------------------------------


def test_config_from_dict():
    cfg = from_dict(SFTDataConfig, {"path": "a.jsonl,b.jsonl", "valid_fraction": 0.1}, prefix="data")
    assert cfg.paths == ["a.jsonl", "b.jsonl"]
    assert from_dict(SFTDataConfig, {"path": ["a.jsonl", "b.jsonl"]}).paths == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="data.truncation"):
        from_dict(SFTDataConfig, {"truncation": "cut"}, prefix="data")
    with pytest.raises(ConfigError, match="data.valid_path.*not both"):
        from_dict(SFTDataConfig, {"path": "a", "valid_path": "b", "valid_fraction": 0.1}, prefix="data")


def test_build_sft_datasets_on_the_bundled_data(tok):
    cfg = SFTDataConfig(path=str(sample_data_path("sft.jsonl")), valid_fraction=0.05, truncation="drop")
    data = build_sft_datasets(cfg, tok, "tulu", 128)
    assert data.train_stats.conversations == 1900 and data.valid_stats.conversations == 100
    assert data.train_stats.samples + data.train_stats.dropped == 1900
    assert data.valid is not None and data.train.fill > 0.85
    # validation rows are in order, packed, one epoch
    assert sorted(np.concatenate([data.valid.row_samples(i) for i in range(len(data.valid))]).tolist()) == list(
        range(len(data.valid.samples)))
    assert "train:" in data.summary() and "valid:" in data.summary()


def test_bundled_eval_prompts_are_held_out(bundled):
    prompts = read_eval_prompts(sample_data_path("sft_eval.jsonl"))
    assert 90 <= len(prompts) <= 110 and len({p.task for p in prompts}) >= 10
    trained = {m["content"] for c in bundled for m in c.messages if m["role"] == "user"}
    for p in prompts:
        assert p.messages[-1]["role"] == "user" and p.answer
        assert p.messages[-1]["content"] not in trained, p.source
    assert exact_match(" 8個です。\n", "8個です。") and not exact_match("8個", "8個です。")


def test_make_sft_is_deterministic_and_matches_the_bundled_files(tmp_path):
    make_sft = runpy.run_path(str(REPO / "scripts" / "sample_data" / "make_sft.py"))
    train, evals = make_sft["generate"]()
    make_sft["write_jsonl"](tmp_path / "sft.jsonl", train)
    make_sft["write_jsonl"](tmp_path / "sft_eval.jsonl", evals)
    for name in ("sft.jsonl", "sft_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == sample_data_path(name).read_bytes(), name
    total = sum(sample_data_path(n).stat().st_size for n in ("sft.jsonl", "sft_eval.jsonl"))
    assert total < 1_000_000
    # the checkable answers are right: spot-check the rules on the eval prompts
    for r in evals:
        q = r["messages"][-1]["content"]
        if r["task"] == "reverse_en":
            assert r["answer"] == q.rsplit("\n", 1)[-1][::-1]
        if r["task"] == "count_ja":
            assert r["answer"] == f"{len(q.split('「')[1].split('」')[0])}文字です。"
