"""Tokenizer quality report: compression per language, byte fallback, unknown tokens, characters the
round trip loses, vocabulary.

The same numbers are computed by the builder (``report.json`` in the output directory) and by
``launch/tokenizer_report.py`` for any Hugging Face tokenizer directory, so a tokenizer can be
compared with llm-jp's or Tanuki's on one's own held-out text.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from tanuki.config import pad_vocab_size
from tanuki.textio import Document
from tanuki.tokenizer.encode import FastEncoder

#: languages the report keeps apart; anything else is counted as "other"
LANGUAGES = ("ja", "en", "code", "other")

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
#: tab, newline, carriage return
_LAYOUT_BYTES = frozenset((0x09, 0x0A, 0x0D))

# A line "looks like code" when it starts with a keyword, assigns, is JSON / a bracket, or ends the way
# prose seldom does.
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|if .*:$|for .*:$|while .*:$|elif |else:|try:|except"
    r"|#include|#define|fn |let |const |var |function\b|public |private |static |struct |enum |impl "
    r"|package |func |SELECT |FROM |WHERE |ORDER BY |GROUP BY |LIMIT |INSERT |UPDATE |CREATE |WITH |VALUES"
    r"|echo |export |cd |set -|\$ |>>> |@|//|/\*|\*/|#!|#\s"
    r"|[A-Za-z_][\w.\[\]]*\s*[-+*/]?=\s*\S"  # assignment
    r'|"[^"]*"\s*:'  # JSON key
    r"|[\[\]{}(),;]+$|-?[\d.]+,?$|[\w.]+\(.*\)\s*(#.*|//.*)?$)"  # brackets, bare values, calls
    r"|[;{}]\s*$|\)\s*:?\s*$|=>|->"
)
_CODE_SYMBOLS = set("{}[]()<>=;:_#/*+-&|\"'\\$`~^%")


def _is_kana(ch: str) -> bool:
    o = ord(ch)
    # hiragana, katakana, katakana phonetic extensions, half-width katakana
    return 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F


def _is_kanji(ch: str) -> bool:
    o = ord(ch)
    # CJK unified ideographs, extension A, compatibility ideographs, extensions B.. in planes 2 and 3
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x3FFFF


def detect_language(text: str) -> str:
    """``"ja"``, ``"en"``, ``"code"`` or ``"other"`` by a character-class heuristic.

    Code: at least half of the lines look like code (a keyword at the start, an assignment, JSON, a
    trailing ``;`` / ``{`` / ``):``, ...) and either 5% of the visible characters are programming
    symbols or 80% of the lines look like code (SQL has few symbols). Japanese: kana and kanji make at least 40% of the letters. English: ASCII letters
    make at least half of the letters. Everything else is "other". Give labels in the JSONL
    (``lang_key``) where this is not good enough.
    """
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return "other"
    symbols = sum(1 for ch in visible if ch in _CODE_SYMBOLS)
    lines = [line for line in text.split("\n") if line.strip()]
    code_lines = sum(1 for line in lines if _CODE_LINE.search(line))
    if code_lines >= 0.5 * len(lines) and (symbols >= 0.05 * len(visible) or code_lines >= 0.8 * len(lines)):
        return "code"
    letters = [ch for ch in visible if ch.isalpha()]
    if not letters:
        return "other"
    japanese = sum(1 for ch in letters if _is_kana(ch) or _is_kanji(ch))
    if japanese >= 0.4 * len(letters):
        return "ja"
    if sum(1 for ch in letters if ch.isascii()) >= 0.5 * len(letters):
        return "en"
    return "other"


def normalize_language(label: Optional[str]) -> Optional[str]:
    """Map a user label to one of :data:`LANGUAGES` (``"japanese"`` -> ``"ja"``), None if absent."""
    if not label:
        return None
    label = label.strip().lower()
    aliases = {"japanese": "ja", "jpn": "ja", "jp": "ja", "english": "en", "eng": "en", "program": "code"}
    label = aliases.get(label, label)
    return label if label in LANGUAGES else "other"


# --------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------


@dataclass
class _Counts:
    documents: int = 0
    chars: int = 0
    bytes: int = 0
    tokens: int = 0
    byte_tokens: int = 0
    layout_byte_tokens: int = 0
    unk_tokens: int = 0
    lost_chars: int = 0

    def add(self, other: "_Counts") -> None:
        for name in ("documents", "chars", "bytes", "tokens", "byte_tokens", "layout_byte_tokens", "unk_tokens",
                     "lost_chars"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        tokens = max(self.tokens, 1)
        return {
            "documents": self.documents,
            "chars": self.chars,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "chars_per_token": round(self.chars / tokens, 4),
            "bytes_per_token": round(self.bytes / tokens, 4),
            "byte_fallback_tokens": self.byte_tokens,
            "byte_fallback_share": round(self.byte_tokens / tokens, 6),
            "newline_tab_tokens": self.layout_byte_tokens,
            "unknown_tokens": self.unk_tokens,
            "lost_characters": self.lost_chars,
        }


def lost_characters(text: str, decoded: str) -> int:
    """How many characters of ``text`` are missing from ``decoded`` (its ``decode(encode(text))``),
    counted as a multiset difference after NFKC on both sides (so a tokenizer that normalizes loses
    nothing by that alone).

    The unknown-token count misses this: a converted tokenizer can drop what it cannot encode
    without emitting an unknown id (transformers' conversion of a SentencePiece BPE without byte
    fallback writes a BPE model with no unknown token, whose encoder skips such characters).
    """
    if text == decoded:
        return 0
    missing = Counter(unicodedata.normalize("NFKC", text))
    missing.subtract(unicodedata.normalize("NFKC", decoded))
    return sum(n for n in missing.values() if n > 0)


@dataclass
class CompressionMeter:
    """Accumulates characters, bytes and tokens per language over encoded documents.

    A newline is never inside a learned piece (SentencePiece trains on lines), so every newline is
    the byte token ``<0x0A>``; byte tokens of newline, tab and carriage return are therefore counted
    as ``newline_tab_tokens``, apart from ``byte_fallback_tokens``, the bytes of characters missing
    from the vocabulary. With the decoded texts, ``lost_characters`` counts what the round trip loses
    (:func:`lost_characters`).
    """

    #: id -> byte value of the byte-fallback pieces <0x00>..<0xFF>
    byte_ids: dict
    #: id of the unknown token (-1: none)
    unk_id: int
    per_language: dict = field(default_factory=dict)
    label_source: dict = field(default_factory=lambda: {"given": 0, "detected": 0})

    def add(self, docs: Sequence[Document], ids: Sequence[Sequence[int]],
            decoded: Optional[Sequence[str]] = None) -> None:
        for i, (doc, toks) in enumerate(zip(docs, ids)):
            lang = normalize_language(doc.lang)
            if lang is None:
                lang = detect_language(doc.text)
                self.label_source["detected"] += 1
            else:
                self.label_source["given"] += 1
            c = self.per_language.setdefault(lang, _Counts())
            c.documents += 1
            c.chars += len(doc.text)
            c.bytes += len(doc.text.encode("utf-8"))
            c.tokens += len(toks)
            for t in toks:
                if t in self.byte_ids:
                    if self.byte_ids[t] in _LAYOUT_BYTES:
                        c.layout_byte_tokens += 1
                    else:
                        c.byte_tokens += 1
            if self.unk_id >= 0:
                c.unk_tokens += sum(1 for t in toks if t == self.unk_id)
            if decoded is not None:
                c.lost_chars += lost_characters(doc.text, decoded[i])

    def result(self) -> dict:
        total = _Counts()
        out = {}
        for lang in LANGUAGES:
            if lang in self.per_language:
                out[lang] = self.per_language[lang].as_dict()
                total.add(self.per_language[lang])
        out["all"] = total.as_dict()
        return out


def measure_compression(
    documents: Iterable[Document],
    encode_batch: Callable[[list[str]], list[list[int]]],
    byte_ids: dict,
    unk_id: int,
    batch_size: int = 512,
    on_batch: Optional[Callable[[int], None]] = None,
    decode_batch: Optional[Callable[[list[list[int]]], list[str]]] = None,
) -> tuple[dict, dict]:
    """(per-language compression, label sources) of ``documents`` encoded with ``encode_batch``; with
    ``decode_batch`` also the characters each round trip loses."""
    meter = CompressionMeter(byte_ids=dict(byte_ids), unk_id=unk_id)
    batch: list[Document] = []

    def flush() -> None:
        ids = encode_batch([d.text for d in batch])
        meter.add(batch, ids, decode_batch(ids) if decode_batch is not None else None)
        if on_batch:
            on_batch(sum(len(d.text.encode("utf-8")) for d in batch))

    for doc in documents:
        batch.append(doc)
        if len(batch) >= batch_size:
            flush()
            batch = []
    if batch:
        flush()
    return meter.result(), dict(meter.label_source)


def hf_decoder(tokenizer_dir: str) -> Callable[[list[list[int]]], list[str]]:
    """``decode_batch`` of the directory's ``tokenizer.json`` (what transformers decodes with), special
    tokens skipped: an unknown token's text is not the character it replaced."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    return lambda ids: tok.decode_batch(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE pieces are written in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def piece_surfaces(tokenizer_json: dict) -> list[tuple[str, str]]:
    """(kind, surface text) of every id of a ``tokenizer.json``; kind is normal, byte or special.

    The surface is the text a piece stands for: ``▁`` becomes a space in SentencePiece-style
    vocabularies, and byte-level BPE pieces are mapped back through GPT-2's byte table.
    """
    model = tokenizer_json.get("model", {})
    mtype = model.get("type")
    if mtype == "Unigram":
        pieces = [p[0] for p in model["vocab"]]
    else:
        vocab = model.get("vocab", {})
        pieces = [""] * (max(vocab.values(), default=-1) + 1)
        for piece, i in vocab.items():
            pieces[i] = piece
    special = {}
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] >= len(pieces):
            pieces.extend([""] * (added["id"] + 1 - len(pieces)))
        pieces[added["id"]] = added["content"]
        if added.get("special"):
            special[added["id"]] = True
    byte_level = "ByteLevel" in json.dumps(tokenizer_json.get("decoder") or {})
    inverse = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else {}
    out = []
    for i, piece in enumerate(pieces):
        if i in special:
            out.append(("special", piece))
        elif _BYTE_PIECE.match(piece):
            out.append(("byte", piece))
        elif byte_level:
            raw = bytes(inverse[c] for c in piece if c in inverse)
            out.append(("normal", raw.decode("utf-8", errors="replace")))
        else:
            out.append(("normal", piece.replace("\u2581", " ")))
    return out


