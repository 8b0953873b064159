"""Raw text to Megatron indexed datasets, in parallel, with ordered output and atomic publication.

The main process streams documents with :func:`tanuki.textio.iter_documents`, groups them into
batches, hands the batches to ``workers`` encoding processes and writes the results strictly in
input order, so the output does not depend on the number of workers (it is byte-identical). At most
a few batches per worker are in flight, which bounds memory however large the corpus is.

Each document becomes one sequence of the output (Megatron's ``preprocess_data.py`` without sentence
splitting), followed by the end-of-document token when ``append_eos`` is set (Megatron's
``--append-eod``). Files are written as ``PREFIX.bin.partial-PID`` / ``PREFIX.idx.partial-PID`` and
renamed to ``PREFIX.bin`` / ``PREFIX.idx`` only after every document was written and both files were
flushed; the ``.idx`` is renamed last. A run that stops early (an error, Ctrl-C, ``kill``) therefore
never leaves a pair that looks like a finished dataset.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tanuki.config import ConfigError
from tanuki.data.config import PreprocessConfig
from tanuki.data.indexed import (
    IndexedDatasetWriter,
    bin_path,
    check_vocab_fits,
    idx_path,
    token_dtype,
)
from tanuki.textio import ReadStats, expand_inputs, iter_documents
from tanuki.tokenizer import FastEncoder

# Batches in flight per worker: enough to keep every worker busy while the main process writes,
# few enough that memory stays at a handful of batches.
_IN_FLIGHT_PER_WORKER = 4
# A batch is also cut at this many characters, so corpora of very long documents keep batches small.
_BATCH_CHARS = 4 << 20


class PreprocessError(ValueError):
    """A problem with the inputs of a run that is not a config key: the tokenizer, an empty corpus."""


@dataclass
class PreprocessSummary:
    """What a preprocessing run read and wrote."""

    #: output prefixes, in order
    prefixes: list[str]
    documents: int
    tokens: int
    #: UTF-8 bytes of the documents that were encoded
    bytes: int
    seconds: float
    #: reason -> documents or lines skipped
    skipped: dict[str, int] = field(default_factory=dict)
    dtype: str = "uint16"
    workers: int = 1

    def format(self) -> str:
        """A human-readable summary."""
        secs = max(self.seconds, 1e-9)
        lines = [
            f"documents: {self.documents:,}",
            f"tokens:    {self.tokens:,} ({self.dtype})",
            f"input:     {self.bytes / 1e6:,.1f} MB of text",
            f"time:      {self.seconds:,.1f} s with {self.workers} worker(s): {self.documents / secs:,.0f} docs/s, "
            f"{self.tokens / secs:,.0f} tokens/s, {self.bytes / 1e6 / secs:,.2f} MB/s",
        ]
        skipped = sum(self.skipped.values())
        if skipped:
            reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.skipped.items()))
            lines.append(f"skipped:   {skipped:,} ({reasons})")
        else:
            lines.append("skipped:   0")
        for p in self.prefixes:
            lines.append(f"wrote:     {p}.bin ({bin_path(p).stat().st_size / 1e6:,.1f} MB) + {p}.idx")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Encoding (runs in the worker processes, or in the main process with one worker)
# --------------------------------------------------------------------------------------------------

_encoder = None
_dtype: np.dtype = np.dtype(np.uint16)
_eos: int | None = None


def _init_encoder(tokenizer_dir: str, dtype: str, eos: int | None, in_worker: bool) -> None:
    global _encoder, _dtype, _eos
    # One core per encoder: the Rust tokenizer would otherwise start a thread per core in every
    # worker, and `workers` would no longer say how many cores the run uses.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    if in_worker:
        # The main process handles Ctrl-C and `kill` and then terminates the pool; workers that
        # reacted too would only print a traceback each.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _encoder = FastEncoder(tokenizer_dir)
    _dtype = np.dtype(dtype)
    _eos = eos


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` concatenated (EOS after each when configured), and each document's length."""
    ids = _encoder.encode_batch(texts)
    if _eos is not None:
        for seq in ids:
            seq.append(_eos)
    lengths = np.fromiter((len(s) for s in ids), np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), _dtype, count=int(lengths.sum()))
    return tokens, lengths


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


