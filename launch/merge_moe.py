"""Build a Mixtral-style mixture of experts from dense Hugging Face Llama models.

Usage:
    # Swallow-MoE style: four dense models' MLPs as experts, attention etc. from the first, random router
    python launch/merge_moe.py base=hf/a experts=[hf/a,hf/b,hf/c,hf/d] gate=random top_k=2 output=hf/moe
    # mergekit-style router from the base's hidden states on prompts per expert (bundled sets or lists)
    python launch/merge_moe.py base=hf/ja experts=[hf/ja,hf/code] gate=hidden prompts=[ja,code] output=hf/moe
    python launch/merge_moe.py base=hf/ja experts=[hf/ja,hf/code] gate=hidden \\
        'prompts=[["日本語の文章"],["def f(x):"]]' output=hf/moe
    # Tanuki-8x8B style sparse upcycling: 8 copies of the base MLP (optionally with noise)
    python launch/merge_moe.py base=hf/tanuki-8b gate=upcycle n_experts=8 top_k=2 output=hf/tanuki-8x8b
    python launch/merge_moe.py base=hf/tiny gate=upcycle n_experts=4 noise_std=0.01 seed=1 output=hf/tiny-moe

The output is a MixtralForCausalLM directory with the base's tokenizer: it loads with
``transformers.AutoModelForCausalLM.from_pretrained(output)`` and as ``init=`` of tanuki's training
stages. What each gate mode computes: tanuki/merge_moe.py. All options: conf/merge_moe.yaml.
"""

import hydra
from omegaconf import DictConfig

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.hf import HFFormatError
from tanuki.merge_moe import MergeError, MergeMoEConfig, merge_moe


@hydra.main(config_path="../conf", config_name="merge_moe", version_base=None)
@user_errors(MergeError, HFFormatError, FileNotFoundError, FileExistsError)
def main(dcfg: DictConfig) -> None:
    merge_moe(from_dict(MergeMoEConfig, dcfg))


if __name__ == "__main__":
    main()
