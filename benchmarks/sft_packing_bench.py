"""SFT packing on CPU: assistant tokens trained per second, packed rows vs one padded sample per row.

Usage:
    python benchmarks/sft_packing_bench.py                      # ~1.5 minutes on 2 idle cores
    python benchmarks/sft_packing_bench.py --seq-lens 512 --rounds 4 --no-save
    python benchmarks/sft_packing_bench.py --tokenizer demo_out/tokenizer

Claim (issue 8): on the bundled sample data (``tanuki/sample_data/sft.jsonl``) packing several samples
into each row (``data.packing=true``) trains the same assistant tokens in much less time than one
sample per row padded to ``seq_len``, because the padding it removes is most of an unpacked row.

Everything goes through the SFT data path of a real run: ``tanuki.data.sft.build_sft_datasets`` with
``SFTDataConfig(packing=True/False)``, template ``alpaca_ja``, and ``SFTDataLoader`` micro-batches of
``tokens / labels / positions / segment_ids``. The tokenizer is built from the bundled
``corpus.jsonl`` (vocab 4000, ~0.5 s) into a temporary directory unless ``--tokenizer`` names one. The
model is the tiny default ``build_model(ModelConfig())`` (vocab 4096), trained by a plain step: the
loader's next micro-batch, forward with positions and segment ids (the block-diagonal causal mask of
``tanuki.model.segment_mask``, given to SDPA as an explicit boolean mask), ``causal_lm_loss`` on the
labels (per-token mean over the micro-batch's assistant tokens), backward, gradient clipping at 1.0,
AdamW (``tanuki.optim.build_optimizer``, lr 2e-5 as ``conf/sft.yaml``), ``zero_grad``. No DeepSpeed:
it would add the same per-step cost to every mode and tells nothing about packing.

Modes, per ``seq_len`` (each its own model and optimizer from the same seed):

* ``packed``: ``packing=True``, first-fit rows, the segment mask;
* ``unpacked``: ``packing=False``, one sample per row padded to ``seq_len``, run exactly as the SFT
  step runs it (with segment ids, so SDPA also gets the explicit mask);
* ``unpacked_causal``: the same unpacked rows with no segment ids, so SDPA runs with ``is_causal=True``
  (what a pipeline without packing support would do; padding sits after the sample, so causal
  attention gives the same loss; checked on the first batch). The step time of ``unpacked`` over
  ``unpacked_causal`` is the price of the explicit mask at that shape.

All modes of one ``seq_len`` use the same micro-batch shape (``--micro-tokens`` positions:
8 x 256 or 4 x 512), so a step costs the same whatever the rows hold; what packing changes is how
many steps an epoch needs. After ``--warmup`` untimed steps per mode, ``--rounds`` timed rounds of
``--steps`` steps run with the modes alternating (every order of the three in turn), so drift of a
shared machine hits all modes alike. Reported per mode: rows per epoch, fill (sample tokens / row
positions), median step time, time per epoch (= steps per epoch x median step time; a full unpacked
epoch at 512 would take minutes, so epochs are computed, not run), assistant (loss) tokens/s and sample
(non-padding) tokens/s over the epoch, row positions/s, and the ratio packed / unpacked of assistant
tokens/s. Beside it, SDPA alone (forward + backward at the model's attention heads, rows of 256 to 2048)
with the boolean mask, ``is_causal`` and no mask, to show where ``is_causal`` saves work that a tensor
mask cannot. The JSON also records how much CPU other processes took during the run: on a shared
machine, use ``--threads 1``. Results go to ``benchmarks/results/sft_packing.{md,json}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO / "tanuki" / "sample_data" / "sft.jsonl"
CORPUS = REPO / "tanuki" / "sample_data" / "corpus.jsonl"
MODES = ("packed", "unpacked", "unpacked_causal")
LABELS = {
    "packed": "packed (segment mask)",
    "unpacked": "unpacked (segment mask, as the SFT step runs it)",
    "unpacked_causal": "unpacked (`is_causal`, no segment ids)",
}
TEMPLATE = "alpaca_ja"
LR = 2e-5


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--micro-tokens", type=int, default=2048,
                    help="row positions per micro-batch; micro_batch_size = micro_tokens // seq_len")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before the first round")
    ap.add_argument("--rounds", type=int, default=24, help="timed rounds per mode and seq_len")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per round")
    ap.add_argument("--sdpa-reps", type=int, default=15, help="timed calls per variant of the SDPA-only measurement")
    ap.add_argument("--sdpa-seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048],
                    help="row lengths of the SDPA-only measurement (rows: micro_tokens // length, at least 1)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: build one from corpus.jsonl, vocab 4000)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-save", action="store_true")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Tokenizer, data, model
# --------------------------------------------------------------------------------------------------


def get_tokenizer(args, tmp: str):
    """The HF tokenizer of ``--tokenizer``, or one built from the bundled corpus (vocab 4000, as ``make demo``)."""
    from tanuki.tokenizer.encode import load

    if args.tokenizer:
        return load(args.tokenizer), {"source": args.tokenizer, "build_s": None}
    from tanuki.tokenizer.build import build_tokenizer
    from tanuki.tokenizer.config import BuildTokenizerConfig

    out = os.path.join(tmp, "tokenizer")
    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        build_tokenizer(BuildTokenizerConfig(input=str(CORPUS), output=out, vocab_size=4000, progress=False), log=quiet)
    return load(out), {"source": "built from tanuki/sample_data/corpus.jsonl, vocab 4000",
                       "build_s": round(time.perf_counter() - t0, 2)}


def build_data(tokenizer, seq_len: int, packing: bool, min_rows: int):
    """(one-epoch dataset for the statistics, dataset of at least ``min_rows`` rows for timing, stats)."""
    from tanuki.data.sft import SFTDataConfig, SFTDataset, build_sft_datasets

    cfg = SFTDataConfig(path=str(DATA), packing=packing)
    built = build_sft_datasets(cfg, tokenizer, TEMPLATE, seq_len)
    one = built.train
    timed = SFTDataset(one.samples, seq_len, packing=packing, seed=cfg.seed, min_rows=min_rows, pad_id=one.pad_id)
    return one, timed, built.train_stats


def epoch_stats(ds, stats, micro_batch_size: int) -> dict:
    rows = len(ds)
    return {
        "rows_per_epoch": rows,
        "fill": ds.fill,
        "samples": stats.samples,
        "sample_tokens": stats.tokens,
        "loss_tokens": stats.loss_tokens,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "row_positions": rows * ds.seq_len,
        "steps_per_epoch": rows / micro_batch_size,
    }


def build_trainer(seed: int):
    from tanuki.config import ModelConfig
    from tanuki.model import build_model
    from tanuki.optim import build_optimizer

    model = build_model(ModelConfig(), seed=seed).train()
    return model, build_optimizer(model, lr=LR, weight_decay=0.0)


def loss_of(model, batch: dict, causal: bool):
    """The SFT step's loss (``tanuki.sft.sft_step``); ``causal``: without segment ids (``is_causal``)."""
    from tanuki.losses import causal_lm_loss

    seg = None if causal else batch["segment_ids"]
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=seg)
    return causal_lm_loss(logits, batch["labels"])


