"""The builder on small corpora made here: bad input, long lines, sampling, special tokens, output handling."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from tanuki.config import ConfigError, from_dict
from tanuki.textio import CorpusError
from tanuki.tokenizer import (
    BuildTokenizerConfig,
    TokenizerBuildError,
    build_tokenizer,
    load,
    sample_data_path,
)

REPO = Path(__file__).resolve().parents[1]

def corpus_lines(n: int = 600) -> list[str]:
    """The first ``n`` documents of the bundled sample corpus (Japanese, English and code)."""
    with open(sample_data_path(), encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def cfg(**kw) -> BuildTokenizerConfig:
    return from_dict(BuildTokenizerConfig, {"vocab_size": 1500, "progress": False, **kw})


def leftovers(out: Path) -> list[str]:
    """Anything the build left beside its output (temporary directories included)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name == out.name)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", corpus_lines())


# --------------------------------------------------------------------------------------------------
# Bad input: clear messages, and no output directory that looks complete
# --------------------------------------------------------------------------------------------------


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n{"text": "   "}\n')
    out = tmp_path / "tok"
    with pytest.raises(TokenizerBuildError, match=r"corpus is empty.*empty\.jsonl.*skipped: empty 3"):
        build_tokenizer(cfg(input=str(empty), output=str(out)))
    assert leftovers(out) == []


def test_missing_file(tmp_path):
    out = tmp_path / "tok"
    with pytest.raises(CorpusError, match=r"nope\.jsonl: no such file"):
        build_tokenizer(cfg(input=str(tmp_path / "nope.jsonl"), output=str(out)))
    assert leftovers(out) == []


def test_invalid_utf8_fails_with_byte_offset_or_is_skipped_and_counted(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_lines()).read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good + b'{"text": "broken \xff here"}\n' + good)
    out = tmp_path / "tok"
    with pytest.raises(CorpusError, match=rf"bad\.jsonl:601: invalid UTF-8 at byte offset {len(good) + 17}"):
        build_tokenizer(cfg(input=str(bad), output=str(out)))
    assert leftovers(out) == []
    report = build_tokenizer(cfg(input=str(bad), output=str(out), on_error="skip"))
    assert report["corpus"]["skipped"] == {"invalid_utf8": 1}
    assert report["corpus"]["documents"] == 1200
    assert json.loads((out / "report.json").read_text())["corpus"]["skipped"] == {"invalid_utf8": 1}


