"""Peak memory and time of the output head + loss: full logits against the chunked head of
``tanuki.chunked_loss``, transformers' ``LlamaForCausalLM`` loss path and Liger-Kernel.

Usage:
    python benchmarks/loss_memory_bench.py            # the committed result (1-2 hours on 2 shared cores)
    python benchmarks/loss_memory_bench.py --quick    # small sizes in under 30 s (tests/test_chunked_loss.py)
    python benchmarks/loss_memory_bench.py --quick --out /tmp/loss_memory.md
    python benchmarks/loss_memory_bench.py --only full,stored --threads 2

Claim (the brief of this file): at 16,384 tokens x 99,584 vocabulary the chunked head + loss peaks at
least 8x lower than ``causal_lm_loss(h @ W.T)`` at no more than 1.1x its CPU time, with the same loss
and gradients (fp32, 1e-6 relative).

What is measured: one forward + backward of ``loss(h, W, labels)`` with ``h`` (tokens x width) and
``W`` (vocab x width) leaves that require gradients, bf16 as in training (``model.head`` on bf16
hidden states, fp32 softmax), z-loss 1e-4, labels below ``vocab_limit = vocab - 97`` (padded rows, as
in training). Each configuration runs in a fresh subprocess: a small warm-up of the same method loads
the kernels, the inputs are allocated, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``)
and the peak is ``VmHWM`` after the first forward + backward minus the RSS before it. It includes the
gradients of ``h`` and ``W`` that the backward produces, which every method must produce. Times are the
median of the repeats, wall clock and CPU time of the process. Workers run one torch thread by default:
on a machine whose cores are shared with other work, a second OpenMP thread spin-waits for the first
whenever the scheduler takes it away, which inflates CPU time by an amount that depends on the load;
one thread's CPU time is the work itself.

Methods:

* ``full``: ``causal_lm_loss(F.linear(h, W), labels, z_loss=..., vocab_limit=...)``, today's path;
* ``stored`` / ``recompute``: ``chunked_causal_lm_loss(h, W, labels, chunk_size=..., strategy=...)``;
* ``hf``: transformers' causal-LM loss path on the same hidden states: ``lm_head(h)`` then
  ``LlamaForCausalLM.loss_function`` (``ForCausalLMLoss``: ``.float()``, then ``F.cross_entropy``) with
  ``shift_labels`` given (the labels are already aligned); it has no z-loss and no padding mask;
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (``lse_square_scale`` = z-loss, on
  ``W[:vocab_limit]``). Its cross-entropy kernel is Triton; on CPU it runs only in the Triton interpreter
  (``TRITON_INTERPRET=1``), so its time and memory measure the interpreter, not the kernel.

The fp32 agreement check computes the reference (``causal_lm_loss`` on full logits), both chunked
strategies and an fp64 evaluation of the same formulas in one process, and reports the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "loss_memory.md"
PAD = 97  # padded vocabulary rows: vocab_limit = vocab - PAD
Z_LOSS = 1e-4
GIB = 1024 ** 3


# -- one configuration, in its own process -------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _loss_fn(spec: dict):
    """``f(h, W, labels) -> loss`` for ``spec['method']``."""
    import torch.nn.functional as F

    from tanuki.chunked_loss import causal_lm_loss_ref, chunked_causal_lm_loss

    method, limit = spec["method"], spec["vocab"] - PAD
    if method == "full":
        return lambda h, w, y: causal_lm_loss_ref(h, w, y, z_loss=Z_LOSS, vocab_limit=limit).loss
    if method in ("stored", "recompute"):
        return lambda h, w, y: chunked_causal_lm_loss(h, w, y, z_loss=Z_LOSS, vocab_limit=limit,
                                                      chunk_size=spec["chunk"], strategy=method).loss
    if method == "hf":
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):  # only for its loss_function: nothing is allocated
            model = LlamaForCausalLM(LlamaConfig(vocab_size=spec["vocab"], hidden_size=64, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=1))
        loss_function = model.loss_function

        def hf(h, w, y):
            logits = F.linear(h, w)  # lm_head
            return loss_function(logits=logits, labels=None, vocab_size=spec["vocab"], shift_labels=y)

        return hf
    if method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss(lse_square_scale=Z_LOSS)
        return lambda h, w, y: fused(w[:limit], h, y)
    raise ValueError(method)


def _inputs(spec: dict, dtype):
    """Hidden states of std 1 (after RMSNorm), head weights of std 0.02 (as initialised), labels below
    the vocabulary limit; drawn directly in ``dtype`` so that no fp32 temporary raises the baseline."""
    import torch

    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    tokens, vocab, dim = spec["tokens"], spec["vocab"], spec["dim"]
    h = torch.randn(tokens, dim, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, dim, generator=gen, dtype=dtype).mul_(0.02).requires_grad_()
    y = torch.randint(0, vocab - PAD, (tokens,), generator=gen)
    return h, w, y


def worker(spec: dict) -> dict:
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    # warm-up at a small size: kernels, thread pools and allocator arenas exist before the baseline
    small = dict(spec, tokens=64, vocab=512 + PAD, dim=64)
    h, w, y = _inputs(small, dtype)
    _loss_fn(small)(h, w, y).backward()
    fn = _loss_fn(spec)
    del h, w, y
    h, w, y = _inputs(spec, dtype)
    gc.collect()
    walls, cpus = [], []
    for r in range(spec["repeats"]):
        h.grad = w.grad = None
        gc.collect()
        if r == 0:
            exact = _reset_peak()
            base = _status_bytes("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(h, w, y)
        out.backward()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if r == 0:
            peak = _status_bytes("VmHWM") - base
            loss = out.item()
            gh, gw = h.grad.float(), w.grad.float()
            grads = dict(grad_h_norm=gh.norm().item(), grad_w_norm=gw.norm().item(),
                         grad_pad_max=gw[spec["vocab"] - PAD:].abs().max().item())
            del gh, gw
        del out
    return dict(spec, peak=peak, peak_exact=exact, base_rss=base, wall=statistics.median(walls),
                cpu=statistics.median(cpus), walls=walls, cpus=cpus, loss=loss, **grads)


def _fp64_truth(h, w, y, limit):
    """The same loss, evaluated in fp64 from the same inputs: the rounding floor of both fp32 paths."""
    import torch

    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    valid = y != -100
    z = h64 @ w64[:limit].T
    lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    count = valid.sum()
    loss = ((lse - zt) * valid).sum() / count + Z_LOSS * (lse.pow(2) * valid).sum() / count
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def check_worker(spec: dict) -> dict:
    """fp32: the chunked strategies against the full-logits reference (and both against fp64)."""
    import torch

    from tanuki.chunked_loss import causal_lm_loss_ref, chunked_causal_lm_loss

    torch.set_num_threads(spec["threads"])
    h, w, y = _inputs(spec, torch.float32)
    y[::7] = -100  # some ignored labels too
    limit = spec["vocab"] - PAD

    def grads(fn):
        h.grad = w.grad = None
        out = fn()
        out.loss.backward()
        return out.loss.detach(), h.grad.clone(), w.grad.clone()

    ref = grads(lambda: causal_lm_loss_ref(h, w, y, z_loss=Z_LOSS, vocab_limit=limit))
    truth = _fp64_truth(h, w, y, limit)

    def diffs(a, b):
        """loss relative difference; per gradient: max |a - b| / max |b| and ||a - b|| / ||b||."""
        a, b = [t.double() for t in a], [t.double() for t in b]
        out = {"loss": (abs(a[0] - b[0]) / abs(b[0])).item()}
        for name, x, t in (("grad_h", a[1], b[1]), ("grad_w", a[2], b[2])):
            out[name + "_max"] = ((x - t).abs().max() / t.abs().max()).item()
            out[name + "_norm"] = ((x - t).norm() / t.norm()).item()
        return out

    rows = [dict(method="reference", chunk=0, loss=ref[0].item(), vs_fp64=diffs(ref, truth))]
    for strategy in ("stored", "recompute"):
        for chunk in spec["chunks"]:
            got = grads(lambda: chunked_causal_lm_loss(h, w, y, z_loss=Z_LOSS, vocab_limit=limit, chunk_size=chunk,
                                                       strategy=strategy))
            vs_ref = diffs(got, ref)
            ok = vs_ref["loss"] <= 1e-6 and vs_ref["grad_h_norm"] <= 1e-6 and vs_ref["grad_w_norm"] <= 1e-6
            rows.append(dict(method=strategy, chunk=chunk, loss=got[0].item(), vs_ref=vs_ref,
                             vs_fp64=diffs(got, truth), ok=ok))
    return dict(spec, rows=rows, fp64_loss=truth[0].item())


# -- the driver -----------------------------------------------------------------------------------------


def run_one(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if spec["method"] == "liger":
        env["TRITON_INTERPRET"] = "1"  # no GPU: Triton runs only in its interpreter
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    started, load = time.perf_counter(), os.getloadavg()[0]
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        return dict(spec, error=(proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    result["load_before"] = load
    return result


def plan(quick: bool, threads: int) -> tuple[dict, list[dict]]:
    """The fp32 check and the list of timed configurations."""
    runs = []

    def add(tokens, vocab, dim, method, chunk=0, repeats=2):
        runs.append(dict(tokens=tokens, vocab=vocab, dim=dim, dtype="bfloat16", method=method, chunk=chunk,
                         repeats=repeats, threads=threads))

    if quick:
        check = dict(method="check", tokens=96, vocab=1024 + PAD, dim=64, chunks=[7, 32], threads=threads)
        for method, chunk in (("full", 0), ("hf", 0), ("stored", 128), ("recompute", 128)):
            add(512, 4096 + PAD, 128, method, chunk)
        return check, runs
    check = dict(method="check", tokens=1024, vocab=99584, dim=2048, chunks=[256], threads=threads)
    # side by side at 4,096 tokens, where the full logits fit in this machine's memory
    add(4096, 99584, 2048, "full", repeats=3)
    add(4096, 99584, 2048, "stored", 1024, repeats=3)
    add(4096, 99584, 2048, "hf")
    add(4096, 99584, 2048, "stored", 256)
    add(4096, 99584, 2048, "stored", 4096)
    add(4096, 99584, 2048, "recompute", 1024)
    add(4096, 65024, 2048, "full")
    add(4096, 65024, 2048, "stored", 1024)
    add(4096, 99584, 4096, "full")
    add(4096, 99584, 4096, "stored", 1024)
    # the growth of the full path's peak and time with tokens (to extrapolate where it does not fit)
    add(2048, 99584, 2048, "full", repeats=1)
    # 16,384 tokens: the chunked head only (the full logits need ~4x their 4,096-token peak)
    add(16384, 99584, 2048, "stored", 1024, repeats=1)
    add(16384, 99584, 2048, "recompute", 1024, repeats=1)
    add(16384, 65024, 2048, "stored", 1024, repeats=1)
    add(16384, 99584, 4096, "stored", 1024, repeats=1)
    # Liger through the Triton interpreter, at a size the interpreter finishes, next to ours
    add(512, 99584, 2048, "liger", repeats=1)
    add(512, 99584, 2048, "full", repeats=1)
    add(512, 99584, 2048, "stored", 1024, repeats=1)
    return check, runs


def _label(r: dict) -> str:
    m = r["method"]
    if m in ("stored", "recompute"):
        return f"chunked `{m}`, chunk {r['chunk']}"
    return {"full": "full logits (`causal_lm_loss`)", "hf": "transformers `ForCausalLMLoss`",
            "liger": "Liger FLCE (Triton interpreter)"}[m]


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _line_fit(points: list[tuple[float, float]], x: float) -> float:
    """Least-squares line through ``points``, evaluated at ``x``."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my + slope * (x - mx)


