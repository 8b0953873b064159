"""Peak GPU memory and time of the output head + loss: full logits, the chunked head, transformers' path.

Usage:
    python benchmarks/gpu/loss_memory_gpu.py --out benchmarks/results/loss_memory_gpu.md   # one CUDA GPU
    python benchmarks/gpu/loss_memory_gpu.py --smoke --out /tmp/loss_memory_gpu.md        # CPU, tiny sizes

The GPU counterpart of ``benchmarks/loss_memory_bench.py`` (which measures the CPU's peak RSS): one
forward + backward of the loss of bf16 hidden states ``h`` (tokens x width) through the head ``W``
(vocab x width), z-loss 1e-4, labels below ``vocab_limit = vocab - 97`` (padded rows, as in training).
Peak memory is ``torch.cuda.max_memory_allocated`` during the call minus what was allocated before it
(inputs included in neither; the gradients of ``h`` and ``W`` included in all); time is the median of
``--repeats`` calls timed with CUDA events after one warm-up. Methods: ``full`` =
``causal_lm_loss(F.linear(h, W))``; ``chunked`` = ``tanuki.chunked_loss.chunked_causal_lm_loss``
(strategy stored, ``--chunk-size``); ``hf`` = ``lm_head`` then transformers' ``ForCausalLMLoss``.
``--smoke`` runs the same code on CPU at tiny sizes (no memory numbers) so the script cannot rot.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tanuki.chunked_loss import chunked_causal_lm_loss
from tanuki.losses import causal_lm_loss

PAD = 97
Z_LOSS = 1e-4
GIB = 1024**3
SHAPES = [(4096, 2048, 65024), (4096, 2048, 99584), (16384, 2048, 99584), (16384, 4096, 99584), (16384, 4096, 65024)]
SMOKE_SHAPES = [(64, 32, 512), (96, 48, 1000)]


def methods(chunk_size: int):
    from transformers.loss.loss_utils import ForCausalLMLoss

    def full(h, w, labels, limit):
        return causal_lm_loss(F.linear(h, w), labels, z_loss=Z_LOSS, vocab_limit=limit).loss

    def chunked(h, w, labels, limit):
        return chunked_causal_lm_loss(h, w, labels, z_loss=Z_LOSS, vocab_limit=limit, chunk_size=chunk_size).loss

    def hf(h, w, labels, limit):  # no z-loss, no padding mask: what LlamaForCausalLM computes
        logits = F.linear(h, w)
        return ForCausalLMLoss(logits, None, vocab_size=w.shape[0], shift_labels=labels)

    return {"full": full, "chunked": chunked, "hf": hf}


def measure(fn, tokens: int, width: int, vocab: int, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(peak GiB above the inputs, median ms, loss)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(tokens, width, generator=gen) * 0.5).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, width, generator=gen) * 0.02).to(device, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab - PAD, (tokens,), generator=gen).to(device)
    cuda = device.type == "cuda"

    def call():
        h.grad = w.grad = None
        loss = fn(h, w, labels, vocab - PAD)
        loss.backward()
        return float(loss.detach())

    loss = call()  # warm-up
    h.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    call()
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if cuda else float("nan")
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - t0))
    del h, w
    if cuda:
        torch.cuda.empty_cache()
    return peak, statistics.median(times), loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (tests)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.smoke:
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            raise SystemExit("loss_memory_gpu.py needs a CUDA GPU (use --smoke on CPU)")
        device, shapes = torch.device("cuda"), SHAPES
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (smoke run: no memory numbers)"
    md = [f"# Output head + loss on {name}", "",
          f"bf16 hidden states and head, z-loss {Z_LOSS}, {PAD} padded vocabulary rows; chunk size {args.chunk_size}; "
          f"median of {args.repeats} forward + backward calls. `python benchmarks/gpu/loss_memory_gpu.py`.", "",
          "| tokens | width | vocab | method | peak GiB | ms | peak / chunked | loss |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for tokens, width, vocab in shapes:
        rows = {}
        for label, fn in methods(args.chunk_size).items():
            try:
                rows[label] = measure(fn, tokens, width, vocab, device, args.repeats)
            except torch.cuda.OutOfMemoryError:
                rows[label] = (float("inf"), float("nan"), float("nan"))
                torch.cuda.empty_cache()
        base = rows["chunked"][0]
        for label, (peak, ms, loss) in rows.items():
            ratio = f"{peak / base:.1f}x" if base == base and base > 0 else ""
            md.append(f"| {tokens:,} | {width:,} | {vocab:,} | {label} | {peak:.2f} | {ms:.1f} | {ratio} | {loss:.5f} |")
        print(md[-3:], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
