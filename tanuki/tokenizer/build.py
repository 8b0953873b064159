"""Build a tokenizer: read the corpus, train SentencePiece Unigram, write a Hugging Face directory.

Stages (each shows progress on stderr):

1. read: stream the documents (:mod:`tanuki.textio`), split them into lines (SentencePiece trains on
   lines; a newline is never inside a piece and is encoded as the byte piece ``<0x0A>``), count
   lines over ``max_sentence_length`` and skip or split them, keep a seeded sample of documents for
   the report. Without ``sample_sentences`` the lines stream straight into SentencePiece, which
   holds them in memory as it must; with it, a seeded reservoir sample of that many lines is kept,
   so the corpus itself may be larger than memory.
2. train: SentencePiece Unigram with byte fallback, digits split, whitespace kept, ``<unk> <s> </s>
   <pad>`` and the user-defined tokens first, then the 256 byte pieces.
3. write: ``tokenizer.model``, ``tokenizer.json`` (:mod:`tanuki.tokenizer.convert`),
   ``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``, ``report.json``.

Everything is written into a hidden directory beside the output and renamed into place at the end,
so a failed or interrupted build never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, TextIO

import psutil
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tqdm import tqdm

from tanuki.config import pad_vocab_size, to_dict
from tanuki.textio import Document, ReadStats, expand_inputs, iter_documents
from tanuki.tokenizer import convert
from tanuki.tokenizer import report as report_mod
from tanuki.tokenizer.config import NUM_BYTE_PIECES, BuildTokenizerConfig
from tanuki.tokenizer.encode import BUILDER_MARK, FastEncoder
from tanuki.tokenizer.templates import DEFAULT_CHAT_TEMPLATE

try:
    import resource  # Unix only
except ImportError:  # Windows: psutil reports the peak instead
    resource = None


class TokenizerBuildError(RuntimeError):
    """The tokenizer could not be built from this corpus with these settings."""


@dataclass
class LineStats:
    """What the read stage fed (or did not feed) to SentencePiece."""

    lines: int = 0
    line_bytes: int = 0
    long_lines: int = 0
    long_line_bytes: int = 0
    training_lines: int = 0
    training_bytes: int = 0


@dataclass
class _Reservoir:
    """Uniform sample of at most ``size`` items from a stream (Vitter's algorithm R), seeded."""

    size: int
    seed: int
    items: list = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def offer(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        j = self._rng.randrange(self.seen)
        if j < self.size:
            self.items[j] = item


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Cut ``line`` into chunks of at most ``max_bytes`` UTF-8 bytes, at a space where one is near."""
    chunks = []
    data = line.encode("utf-8")
    start = 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        while end > start and (data[end] & 0xC0) == 0x80:  # do not cut inside a character
            end -= 1
        space = data.rfind(b" ", start + max_bytes // 2, end)
        if space > start:
            end = space
        chunks.append(data[start:end].decode("utf-8"))
        start = end
    chunks.append(data[start:].decode("utf-8"))
    return [c for c in chunks if c]


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------


def _bar(stream: Optional[TextIO], enabled: bool, **kwargs):
    return tqdm(file=stream or sys.stderr, disable=not enabled, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def _native_stderr_lines(on_line: Callable[[str], None]):
    """Send what native code writes to fd 2 (SentencePiece's log) line by line to ``on_line``.

    SentencePiece reports its training progress only through its C++ log. While this is active,
    fd 2 is a pipe read by a thread; the context value is a text stream on the original stderr,
    where progress bars are drawn.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    real = io.TextIOWrapper(io.FileIO(saved, "w", closefd=False), line_buffering=True, encoding="utf-8", errors="replace")

    def pump() -> None:
        with io.TextIOWrapper(io.FileIO(read_fd, "r", closefd=True), encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                on_line(line.rstrip("\n"))

    thread = threading.Thread(target=pump, name="sentencepiece-log", daemon=True)
    thread.start()
    try:
        yield real
    finally:
        sys.stderr.flush()
        real.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end, so the reader sees end of file
        thread.join(timeout=10)
        os.close(saved)


class _TrainingProgress:
    """Turns SentencePiece's log lines into a progress bar and keeps the tail for error messages.

    Unigram training starts from a large seed vocabulary and alternates EM steps with pruning by
    ``shrinking_factor`` until the vocabulary is small enough; progress is the fraction of that way
    done on a log scale, ``log(seed / size) / log(seed / vocab_size)``. The bar appears once
    SentencePiece has loaded every line, i.e. when reading is over.
    """

    def __init__(self, vocab_size: int, enabled: bool):
        self.vocab_size = vocab_size
        self.enabled = enabled
        self.stream: Optional[TextIO] = None
        self.tail: list[str] = []
        self.seed_size: Optional[int] = None
        self.bar = None

    def __call__(self, line: str) -> None:
        self.tail = (self.tail + [line])[-40:]
        if m := re.search(r"Loaded all (\d+) sentences", line):
            self.bar = _bar(self.stream, self.enabled, total=100, desc="training", unit="%",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
            self.bar.set_postfix_str(f"{int(m.group(1)):,} lines loaded")
        if self.bar is None:
            return
        if "Normalizing sentences" in line:
            self.bar.set_postfix_str("normalizing")
        elif "Extracting seed sentencepieces" in line:
            self.bar.set_postfix_str("extracting seed pieces")
        elif m := re.search(r"Initialized (\d+) seed pieces", line):
            self.seed_size = int(m.group(1))
            self.bar.set_postfix_str(f"{self.seed_size:,} seed pieces")
        elif m := re.search(r"EM sub_iter=(\d+) size=(\d+) obj=([\d.eE+-]+)", line):
            size = int(m.group(2))
            if self.seed_size and self.seed_size > self.vocab_size:
                done = math.log(self.seed_size / max(size, 1)) / math.log(self.seed_size / self.vocab_size)
                self._to(min(max(done, 0.0), 0.99))
            self.bar.set_postfix_str(f"EM: {size:,} pieces, objective {float(m.group(3)):.3f}")

    def _to(self, fraction: float) -> None:
        target = int(100 * fraction)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)

    def close(self, ok: bool) -> None:
        if self.bar is not None:
            if ok:
                self._to(1.0)
                self.bar.set_postfix_str("done")
            self.bar.close()


# --------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------


def _peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    if resource is None:
        return psutil.Process().memory_info().peak_wset / (1024 * 1024)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _prepare_output(output: str, overwrite: bool) -> str:
    output = os.path.abspath(output)
    if os.path.isfile(output):
        raise TokenizerBuildError(f"output {output} is a file; give a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise TokenizerBuildError(f"output {output} exists and is not empty; pass overwrite=true to replace it")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    return output


def _install(tmp_dir: str, output: str) -> None:
    """Move the finished ``tmp_dir`` to ``output``, replacing what was there."""
    old = None
    if os.path.exists(output):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
        os.rmdir(old)
        os.rename(output, old)
    os.rename(tmp_dir, output)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _training_lines(
    documents: Iterator[Document], cfg: BuildTokenizerConfig, lines: LineStats, report_sample: _Reservoir, bar
) -> Iterator[str]:
    """The lines SentencePiece trains on; fills ``lines`` and the report sample as it goes."""
    limit = cfg.max_sentence_length
    short = limit // 4  # a line of at most this many characters fits in `limit` UTF-8 bytes
    for doc in documents:
        report_sample.offer(doc)
        text = doc.text
        size = len(text.encode("utf-8"))
        bar.update(size)
        parts = text.split("\n")
        # bytes of all lines: the document without its newlines
        lines.line_bytes += size - (len(parts) - 1)
        lines.training_bytes += size - (len(parts) - 1)
        for line in parts:
            if not line:
                continue
            lines.lines += 1
            if len(line) > short and (n := len(line.encode("utf-8"))) > limit:
                lines.long_lines += 1
                lines.long_line_bytes += n
                if cfg.long_lines == "skip":
                    lines.training_bytes -= n
                    continue
                chunks = split_long_line(line, limit)
                lines.training_lines += len(chunks)
                yield from chunks
                continue
            lines.training_lines += 1
            yield line


def trainer_options(cfg: BuildTokenizerConfig, large: bool) -> dict:
    """The keyword arguments of ``SentencePieceTrainer.train`` that the build of ``cfg`` trains with
    (``large``: ``train_extremely_large_corpus``); the corpus and model writer are added by the caller."""
    s = cfg.special_tokens
    return dict(
        model_type="unigram",
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        normalization_rule_name=cfg.normalization,
        byte_fallback=True,
        split_digits=cfg.split_digits,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        max_sentencepiece_length=cfg.max_piece_length,
        max_sentence_length=cfg.max_sentence_length,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=s.unk,
        bos_piece=s.bos,
        eos_piece=s.eos,
        pad_piece=s.pad,
        user_defined_symbols=list(s.user_defined),
        required_chars=convert.required_chars(s),
        # sampling, when asked for, is done by the reader (seeded); the trainer takes every line
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=True,
        num_threads=cfg.threads or os.cpu_count() or 1,
        train_extremely_large_corpus=large,
        minloglevel=0,
    )


def _explain_training_error(
    err: Exception, cfg: BuildTokenizerConfig, n_lines: int, n_bytes: int, tail_lines: list[str]
) -> TokenizerBuildError:
    msg = str(err)
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return TokenizerBuildError(
            f"vocab_size={cfg.vocab_size} is too large for this corpus: SentencePiece can make at most "
            f"{m.group(2)} pieces from {n_lines:,} lines ({n_bytes / 1e6:.2f} MB). "
            f"Use vocab_size <= {m.group(2)} or give more text"
            + (" (or raise sample_sentences)." if cfg.sample_sentences else ".")
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return TokenizerBuildError(
            f"vocab_size={cfg.vocab_size} is too small: the corpus needs {m.group(2)} pieces for its characters and "
            f"special tokens alone (character_coverage={cfg.character_coverage}). Raise vocab_size or lower "
            f"character_coverage."
        )
    if "sentences_.empty()" in msg:
        return TokenizerBuildError("no training lines: the corpus is empty after skipping")
    tail = "\n".join(tail_lines[-10:])
    return TokenizerBuildError(f"SentencePiece training failed: {msg}\n{tail}")


def _check_layout(proto, cfg: BuildTokenizerConfig) -> None:
    """The id layout promised in :class:`SpecialTokens`: specials, then the 256 byte pieces."""
    specials = cfg.special_tokens.ordered
    pieces = [p.piece for p in proto.pieces]
    expected = specials + [convert.byte_piece(b) for b in range(NUM_BYTE_PIECES)]
    if pieces[: len(expected)] != expected:
        raise TokenizerBuildError(f"unexpected piece order from SentencePiece: {pieces[: len(expected)]}")
    if len(pieces) != cfg.vocab_size:
        raise TokenizerBuildError(f"SentencePiece made {len(pieces)} pieces, not vocab_size={cfg.vocab_size}")


@dataclass
class _Trained:
    """What reading and training produced."""

    model: bytes
    read: ReadStats
    lines: LineStats
    report_sample: list[Document]
    read_seconds: float
    train_seconds: float


def _read_and_train(cfg: BuildTokenizerConfig, files) -> _Trained:
    """Stream the corpus into SentencePiece (or into a sample first) and train."""
    t0 = time.perf_counter()
    read, lines = ReadStats(), LineStats()
    report_sample = _Reservoir(cfg.report_documents, cfg.seed + 1)
    documents = iter_documents(
        files, text_key=cfg.text_key, txt_mode=cfg.txt_mode, on_error=cfg.on_error, stats=read,
        lang_key=cfg.lang_key or None,
    )
    progress = _TrainingProgress(cfg.vocab_size, cfg.progress)
    model = io.BytesIO()
    read_done: dict = {}
    with _native_stderr_lines(progress) as real_stderr:
        progress.stream = real_stderr
        read_bar = _bar(real_stderr, cfg.progress, desc="reading", unit="B", unit_scale=True)
        stream = _training_lines(documents, cfg, lines, report_sample, read_bar)
        first = next(stream, None)
        if first is None:
            read_bar.close()
            raise TokenizerBuildError(_empty_message(files, read, lines, cfg))
        stream = itertools.chain([first], stream)
        if cfg.sample_sentences:
            read_bar.set_description_str("reading + sampling")
            sample = _Reservoir(cfg.sample_sentences, cfg.seed)
            for line in stream:
                sample.offer(line)
            read_bar.close()
            read_done["t"] = time.perf_counter()
            train_lines: Iterator[str] = iter(sample.items)
            n_lines, n_bytes = len(sample.items), sum(len(s.encode("utf-8")) for s in sample.items)
            large = n_bytes > _LARGE_CORPUS_BYTES
        else:
            # Streamed: reading ends when SentencePiece has loaded the last line.
            train_lines = _close_after(stream, read_bar, read_done)
            n_lines = n_bytes = 0
            large = _probably_large(files)
        guarded = _Guarded(train_lines)
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=guarded, model_writer=model, **trainer_options(cfg, large))
        except RuntimeError as e:
            progress.close(ok=False)
            if guarded.error is not None:  # raised while SentencePiece was reading our lines
                raise guarded.error
            if not cfg.sample_sentences:
                n_lines, n_bytes = lines.training_lines, lines.training_bytes
            raise _explain_training_error(e, cfg, n_lines, n_bytes, progress.tail) from None
        progress.close(ok=True)
    t_end = time.perf_counter()
    t_read_end = read_done.get("t", t_end)
    return _Trained(model.getvalue(), read, lines, report_sample.items, t_read_end - t0, t_end - t_read_end)


#: above this much training text SentencePiece needs 64-bit suffix-array indices
#: (train_extremely_large_corpus; its int32 arrays stop at 2**31 characters)
_LARGE_CORPUS_BYTES = 1 << 30


def _probably_large(files) -> bool:
    """Whether streamed input may exceed :data:`_LARGE_CORPUS_BYTES` (judged before reading it)."""
    size = 0
    for f in files:
        compressed = str(f).lower().endswith((".gz", ".zst", ".zstd"))
        size += os.path.getsize(f) * (5 if compressed else 1)  # text compresses about 3-5x
    return size > _LARGE_CORPUS_BYTES


def build_tokenizer(cfg: BuildTokenizerConfig, log: Optional[TextIO] = None) -> dict:
    """Build the tokenizer described by ``cfg`` into ``cfg.output`` and return its report.

    Raises :class:`~tanuki.textio.CorpusError` for unreadable input and :class:`TokenizerBuildError`
    when no tokenizer can be trained (empty corpus, vocab_size too large or too small, ...). In
    either case no output directory is created or changed. ``log`` receives the printed summary
    (stdout by default).
    """
    t_start = time.perf_counter()
    output = _prepare_output(cfg.output, cfg.overwrite)
    files = expand_inputs(cfg.inputs)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=os.path.dirname(output))
    try:
        trained = _read_and_train(cfg, files)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(trained.model)
        _check_layout(proto, cfg)
        convert.quantize_scores(proto)

        t_write = time.perf_counter()
        convert.write_tokenizer_files(tmp_dir, proto, cfg.special_tokens, cfg.normalization, DEFAULT_CHAT_TEMPLATE)
        t_report = time.perf_counter()
        result = _report(tmp_dir, cfg, files, trained)
        t_end = time.perf_counter()
        result["build"] = {
            "seconds": {
                "read": round(trained.read_seconds, 3),
                "train": round(trained.train_seconds, 3),
                "write": round(t_report - t_write, 3),
                "report": round(t_end - t_report, 3),
                "total": round(t_end - t_start, 3),
            },
            "peak_memory_mb": round(_peak_memory_mb(), 1),
            "threads": cfg.threads or os.cpu_count() or 1,
            "sentencepiece_version": spm.__version__,
        }
        with open(os.path.join(tmp_dir, "report.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=2)
            f.write("\n")
        _install(tmp_dir, output)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    print(report_mod.format_summary(result), file=log or sys.stdout)
    return result


class _Guarded:
    """Iterator wrapper that remembers an exception raised while SentencePiece consumes it.

    SentencePiece turns an exception from its sentence iterator into a RuntimeError carrying only
    the message; keeping the original lets the caller see the CorpusError (or the interrupt) itself.
    """

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.error: Optional[BaseException] = None

    def __iter__(self) -> "_Guarded":
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise


def _close_after(lines: Iterator[str], bar, done: dict) -> Iterator[str]:
    """Pass ``lines`` through; when they end, close the reading bar and note the time."""
    yield from lines
    done["t"] = time.perf_counter()
    bar.close()


def _empty_message(files, read: ReadStats, lines: LineStats, cfg: BuildTokenizerConfig) -> str:
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(read.skipped.items())) or "none"
    msg = f"the corpus is empty: no training text in {names} ({read.documents} documents; skipped: {skipped}"
    if lines.long_lines and cfg.long_lines == "skip":
        msg += f"; {lines.long_lines} lines over max_sentence_length={cfg.max_sentence_length} bytes were skipped"
    return msg + ")"


def _report(tmp_dir: str, cfg: BuildTokenizerConfig, files, trained: _Trained) -> dict:
    """report.json for the tokenizer just written into ``tmp_dir``."""
    read, lines, sample = trained.read, trained.lines, trained.report_sample
    encoder = FastEncoder(tmp_dir, backend="sentencepiece")
    with open(os.path.join(tmp_dir, "tokenizer.json"), encoding="utf-8") as f:
        surfaces = report_mod.piece_surfaces(json.load(f))
    languages, sources = report_mod.measure_compression(
        sample, encoder.encode_batch, report_mod.byte_piece_ids(surfaces), encoder.unk_id,
        decode_batch=report_mod.hf_decoder(tmp_dir),
    )
    # Check on the user's own text that tokenizer.json (what transformers runs) gives the fast
    # encoder's ids; the tokenizers library directly, to spare importing transformers.
    check = sample[:200]
    hf = FastEncoder(tmp_dir, backend="tokenizers")
    texts = [d.text for d in check]
    identical = sum(1 for a, b in zip(encoder.encode_batch(texts), hf.encode_batch(texts)) if a == b)
    s = cfg.special_tokens
    return {
        "builder": BUILDER_MARK,
        "output": os.path.abspath(cfg.output),
        "model": "Unigram",
        "vocab_size": encoder.vocab_size,
        "padded_vocab_size": pad_vocab_size(encoder.vocab_size, cfg.pad_to_multiple_of),
        "pad_to_multiple_of": cfg.pad_to_multiple_of,
        "normalization": cfg.normalization,
        "special_tokens": {
            "unk": {"token": s.unk, "id": encoder.unk_id},
            "bos": {"token": s.bos, "id": encoder.bos_id},
            "eos": {"token": s.eos, "id": encoder.eos_id},
            "pad": {"token": s.pad, "id": encoder.pad_id},
            "user_defined": [{"token": t, "id": 4 + i} for i, t in enumerate(s.user_defined)],
        },
        "byte_pieces": {"first_id": len(s.ordered), "last_id": len(s.ordered) + NUM_BYTE_PIECES - 1},
        "corpus": {
            "files": len(files),
            "documents": read.documents,
            "bytes": read.bytes,
            "skipped": dict(sorted(read.skipped.items())),
            "lines": lines.lines,
            "training_lines": lines.training_lines,
            "training_bytes": lines.training_bytes,
            "sampled_lines": cfg.sample_sentences or None,
            "max_sentence_length": cfg.max_sentence_length,
            "long_lines": lines.long_lines,
            "long_line_bytes": lines.long_line_bytes,
            "long_lines_action": "skipped" if cfg.long_lines == "skip" else "split",
        },
        "languages": languages,
        "language_labels": sources,
        "report_documents": len(sample),
        "unknown_tokens": languages["all"]["unknown_tokens"],
        "lost_characters": languages["all"]["lost_characters"],
        "hf_check": {"documents": len(check), "identical_ids": identical},
        "vocabulary": report_mod.vocabulary_stats(surfaces),
        "config": to_dict(cfg),
    }