GOAL = (16384, 99584, 2048)  # tokens, vocab, width
SIDE = (4096, 99584, 2048)


def _shape(r: dict) -> tuple[int, int, int]:
    return r["tokens"], r["vocab"], r["dim"]


def summary(results: list[dict]) -> list[str]:
    """The chunk-size choice and the goal at 16,384 x 99,584, from the measured rows."""
    ok = [r for r in results if "error" not in r]
    lines = []
    sweep = sorted((r for r in ok if r["method"] == "stored" and _shape(r) == SIDE), key=lambda r: r["chunk"])
    full_side = next((r for r in ok if r["method"] == "full" and _shape(r) == SIDE), None)
    if sweep and full_side is not None:
        fits = [r for r in sweep if r["cpu"] <= 1.1 * full_side["cpu"]]
        pick = fits[0] if fits else min(sweep, key=lambda r: r["cpu"])
        lines.append(f"**Recommended `train.loss_chunk_size`: {pick['chunk']}** (rule: the smallest measured chunk, "
                     "so the lowest peak, whose CPU time meets the time goal, <= 1.1x the full path's, at 4,096 x "
                     "99,584 x 2,048). Chunks: "
                     + ", ".join(f"{r['chunk']}: {_gib(r['peak'])} GiB, {r['cpu']:.1f} CPU s "
                                 f"({r['cpu'] / full_side['cpu']:.2f}x)" for r in sweep)
                     + f"; full: {_gib(full_side['peak'])} GiB, {full_side['cpu']:.1f} CPU s.")
        lines.append("")
    side = {(r["method"], r["chunk"]): r for r in ok if _shape(r) == SIDE}
    if ("full", 0) in side and ("stored", 1024) in side:
        f, c = side["full", 0], side["stored", 1024]
        lines.append(f"Side by side at 4,096 x 99,584 x 2,048 (both measured): full {_gib(f['peak'])} GiB, "
                     f"{f['cpu']:.1f} CPU s; chunked `stored` 1024 {_gib(c['peak'])} GiB, {c['cpu']:.1f} CPU s: peak "
                     f"{f['peak'] / c['peak']:.1f}x lower, CPU time {c['cpu'] / f['cpu']:.3f}x (wall time "
                     f"{c['wall'] / f['wall']:.3f}x).")
        lines.append("")
    full = sorted((r for r in ok if r["method"] == "full" and _shape(r)[1:] == GOAL[1:]), key=lambda r: r["tokens"])
    chunked = next((r for r in ok if r["method"] == "stored" and _shape(r) == GOAL), None)
    measured = next((r for r in full if r["tokens"] == GOAL[0]), None)
    if chunked is None or (measured is None and len(full) < 2):
        return lines
    if measured is not None:
        fpeak, fcpu, how = measured["peak"], measured["cpu"], "measured"
    else:
        fpeak = _line_fit([(r["tokens"], r["peak"]) for r in full], GOAL[0])
        fcpu = _line_fit([(r["tokens"], r["cpu"]) for r in full], GOAL[0])
        how = ("extrapolated, as it does not fit in this machine's memory: least-squares lines through its measured "
               "peaks and CPU times at " + ", ".join(f"{r['tokens']:,}" for r in full) + " tokens, same vocabulary "
               "and width (" + ", ".join(f"{_gib(r['peak'])} GiB" for r in full) + ")")
    peak_ratio, cpu_ratio = fpeak / chunked["peak"], chunked["cpu"] / fcpu
    lines.append(f"**Goal at {GOAL[0]:,} tokens x {GOAL[1]:,} vocabulary x {GOAL[2]:,} width**: chunked `stored`, "
                 f"chunk {chunked['chunk']}, measured {_gib(chunked['peak'])} GiB and {chunked['cpu']:.1f} CPU s; full "
                 f"logits {_gib(fpeak)} GiB and {fcpu:.1f} CPU s ({how}). Peak {peak_ratio:.1f}x lower (goal >= 8x: "
                 f"**{'met' if peak_ratio >= 8 else 'not met'}**), CPU time {cpu_ratio:.3f}x (goal <= 1.1x: "
                 f"**{'met' if cpu_ratio <= 1.1 else 'not met'}**).")
    lines.append("")
    return lines


