"""tanuki end to end on the bundled sample data, on CPU, in a few minutes.

Usage:
    make demo                      # creates .venv if needed, then runs this script
    python launch/demo.py          # same, in an environment where tanuki is installed
    python launch/demo.py out=/tmp/tanuki-demo

Every step prints the command a user would type and runs it, so the output doubles as a tutorial.
Results go to ``demo_out/`` (or ``out=...``), which is recreated on every run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(*args: str) -> None:
    """Run ``python <args>`` from the repository root, echoing the command."""
    print("$ python " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True)


def main(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tanuki.checkpoint import save_model_file
    from tanuki.config import ModelConfig
    from tanuki.generate import generate
    from tanuki.model import build_model, count_parameters

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

    step("4. Build the tiny model, run a forward pass, save it")
    cfg = ModelConfig()  # the tiny default of conf/pretrain.yaml
    model = build_model(cfg, seed=1234).eval()
    counts = count_parameters(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    print(f"tiny model: {counts.total:,} parameters; logits {tuple(logits.shape)} for tokens {tuple(tokens.shape)}")
    save_model_file(model.state_dict(), cfg, out / "init" / "model.safetensors")

    step("5. Export to a Hugging Face directory, with the tokenizer")
    run("launch/export_hf.py", f"checkpoint={rel}/init/model.safetensors", f"output={rel}/hf-init",
        f"tokenizer={rel}/tokenizer", "dtype=float32")

    step("6. Load it in transformers: same logits, same greedy tokens")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf-init", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "hf-init")
    with torch.no_grad():
        diff = (hf(tokens).logits - logits).abs().max().item()
    prompt = tok("日本の首都は", add_special_tokens=False).input_ids
    n = len(prompt)
    ours = generate(model, prompt, max_new_tokens=16)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, n:].tolist()
    print(f"{type(hf).__name__}: max |logits difference| = {diff:.2e}")
    print(f"greedy tokens, tanuki:       {ours}")
    print(f"greedy tokens, transformers: {theirs}")
    text = tok.decode([t for t in ours if t < len(tok)])  # ids past the vocabulary are padding rows
    print(f"decoded (an untrained model babbles): {text!r}")
    if ours != theirs or diff > 1e-4:
        raise SystemExit("demo: tanuki and transformers disagree")

    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    out_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("out=")), None)
    main(Path(out_arg).resolve() if out_arg else REPO / "demo_out")