def vocabulary_stats(surfaces: Sequence[tuple[str, str]]) -> dict:
    """Counts and shares of the vocabulary by content (shares are of the normal pieces)."""
    normal = [s for kind, s in surfaces if kind == "normal" and s]
    n = max(len(normal), 1)
    kana = sum(1 for s in normal if any(_is_kana(c) for c in s))
    kanji = sum(1 for s in normal if any(_is_kanji(c) for c in s))
    japanese = sum(1 for s in normal if any(_is_kana(c) or _is_kanji(c) for c in s))
    digits = [s for s in normal if any(unicodedata.category(c) == "Nd" for c in s)]
    whitespace = [s for s in normal if s.isspace()]
    return {
        "size": len(surfaces),
        "special_pieces": sum(1 for kind, _ in surfaces if kind == "special"),
        "byte_pieces": sum(1 for kind, _ in surfaces if kind == "byte"),
        "normal_pieces": len(normal),
        "kana_share": round(kana / n, 4),
        "kanji_share": round(kanji / n, 4),
        "japanese_share": round(japanese / n, 4),
        "digit_pieces": len(digits),
        "multi_digit_pieces": sum(1 for s in digits if sum(c.isdigit() for c in s) > 1),
        "whitespace_pieces": len(whitespace),
        "longest_whitespace_piece": max((len(s) for s in whitespace), default=0),
        "word_initial_share": round(sum(1 for s in normal if s.startswith(" ")) / n, 4),
        "mean_piece_chars": round(sum(len(s) for s in normal) / n, 3),
    }


