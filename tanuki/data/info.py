"""What a set of tokenized prefixes holds and how a training run would draw from it.

Used by ``launch/data_info.py``. Nothing is written to disk: the sample windows shown are built
in memory for the first few samples of the blend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tanuki.data.blend import (
    BlendedDataset,
    blend_weights,
    build_blend_index,
    split_prefixes,
)
from tanuki.data.config import DataInfoConfig
from tanuki.data.gpt_dataset import GPTDataset, epochs_for_samples
from tanuki.tokenizer import load

# Blend prefixes up to this many samples are measured exactly; beyond, shares are the weights
# (the interleaving keeps every prefix's count within about one sample of weight x samples).
_MEASURE_LIMIT = 1_000_000


@dataclass
class PrefixReport:
    prefix: str
    dtype: str
    documents: int
    tokens: int
    train_documents: int
    train_tokens: int
    valid_documents: int
    valid_tokens: int
    weight: float | None  # as configured (None: proportional to tokens)
    share: float  # normalised weight: fraction of the training samples drawn from this prefix
    samples: int  # training samples drawn from this prefix
    epochs: float  # passes over this prefix's training documents that the run needs
    index_epochs: int  # whole epochs the sample index will cover


@dataclass
class DataReport:
    seq_len: int
    train_tokens: float
    train_samples: int
    prefixes: list[PrefixReport]
    samples: list[tuple[int, str]]  # (prefix number, decoded text or ids)


def data_report(cfg: DataInfoConfig) -> DataReport:
    """Gather the report for ``cfg`` (opens the prefixes; a missing one is a ``ConfigError``)."""
    splits = split_prefixes(cfg.data)
    lengths = [s.indexed.document_lengths() for s in splits]
    train_tok = [int(ln[s.train_documents].sum()) for s, ln in zip(splits, lengths)]
    weights = blend_weights(cfg.data.weights, train_tok)
    if cfg.train_tokens > 0:
        budget = cfg.train_tokens
        train_samples = max(1, math.ceil(budget / cfg.seq_len))
    else:  # one pass: the whole windows that all training tokens make
        budget = float(sum(train_tok))
        train_samples = max(1, (sum(train_tok) - 1) // cfg.seq_len)
    if train_samples <= _MEASURE_LIMIT:
        counts = np.bincount(build_blend_index(weights, train_samples)[0].astype(np.int64), minlength=len(splits))
    else:
        counts = np.round(weights * train_samples).astype(np.int64)

    rows = []
    for i, (s, ln) in enumerate(zip(splits, lengths)):
        need = int(counts[i]) * cfg.seq_len + 1
        rows.append(
            PrefixReport(
                prefix=s.prefix,
                dtype=str(s.indexed.dtype),
                documents=s.indexed.num_documents,
                tokens=s.indexed.num_tokens,
                train_documents=len(s.train_documents),
                train_tokens=train_tok[i],
                valid_documents=len(s.valid_documents),
                valid_tokens=int(ln[s.valid_documents].sum()),
                weight=float(cfg.data.weights[i]) if cfg.data.weights else None,
                share=float(weights[i]),
                samples=int(counts[i]),
                epochs=need / max(train_tok[i], 1),
                index_epochs=epochs_for_samples(max(train_tok[i], 1), cfg.seq_len, int(counts[i])),
            )
        )
    return DataReport(cfg.seq_len, budget, train_samples, rows, _decoded_samples(cfg, splits, weights))


def _decoded_samples(cfg: DataInfoConfig, splits, weights: np.ndarray) -> list[tuple[int, str]]:
    if cfg.samples == 0:
        return []
    order, _ = build_blend_index(weights, cfg.samples)
    counts = np.bincount(order.astype(np.int64), minlength=len(splits))
    datasets = [
        GPTDataset(s.indexed, seq_len=cfg.seq_len, num_samples=int(n), seed=cfg.data.seed, documents=s.train_documents)
        for s, n in zip(splits, counts)
    ]
    blend = BlendedDataset(datasets, weights, cfg.samples, names=[s.prefix for s in splits])
    decode = None
    if cfg.tokenizer:
        tok = load(cfg.tokenizer)
        decode = lambda ids: tok.decode(ids.tolist())
    out = []
    for i in range(cfg.samples):
        ids = blend[i]
        text = decode(ids) if decode else " ".join(str(t) for t in ids[:64]) + (" ..." if len(ids) > 64 else "")
        if len(text) > cfg.sample_chars:
            text = text[: cfg.sample_chars] + " ..."
        out.append((blend.source(i), text))
    return out


def format_data_report(r: DataReport) -> str:
    """The report as text."""
    lines = []
    total_docs = sum(p.documents for p in r.prefixes)
    total_tok = sum(p.tokens for p in r.prefixes)
    lines.append(f"{len(r.prefixes)} prefix(es): {total_docs:,} documents, {total_tok:,} tokens")
    for i, p in enumerate(r.prefixes):
        lines.append(f"[{i}] {p.prefix}")
        lines.append(
            f"    documents {p.documents:,}  tokens {p.tokens:,}  dtype {p.dtype}  "
            f"mean {p.tokens / max(p.documents, 1):,.1f} tokens/document"
        )
        if p.valid_documents:
            lines.append(
                f"    train {p.train_documents:,} documents / {p.train_tokens:,} tokens, "
                f"valid {p.valid_documents:,} documents / {p.valid_tokens:,} tokens"
            )
    lines.append("")
    lines.append(
        f"blend for {r.train_tokens:,.0f} training tokens = {r.train_samples:,} samples of seq_len {r.seq_len} + 1:"
    )
    lines.append(f"    {'prefix':<6} {'weight':>10} {'share':>8} {'samples':>14} {'epochs':>9} {'index epochs':>13}")
    for i, p in enumerate(r.prefixes):
        weight = f"{p.weight:g}" if p.weight is not None else "by tokens"
        lines.append(
            f"    [{i}]    {weight:>10} {p.share:>8.2%} {p.samples:>14,} {p.epochs:>9.3f} {p.index_epochs:>13}"
        )
    if r.samples:
        lines.append("")
        lines.append("first samples of the training blend:")
        for k, (src, text) in enumerate(r.samples):
            lines.append(f"--- sample {k} (from [{src}]) ---")
            lines.append(text)
    return "\n".join(lines)
