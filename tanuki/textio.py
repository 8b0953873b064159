"""Streaming reader for raw text corpora.

Both the tokenizer builder and preprocessing read their input through :func:`iter_documents`, so a
corpus is understood the same way everywhere:

* ``.txt``: one document per line (``txt_mode="line"``), or documents separated by blank lines
  (``txt_mode="paragraph"``; the lines of a paragraph are joined with ``\\n``).
* ``.jsonl``: one JSON object per line; the document is the string under ``text_key``.
* Either may be compressed: ``.gz`` (gzip) or ``.zst`` / ``.zstd`` (Zstandard).

Files are read line by line, so memory stays constant however large the corpus is (one line is held
at a time). Problems are reported with the file and the 1-based line number (and the byte offset of
invalid UTF-8, counted in the decompressed stream). With ``on_error="skip"`` a bad line is counted by
reason in :class:`ReadStats` instead of stopping the run. Documents that are empty or contain only
whitespace are always skipped and counted under ``"empty"``.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import pathlib
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Literal, Optional, Sequence, Union

import zstandard

#: file name endings (after removing a compression suffix) and the format they are read as
TEXT_SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: compression suffixes understood by :func:`open_binary`
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")

#: skip reasons counted in :attr:`ReadStats.skipped`
SKIP_REASONS = ("empty", "invalid_utf8", "invalid_json", "not_object", "missing_key", "not_string", "lone_surrogate")


class CorpusError(ValueError):
    """A problem with the input corpus; the message names the file, and the line where it applies."""


@dataclass(frozen=True)
class Document:
    """One document of the corpus."""

    text: str
    #: path of the file it came from
    source: str
    #: 1-based line of the file where the document starts
    line: int
    #: language given in the JSONL record under ``lang_key`` (None when not asked for or absent)
    lang: Optional[str] = None


@dataclass
class ReadStats:
    """Counters filled in while :func:`iter_documents` reads."""

    #: documents yielded
    documents: int = 0
    #: UTF-8 bytes of the yielded document texts
    bytes: int = 0
    #: reason -> number of skipped documents or lines (see :data:`SKIP_REASONS`)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


# --------------------------------------------------------------------------------------------------
# Which files
# --------------------------------------------------------------------------------------------------


def file_format(path: Union[str, os.PathLike]) -> str:
    """``"txt"`` or ``"jsonl"`` from the file name (a compression suffix is looked through)."""
    name = os.fspath(path).lower()
    for comp in COMPRESSION_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    for suffix, fmt in TEXT_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    known = ", ".join(TEXT_SUFFIXES)
    raise CorpusError(
        f"{path}: unsupported file type; expected one of {known}, optionally compressed with .gz or .zst"
    )


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def expand_inputs(spec: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> list[pathlib.Path]:
    """Resolve an input spec into the sorted, de-duplicated list of files it names.

    ``spec`` is a path, a glob (``**`` recurses), a comma-separated list of those, or a sequence of
    them. A missing file, a glob that matches nothing, a directory or an unsupported file type
    raises :class:`CorpusError`.
    """
    if isinstance(spec, (str, os.PathLike)):
        items = [s.strip() for s in os.fspath(spec).split(",")]
    else:
        items = [os.fspath(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise CorpusError("no input files given")
    found: dict[str, pathlib.Path] = {}
    for item in items:
        item = os.path.expanduser(item)
        if _has_glob(item):
            matches = [m for m in glob.glob(item, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise CorpusError(f"{item}: the pattern matches no files")
        elif os.path.isdir(item):
            raise CorpusError(f"{item}: is a directory; name its files, e.g. '{os.path.join(item, '*.jsonl')}'")
        elif not os.path.isfile(item):
            raise CorpusError(f"{item}: no such file")
        else:
            matches = [item]
        for m in matches:
            path = pathlib.Path(m)
            file_format(path)
            found.setdefault(str(path.resolve()), path)
    return sorted(found.values(), key=lambda p: str(p))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def open_binary(path: Union[str, os.PathLike]) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing ``.gz`` and ``.zst``/``.zstd`` on the fly."""
    name = os.fspath(path).lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        raw = open(path, "rb")
        # read_across_frames: files written by `zstd` in several frames (or concatenated) read whole.
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


#: what a truncated or corrupt .gz / .zst stream raises while it is read
_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, zstandard.ZstdError)


def _iter_lines(path: pathlib.Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line, line without its terminator) for every line."""
    offset = 0
    number = 0
    with open_binary(path) as fh:
        try:
            for number, raw in enumerate(fh, start=1):
                size = len(raw)
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                    if raw.endswith(b"\r"):
                        raw = raw[:-1]
                yield number, offset, raw
                offset += size
        except _DECOMPRESSION_ERRORS as e:
            # A truncated or corrupt archive: nothing after this point can be trusted, so this is
            # an error even with on_error="skip".
            raise CorpusError(f"{path}: cannot decompress after line {number} (byte {offset}): {e}") from e


class _Problem(Exception):
    """A bad line: ``reason`` is the skip counter, ``message`` the text of the CorpusError."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _decode(raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        raise _Problem(
            "invalid_utf8",
            f"invalid UTF-8 at byte offset {offset + e.start} (byte 0x{bad})",
        ) from None


