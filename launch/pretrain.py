"""Pretrain a Llama-style model on tokenized data with DeepSpeed ZeRO.

Usage:
    # one process (CPU or one GPU): the tiny model on the bundled sample, tokenized by launch/preprocess.py
    python launch/pretrain.py data.prefixes=[data/sample] tokenizer.path=tok run.dir=runs/tiny

    # one node, 8 GPUs (DeepSpeed's launcher, or torchrun: same arguments)
    deepspeed launch/pretrain.py +size=8b data.prefixes=[data/ja,data/en] data.weights=[0.7,0.3] \
        tokenizer.path=tok run.dir=runs/8b train.max_tokens=1e12
    torchrun --nproc-per-node 8 launch/pretrain.py +size=1.8b ...

    # several nodes under SLURM: launch/slurm/pretrain.sbatch (see launch/slurm/README.md)

    # resume after a crash or preemption: run the same command again (resume=auto is the default)

Writes to run.dir: config.yaml, train.log, metrics.jsonl, wandb/ (offline unless logging.wandb.mode=online),
checkpoints/step_N (DeepSpeed + tanuki state), and with export.hf=true a Hugging Face model in hf/.
Export any checkpoint later with launch/export_hf.py; plot a run with launch/plot.py.
"""

import sys

from tanuki.parallel.env import dist_env, strip_local_rank

# The deepspeed launcher appends --local_rank=N, which Hydra would reject.
sys.argv = strip_local_rank(sys.argv)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tanuki import pretrain  # noqa: E402
from tanuki.checkpoint import CheckpointError  # noqa: E402
from tanuki.cli import user_errors  # noqa: E402
from tanuki.fileio import WriteError  # noqa: E402
from tanuki.stage import RunDirLocked  # noqa: E402
from tanuki.config import PretrainConfig, from_dict  # noqa: E402


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
@user_errors(FileNotFoundError, CheckpointError, RunDirLocked, WriteError)
def main(dcfg: DictConfig) -> None:
    pretrain.main(from_dict(PretrainConfig, dcfg), dist_env())


if __name__ == "__main__":
    main()
