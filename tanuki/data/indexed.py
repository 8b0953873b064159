"""The Megatron indexed dataset: ``NAME.bin`` (token ids) + ``NAME.idx`` (where each document lies).

Layout (version 1, little-endian), as written by Megatron-LM's ``IndexedDatasetBuilder`` and read by
``megatron.core.datasets.indexed_dataset.IndexedDataset``:

``.bin``
    every token id of every sequence, back to back, in one dtype.
``.idx``
    ``b"MMIDIDX\\x00\\x00"`` (9 bytes), version ``<Q`` = 1, dtype code ``<B``, sequence count ``<Q``,
    document-index count ``<Q`` (34 bytes), then ``int32`` sequence lengths (one per sequence),
    ``int64`` byte offsets of each sequence in ``.bin`` (one per sequence) and ``int64`` document
    indices: the sequence index at which each document starts, beginning with 0 and ending with the
    sequence count (so there is one more entry than there are documents).

Megatron may split a document into several sequences (sentence splitting); tanuki writes one sequence
per document. The reader accepts both and exposes documents, because sequences of one document are
contiguous in ``.bin``: a document is always a single zero-copy slice.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 document-index count

#: dtype code -> numpy dtype (Megatron's ``DType`` enum)
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}

#: Megatron picks uint16 for vocabularies below this size and int32 otherwise
#: (``DType.optimal_dtype``); the margin below 65,536 leaves room for a few added tokens.
UINT16_VOCAB_LIMIT = 65_500

# Validate document offsets this many sequences at a time, so that checking a file with hundreds of
# millions of documents never materialises more than a few hundred MB of temporaries.
_CHECK_CHUNK = 1 << 24


class IndexedFormatError(ValueError):
    """A ``.bin``/``.idx`` pair that is missing, truncated, corrupt or inconsistent; names the file."""


def bin_path(prefix: str | os.PathLike) -> Path:
    """``PREFIX.bin``."""
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    """``PREFIX.idx``."""
    return Path(f"{os.fspath(prefix)}.idx")


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """Whether both files of the dataset ``prefix`` exist."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron uses for a vocabulary: uint16 below 65,500 ids, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    if vocab_size < UINT16_VOCAB_LIMIT:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise ValueError(f"a vocabulary of {vocab_size} ids does not fit the int32 token dtype")


