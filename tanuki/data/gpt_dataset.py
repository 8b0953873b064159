"""Packed GPT samples over one indexed dataset.

Semantics follow Megatron-LM's ``GPTDataset`` (``megatron/core/datasets/gpt_dataset.py`` and
``build_sample_idx`` in ``helpers.cpp``): documents are laid end to end and cut into windows of
``seq_len + 1`` tokens that cross document boundaries. Consecutive windows share one token, because the
last token of window ``k`` is only a label there and becomes the first input of window ``k + 1``;
window ``k`` therefore starts at token ``k * seq_len`` of the stream, and a stream of ``T`` tokens
holds ``(T - 1) // seq_len`` windows. Nothing is padded and no token is dropped except the tail.

Two choices differ from Megatron, both so that the sample stream is a *prefix-stable* function of the
seed: asking for more samples (a longer run) appends to the stream and never reorders what came
before.

* Documents are shuffled per epoch (epoch ``e`` is a permutation drawn from ``(seed, e)``), where
  Megatron shuffles all epochs together.
* Windows are shuffled per epoch too: the windows whose last token lies in epoch ``e`` are permuted
  with ``(seed, e)``. Megatron shuffles globally, with its "separate final epoch" rule to keep a short
  last epoch from being spread over the whole run; per-epoch blocks give that for free.

The number of epochs is the smallest one that yields the requested number of samples. The indices
are cached beside the data (see :mod:`tanuki.data.index_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tanuki.data.index_cache import describe_hash, load_or_build
from tanuki.data.indexed import IndexedDataset

# Stream tags mixed into the seeds, so the document and the sample shuffles of an epoch are
# independent draws, and the validation split is independent of both.
_DOC_SHUFFLE, _SAMPLE_SHUFFLE, _SPLIT = 0, 1, 2
# Windows located per step of the index build, to bound its temporaries for very long runs.
_CHUNK = 1 << 24


def _rng(seed: int, epoch: int, stream: int) -> np.random.RandomState:
    # RandomState's streams are frozen by NumPy's compatibility policy (NEP 19), so an index rebuilt
    # with another NumPy version is the same index.
    return np.random.RandomState([seed & 0xFFFFFFFF, epoch, stream])


def epochs_for_samples(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """The fewest epochs whose tokens hold ``num_samples`` windows of ``seq_len + 1``."""
    if tokens_per_epoch <= 0:
        raise ValueError("the dataset has no tokens")
    # E epochs hold (E * T - 1) // seq_len windows; we need that >= num_samples.
    need = num_samples * seq_len + 1
    return max(1, -(-need // tokens_per_epoch))


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split document ids into (train, valid), each sorted, with a seeded random choice.

    ``round(valid_fraction * num_documents)`` documents (at least one when the fraction is positive)
    go to validation. The choice depends only on ``seed`` and the document count, not on the shuffle
    seed, so changing the training seed never moves a document between the splits.
    """
    ids = np.arange(num_documents, dtype=np.int64)
    if valid_fraction <= 0:
        return ids, ids[:0]
    n_valid = max(1, round(valid_fraction * num_documents))
    if n_valid >= num_documents:
        raise ValueError(
            f"valid_fraction {valid_fraction} leaves no training documents out of {num_documents}"
        )
    perm = _rng(seed, 0, _SPLIT).permutation(num_documents)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def build_sample_index(
    doc_lengths: np.ndarray, documents: np.ndarray, seq_len: int, num_epochs: int, seed: int
) -> dict[str, np.ndarray]:
    """Build the three arrays of a GPT dataset.

    ``doc_lengths[i]`` is the token count of ``documents[i]``. Returns

    * ``doc_order``: document ids in stream order, epoch after epoch, each epoch a seeded permutation;
    * ``sample_index``: ``(num_samples, 2)``, the position in ``doc_order`` and the token offset inside
      that document where each window starts (Megatron's ``sample_idx`` without its final row);
    * ``shuffle``: the order in which windows are served.

    Like Megatron, the arrays use 32-bit integers whenever the values fit, which halves the cache.
    """
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    documents = np.asarray(documents, dtype=np.int64)
    n_docs = len(documents)
    tokens_per_epoch = int(doc_lengths.sum())

    perms = [_rng(seed, e, _DOC_SHUFFLE).permutation(n_docs) for e in range(num_epochs)]
    order = np.concatenate(perms) if perms else np.empty(0, np.int64)
    doc_order = documents[order].astype(_int_dtype(int(documents.max()) if n_docs else 0))
    stream_lengths = doc_lengths[order]
    del order
    ends = np.cumsum(stream_lengths)  # token position where each document of the stream ends

    num_samples = max(0, (num_epochs * tokens_per_epoch - 1) // seq_len)
    # Offsets lie inside one document (int32 in the format), positions index doc_order.
    sample_index = np.empty((num_samples, 2), _int_dtype(max(len(ends), int(doc_lengths.max(initial=0)))))
    for lo in range(0, num_samples, _CHUNK):
        starts = np.arange(lo, min(lo + _CHUNK, num_samples), dtype=np.int64) * seq_len
        # The window starting at token p lies in the first document that ends after p; zero-length
        # documents are skipped by side="right" just as Megatron's loop steps over them.
        pos = np.searchsorted(ends, starts, side="right")
        sample_index[lo : lo + len(starts), 0] = pos
        sample_index[lo : lo + len(starts), 1] = starts - (ends[pos] - stream_lengths[pos])

    # Per-epoch blocks: the windows whose *last* token lies in epoch e, which are
    # k in [ceil(eT/L) - 1, ceil((e+1)T/L) - 1). Grouping by the last token makes every block complete
    # for any number of epochs (window k exists iff its last token does), so the order of epoch e never
    # depends on how many epochs follow it.
    shuffle = np.empty(num_samples, _int_dtype(num_samples))
    for e in range(num_epochs):
        lo = max(0, -(-e * tokens_per_epoch // seq_len) - 1)
        hi = -(-(e + 1) * tokens_per_epoch // seq_len) - 1
        shuffle[lo:hi] = lo + _rng(seed, e, _SAMPLE_SHUFFLE).permutation(hi - lo)
    return {"doc_order": doc_order, "sample_index": sample_index, "shuffle": shuffle}


def _int_dtype(largest: int) -> np.dtype:
    return np.dtype(np.int32) if largest < 2**31 else np.dtype(np.int64)


def default_cache_dir(prefix: str | os.PathLike) -> Path:
    """Where indices of ``prefix`` are cached unless a cache directory is given: beside the data."""
    return Path(os.fspath(prefix)).parent / "index_cache"


class GPTDataset:
    """Windows of ``seq_len + 1`` tokens from (a subset of the documents of) one indexed dataset.

    ``ds[i]`` is an int64 array of ``seq_len + 1`` tokens; ``len(ds)`` is every window of the epochs
    needed for ``num_samples`` (at least ``num_samples``). ``documents`` restricts the dataset to
    those document ids (a train or validation split); ``cache_dir=None`` disables the on-disk cache.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        *,
        seq_len: int,
        num_samples: int,
        seed: int,
        documents: np.ndarray | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.indexed = indexed
        self.seq_len = seq_len
        self.seed = seed
        all_lengths = indexed.document_lengths()
        self.documents = (
            np.arange(indexed.num_documents, dtype=np.int64) if documents is None else np.asarray(documents, np.int64)
        )
        lengths = all_lengths[self.documents]
        #: tokens in one pass over this dataset's documents
        self.tokens_per_epoch = int(lengths.sum())
        if self.tokens_per_epoch < 2:
            raise ValueError(f"{indexed.prefix}: the selected documents hold {self.tokens_per_epoch} tokens; need at least 2")
        #: epochs the index covers
        self.num_epochs = epochs_for_samples(self.tokens_per_epoch, seq_len, num_samples)
        description = {
            "kind": "gpt",
            "seq_len": seq_len,
            "seed": seed,
            "num_epochs": self.num_epochs,
            "documents": len(self.documents),
            "tokens_per_epoch": self.tokens_per_epoch,
        }
        # The index depends only on the lengths of the chosen documents (and their ids), so that is
        # what the key hashes: a renamed or copied dataset reuses its cache, an edited one does not.
        key = describe_hash(description, {"documents": self.documents, "lengths": lengths})
        arrays, self.built_index = load_or_build(
            cache_dir,
            "gpt",
            key,
            {**description, "prefix": os.path.abspath(indexed.prefix)},
            ("doc_order", "sample_index", "shuffle"),
            lambda: build_sample_index(lengths, self.documents, seq_len, self.num_epochs, seed),
        )
        self.doc_order: np.ndarray = arrays["doc_order"]
        self.sample_index: np.ndarray = arrays["sample_index"]
        self.shuffle: np.ndarray = arrays["shuffle"]

    def __len__(self) -> int:
        return len(self.shuffle)

    def read_window(self, j: int, out: np.ndarray) -> None:
        """Copy window ``j`` (unshuffled stream position) into ``out`` (length ``seq_len + 1``)."""
        pos, offset = (int(v) for v in self.sample_index[j])
        need = self.seq_len + 1
        filled = 0
        while filled < need:
            doc = self.indexed.document(int(self.doc_order[pos]))
            piece = doc[offset : offset + need - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            pos += 1
            offset = 0

    def sample(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Sample ``i`` of the shuffled stream, written into ``out`` if given."""
        if out is None:
            out = np.empty(self.seq_len + 1, np.int64)
        self.read_window(int(self.shuffle[i]), out)
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return self.sample(i)
