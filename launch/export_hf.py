"""Export a tanuki model to a Hugging Face ``LlamaForCausalLM`` directory.

Usage:
    python launch/export_hf.py checkpoint=run/model.safetensors output=hf/my-model
    python launch/export_hf.py checkpoint=run/model.safetensors output=hf/my-model tokenizer=tok/ dtype=float32
    python launch/export_hf.py checkpoint=... output=... max_shard_size=2GB overwrite=true

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(output)`` (no custom code),
in vLLM, PEFT and lm-evaluation-harness.
"""

import hydra
import torch
from omegaconf import DictConfig

from tanuki.checkpoint import load_model_file
from tanuki.cli import user_errors
from tanuki.config import ExportHFConfig, from_dict
from tanuki.hf import HFFormatError, export_hf


@hydra.main(config_path="../conf", config_name="export_hf", version_base=None)
@user_errors(FileNotFoundError, FileExistsError, HFFormatError, ValueError)
def main(dcfg: DictConfig) -> None:
    cfg = from_dict(ExportHFConfig, dcfg)
    model_cfg, state_dict = load_model_file(cfg.checkpoint)
    out = export_hf(
        state_dict,
        model_cfg,
        cfg.output,
        dtype=getattr(torch, cfg.dtype),
        max_shard_size=cfg.max_shard_size,
        tokenizer_dir=cfg.tokenizer,
        overwrite=cfg.overwrite,
    )
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {sum(t.numel() for t in state_dict.values()):,} parameters to {out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
