"""Supervised fine-tuning (full or LoRA) of a Hugging Face Llama directory on chat data.

Usage:
    # full fine-tuning in the Japanese Alpaca format (llm-jp-3-instruct / Tanuki-8B recipe)
    python launch/sft.py init=hf/tiny data.path=tanuki/sample_data/sft.jsonl template=alpaca_ja run.dir=runs/sft
    # any imported model in its own chat template (template=auto, the default: ChatML, Llama 3, Command-R, ...)
    deepspeed launch/sft.py init=hf/qwen2.5-7b-instruct data.path=data/sft_ja.jsonl method=lora
    deepspeed launch/sft.py init=hf/8b data.path=[data/sft_ja.jsonl,data/sft_en.jsonl] train.lr=2e-5 ...

    # LoRA r=64, alpha=128, dropout 0.05 on all projections (the Command-R Japanese recipe)
    deepspeed launch/sft.py init=hf/8b data.path=... method=lora lora.r=64 lora.alpha=128 train.lr=2e-5

Writes to run.dir what pretraining writes (config.yaml, train.log, metrics.jsonl, wandb/, checkpoints/),
and at the end hf/ (a full model, LoRA merged; the template is its tokenizer's chat_template) and,
for LoRA, adapter/ (a PEFT adapter for the init model). Run the same command again to resume.
"""

import sys

from tanuki.parallel.env import dist_env, strip_local_rank

sys.argv = strip_local_rank(sys.argv)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tanuki import sft  # noqa: E402
from tanuki.checkpoint import CheckpointError  # noqa: E402
from tanuki.cli import user_errors  # noqa: E402
from tanuki.fileio import WriteError  # noqa: E402
from tanuki.stage import RunDirLocked  # noqa: E402
from tanuki.config import from_dict  # noqa: E402
from tanuki.data.records import SFTDataError  # noqa: E402


@hydra.main(config_path="../conf", config_name="sft", version_base=None)
@user_errors(FileNotFoundError, CheckpointError, SFTDataError, RunDirLocked, WriteError)
def main(dcfg: DictConfig) -> None:
    sft.main(from_dict(sft.SFTConfig, dcfg), dist_env())


if __name__ == "__main__":
    main()
