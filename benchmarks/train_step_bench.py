"""Training step time: tanuki's model against transformers ``LlamaForCausalLM`` under the same DeepSpeed engine.

Usage:
    python benchmarks/train_step_bench.py                               # CPU, tiny model (~1.5 minutes on 2 idle cores)
    python benchmarks/train_step_bench.py --device cuda --size 1.8b     # one GPU: ZeRO-3, bf16, seq 4096, MFU
    python benchmarks/train_step_bench.py --rounds 4 --steps 5 --no-save

Claims (issue 5): on CPU, an optimizer step of the tiny model costs no more than the same architecture
as transformers ``LlamaForCausalLM`` under the same DeepSpeed config (ratio tanuki / HF <= 1.0). On one
GPU, the 1.8b shape (``conf/size/1.8b.yaml``) at seq 4096 with ZeRO-3 and bf16 reaches MFU >= 45% and
>= 1.2x the tokens/s of the transformers baseline.

Both models go through the same path: one-rank process group (``tanuki.parallel.env``), the engine and
AdamW of ``tanuki.parallel.zero.build_engine`` (ZeRO-3 by default), the same micro-batches of random
tokens in the same order, the same loss (``F.cross_entropy`` on the fp32 logits), ``engine.backward``
and ``engine.step`` once per micro-batch; one timed *step* is one optimizer step of
``--grad-accum`` micro-batches. tanuki's model is built with ``tanuki.model.build_model`` and its kernels
chosen by ``tanuki.fused.apply_kernels`` (``auto``: Triton on CUDA, PyTorch on CPU); the HF model is built
from ``tanuki.hf.hf_config_dict`` with SDPA attention and loaded with tanuki's weights
(``tanuki.hf.to_hf_state_dict``), so both start equal. Before timing, both compute the loss of the first
micro-batch in fp32 outside DeepSpeed; they must agree within 1e-4.

Isolation (``--isolation``):

* ``interleave`` (default on CPU): both engines live in one process; after ``--warmup`` steps each, timed
  rounds alternate A B B A A B ... so drift of a shared machine hits both equally;
* ``subprocess`` (default on CUDA, where two 1.8b ZeRO-3 engines do not fit on one GPU together): every
  round is a fresh process holding one model (build, ``--warmup`` steps, ``--steps`` timed steps), rounds
  alternating between the models the same way.

Rounds are short (2 steps on CPU) so that each model's steps sit next to the other's in time; a round
may start with ``--round-warmup`` untimed steps (default 0: by symmetry both models pay the same for
the caches the other one evicted). Reported: median step time per model, their ratio, the median of
the per-round ratios and the ratio of CPU time per step (all threads of the process: on a machine
shared with other work this moves much less than wall time), tokens/s, model TFLOP/s from
``tanuki.info.flops_per_token`` and, on CUDA, MFU against ``--peak-tflops`` (989: H100 SXM dense bf16).
Results go to ``benchmarks/results/train_step_{cpu,gpu}.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = ("tanuki", "hf")
LABELS = {"tanuki": "tanuki `Transformer`", "hf": "transformers `LlamaForCausalLM` (sdpa)"}


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", default=None, help="conf/size/<size>.yaml (default: tiny on CPU, 1.8b on CUDA)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 256 on CPU, 4096 on CUDA")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="default: 8 on CPU; 2 on CUDA (1.8b at seq 4096 without checkpointing fits 80 GB)")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 2 / 4)")
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=3)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--activation-checkpointing", action="store_true", help="for both models")
    ap.add_argument("--isolation", choices=("interleave", "subprocess"), default=None,
                    help="default: interleave on CPU, subprocess on CUDA")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per engine before the first round")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default 20 on CPU, 2 on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 2 on CPU, 5 on CUDA)")
    ap.add_argument("--round-warmup", type=int, default=0, help="untimed steps at the start of every round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-device dense peak for MFU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the .md/.json results go")
    # internal: one round of one model in a fresh process (--isolation subprocess)
    ap.add_argument("--worker", choices=MODELS + ("check",), help=argparse.SUPPRESS)
    ap.add_argument("--worker-round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    for name, on_cpu, on_cuda in (
        ("size", "tiny", "1.8b"),
        ("seq_len", 256, 4096),
        ("micro_batch_size", 8, 2),
        ("grad_accum", 2, 4),
        ("precision", "fp32", "bf16"),
        ("isolation", "interleave", "subprocess"),
        ("rounds", 20, 2),
        ("steps", 2, 5),
        ("threads", os.cpu_count(), None),
    ):
        if getattr(args, name) is None:
            setattr(args, name, on_cpu if cpu else on_cuda)
    return args


def configs(args):
    from omegaconf import OmegaConf

    from tanuki.config import ModelConfig, ParallelConfig, TrainConfig, from_dict

    size = OmegaConf.load(REPO / "conf" / "size" / f"{args.size}.yaml")
    model = from_dict(ModelConfig, size.model, prefix="model")
    train = TrainConfig(
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.micro_batch_size * args.grad_accum,
        max_steps=args.warmup + args.rounds * (args.round_warmup + args.steps),
        warmup_steps=0,
        activation_checkpointing=args.activation_checkpointing,
        precision=args.precision,
    )
    return model, train, ParallelConfig(zero_stage=args.zero_stage)


def setup(args):
    """Threads, device and the one-rank process group; returns the device."""
    import torch

    from tanuki.parallel.env import DistEnv, init_distributed

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    init_distributed(DistEnv(0, 1, 0, "single"), "gloo" if args.device == "cpu" else "nccl")
    return device


def make_batches(args, vocab_size: int, device, rnd: int) -> list[list]:
    """The micro-batches of round ``rnd`` (``rnd = -1``: the warm-up): ``steps x grad_accum`` tensors of
    ``(micro_batch, seq_len + 1)`` random tokens, the same for both models."""
    import torch

    n = args.warmup if rnd < 0 else args.round_warmup + args.steps
    gen = torch.Generator().manual_seed(1000 * (args.seed + 1) + rnd)
    shape = (args.micro_batch_size, args.seq_len + 1)
    return [[torch.randint(0, vocab_size, shape, generator=gen).to(device) for _ in range(args.grad_accum)]
            for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# The two models
# --------------------------------------------------------------------------------------------------


def build_tanuki(cfg, train, device, seed: int):
    import functools

    from tanuki.fused import apply_kernels
    from tanuki.model import build_model

    model = apply_kernels(build_model(cfg, device=device, seed=seed), cfg.kernels, device=device)
    if train.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        model.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
    return model


def build_hf(cfg, train, device, tanuki_state: dict):
    """``LlamaForCausalLM`` of tanuki's shape (SDPA attention) holding tanuki's weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tanuki.hf import hf_config_dict, to_hf_state_dict

    config = LlamaConfig(**hf_config_dict(cfg, dtype=torch.float32))
    config._attn_implementation = "sdpa"
    config.use_cache = False  # training: no KV cache (what training scripts set)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(tanuki_state), strict=False)
    # rotary inv_freq buffers are computed, not stored
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"HF model does not match tanuki's shape: missing {missing}, unexpected {unexpected}")
    if train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.float().train()


