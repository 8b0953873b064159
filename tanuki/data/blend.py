"""Weighted blending of GPT datasets, and building the train/validation blends from a :class:`DataConfig`.

The interleaving is Megatron-LM's ``build_blending_indices`` rule (``helpers.cpp``): sample ``i`` goes
to the dataset whose count lags its target the most, i.e. ``argmax_j(w_j * max(i, 1) - count_j)``,
ties to the lower index. It is deterministic and needs no seed, and every prefix of the stream tracks
the weights. Over-representation is below one sample: the lags ``w_j * i - count_j`` sum to zero, so
the chosen dataset's lag is >= 0 and after the pick its count exceeds ``w_j * (i + 1)`` by at most
``1 - w_j``. Under-representation stays below about two samples for a handful of datasets (the tests
check both at every prefix). Since the rule never looks ahead, a longer blend starts with the shorter
one, so extending a run keeps the order it has already consumed.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tanuki.config import ConfigError
from tanuki.data.config import DataConfig
from tanuki.data.gpt_dataset import GPTDataset, default_cache_dir, split_documents
from tanuki.data.index_cache import describe_hash, load_or_build
from tanuki.data.indexed import IndexedDataset, IndexedFormatError, dataset_exists


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1 (all must be positive)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    return w / w.sum()


def build_blend_index(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset serves each of ``size`` samples, and which of that dataset's samples it is.

    Returns ``(dataset_index, dataset_sample_index)``; the same arrays as Megatron's
    ``helpers.build_blending_indices`` for the same normalised weights. This loop is the cost of
    blending (a fraction of a microsecond per sample); the result is cached on disk.
    """
    w = [float(x) for x in normalize_weights(weights)]
    n = len(w)
    counts = [0] * n
    choice = array("H", bytes(2 * size))  # uint16: Megatron caps blends at 32,767 datasets too
    rng_n = range(1, n)
    for i in range(size):
        s = max(1, i)  # Megatron uses max(i, 1) so that the first pick is by weight
        best = 0
        best_err = w[0] * s - counts[0]
        for j in rng_n:
            err = w[j] * s - counts[j]
            if err > best_err:
                best_err = err
                best = j
        counts[best] += 1
        choice[i] = best
    dataset_index = np.frombuffer(choice, dtype=np.uint16).astype(np.int16) if size else np.empty(0, np.int16)
    dataset_sample_index = np.empty(size, np.int64)
    for j in range(n):
        mask = dataset_index == j
        dataset_sample_index[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return dataset_index, dataset_sample_index


def load_blend_index(
    weights: Sequence[float], size: int, cache_dir: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`build_blend_index`, cached in ``cache_dir`` (None: not cached)."""
    weights = [float(x) for x in normalize_weights(weights)]
    description = {"kind": "blend", "weights": weights, "size": int(size)}
    arrays, _ = load_or_build(
        cache_dir,
        "blend",
        describe_hash(description),
        description,
        ("dataset_index", "dataset_sample_index"),
        lambda: dict(zip(("dataset_index", "dataset_sample_index"), build_blend_index(weights, size))),
    )
    return arrays["dataset_index"], arrays["dataset_sample_index"]


class BlendedDataset:
    """``size`` samples drawn from several datasets in the deterministic weighted order above.

    ``ds[i]`` is the int64 token window; :meth:`source` says which dataset it came from.
    """

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        weights: Sequence[float],
        size: int,
        *,
        names: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(datasets)} datasets")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.names = list(names) if names is not None else [d.indexed.prefix for d in self.datasets]
        self.seq_len = self.datasets[0].seq_len
        if any(d.seq_len != self.seq_len for d in self.datasets):
            raise ValueError("all blended datasets must have the same seq_len")
        self.dataset_index, self.dataset_sample_index = load_blend_index(self.weights, self.size, cache_dir)
        for j, d in enumerate(self.datasets):
            need = int(np.count_nonzero(self.dataset_index == j))
            if need > len(d):
                raise ValueError(f"dataset {self.names[j]} has {len(d)} samples, the blend needs {need}")

    def __len__(self) -> int:
        return self.size

    def source(self, i: int) -> int:
        """Index of the dataset that serves sample ``i``."""
        return int(self.dataset_index[i])

    def sample(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Sample ``i`` (``seq_len + 1`` int64 tokens), written into ``out`` if given."""
        return self.datasets[int(self.dataset_index[i])].sample(int(self.dataset_sample_index[i]), out)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} samples")
        return self.sample(i)

    def counts(self) -> np.ndarray:
        """Samples drawn from each dataset."""
        return np.bincount(self.dataset_index.astype(np.int64), minlength=len(self.datasets))


# --------------------------------------------------------------------------------------------------
# From a DataConfig
# --------------------------------------------------------------------------------------------------


def open_prefix(prefix: str, key: str) -> IndexedDataset:
    """Open a dataset named in the config; a missing or damaged one is a :class:`ConfigError` on ``key``."""
    if not dataset_exists(prefix):
        missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
        raise ConfigError(key, f"no dataset at prefix '{prefix}' (missing {', '.join(missing)})")
    try:
        return IndexedDataset(prefix)
    except IndexedFormatError as e:
        raise ConfigError(key, str(e)) from None


@dataclass
class PrefixSplit:
    """One prefix of the config with the documents each split uses."""

    prefix: str
    indexed: IndexedDataset
    train_documents: np.ndarray
    valid_documents: np.ndarray

    def tokens(self, documents: np.ndarray) -> int:
        return int(self.indexed.document_lengths()[documents].sum())


def split_prefixes(cfg: DataConfig) -> list[PrefixSplit]:
    """Open ``cfg.prefixes`` and split each one's documents by ``cfg.valid_fraction``."""
    if not cfg.prefixes:
        raise ConfigError("data.prefixes", "is required: data.prefixes=[PREFIX,...]")
    out = []
    for i, prefix in enumerate(cfg.prefixes):
        ds = open_prefix(prefix, f"data.prefixes[{i}]")
        try:
            train, valid = split_documents(ds.num_documents, cfg.valid_fraction, cfg.split_seed)
        except ValueError as e:
            raise ConfigError("data.valid_fraction", f"{prefix}: {e}") from None
        out.append(PrefixSplit(prefix, ds, train, valid))
    return out


def blend_weights(cfg_weights: Sequence[float], token_counts: Sequence[int]) -> np.ndarray:
    """Normalised blend weights: the configured ones, or else proportional to token counts."""
    return normalize_weights(cfg_weights if len(cfg_weights) else token_counts)


def _require_tokens(tokens: int, key: str, what: str) -> None:
    # A window needs at least two tokens (one input and its label).
    if tokens < 2:
        raise ConfigError(key, f"{what} hold {tokens} tokens; a dataset needs at least 2")


@dataclass
class PretrainDatasets:
    """The blended datasets of a pretraining run."""

    train: BlendedDataset
    #: None when the config holds out no validation data
    valid: BlendedDataset | None


def _blend(
    parts: Sequence[tuple[str, IndexedDataset, np.ndarray | None]],
    weights: np.ndarray,
    size: int,
    seq_len: int,
    cfg: DataConfig,
) -> BlendedDataset:
    def cache(prefix: str) -> str | os.PathLike:
        return cfg.cache_dir if cfg.cache_dir else default_cache_dir(prefix)

    # How many samples each prefix must supply is known exactly once the blend order is built,
    # so the (cheap, cached) blend index comes first and each GPT index is built for its count.
    dataset_index, _ = load_blend_index(weights, size, cache(parts[0][0]))
    counts = np.bincount(np.asarray(dataset_index, np.int64), minlength=len(parts))
    datasets = [
        GPTDataset(ds, seq_len=seq_len, num_samples=int(n), seed=cfg.seed, documents=docs, cache_dir=cache(prefix))
        for (prefix, ds, docs), n in zip(parts, counts)
    ]
    return BlendedDataset(
        datasets, weights, size, names=[p for p, _, _ in parts], cache_dir=cache(parts[0][0])
    )


def build_pretrain_datasets(
    cfg: DataConfig, *, seq_len: int, train_samples: int, valid_samples: int = 0
) -> PretrainDatasets:
    """Build the train blend of ``train_samples`` windows and the validation blend of ``valid_samples``.

    Validation data comes from ``cfg.valid_fraction`` of each prefix's documents (blended with the
    training weights) or from ``cfg.valid_prefixes``; with neither, or ``valid_samples=0``, ``valid``
    is None. Errors in the config (a missing prefix, a damaged file) raise :class:`ConfigError`.
    """
    splits = split_prefixes(cfg)
    train_tokens = [s.tokens(s.train_documents) for s in splits]
    for i, (s, t) in enumerate(zip(splits, train_tokens)):
        _require_tokens(t, f"data.prefixes[{i}]", f"'{s.prefix}' (training documents)")
    weights = blend_weights(cfg.weights, train_tokens)
    train = _blend([(s.prefix, s.indexed, s.train_documents) for s in splits], weights, train_samples, seq_len, cfg)

    valid = None
    if valid_samples > 0 and cfg.valid_fraction > 0:
        for s in splits:
            _require_tokens(s.tokens(s.valid_documents), "data.valid_fraction", f"the validation documents of '{s.prefix}'")
        valid = _blend([(s.prefix, s.indexed, s.valid_documents) for s in splits], weights, valid_samples, seq_len, cfg)
    elif valid_samples > 0 and cfg.valid_prefixes:
        vds = [open_prefix(p, f"data.valid_prefixes[{i}]") for i, p in enumerate(cfg.valid_prefixes)]
        for i, d in enumerate(vds):
            _require_tokens(d.num_tokens, f"data.valid_prefixes[{i}]", f"'{d.prefix}'")
        vweights = blend_weights(cfg.valid_weights, [d.num_tokens for d in vds])
        valid = _blend([(p, d, None) for p, d in zip(cfg.valid_prefixes, vds)], vweights, valid_samples, seq_len, cfg)
    return PretrainDatasets(train=train, valid=valid)