def train_step(model, opt, batch: dict, causal: bool) -> tuple[float, int]:
    import torch

    out = loss_of(model, batch, causal)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.ce), int(out.tokens)


class Runner:
    """One mode: its loader (cycling through its rows), model and optimizer."""

    def __init__(self, mode: str, dataset, micro_batch_size: int, seed: int):
        from tanuki.data.sft import SFTDataLoader

        self.mode = mode
        self.causal = mode == "unpacked_causal"
        self.loader = SFTDataLoader(dataset, micro_batch_size=micro_batch_size)
        self.it = iter(self.loader)
        self.model, self.opt = build_trainer(seed)

    def run(self, steps: int) -> dict:
        out = {"step_s": [], "cpu_s": [], "load_s": [], "loss": [], "loss_tokens": [], "sample_tokens": []}
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            batch = next(self.it)
            t1 = time.perf_counter()
            loss, n = train_step(self.model, self.opt, batch, self.causal)
            out["step_s"].append(time.perf_counter() - t0)
            out["cpu_s"].append(time.process_time() - c0)
            out["load_s"].append(t1 - t0)
            out["loss"].append(loss)
            out["loss_tokens"].append(n)
            out["sample_tokens"].append(int((batch["segment_ids"] >= 0).sum()))
        return out


def check_causal_equals_mask(runner: Runner, batch: dict) -> dict:
    """Unpacked rows: the loss with the segment mask equals the loss with ``is_causal`` (padding is last)."""
    import torch

    with torch.no_grad():
        a = loss_of(runner.model, batch, causal=False).loss.item()
        b = loss_of(runner.model, batch, causal=True).loss.item()
    return {"loss_mask": a, "loss_is_causal": b, "abs_diff": abs(a - b), "tolerance": 1e-5}


