"""Loader throughput: samples/s of one data-parallel rank at seq_len 4096 over a blend of 3 prefixes.

Usage:
    python benchmarks/loader_bench.py
    python benchmarks/loader_bench.py --tokens 200 --seconds 10 --micro-batch-size 4

The claim (issue 4): at least 100x what one training step consumes on a GPU, so the loader is never
the bottleneck. The consumption side is computed, not measured: the smallest published model
(conf/size/1.8b.yaml) at seq_len 4096 on one H100 (989 TFLOP/s dense bf16) at 40% MFU, with the
FLOPs per token of tanuki.info.flops_per_token; a larger model consumes fewer samples per second.

Three prefixes of ``--tokens`` million random uint16 tokens in all (split 3:2:1, log-normal document
lengths around 600 tokens) are written to a temporary directory; the blend uses weights 0.5/0.3/0.2.
Reported: index build time (cold cache), index load time (warm cache, what every later start pays),
and samples/s and tokens/s of ``DataLoader`` for rank 0 of 1 and of 8 data-parallel ranks. The data
is in the page cache here; on a cold network file system the first epoch also pays the reads.
Results go to benchmarks/results/loader.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

H100_PEAK_FLOPS = 989e12
MFU = 0.4


def write_prefix(prefix: Path, tokens: int, rng: np.random.Generator) -> None:
    from tanuki.data.indexed import IndexedDatasetWriter

    w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", np.uint16)
    written = 0
    while written < tokens:
        lengths = np.maximum(1, rng.lognormal(6.0, 1.0, 10000).astype(np.int64))
        w.add_documents(rng.integers(0, 32000, int(lengths.sum()), dtype=np.uint16), lengths)
        written += int(lengths.sum())
    w.finish()


def gpu_samples_per_second(seq_len: int) -> float:
    """Samples/s one H100 consumes training the 1.8b model at ``seq_len`` (see the module docstring)."""
    from omegaconf import OmegaConf

    from tanuki.config import ModelConfig, from_dict
    from tanuki.info import flops_per_token

    size = OmegaConf.load(REPO / "conf" / "size" / "1.8b.yaml")
    model = from_dict(ModelConfig, size.model, prefix="model")
    return H100_PEAK_FLOPS * MFU / flops_per_token(model, seq_len) / seq_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=float, default=60, help="million tokens over the three prefixes")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--train-samples", type=int, default=200_000, help="samples in the blend")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0, help="time to iterate per measurement")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    from tanuki.data.blend import build_pretrain_datasets
    from tanuki.data.config import DataConfig
    from tanuki.data.loader import DataLoader

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="tanuki-loader-bench-") as tmp:
        prefixes = []
        for i, share in enumerate((3, 2, 1)):
            p = Path(tmp) / f"p{i}"
            write_prefix(p, int(args.tokens * 1e6 * share / 6), rng)
            prefixes.append(str(p))
        cfg = DataConfig(prefixes=tuple(prefixes), weights=(0.5, 0.3, 0.2))

        t0 = time.perf_counter()
        data = build_pretrain_datasets(cfg, seq_len=args.seq_len, train_samples=args.train_samples)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = build_pretrain_datasets(cfg, seq_len=args.seq_len, train_samples=args.train_samples)
        load_s = time.perf_counter() - t0
        epochs = [d.num_epochs for d in data.train.datasets]

        rates = {}
        for dp_size in (1, 8):
            loader = DataLoader(data.train, micro_batch_size=args.micro_batch_size, dp_rank=0, dp_size=dp_size)
            n = 0
            t0 = time.perf_counter()
            for batch in loader:
                n += batch["tokens"].shape[0]
                if time.perf_counter() - t0 > args.seconds:
                    break
            rates[dp_size] = n / (time.perf_counter() - t0)

    # The blend order is the one Python loop of the index build; time it per sample for long runs.
    from tanuki.data.blend import build_blend_index

    t0 = time.perf_counter()
    build_blend_index((0.5, 0.3, 0.2), 2_000_000)
    blend_us = (time.perf_counter() - t0) / 2_000_000 * 1e6

    need = gpu_samples_per_second(args.seq_len)
    result = {
        "tokens_millions": args.tokens,
        "seq_len": args.seq_len,
        "train_samples": args.train_samples,
        "micro_batch_size": args.micro_batch_size,
        "epochs_per_prefix": epochs,
        "index_build_s": round(build_s, 2),
        "index_load_s": round(load_s, 3),
        "blend_order_us_per_sample": round(blend_us, 3),
        "samples_per_s": {str(k): round(v) for k, v in rates.items()},
        "tokens_per_s": {str(k): round(v * (args.seq_len + 1)) for k, v in rates.items()},
        "gpu_samples_per_s_1.8b_h100": round(need, 2),
        "headroom": {str(k): round(v / need) for k, v in rates.items()},
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    md = [
        "# Loader throughput",
        "",
        f"`python benchmarks/loader_bench.py --tokens {args.tokens:g} --seq-len {args.seq_len} "
        f"--train-samples {args.train_samples} --micro-batch-size {args.micro_batch_size}`",
        "",
        f"Blend of 3 prefixes ({args.tokens:g}M random tokens, 3:2:1, weights 0.5/0.3/0.2), seq_len {args.seq_len}, "
        f"{args.train_samples:,} training samples ({', '.join(map(str, epochs))} epochs of the three prefixes). "
        f"One process on a {os.cpu_count()}-core machine shared with other work; data in the page cache.",
        "",
        f"- sample index build (cold cache, all three prefixes and the blend): {build_s:.2f} s",
        f"- index load (warm cache, every later start): {load_s * 1000:.0f} ms",
        f"- blend order: {blend_us:.2f} µs per sample (a run of 500M samples: {blend_us * 500:.0f} s, once, then cached)",
        "",
        "| data-parallel ranks (rank 0 measured) | samples/s | tokens/s | x what one H100 consumes (1.8b, 40% MFU: "
        f"{need:.1f} samples/s) |",
        "|---:|---:|---:|---:|",
    ]
    for k, v in rates.items():
        md.append(f"| {k} | {v:,.0f} | {v * (args.seq_len + 1):,.0f} | **{v / need:,.0f}x** |")
    md += ["", "Goal: at least 100x what one training step consumes on a GPU."]
    text = "\n".join(md) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "loader.md").write_text(text)
        (RESULTS / "loader.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