class _ShardedOutput:
    """Writes shards ``PREFIX`` (or ``PREFIX_00000``, ... with a shard size) under temporary names."""

    def __init__(self, prefix: str, dtype: np.dtype, shard_size: int):
        self.prefix, self.dtype, self.shard_size = prefix, dtype, shard_size
        self.done: list[str] = []
        self.partial: list[Path] = []
        self.writer: IndexedDatasetWriter | None = None
        self.documents = 0
        self.tokens = 0

    def _name(self, i: int) -> str:
        return f"{self.prefix}_{i:05d}" if self.shard_size else self.prefix

    def _open(self) -> IndexedDatasetWriter:
        name = self._name(len(self.done))
        tag = f".partial-{os.getpid()}"
        b, i = Path(f"{bin_path(name)}{tag}"), Path(f"{idx_path(name)}{tag}")
        self.partial += [b, i]
        self.writer = IndexedDatasetWriter(b, i, self.dtype)
        return self.writer

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.finish()
            self.done.append(self._name(len(self.done)))
            self.writer = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.documents += len(lengths)
        self.tokens += len(tokens)
        if not self.shard_size:
            (self.writer or self._open()).add_documents(tokens, lengths)
            return
        # Split the batch where the current shard would exceed shard_size (a shard always takes at
        # least one document, so a single huge document still lands somewhere).
        start_doc, start_tok = 0, 0
        while start_doc < len(lengths):
            w = self.writer or self._open()
            room = self.shard_size - w.num_tokens
            cum = np.cumsum(lengths[start_doc:])
            fit = int(np.searchsorted(cum, room, side="right"))
            if fit == 0 and w.num_documents == 0:
                fit = 1
            if fit:
                n_tok = int(cum[fit - 1])
                w.add_documents(tokens[start_tok : start_tok + n_tok], lengths[start_doc : start_doc + fit])
                start_doc += fit
                start_tok += n_tok
            if w.num_tokens >= self.shard_size or start_doc < len(lengths):
                self._close()

    def publish(self) -> list[str]:
        """Finish the last shard and rename every shard into place (``.bin`` first, ``.idx`` last)."""
        self._close()
        tag = f".partial-{os.getpid()}"
        for name in self.done:
            final_bin, final_idx = bin_path(name), idx_path(name)
            # Drop an old index before replacing its data, so no moment pairs an old .idx with a new .bin.
            final_idx.unlink(missing_ok=True)
            os.replace(f"{final_bin}{tag}", final_bin)
            os.replace(f"{final_idx}{tag}", final_idx)
        self.partial = []
        return list(self.done)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        for p in self.partial:
            p.unlink(missing_ok=True)
        self.partial = []


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _batches(docs: Iterable[str], batch_size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) >= batch_size or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _ordered_map(pool, fn: Callable, items: Iterator, window: int) -> Iterator:
    """``pool.imap(fn, items)`` with at most ``window`` items in flight (``imap`` reads ahead without limit)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Progress:
    """A tqdm bar counting documents, with tokens/s and MB/s alongside."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            self.bar = tqdm(unit=" docs", unit_scale=True, dynamic_ncols=True, mininterval=0.5)
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        if self.bar is None:
            return
        self.bar.update(docs)
        now = time.perf_counter()
        if now - self.last >= 0.5:
            secs = max(now - self.start, 1e-9)
            self.bar.set_postfix_str(f"{tokens / secs:,.0f} tokens/s, {nbytes / 1e6 / secs:,.2f} MB/s", refresh=False)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def resolve_dtype(cfg_dtype: str, vocab_size: int) -> np.dtype:
    """The token dtype for ``cfg.dtype`` and a vocabulary; raises ``ValueError`` if it cannot hold it."""
    try:
        if cfg_dtype == "auto":
            return token_dtype(vocab_size)
        return check_vocab_fits(vocab_size, cfg_dtype)
    except ValueError as e:
        raise PreprocessError(str(e)) from None


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    """Tokenize ``cfg.input`` into ``cfg.output_prefix`` (see the module docstring)."""
    for key, example in (("input", "<file|glob|list>"), ("tokenizer", "<dir>"), ("output_prefix", "<path>")):
        if not getattr(cfg, key):
            raise ConfigError(key, f"is required: {key}={example}")
    start = time.perf_counter()
    paths = expand_inputs(cfg.input)
    probe = FastEncoder(cfg.tokenizer)
    dtype = resolve_dtype(cfg.dtype, probe.vocab_size)
    eos = None
    if cfg.append_eos:
        eos = probe.eos_id
        if eos is None or eos < 0:  # the encoder reports a missing token as -1
            raise PreprocessError(f"tokenizer {cfg.tokenizer} has no end-of-document token; set append_eos=false")
    del probe
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)

    stats = ReadStats()
    short = short_bytes = 0

    def texts() -> Iterator[str]:
        nonlocal short, short_bytes
        for doc in iter_documents(paths, text_key=cfg.text_key, txt_mode=cfg.txt_mode, on_error=cfg.on_error, stats=stats):
            if len(doc.text) < cfg.min_chars:
                short += 1
                short_bytes += len(doc.text.encode("utf-8", "surrogatepass"))
                continue
            yield doc.text

    out = _ShardedOutput(cfg.output_prefix, dtype, cfg.shard_size)
    progress = _Progress(cfg.progress)
    pool = None
    # `kill` (SIGTERM) should clean up like Ctrl-C does; SIGKILL cannot be caught, and the partial
    # names are what keep its leftovers from looking like a dataset.
    previous = _raise_on_sigterm()
    try:
        batches = _batches(texts(), cfg.batch_size)
        if cfg.workers == 1:
            _init_encoder(cfg.tokenizer, dtype.str, eos, in_worker=False)
            results: Iterator = map(_encode_batch, batches)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(cfg.workers, initializer=_init_encoder, initargs=(cfg.tokenizer, dtype.str, eos, True))
            results = _ordered_map(pool, _encode_batch, batches, cfg.workers * _IN_FLIGHT_PER_WORKER)
        for tokens, lengths in results:
            out.add(tokens, lengths)
            progress.update(len(lengths), out.tokens, stats.bytes - short_bytes)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if out.documents == 0:
            # Megatron's reader cannot map an empty .bin, and an empty dataset is never what was meant.
            skipped = {**stats.skipped, **({"short": short} if short else {})}
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"
            raise PreprocessError(f"no documents to write from {len(paths)} input file(s) (skipped: {reasons})")
        prefixes = out.publish()
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        out.discard()
        _restore_sigterm(previous)

    skipped = dict(stats.skipped)
    if short:
        skipped["short"] = short
    return PreprocessSummary(
        prefixes=prefixes,
        documents=out.documents,
        tokens=out.tokens,
        bytes=stats.bytes - short_bytes,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        dtype=str(dtype),
        workers=cfg.workers,
    )


def _raise_on_sigterm():
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
