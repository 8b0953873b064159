"""The distributed loader: the single-rank stream is the oracle for any number of ranks and any resume."""

import numpy as np
import pytest
import torch

from tanuki.data.blend import build_pretrain_datasets
from tanuki.data.config import DataConfig
from tanuki.data.indexed import IndexedDatasetWriter
from tanuki.data.loader import DataLoader


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    prefixes = []
    for m in range(3):
        prefix = tmp / f"p{m}"
        w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", np.uint16)
        for _ in range(50):
            w.add_document(rng.integers(0, 60000, int(rng.integers(1, 40))))
        w.finish()
        prefixes.append(str(prefix))
    cfg = DataConfig(prefixes=tuple(prefixes), weights=(0.5, 0.3, 0.2))
    return build_pretrain_datasets(cfg, seq_len=12, train_samples=96).train


def rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b["tokens"]]


def test_batches_are_int64_windows_of_seq_len_plus_one(blend):
    batch = next(iter(DataLoader(blend, micro_batch_size=4)))
    assert batch["tokens"].dtype == torch.int64
    assert batch["tokens"].shape == (4, 13)
    np.testing.assert_array_equal(batch["tokens"][2].numpy(), blend[2])


def test_single_rank_stream_is_the_dataset_in_order(blend):
    loader = DataLoader(blend, micro_batch_size=4)
    assert len(loader) == 24
    assert rows(loader) == [tuple(blend[i].tolist()) for i in range(96)]
    assert loader.consumed_samples == 96
    assert list(loader) == []  # exhausted


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_ranks_together_give_the_single_rank_stream(blend, dp_size, micro_batch_size):
    single = rows(DataLoader(blend, micro_batch_size=micro_batch_size))
    loaders = [DataLoader(blend, micro_batch_size=micro_batch_size, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    merged = []
    # ranks step in lockstep; within a micro-step rank r holds the r-th slice of the global samples
    for steps in zip(*loaders):
        for b in steps:
            merged += rows([b])
    n = len(merged)
    assert n == (96 // (micro_batch_size * dp_size)) * micro_batch_size * dp_size
    assert merged == single[:n]
    assert len(set(merged)) == n  # nothing repeated
    assert all(lo.consumed_samples == n for lo in loaders)


@pytest.mark.parametrize("stop_after", [0, 1, 5, 11])
@pytest.mark.parametrize("dp_before, dp_after", [(1, 1), (2, 2), (2, 4), (4, 1)])
def test_resume_continues_with_exactly_the_next_sample(blend, stop_after, dp_before, dp_after):
    mbs = 2
    single = rows(DataLoader(blend, micro_batch_size=1))
    first = [DataLoader(blend, micro_batch_size=mbs, dp_rank=r, dp_size=dp_before) for r in range(dp_before)]
    iters = [iter(lo) for lo in first]
    for _ in range(stop_after):
        for it in iters:
            next(it)
    state = first[0].state_dict()
    assert state == {"consumed_samples": stop_after * mbs * dp_before}

    resumed = [DataLoader(blend, micro_batch_size=mbs, dp_rank=r, dp_size=dp_after) for r in range(dp_after)]
    for lo in resumed:
        lo.load_state_dict(state)
    merged = []
    for steps in zip(*resumed):
        for b in steps:
            merged += rows([b])
    start = state["consumed_samples"]
    assert merged == single[start : start + len(merged)]
    assert start + len(merged) > 96 - mbs * dp_after  # ran to the end


def test_constructor_checks():
    with pytest.raises(ValueError, match="dp_rank 2 is not in"):
        DataLoader([], micro_batch_size=1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        DataLoader([], micro_batch_size=0)
