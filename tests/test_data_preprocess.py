"""Preprocessing: Megatron's reader and the tokenizer as oracles, worker-count invariance, bad input, kills."""

import gzip
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tanuki.config import ConfigError
from tanuki.data.config import PreprocessConfig
from tanuki.data.indexed import IndexedDataset
from tanuki.data.preprocess import PreprocessError, check_bos_convention, preprocess, read_dataset_metadata
from tanuki.textio import CorpusError, iter_documents

REPO = Path(__file__).resolve().parents[1]

JA = [
    "吾輩は猫である。", "名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。", "東京は日本の首都です。",
    "今日は良い天気ですね。", "機械学習の研究をしています。", "大規模言語モデルを訓練する。", "データを前処理して保存する。",
]
EN = [
    "The quick brown fox jumps over the lazy dog.", "Language models learn from text.", "Tokyo is a large city.",
    "We preprocess the data once.", "Numbers like 12345 and 2024 appear.",
]


def document(rng: random.Random) -> str:
    parts = [rng.choice(JA + EN) for _ in range(rng.randint(1, 8))]
    parts.append("".join(chr(0x3042 + rng.randrange(80)) for _ in range(5)))
    parts.append(str(rng.randrange(10**6)))
    sep = rng.choice(["", " ", "\n"])
    return sep.join(parts)