@pytest.mark.parametrize("line, message", [
    ("this is not json", r"data\.jsonl:301: not valid JSON"),
    ('{"body": "wrong key"}', r"data\.jsonl:301: no key 'text'"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    lines = corpus_lines()
    data = tmp_path / "data.jsonl"
    write_jsonl(data, lines[:300])
    with open(data, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    write_jsonl(tmp_path / "more.jsonl", lines[300:])
    with data.open("a", encoding="utf-8") as f:
        f.write((tmp_path / "more.jsonl").read_text(encoding="utf-8"))
    out = tmp_path / "tok"
    with pytest.raises(CorpusError, match=message):
        build_tokenizer(cfg(input=str(data), output=str(out)))
    assert leftovers(out) == []


def test_vocab_size_too_large_for_the_corpus(corpus, tmp_path):
    out = tmp_path / "tok"
    with pytest.raises(TokenizerBuildError, match=r"vocab_size=20000 is too large for this corpus.*Use vocab_size <= \d+"):
        build_tokenizer(cfg(input=str(corpus), output=str(out), vocab_size=20000))
    assert leftovers(out) == []


def test_vocab_size_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size.*at least 261"):
        cfg(input="x.jsonl", output="o", vocab_size=200)
    with pytest.raises(ConfigError, match=r"special_tokens\.user_defined\[0\].*whitespace"):
        cfg(input="x.jsonl", output="o", special_tokens={"user_defined": ["<|a b|>"]})
    with pytest.raises(ConfigError, match=r"special_tokens\.eos.*already used"):
        cfg(input="x.jsonl", output="o", special_tokens={"eos": "<s>"})
    with pytest.raises(ConfigError, match="character_coverage"):
        cfg(input="x.jsonl", output="o", character_coverage=1.5)


def test_existing_output_is_kept_unless_overwrite(corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(TokenizerBuildError, match="exists and is not empty; pass overwrite=true"):
        build_tokenizer(cfg(input=str(corpus), output=str(out)))
    assert (out / "mine.txt").read_text() == "keep me"
    build_tokenizer(cfg(input=str(corpus), output=str(out), overwrite=True))
    assert not (out / "mine.txt").exists() and (out / "tokenizer.json").exists()
    assert leftovers(out) == ["tok"]


# --------------------------------------------------------------------------------------------------
# Long lines, sampling, compression, special tokens
# --------------------------------------------------------------------------------------------------


def test_long_lines_are_counted_and_skipped_or_split(tmp_path):
    lines = corpus_lines()
    long = ["長い行です。" * 300, "a long line with words " * 400]  # 5,400 and 9,200 bytes
    data = write_jsonl(tmp_path / "data.jsonl", lines + long)
    skip = build_tokenizer(cfg(input=str(data), output=str(tmp_path / "skip")))["corpus"]
    assert skip["long_lines"] == 2
    assert skip["long_line_bytes"] == sum(len(s.encode()) for s in long)
    assert skip["long_lines_action"] == "skipped"
    assert skip["training_lines"] == skip["lines"] - 2
    split = build_tokenizer(cfg(input=str(data), output=str(tmp_path / "split"), long_lines="split"))["corpus"]
    assert split["long_lines"] == 2 and split["long_lines_action"] == "split"
    # every byte of the long lines is trained on, in chunks of at most max_sentence_length bytes
    assert split["training_bytes"] - skip["training_bytes"] <= sum(len(s.encode()) for s in long)
    assert split["training_lines"] - skip["training_lines"] >= 2 + 5400 // 4192 + 9200 // 4192 - 2


def test_sampling_is_seeded_and_reported(corpus, tmp_path):
    a = build_tokenizer(cfg(input=str(corpus), output=str(tmp_path / "a"), sample_sentences=2000, threads=1))
    b = build_tokenizer(cfg(input=str(corpus), output=str(tmp_path / "b"), sample_sentences=2000, threads=1))
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a["corpus"]["sampled_lines"] == 2000
    assert a["corpus"]["training_lines"] > 2000  # all lines were read, 2,000 of them trained on


def test_compressed_and_txt_input_give_the_same_tokenizer(corpus, tmp_path):
    data = corpus.read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    # the same documents as blank-line separated paragraphs of a .txt file
    texts = [json.loads(line)["text"].rstrip("\n") for line in data.decode().splitlines()]
    (tmp_path / "c.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n", encoding="utf-8")
    models = []
    for name, extra in [("corpus.jsonl", {}), ("c.jsonl.gz", {}), ("c.jsonl.zst", {}), ("c.txt", {"txt_mode": "paragraph"})]:
        out = tmp_path / f"tok-{name}"
        build_tokenizer(cfg(input=str(tmp_path / name), output=str(out), threads=1, **extra))
        models.append((out / "tokenizer.model").read_bytes())
    assert models[1] == models[0] and models[2] == models[0] and models[3] == models[0]


def test_user_defined_tokens_are_single_tokens_after_the_specials(corpus, tmp_path):
    out = tmp_path / "tok"
    markers = ["<|user|>", "<|assistant|>"]
    report = build_tokenizer(cfg(input=str(corpus), output=str(out), special_tokens={"user_defined": markers}))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(6)] == ["<unk>", "<s>", "</s>", "<pad>", *markers]
    assert sp.id_to_piece(6) == "<0x00>" and sp.id_to_piece(261) == "<0xFF>"
    assert report["byte_pieces"] == {"first_id": 6, "last_id": 261}
    tok = load(out)
    text = "hello<|user|>たぬき<|assistant|> world"
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == sp.encode(text)
    assert 4 in ids and 5 in ids
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(markers) == [4, 5]
    assert json.loads((out / "tokenizer_config.json").read_text())["additional_special_tokens"] == markers


def test_padded_vocab_size_follows_pad_to_multiple_of(corpus, tmp_path):
    report = build_tokenizer(cfg(input=str(corpus), output=str(tmp_path / "t"), vocab_size=1530, pad_to_multiple_of=64))
    assert (report["vocab_size"], report["padded_vocab_size"]) == (1530, 1536)
    assert len(load(tmp_path / "t")) == 1530  # the tokenizer itself is not padded


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_build_and_report(tmp_path):
    sample = sample_data_path()
    res = run_cli(str(REPO / "launch/build_tokenizer.py"), f"input={sample}", "output=tok", "vocab_size=4000",
                  "progress=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "chars/tok" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no Hydra outputs/ or .hydra/
    res = run_cli(str(REPO / "launch/tokenizer_report.py"), "tokenizer=tok", f"input={sample}", "output=r.json",
                  "progress=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    built = json.loads((tmp_path / "tok" / "report.json").read_text())
    assert report["languages"] == built["languages"]


def test_cli_errors_are_one_line(tmp_path):
    res = run_cli(str(REPO / "launch/build_tokenizer.py"), "input=missing.jsonl", "output=tok", "vocab_size=4000",
                  cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: missing.jsonl: no such file"
    res = run_cli(str(REPO / "launch/build_tokenizer.py"), "output=tok", "vocab_size=4000", cwd=tmp_path)
    assert res.returncode == 2 and "config key 'input': is required" in res.stderr
    assert list(tmp_path.iterdir()) == []
