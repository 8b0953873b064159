"""Typed configs of the data pipeline (converted from Hydra with :func:`tanuki.config.from_dict`).

:class:`DataConfig` is self-contained so that stage configs embed it as ``data`` (the keys users type
are ``data.prefixes=[A,B]``, ``data.weights=[0.7,0.3]``, ``data.valid_fraction=0.01``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

from tanuki.config import require


def _check_weights(weights: tuple[float, ...], prefixes: tuple[str, ...], key: str, prefixes_key: str) -> None:
    if not weights:
        return
    require(
        len(weights) == len(prefixes),
        key,
        f"{len(weights)} weights for {len(prefixes)} prefixes in {prefixes_key}; give one weight per prefix "
        f"(or none: proportional to token counts)",
    )
    for i, w in enumerate(weights):
        require(math.isfinite(w) and w > 0, f"{key}[{i}]", f"weights must be positive, got {w}")


@dataclass(frozen=True)
class DataConfig:
    """Which tokenized datasets to train on, how to mix them, and how to hold out validation data."""

    #: dataset prefixes (``PREFIX.bin`` + ``PREFIX.idx``) written by ``launch/preprocess.py`` or Megatron
    prefixes: tuple[str, ...] = ()
    #: one sampling weight per prefix (any positive scale; normalised); empty = proportional to tokens
    weights: tuple[float, ...] = ()
    #: fraction of each prefix's documents held out for validation (0: no split)
    valid_fraction: float = 0.0
    #: separate validation prefixes, instead of valid_fraction
    valid_prefixes: tuple[str, ...] = ()
    #: weights of valid_prefixes; empty = proportional to tokens
    valid_weights: tuple[float, ...] = ()
    #: seed of the document and sample shuffles
    seed: int = 1234
    #: seed of the train/validation document split; separate from ``seed`` so that changing the
    #: shuffle never moves documents between the splits
    split_seed: int = 0
    #: directory for the cached sample indices; null = ``index_cache/`` beside each prefix
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _check_weights(self.weights, self.prefixes, "data.weights", "data.prefixes")
        _check_weights(self.valid_weights, self.valid_prefixes, "data.valid_weights", "data.valid_prefixes")
        require(
            0.0 <= self.valid_fraction < 1.0,
            "data.valid_fraction",
            f"must be in [0, 1), got {self.valid_fraction}",
        )
        require(
            not (self.valid_fraction > 0 and self.valid_prefixes),
            "data.valid_prefixes",
            "give either data.valid_fraction or data.valid_prefixes, not both",
        )
        for key, items in (("data.prefixes", self.prefixes), ("data.valid_prefixes", self.valid_prefixes)):
            for i, p in enumerate(items):
                require(bool(p.strip()), f"{key}[{i}]", "empty prefix")
                require(
                    not p.endswith((".bin", ".idx")),
                    f"{key}[{i}]",
                    f"'{p}' is a file name; give the prefix without .bin/.idx",
                )


@dataclass(frozen=True)
class PreprocessConfig:
    """``conf/preprocess.yaml``: raw text to a Megatron indexed dataset."""

    #: input files: a path, a glob (``**`` recurses), a comma-separated list, or a list of those;
    #: ``.jsonl`` / ``.txt``, optionally ``.gz`` / ``.zst``
    input: str | tuple[str, ...] = ""
    #: tokenizer directory (as written by ``launch/build_tokenizer.py``)
    tokenizer: str = ""
    #: output prefix: writes ``PREFIX.bin`` and ``PREFIX.idx`` (``PREFIX_00000.*``, ... with shard_size)
    output_prefix: str = ""
    #: encoding processes (the main process reads and writes)
    workers: int = 1
    #: JSON key holding the document text
    text_key: str = "text"
    #: how ``.txt`` files divide into documents: one per line, or blank-line separated paragraphs
    txt_mode: Literal["line", "paragraph"] = "line"
    #: append the tokenizer's end-of-document token to every document (Megatron's ``--append-eod``)
    append_eos: bool = True
    #: start every document with the tokenizer's BOS: auto = when the tokenizer adds one
    #: (``tokenizer(text)`` in transformers, lm-evaluation-harness and Megatron's preprocess_data.py,
    #: as for tanuki's tokenizers), so a document is ``tokenizer(text).input_ids + [EOS]``; true / false
    #: force it. Recorded in ``PREFIX.json`` and checked by pretraining.
    bos: Union[Literal["auto"], bool] = "auto"
    #: skip documents shorter than this many characters (counted as "short")
    min_chars: int = 0
    #: bad input lines: ``fail`` (stop, naming file and line) or ``skip`` (count by reason)
    on_error: Literal["fail", "skip"] = "fail"
    #: start a new output prefix after this many tokens (0: one prefix)
    shard_size: int = 0
    #: token dtype: auto = uint16 when the vocabulary is below 65,500 ids, else int32
    dtype: Literal["auto", "uint16", "int32"] = "auto"
    #: documents sent to a worker at a time
    batch_size: int = 256
    #: show a progress bar
    progress: bool = True

    def __post_init__(self) -> None:
        # input, tokenizer and output_prefix are required by :func:`preprocess` rather than here, so
        # that the defaults of conf/preprocess.yaml form a valid (if not runnable) config.
        require(
            not self.output_prefix.endswith((".bin", ".idx")),
            "output_prefix",
            "give the prefix without .bin/.idx",
        )
        require(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        require(self.min_chars >= 0, "min_chars", f"must be >= 0, got {self.min_chars}")
        require(self.shard_size >= 0, "shard_size", f"must be >= 0, got {self.shard_size}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(bool(self.text_key), "text_key", "must not be empty")


@dataclass(frozen=True)
class DataInfoConfig:
    """``conf/data_info.yaml``: what a set of prefixes holds and how a run would use it."""

    data: DataConfig = field(default_factory=DataConfig)
    #: tokenizer directory used to decode the sample windows (empty: print ids)
    tokenizer: str = ""
    #: window length of the samples, as ``train.seq_len`` of a training run
    seq_len: int = 2048
    #: training tokens to plan for (epochs of each prefix); 0 = one pass over the blend
    train_tokens: float = 0.0
    #: decoded samples to print
    samples: int = 2
    #: characters of each decoded sample to print
    sample_chars: int = 300

    def __post_init__(self) -> None:
        # data.prefixes is required when the report is made (tanuki.data.blend.split_prefixes).
        require(self.seq_len >= 1, "seq_len", "must be positive")
        require(self.train_tokens >= 0, "train_tokens", "must be >= 0")
        require(self.samples >= 0, "samples", "must be >= 0")
        require(self.sample_chars >= 1, "sample_chars", "must be positive")
