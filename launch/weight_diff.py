"""Release a fine-tuned model as a weight diff against its base, and recover it (Alpaca / open-instruct style).

Usage:
    python launch/weight_diff.py mode=make raw=hf/base tuned=hf/sft output=hf/sft-diff
    python launch/weight_diff.py mode=make raw=hf/base tuned=hf/sft output=hf/sft-diff max_shard_size=2GB
    python launch/weight_diff.py mode=recover raw=hf/base diff=hf/sft-diff output=hf/sft-recovered
    python launch/weight_diff.py mode=recover raw=... diff=... output=... overwrite=true

``make`` writes ``tuned - raw`` per tensor (float32; float64 for float32 weights) as a Hugging Face
directory with the tuned model's config, tokenizer and generation config, plus ``weight_diff.json``
(checksums of the raw and tuned weights, the tuned dtypes and shard layout). ``recover`` adds the diff
to the raw model, casts back to the tuned dtypes and checks every tensor against the recorded checksum:
the result is bit-identical to the tuned model, or the command fails (exit status 2) saying the raw
model is not the one the diff was made against, and writes nothing. Works on any causal LM stored as
safetensors (Llama, Mixtral, ...): tensors are matched by name. All options: conf/weight_diff.yaml.
"""

import hydra
from omegaconf import DictConfig

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.hf import HFFormatError
from tanuki.weight_diff import WeightDiffConfig, WeightDiffError, make_diff, recover


@hydra.main(config_path="../conf", config_name="weight_diff", version_base=None)
@user_errors(FileNotFoundError, FileExistsError, HFFormatError, WeightDiffError)
def main(dcfg: DictConfig) -> None:
    cfg = from_dict(WeightDiffConfig, dcfg)
    if cfg.mode == "make":
        make_diff(cfg.raw, cfg.tuned, cfg.output, max_shard_size=cfg.max_shard_size, overwrite=cfg.overwrite, log=print)
    else:
        recover(cfg.raw, cfg.diff, cfg.output, overwrite=cfg.overwrite, log=print)


if __name__ == "__main__":
    main()