def round_orders(rounds: int) -> list[tuple[str, ...]]:
    """Every order of the modes in turn, so each mode is first, middle and last equally often."""
    perms = list(itertools.permutations(MODES))
    return [perms[r % len(perms)] for r in range(rounds)]


def bench_seq_len(args, tokenizer, seq_len: int) -> dict:
    mbs = args.micro_tokens // seq_len
    if mbs < 1:
        raise SystemExit(f"--micro-tokens {args.micro_tokens} is smaller than seq_len {seq_len}")
    steps_needed = args.warmup + args.rounds * args.steps
    data, epochs = {}, {}
    for packing in (True, False):
        one, timed, stats = build_data(tokenizer, seq_len, packing, min_rows=(steps_needed + 1) * mbs)
        data[packing] = timed
        lengths = [s.length for s in one.samples]
        epochs["packed" if packing else "unpacked"] = epoch_stats(one, stats, mbs)
    epochs["unpacked_causal"] = epochs["unpacked"]
    runners = {m: Runner(m, data[m == "packed"], mbs, args.seed) for m in MODES}
    first = data[False][0]
    check = check_causal_equals_mask(runners["unpacked"], {k: v[None] for k, v in first.items()})
    runs = {m: {"warmup": runners[m].run(args.warmup), "rounds": []} for m in MODES}
    for order in round_orders(args.rounds):
        for m in order:
            runs[m]["rounds"].append(runners[m].run(args.steps))
    return {"seq_len": seq_len, "micro_batch_size": mbs, "epoch": epochs, "check": check, "runs": runs,
            "lengths": lengths}


