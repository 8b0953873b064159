"""Parameter counts, FLOPs per token and a per-GPU memory plan for a model size, without allocating it.

Usage:
    python launch/model_info.py                          # the tiny default model
    python launch/model_info.py +size=1.8b
    python launch/model_info.py +size=13b plan.gpus=16 parallel.tp=2
    python launch/model_info.py +size=8b plan.gpus=64 train.micro_batch_size=1 plan.train_tokens=1e12
    python launch/model_info.py +size=8b --cfg job      # show the composed config
    # fine-tuning a Hugging Face model (only its config.json is read): LoRA beside full fine-tuning
    python launch/model_info.py init=hf/35b method=lora lora.r=64 plan.gpus=4 plan.gpu_memory_gib=48 \
        train.seq_len=4096 train.micro_batch_size=1

The plan assumes bf16 mixed precision with AdamW and the ZeRO stage of ``parallel.zero_stage``
(default 3); with method=lora, the frozen bf16 base, the adapters with their AdamW states and the
adapters' activations as well; see tanuki/info.py for the formulas.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.info import ModelInfoConfig, format_report, model_report


@hydra.main(config_path="../conf", config_name="model_info", version_base=None)
@user_errors()
def main(dcfg: DictConfig) -> None:
    cfg = from_dict(ModelInfoConfig, dcfg)
    size = cfg.init or HydraConfig.get().runtime.choices.get("size", "tiny (default)")
    print(format_report(str(size), model_report(cfg)))


if __name__ == "__main__":
    main()