def _check_table(check: dict) -> list[str]:
    if "error" in check:
        return [f"error: {check['error']}", ""]
    lines = ["| method | chunk | loss | vs | loss rel. diff | grad h: max diff / max | grad h: norm rel. | "
             "grad W: max diff / max | grad W: norm rel. |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in check["rows"]:
        for vs in ("vs_ref", "vs_fp64"):
            if vs not in row:
                continue
            d = row[vs]
            lines.append(f"| {row['method']} | {row['chunk']} | {row['loss']:.8f} | {vs[3:]} | {d['loss']:.1e} | "
                         f"{d['grad_h_max']:.1e} | {d['grad_h_norm']:.1e} | {d['grad_w_max']:.1e} | "
                         f"{d['grad_w_norm']:.1e} |")
    verdict = all(row["ok"] for row in check["rows"] if "ok" in row)
    lines += ["", f"Loss and normwise gradient differences to the reference within 1e-6: **{verdict}** (fp64 loss "
              f"{check['fp64_loss']:.8f}).", ""]
    return lines


#: what the committed (full) run leaves out and how to read it; the numbers are those of the run
NOTES = [
    "## Notes",
    "",
    "- Not run: the full logits and transformers' path at 16,384 tokens (the full path's peak grows linearly, "
    "1.9 MiB per token at 99,584 x 2,048, so about 30 GiB at 16,384 tokens; this machine has 24 GiB, shared); the "
    "65,024 x 4,096 shapes and 16,384 x 65,024 x 4,096 (time: a pass at width 4,096 takes 40-150 CPU s here; the "
    "99,584 x 4,096 rows cover that width). The goal's full-logits numbers are therefore extrapolated from its "
    "measured 512, 2,048 and 4,096-token rows (the peaks are linear in tokens to 0.1%).",
    "- Liger-Kernel 0.8.5 installs without another torch (it needs triton, already present), but its "
    "cross-entropy kernel needs a Triton GPU driver: on CPU it fails with `0 active drivers`. Under the Triton "
    "interpreter (`TRITON_INTERPRET=1`) it runs and agrees with the reference (the 512-token row), in 62 CPU s "
    "instead of 3 and with a 2.67 GiB peak that measures the interpreter's host copies; it was not run at the "
    "larger sizes and its numbers say nothing about the kernel on a GPU.",
    "- Where the memory goes: the full path keeps about 19 bytes per logit at its peak (bf16 logits, their fp32 "
    "copy, the log-softmax, the z-loss log-sum-exp and the gradients); transformers' path, which has no z-loss and "
    "does not slice off the padded columns, about 11. The chunked head keeps the fp32 sum of the gradient of `W` "
    "(vocab x width x 4 bytes: 0.76 GiB at 99,584 x 2,048), one chunk's logits and their gradient (about "
    "chunk x vocab x 6-8 bytes) and the fp32 gradient of `h`; so its peak hardly grows with tokens (1.76 GiB at "
    "4,096, 1.87 GiB at 16,384), and below about 1,000 tokens it is above the full path's (the 512-token row).",
    "- Time: `stored` does the full path's three matmuls (logits, grad h, grad W) and `recompute` a fourth "
    "(1.12x the full path at 4,096 tokens, 1.26x `stored` at 16,384). On CPU small chunks also pay a "
    "read-modify-write of the fp32 `W` gradient per chunk (256: "
    "1.25x); on a GPU that pass is a few milliseconds. CPU times of repeats of one configuration differ by up to "
    "30% on this shared machine (full at 99,584 x 4,096: 54.5 and 37.3 CPU s), so ratios near 1 are equal within "
    "the noise.",
    "",
]


def render(check: dict, results: list[dict], args, seconds: float, load: tuple[float, float], machine: str) -> str:
    lines = ["# Output head + loss: peak memory and time (CPU)", ""]
    lines.append(f"`python benchmarks/loss_memory_bench.py{' --quick' if args.quick else ''}`")
    lines.append("")
    lines.append(f"Machine: {machine}; workers run {args.threads} torch thread(s). Whole run: "
                 f"{seconds:.0f} s; load average {load[0]:.1f} at the start, {load[1]:.1f} at "
                 "the end (the cores are shared with other work: wall times are noisy, CPU times much less so).")
    lines.append("")
    lines.append(f"Forward + backward of the head and loss on bf16 `h` (tokens x width) and `W` (vocab x width), "
                 f"z-loss {Z_LOSS:g}, `vocab_limit = vocab - {PAD}`. Peak = peak RSS during the first pass minus the "
                 "RSS just before it (it includes the produced gradients of `h` and `W`). Times: median of the "
                 "repeats; each configuration in a fresh process. Ratios are against `full` at the same shape.")
    lines.append("")
    lines.append("| tokens | vocab | width | method | peak GiB | peak / full | wall s | CPU s | CPU / full | repeats "
                 "| loss |")
    lines.append("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    full = {_shape(r): r for r in results if r["method"] == "full" and "error" not in r}
    for r in results:
        head = f"| {r['tokens']:,} | {r['vocab']:,} | {r['dim']:,} | {_label(r)} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | | | |")
            continue
        f = full.get(_shape(r))
        pr = "" if f is None else "1" if f is r else f"{r['peak'] / f['peak']:.3f}"
        cr = "" if f is None else "1" if f is r else f"{r['cpu'] / f['cpu']:.3f}"
        lines.append(f"{head} {_gib(r['peak'])} | {pr} | {r['wall']:.2f} | {r['cpu']:.2f} | {cr} | {r['repeats']} | "
                     f"{r['loss']:.6f} |")
    lines.append("")
    lines += summary(results)
    lines.append(f"fp32 agreement ({check['tokens']:,} tokens x {check['vocab']:,} x {check['dim']:,}, every 7th label "
                 f"ignored, z-loss {Z_LOSS:g}): each chunked strategy against the full-logits reference (`ref`), and "
                 "every fp32 result against an fp64 evaluation of the same formulas from the same inputs (`fp64`, "
                 "the rounding floor: a sum over ~10^5 vocabulary entries in fp32 carries a few 1e-7 to 1e-6 of the "
                 "largest entry whatever the order).")
    lines.append("")
    lines += _check_table(check)
    if not args.quick:
        lines += NOTES
    lines.append("Raw results (one JSON object per configuration):")
    lines.append("")
    lines.append("```")
    for r in [check, *results]:
        lines.append(json.dumps(r, sort_keys=True))
    lines.append("```")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 30 s")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown result (default: {RESULT.relative_to(REPO)}; none for --quick)")
    parser.add_argument("--only", default=None, help="run only configurations whose method is in this comma list")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--render-from", type=Path, default=None,
                        help="write the markdown from an earlier run's printed JSON lines instead of running")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        spec = json.loads(args.worker)
        print(json.dumps(check_worker(spec) if spec["method"] == "check" else worker(spec)))
        return
    if args.render_from is not None:
        records = [json.loads(line) for line in args.render_from.read_text().splitlines() if line.startswith("{")]
        meta = next(r["meta"] for r in records if "meta" in r)
        check, *results = [r for r in records if "meta" not in r]
        text = render(check, results, args, meta["seconds"], tuple(meta["load"]), meta["machine"])
        (args.out or RESULT).write_text(text)
        print(f"wrote {args.out or RESULT}")
        return
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    check, runs = plan(args.quick, args.threads)
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["method"] in keep]
    print(f"fp32 check at {check['tokens']} x {check['vocab']} x {check['dim']} ...", flush=True)
    check = run_one(check, args.timeout)
    print(json.dumps(check), flush=True)
    results = []
    for spec in runs:
        print(f"{spec['method']} chunk={spec['chunk']} tokens={spec['tokens']} vocab={spec['vocab']} "
              f"dim={spec['dim']} ...", flush=True)
        results.append(run_one(spec, args.timeout))
        print(json.dumps(results[-1]), flush=True)
    meta = dict(seconds=time.perf_counter() - started, load=(load0, os.getloadavg()[0]), machine=machine_line())
    print(json.dumps({"meta": meta}), flush=True)  # with the lines above: what --render-from reads
    text = render(check, results, args, meta["seconds"], meta["load"], meta["machine"])
    out = args.out if args.out is not None else (None if args.quick else RESULT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