def sdpa_cost(args, seq_len: int) -> dict:
    """Forward + backward of SDPA alone at the tiny model's attention shape (``micro_tokens // seq_len``
    rows, at least one): the boolean segment mask of one sample per row, ``is_causal``, and no mask at
    all (full attention: what ``is_causal`` costs if the kernel skips nothing). Variants take turns call
    by call (rotating the order); median seconds per call after two warm-up calls each."""
    import torch
    import torch.nn.functional as F

    from tanuki.config import ModelConfig
    from tanuki.model import segment_mask

    cfg = ModelConfig()
    mbs = max(1, args.micro_tokens // seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    hd = cfg.dim // cfg.n_heads
    q = torch.randn(mbs, cfg.n_heads, seq_len, hd, generator=gen).requires_grad_()
    k = torch.randn(mbs, cfg.n_kv_heads, seq_len, hd, generator=gen).requires_grad_()
    v = torch.randn(mbs, cfg.n_kv_heads, seq_len, hd, generator=gen).requires_grad_()
    mask = segment_mask(torch.zeros(mbs, seq_len, dtype=torch.long))
    variants = {"mask": {"attn_mask": mask}, "is_causal": {"is_causal": True}, "full": {}}
    gqa = {"enable_gqa": True} if cfg.n_kv_heads != cfg.n_heads else {}
    names = list(variants)
    times = {n: [] for n in names}
    for i in range(args.sdpa_reps + 2):
        for n in names[i % 3:] + names[: i % 3]:
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, **variants[n], **gqa).sum().backward()
            if i >= 2:
                times[n].append(time.perf_counter() - t0)
            q.grad = k.grad = v.grad = None
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"seq_len": seq_len, "shape_q": [mbs, cfg.n_heads, seq_len, hd], "kv_heads": cfg.n_kv_heads,
            "median_s": med, "ratio_mask_over_causal": med["mask"] / med["is_causal"],
            "ratio_full_over_causal": med["full"] / med["is_causal"], "raw_s": times}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def summarize_seq_len(res: dict) -> dict:
    T, mbs = res["seq_len"], res["micro_batch_size"]
    out = {}
    for m in MODES:
        rounds = res["runs"][m]["rounds"]
        steps = [t for r in rounds for t in r["step_s"]]
        med = statistics.median(steps)
        ep = res["epoch"][m]
        epoch_s = ep["steps_per_epoch"] * med
        timed_s = sum(steps)
        out[m] = {
            **ep,
            "median_step_s": med,
            "min_step_s": min(steps),
            "median_cpu_s": statistics.median([t for r in rounds for t in r["cpu_s"]]),
            "median_load_s": statistics.median([t for r in rounds for t in r["load_s"]]),
            "round_medians_s": [statistics.median(r["step_s"]) for r in rounds],
            "epoch_s": epoch_s,
            # CPU seconds of the process per epoch: moves much less than wall time when other work shares the cores
            "epoch_cpu_s": ep["steps_per_epoch"] * statistics.median([t for r in rounds for t in r["cpu_s"]]),
            "loss_tokens_per_s": ep["loss_tokens"] / epoch_s,
            "sample_tokens_per_s": ep["sample_tokens"] / epoch_s,
            "positions_per_s": mbs * T / med,
            # cross-check over the timed steps themselves (their rows are a sample of the epoch)
            "timed_loss_tokens_per_s": sum(n for r in rounds for n in r["loss_tokens"]) / timed_s,
            "timed_sample_tokens_per_s": sum(n for r in rounds for n in r["sample_tokens"]) / timed_s,
        }
    r = {m: out[m] for m in MODES}
    pairs = list(zip(r["packed"]["round_medians_s"], r["unpacked"]["round_medians_s"],
                     r["unpacked_causal"]["round_medians_s"]))
    return {
        "seq_len": T,
        "micro_batch_size": mbs,
        "modes": out,
        "speedup_packed_over_unpacked": r["packed"]["loss_tokens_per_s"] / r["unpacked"]["loss_tokens_per_s"],
        "speedup_packed_over_unpacked_causal":
            r["packed"]["loss_tokens_per_s"] / r["unpacked_causal"]["loss_tokens_per_s"],
        "speedup_cpu_time_packed_over_unpacked": r["unpacked"]["epoch_cpu_s"] / r["packed"]["epoch_cpu_s"],
        "speedup_cpu_time_packed_over_unpacked_causal":
            r["unpacked_causal"]["epoch_cpu_s"] / r["packed"]["epoch_cpu_s"],
        "padding_bound": r["packed"]["fill"] / r["unpacked"]["fill"],
        "step_ratio_packed_over_unpacked": r["packed"]["median_step_s"] / r["unpacked"]["median_step_s"],
        "mask_step_ratio": r["unpacked"]["median_step_s"] / r["unpacked_causal"]["median_step_s"],
        "mask_step_ratio_rounds": [b / c for _, b, c in pairs],
        # per-round pairs (each mode's round next to the others'): drift of the machine cancels within a pair
        "speedup_round_median": statistics.median(
            b / a * r["unpacked"]["steps_per_epoch"] / r["packed"]["steps_per_epoch"] for a, b, _ in pairs),
        "speedup_causal_round_median": statistics.median(
            c / a * r["unpacked"]["steps_per_epoch"] / r["packed"]["steps_per_epoch"] for a, _, c in pairs),
        "mask_cpu_time_ratio": r["unpacked"]["median_cpu_s"] / r["unpacked_causal"]["median_cpu_s"],
        "check": res["check"],
    }


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    return busy, time.process_time()


