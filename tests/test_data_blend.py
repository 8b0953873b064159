"""Weighted blending (Megatron's build_blending_indices as the oracle) and datasets from a DataConfig."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tanuki.config import ConfigError, from_dict
from tanuki.data.blend import (
    BlendedDataset,
    build_blend_index,
    build_pretrain_datasets,
    normalize_weights,
)
from tanuki.data.config import DataConfig, DataInfoConfig
from tanuki.data.gpt_dataset import GPTDataset
from tanuki.data.indexed import IndexedDataset, IndexedDatasetWriter


def make_marked(prefix, n_docs, doc_len, mark):
    """Documents whose tokens are ``mark * 1000 + document id``: every token names its source."""
    w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", np.uint16)
    for d in range(n_docs):
        w.add_document(np.full(doc_len + d % 3, mark * 1000 + d))
    w.finish()
    return str(prefix)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [0.01, 0.98, 0.01], [3, 1, 4, 1, 5, 9, 2, 6]])
def test_blend_index_equals_megatron(weights):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    size = 5000
    w = normalize_weights(weights)
    ours = build_blend_index(w, size)
    d_idx, s_idx = np.zeros(size, np.int16), np.zeros(size, np.int64)
    helpers_cpp.build_blending_indices(d_idx, s_idx, w, len(w), size, False)
    np.testing.assert_array_equal(ours[0], d_idx)
    np.testing.assert_array_equal(ours[1], s_idx)


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(st.floats(min_value=1e-3, max_value=1.0), min_size=1, max_size=8),
    size=st.integers(min_value=1, max_value=1500),
)
def test_shares_track_weights_at_every_prefix(raw, size):
    w = normalize_weights(raw)
    idx, sample_idx = build_blend_index(w, size)
    onehot = np.zeros((size, len(w)))
    onehot[np.arange(size), idx] = 1
    counts = np.cumsum(onehot, axis=0)
    k = np.arange(1, size + 1)[:, None]
    deviation = counts - w * k
    # Over-representation is below one sample (proven in tanuki/data/blend.py); the lag is checked
    # against the harmonic number H_n of the dataset count, which bounds it with room to spare here.
    assert deviation.max() < 1.0
    assert deviation.min() > -sum(1.0 / i for i in range(1, len(w) + 1))
    # each dataset's samples are requested in order 0, 1, 2, ...
    for j in range(len(w)):
        np.testing.assert_array_equal(sample_idx[idx == j], np.arange(int((idx == j).sum())))


def test_longer_blend_starts_with_the_shorter_one():
    a = build_blend_index([0.2, 0.5, 0.3], 300)
    b = build_blend_index([0.2, 0.5, 0.3], 3000)
    np.testing.assert_array_equal(a[0], b[0][:300])


def test_blended_dataset_serves_each_source_in_its_own_order(tmp_path):
    prefixes = [make_marked(tmp_path / f"p{m}", 30, 10, m) for m in range(3)]
    weights = [0.6, 0.3, 0.1]
    size = 200
    order, _ = build_blend_index(weights, size)
    counts = np.bincount(order.astype(np.int64), minlength=3)
    parts = [
        GPTDataset(IndexedDataset(p), seq_len=8, num_samples=int(n), seed=1) for p, n in zip(prefixes, counts)
    ]
    blend = BlendedDataset(parts, weights, size)
    assert len(blend) == size
    np.testing.assert_array_equal(blend.counts(), counts)
    seen = [0, 0, 0]
    for i in range(size):
        src = blend.source(i)
        np.testing.assert_array_equal(blend[i], parts[src][seen[src]])
        assert set((blend[i] // 1000).tolist()) == {src}
        seen[src] += 1


# -- from a DataConfig -----------------------------------------------------------------------------


@pytest.fixture
def prefixes(tmp_path):
    # token counts 3:1 (documents of ~30 and ~10 tokens)
    return [make_marked(tmp_path / "big", 40, 30, 1), make_marked(tmp_path / "small", 40, 10, 2)]


def sources(ds):
    return np.array([int(ds[i][0]) // 1000 for i in range(len(ds))])


def test_default_weights_are_proportional_to_tokens(prefixes):
    cfg = DataConfig(prefixes=tuple(prefixes))
    data = build_pretrain_datasets(cfg, seq_len=16, train_samples=400)
    tokens = [IndexedDataset(p).num_tokens for p in prefixes]
    np.testing.assert_allclose(data.train.weights, np.array(tokens) / sum(tokens))
    share = np.mean(sources(data.train) == 1)
    assert abs(share - tokens[0] / sum(tokens)) < 2 / 400
    assert data.valid is None


def test_configured_weights_and_cache_beside_the_data(prefixes, tmp_path):
    cfg = DataConfig(prefixes=tuple(prefixes), weights=(1.0, 3.0))
    data = build_pretrain_datasets(cfg, seq_len=16, train_samples=400)
    assert abs(np.mean(sources(data.train) == 2) - 0.75) < 2 / 400
    assert list((tmp_path / "index_cache").glob("gpt-*.json"))
    assert list((tmp_path / "index_cache").glob("blend-*.json"))
    again = build_pretrain_datasets(cfg, seq_len=16, train_samples=400)
    assert not any(d.built_index for d in again.train.datasets)
    np.testing.assert_array_equal(again.train[123], data.train[123])


def test_valid_fraction_holds_out_whole_documents(prefixes, tmp_path):
    cfg = DataConfig(prefixes=tuple(prefixes), valid_fraction=0.1, cache_dir=str(tmp_path / "c"))
    data = build_pretrain_datasets(cfg, seq_len=8, train_samples=300, valid_samples=40)
    train_docs = set(np.concatenate([data.train[i] for i in range(len(data.train))]).tolist())
    valid_docs = set(np.concatenate([data.valid[i] for i in range(len(data.valid))]).tolist())
    assert train_docs.isdisjoint(valid_docs)
    assert len(valid_docs) == 8  # 10% of 40 documents, from each of the two prefixes
    np.testing.assert_allclose(data.valid.weights, data.train.weights)


def test_separate_valid_prefixes(prefixes, tmp_path):
    held = make_marked(tmp_path / "held", 10, 12, 7)
    cfg = DataConfig(prefixes=tuple(prefixes), valid_prefixes=(held,))
    data = build_pretrain_datasets(cfg, seq_len=8, train_samples=100, valid_samples=20)
    assert set(sources(data.valid)) == {7}
    assert 7 not in set(sources(data.train))


def test_missing_prefix_names_the_key(prefixes, tmp_path):
    cfg = DataConfig(prefixes=(prefixes[0], str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"data\.prefixes\[1\].*no dataset at prefix .*nope.*missing .*nope\.bin"):
        build_pretrain_datasets(cfg, seq_len=8, train_samples=10)


def test_damaged_prefix_names_the_key_and_file(prefixes):
    with open(prefixes[1] + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ConfigError, match=r"data\.prefixes\[1\].*small\.idx"):
        build_pretrain_datasets(DataConfig(prefixes=tuple(prefixes)), seq_len=8, train_samples=10)


@pytest.mark.parametrize(
    "data, key, message",
    [
        ({"prefixes": ["a", "b"], "weights": [1.0]}, "data.weights", "1 weights for 2 prefixes"),
        ({"prefixes": ["a"], "weights": [0.0]}, r"data.weights\[0\]", "positive"),
        ({"prefixes": ["a"], "valid_fraction": 1.0}, "data.valid_fraction", r"\[0, 1\)"),
        ({"prefixes": ["a"], "valid_fraction": 0.1, "valid_prefixes": ["b"]}, "data.valid_prefixes", "not both"),
        ({"prefixes": ["a.bin"]}, r"data.prefixes\[0\]", "without .bin/.idx"),
        ({"prefixes": ["a"], "valid_prefixes": ["v"], "valid_weights": [1, 2]}, "data.valid_weights", "2 weights for 1"),
        ({"prefixes": ["a"], "weight": [1]}, "data.weight", "unknown key"),
    ],
)
def test_bad_data_config_names_the_key(data, key, message):
    with pytest.raises(ConfigError, match=message) as e:
        from_dict(DataInfoConfig, {"data": data})
    assert e.value.key.startswith(key.replace("\\", ""))