def write_jsonl(path, texts, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 0}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small bilingual corpus and a SentencePiece tokenizer built from it."""
    from tanuki.tokenizer import BuildTokenizerConfig, build_tokenizer

    tmp = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = [document(rng) for _ in range(3000)]
    write_jsonl(tmp / "train.jsonl", texts)
    build_tokenizer(
        BuildTokenizerConfig(
            input=str(tmp / "train.jsonl"), output=str(tmp / "tok"), vocab_size=800, progress=False,
            threads=1, report_documents=50,
        ),
        log=io.StringIO(),
    )
    docs = texts[:400]
    write_jsonl(tmp / "docs.jsonl", docs[:250])
    write_jsonl(tmp / "docs2.jsonl.gz", docs[250:], opener=gzip.open)
    return {"dir": tmp, "tokenizer": str(tmp / "tok"), "texts": docs, "input": [str(tmp / "docs.jsonl"), str(tmp / "docs2.jsonl.gz")]}


def cfg_for(corpus, out, **kw):
    return PreprocessConfig(input=tuple(corpus["input"]), tokenizer=corpus["tokenizer"], output_prefix=str(out), progress=False, **kw)


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def test_megatron_reads_exactly_the_tokenizer_ids(corpus, tmp_path):
    from tanuki.tokenizer import load

    summary = preprocess(cfg_for(corpus, tmp_path / "out"))
    assert summary.documents == 400 and summary.dtype == "uint16"
    tok = load(corpus["tokenizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import (
            IndexedDataset as MegatronIndexedDataset,
        )
    m = MegatronIndexedDataset(str(tmp_path / "out"))
    assert len(m) == 400 and m.index.dtype == np.uint16
    total = 0
    for i, text in enumerate(corpus["texts"]):
        # bos=auto: the tokenizer adds BOS, so a document is what tokenizer(text) gives, then EOS
        expected = tok(text).input_ids + [tok.eos_token_id]
        assert expected[0] == tok.bos_token_id
        assert m[i].tolist() == expected
        total += len(expected)
    assert summary.tokens == total
    assert leftovers(tmp_path) == ["out.bin", "out.idx", "out.json"]


def test_one_and_two_workers_are_byte_identical(corpus, tmp_path):
    preprocess(cfg_for(corpus, tmp_path / "w1", workers=1, batch_size=7))
    preprocess(cfg_for(corpus, tmp_path / "w2", workers=2, batch_size=7))
    preprocess(cfg_for(corpus, tmp_path / "w2b", workers=2, batch_size=64))
    for ext in ("bin", "idx", "json"):
        ref = (tmp_path / f"w1.{ext}").read_bytes()
        assert (tmp_path / f"w2.{ext}").read_bytes() == ref
        assert (tmp_path / f"w2b.{ext}").read_bytes() == ref


def test_shards_split_at_documents_and_concatenate_to_the_whole(corpus, tmp_path):
    preprocess(cfg_for(corpus, tmp_path / "whole"))
    sharded = preprocess(cfg_for(corpus, tmp_path / "part", shard_size=2000, batch_size=16))
    assert sharded.prefixes == [str(tmp_path / f"part_{i:05d}") for i in range(len(sharded.prefixes))]
    assert len(sharded.prefixes) > 1
    ref = IndexedDataset(tmp_path / "whole")
    shards = [IndexedDataset(p) for p in sharded.prefixes]
    docs = [ds.document(i).tolist() for ds in shards for i in range(ds.num_documents)]
    assert docs == [ref.document(i).tolist() for i in range(ref.num_documents)]
    # a shard closes exactly when its next document would take it past shard_size
    for ds, following in itertools.pairwise(shards):
        assert ds.num_tokens <= 2000 < ds.num_tokens + len(following.document(0))
    assert shards[-1].num_tokens <= 2000


def test_append_eos_off_and_min_chars(corpus, tmp_path):
    from tanuki.tokenizer import load

    tok = load(corpus["tokenizer"])
    s = preprocess(cfg_for(corpus, tmp_path / "o", append_eos=False, min_chars=60, bos=False))
    kept = [t for t in corpus["texts"] if len(t) >= 60]
    assert s.skipped == {"short": 400 - len(kept)} and s.documents == len(kept)
    ds = IndexedDataset(tmp_path / "o")
    for i, t in enumerate(kept):
        assert ds.document(i).tolist() == tok(t, add_special_tokens=False).input_ids
    n = 400 - len(kept)
    assert f"skipped:   {n} (short: {n})" in s.format()


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def bad_corpus(tmp_path):
    lines = [
        json.dumps({"text": "吾輩は猫である。"}, ensure_ascii=False).encode(),
        b'{"text": "broken',  # line 2: malformed JSON
        json.dumps({"body": "no text key"}).encode(),  # line 3: missing key
        json.dumps({"text": ""}).encode(),  # line 4: empty document
        b'{"text": "bad \xff byte"}',  # line 5: invalid UTF-8
        json.dumps({"text": "   "}).encode(),  # line 6: whitespace only
        json.dumps({"text": "東京は日本の首都です。"}, ensure_ascii=False).encode(),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_malformed_json_fails_with_file_and_line(corpus, bad_corpus, tmp_path):
    cfg = replace(cfg_for(corpus, tmp_path / "o"), input=str(bad_corpus))
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        preprocess(cfg)
    assert leftovers(tmp_path) == ["bad.jsonl"]  # nothing written, nothing half-written


def test_skip_counts_every_bad_line_by_reason(corpus, bad_corpus, tmp_path):
    cfg = replace(cfg_for(corpus, tmp_path / "o"), input=str(bad_corpus), on_error="skip")
    s = preprocess(cfg)
    assert s.documents == 2
    assert s.skipped == {"invalid_json": 1, "missing_key": 1, "empty": 2, "invalid_utf8": 1}
    assert "skipped:   5 (empty: 2, invalid_json: 1, invalid_utf8: 1, missing_key: 1)" in s.format()
    assert IndexedDataset(tmp_path / "o").num_documents == 2


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"body": "x"}', r"bad\.jsonl:1: no key 'text'"),
        (b'{"text": "a \xfe b"}', r"bad\.jsonl:1: invalid UTF-8 at byte offset 12 \(byte 0xfe\)"),
    ],
)
def test_missing_key_and_invalid_utf8_fail_with_file_and_line(corpus, tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_bytes(line + b"\n")
    with pytest.raises(CorpusError, match=message):
        preprocess(replace(cfg_for(corpus, tmp_path / "o"), input=str(tmp_path / "bad.jsonl")))


def test_a_corpus_of_empty_documents_writes_nothing(corpus, tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", ["", " ", "\n"])
    with pytest.raises(PreprocessError, match=r"no documents to write .*empty: 3"):
        preprocess(replace(cfg_for(corpus, tmp_path / "o"), input=str(tmp_path / "empty.jsonl")))
    assert leftovers(tmp_path) == ["empty.jsonl"]


def test_missing_input_and_required_keys(corpus, tmp_path):
    with pytest.raises(CorpusError, match="nothing.jsonl: no such file"):
        preprocess(replace(cfg_for(corpus, tmp_path / "o"), input=str(tmp_path / "nothing.jsonl")))
    with pytest.raises(ConfigError, match="'output_prefix': is required"):
        preprocess(replace(cfg_for(corpus, tmp_path / "o"), output_prefix=""))


@pytest.fixture(scope="session")
def big_vocab_tokenizer(tmp_path_factory):
    """A word-level tokenizer with 70,000 ids: too many for uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tmp = tmp_path_factory.mktemp("bigvocab")
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(69998)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))
    write_jsonl(tmp / "words.jsonl", ["w1 w69997 w65535", "w65536 w2 nope"])
    return tmp


