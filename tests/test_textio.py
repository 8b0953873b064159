"""tanuki.textio: formats, compression, file expansion, and every bad input with file:line messages."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard

from tanuki.textio import CorpusError, ReadStats, expand_inputs, iter_documents


def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def texts(*args, **kwargs):
    return [d.text for d in iter_documents(*args, **kwargs)]


JSONL = "".join(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n" for t, lang in [
    ("たぬきは森に住んでいます。", "ja"), ("The tanuki lives in the forest.\nSecond line.", "en"), ("def f():\n    return 1\n", "code"),
])


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def test_txt_line_mode_one_document_per_line(tmp_path):
    p = write(tmp_path / "a.txt", "first line\nsecond  line \n\n   \nthird\r\nlast without newline")
    stats = ReadStats()
    docs = list(iter_documents(p, stats=stats))
    assert [d.text for d in docs] == ["first line", "second  line ", "third", "last without newline"]
    assert [d.line for d in docs] == [1, 2, 5, 6]
    assert all(d.source == str(p) for d in docs)
    assert stats.documents == 4
    assert stats.skipped == {"empty": 2}
    assert stats.bytes == sum(len(t.encode()) for t in ["first line", "second  line ", "third", "last without newline"])


def test_txt_paragraph_mode_joins_lines(tmp_path):
    p = write(tmp_path / "a.txt", "\n\npara one\nline two\n\n\n\npara two\n  indented\n\nlast")
    docs = list(iter_documents(p, txt_mode="paragraph"))
    assert [d.text for d in docs] == ["para one\nline two", "para two\n  indented", "last"]
    assert [d.line for d in docs] == [3, 8, 11]


def test_jsonl_text_key_and_lang(tmp_path):
    p = write(tmp_path / "a.jsonl", JSONL.replace('"text"', '"body"'))
    docs = list(iter_documents(p, text_key="body", lang_key="lang"))
    assert [d.text for d in docs] == [json.loads(line)["body"] for line in JSONL.replace('"text"', '"body"').splitlines()]
    assert [d.lang for d in docs] == ["ja", "en", "code"]
    assert [d.line for d in docs] == [1, 2, 3]


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".zstd"])
def test_compressed_equals_plain(tmp_path, suffix):
    plain = write(tmp_path / "a.jsonl", JSONL * 50)
    data = plain.read_bytes()
    packed = gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data)
    comp = write(tmp_path / f"b.jsonl{suffix}", packed)
    assert texts(comp) == texts(plain)
    s1, s2 = ReadStats(), ReadStats()
    list(iter_documents(plain, stats=s1))
    list(iter_documents(comp, stats=s2))
    assert s1 == s2


def test_zstd_multiple_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    p = write(tmp_path / "a.txt.zst", c.compress(b"one\ntwo\n") + c.compress(b"three\n"))
    assert texts(p) == ["one", "two", "three"]


def test_reading_is_lazy(tmp_path):
    # The bad line is at the end: taking the first document must not read that far.
    p = write(tmp_path / "a.jsonl", '{"text": "ok"}\n' * 1000 + "not json\n")
    it = iter_documents(p)
    assert next(it).text == "ok"
    with pytest.raises(CorpusError):
        list(it)


# --------------------------------------------------------------------------------------------------
# Which files
# --------------------------------------------------------------------------------------------------


def test_expand_inputs_glob_list_sorted_deduplicated(tmp_path):
    for name in ["b.jsonl", "a.txt", "sub/c.jsonl.gz", "skip.md"]:
        write(tmp_path / name, "x")
    found = expand_inputs(f"{tmp_path}/*.jsonl,{tmp_path}/a.txt,{tmp_path}/a.txt")
    assert found == [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    found = expand_inputs([str(tmp_path / "**/*.jsonl*"), str(tmp_path / "b.jsonl")])
    assert found == sorted([tmp_path / "b.jsonl", tmp_path / "sub/c.jsonl.gz"], key=str)


def test_expand_inputs_errors_name_the_path(tmp_path):
    with pytest.raises(CorpusError, match=r"missing\.jsonl: no such file"):
        expand_inputs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(CorpusError, match=r"\*\.txt: the pattern matches no files"):
        expand_inputs(str(tmp_path / "*.txt"))
    with pytest.raises(CorpusError, match="is a directory"):
        expand_inputs(str(tmp_path))
    write(tmp_path / "notes.md", "x")
    with pytest.raises(CorpusError, match=r"notes\.md: unsupported file type"):
        expand_inputs(str(tmp_path / "notes.md"))
    with pytest.raises(CorpusError, match="no input files"):
        expand_inputs(" , ")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_invalid_utf8_names_file_line_and_byte_offset(tmp_path):
    good = "良い行\n".encode()
    bad = b"abc\xffdef\n"
    p = write(tmp_path / "a.txt", good + good + bad + good)
    offset = 2 * len(good) + 3  # the oracle: bytes before the 0xff byte
    with pytest.raises(CorpusError) as e:
        list(iter_documents(p))
    assert f"{p}:3:" in str(e.value)
    assert f"byte offset {offset}" in str(e.value)
    stats = ReadStats()
    assert texts(p, on_error="skip", stats=stats) == ["良い行", "良い行", "良い行"]
    assert stats.skipped == {"invalid_utf8": 1}


def test_invalid_utf8_offset_counts_decompressed_bytes(tmp_path):
    raw = b"ok\n" * 10 + b"\xc3(\n"
    p = write(tmp_path / "a.txt.gz", gzip.compress(raw))
    offset = raw.index(bytes([0xC3]))
    with pytest.raises(CorpusError, match=rf"a\.txt\.gz:11: invalid UTF-8 at byte offset {offset}"):
        list(iter_documents(p))


def test_invalid_utf8_in_paragraph_skips_the_paragraph(tmp_path):
    p = write(tmp_path / "a.txt", b"one\ntwo\n\nbad \xff line\nrest of it\n\nthree\n")
    stats = ReadStats()
    assert texts(p, txt_mode="paragraph", on_error="skip", stats=stats) == ["one\ntwo", "three"]
    assert stats.skipped == {"invalid_utf8": 1}
    with pytest.raises(CorpusError, match=r"a\.txt:4: invalid UTF-8"):
        list(iter_documents(p, txt_mode="paragraph"))


@pytest.mark.parametrize(
    "line, reason, message",
    [
        ("{not json", "invalid_json", "not valid JSON"),
        ('{"content": "x"}', "missing_key", "no key 'text'"),
        ('{"text": 3}', "not_string", "'text' is int, not a string"),
        ('{"text": null}', "not_string", "'text' is NoneType"),
        ('["text"]', "not_object", "expected a JSON object, got list"),
        ('{"text": "a\\ud800b"}', "lone_surrogate", "lone surrogate \\\\ud800"),
    ],
)
def test_bad_jsonl_lines(tmp_path, line, reason, message):
    p = write(tmp_path / "data.jsonl", '{"text": "one"}\n{"text": "two"}\n' + line + '\n{"text": "four"}\n')
    with pytest.raises(CorpusError, match=rf"data\.jsonl:3: {message}"):
        list(iter_documents(p))
    stats = ReadStats()
    assert texts(p, on_error="skip", stats=stats) == ["one", "two", "four"]
    assert stats.skipped == {reason: 1}
    assert stats.documents == 3


def test_empty_documents_are_counted(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": ""}\n\n{"text": " \\n\\t"}\n{"text": "x"}\n')
    stats = ReadStats()
    assert texts(p, stats=stats) == ["x"]
    assert stats.skipped == {"empty": 3}


def test_truncated_archive_is_an_error_even_when_skipping(tmp_path):
    data = "".join(f"line {i * 7919 % 10007}\n" for i in range(10000)).encode()
    p = write(tmp_path / "a.txt.gz", gzip.compress(data)[:2000])
    with pytest.raises(CorpusError, match=r"a\.txt\.gz: cannot decompress"):
        list(iter_documents(p, on_error="skip"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_error"):
        list(iter_documents(__file__.replace(".py", ".txt"), on_error="ignore"))
    with pytest.raises(ValueError, match="txt_mode"):
        list(iter_documents(__file__.replace(".py", ".txt"), txt_mode="sentence"))


def test_relative_paths_are_kept_as_given(tmp_path, monkeypatch):
    write(tmp_path / "d" / "a.txt", "x\n")
    monkeypatch.chdir(tmp_path)
    (doc,) = iter_documents("d/a.txt")
    assert doc.source == os.path.join("d", "a.txt")
