"""The environment of a benchmark run: GPU, driver, CUDA, and the versions of what tanuki runs on.

Usage:
    python benchmarks/gpu/env_report.py --out benchmarks/results/environment_gpu.md

Written first by ``benchmarks/gpu/run_all.sh`` so that every result of the campaign names its device.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "triton", "deepspeed", "transformers", "peft", "lm_eval", "tanuki-llm")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def nvidia_smi() -> str:
    """The driver's own view of the GPUs (name, driver, memory), or why there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi unavailable ({type(e).__name__})"


def report() -> tuple[str, str]:
    """(markdown, device name)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{torch.cuda.device_count()} x {props.name}"
        rows = [("device", device), ("memory per GPU", f"{props.total_memory / 1024**3:.1f} GiB"),
                ("compute capability", f"{props.major}.{props.minor}"), ("CUDA (torch build)", torch.version.cuda),
                ("nvidia-smi", nvidia_smi())]
    else:
        device = f"CPU ({platform.processor() or platform.machine()})"
        rows = [("device", device + " — no CUDA GPU: a smoke run at tiny sizes, not a GPU measurement")]
    rows += [("python", sys.version.split()[0]), ("platform", platform.platform())]
    rows += [(p, version(p)) for p in PACKAGES]
    md = ["# Environment of the GPU campaign", "", "| what | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(md) + "\n", device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    md, device = report()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)
    print(f"device: {device}")


if __name__ == "__main__":
    main()