def test_vocab_that_does_not_fit_the_dtype(big_vocab_tokenizer, tmp_path):
    cfg = PreprocessConfig(
        input=str(big_vocab_tokenizer / "words.jsonl"), tokenizer=str(big_vocab_tokenizer),
        output_prefix=str(tmp_path / "o"), dtype="uint16", progress=False,
    )
    with pytest.raises(PreprocessError, match=r"vocabulary \(70000 ids\) does not fit the uint16 token dtype"):
        preprocess(cfg)
    assert leftovers(tmp_path) == []
    # auto picks int32, which Megatron reads back with ids above 65,535 intact
    s = preprocess(replace(cfg, dtype="auto"))
    assert s.dtype == "int32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import (
            IndexedDataset as MegatronIndexedDataset,
        )
    m = MegatronIndexedDataset(str(tmp_path / "o"))
    assert m[0].tolist() == [3, 69999, 65537, 1] and m[1].tolist() == [65538, 4, 0, 1]


# -- interruption ---------------------------------------------------------------------------------


def start_cli(corpus, big_input, out, workers):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        [sys.executable, "launch/preprocess.py", f"input={big_input}", f"tokenizer={corpus['tokenizer']}",
         f"output_prefix={out}", f"workers={workers}", "batch_size=64", "progress=false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def wait_for_partial_data(directory, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        parts = [p for p in Path(directory).glob("*.partial-*") if p.stat().st_size > 0]
        if parts:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("preprocessing did not start writing")


@pytest.fixture(scope="session")
def big_input(corpus):
    # Large enough that preprocessing runs for seconds after it starts writing.
    path = corpus["dir"] / "big.jsonl"
    rng = random.Random(1)
    write_jsonl(path, [document(rng) * 20 for _ in range(8000)])
    return path


@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 2), (signal.SIGTERM, 1)])
def test_killed_run_leaves_no_complete_looking_output(corpus, big_input, tmp_path, sig, workers):
    # an earlier, complete dataset at the same prefix must survive the interrupted rewrite
    preprocess(cfg_for(corpus, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    proc = start_cli(corpus, big_input, tmp_path / "out", workers)
    wait_for_partial_data(tmp_path, proc)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0

    ds = IndexedDataset(tmp_path / "out")  # still the old, valid dataset
    assert ds.num_documents == 400
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*") if "partial" not in p.name} == before
    partial = sorted(p.name for p in tmp_path.glob("*.partial-*"))
    if sig == signal.SIGTERM:
        assert partial == []  # cleaned up
    else:
        # SIGKILL cannot be caught: what remains carries the .partial-PID suffix, never .bin/.idx
        assert partial and all(not n.endswith((".bin", ".idx")) for n in partial)


def test_cli_and_data_info_end_to_end(corpus, tmp_path):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "data" / "sample"
    run = subprocess.run(
        [sys.executable, REPO / "launch/preprocess.py", f"input={corpus['input'][0]}",
         f"tokenizer={corpus['tokenizer']}", "output_prefix=data/sample", "workers=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "documents: 250" in run.stdout and "wrote:     data/sample.bin" in run.stdout
    assert "tokens/s" in run.stderr  # the progress bar

    info = subprocess.run(
        [sys.executable, REPO / "launch/data_info.py", "data.prefixes=[data/sample]",
         f"tokenizer={corpus['tokenizer']}", "seq_len=64", "train_tokens=100000", "samples=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert info.returncode == 0, info.stderr
    # Hydra writes no outputs/ or log files, and data_info caches nothing
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "sample.bin", "sample.idx", "sample.json"]
    ds = IndexedDataset(out)
    assert f"documents {ds.num_documents:,}  tokens {ds.num_tokens:,}" in info.stdout
    assert "100.00%" in info.stdout and "--- sample 0 (from [0]) ---" in info.stdout
    epochs = (-(-100000 // 64) * 64 + 1) / ds.num_tokens  # whole windows of 64 (+1) for the budget
    assert f"{epochs:9.3f}" in info.stdout

    bad = subprocess.run(
        [sys.executable, "launch/data_info.py", f"data.prefixes=[{out},{tmp_path}/missing]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert bad.returncode == 2
    assert "data.prefixes[1]" in bad.stderr and "no dataset at prefix" in bad.stderr


def test_tokenizer_without_eos_needs_append_eos_off(big_vocab_tokenizer, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((big_vocab_tokenizer / "tokenizer.json").read_bytes())
    cfg = PreprocessConfig(
        input=str(big_vocab_tokenizer / "words.jsonl"), tokenizer=str(tok), output_prefix=str(tmp_path / "o"),
        progress=False,
    )
    with pytest.raises(PreprocessError, match="has no end-of-document token; set append_eos=false"):
        preprocess(cfg)
    assert preprocess(replace(cfg, append_eos=False)).tokens == 6


def test_the_documented_input_list_forms_reach_every_file(tmp_path):
    """conf/preprocess.yaml once documented ``input=a,b``, which Hydra refuses (a sweep without
    --multirun); the forms it documents now compose into both files."""
    from conftest import compose
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from tanuki.config import from_dict
    from tanuki.textio import expand_inputs

    a, b = tmp_path / "a.jsonl", tmp_path / "b.txt"
    a.write_text('{"text": "x"}\n'), b.write_text("y\n")
    for override in (f"input=[{a},{b}]", f"input='{a},{b}'"):
        cfg = from_dict(PreprocessConfig, compose("preprocess", [override]))
        assert [str(p) for p in expand_inputs(cfg.input)] == [str(a), str(b)], override
    with pytest.raises((ConfigCompositionException, OverrideParseException, ValueError)):
        compose("preprocess", [f"input={a},{b}"])

# -- the BOS convention ---------------------------------------------------------------------------


def test_documents_of_the_sample_corpus_are_what_tokenizer_text_gives(corpus, tmp_path):
    """Megatron's preprocess_data.py with a Hugging Face tokenizer and --append-eod writes
    tokenizer(text).input_ids + [EOS]; so does tanuki by default (bos=auto)."""
    from tanuki.tokenizer import load, sample_data_path

    docs = [d.text for d in iter_documents(sample_data_path())][:300]
    write_jsonl(tmp_path / "sample.jsonl", docs)
    preprocess(PreprocessConfig(input=str(tmp_path / "sample.jsonl"), tokenizer=corpus["tokenizer"],
                                output_prefix=str(tmp_path / "s"), progress=False))
    tok = load(corpus["tokenizer"])
    ds = IndexedDataset(tmp_path / "s")
    assert ds.num_documents == len(docs)
    for i, text in enumerate(docs):
        assert ds.document(i).tolist() == tok(text).input_ids + [tok.eos_token_id], i
    meta = read_dataset_metadata(tmp_path / "s")
    assert meta["bos"] is True and meta["bos_id"] == tok.bos_token_id == 1
    assert meta["eos"] is True and meta["eos_id"] == tok.eos_token_id
    assert meta["tokenizer_adds_bos"] is True


def test_bos_true_false_and_a_tokenizer_without_bos(corpus, big_vocab_tokenizer, tmp_path):
    from tanuki.tokenizer import load

    tok = load(corpus["tokenizer"])
    preprocess(cfg_for(corpus, tmp_path / "no", bos=False))
    preprocess(cfg_for(corpus, tmp_path / "yes", bos=True))
    no, yes = IndexedDataset(tmp_path / "no"), IndexedDataset(tmp_path / "yes")
    for i in (0, 1, 399):
        assert no.document(i).tolist() == tok(corpus["texts"][i], add_special_tokens=False).input_ids + [2]
        assert yes.document(i).tolist() == [1, *no.document(i).tolist()]
    assert read_dataset_metadata(tmp_path / "no")["bos"] is False
    # a tokenizer whose post-processor adds nothing: auto writes no BOS; true is an error without one
    cfg = PreprocessConfig(input=str(big_vocab_tokenizer / "words.jsonl"), tokenizer=str(big_vocab_tokenizer),
                           output_prefix=str(tmp_path / "w"), progress=False, dtype="int32")
    preprocess(cfg)
    assert read_dataset_metadata(tmp_path / "w")["bos"] is False
    with pytest.raises(PreprocessError, match="has no BOS token; set bos=false"):
        preprocess(replace(cfg, bos=True, output_prefix=str(tmp_path / "w2")))


def test_pretraining_warns_when_datasets_disagree_on_bos(corpus, tmp_path):
    preprocess(cfg_for(corpus, tmp_path / "auto"))
    preprocess(cfg_for(corpus, tmp_path / "none", bos=False))
    preprocess(cfg_for(corpus, tmp_path / "old"))
    (tmp_path / "old.json").unlink()  # as written before tanuki recorded the convention
    tok = corpus["tokenizer"]
    assert check_bos_convention([tmp_path / "auto"], tok) == []
    both = check_bos_convention([tmp_path / "auto", tmp_path / "none"], tok)
    assert len(both) == 2 and "disagree on BOS" in both[0] and "none has no BOS but the tokenizer" in both[1]
    (old,) = check_bos_convention([tmp_path / "old"], tok)
    assert "without PREFIX.json" in old

    from conftest import compose

    from tanuki import pretrain
    from tanuki.config import PretrainConfig, from_dict
    from tanuki.parallel.env import DistEnv

    cfg = from_dict(PretrainConfig, compose("pretrain", [f"data.prefixes=[{tmp_path / 'auto'},{tmp_path / 'none'}]",
                                                         f"tokenizer.path={tok}", "model.vocab_size=896"]))
    with pytest.warns(UserWarning) as caught:
        pretrain.prepare(cfg, DistEnv(0, 1, 0, "single"))
    assert [str(w.message) for w in caught] == both
