"""Packed GPT windows: Megatron's sample index as the oracle, the flat token stream as the formula."""

import multiprocessing as mp
import warnings

import numpy as np
import pytest

from tanuki.data.gpt_dataset import (
    GPTDataset,
    build_sample_index,
    epochs_for_samples,
    split_documents,
)
from tanuki.data.indexed import IndexedDataset, IndexedDatasetWriter


def make_dataset(prefix, lengths, seed=0):
    """A dataset whose documents have the given lengths and random ids."""
    rng = np.random.default_rng(seed)
    w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", np.uint16)
    for n in lengths:
        w.add_document(rng.integers(0, 50000, n))
    w.finish()
    return IndexedDataset(prefix)


def flat_stream(ds: GPTDataset) -> np.ndarray:
    return np.concatenate([ds.indexed.document(int(d)) for d in ds.doc_order]).astype(np.int64)


@pytest.mark.parametrize("trial", range(12))
def test_sample_index_equals_megatron_build_sample_idx(trial):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.helpers import build_sample_idx
    rng = np.random.default_rng(trial)
    n_docs, seq_len, epochs = int(rng.integers(1, 50)), int(rng.integers(2, 40)), int(rng.integers(1, 4))
    lengths = rng.integers(1, 80, n_docs).astype(np.int32)
    ours = build_sample_index(lengths, np.arange(n_docs), seq_len, epochs, seed=trial)
    theirs = build_sample_idx(
        lengths, ours["doc_order"].astype(np.int32), seq_len, epochs, int(lengths.sum()), True, True
    )
    n = len(ours["sample_index"])
    assert len(theirs) == n + 1  # Megatron keeps one extra row: the end of the last window
    np.testing.assert_array_equal(ours["sample_index"], theirs[:n])


def test_windows_are_the_flat_stream_cut_every_seq_len_tokens(tmp_path):
    idx = make_dataset(tmp_path / "d", [5, 1, 17, 3, 40, 2, 9, 11])
    seq_len = 6
    ds = GPTDataset(idx, seq_len=seq_len, num_samples=40, seed=3)
    stream = flat_stream(ds)
    assert len(stream) == ds.num_epochs * idx.num_tokens
    assert len(ds) == (len(stream) - 1) // seq_len >= 40
    for i in range(len(ds)):
        j = int(ds.shuffle[i])
        np.testing.assert_array_equal(ds[i], stream[j * seq_len : j * seq_len + seq_len + 1])
    assert ds[0].dtype == np.int64 and ds[0].shape == (seq_len + 1,)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_epochs_are_shuffled_permutations_and_windows_shuffled_within_epochs(tmp_path):
    lengths = list(range(1, 31))
    idx = make_dataset(tmp_path / "d", lengths)
    ds = GPTDataset(idx, seq_len=8, num_samples=150, seed=7)
    assert ds.num_epochs == epochs_for_samples(sum(lengths), 8, 150) == 3
    epochs = np.asarray(ds.doc_order).reshape(ds.num_epochs, len(lengths))
    for e in epochs:
        assert sorted(e) == list(range(len(lengths)))
    assert not all((epochs[0] == e).all() for e in epochs[1:]), "each epoch has its own order"
    assert sorted(ds.shuffle) == list(range(len(ds)))
    assert not np.array_equal(ds.shuffle, np.arange(len(ds)))
    # window k belongs to the epoch holding its last token; each epoch's windows are served together
    T, L = sum(lengths), 8
    epoch_of = (np.asarray(ds.shuffle) * L + L) // T
    assert np.all(np.diff(epoch_of) >= 0)


def test_epochs_for_samples_is_the_minimum():
    for T in (1, 7, 100, 4097):
        for L in (1, 3, 64, 4096):
            for n in (0, 1, 5, 1000):
                if T < 2 and n:
                    continue
                e = epochs_for_samples(T, L, n)
                assert (e * T - 1) // L >= n
                assert e == 1 or ((e - 1) * T - 1) // L < n