def machine_facts(args) -> dict:
    import numpy
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "transformers": transformers.__version__}


def command_line(args) -> str:
    parts = ["python benchmarks/sft_packing_bench.py", "--seq-lens", *map(str, args.seq_lens)]
    for flag in ("micro_tokens", "warmup", "rounds", "steps", "sdpa_reps", "threads"):
        parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    parts += ["--sdpa-seq-lens", *map(str, args.sdpa_seq_lens)]
    if args.tokenizer:
        parts += ["--tokenizer", args.tokenizer]
    return " ".join(parts)


def render_md(s: dict) -> str:
    f, m = s["machine"], s["model"]
    md = [
        "# SFT packing: assistant tokens/s, packed vs unpacked (CPU, tiny model, bundled sample data)",
        "",
        f"`{s['command']}`",
        "",
        (f"Machine: {f['cpu']}, {f['cores']} cores, {f['torch_threads']} torch threads; Python {f['python']}, "
         f"torch {f['torch']}, numpy {f['numpy']}, transformers {f['transformers']}. Whole run: {s['wall_s']:.0f} s; "
         f"load average {s['load_average'][0]:.1f} at the start, {s['load_average'][1]:.1f} at the end; other "
         f"processes used {s['other_processes']['cpu_s']:.0f} CPU-seconds meanwhile "
         f"({100 * s['other_processes']['share_of_machine']:.0f}% of the machine's cores)."),
        "",
        (f"Data: `tanuki/sample_data/sft.jsonl`, template `{s['template']}`, tokenizer {s['tokenizer']['source']}: "
         f"{s['data']['samples']:,} samples, {s['data']['sample_tokens']:,} sample tokens (row positions they "
         f"occupy), {s['data']['loss_tokens']:,} assistant (loss) tokens; longest sample {s['data']['max_len']} "
         f"positions, median {s['data']['median_len']:.0f}, so nothing is truncated at either length. Model: "
         f"`build_model(ModelConfig())`, {m['params']:,} parameters, {m['n_layers']} layers, dim {m['dim']}, "
         f"{m['n_heads']} heads / {m['n_kv_heads']} kv heads, vocab {m['vocab_size']}, fp32. One step = one "
         f"micro-batch of {s['micro_tokens']:,} row positions (loader read, forward, `causal_lm_loss`, backward, "
         "clip, AdamW), one optimizer step per micro-batch, no DeepSpeed."),
        "",
        ("| seq_len | mode | rows / epoch | fill | median step (s) | CPU s / step | epoch (s) | assistant tokens/s "
         "| sample tokens/s | row positions/s |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s["results"]:
        for mode in MODES:
            x = r["modes"][mode]
            md.append(f"| {r['seq_len']} | {LABELS[mode]} | {x['rows_per_epoch']:,} | {100 * x['fill']:.1f}% | "
                      f"{x['median_step_s']:.3f} | {x['median_cpu_s']:.3f} | {x['epoch_s']:.1f} | "
                      f"{x['loss_tokens_per_s']:,.0f} | {x['sample_tokens_per_s']:,.0f} | {x['positions_per_s']:,.0f} |")
    md += ["", "**Assistant tokens/s, packed / unpacked (wall time):** " + "; ".join(
        f"seq_len {r['seq_len']}: **{r['speedup_packed_over_unpacked']:.2f}x** "
        f"(vs unpacked with `is_causal`: {r['speedup_packed_over_unpacked_causal']:.2f}x; medians of the per-round "
        f"ratios {r['speedup_round_median']:.2f}x and {r['speedup_causal_round_median']:.2f}x)" for r in s["results"])
        + ". The fill ratio alone (no change in step cost) would give " + "; ".join(
        f"{r['padding_bound']:.2f}x at {r['seq_len']}" for r in s["results"]) + ". The same ratios in CPU time of "
        "the process per epoch (all threads; less sensitive to other work on the machine): " + "; ".join(
        f"{r['seq_len']}: {r['speedup_cpu_time_packed_over_unpacked']:.2f}x "
        f"(vs `is_causal` {r['speedup_cpu_time_packed_over_unpacked_causal']:.2f}x)" for r in s["results"]) + "."]
    md += ["", "## The attention mask", ""]
    for r in s["results"]:
        rr = r["mask_step_ratio_rounds"]
        md.append(
            f"- seq_len {r['seq_len']} ({r['micro_batch_size']} rows): a whole training step with the explicit "
            f"boolean mask takes {r['mask_step_ratio']:.3f}x the `is_causal` step on the same rows in wall time "
            f"(per-round ratios {min(rr):.3f} to {max(rr):.3f}), {r['mask_cpu_time_ratio']:.3f}x in CPU time. "
            f"Packed vs unpacked step (same shape, both masked): {r['step_ratio_packed_over_unpacked']:.3f}.")
    md += [
        "",
        ("SDPA alone, forward + backward, fp32, the tiny model's heads (8 query / 4 kv heads of 32), one sample "
         "per row; milliseconds per call (median):"),
        "",
        "| row length | rows | boolean mask | `is_causal` | no mask (full) | mask / `is_causal` | full / `is_causal` |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sd in s["sdpa"]:
        ms = sd["median_s"]
        md.append(f"| {sd['seq_len']} | {sd['shape_q'][0]} | {1e3 * ms['mask']:.1f} | {1e3 * ms['is_causal']:.1f} | "
                  f"{1e3 * ms['full']:.1f} | {sd['ratio_mask_over_causal']:.2f} | {sd['ratio_full_over_causal']:.2f} |")
    md += [
        "",
        ("Packing needs the block-diagonal mask (`tanuki.model.segment_mask`), which reaches SDPA as a boolean "
         "tensor. Where `full / is_causal` is near 1, the CPU kernel skips nothing for causality at that length, "
         "so the tensor mask only adds the cost of reading it; where it is well above 1, `is_causal` skips the "
         "blocks above the diagonal and the tensor mask forfeits that. The SFT step also passes segment ids for "
         "unpacked rows (one sample each, so the mask is plain causal there), so an unpacked SFT run pays the "
         "mask without needing it; the `is_causal` rows are the fair baseline for what packing itself gains."),
        "",
        "## How it was measured",
        "",
        (f"- Per seq_len, three modes, each with its own model and AdamW from the same seed and its own "
         f"`SFTDataLoader` over `build_sft_datasets(SFTDataConfig(packing=...))` rows (repeated epochs as the "
         f"loader runs on). {s['warmup']} untimed steps per mode, then {s['rounds']} rounds of {s['steps']} timed "
         f"step{'s' if s['steps'] != 1 else ''} per mode, the modes alternating through every order of the three."),
        ("- Epoch time = rows per epoch / micro-batch size x median step time (an unpacked epoch at 512 is "
         "minutes, so epochs are computed from the step time, not run whole; a step's cost does not depend on "
         "what its rows hold). Assistant tokens/s = assistant tokens of an epoch / epoch time; sample tokens/s "
         "the same for non-padding positions; row positions/s counts padding too. Fill = sample tokens / "
         "(rows x seq_len)."),
        ("- Cross-check over the timed steps themselves (tokens they actually trained / their summed time), "
         "assistant tokens/s: " + "; ".join(
             f"{r['seq_len']}: " + ", ".join(f"{mode} {r['modes'][mode]['timed_loss_tokens_per_s']:,.0f}"
                                             for mode in MODES) for r in s["results"]) + "."),
        ("- Oracle for the `is_causal` mode: on the first unpacked batch the loss with the segment mask and with "
         "`is_causal` agree: " + "; ".join(
             f"{r['seq_len']}: {r['check']['loss_mask']:.6f} vs {r['check']['loss_is_causal']:.6f} "
             f"(difference {r['check']['abs_diff']:.1e}, tolerance {r['check']['tolerance']:g}: "
             f"{'ok' if r['check']['abs_diff'] <= r['check']['tolerance'] else 'FAILED'})" for r in s["results"])
         + "."),
        ("- The unpacked baseline pads every row to seq_len, as `SFTDataset(packing=False)` does; a collator that "
         "pads each micro-batch only to its longest sample would waste less (not measured here)."),
        ("- Other work on the machine: wall times are only meaningful when the 'other processes' share above is "
         "small. On this shared 2-core machine, while another session ran a two-thread torch job, a two-thread "
         "step of this benchmark took 2 to 6 s instead of about 0.45 s (the threads of each process wait on each "
         "other), and a one-thread step about 0.77 s; with `--threads 1` the ratios stayed within 0.05 of the "
         "ones above. This run was taken when the cores were otherwise idle."),
        ("- Absolute numbers are a 5M-parameter model in fp32 on a small CPU; the ratios are the point. On a "
         "GPU a variable-length or FlexAttention kernel would skip the masked blocks."),
        "",
        "Raw per-step times, losses and token counts: `benchmarks/results/sft_packing.json`.",
    ]
    return "\n".join(md) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    import numpy as np
    import torch

    from tanuki.config import ModelConfig
    from tanuki.model import param_counts_formula

    torch.set_num_threads(args.threads)
    t0, load0, (busy0, own0) = time.perf_counter(), os.getloadavg()[0], cpu_seconds()
    cfg = ModelConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tok_info = get_tokenizer(args, tmp)
        if len(tokenizer) > cfg.vocab_size:
            raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens; the tiny model holds {cfg.vocab_size}")
        raw = [bench_seq_len(args, tokenizer, T) for T in args.seq_lens]
    sdpa = [sdpa_cost(args, T) for T in args.sdpa_seq_lens]
    results = [summarize_seq_len(r) for r in raw]
    busy1, own1 = cpu_seconds()
    wall = time.perf_counter() - t0
    # CPU time other processes took from this machine's cores while the benchmark ran
    others = {"cpu_s": round(busy1 - busy0 - (own1 - own0), 1),
              "share_of_machine": (busy1 - busy0 - (own1 - own0)) / (wall * os.cpu_count())}
    # sample statistics at the longest seq_len (the same at every length when nothing is truncated)
    lengths = raw[-1].pop("lengths")
    for r in raw:
        r.pop("lengths", None)
    first = results[-1]["modes"]["packed"]
    counts = param_counts_formula(cfg)
    summary = {
        "claim": "SFT assistant tokens/s on CPU, packed / unpacked rows, bundled sample data",
        "command": command_line(args),
        "template": TEMPLATE,
        "tokenizer": tok_info,
        "data": {"path": "tanuki/sample_data/sft.jsonl", "samples": first["samples"],
                 "sample_tokens": first["sample_tokens"], "loss_tokens": first["loss_tokens"],
                 "max_len": int(np.max(lengths)), "median_len": float(np.median(lengths)),
                 "mean_len": float(np.mean(lengths))},
        "model": {"params": counts.total, "n_layers": cfg.n_layers, "dim": cfg.dim, "n_heads": cfg.n_heads,
                  "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size},
        "micro_tokens": args.micro_tokens,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "steps": args.steps,
        "lr": LR,
        "results": results,
        "sdpa": sdpa,
        "wall_s": round(wall, 1),
        "load_average": [load0, os.getloadavg()[0]],
        "other_processes": others,
        "machine": machine_facts(args),
        "raw": {str(r["seq_len"]): r["runs"] for r in raw},
    }
    md = render_md(summary)
    print(md)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "sft_packing.md").write_text(md)
        (RESULTS / "sft_packing.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
