"""Direct preference optimisation (DPO, IPO, hinge, robust; LoRA or full) after SFT.

Usage:
    python launch/dpo.py init=runs/sft/hf data.path=tanuki/sample_data/dpo.jsonl loss.beta=0.1 run.dir=runs/dpo
    deepspeed launch/dpo.py init=hf/8b-sft data.path=data/prefs.jsonl loss.type=sigmoid loss.beta=0.1 \
        train.lr=5e-7 parallel.zero_stage=3                       # reference sharded like the policy
    deepspeed launch/dpo.py ... reference=precompute             # reference log-probs computed once: half the memory
    deepspeed launch/dpo.py ... method=lora lora.r=64 lora.alpha=128   # reference = the base, adapters off

Logs TRL's metrics (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected) and writes what SFT writes (checkpoints, hf/, adapter/ for LoRA). Run it again to resume.
"""

import sys

from tanuki.parallel.env import dist_env, strip_local_rank

sys.argv = strip_local_rank(sys.argv)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tanuki import dpo  # noqa: E402
from tanuki.checkpoint import CheckpointError  # noqa: E402
from tanuki.cli import user_errors  # noqa: E402
from tanuki.fileio import WriteError  # noqa: E402
from tanuki.stage import RunDirLocked  # noqa: E402
from tanuki.config import from_dict  # noqa: E402
from tanuki.data.records import SFTDataError  # noqa: E402


@hydra.main(config_path="../conf", config_name="dpo", version_base=None)
@user_errors(FileNotFoundError, CheckpointError, SFTDataError, RunDirLocked, WriteError)
def main(dcfg: DictConfig) -> None:
    dpo.main(from_dict(dpo.DPOConfig, dcfg), dist_env())


if __name__ == "__main__":
    main()
