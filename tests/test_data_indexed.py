"""The Megatron indexed format: tanuki's writer/reader against megatron-core's reader/builder (the oracle)."""

import struct
import warnings

import numpy as np
import pytest
import torch

from tanuki.data.indexed import (
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetWriter,
    IndexedFormatError,
    check_vocab_fits,
    token_dtype,
)


@pytest.fixture(scope="module")
def megatron():
    """megatron-core's indexed dataset module (its reader and builder run on CPU)."""
    with warnings.catch_warnings():
        # megatron.core's package import warns about optional GPU libraries (Apex, Transformer Engine).
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def random_docs(seed, n=60, vocab=60000, max_len=80):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(1, max_len))) for _ in range(n)]


def write(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", dtype)
    half = len(docs) // 2
    for d in docs[:half]:
        w.add_document(d)
    if docs[half:]:
        w.add_documents(np.concatenate(docs[half:]), [len(d) for d in docs[half:]])
    w.finish()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_tanuki_files(tmp_path, megatron, dtype):
    docs = random_docs(0)
    write(tmp_path / "t", docs, dtype)
    m = megatron.IndexedDataset(str(tmp_path / "t"))
    assert len(m) == len(docs)
    assert m.index.dtype == dtype
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(m[i], d)
    np.testing.assert_array_equal(m.document_indices, np.arange(len(docs) + 1))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_files_are_byte_identical_to_megatron_builder(tmp_path, megatron, dtype):
    docs = random_docs(1)
    write(tmp_path / "t", docs, dtype)
    b = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    for d in docs:
        b.add_item(torch.from_numpy(d))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"t.{ext}").read_bytes() == (tmp_path / f"m.{ext}").read_bytes()


def test_tanuki_reads_megatron_files_with_multi_sequence_documents(tmp_path, megatron):
    # Megatron's sentence splitting writes several sequences per document; a document is their concatenation.
    rng = np.random.default_rng(2)
    docs = [[rng.integers(0, 1000, int(rng.integers(1, 9))) for _ in range(int(rng.integers(1, 4)))] for _ in range(30)]
    b = megatron.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for sentences in docs:
        for s in sentences:
            b.add_item(torch.from_numpy(s))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))

    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32
    assert ds.num_documents == len(docs)
    assert len(ds) == sum(len(s) for s in docs)
    flat = [s for sentences in docs for s in sentences]
    for i, s in enumerate(flat):
        np.testing.assert_array_equal(ds[i], s)
    for i, sentences in enumerate(docs):
        np.testing.assert_array_equal(ds.document(i), np.concatenate(sentences))
    np.testing.assert_array_equal(ds.document_lengths(), [sum(len(s) for s in d) for d in docs])
    assert ds.num_tokens == sum(len(s) for d in docs for s in d)


def test_documents_are_zero_copy_views_of_the_mapped_file(tmp_path):
    docs = random_docs(3)
    write(tmp_path / "t", docs)
    ds = IndexedDataset(tmp_path / "t")
    d = ds.document(7)
    np.testing.assert_array_equal(d, docs[7])
    assert np.shares_memory(d, ds.tokens)
    assert not d.flags.owndata and not d.flags.writeable
    np.testing.assert_array_equal(ds.document(-1), docs[-1])
    with pytest.raises(IndexError, match="out of range"):
        ds.document(len(docs))


def test_empty_dataset(tmp_path):
    # (Megatron's own reader cannot map an empty .bin, which is why preprocessing refuses to write one.)
    write(tmp_path / "e", [])
    ds = IndexedDataset(tmp_path / "e")
    assert ds.num_documents == 0 and ds.num_tokens == 0 and len(ds) == 0


def test_token_dtype_follows_megatron():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(152064) == np.int32
    with pytest.raises(ValueError, match="does not fit the uint16"):
        check_vocab_fits(70000, "uint16")
    assert check_vocab_fits(65536, "uint16") == np.uint16


# -- damaged files -------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    write(tmp_path / "g", random_docs(4, n=20))
    return tmp_path / "g"


def patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_missing_files_are_named(tmp_path, good):
    (tmp_path / "g.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"g\.bin"):
        IndexedDataset(good)
    with pytest.raises(FileNotFoundError, match="no indexed dataset at prefix"):
        IndexedDataset(tmp_path / "nothing")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:20]), r"g\.idx: truncated header"),
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:-5]), r"g\.idx: .* bytes, but its header"),
        (lambda idx, b: idx.write_bytes(idx.read_bytes() + b"\0" * 3), r"g\.idx: .*truncated or corrupt"),
        (lambda idx, b: patch(idx, 0, b"NOTANIDX!"), r"g\.idx: not a Megatron index"),
        (lambda idx, b: patch(idx, 9, struct.pack("<Q", 2)), r"g\.idx: unsupported index version 2"),
        (lambda idx, b: patch(idx, 17, bytes([42])), r"g\.idx: unknown dtype code 42"),
        (lambda idx, b: b.write_bytes(b.read_bytes()[:-2]), r"g\.bin: .* bytes, but g\.idx describes"),
        (lambda idx, b: b.write_bytes(b.read_bytes()[:-1]), r"g\.bin: .* not a whole number of uint16 tokens"),
        (lambda idx, b: b.write_bytes(b.read_bytes() + b"\0\0"), r"g\.bin: .* bytes, but g\.idx describes"),
        # a sequence length that disagrees with the offsets
        (lambda idx, b: patch(idx, HEADER_SIZE + 4 * 3, struct.pack("<i", 9999)), r"g\.idx: sequence offsets do not match"),
        # a document index whose last entry is not the sequence count
        (lambda idx, b: patch(idx, len(idx.read_bytes()) - 8, struct.pack("<q", 5)), r"g\.idx: document index must run"),
    ],
)
def test_damaged_files_fail_with_a_clear_error(good, damage, message):
    damage(good.with_suffix(".idx"), good.with_suffix(".bin"))
    with pytest.raises(IndexedFormatError, match=message):
        IndexedDataset(good)


def test_pair_that_does_not_belong_together(tmp_path):
    write(tmp_path / "a", random_docs(5, n=10))
    write(tmp_path / "b", random_docs(6, n=10))
    (tmp_path / "a.bin").write_bytes((tmp_path / "b.bin").read_bytes())
    with pytest.raises(IndexedFormatError, match=r"a\.bin: .*does not belong together"):
        IndexedDataset(tmp_path / "a")


def test_token_id_range_is_the_min_and_max_read_in_chunks_and_cached(tmp_path, monkeypatch):
    import os

    from tanuki.data import indexed

    docs = random_docs(3, n=40, vocab=5000)
    write(tmp_path / "d", docs, np.int32)
    expected = (int(np.concatenate(docs).min()), int(np.concatenate(docs).max()))  # the oracle: numpy on all of it
    monkeypatch.setattr(indexed, "_RANGE_CHUNK", 97)  # many chunks
    lines = []
    assert indexed.token_id_range(tmp_path / "d", log=lines.append, progress_after_s=-1) == expected
    assert lines and "checking token ids" in lines[-1] and str(tmp_path / "d.bin") in lines[-1]
    cache = tmp_path / "d.idrange.json"
    assert cache.is_file()
    # a cached answer is reused as long as the .bin is the same file...
    import json

    entry = json.loads(cache.read_text())
    cache.write_text(json.dumps({**entry, "max_id": 123456}))  # a value only the cache can give
    assert indexed.token_id_range(tmp_path / "d") == (expected[0], 123456)
    # ...and recomputed when the .bin changes
    write(tmp_path / "d", [np.array([7, 70000])], np.int32)
    os.utime(tmp_path / "d.bin", ns=(1, 1))
    assert indexed.token_id_range(tmp_path / "d") == (7, 70000)


def test_token_id_range_of_a_read_only_dataset_dir(tmp_path, monkeypatch):
    import errno

    from tanuki.data import indexed

    write(tmp_path / "d", [np.array([1, 2, 3])])

    def read_only(*args, **kwargs):  # what a read-only mount gives (chmod does not stop root)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(indexed.tempfile, "mkstemp", read_only)
    assert indexed.token_id_range(tmp_path / "d") == (1, 3)
    assert not (tmp_path / "d.idrange.json").exists()
