"""Japanese benchmarks (lm-evaluation-harness, JGLUE and more) on a model, a run or a checkpoint, offline.

Usage:
    python launch/evaluate.py model=runs/sft/hf data_dir=data/eval                      # the cards' four (tasks=[ja])
    python launch/evaluate.py model=runs/pretrain-1 data_dir=data/eval tasks=[jcommonsenseqa,jnli]   # latest checkpoint
    python launch/evaluate.py model=runs/pretrain-1/checkpoints/step_00001000 data_dir=data/eval limit=100
    python launch/evaluate.py model=runs/sft/hf data_dir=data/eval apply_chat_template=true         # chat-style prompts
    python launch/evaluate.py model=demo_out/sft/hf data_dir=sample                    # the bundled demo items
    python launch/evaluate.py mode=prepare output=data/eval tasks=[ja,jaqket_v2,mgsm,xlsum,xwinograd]  # the Hub
    python launch/evaluate.py mode=prepare output=data/eval source=/data/JGLUE        # from local copies, offline
    python launch/evaluate.py compare=[runs/pretrain-1]                                # every evaluated checkpoint
    python launch/evaluate.py mode=mt_bench model=runs/sft/hf questions=question.jsonl
    python launch/evaluate.py mode=tasks data_dir=data/eval output=tasks/              # YAMLs for the lm_eval CLI

A run or checkpoint is exported to a temporary Hugging Face directory first. Results (the harness's
results.json, results.md, samples_<task>.jsonl) go to <run dir>/eval/<checkpoint>/ (an HF directory:
<model dir>/eval/), and for a run one record per metric (eval/<task>/<metric>) is appended to its
metrics.jsonl and logged to its W&B run at the checkpoint's step. BOS, chat template and few-shot
layout follow what the model was trained on and are recorded. Needs the eval extra
(pip install -e ".[eval]"). All options: conf/evaluate.yaml; details: the README, "Evaluation".
"""

import sys

import hydra
from omegaconf import DictConfig

from tanuki.chat import ChatError, quote_text_overrides
from tanuki.checkpoint import CheckpointError
from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.evaluate import EvalError, EvaluateConfig
from tanuki.evaluate import main as run
from tanuki.hf import HFFormatError


@hydra.main(config_path="../conf", config_name="evaluate", version_base=None)
@user_errors(FileNotFoundError, EvalError, CheckpointError, HFFormatError, ChatError)
def main(dcfg: DictConfig) -> None:
    run(from_dict(EvaluateConfig, dcfg))


if __name__ == "__main__":
    sys.argv[1:] = quote_text_overrides(sys.argv[1:], keys=("system_instruction",))
    main()
