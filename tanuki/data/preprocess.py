"""Raw text to Megatron indexed datasets, in parallel, with ordered output and atomic publication.

The main process streams documents with :func:`tanuki.textio.iter_documents`, groups them into
batches, hands the batches to ``workers`` encoding processes and writes the results strictly in
input order, so the output does not depend on the number of workers (it is byte-identical). At most
a few batches per worker are in flight, which bounds memory however large the corpus is.

Each document becomes one sequence of the output (Megatron's ``preprocess_data.py`` without sentence
splitting): the tokenizer's BOS when ``bos`` says so, the text's ids, and the end-of-document token
when ``append_eos`` is set (Megatron's ``--append-eod``). By default (``bos: auto``) a document is
what the field writes, ``tokenizer(text).input_ids + [EOS]`` (Megatron with ``--tokenizer-type
HuggingFaceTokenizer``, llm-jp): BOS exactly when the tokenizer's post-processor adds one (tanuki's
does). Literal special-token text inside a document stays text (FastEncoder), where the Hugging Face
call would read it as a control token.

``PREFIX.json`` records the convention (:func:`dataset_metadata`): BOS and EOS and their ids, the
tokenizer; pretraining warns when its datasets disagree with each other or with the tokenizer
(:func:`check_bos_convention`). Files are written as ``PREFIX.bin.partial-PID`` /
``PREFIX.json.partial-PID`` / ``PREFIX.idx.partial-PID`` and renamed to ``PREFIX.bin`` /
``PREFIX.json`` / ``PREFIX.idx`` only after every document was written and the files were flushed;
the ``.idx`` is renamed last. A run that stops early (an error, Ctrl-C, ``kill``) therefore
never leaves a pair that looks like a finished dataset.
"""

from __future__ import annotations

import collections
import itertools
import json
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
_bos: int | None = None


