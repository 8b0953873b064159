"""tanuki end to end on the bundled sample data, on CPU, in a few minutes.

Usage:
    make demo                      # creates .venv if needed, then runs this script
    python launch/demo.py          # same, in an environment where tanuki is installed
    python launch/demo.py out=/tmp/tanuki-demo steps=400 sft_steps=200   # elsewhere, train longer

Every step prints the command a user would type and runs it, so the output doubles as a tutorial.
Results go to ``demo_out/`` (or ``out=...``), which is recreated on every run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(*args: str, launcher: tuple[str, ...] = ()) -> None:
    """Run ``python <args>`` (or ``<launcher> <args>``) from the repository root, echoing the command."""
    shown = " ".join(launcher) if launcher else "python"
    print(f"$ {shown} " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [str(Path(sys.executable).parent / launcher[0]), *launcher[1:], *args] if launcher else [sys.executable, *args]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def unigram_entropy(prefix: Path) -> float:
    """Entropy (nats) of the token distribution of a dataset: the loss of the best context-free model."""
    import numpy as np

    from tanuki.data import IndexedDataset

    ds = IndexedDataset(str(prefix))
    p = np.bincount(np.concatenate([ds.document(i) for i in range(ds.num_documents)]).astype(np.int64))
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def main(out: Path, steps: int = 200, sft_steps: int = 100, dpo_steps: int = 80) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tanuki.checkpoint import consolidate_checkpoint, resolve_checkpoint
    from tanuki.generate import generate
    from tanuki.model import Transformer, count_parameters

    t0 = time.time()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rel = os.path.relpath(out, REPO)

    step("1. How big is each model, and does it fit? (no weights are allocated)")
    run("launch/model_info.py")
    run("launch/model_info.py", "+size=8b", "plan.gpus=8")

    step("2. Build a Unigram byte-fallback tokenizer from the bundled Japanese/English sample corpus")
    corpus = "tanuki/sample_data/corpus.jsonl"
    run("launch/build_tokenizer.py", f"input={corpus}", f"output={rel}/tokenizer", "vocab_size=4000")

    step("3. Tokenize the corpus into a Megatron-format dataset and inspect it")
    run("launch/preprocess.py", f"input={corpus}", f"tokenizer={rel}/tokenizer",
        f"output_prefix={rel}/data/sample", "workers=2")
    run("launch/data_info.py", f"data.prefixes=[{rel}/data/sample]", f"tokenizer={rel}/tokenizer", "seq_len=256")

    step("4. Pretrain the tiny model on it with DeepSpeed ZeRO-3 (CPU, fp32): watch the loss fall")
    entropy = unigram_entropy(out / "data" / "sample")
    print(f"unigram entropy of the data: {entropy:.3f} nats/token (the best loss without looking at context)")
    run("launch/pretrain.py", f"data.prefixes=[{rel}/data/sample]", f"tokenizer.path={rel}/tokenizer",
        f"run.dir={rel}/run", f"train.max_steps={steps}", "train.seq_len=128", "train.lr=3e-3", "train.min_lr=3e-4",
        "train.warmup_steps=10", "data.valid_fraction=0.02", f"train.eval_every={steps // 2}", "logging.every=10",
        f"checkpoint.every={steps // 2}")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"training loss: {losses[0]:.3f} at the first logged step -> {losses[-1]:.3f} at the last "
          f"({entropy - losses[-1]:.3f} nats below the unigram entropy)")
    if not losses[-1] < entropy - 0.5:
        raise SystemExit("demo: the loss did not fall below the unigram entropy")

    step("5. Plot the run (for users without W&B; the offline W&B run is in run/wandb)")
    run("launch/plot.py", f"run.dir={rel}/run")

    step("6. Export the last checkpoint (ZeRO shards consolidated on CPU) to a Hugging Face directory")
    run("launch/export_hf.py", f"checkpoint={rel}/run", f"output={rel}/hf", "dtype=float32")

    step("7. Load it in transformers: same logits as tanuki, and a generation")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "hf")
    cfg, state = consolidate_checkpoint(resolve_checkpoint(out / "run"))
    model = Transformer(cfg).eval()
    model.load_state_dict(state, strict=False)
    prompt = tok("今日は", add_special_tokens=False).input_ids
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        # the export holds the tokenizer's rows only (export.vocab=trim): compare over those ids
        ours_logits = model(tokens)[..., : len(tok)]
        diff = (hf(tokens).logits - ours_logits).abs().max().item()
    n = len(prompt)
    ours = generate(model, prompt, max_new_tokens=24, eos_token_id=tok.eos_token_id)
    theirs = hf.generate(tokens, max_new_tokens=24, do_sample=False)[0, n:].tolist()
    print(f"{type(hf).__name__} ({count_parameters(model).total:,} parameters): max |logits difference| = {diff:.2e}")
    print(f"greedy continuation of 今日は, tanuki:       {tok.decode(ours)!r}")
    print(f"greedy continuation of 今日は, transformers: {tok.decode(theirs)!r}")
    if ours != theirs or diff > 1e-4:
        raise SystemExit("demo: tanuki and transformers disagree")

    step("8. Supervised fine-tuning on the bundled instruction data (Japanese Alpaca template), then chat")
    from tanuki.sft import evaluate_exact_match
    from tanuki.tokenizer import sample_data_path
    from tanuki.tokenizer.templates import write_chat_template

    write_chat_template(out / "hf", "alpaca_ja")  # prompt the pretrained model the same way, for the baseline
    eval_path = sample_data_path("sft_eval.jsonl")
    before = evaluate_exact_match(out / "hf", eval_path, max_new_tokens=24)
    run("launch/sft.py", f"init={rel}/hf", "data.path=tanuki/sample_data/sft.jsonl", f"run.dir={rel}/sft",
        f"train.max_steps={sft_steps}", "train.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=16",
        "train.lr=2e-3", "train.min_lr=2e-4", "train.warmup_steps=5", "data.valid_fraction=0.05",
        f"train.eval_every={sft_steps // 2}", "logging.every=10", "export.dtype=float32")
    after = evaluate_exact_match(out / "sft" / "hf", eval_path, max_new_tokens=24)
    print(f"exact match on {after['total']} held-out prompts (tanuki/sample_data/sft_eval.jsonl): "
          f"pretrained {before['correct']} -> fine-tuned {after['correct']}")
    for task, (ok, n) in sorted(after["by_task"].items()):
        if ok:
            print(f"  {task}: {ok}/{n}")
    run("launch/chat.py", f"model={rel}/sft/hf", "prompt=はなこさんはたまごを25個持っています。24個あげると、何個残りますか。",
        "max_new_tokens=24")

    step("9. Preference optimisation (DPO) of the fine-tuned model on the bundled preference pairs")
    from tanuki.dpo import preference_accuracy

    pairs_eval = sample_data_path("dpo_eval.jsonl")
    pref_before = preference_accuracy(out / "sft" / "hf", pairs_eval, max_prompt_length=200)
    run("launch/dpo.py", f"init={rel}/sft/hf", "data.path=tanuki/sample_data/dpo.jsonl", f"run.dir={rel}/dpo",
        f"train.max_steps={dpo_steps}", "train.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=16",
        "train.lr=3e-4", "train.min_lr=2e-5", "train.warmup_steps=4", "loss.beta=0.1", "reference=precompute",
        "data.max_prompt_length=200", "logging.every=10", "export.dtype=float32")
    pref_after = preference_accuracy(out / "dpo" / "hf", pairs_eval, max_prompt_length=200)
    em_after = evaluate_exact_match(out / "dpo" / "hf", eval_path, max_new_tokens=24)
    print(f"held-out preference pairs ({pref_after['pairs']}, tanuki/sample_data/dpo_eval.jsonl) where the model "
          f"scores the chosen answer higher: SFT {100 * pref_before['accuracy']:.1f}% -> DPO {100 * pref_after['accuracy']:.1f}%")
    print(f"exact match on the held-out prompts: SFT {after['correct']} -> DPO {em_after['correct']}")

    step("10. Tensor + sequence parallelism on 2 CPU processes: the same losses as one process")
    short = [f"data.prefixes=[{rel}/data/sample]", f"tokenizer.path={rel}/tokenizer", "train.max_steps=5",
             "train.seq_len=128", "logging.every=1", "logging.wandb.mode=disabled", "checkpoint.every=5"]
    run("launch/pretrain.py", *short, f"run.dir={rel}/run-tp1")
    run("launch/pretrain.py", *short, f"run.dir={rel}/run-tp2", "parallel.tp=2", "parallel.sp=true",
        launcher=("deepspeed", "--num_gpus", "2", "--master_port", str(free_port())))
    one, two = (
        [json.loads(line)["loss"] for line in (out / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("run-tp1", "run-tp2")
    )
    print("step  loss (1 process)  loss (tp=2, sp)")
    for i, (a, b) in enumerate(zip(one, two), start=1):
        print(f"{i:>4}  {a:16.6f}  {b:15.6f}")
    if max(abs(a - b) for a, b in zip(one, two)) > 1e-4:
        raise SystemExit("demo: tensor parallelism changed the losses")

    step("11. Japanese benchmarks (lm-evaluation-harness, offline) of the chat model on the bundled items")
    print("(12 hand-written items per task in the JGLUE layout: a smoke test of the pipeline, not the benchmark;\n"
          " prepare the real data once with launch/evaluate.py mode=prepare, see the README)")
    run("launch/evaluate.py", f"model={rel}/dpo/hf", "data_dir=sample", "apply_chat_template=true", "max_gen_toks=32")

    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    main(Path(args["out"]).resolve() if "out" in args else REPO / "demo_out", steps=int(args.get("steps", 200)),
         sft_steps=int(args.get("sft_steps", 100)), dpo_steps=int(args.get("dpo_steps", 80)))
