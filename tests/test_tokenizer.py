"""The built tokenizer: layout, exactness against SentencePiece, round trips, chat template, report.

One tokenizer per configuration is built from the bundled sample corpus for the whole module.
Oracles: SentencePiece's own encoder, ``decode(encode(x)) == x``, the template examples of
``chat-templates.md``, Python's ``unicodedata`` NFKC, and counts recomputed from the pieces.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import runpy
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tanuki.config import from_dict, pad_vocab_size
from tanuki.textio import iter_documents
from tanuki.tokenizer import (
    BuildTokenizerConfig,
    FastEncoder,
    build_tokenizer,
    detect_language,
    load,
    report_for_directory,
    sample_data_path,
)

SYSTEM = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"


def _build(tmp_path_factory, name: str, **overrides) -> Path:
    out = tmp_path_factory.mktemp("tok") / name
    cfg = {"input": str(sample_data_path()), "output": str(out), "vocab_size": 4000, "progress": False, **overrides}
    build_tokenizer(from_dict(BuildTokenizerConfig, cfg))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "identity")


@pytest.fixture(scope="module")
def nfkc_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "nfkc", normalization="nfkc", vocab_size=3000)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return load(tok_dir)


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


SPECIALS = ("<s>", "</s>", "<pad>", "<unk>")


def sentencepiece_ids(tok_dir: Path):
    """SentencePiece's ids of a (normalized) text as Hugging Face's split_special_tokens=True path reads
    it: a text that starts with a special-token literal has no dummy prefix (tanuki.tokenizer.convert)."""
    from sentencepiece import sentencepiece_model_pb2

    data = (tok_dir / "tokenizer.model").read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    proto.normalizer_spec.add_dummy_prefix = False
    sp, no_prefix = spm.SentencePieceProcessor(model_proto=data), spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return lambda text: (no_prefix if text.startswith(SPECIALS) else sp).encode(text)


@pytest.fixture(scope="module")
def sp_ids(tok_dir):
    return sentencepiece_ids(tok_dir)


def hf_ids(tok, texts):
    """The Hugging Face ids of texts with special-token literals read as text (FastEncoder's contract)."""
    return tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module")
def heldout_lines() -> list[str]:
    """Text the tokenizer was not trained on: freshly generated documents and Python's own sources."""
    make_corpus = runpy.run_path(str(REPO / "scripts" / "sample_data" / "make_corpus.py"))
    docs = list(make_corpus["generate"](900_000, seed=7))[-2500:]
    lines = [line for d in docs for line in d["text"].split("\n") if line]
    for module in ("json.decoder", "textwrap", "argparse"):
        source = Path(__import__(module, fromlist=["x"]).__file__).read_text(encoding="utf-8")
        lines += [line for line in source.split("\n") if line]
    return lines


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------


def test_files_and_id_layout(tok_dir, hf, sp):
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "report.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    ]
    assert sp.get_piece_size() == 4000 == len(hf)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert [sp.id_to_piece(4 + b) for b in range(256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(sp.is_byte(4 + b) for b in range(256))
    enc = FastEncoder(tok_dir)
    assert enc.backend == "sentencepiece"
    assert (enc.vocab_size, enc.unk_id, enc.bos_id, enc.eos_id, enc.pad_id) == (4000, 0, 1, 2, 3)
    assert json.loads((tok_dir / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_byte_and_control_pieces_score_below_every_normal_piece(tok_dir):
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    lowest_normal = min(score for piece, score in vocab[260:])
    assert all(score < lowest_normal for _, score in vocab[:260])
    # scores are multiples of 1/64 so that float32 and float64 sums agree (see tokenizer/convert.py)
    assert all(score * 64 == int(score * 64) for _, score in vocab)


def test_no_pre_tokenizer_and_the_documented_pipeline(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    assert data["pre_tokenizer"] is None
    assert data["model"]["type"] == "Unigram" and data["model"]["byte_fallback"] is True
    assert [n["type"] for n in data["normalizer"]["normalizers"]] == ["Prepend", "Replace", "Replace"]
    assert all(t["normalized"] and not t["lstrip"] and not t["rstrip"] for t in data["added_tokens"])
    assert [d["type"] for d in data["decoder"]["decoders"]] == ["ByteFallback", "Replace", "Fuse", "Strip"]


# --------------------------------------------------------------------------------------------------
# Exactness against SentencePiece
# --------------------------------------------------------------------------------------------------


def _is_tie(vocab, a: list[int], b: list[int]) -> bool:
    return abs(sum(vocab[i][1] for i in a) - sum(vocab[i][1] for i in b)) < 1e-6


def test_hf_ids_equal_sentencepiece_on_heldout_lines(tok_dir, hf, sp, heldout_lines):
    ours = sp.encode(heldout_lines, out_type=int)
    theirs = hf_ids(hf, heldout_lines)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    different = [(a, b) for a, b in zip(ours, theirs) if a != b]
    assert len(heldout_lines) > 5000
    assert all(_is_tie(vocab, a, b) for a, b in different), "only equal-score segmentations may differ"
    assert 1 - len(different) / len(heldout_lines) >= 0.999


def test_fast_encoder_equals_hf_on_documents(tok_dir, hf, heldout_lines):
    # Whole multi-line documents, some far longer than a line, the way preprocessing encodes them.
    docs = ["\n".join(heldout_lines[i : i + n]) for i, n in zip(range(0, 6000, 500), [1, 2, 5, 50, 1000] * 3)]
    docs += ["\nstarts with a newline", "\n\n", "ends with newlines\n\n", "\n", "", " ", "a\n\n\n  b\n\tc"]
    docs += ["\n" + docs[4], "\n\n" + docs[9], "<s> starts with a literal", "</s>\n" + docs[4]]
    enc = FastEncoder(tok_dir)
    assert sum(len(d) > enc._exact_chars for d in docs) >= 4  # these take the line-by-line path
    assert enc.encode_batch(docs) == hf_ids(hf, docs)
    assert [enc.encode(d) for d in docs[:6]] == hf_ids(hf, docs[:6])


def test_fast_encoder_pickles_and_runs_in_worker_processes(tok_dir, hf, heldout_lines):
    enc = FastEncoder(tok_dir)
    clone = pickle.loads(pickle.dumps(enc))
    batches = [heldout_lines[i : i + 100] for i in range(0, 400, 100)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(clone.encode_batch, batches)
    assert results == [hf_ids(hf, b) for b in batches]


def test_fast_encoder_falls_back_to_tokenizers_for_other_directories(tok_dir, tmp_path, hf, heldout_lines):
    # A directory without tanuki's report.json is any Hugging Face tokenizer: same ids, other backend.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    enc = FastEncoder(tmp_path)
    assert enc.backend == "tokenizers"
    assert (enc.vocab_size, enc.bos_id, enc.eos_id, enc.pad_id) == (4000, 1, 2, 3)
    lines = heldout_lines[:300] + ["<s> literal </s>", "x <s>"]
    assert enc.encode_batch(lines) == hf_ids(hf, lines)


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------

EDGE_CASES = [
    " leading space", "trailing space ", "  two leading", "repeated   spaces   inside", "   ",
    "tab\tseparated\tvalues", "\tleading tab", "new\nline", "\n\nblank lines\n\n", "windows\r\nline",
    "def f(x):\n    if x:\n        return [x,  x]\n\treturn None\n",
    "emoji 😀🎉👨‍👩‍👧 and ❤️", "rare kanji 𠮷野家 麤 鬱 龘", "CJK extension B 𠀀𠀁 and C 𪜀",
    "full-width ＡＢＣ１２３！", "half-width kana ﾊﾝｶｸｶﾀｶﾅ ｶﾞｷﾞ", "literal <0x41> and <0xFF>", "literal <s> and </s> <pad> <unk>",
    "mixed 日本語とEnglishと123と한국어とРусский", "numbers 3.14159 and 1,234,567 and 2024年3月5日", "a", "",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip_edge_cases(hf, sp, text):
    (ids,) = hf_ids(hf, [text])
    assert hf.decode(ids) == text
    assert sp.encode(text) == ids
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text  # specials read as specials
    if "<" not in text:  # without special-token literals the default call is the same
        assert hf(text, add_special_tokens=False)["input_ids"] == ids


def test_literal_byte_piece_is_not_read_as_a_byte(hf):
    (ids,) = hf_ids(hf, ["<0x41>"])
    assert hf.convert_tokens_to_ids("<0x41>") not in ids
    assert hf.decode(ids) == "<0x41>"


def test_special_token_literals_by_default_are_control_tokens(hf):
    # A deliberate choice: chat templates write "<s>" and "</s>" as text, so the default call
    # matches them; data goes through FastEncoder / split_special_tokens=True, which never does.
    assert hf("x</s>", add_special_tokens=False)["input_ids"][-1] == hf.eos_token_id
    assert hf.eos_token_id not in hf_ids(hf, ["x</s>"])[0]


def test_bos_added_by_default(hf):
    assert hf("たぬき")["input_ids"][0] == hf.bos_token_id
    assert hf("たぬき")["input_ids"][1:] == hf("たぬき", add_special_tokens=False)["input_ids"]


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40)
_mixed = st.lists(st.sampled_from([" ", "  ", "\t", "\n", "a", "the", "あ", "たぬき", "漢字", "１", "ｶ", "😀", "<", "s>", "0x", "9"]),
                  max_size=20).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(_text, _mixed))
def test_round_trip_random_unicode(hf, sp_ids, text):
    (ids,) = hf_ids(hf, [text])
    assert hf.decode(ids) == text
    assert sp_ids(text) == ids


def test_special_token_text_round_trips_exactly(hf):
    # each part after a special token used to get a dummy prefix of its own: "literal <s>  and </s>"
    for text in ["literal <s> and </s>", "<s>hello", " <s>x", "<s> ### 指示", "a</s><s>b", "<pad><unk>", "x <s>"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert hf.decode(ids) == text
        with_bos = hf(text)["input_ids"]  # the post-processor's BOS, then the same ids
        assert with_bos[0] == hf.bos_token_id and hf.decode(with_bos[1:]) == text
    # a chat template's leading <s> is the first id (no lone dummy-prefix piece before it), and the
    # text after a special token gets no dummy prefix
    ids = hf("<s>たぬき</s>", add_special_tokens=False)["input_ids"]
    assert ids[0] == hf.bos_token_id and ids[-1] == hf.eos_token_id
    assert not hf.convert_ids_to_tokens(ids[1]).startswith("\u2581")


_with_specials = st.lists(
    st.sampled_from(list(SPECIALS) + [" ", "  ", "\t", "\n", "a", "the", "たぬき", "漢字", "の", "１", "<", "s>", "/", "😀"]),
    max_size=24,
).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_with_specials)
def test_special_token_text_mixed_with_spaces_and_japanese_round_trips(hf, tok_dir, sp_ids, text):
    # read as special tokens (the default call, what chat templates and other tools do) ...
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    with_bos = hf(text)["input_ids"]
    assert with_bos[0] == hf.bos_token_id and hf.decode(with_bos[1:]) == text
    # ... and as text (tanuki's data path): exact, SentencePiece's ids, FastEncoder's ids
    (ids,) = hf_ids(hf, [text])
    assert hf.decode(ids) == text
    assert not set(ids) & set(hf.all_special_ids) - {hf.unk_token_id} or text == ""
    assert sp_ids(text) == ids
    assert _fast_encoder(tok_dir).encode(text) == ids


_encoders: dict = {}


def _fast_encoder(path):
    if path not in _encoders:
        _encoders[path] = FastEncoder(path)
    return _encoders[path]


def test_space_marker_in_text_is_the_one_known_loss(hf):
    # U+2581 is SentencePiece's escape for a space, so it reads back as a space (as in every
    # SentencePiece tokenizer); the property test above leaves it out for that reason.
    assert hf.decode(hf_ids(hf, ["a\u2581b"])[0]) == "a b"


def test_nfkc_normalizes_then_round_trips(nfkc_dir):
    tok = load(nfkc_dir)
    for text in ["full-width ＡＢＣ１２３！", "half-width ﾊﾝｶｸｶﾀｶﾅ", "①②③ ㍻ ㌔", "ideographic\u3000space"]:
        assert tok.decode(hf_ids(tok, [text])[0]) == unicodedata.normalize("NFKC", text)
    # SentencePiece's NFKC table maps half-width voiced kana character by character (ｶﾞ -> カ + U+3099)
    # instead of composing them (ガ): the same text up to canonical equivalence.
    decoded = tok.decode(hf_ids(tok, ["ｶﾞｷﾞ"])[0])
    assert decoded == "\u30ab\u3099\u30ad\u3099"
    assert unicodedata.normalize("NFC", decoded) == unicodedata.normalize("NFKC", "ｶﾞｷﾞ") == "ガギ"
    data = json.loads((nfkc_dir / "tokenizer.json").read_text())
    assert data["normalizer"]["normalizers"][0]["type"] == "Precompiled"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(_text, _mixed))
def test_nfkc_normalized_text_round_trips_and_matches_sentencepiece(nfkc_dir, text):
    tok = _nfkc_cache(nfkc_dir)
    sp_nfkc = _nfkc_cache(nfkc_dir / "tokenizer.model")
    normalized = tok.decode(hf_ids(tok, [text])[0])
    (ids,) = hf_ids(tok, [normalized])
    assert tok.decode(ids) == normalized
    assert sp_nfkc(normalized) == ids


_loaded: dict = {}


def _nfkc_cache(path):
    if path not in _loaded:
        _loaded[path] = sentencepiece_ids(path.parent) if path.name == "tokenizer.model" else load(path)
    return _loaded[path]


# --------------------------------------------------------------------------------------------------
# Hugging Face loading and the chat template
# --------------------------------------------------------------------------------------------------


def test_autotokenizer_loads_without_custom_code(tok_dir, hf):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(auto) == 4000
    text = "たぬきは森に住んでいます。 The tanuki lives in the forest."
    assert auto(text)["input_ids"] == hf(text)["input_ids"]


def test_chat_template_renders_the_reference_examples(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "日本の首都は？"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        f"<s>{SYSTEM}\n\n### 指示:\n日本の首都は？\n\n### 応答:\n"
    )
    msgs += [{"role": "assistant", "content": "東京です。"}, {"role": "user", "content": "人口は？"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        f"<s>{SYSTEM}\n\n### 指示:\n日本の首都は？\n\n### 応答:\n東京です。</s>\n\n### 指示:\n人口は？\n\n### 応答:\n"
    )
    # without a system message the fixed sentence is not written
    assert tok.apply_chat_template(msgs[1:2], tokenize=False) == "<s>\n\n### 指示:\n日本の首都は？"


def test_chat_template_tokenizes_with_a_single_bos(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい。"}]
    out = tok.apply_chat_template(msgs, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_chat_template_rejects_unknown_roles(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def test_report_numbers_recomputed_from_scratch(tok_dir, sp):
    report = json.loads((tok_dir / "report.json").read_text())
    assert report["vocab_size"] == 4000
    assert report["padded_vocab_size"] == pad_vocab_size(4000, 128) == 4096
    assert report["unknown_tokens"] == 0
    assert report["lost_characters"] == 0  # byte fallback: every round trip is exact
    docs = list(iter_documents(sample_data_path(), lang_key="lang"))
    assert report["report_documents"] == len(docs)  # 2,000 >= the corpus: every document is measured
    for lang in ("ja", "en", "code"):
        mine = [d.text for d in docs if d.lang == lang]
        ids = sp.encode(mine)
        chars, tokens = sum(map(len, mine)), sum(map(len, ids))
        byte_ids = {sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)} - {sp.piece_to_id(p) for p in ("<0x09>", "<0x0A>", "<0x0D>")}
        got = report["languages"][lang]
        assert got["documents"] == len(mine)
        assert got["tokens"] == tokens
        assert got["chars_per_token"] == round(chars / tokens, 4)
        assert got["bytes_per_token"] == round(sum(len(t.encode()) for t in mine) / tokens, 4)
        assert got["byte_fallback_tokens"] == sum(1 for x in ids for t in x if t in byte_ids)
    assert report["hf_check"]["identical_ids"] == report["hf_check"]["documents"] > 0
    assert report["build"]["peak_memory_mb"] > 0 and report["build"]["seconds"]["train"] >= 0


def test_report_vocabulary_statistics(tok_dir, sp):
    report = json.loads((tok_dir / "report.json").read_text())["vocabulary"]
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_unknown(i) is False
              and not sp.is_control(i) and not sp.is_byte(i)]
    names = [" ".join(unicodedata.name(c, "") for c in p) for p in pieces]
    assert report["normal_pieces"] == len(pieces) == 4000 - 4 - 256
    assert report["kana_share"] == round(sum("HIRAGANA" in n or "KATAKANA" in n for n in names) / len(pieces), 4)
    blank = {"\u2581", "\t"} | {chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Zs"}
    assert report["whitespace_pieces"] == sum(1 for p in pieces if set(p) <= blank)
    assert report["longest_whitespace_piece"] == 16  # runs of indentation up to max_piece_length
    assert report["multi_digit_pieces"] == 0  # split_digits=true
    assert report["digit_pieces"] == 10


def test_tokenizer_report_agrees_with_the_builder(tok_dir):
    builder = json.loads((tok_dir / "report.json").read_text())
    again = report_for_directory(str(tok_dir), iter_documents(sample_data_path(), lang_key="lang"))
    assert again["languages"] == builder["languages"]
    assert again["vocabulary"] == builder["vocabulary"]


def test_language_detection_on_the_labelled_sample():
    docs = list(iter_documents(sample_data_path(), lang_key="lang"))
    right = sum(detect_language(d.text) == d.lang for d in docs)
    assert right / len(docs) >= 0.95


def test_report_counts_the_characters_a_converted_bpe_without_byte_fallback_drops(tmp_path):
    """A SentencePiece BPE without byte fallback, converted by transformers, drops what it cannot
    encode and emits no unknown id; the report counts the characters the round trip loses. Oracle:
    the characters SentencePiece itself covers by unknown pieces (their surfaces)."""
    from transformers import AutoTokenizer

    docs = list(iter_documents(sample_data_path(), lang_key="lang"))
    train = tmp_path / "train.txt"
    train.write_text("\n".join(d.text.replace("\n", " ") for d in docs[:1500]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(train), model_prefix=str(tmp_path / "bpe"), vocab_size=800, model_type="bpe",
        byte_fallback=False, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "tokenizer.model").write_bytes((tmp_path / "bpe.model").read_bytes())
    (raw / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    AutoTokenizer.from_pretrained(str(raw)).save_pretrained(str(tmp_path / "hf"))  # transformers' conversion

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))
    held_out = [d for d in docs[1500:] if not d.text.startswith(" ")][:300]
    expected = sum(len(piece.surface) for d in held_out
                   for piece in sp.encode(d.text, return_type="proto").pieces if piece.id == sp.unk_id())
    assert expected > 50, expected
    report = report_for_directory(str(tmp_path / "hf"), held_out)
    assert report["unknown_tokens"] == 0  # what the report said before it counted the round trip
    assert report["lost_characters"] == expected
    assert sum(s["lost_characters"] for k, s in report["languages"].items() if k != "all") == expected
    from tanuki.tokenizer.report import format_summary

    assert f"loses {expected:,} characters" in format_summary(report)


def test_rewrite_tokenizer_json_reproduces_the_builders_file(tok_dir, tmp_path):
    # what a tokenizer built before the special-token fix needs: tokenizer.json written again
    from tanuki.tokenizer.convert import rewrite_tokenizer_json

    for name in ("tokenizer.model", "report.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    old = json.loads((tok_dir / "tokenizer.json").read_text())
    for t in old["added_tokens"]:  # as the earlier conversion wrote them
        t["normalized"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(old))
    rewrite_tokenizer_json(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((tok_dir / "tokenizer.json").read_text())