def byte_piece_ids(surfaces: Sequence[tuple[str, str]]) -> dict[int, int]:
    """id -> byte value of the byte pieces ``<0xNN>``."""
    return {i: int(s[3:5], 16) for i, (kind, s) in enumerate(surfaces) if kind == "byte"}


# --------------------------------------------------------------------------------------------------
# Any tokenizer directory
# --------------------------------------------------------------------------------------------------


def report_for_directory(
    tokenizer_dir: str,
    documents: Iterable[Document],
    pad_to_multiple_of: int = 128,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict:
    """The report for the tokenizer in ``tokenizer_dir`` measured on ``documents``.

    Text is encoded by the directory's Hugging Face tokenizer (or tanuki's identical fast encoder
    when the directory was built by tanuki) without special tokens, treating special-token
    literals in the text as text.
    """
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json (the report needs a Hugging Face fast tokenizer)")
    with open(path, encoding="utf-8") as f:
        tokenizer_json = json.load(f)
    surfaces = piece_surfaces(tokenizer_json)
    encoder = FastEncoder(tokenizer_dir)
    languages, sources = measure_compression(
        documents, encoder.encode_batch, byte_piece_ids(surfaces), encoder.unk_id, on_batch=on_batch,
        decode_batch=hf_decoder(tokenizer_dir),
    )
    if languages["all"]["documents"] == 0:
        raise ValueError("no documents to measure: the input is empty")
    return {
        "tokenizer": os.path.abspath(tokenizer_dir),
        "model": tokenizer_json.get("model", {}).get("type"),
        "vocab_size": encoder.vocab_size,
        "padded_vocab_size": pad_vocab_size(encoder.vocab_size, pad_to_multiple_of),
        "languages": languages,
        "language_labels": sources,
        "unknown_tokens": languages["all"]["unknown_tokens"],
        "lost_characters": languages["all"]["lost_characters"],
        "vocabulary": vocabulary_stats(surfaces),
    }


# --------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------


def format_summary(report: dict) -> str:
    """A short human-readable summary of a report."""
    lines = []
    title = report.get("output") or report.get("tokenizer", "")
    lines.append(f"tokenizer {title}")
    size = f"vocab {report['vocab_size']:,} (model rows padded to {report['padded_vocab_size']:,})"
    lines.append(f"  {size}")
    corpus = report.get("corpus")
    if corpus:
        lines.append(
            f"  corpus: {corpus['files']} files, {corpus['documents']:,} documents, {corpus['bytes'] / 1e6:.1f} MB; "
            f"trained on {corpus['training_lines']:,} lines ({corpus['training_bytes'] / 1e6:.1f} MB)"
        )
        skipped = {k: v for k, v in corpus["skipped"].items() if v}
        if skipped:
            lines.append("  skipped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items())))
        if corpus["long_lines"]:
            lines.append(
                f"  {corpus['long_lines']:,} lines longer than {corpus['max_sentence_length']} bytes "
                f"({corpus['long_line_bytes'] / 1e6:.2f} MB) were {corpus['long_lines_action']}"
            )
    lines.append("  language      docs  chars/tok  bytes/tok  byte-fallback  unk  lost chars")
    for lang, s in report["languages"].items():
        lines.append(
            f"  {lang:<8} {s['documents']:>8,}  {s['chars_per_token']:>9.3f}  {s['bytes_per_token']:>9.3f}"
            f"  {100 * s['byte_fallback_share']:>12.3f}%  {s['unknown_tokens']}  {s.get('lost_characters', '-')}"
        )
    v = report["vocabulary"]
    lines.append(
        f"  vocabulary: {v['normal_pieces']:,} learned pieces, japanese {100 * v['japanese_share']:.1f}% "
        f"(kana {100 * v['kana_share']:.1f}%, kanji {100 * v['kanji_share']:.1f}%), "
        f"{v['digit_pieces']} digit pieces, {v['whitespace_pieces']} whitespace pieces "
        f"(longest {v['longest_whitespace_piece']})"
    )
    build = report.get("build")
    if build:
        secs = build["seconds"]
        lines.append(
            f"  build: {secs['total']:.1f} s (read {secs['read']:.1f}, train {secs['train']:.1f}, "
            f"write {secs['write']:.1f}, report {secs['report']:.1f}); peak memory {build['peak_memory_mb']:,.0f} MB"
        )
    if report["unknown_tokens"]:
        lines.append(f"  WARNING: {report['unknown_tokens']} unknown tokens (expected 0 with byte fallback)")
    if report.get("lost_characters"):
        lines.append(f"  WARNING: decode(encode(text)) loses {report['lost_characters']:,} characters of the input "
                     "(characters the tokenizer cannot encode, dropped or replaced)")
    return "\n".join(lines)