def check_vocab_fits(vocab_size: int, dtype: np.dtype | str) -> np.dtype:
    """Raise ``ValueError`` unless every id below ``vocab_size`` is representable in ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.int32)):
        raise ValueError(f"token dtype must be uint16 or int32, got {dtype}")
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(
            f"the tokenizer's vocabulary ({vocab_size} ids) does not fit the {dtype} token dtype "
            f"(largest id {np.iinfo(dtype).max}); use int32"
        )
    return dtype


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


class IndexedDataset:
    """A memory-mapped Megatron indexed dataset.

    ``ds.document(i)`` is the token array of document ``i`` (a zero-copy view into ``.bin``),
    ``ds[i]`` is sequence ``i`` as Megatron's reader returns it, ``ds.tokens`` is the whole ``.bin``.
    Opening validates the header, the file sizes and the offsets, so a truncated or corrupt pair fails
    here with :class:`IndexedFormatError` naming the file, not later deep inside numpy.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.idx_file = idx_path(prefix)
        self.bin_file = bin_path(prefix)
        missing = [str(p) for p in (self.idx_file, self.bin_file) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no indexed dataset at prefix '{self.prefix}': missing {', '.join(missing)}")

        idx_size = self.idx_file.stat().st_size
        with open(self.idx_file, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise IndexedFormatError(f"{self.idx_file}: truncated header ({len(header)} of {HEADER_SIZE} bytes)")
        if header[:9] != MAGIC:
            raise IndexedFormatError(f"{self.idx_file}: not a Megatron index (bad magic {header[:9]!r})")
        version, code, n_seq, n_doc_idx = struct.unpack("<QBQQ", header[9:HEADER_SIZE])
        if version != VERSION:
            raise IndexedFormatError(f"{self.idx_file}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedFormatError(f"{self.idx_file}: unknown dtype code {code}")
        self.dtype: np.dtype = DTYPE_CODES[code]
        if n_doc_idx < 1:
            raise IndexedFormatError(f"{self.idx_file}: empty document index (it must start with 0)")
        expected = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc_idx
        # Megatron's multimodal variant appends one int8 mode per sequence; anything else is damage.
        if idx_size not in (expected, expected + n_seq):
            raise IndexedFormatError(
                f"{self.idx_file}: {idx_size} bytes, but its header ({n_seq} sequences, {n_doc_idx - 1} "
                f"documents) needs {expected}; the file is truncated or corrupt"
            )

        self._idx_map = np.memmap(self.idx_file, mode="r", dtype=np.uint8)
        buf = self._idx_map
        off = HEADER_SIZE
        #: tokens per sequence (int32, memory-mapped)
        self.sequence_lengths: np.ndarray = np.frombuffer(buf, np.int32, n_seq, off)
        off += 4 * n_seq
        #: byte offset of each sequence in ``.bin`` (int64, memory-mapped)
        self.sequence_pointers: np.ndarray = np.frombuffer(buf, np.int64, n_seq, off)
        off += 8 * n_seq
        #: sequence index where each document starts, plus the final sequence count (int64)
        self.document_indices: np.ndarray = np.frombuffer(buf, np.int64, n_doc_idx, off)

        bin_size = self.bin_file.stat().st_size
        if bin_size % self.dtype.itemsize:
            raise IndexedFormatError(
                f"{self.bin_file}: {bin_size} bytes is not a whole number of {self.dtype} tokens; truncated?"
            )
        self._check_index(bin_size)
        if bin_size:
            self._bin_map = np.memmap(self.bin_file, mode="r", dtype=np.uint8)
            #: every token of the dataset, memory-mapped
            self.tokens: np.ndarray = np.frombuffer(self._bin_map, self.dtype)
        else:  # mmap cannot map an empty file
            self._bin_map = None
            self.tokens = np.empty(0, self.dtype)

        self._n_seq = n_seq

    def _check_index(self, bin_size: int) -> None:
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        n_seq = len(lengths)
        if docs[0] != 0 or docs[-1] != n_seq:
            raise IndexedFormatError(
                f"{self.idx_file}: document index must run from 0 to the sequence count {n_seq}, "
                f"got {int(docs[0])} .. {int(docs[-1])}; the file is corrupt"
            )
        if len(docs) > 1 and np.any(np.diff(docs) < 0):
            raise IndexedFormatError(f"{self.idx_file}: document index is not increasing; the file is corrupt")
        if n_seq == 0:
            if bin_size:
                raise IndexedFormatError(f"{self.bin_file}: {bin_size} bytes of data but the index lists no sequences")
            return
        item = self.dtype.itemsize
        for lo in range(0, n_seq, _CHECK_CHUNK):
            hi = min(lo + _CHECK_CHUNK, n_seq)
            ln = lengths[lo:hi].astype(np.int64)
            if np.any(ln < 0):
                raise IndexedFormatError(f"{self.idx_file}: negative sequence length; the file is corrupt")
            # Each sequence must start where the previous one ends (Megatron writes them back to back).
            expect_first = 0 if lo == 0 else int(pointers[lo - 1]) + int(lengths[lo - 1]) * item
            if int(pointers[lo]) != expect_first or np.any(np.diff(pointers[lo:hi]) != ln[:-1] * item):
                raise IndexedFormatError(
                    f"{self.idx_file}: sequence offsets do not match the sequence lengths; the file is corrupt"
                )
        end = int(pointers[-1]) + int(lengths[-1]) * item
        if end != bin_size:
            raise IndexedFormatError(
                f"{self.bin_file}: {bin_size} bytes, but {self.idx_file.name} describes {end}; "
                f"the pair is truncated or does not belong together"
            )

    # -- sequences (Megatron's view) ----------------------------------------------------------------

    def __len__(self) -> int:
        """Number of sequences (equal to the number of documents in files tanuki writes)."""
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sequence ``i`` (a read-only view)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    # -- documents -----------------------------------------------------------------------------------

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total number of tokens in ``.bin``."""
        return len(self.tokens)

    def document_offsets(self) -> np.ndarray:
        """Token offset where each document starts, plus the total token count (int64, computed)."""
        seq_starts = np.empty(self._n_seq + 1, np.int64)
        seq_starts[:-1] = self.sequence_pointers
        seq_starts[:-1] //= self.dtype.itemsize
        seq_starts[-1] = self.num_tokens
        return seq_starts[self.document_indices]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64, computed)."""
        return np.diff(self.document_offsets())

    def _token_offset(self, seq: int) -> int:
        if seq >= self._n_seq:
            return self.num_tokens
        return int(self.sequence_pointers[seq]) // self.dtype.itemsize

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``: a zero-copy view into the memory-mapped ``.bin``."""
        n = self.num_documents
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.prefix}")
        i %= n
        start = self._token_offset(int(self.document_indices[i]))
        end = self._token_offset(int(self.document_indices[i + 1]))
        return self.tokens[start:end]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset('{self.prefix}', documents={self.num_documents}, tokens={self.num_tokens}, "
            f"dtype={self.dtype})"
        )


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class IndexedDatasetWriter:
    """Stream documents into a ``.bin`` and write the matching ``.idx`` at :meth:`finish`.

    The files are written to exactly the paths given; atomic publication (temporary names, rename at
    the end) is the caller's job, see :mod:`tanuki.data.preprocess`. Each :meth:`add_documents` call
    takes a flat token array and the length of each document in it; one sequence per document.
    """

    def __init__(self, bin_file: str | os.PathLike, idx_file: str | os.PathLike, dtype: np.dtype | str):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.bin_file, self.idx_file = Path(bin_file), Path(idx_file)
        self._bin: BinaryIO | None = open(self.bin_file, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int] | np.ndarray) -> None:
        """Append documents: ``tokens`` is their concatenation, ``lengths`` the size of each."""
        assert self._bin is not None, "writer already finished"
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths add up to {int(lengths.sum())} tokens, got {len(tokens)}")
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2**31-1 tokens does not fit the index")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(lengths.astype(np.int32))
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self.add_documents(arr, [len(arr)])

    def finish(self) -> None:
        """Close ``.bin`` and write ``.idx``; both are flushed to disk before returning."""
        assert self._bin is not None, "writer already finished"
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._bin = None
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int32)
        self._lengths = []
        write_index(self.idx_file, self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))

    def abort(self) -> None:
        """Close the files without writing an index (the caller removes them)."""
        if self._bin is not None:
            self._bin.close()
            self._bin = None


def write_index(path: str | os.PathLike, dtype: np.dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write a version-1 ``.idx`` for sequences stored back to back in ``dtype``."""
    dtype = np.dtype(dtype)
    n = len(sequence_lengths)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QBQQ", VERSION, _CODE_OF[dtype], n, len(document_indices)))
        f.write(np.asarray(sequence_lengths, dtype=np.int32).tobytes())
        # Byte offsets are the running sum of the lengths, written a chunk at a time.
        start = 0
        for lo in range(0, n, _CHECK_CHUNK):
            ln = np.asarray(sequence_lengths[lo : lo + _CHECK_CHUNK], dtype=np.int64) * dtype.itemsize
            ptr = np.cumsum(ln) - ln + start
            f.write(ptr.tobytes())
            if len(ln):
                start = int(ptr[-1] + ln[-1])
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())


#: tokens per chunk of :func:`token_id_range` (256 MiB of int32)
_RANGE_CHUNK = 1 << 26


def _range_cache_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idrange.json")


def token_id_range(prefix: str | os.PathLike, log: Callable[[str], None] | None = None,
                   progress_after_s: float = 3.0) -> tuple[int, int]:
    """The smallest and largest token id in ``PREFIX.bin`` ((0, -1) for an empty dataset).

    Read with a memory map in chunks (constant memory); a pass that takes longer than
    ``progress_after_s`` reports its progress through ``log`` (default: stderr). The result is cached
    beside the index in ``PREFIX.idrange.json``, keyed by the ``.bin``'s size and modification time
    (skipped where the directory is read-only)."""
    ds = IndexedDataset(prefix)
    st = ds.bin_file.stat()
    key = {"bin_size": st.st_size, "bin_mtime_ns": st.st_mtime_ns, "dtype": ds.dtype.str}
    cache = _range_cache_path(prefix)
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key:
            return int(cached["min_id"]), int(cached["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    tokens = ds.tokens
    lo, hi = None, None
    t0 = last = time.monotonic()
    for start in range(0, len(tokens), _RANGE_CHUNK):
        chunk = tokens[start:start + _RANGE_CHUNK]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
        now = time.monotonic()
        if now - t0 > progress_after_s and now - last > progress_after_s:
            last = now
            log(f"{ds.bin_file}: checking token ids, {min(start + _RANGE_CHUNK, len(tokens)):,} of "
                f"{len(tokens):,} tokens")
    lo, hi = (0, -1) if lo is None else (lo, hi)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", dir=cache.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump({**key, "min_id": lo, "max_id": hi}, fh)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, cache)
    except OSError:  # a read-only dataset directory: no cache, the check still ran
        pass
    return lo, hi


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