def _check_encodable(text: str) -> int:
    """UTF-8 length of ``text``; JSON escapes can produce lone surrogates that no file can hold."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        raise _Problem("lone_surrogate", f"lone surrogate \\u{code:04x} at character {e.start}") from None


def _json_text(line: str, text_key: str, lang_key: Optional[str]) -> tuple[str, Optional[str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Problem("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise _Problem("not_object", f"expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise _Problem("missing_key", f"no key '{text_key}' (keys: {keys}); set text_key")
    text = record[text_key]
    if not isinstance(text, str):
        raise _Problem("not_string", f"'{text_key}' is {type(text).__name__}, not a string")
    lang = record.get(lang_key) if lang_key else None
    return text, lang if isinstance(lang, str) else None


def iter_documents(
    paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]],
    *,
    text_key: str = "text",
    txt_mode: Literal["line", "paragraph"] = "line",
    on_error: Literal["fail", "skip"] = "fail",
    stats: Optional[ReadStats] = None,
    lang_key: Optional[str] = None,
) -> Iterator[Document]:
    """Stream the documents of ``paths`` in order.

    ``paths`` is anything :func:`expand_inputs` accepts (already expanded lists pass through
    unchanged). ``text_key`` names the text field of JSONL records; ``lang_key``, if given, the field
    holding a language label copied into :attr:`Document.lang`. ``txt_mode`` says how ``.txt`` files
    divide into documents. With ``on_error="fail"`` the first bad line raises :class:`CorpusError`
    (file:line and what is wrong); with ``"skip"`` it is counted in ``stats.skipped`` by reason.
    ``stats``, when given, is updated before each document is yielded.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if txt_mode not in ("line", "paragraph"):
        raise ValueError(f"txt_mode must be 'line' or 'paragraph', got {txt_mode!r}")
    stats = stats if stats is not None else ReadStats()
    for path in expand_inputs(paths):
        fmt = file_format(path)
        if fmt == "jsonl":
            yield from _read_jsonl(path, text_key, lang_key, on_error, stats)
        elif txt_mode == "paragraph":
            yield from _read_paragraphs(path, on_error, stats)
        else:
            yield from _read_txt_lines(path, on_error, stats)


def _problem(path: pathlib.Path, number: int, problem: _Problem, on_error: str, stats: ReadStats) -> None:
    if on_error == "fail":
        raise CorpusError(f"{path}:{number}: {problem.message}")
    stats.skip(problem.reason)


def _emit(text: str, size: int, path: pathlib.Path, number: int, lang: Optional[str], stats: ReadStats):
    """The document to yield, or None (counted as empty) when it has no visible content."""
    if not text or text.isspace():
        stats.skip("empty")
        return None
    stats.documents += 1
    stats.bytes += size
    return Document(text=text, source=str(path), line=number, lang=lang)


def _read_jsonl(path, text_key, lang_key, on_error, stats) -> Iterator[Document]:
    for number, offset, raw in _iter_lines(path):
        if not raw.strip():
            stats.skip("empty")
            continue
        try:
            text, lang = _json_text(_decode(raw, offset), text_key, lang_key)
            size = _check_encodable(text)
        except _Problem as p:
            _problem(path, number, p, on_error, stats)
            continue
        doc = _emit(text, size, path, number, lang, stats)
        if doc is not None:
            yield doc


def _read_txt_lines(path, on_error, stats) -> Iterator[Document]:
    for number, offset, raw in _iter_lines(path):
        try:
            text = _decode(raw, offset)
        except _Problem as p:
            _problem(path, number, p, on_error, stats)
            continue
        doc = _emit(text, len(raw), path, number, None, stats)
        if doc is not None:
            yield doc


def _read_paragraphs(path, on_error, stats) -> Iterator[Document]:
    lines: list[str] = []
    start = 0
    size = 0
    bad = False  # a paragraph with an undecodable line is skipped whole, not silently shortened

    def finish():
        if bad:
            return None
        if not lines:
            return None
        return _emit("\n".join(lines), size + len(lines) - 1, path, start, None, stats)

    for number, offset, raw in _iter_lines(path):
        if not raw.strip():
            doc = finish()
            if doc is not None:
                yield doc
            lines, size, bad = [], 0, False
            continue
        if not lines and not bad:
            start = number
        try:
            text = _decode(raw, offset)
        except _Problem as p:
            _problem(path, number, p, on_error, stats)
            bad = True
            continue
        lines.append(text)
        size += len(raw)
    doc = finish()
    if doc is not None:
        yield doc


__all__ = [
    "CorpusError",
    "Document",
    "ReadStats",
    "expand_inputs",
    "file_format",
    "iter_documents",
    "open_binary",
]