def test_stream_is_prefix_stable_in_the_number_of_samples(tmp_path):
    idx = make_dataset(tmp_path / "d", np.random.default_rng(1).integers(1, 50, 40))
    short = GPTDataset(idx, seq_len=16, num_samples=20, seed=5)
    long = GPTDataset(idx, seq_len=16, num_samples=500, seed=5)
    assert long.num_epochs > short.num_epochs
    assert np.array_equal(np.asarray(long.shuffle[: len(short)]), np.asarray(short.shuffle))
    for i in range(len(short)):
        np.testing.assert_array_equal(short[i], long[i])
    other = GPTDataset(idx, seq_len=16, num_samples=20, seed=6)
    assert not all(np.array_equal(short[i], other[i]) for i in range(len(short)))


def test_document_subset_only_reads_those_documents(tmp_path):
    # document d holds only the token d, so every token of a window names its document
    prefix = tmp_path / "d"
    w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", np.uint16)
    for d in range(20):
        w.add_document(np.full(d % 5 + 3, d))
    w.finish()
    idx = IndexedDataset(prefix)
    train, valid = split_documents(20, 0.25, seed=0)
    assert len(valid) == 5 and len(train) == 15
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(range(20))
    ds = GPTDataset(idx, seq_len=4, num_samples=60, seed=0, documents=valid)
    seen = set(np.concatenate([ds[i] for i in range(len(ds))]).tolist())
    assert seen == set(valid.tolist())


def test_split_is_independent_of_anything_but_its_seed():
    a = split_documents(1000, 0.01, seed=0)
    assert np.array_equal(a[1], split_documents(1000, 0.01, seed=0)[1])
    assert not np.array_equal(a[1], split_documents(1000, 0.01, seed=1)[1])
    assert len(split_documents(10, 0.001, seed=0)[1]) == 1  # a positive fraction holds out at least one
    with pytest.raises(ValueError, match="leaves no training documents"):
        split_documents(1, 0.5, seed=0)


def test_index_is_cached_beside_the_data_and_keyed_by_its_inputs(tmp_path):
    idx = make_dataset(tmp_path / "d", [30] * 10)
    cache = tmp_path / "cache"
    first = GPTDataset(idx, seq_len=8, num_samples=50, seed=1, cache_dir=cache)
    again = GPTDataset(idx, seq_len=8, num_samples=50, seed=1, cache_dir=cache)
    assert first.built_index and not again.built_index
    assert np.array_equal(first.shuffle, again.shuffle)
    assert len(list(cache.glob("gpt-*.json"))) == 1
    # a different seed, length or epoch count is a different entry
    assert GPTDataset(idx, seq_len=8, num_samples=50, seed=2, cache_dir=cache).built_index
    assert GPTDataset(idx, seq_len=9, num_samples=50, seed=1, cache_dir=cache).built_index
    assert GPTDataset(idx, seq_len=8, num_samples=500, seed=1, cache_dir=cache).built_index
    assert len(list(cache.glob("gpt-*.json"))) == 4
    # more samples within the same epochs reuse the entry
    assert not GPTDataset(idx, seq_len=8, num_samples=70, seed=1, cache_dir=cache).built_index
    assert not list(cache.glob("*.tmp"))


def _build_in_process(prefix, cache, barrier, results):
    barrier.wait()  # all start together, as the ranks of a job do
    ds = GPTDataset(IndexedDataset(prefix), seq_len=64, num_samples=20000, seed=9, cache_dir=cache)
    results.put((ds.built_index, np.asarray(ds.shuffle[:1000]).tobytes()))


def test_concurrent_ranks_build_once_and_agree(tmp_path):
    make_dataset(tmp_path / "d", np.random.default_rng(2).integers(1, 500, 3000))
    ctx = mp.get_context("fork")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_process, args=(tmp_path / "d", tmp_path / "cache", barrier, results)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(built for built, _ in out) == 1
    assert len({order for _, order in out}) == 1
