"""Export a tanuki model to a Hugging Face ``LlamaForCausalLM`` (or, for MoE models, ``MixtralForCausalLM``) directory.

Usage:
    python launch/export_hf.py checkpoint=runs/tiny output=hf/tiny          # a run's latest checkpoint
    python launch/export_hf.py checkpoint=runs/tiny/checkpoints/step_00001000 output=hf/tiny-1000
    python launch/export_hf.py checkpoint=run/model.safetensors output=hf/my-model
    python launch/export_hf.py checkpoint=run/model.safetensors output=hf/my-model tokenizer=tok/ dtype=float32
    python launch/export_hf.py checkpoint=... output=... max_shard_size=2GB overwrite=true

ZeRO shards are consolidated on CPU (no GPU, no process group); a run's tokenizer (with its chat
template) is copied in unless ``tokenizer=`` names another. The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(output)`` (no custom code),
in vLLM, PEFT and lm-evaluation-harness.
"""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from tanuki.checkpoint import (
    CheckpointError,
    consolidate_checkpoint,
    load_model_file,
    resolve_checkpoint,
)
from tanuki.cli import user_errors
from tanuki.config import ExportHFConfig, from_dict
from tanuki.fileio import WriteError, check_output_dir
from tanuki.hf import HFFormatError, export_hf


@hydra.main(config_path="../conf", config_name="export_hf", version_base=None)
@user_errors(FileNotFoundError, FileExistsError, HFFormatError, CheckpointError, ValueError, WriteError)
def main(dcfg: DictConfig) -> None:
    cfg = from_dict(ExportHFConfig, dcfg)
    tokenizer = cfg.tokenizer
    check_output_dir(cfg.output, cfg.overwrite)  # before the consolidation, which may take long
    if Path(cfg.checkpoint).is_dir():
        ckpt = resolve_checkpoint(cfg.checkpoint, note=print)
        model_cfg, state_dict = consolidate_checkpoint(ckpt)
        run_tokenizer = ckpt.parent.parent / "tokenizer"
        if tokenizer is None and run_tokenizer.is_dir():
            tokenizer = str(run_tokenizer)
        print(f"consolidated {ckpt}")
    else:
        model_cfg, state_dict = load_model_file(cfg.checkpoint)
    out = export_hf(
        state_dict,
        model_cfg,
        cfg.output,
        dtype=getattr(torch, cfg.dtype),
        max_shard_size=cfg.max_shard_size,
        tokenizer_dir=tokenizer,
        overwrite=cfg.overwrite,
        vocab=cfg.vocab,
    )
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {sum(t.numel() for t in state_dict.values()):,} parameters to {out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
