"""Preprocessing throughput: tanuki vs a baseline built the way Megatron-LM's preprocess_data.py works.

Usage:
    python benchmarks/preprocess_bench.py                       # 50 MB corpus, 1 and 2 workers
    python benchmarks/preprocess_bench.py --mb 200 --workers 1 2 4 --rounds 2

The claim (issue 4): at least 3x the baseline per core, with identical output.

A bilingual JSONL corpus of ``--mb`` MB is generated in a temporary directory (Zipf-distributed
Japanese and English words, documents of a few hundred to a few thousand characters), and a
SentencePiece Unigram tokenizer is built from a sample of it with tanuki's builder. Then, side by
side in one run so that both see the same machine load:

* tanuki: ``tanuki.data.preprocess.preprocess`` with ``workers`` encoding processes;
* baseline: what ``tools/preprocess_data.py`` does without sentence splitting: a
  ``multiprocessing.Pool(workers)`` whose workers each ``json.loads`` a line and encode its text with
  the Hugging Face tokenizer (``PreTrainedTokenizerFast.__call__``), fed by ``pool.imap`` in chunks
  of 32 lines, with the main process appending each document to Megatron's ``IndexedDatasetBuilder``
  (megatron-core must be installed).

Each run is a separate process; wall time and the CPU time of the process and all its workers are
measured, so "per core" is MB per CPU-second and does not depend on what else runs on the machine.
Both outputs must be byte-identical. Results go to benchmarks/results/preprocess.{md,json}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write a bilingual JSONL corpus of about ``megabytes`` MB; returns the number of documents."""
    rng = np.random.default_rng(seed)
    kanji = [chr(c) for c in range(0x4E00, 0x4E00 + 1500)]
    kana = [chr(c) for c in range(0x3041, 0x3094)] + [chr(c) for c in range(0x30A1, 0x30F5)]
    ja_words = []
    for _ in range(6000):
        n = int(rng.integers(1, 4))
        pool = kanji if rng.random() < 0.6 else kana
        ja_words.append("".join(pool[int(i)] for i in rng.integers(0, len(pool), n)))
    ja_words += ["は", "が", "を", "に", "の", "で", "と", "です", "ます", "した", "する", "こと"] * 50
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    en_words = ["".join(letters[rng.integers(0, 26, int(rng.integers(2, 9)))]) for _ in range(4000)]
    en_words += ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as"] * 40

    def zipf_choice(words, n):
        ranks = np.minimum(rng.zipf(1.2, n), len(words)) - 1
        return [words[int(r)] for r in ranks]

    target = int(megabytes * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            if rng.random() < 0.7:
                sentences = []
                for _ in range(int(rng.integers(3, 30))):
                    sentences.append("".join(zipf_choice(ja_words, int(rng.integers(5, 25)))) + "。")
                text = "".join(sentences)
            else:
                sentences = []
                for _ in range(int(rng.integers(3, 20))):
                    words = zipf_choice(en_words, int(rng.integers(5, 20)))
                    sentences.append(" ".join(words).capitalize() + ".")
                text = " ".join(sentences)
            line = json.dumps({"text": text, "id": docs}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


# --------------------------------------------------------------------------------------------------
# The two implementations (run in child processes)
# --------------------------------------------------------------------------------------------------

_TOKENIZER = None
_EOS = None


def _baseline_init(tokenizer_dir: str) -> None:
    global _TOKENIZER, _EOS
    from transformers import PreTrainedTokenizerFast

    _TOKENIZER = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    _EOS = _TOKENIZER.eos_token_id


def _baseline_encode(line: str):
    # preprocess_data.py's Encoder.encode: parse the JSON line, tokenize the text, append the EOD.
    text = json.loads(line)["text"]
    ids = _TOKENIZER(text, add_special_tokens=False).input_ids
    ids.append(_EOS)
    return ids, len(line)


def run_baseline(corpus: str, tokenizer: str, prefix: str, workers: int) -> None:
    import multiprocessing
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from tanuki.tokenizer import FastEncoder

    dtype = np.uint16 if FastEncoder(tokenizer).vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    with open(corpus, encoding="utf-8") as fin, multiprocessing.Pool(workers, _baseline_init, (tokenizer,)) as pool:
        for ids, _ in pool.imap(_baseline_encode, fin, 32):
            builder.add_document(torch.IntTensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")


def run_tanuki(corpus: str, tokenizer: str, prefix: str, workers: int) -> None:
    from tanuki.data.config import PreprocessConfig
    from tanuki.data.preprocess import preprocess

    preprocess(PreprocessConfig(input=corpus, tokenizer=tokenizer, output_prefix=prefix, workers=workers, progress=False))


def measure(kind: str, corpus: Path, tokenizer: Path, prefix: Path, workers: int) -> dict:
    """Run one configuration in a fresh process; wall seconds and CPU seconds of it and its workers."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--child", kind, str(corpus), str(tokenizer), str(prefix), str(workers)],
        check=True, env=env,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"kind": kind, "workers": workers, "wall_s": wall, "cpu_s": cpu}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (at least 50 for the claim)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="repeat every configuration; medians are reported")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = ap.parse_args()

    from tanuki.data.indexed import IndexedDataset
    from tanuki.tokenizer import BuildTokenizerConfig, build_tokenizer

    with tempfile.TemporaryDirectory(prefix="tanuki-preprocess-bench-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        t0 = time.perf_counter()
        n_docs = make_corpus(corpus, args.mb)
        size = corpus.stat().st_size
        print(f"corpus: {size / 1e6:.1f} MB, {n_docs:,} documents ({time.perf_counter() - t0:.1f} s)", flush=True)
        # train on the first ~4 MB: enough for a realistic vocabulary, quick to build
        sample = tmp / "sample.jsonl"
        with open(corpus, encoding="utf-8") as fin, open(sample, "w", encoding="utf-8") as fout:
            taken = 0
            for line in fin:
                fout.write(line)
                taken += len(line)
                if taken > 4e6:
                    break
        build_tokenizer(
            BuildTokenizerConfig(input=str(sample), output=str(tmp / "tok"), vocab_size=args.vocab, progress=False, report_documents=100),
            log=io.StringIO(),
        )

        runs = []
        for _ in range(args.rounds):
            for w in args.workers:
                for kind in ("tanuki", "baseline"):
                    r = measure(kind, corpus, tmp / "tok", tmp / f"{kind}_{w}", w)
                    runs.append(r)
                    print(f"{kind:>8} workers={w}: {size / 1e6 / r['wall_s']:6.2f} MB/s wall, "
                          f"{size / 1e6 / r['cpu_s']:6.2f} MB per CPU-second", flush=True)

        ref = IndexedDataset(tmp / f"tanuki_{args.workers[0]}")
        tokens = ref.num_tokens
        identical = all(
            (tmp / f"{k}_{w}.{ext}").read_bytes() == (tmp / f"tanuki_{args.workers[0]}.{ext}").read_bytes()
            for k in ("tanuki", "baseline") for w in args.workers for ext in ("bin", "idx")
        )

    rows = []
    for w in args.workers:
        # the median round of each configuration (the machine is shared, so single runs are noisy)
        median = {
            k: {
                m: float(np.median([r[m] for r in runs if r["kind"] == k and r["workers"] == w]))
                for m in ("wall_s", "cpu_s")
            }
            for k in ("tanuki", "baseline")
        }
        row = {"workers": w}
        for k, r in median.items():
            row[k] = {
                "wall_s": round(r["wall_s"], 2),
                "cpu_s": round(r["cpu_s"], 2),
                "mb_per_s": round(size / 1e6 / r["wall_s"], 2),
                "tokens_per_s": round(tokens / r["wall_s"]),
                "mb_per_cpu_s": round(size / 1e6 / r["cpu_s"], 2),
                "tokens_per_cpu_s": round(tokens / r["cpu_s"]),
            }
        row["speedup_wall"] = round(row["tanuki"]["mb_per_s"] / row["baseline"]["mb_per_s"], 2)
        row["speedup_per_core"] = round(row["tanuki"]["mb_per_cpu_s"] / row["baseline"]["mb_per_cpu_s"], 2)
        rows.append(row)

    result = {
        "corpus_mb": round(size / 1e6, 1),
        "documents": n_docs,
        "tokens": tokens,
        "vocab_size": args.vocab,
        "identical_output": identical,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
    }
    md = [
        "# Preprocessing throughput",
        "",
        f"`python benchmarks/preprocess_bench.py --mb {args.mb:g} --workers {' '.join(map(str, args.workers))} --rounds {args.rounds}`",
        "",
        f"Generated bilingual JSONL corpus: {result['corpus_mb']} MB, {n_docs:,} documents, {tokens:,} tokens "
        f"(SentencePiece Unigram, vocab {args.vocab}). Machine: {os.cpu_count()} CPU cores (shared with other "
        "work, so compare the columns of one row: they ran side by side; medians of the rounds). Per core = per "
        "CPU-second of the "
        "process and all its workers. Baseline = Megatron-LM preprocess_data.py's design: Pool.imap over "
        "JSON lines in chunks of 32, HF tokenizer encode per document, Megatron's IndexedDatasetBuilder.",
        "",
        f"Output byte-identical between tanuki and the baseline (all worker counts): **{identical}**",
        "",
        "| workers | tanuki MB/s | baseline MB/s | tanuki tokens/s | baseline tokens/s | speedup (wall) | tanuki MB/CPU-s | baseline MB/CPU-s | speedup per core |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, b = r["tanuki"], r["baseline"]
        md.append(
            f"| {r['workers']} | {t['mb_per_s']} | {b['mb_per_s']} | {t['tokens_per_s']:,} | {b['tokens_per_s']:,} | "
            f"{r['speedup_wall']}x | {t['mb_per_cpu_s']} | {b['mb_per_cpu_s']} | **{r['speedup_per_core']}x** |"
        )
    md += ["", "Goal: at least 3x the baseline per core with identical output."]
    text = "\n".join(md) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "preprocess.md").write_text(text)
        (RESULTS / "preprocess.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, corpus, tokenizer, prefix, workers = sys.argv[2:7]
        (run_tanuki if kind == "tanuki" else run_baseline)(corpus, tokenizer, prefix, int(workers))
    else:
        main()