def _init_encoder(tokenizer_dir: str, dtype: str, eos: int | None, in_worker: bool, bos: int | None = None) -> None:
    global _encoder, _dtype, _eos, _bos
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
    _bos = bos


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` concatenated (BOS before and EOS after each when configured), and each
    document's length."""
    ids = _encoder.encode_batch(texts)
    if _bos is not None:
        ids = [[_bos, *seq] for seq in ids]
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

    def __init__(self, prefix: str, dtype: np.dtype, shard_size: int, metadata: dict | None = None):
        self.prefix, self.dtype, self.shard_size = prefix, dtype, shard_size
        #: written as PREFIX.json beside every shard
        self.metadata = metadata or {}
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
            final_bin, final_idx, final_json = bin_path(name), idx_path(name), metadata_path(name)
            tmp_json = Path(f"{final_json}{tag}")
            self.partial.append(tmp_json)
            tmp_json.write_text(json.dumps(self.metadata, indent=2) + "\n", encoding="utf-8")
            # Drop an old index before replacing its data, so no moment pairs an old .idx with a new .bin.
            final_idx.unlink(missing_ok=True)
            os.replace(f"{final_bin}{tag}", final_bin)
            os.replace(tmp_json, final_json)
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
    bos = resolve_bos(cfg.bos, cfg.tokenizer, probe.bos_id)
    metadata = dataset_metadata(cfg.tokenizer, bos=bos, eos=eos, vocab_size=probe.vocab_size)
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

    out = _ShardedOutput(cfg.output_prefix, dtype, cfg.shard_size, metadata)
    progress = _Progress(cfg.progress)
    pool = None
    # `kill` (SIGTERM) should clean up like Ctrl-C does; SIGKILL cannot be caught, and the partial
    # names are what keep its leftovers from looking like a dataset.
    previous = _raise_on_sigterm()
    try:
        batches = _batches(texts(), cfg.batch_size)
        if cfg.workers == 1:
            _init_encoder(cfg.tokenizer, dtype.str, eos, in_worker=False, bos=bos)
            results: Iterator = map(_encode_batch, batches)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(cfg.workers, initializer=_init_encoder, initargs=(cfg.tokenizer, dtype.str, eos, True, bos))
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


# --------------------------------------------------------------------------------------------------
# The BOS convention and the dataset's metadata (PREFIX.json)
# --------------------------------------------------------------------------------------------------

#: ``format`` of PREFIX.json
METADATA_FORMAT = "tanuki.dataset"


def metadata_path(prefix: str | os.PathLike) -> Path:
    """``PREFIX.json``: how the documents of ``PREFIX.bin`` were written."""
    return Path(f"{os.fspath(prefix)}.json")


def tokenizer_bos_id(tokenizer_dir: str | os.PathLike) -> int | None:
    """The id the tokenizer's post-processor puts before a text (its BOS, what ``tokenizer(text)``
    starts with in transformers), or None when it adds nothing in front."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = Tokenizer.from_file(str(path))
    with_specials, plain = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
    added = len(with_specials) - len(plain)
    if added >= 1 and with_specials[added:] == plain:
        return with_specials[0]
    return None


def resolve_bos(setting, tokenizer_dir: str, bos_id: int | None) -> int | None:
    """The BOS id every document starts with for ``preprocess.bos`` (None: no BOS)."""
    if setting == "auto":
        return tokenizer_bos_id(tokenizer_dir)
    if not setting:
        return None
    if bos_id is None or bos_id < 0:
        raise PreprocessError(f"tokenizer {tokenizer_dir} has no BOS token; set bos=false (or auto)")
    return bos_id


def dataset_metadata(tokenizer_dir: str, *, bos: int | None, eos: int | None, vocab_size: int) -> dict:
    """Contents of ``PREFIX.json``."""
    return {
        "format": METADATA_FORMAT,
        "version": 1,
        "bos": bos is not None,
        "bos_id": bos,
        "eos": eos is not None,
        "eos_id": eos,
        "tokenizer": os.path.abspath(tokenizer_dir),
        "tokenizer_vocab_size": vocab_size,
        "tokenizer_adds_bos": tokenizer_bos_id(tokenizer_dir) is not None,
    }


def read_dataset_metadata(prefix: str | os.PathLike) -> dict | None:
    """``PREFIX.json``, or None for a dataset without one (written by tanuki before it recorded the
    convention, in which case its documents have no BOS, or by another tool)."""
    path = metadata_path(prefix)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == METADATA_FORMAT else None


def check_bos_convention(prefixes, tokenizer_dir: str) -> list[str]:
    """Warnings (empty when all is well) about the BOS convention of the datasets ``prefixes`` trained
    with the tokenizer ``tokenizer_dir``: datasets that disagree with each other, or with the
    tokenizer (it adds BOS, so a model trained without BOS is scored by other tools on inputs that
    start with one, or the other way round)."""
    tokenizer_bos = tokenizer_bos_id(tokenizer_dir)
    known, unknown = {}, []
    for prefix in prefixes:
        meta = read_dataset_metadata(prefix)
        if meta is None:
            unknown.append(str(prefix))
        else:
            known[str(prefix)] = meta.get("bos_id") if meta.get("bos") else None
    out = []
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{p} ({'BOS ' + str(b) if b is not None else 'no BOS'})" for p, b in known.items())
        out.append(f"the datasets disagree on BOS: {listing}; re-preprocess them with one preprocess.bos setting")
    for prefix, bos in known.items():
        if bos != tokenizer_bos:
            has = f"starts documents with id {bos}" if bos is not None else "has no BOS"
            wants = f"adds BOS {tokenizer_bos}" if tokenizer_bos is not None else "adds no BOS"
            out.append(f"dataset {prefix} {has} but the tokenizer {tokenizer_dir} {wants} (tokenizer(text) in "
                       "transformers / lm-evaluation-harness); re-preprocess with bos=auto")
    if unknown and tokenizer_bos is not None:
        out.append(f"{len(unknown)} dataset(s) without PREFIX.json ({', '.join(unknown[:3])}): written before tanuki "
                   f"recorded its BOS convention (no BOS) or by another tool, while the tokenizer adds BOS "
                   f"{tokenizer_bos}; re-preprocess them with bos=auto")
    return out