def build_models(which, cfg, train, device, seed: int) -> dict:
    """``{"tanuki": ..., "hf": ...}`` for the names in ``which``; the HF model copies tanuki's weights."""
    tanuki = build_tanuki(cfg, train, device, seed)
    out = {}
    if "hf" in which:
        out["hf"] = build_hf(cfg, train, device, tanuki.state_dict())
    if "tanuki" in which:
        out["tanuki"] = tanuki.train()
    return out


def forward(name: str, module, tokens):
    """Logits of ``tokens`` from either model (or its DeepSpeed engine)."""
    return module(tokens) if name == "tanuki" else module(input_ids=tokens, use_cache=False).logits


def lm_loss(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def check_equal(models: dict, batch) -> dict:
    """fp32 losses of both models on the first micro-batch, outside DeepSpeed (their weights are equal)."""
    import torch

    losses = {}
    with torch.no_grad():
        for name, m in models.items():
            losses[name] = lm_loss(forward(name, m, batch[:, :-1]), batch[:, 1:]).item()
    return {"loss_tanuki": losses["tanuki"], "loss_hf": losses["hf"],
            "abs_diff": abs(losses["tanuki"] - losses["hf"]), "tolerance": 1e-4}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def run_steps(name: str, engine, steps: list[list], device) -> tuple[list[float], list[float], list[float]]:
    """Run optimizer steps (one list of micro-batches each); wall seconds, CPU seconds of this process (all
    threads) and mean loss of every step."""
    import torch

    times, cpu_times, losses = [], [], []
    for micro in steps:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        total = 0.0
        for tokens in micro:
            loss = lm_loss(forward(name, engine, tokens[:, :-1]), tokens[:, 1:])
            engine.backward(loss)
            engine.step()
            total = total + loss.detach()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(float(total) / len(micro))
    return times, cpu_times, losses


ROUND_KEYS = ("step_s", "cpu_s", "round_warmup_s", "loss")


def timed_round(args, name: str, engine, steps: list[list], device) -> dict:
    """One round: ``--round-warmup`` untimed steps then ``--steps`` timed ones (the untimed times are kept
    apart in the raw data)."""
    t, c, l = run_steps(name, engine, steps, device)
    w = args.round_warmup
    return {"step_s": t[w:], "cpu_s": c[w:], "round_warmup_s": t[:w], "loss": l}


def round_order(rounds: int) -> list[str]:
    """A B B A A B B A ...: each model goes first in half of the rounds, and the pairs alternate."""
    order = []
    for r in range(rounds):
        order += list(MODELS if r % 2 == 0 else MODELS[::-1])
    return order


def bench_interleaved(args, cfg, train, parallel, device) -> dict:
    from tanuki.parallel.zero import build_engine

    models = build_models(MODELS, cfg, train, device, args.seed)
    check = check_equal({"tanuki": models["tanuki"], "hf": models["hf"]},
                        make_batches(args, cfg.vocab_size, device, -1)[0][0])
    bf16 = args.precision == "bf16"
    engines = {n: build_engine(m, train, parallel, dp_size=1, bf16=bf16)[0] for n, m in models.items()}
    runs = {n: {k: [] for k in ROUND_KEYS} for n in MODELS}
    warm = make_batches(args, cfg.vocab_size, device, -1)
    for n in MODELS:
        runs[n]["warmup_s"], _, runs[n]["warmup_loss"] = run_steps(n, engines[n], warm, device)
    for i, n in enumerate(round_order(args.rounds)):
        out = timed_round(args, n, engines[n], make_batches(args, cfg.vocab_size, device, i // 2), device)
        for k in ROUND_KEYS:
            runs[n][k].append(out[k])
    del engines
    return {"check": check, "runs": runs, "peak_memory_gib": peak_memory(device)}


def worker(args) -> None:
    """One round of one model in this fresh process (``--isolation subprocess``); writes JSON."""
    from tanuki.parallel.zero import build_engine

    cfg, train, parallel = configs(args)
    device = setup(args)
    if args.worker == "check":
        models = build_models(MODELS, cfg, train, device, args.seed)
        out = check_equal(models, make_batches(args, cfg.vocab_size, device, -1)[0][0])
    else:
        name = args.worker
        model = build_models((name,), cfg, train, device, args.seed)[name]
        engine, _ = build_engine(model, train, parallel, dp_size=1, bf16=args.precision == "bf16")
        warm_s, _, warm_loss = run_steps(name, engine, make_batches(args, cfg.vocab_size, device, -1), device)
        out = timed_round(args, name, engine, make_batches(args, cfg.vocab_size, device, args.worker_round), device)
        out.update(warmup_s=warm_s, warmup_loss=warm_loss, peak_memory_gib=peak_memory(device))
    Path(args.worker_out).write_text(json.dumps(out))


def bench_subprocess(args) -> dict:
    passthrough = []
    for flag in ("device", "size", "seq_len", "micro_batch_size", "grad_accum", "zero_stage", "precision",
                 "warmup", "rounds", "steps", "round_warmup", "threads", "seed"):
        value = getattr(args, flag)
        if value is not None:
            passthrough += [f"--{flag.replace('_', '-')}", str(value)]
    if args.activation_checkpointing:
        passthrough.append("--activation-checkpointing")

    def child(what: str, rnd: int = 0) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", what,
                   "--worker-round", str(rnd), "--worker-out", f.name]
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{what} round {rnd} failed:\n{proc.stdout.decode(errors='replace')[-4000:]}")
            return json.loads(Path(f.name).read_text())

    check = child("check")
    runs = {n: {k: [] for k in ROUND_KEYS + ("warmup_s", "warmup_loss", "peak_memory_gib")} for n in MODELS}
    for i, n in enumerate(round_order(args.rounds)):
        out = child(n, i // 2)
        print(f"  round {i // 2} {n}: median {statistics.median(out['step_s']):.3f} s/step", flush=True)
        for k in runs[n]:
            runs[n][k].append(out[k])
    peak = {n: max(runs[n].pop("peak_memory_gib")) for n in MODELS}
    return {"check": check, "runs": runs, "peak_memory_gib": peak}


def peak_memory(device):
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB -> GiB, whole process


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def machine_facts(args) -> dict:
    import deepspeed
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
    facts = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
    }
    if args.device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    return facts


def command_line(args) -> str:
    parts = ["python benchmarks/train_step_bench.py"]
    if args.device != "cpu":
        parts += ["--device", args.device]
    for flag in ("size", "seq_len", "micro_batch_size", "grad_accum", "zero_stage", "precision", "isolation",
                 "warmup", "rounds", "steps", "round_warmup"):
        parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.activation_checkpointing:
        parts.append("--activation-checkpointing")
    return " ".join(parts)


def bootstrap_ratio_ci(a: list[list[float]], b: list[list[float]], n: int = 2000) -> list[float]:
    """95% interval of median(a) / median(b), resampling whole rounds with their neighbouring round of
    the other model kept as a pair (so the machine's drift stays paired)."""
    import random

    rng = random.Random(0)
    k = len(a)
    out = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        num = statistics.median([t for i in idx for t in a[i]])
        out.append(num / statistics.median([t for i in idx for t in b[i]]))
    out.sort()
    return [out[int(0.025 * n)], out[int(0.975 * n) - 1]]


def summarize(args, cfg, train, result: dict, wall_s: float) -> tuple[dict, str]:
    import torch

    from tanuki.fused import resolve_kernels
    from tanuki.info import flops_per_token
    from tanuki.model import param_counts_formula

    tokens_per_step = train.global_batch_size * train.seq_len
    fpt = flops_per_token(cfg, train.seq_len)
    per_model = {}
    for n in MODELS:
        times = [t for rnd in result["runs"][n]["step_s"] for t in rnd]
        cpu = [t for rnd in result["runs"][n]["cpu_s"] for t in rnd]
        med = statistics.median(times)
        per_model[n] = {
            "median_step_s": med,
            "min_step_s": min(times),
            "median_cpu_s": statistics.median(cpu),
            "round_medians_s": [statistics.median(r) for r in result["runs"][n]["step_s"]],
            "tokens_per_s": tokens_per_step / med,
            "model_tflops_per_s": fpt * tokens_per_step / med / 1e12,
        }
        if args.device == "cuda":
            per_model[n]["mfu"] = per_model[n]["model_tflops_per_s"] / args.peak_tflops
    ratio = per_model["tanuki"]["median_step_s"] / per_model["hf"]["median_step_s"]
    cpu_ratio = per_model["tanuki"]["median_cpu_s"] / per_model["hf"]["median_cpu_s"]
    ci = {k: bootstrap_ratio_ci(result["runs"]["tanuki"][k], result["runs"]["hf"][k]) for k in ("step_s", "cpu_s")}
    # per-round ratios pair each tanuki round with the HF round next to it
    pairs = zip(per_model["tanuki"]["round_medians_s"], per_model["hf"]["round_medians_s"])
    round_ratios = [a / b for a, b in pairs]
    # same weights, same batches, same optimizer: the loss curves should follow each other
    lt = [x for r in result["runs"]["tanuki"]["loss"] for x in r]
    lh = [x for r in result["runs"]["hf"]["loss"] for x in r]
    loss_gap = max(abs(a - b) for a, b in zip(lt, lh))
    counts = param_counts_formula(cfg)
    facts = machine_facts(args)
    summary = {
        "claim": "train step time tanuki / transformers LlamaForCausalLM, same DeepSpeed config",
        "command": command_line(args),
        "device": args.device,
        "size": args.size,
        "model": {"params": counts.total, "non_embedding_params": counts.non_embedding, "n_layers": cfg.n_layers,
                  "dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim,
                  "vocab_size": cfg.vocab_size, "kernels": cfg.kernels,
                  "kernels_used": resolve_kernels(cfg.kernels, torch.device(args.device))},
        "seq_len": train.seq_len,
        "micro_batch_size": train.micro_batch_size,
        "grad_accum": args.grad_accum,
        "tokens_per_step": tokens_per_step,
        "zero_stage": args.zero_stage,
        "precision": args.precision,
        "activation_checkpointing": args.activation_checkpointing,
        "isolation": args.isolation,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "timed_steps_per_round": args.steps,
        "round_warmup_steps": args.round_warmup,
        "flops_per_token": fpt,
        "peak_tflops": args.peak_tflops if args.device == "cuda" else None,
        "fp32_first_batch_check": result["check"],
        "max_loss_gap_over_steps": loss_gap,
        "results": per_model,
        "ratio_tanuki_over_hf": ratio,
        "cpu_time_ratio_tanuki_over_hf": cpu_ratio,
        "ratio_ci95": ci["step_s"],
        "cpu_time_ratio_ci95": ci["cpu_s"],
        "round_ratios": round_ratios,
        "peak_memory_gib": result["peak_memory_gib"],
        "wall_s": round(wall_s, 1),
        "load_average": result["load_average"],
        "machine": facts,
        "raw": result["runs"],
    }
    return summary, render_md(summary)


def render_md(s: dict) -> str:
    cuda = s["device"] == "cuda"
    facts, chk, m = s["machine"], s["fp32_first_batch_check"], s["model"]
    where = (f"{facts.get('gpu')} (CUDA {facts.get('cuda')}), host CPU {facts['cpu']}" if cuda
             else f"{facts['cpu']}, {facts['cores']} cores, {facts['torch_threads']} torch threads")
    header = (f"Machine: {where}; Python {facts['python']}, torch {facts['torch']}, deepspeed {facts['deepspeed']}, "
              f"transformers {facts['transformers']}. Whole run: {s['wall_s']:.0f} s; load average of the machine "
              f"{s['load_average'][0]:.1f} at the start, {s['load_average'][1]:.1f} at the end.")
    setting = (
        f"Model `conf/size/{s['size']}.yaml`: {m['params']:,} parameters ({m['non_embedding_params']:,} "
        f"non-embedding), {m['n_layers']} layers, dim {m['dim']}, {m['n_heads']} heads / {m['n_kv_heads']} kv heads, "
        f"ffn {m['ffn_dim']}, vocab {m['vocab_size']}; tanuki kernels `{m['kernels']}` ({m['kernels_used']}). "
        f"One step = one optimizer step of {s['grad_accum']} micro-batches x {s['micro_batch_size']} x "
        f"{s['seq_len']} tokens = {s['tokens_per_step']:,} tokens; DeepSpeed ZeRO-{s['zero_stage']} from "
        f"`tanuki.parallel.zero.build_engine` for both, {s['precision']}, activation checkpointing "
        f"{'on' if s['activation_checkpointing'] else 'off'}, one rank."
    )
    md = [
        f"# Training step time: tanuki vs transformers ({'GPU' if cuda else 'CPU'}, {s['size']} model)",
        "",
        f"`{s['command']}`",
        "",
        header,
        "",
        setting,
        "",
        "| model | median step (s) | fastest step (s) | " + ("MFU |" if cuda else "CPU time per step (s) |")
        + " tokens/s | model TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n in MODELS:
        r = s["results"][n]
        third = f"{100 * r['mfu']:.1f}%" if cuda else f"{r['median_cpu_s']:.4f}"
        md.append(f"| {LABELS[n]} | {r['median_step_s']:.4f} | {r['min_step_s']:.4f} | {third} | "
                  f"{r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.4f} |")
    ratio, rr = s["ratio_tanuki_over_hf"], s["round_ratios"]
    ci, cci = s["ratio_ci95"], s["cpu_time_ratio_ci95"]
    md += ["", (
        f"**Ratio tanuki / HF (median step time): {ratio:.3f}**"
        + ("" if cuda else f" (goal <= 1.0: {'met' if ratio <= 1.0 else 'not met'})") + "; "
        f"speed-up {1 / ratio:.2f}x; 95% bootstrap interval over rounds {ci[0]:.3f} to {ci[1]:.3f} "
        + ("(it contains 1.0: the two step times are equal within what this run resolves). " if ci[0] <= 1.0 <= ci[1]
           else f"(entirely {'below' if ci[1] < 1.0 else 'above'} 1.0). ")
        + "Per-round "
        f"ratios: {min(rr):.3f} to {max(rr):.3f} (median {statistics.median(rr):.3f})."
        + ("" if cuda else
           f" Ratio of the median CPU time per step (all threads of the process; it moves much less than wall time "
           f"when other work shares the cores): {s['cpu_time_ratio_tanuki_over_hf']:.3f} (interval {cci[0]:.3f} "
           f"to {cci[1]:.3f}).")
    )]
    if cuda:
        mfu = s["results"]["tanuki"]["mfu"]
        md.append(f"MFU goal >= 45%: {'met' if mfu >= 0.45 else 'not met'} ({100 * mfu:.1f}% of "
                  f"{s['peak_tflops']:g} TFLOP/s); speed-up goal >= 1.2x: {'met' if 1 / ratio >= 1.2 else 'not met'}.")
    if s["isolation"] == "interleave":
        how = ("both engines in one process, rounds alternating tanuki, HF, HF, tanuki, ... so that drift on the "
               "shared machine hits both equally.")
    else:
        how = ("every round a fresh process holding one model, rounds alternating tanuki, HF, HF, tanuki, ..."
               + (" (two ZeRO-3 engines of this size do not fit on one GPU together)." if cuda else "."))
    untimed = f"{s['round_warmup_steps']} untimed + " if s["round_warmup_steps"] else ""
    peak = s["peak_memory_gib"]
    if isinstance(peak, dict):
        peak = ", ".join(f"{'tanuki' if n == 'tanuki' else 'HF'} {v:.2f} GiB" for n, v in peak.items())
    else:
        peak = f"{peak:.2f} GiB (both models)"
    md += [
        "",
        "## How it was measured",
        "",
        (f"- {s['warmup_steps']} warm-up steps per model, then {s['rounds']} timed rounds per model of {untimed}"
         f"{s['timed_steps_per_round']} timed steps; {how}"),
        ("- Same weights (tanuki's init, copied into HF with `tanuki.hf.to_hf_state_dict`), same random token "
         "batches in the same order, same loss (`F.cross_entropy` on fp32 logits), same AdamW parameter groups "
         "builder. HF runs with `attn_implementation=\"sdpa\"` and `use_cache=False`, as a training script sets it."),
        (f"- Sanity check, fp32 outside DeepSpeed, first micro-batch: tanuki loss {chk['loss_tanuki']:.6f}, HF loss "
         f"{chk['loss_hf']:.6f}, difference {chk['abs_diff']:.2e} (tolerance {chk['tolerance']:g}: "
         f"{'ok' if chk['abs_diff'] <= chk['tolerance'] else 'FAILED'}). Largest difference of the per-step training "
         f"losses of the two runs afterwards: {s['max_loss_gap_over_steps']:.2e} (tanuki's `param_groups` exempts "
         "`embed.weight` from weight decay by name; HF's `model.embed_tokens.weight` is decayed, so the runs drift "
         "apart very slightly; the cost of that is one fused multiply over the embedding)."),
        f"- Peak memory ({'allocated on the GPU' if cuda else 'max RSS of the process'}): {peak}.",
    ]
    if not cuda:
        md.append("- Absolute CPU times say nothing about GPU speed (no Triton kernels, fp32, 2 cores, a tiny model); "
                  "only the ratio matters here. The GPU claim is measured with `--device cuda --size 1.8b`.")
    md += ["", f"Raw per-step times and losses: `benchmarks/results/{result_name(s['device'])}.json`."]
    return "\n".join(md) + "\n"


def result_name(device: str) -> str:
    return "train_step_cpu" if device == "cpu" else "train_step_gpu"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    cfg, train, parallel = configs(args)
    if args.isolation == "interleave":
        device = setup(args)
        result = bench_interleaved(args, cfg, train, parallel, device)
    else:
        import torch

        torch.set_num_threads(args.threads or torch.get_num_threads())
        result = bench_subprocess(args)
    result["load_average"] = [load0, os.getloadavg()[0]]
    summary, md = summarize(args, cfg, train, result, time.perf_counter() - t0)
    print(md)
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        name = result_name(args.device)
        (args.results_dir / f"{name}.md").write_text(md)
        (args.results_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
