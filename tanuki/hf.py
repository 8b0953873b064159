"""Hugging Face interop: the one place that knows Hugging Face weight names.

* :func:`export_hf` writes a tanuki state dict as a ``LlamaForCausalLM`` directory (a dense model) or a
  ``MixtralForCausalLM`` one (``n_experts`` > 0): ``config.json``, ``generation_config.json``,
  safetensors, sharded above ``max_shard_size`` with an index file, and the tokenizer files when given;
  ``AutoModelForCausalLM.from_pretrained`` loads it with no custom code.
* :func:`load_hf` / :func:`import_hf` read a Hugging Face Llama or Mixtral directory (GQA included) back
  into a tanuki :class:`~tanuki.config.ModelConfig` and state dict, for continued pretraining or
  fine-tuning.
* The other families (:data:`FAMILY_ARCHITECTURES`: ``CohereForCausalLM``, ``Qwen2ForCausalLM``,
  ``Qwen3ForCausalLM``, ``MistralForCausalLM``, and Llama with rope scaling) are read the same way into
  the configuration flags of :class:`~tanuki.config.ModelConfig`, and ``export_hf`` writes each back as
  its own architecture and ``model_type`` (``cfg.family``) with the fields the model depends on.

Mixtral weight names. On disk, Mixtral checkpoints (the Hub's, and what transformers 4 *and* 5
``save_pretrained`` write) use the transformers-4 naming, which tanuki exports::

    model.layers.{i}.block_sparse_moe.gate.weight             (n_experts, dim)   router
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight   (ffn_dim, dim)     gate projection
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight   (ffn_dim, dim)     up projection
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight   (dim, ffn_dim)     down projection

transformers 5 holds the experts in memory as fused 3-D tensors (``mlp.gate.weight``,
``mlp.experts.gate_up_proj`` (n_experts, 2 x ffn_dim, dim) = [gate; up], ``mlp.experts.down_proj``
(n_experts, dim, ffn_dim)) and converts on load and save. :func:`load_hf` reads both namings (a
directory written from a v5 in-memory state dict without that conversion included).

Vocabulary rows. tanuki pads its embedding and head to a multiple of 128 x TP (Megatron's
padding) and keeps the rows beyond the tokenizer's ids out of its softmax (``vocab_limit``), so they
never train. Every other tool (transformers, lm-evaluation-harness, TRL, vLLM) scores all rows, so
:func:`export_hf` writes the embedding and head trimmed to the tokenizer's size by default
(``vocab="trim"``): the export then scores every text as tanuki does and no tool can produce an id the
tokenizer lacks. ``vocab="padded"`` keeps the padded shape for engines that want a multiple of 128, with
the padded rows of the embedding and head set to zero (their logit is exactly 0); a plain linear head
cannot make a row lose against every input, so such exports are only for engines that mask logits by
the tokenizer's size. On import for training, :func:`pad_vocab_rows` pads a trimmed model back (zero
rows, which the loss masks and the optimizer then leaves at zero: no gradient, and weight decay of 0 is
0).

Both directions are exact renames: tanuki's rotary uses the same half-split layout as HF Llama (and
Cohere's interleaved layout is a flag of the model, not a permutation of the weights), so no
q/k permutation is needed (Meta's original interleaved checkpoints are converted by transformers' own
script before they reach this module).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional

import safetensors.torch  # save_file is looked up when called: tests replace it to interrupt a write
import torch
from huggingface_hub import split_torch_state_dict_into_shards

from tanuki.config import ModelConfig, pad_vocab_size
from tanuki.fileio import check_output_dir, is_model_dir, open_safetensors, read_json, read_safetensors, replacing_dir
from tanuki.model import Rotary, Transformer

#: tanuki parameter name -> HF LlamaForCausalLM name. ``{i}`` is the layer index.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "block_sparse_moe.gate.weight",  # Mixtral
    "attn.wq.bias": "self_attn.q_proj.bias",  # Qwen2
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3 (head_dim,)
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
#: Command R+'s per-head q/k norms, (heads, head_dim): the same HF names as Qwen3's shared ones, so
#: the import renames them by the config (:func:`load_hf`), not by this table's inverse
_PER_HEAD_NORM_NAMES = {
    "attn.q_head_norm.weight": "self_attn.q_norm.weight",
    "attn.k_head_norm.weight": "self_attn.k_norm.weight",
}
#: tanuki expert projection -> Mixtral's (transformers 4 naming, the on-disk one): w1 gate, w2 down, w3 up
_EXPERT_NAMES = {"w_gate": "w1", "w_down": "w2", "w_up": "w3"}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
#: tanuki module path -> HF module name, as PEFT ``target_modules`` name them.
HF_MODULE_NAMES = {
    "attn.wq": "q_proj",
    "attn.wk": "k_proj",
    "attn.wv": "v_proj",
    "attn.wo": "o_proj",
    "mlp.w_gate": "gate_proj",
    "mlp.w_up": "up_proj",
    "mlp.w_down": "down_proj",
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(w_gate|w_up|w_down)\.weight$")
_HF_EXPERT_RE = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
#: transformers 5's in-memory (fused) Mixtral names, accepted on import
_HF_V5_ROUTER = "mlp.gate.weight"
_HF_V5_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class HFFormatError(ValueError):
    """A Hugging Face directory that tanuki cannot read; the message names the file."""


@dataclass(frozen=True)
class _Renaming:
    """One direction of the renaming: source name -> target name, by the tables of that direction."""

    #: whole-model names
    top: Mapping[str, str]
    #: (layer index, name within the layer) of a source layer parameter
    layer_re: re.Pattern
    #: what precedes the layer index in a target name
    layer_prefix: str
    #: names within a layer
    layer: Mapping[str, str]
    #: (expert index, projection) of a source expert parameter, within its layer
    expert_re: re.Pattern
    #: the experts' path within a target layer
    experts: str
    #: projection names of an expert
    expert: Mapping[str, str]

    def rename(self, name: str) -> Optional[str]:
        """The target name of ``name``, or None if the tables have none."""
        if name in self.top:
            return self.top[name]
        m = self.layer_re.match(name)
        if not m:
            return None
        layer, rest = m.groups()
        if rest in self.layer:
            return f"{self.layer_prefix}{layer}.{self.layer[rest]}"
        e = self.expert_re.match(rest)
        if e:
            return f"{self.layer_prefix}{layer}.{self.experts}.{e.group(1)}.{self.expert[e.group(2)]}.weight"
        return None


_TO_HF = _Renaming(
    _TOP_NAMES, _LAYER_RE, "model.layers.", {**_LAYER_NAMES, **_PER_HEAD_NORM_NAMES}, _EXPERT_RE,
    "block_sparse_moe.experts", _EXPERT_NAMES,
)
_LAYER_INV = {v: k for k, v in _LAYER_NAMES.items()}
_LAYER_INV[_HF_V5_ROUTER] = "mlp.router.weight"
_FROM_HF = _Renaming(
    {v: k for k, v in _TOP_NAMES.items()}, _HF_LAYER_RE, "layers.", _LAYER_INV,
    _HF_EXPERT_RE, "mlp.experts", {v: k for k, v in _EXPERT_NAMES.items()},
)


def to_hf_name(name: str) -> str:
    """HF name of a tanuki parameter (``layers.3.attn.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    hf_name = _TO_HF.rename(name)
    if hf_name is None:
        raise KeyError(f"no Hugging Face name for tanuki parameter '{name}'")
    return hf_name


def from_hf_name(name: str) -> str:
    """Inverse of :func:`to_hf_name` (also accepts transformers 5's Mixtral router name ``mlp.gate``)."""
    tanuki_name = _FROM_HF.rename(name)
    if tanuki_name is None:
        raise KeyError(f"no tanuki name for Hugging Face tensor '{name}'")
    return tanuki_name


def _split_fused_experts(hf_name: str, t: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
    """tanuki tensors of a transformers-5 fused expert tensor, or None if ``hf_name`` is not one."""
    m = _HF_V5_FUSED_RE.match(hf_name)
    if not m:
        return None
    layer, kind = m.groups()
    out = {}
    for e in range(t.shape[0]):
        p = f"layers.{layer}.mlp.experts.{e}."
        if kind == "gate_up_proj":  # (E, 2F, D): gate rows first, then up (MixtralExperts' chunk(2))
            gate, up = t[e].chunk(2, dim=0)
            out[p + "w_gate.weight"], out[p + "w_up.weight"] = gate.clone(), up.clone()
        else:
            out[p + "w_down.weight"] = t[e].clone()
    return out


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


#: ``cfg.family`` (HF ``model_type``) -> the architecture ``export_hf`` writes
FAMILY_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "cohere": "CohereForCausalLM",
}
_LLAMA_LIKE = dict(norm="rmsnorm", parallel_block=False, rope_interleaved=False, qkv_bias=False, qk_norm="none",
                   logit_scale=1.0)
#: what each family's transformers class computes, as tanuki flags: an export must match them
#: (``qk_norm`` may also be "per_head" for Cohere, ``use_qk_norm``)
_FAMILY_FLAGS = {
    "llama": dict(_LLAMA_LIKE, sliding_window=None),
    "mistral": _LLAMA_LIKE,
    "qwen2": dict(_LLAMA_LIKE, qkv_bias=True),
    "qwen3": dict(_LLAMA_LIKE, qk_norm="shared"),
    "cohere": dict(norm="layernorm", parallel_block=True, rope_interleaved=True, qkv_bias=False,
                   sliding_window=None),
}
#: rope types tanuki computes (``rope_scaling.rope_type``); transformers' others (yarn, dynamic,
#: longrope, ...) are refused by name
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: yarn's optional parameters and the values transformers assumes when they are absent
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": None, "mscale": None,
                  "mscale_all_dim": None}


def _check_family(cfg: ModelConfig) -> None:
    flags = _FAMILY_FLAGS[cfg.family]
    for key, value in flags.items():
        if getattr(cfg, key) != value:
            raise ValueError(
                f"model.{key}={getattr(cfg, key)!r} cannot be written as {FAMILY_ARCHITECTURES[cfg.family]} "
                f"(model.family={cfg.family!r} computes {key}={value!r})"
            )
    if cfg.family == "cohere" and cfg.qk_norm == "shared":
        raise ValueError("model.qk_norm='shared' cannot be written as CohereForCausalLM (its q/k norms are per head)")


def _rope_parameters(cfg: ModelConfig) -> dict:
    """transformers 5's ``rope_parameters`` of ``cfg``."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    sc = cfg.rope_scaling
    if sc is not None:
        rope.update(rope_type=sc.rope_type, factor=float(sc.factor))
        if sc.rope_type == "llama3":
            rope.update(low_freq_factor=float(sc.low_freq_factor), high_freq_factor=float(sc.high_freq_factor),
                        original_max_position_embeddings=int(sc.original_max_position_embeddings))
        elif sc.rope_type == "yarn":  # the optional parameters only where they differ from the default
            rope.update(original_max_position_embeddings=int(sc.original_max_position_embeddings))
            rope.update({k: getattr(sc, k) for k, v in _YARN_DEFAULTS.items() if getattr(sc, k) != v})
    return rope


def _shape_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` fields of the model's shape, the same in every family (the inverse of
    :func:`_shape_from_hf`)."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.attn_head_dim, max_position_embeddings=cfg.max_seq_len)


def hf_config_dict(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
) -> dict:
    """``config.json`` contents of a ``LlamaForCausalLM`` (or, for an MoE, ``MixtralForCausalLM``; for
    another ``cfg.family``, its architecture: :data:`FAMILY_ARCHITECTURES`) with tanuki's shape."""
    # lazy: transformers is slow to import (~1.5 s for these), and every stage imports this module
    from transformers import LlamaConfig, MixtralConfig

    if cfg.n_experts:  # Mixtral computes what tanuki's Llama does, plus the experts
        _check_family(dataclasses.replace(cfg, family="llama"))
    if not cfg.n_experts and cfg.family != "llama" or cfg.rope_scaling is not None or cfg.tie_embeddings:
        return _family_config_dict(cfg, dtype, dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                                    pad_token_id=pad_token_id))

    shape = dict(
        **_shape_to_hf(cfg),  # intermediate_size: of each expert in an MoE
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        tie_word_embeddings=False,
        initializer_range=cfg.init_std,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if cfg.n_experts:
        arch, hf = "MixtralForCausalLM", MixtralConfig(
            **shape,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,  # full causal attention, as tanuki's
        )
    else:
        _check_family(cfg)
        arch, hf = "LlamaForCausalLM", LlamaConfig(**shape, attention_bias=False, mlp_bias=False)
    d = hf.to_dict()
    d["architectures"] = [arch]
    d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    # transformers >= 5 stores the base in ``rope_parameters``; older readers (transformers 4, vLLM
    # builds pinned to it) look for ``rope_theta``. Write both, they agree.
    d["rope_theta"] = float(cfg.rope_theta)
    return d


def _family_config_dict(cfg: ModelConfig, dtype: torch.dtype, tokens: dict) -> dict:
    """``config.json`` of a dense ``cfg.family`` model, every field the model depends on written in
    transformers 5's keys (``rope_parameters``) and, where cheap, transformers 4's too (a top-level
    ``rope_theta``, ``rope_scaling``)."""
    import transformers  # lazy, as in hf_config_dict

    if cfg.n_experts:
        raise ValueError("model.rope_scaling / model.tie_embeddings are not supported with model.n_experts > 0")
    _check_family(cfg)
    arch = FAMILY_ARCHITECTURES[cfg.family]
    fields = dict(
        **_shape_to_hf(cfg),
        rope_parameters=_rope_parameters(cfg),
        hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        **tokens,
    )
    if cfg.family == "cohere":
        fields.update(layer_norm_eps=cfg.norm_eps, logit_scale=cfg.logit_scale, attention_bias=False,
                      use_qk_norm=cfg.qk_norm == "per_head")
    else:
        fields.update(rms_norm_eps=cfg.norm_eps)
    if cfg.family == "llama":
        fields.update(attention_bias=False, mlp_bias=False)
    elif cfg.family == "mistral":
        fields.update(sliding_window=cfg.sliding_window)
    elif cfg.family in ("qwen2", "qwen3"):
        # Qwen's window applies only with use_sliding_window (to the layers from max_window_layers on)
        fields.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                      max_window_layers=0 if cfg.sliding_window is not None else cfg.n_layers)
        if cfg.family == "qwen3":
            fields.update(attention_bias=False)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    d = config_cls(**fields).to_dict()
    d["architectures"] = [arch]
    d["model_type"] = cfg.family
    d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    d["rope_theta"] = float(cfg.rope_theta)  # transformers 4 (see hf_config_dict)
    if cfg.rope_scaling is not None:  # transformers 4's key: the same parameters, without the base
        d["rope_scaling"] = {k: v for k, v in _rope_parameters(cfg).items() if k != "rope_theta"}
    return d


def _rope_from_hf(hf: Mapping, source: str) -> tuple[float, dict]:
    """``(rope_theta, rope_scaling fields)`` of a HF config, in transformers 5 (``rope_parameters``) or 4
    (``rope_theta`` + ``rope_scaling``) keys; rope types tanuki does not compute are refused by key."""
    from tanuki.config import RopeScaling

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise HFFormatError(f"{source}: rope_parameters={rope!r} is not a mapping")
    if "full_attention" in rope or "sliding_attention" in rope:
        raise HFFormatError(f"{source}: per-layer-type rope_parameters are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise HFFormatError(
            f"{source}: rope_scaling.rope_type={rope_type!r} is not supported (tanuki computes {', '.join(ROPE_TYPES)})"
        )
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise HFFormatError(f"{source}: partial_rotary_factor != 1 is not supported (tanuki rotates all of head_dim)")
    theta = hf.get("rope_theta")
    if theta is None:
        theta = rope.get("rope_theta")
    scaling = None
    if rope_type != "default":
        keep = {f: rope[f] for f in ("factor", "low_freq_factor", "high_freq_factor") if f in rope}
        if rope_type in ("llama3", "yarn"):
            keep["original_max_position_embeddings"] = int(
                rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)))
        if rope_type == "yarn":
            if rope.get("factor") is None:  # transformers: the context ratio
                keep["factor"] = hf["max_position_embeddings"] / keep["original_max_position_embeddings"]
            keep.update({k: rope[k] for k in _YARN_DEFAULTS if rope.get(k) is not None})
            keep = {k: bool(v) if k == "truncate" else v for k, v in keep.items()}
        scaling = RopeScaling(rope_type=rope_type, **{
            k: v if k in ("original_max_position_embeddings", "truncate") else float(v) for k, v in keep.items()})
    return float(theta if theta is not None else 10000.0), scaling


def _shape_from_hf(hf: Mapping) -> dict:
    """The :class:`ModelConfig` fields every family reads the same way from ``config.json``."""
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim == hf["hidden_size"] // n_heads and hf["hidden_size"] % n_heads == 0:
        head_dim = None  # the default dim // heads, written out
    return dict(n_layers=hf["num_hidden_layers"], dim=hf["hidden_size"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], head_dim=head_dim, max_seq_len=hf.get("max_position_embeddings", 4096),
                init_std=float(hf.get("initializer_range", 0.02)))


def _family_config_from_hf(hf: Mapping, source: str) -> ModelConfig:
    """tanuki's :class:`ModelConfig` for a dense family's ``config.json`` (see :data:`FAMILY_ARCHITECTURES`)."""
    family = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (tanuki's MLP is SwiGLU)")
    if family in ("llama", "qwen3", "cohere", "mistral") and hf.get("attention_bias", False):
        raise HFFormatError(f"{source}: attention_bias=True (a bias on o_proj too) is not supported; "
                            "tanuki has q/k/v biases only (Qwen2)")
    if hf.get("mlp_bias", False):
        raise HFFormatError(f"{source}: mlp_bias=True is not supported")
    theta, scaling = _rope_from_hf(hf, source)
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if family in ("llama", "cohere"):
        window = None
    flags = dict(_FAMILY_FLAGS[family])
    flags.pop("sliding_window", None)
    if family == "cohere":
        flags["qk_norm"] = "per_head" if hf.get("use_qk_norm", False) else "none"
        flags["logit_scale"] = float(hf.get("logit_scale", 0.0625))
        eps = hf.get("layer_norm_eps", 1e-5)
    else:
        eps = hf.get("rms_norm_eps", 1e-6)
    return ModelConfig(
        **_shape_from_hf(hf),
        rope_theta=theta,
        norm_eps=float(eps),
        family=family,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "cohere")),
        sliding_window=window,
        **flags,
    )


def model_config_from_hf(hf: Mapping, source: str = "config.json") -> ModelConfig:
    """tanuki's :class:`ModelConfig` for a HF Llama or Mixtral ``config.json`` (rejecting what tanuki
    cannot run). Mixtral's ``router_jitter_noise`` (a training-time input perturbation) is not kept."""
    model_type = hf.get("model_type")
    if model_type in FAMILY_ARCHITECTURES:
        return _family_config_from_hf(hf, source)
    if model_type not in ("llama", "mixtral"):
        archs = hf.get("architectures")
        raise HFFormatError(
            f"{source}: model_type={model_type!r} (architectures={archs}) is not supported; tanuki imports "
            f"{', '.join(sorted({*FAMILY_ARCHITECTURES.values(), 'MixtralForCausalLM'}))} checkpoints"
        )
    moe = {}
    if model_type == "mixtral":
        window = hf.get("sliding_window")
        if window is not None and window < hf.get("max_position_embeddings", 0):
            raise HFFormatError(
                f"{source}: sliding_window={window} is not supported (tanuki attends to the full context)"
            )
        moe = dict(
            n_experts=hf["num_local_experts"],
            top_k=hf.get("num_experts_per_tok", 2),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != expected:
            raise HFFormatError(f"{source}: {key}={hf[key]!r} is not supported (tanuki's Llama has {expected!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    if rope_type != "default":
        raise HFFormatError(f"{source}: rope scaling {rope_type!r} is not supported (only the default rotary)")
    theta = hf.get("rope_theta")
    if theta is None and isinstance(rope, Mapping):
        theta = rope.get("rope_theta")
    return ModelConfig(
        **_shape_from_hf(hf),
        rope_theta=float(theta if theta is not None else 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **moe,
    )


# --------------------------------------------------------------------------------------------------
# Vocabulary rows (module docstring: "Vocabulary rows")
# --------------------------------------------------------------------------------------------------

#: ``export.vocab``: trim = the embedding and head cut to the tokenizer's ids; padded = the model's shape,
#: padded rows zero (for engines that mask logits by the tokenizer's size)
VOCAB_MODES = ("trim", "padded")
_VOCAB_ROWS = ("embed.weight", "head.weight")


def trim_vocab_rows(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, n: int) -> tuple[dict, ModelConfig]:
    """The state dict and config with the embedding and head cut to their first ``n`` rows."""
    if n > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {n} ids but the model only {cfg.vocab_size} embedding rows")
    sd = dict(state_dict)
    for name in _VOCAB_ROWS:
        sd[name] = sd[name][:n].clone()
    return sd, replace(cfg, vocab_size=n)


def zero_vocab_rows(state_dict: Mapping[str, torch.Tensor], n: int) -> dict:
    """The state dict with the embedding and head rows from ``n`` on set to zero (the input is not modified)."""
    sd = dict(state_dict)
    for name in _VOCAB_ROWS:
        t = sd[name].clone()
        t[n:] = 0
        sd[name] = t
    return sd


def pad_vocab_rows(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> tuple[dict, ModelConfig]:
    """The state dict and config with the embedding and head padded to ``vocab_size`` rows by zeros:
    deterministic, masked out of tanuki's softmax, and left at zero by AdamW (no gradient reaches them
    and decoupled weight decay of zero is zero)."""
    if vocab_size < cfg.vocab_size:
        raise ValueError(f"cannot pad {cfg.vocab_size} vocabulary rows down to {vocab_size}")
    if vocab_size == cfg.vocab_size:
        return dict(state_dict), cfg
    sd = dict(state_dict)
    for name in _VOCAB_ROWS:
        t = sd[name]
        sd[name] = torch.cat([t, t.new_zeros(vocab_size - t.shape[0], *t.shape[1:])])
    return sd, replace(cfg, vocab_size=vocab_size)


def training_vocab_size(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of an imported model as tanuki trains it: ``vocab_size`` padded to a multiple of
    128 x ``tp`` (Megatron's padding, what the vocabulary-parallel embedding and loss split evenly), so
    a trimmed export can continue training with any TP."""
    return replace(cfg, vocab_size=pad_vocab_size(cfg.vocab_size, tp=tp))


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                     tied: bool = False) -> dict:
    """Rename (and optionally cast) a tanuki state dict to HF names. Non-parameter entries are dropped,
    and with ``tied`` the output head (``lm_head.weight``: transformers ties it to the embedding, and
    its ``save_pretrained`` leaves it out too)."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith("inv_freq") or (tied and name == "head.weight"):
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[to_hf_name(name)] = t.contiguous().cpu()
    return out


def export_hf(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    output_dir: str | os.PathLike,
    *,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: Optional[str | os.PathLike] = None,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    overwrite: bool = False,
    vocab: str = "trim",
) -> Path:
    """Write ``state_dict`` (tanuki names) as a Hugging Face ``LlamaForCausalLM`` directory, or
    ``MixtralForCausalLM`` for an MoE ``cfg`` (experts in the on-disk naming, see the module docstring).

    The directory is assembled under a temporary name beside ``output_dir`` and renamed into place
    only when every file is written, so an interrupted export never leaves a loadable-looking
    directory. ``overwrite`` replaces an earlier export only: any other non-empty directory is refused
    (:func:`~tanuki.fileio.is_model_dir`). Special-token ids default to the tokenizer's when
    ``tokenizer_dir`` is given.

    ``vocab`` (with ``tokenizer_dir``; module docstring, "Vocabulary rows"): ``trim`` writes the
    embedding and head cut to the tokenizer's ids, ``padded`` the model's rows with those beyond the
    tokenizer's ids zeroed. Without a tokenizer the rows are written as they are.
    """
    if vocab not in VOCAB_MODES:
        raise ValueError(f"vocab={vocab!r}: expected one of {VOCAB_MODES}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)

    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(state_dict[name].shape)} does not match the config {shape}")

    if tokenizer_dir is not None:
        ids = _tokenizer_special_ids(Path(tokenizer_dir))
        bos_token_id = ids.get("bos") if bos_token_id is None else bos_token_id
        eos_token_id = ids.get("eos") if eos_token_id is None else eos_token_id
        pad_token_id = ids.get("pad") if pad_token_id is None else pad_token_id
        if ids["size"] > cfg.vocab_size:
            raise ValueError(f"{tokenizer_dir}: {ids['size']} ids, but the model has only {cfg.vocab_size} "
                             "embedding rows (is this the tokenizer it was trained with?)")
        if vocab == "trim":
            state_dict, cfg = trim_vocab_rows(state_dict, cfg, ids["size"])
        else:
            state_dict = zero_vocab_rows(state_dict, ids["size"])

    if cfg.tie_embeddings and not torch.equal(state_dict["head.weight"], state_dict["embed.weight"]):
        raise ValueError("model.tie_embeddings=true but head.weight differs from embed.weight")
    hf_sd = to_hf_state_dict(state_dict, dtype, tied=cfg.tie_embeddings)
    saved_dtype = dtype or next(iter(hf_sd.values())).dtype
    with replacing_dir(output_dir, replaceable=is_model_dir) as tmp:
        split = split_torch_state_dict_into_shards(hf_sd, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            safetensors.torch.save_file({n: hf_sd[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": split.metadata.get("total_size")}, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config_dict(
            cfg, dtype=saved_dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        gen = {k: v for k, v in gen.items() if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return output_dir


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the Hugging Face / SentencePiece tokenizer files of ``src`` into ``dst``."""
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{src}: no tokenizer.json or tokenizer.model (not a tokenizer directory)")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _tokenizer_special_ids(tokenizer_dir: Path) -> dict:
    from transformers import PreTrainedTokenizerFast  # lazy, as in hf_config_dict

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    # size: every id the tokenizer can produce (added tokens included), what ``vocab_limit`` is in training
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "size": len(tok)}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of ``Transformer(cfg)`` (tanuki names)."""
    d, hd = cfg.dim, cfg.attn_head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attn.wq.weight"] = (cfg.n_heads * hd, d)
        shapes[p + "attn.wk.weight"] = (cfg.n_kv_heads * hd, d)
        shapes[p + "attn.wv.weight"] = (cfg.n_kv_heads * hd, d)
        if cfg.qkv_bias:
            shapes[p + "attn.wq.bias"] = (cfg.n_heads * hd,)
            shapes[p + "attn.wk.bias"] = (cfg.n_kv_heads * hd,)
            shapes[p + "attn.wv.bias"] = (cfg.n_kv_heads * hd,)
        if cfg.qk_norm == "shared":
            shapes[p + "attn.q_norm.weight"] = shapes[p + "attn.k_norm.weight"] = (hd,)
        elif cfg.qk_norm == "per_head":
            shapes[p + "attn.q_head_norm.weight"] = (cfg.n_heads, hd)
            shapes[p + "attn.k_head_norm.weight"] = (cfg.n_kv_heads, hd)
        shapes[p + "attn.wo.weight"] = (d, cfg.n_heads * hd)
        if not cfg.parallel_block:
            shapes[p + "mlp_norm.weight"] = (d,)
        mlps = [f"{p}mlp.experts.{e}." for e in range(cfg.n_experts)] if cfg.n_experts else [p + "mlp."]
        if cfg.n_experts:
            shapes[p + "mlp.router.weight"] = (cfg.n_experts, d)
        for m in mlps:
            shapes[m + "w_gate.weight"] = (cfg.ffn_dim, d)
            shapes[m + "w_up.weight"] = (cfg.ffn_dim, d)
            shapes[m + "w_down.weight"] = (d, cfg.ffn_dim)
    shapes["norm.weight"] = (d,)
    shapes["head.weight"] = (cfg.vocab_size, d)
    return shapes


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise HFFormatError(f"{path}: not a directory (expected a Hugging Face model directory)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFFormatError(f"{cfg_file}: missing (not a Hugging Face model directory)")
    return read_json(cfg_file, HFFormatError)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of the Hugging Face model directory ``path``: those its
    ``model.safetensors.index.json`` lists (sorted), or its one ``model.safetensors``.
    :class:`HFFormatError` if it has neither, or if a listed file is missing."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise HFFormatError(
            f"{path}: no model.safetensors or model.safetensors.index.json "
            "(PyTorch .bin checkpoints: re-save them with save_pretrained(safe_serialization=True))"
        )
    for f in files:
        if not f.is_file():
            raise HFFormatError(f"{f}: listed in the index but missing")
    return files


def load_hf(path: str | os.PathLike, dtype: Optional[torch.dtype] = None,
            vocab_size: Optional[int] = None) -> tuple[ModelConfig, dict]:
    """Read a HF Llama or Mixtral directory: its tanuki :class:`ModelConfig` and state dict (tanuki names,
    CPU). ``vocab_size``: pad the embedding and head to that many rows (:func:`pad_vocab_rows`)."""
    path = Path(path)
    hf_config = read_hf_config(path)
    cfg = model_config_from_hf(hf_config, source=str(path / "config.json"))
    tied = bool(hf_config.get("tie_word_embeddings", False))
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with open_safetensors(f, HFFormatError) as fh:
            for hf_name in fh.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                fused = _split_fused_experts(hf_name, fh.get_tensor(hf_name)) if cfg.n_experts else None
                if fused is not None:
                    sd.update({n: t.to(dtype) if dtype is not None else t for n, t in fused.items()})
                    continue
                try:
                    name = from_hf_name(hf_name)
                except KeyError:
                    kind = "Mixtral" if cfg.n_experts else FAMILY_ARCHITECTURES[cfg.family]
                    raise HFFormatError(f"{f}: unexpected tensor '{hf_name}' for a {kind} model") from None
                if cfg.qk_norm == "per_head" and name.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
                    name = name.replace("_norm.weight", "_head_norm.weight")
                t = fh.get_tensor(hf_name)
                sd[name] = t.to(dtype) if dtype is not None else t
    if "head.weight" not in sd and tied and "embed.weight" in sd:
        sd["head.weight"] = sd["embed.weight"].clone()
    shapes = expected_shapes(cfg)
    missing = [n for n in shapes if n not in sd]
    if missing:
        raise HFFormatError(f"{path}: {len(missing)} tensors missing, e.g. {[to_hf_name(n) for n in missing[:3]]}")
    extra = [n for n in sd if n not in shapes]
    if extra:
        raise HFFormatError(
            f"{path}: {len(extra)} tensors that config.json does not account for, e.g. {[to_hf_name(n) for n in extra[:3]]}"
        )
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != shape:
            raise HFFormatError(
                f"{path}: tensor '{to_hf_name(name)}' has shape {tuple(sd[name].shape)}, config.json implies {shape}"
            )
    if vocab_size is not None:
        sd, cfg = pad_vocab_rows(sd, cfg, vocab_size)
    return cfg, sd


def read_hf_tensors(path: str | os.PathLike, names, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Only the tensors ``names`` (tanuki names) of a HF directory, read lazily from its safetensors
    files (e.g. the MLPs of a large dense model). Missing ones raise :class:`HFFormatError`."""
    path = Path(path)
    wanted = {to_hf_name(n): n for n in names}
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with open_safetensors(f, HFFormatError) as fh:
            for hf_name in set(fh.keys()) & set(wanted):
                t = fh.get_tensor(hf_name)
                out[wanted[hf_name]] = t.to(dtype) if dtype is not None else t
    missing = [hf for hf, n in wanted.items() if n not in out]
    if missing:
        raise HFFormatError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    return out


def import_hf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              vocab_size: Optional[int] = None):
    """Build a tanuki :class:`~tanuki.model.Transformer` with the weights of a HF Llama or Mixtral directory;
    ``vocab_size``: with the embedding and head padded to that many rows (for training, see
    :func:`training_vocab_size`)."""
    cfg, sd = load_hf(path, dtype=dtype, vocab_size=vocab_size)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.load_state_dict(sd)
    for module in model.modules():  # non-persistent buffers (rotary frequencies) after to_empty
        if isinstance(module, Rotary):
            module.reset_parameters()
    return model.to(dtype)


# --------------------------------------------------------------------------------------------------
# PEFT LoRA adapters
# --------------------------------------------------------------------------------------------------
#
# A PEFT adapter of a causal LM names its tensors by their path in ``PeftModelForCausalLM`` ->
# ``LoraModel`` -> ``LlamaForCausalLM``: ``base_model.model.`` + the HF module path + ``.lora_A.weight``
# (A is (r, in)) or ``.lora_B.weight`` (B is (out, r)); whole modules trained alongside
# (``modules_to_save``) are saved under their plain HF parameter name, e.g.
# ``base_model.model.lm_head.weight`` (PEFT strips its ``modules_to_save.default.`` wrapper on save).
# tanuki's LoRA parameters are ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` beside the
# module's ``weight`` (tanuki/lora.py), so both directions are renames of the module path.

#: prefix of every tensor name in a PEFT adapter of a causal LM
PEFT_PREFIX = "base_model.model."
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_FACTOR_RE = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")


def hf_module_path(module: str) -> str:
    """HF path of the tanuki module holding a weight (``layers.0.attn.wq`` -> ``model.layers.0.self_attn.q_proj``,
    ``embed`` -> ``model.embed_tokens``, ``head`` -> ``lm_head``). Its last component is the name PEFT's
    ``target_modules`` / ``modules_to_save`` use."""
    return to_hf_name(module + ".weight").removesuffix(".weight")


def to_peft_name(name: str) -> str:
    """PEFT adapter key of a tanuki LoRA factor or fully trained parameter
    (``layers.0.attn.wq.lora_A.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``,
    ``head.weight`` -> ``base_model.model.lm_head.weight``)."""
    m = _LORA_FACTOR_RE.match(name)
    if m:
        return f"{PEFT_PREFIX}{hf_module_path(m.group(1))}.{m.group(2)}.weight"
    return PEFT_PREFIX + to_hf_name(name)


def from_peft_name(key: str) -> str:
    """Inverse of :func:`to_peft_name`."""
    if not key.startswith(PEFT_PREFIX):
        raise KeyError(f"'{key}' is not a PEFT causal-LM adapter key (they start with '{PEFT_PREFIX}')")
    rest = key[len(PEFT_PREFIX):]
    m = _LORA_FACTOR_RE.match(rest)
    try:
        if m:
            return f"{from_hf_name(m.group(1) + '.weight').removesuffix('.weight')}.{m.group(2)}.weight"
        return from_hf_name(rest)
    except KeyError:
        raise KeyError(f"no tanuki name for PEFT adapter tensor '{key}'") from None


def write_peft_adapter(
    tensors: Mapping[str, torch.Tensor],
    adapter_config: Mapping,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``tensors`` are named the tanuki way (LoRA factors and fully trained parameters, see
    :func:`to_peft_name`); ``adapter_config`` is written as given. Like :func:`export_hf`, the directory
    is assembled under a temporary name and renamed into place when complete, and a non-empty
    ``output_dir`` is replaced only with ``overwrite=True``.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    peft_sd = {to_peft_name(name): t.detach().contiguous().cpu() for name, t in tensors.items()}
    with replacing_dir(output_dir, replaceable=is_model_dir) as tmp:
        safetensors.torch.save_file(peft_sd, tmp / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(dict(adapter_config), indent=2) + "\n")
    return output_dir


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: its ``adapter_config.json`` and its tensors (tanuki names, CPU)."""
    path = Path(path)
    if not path.is_dir():
        raise HFFormatError(f"{path}: not a directory (expected a PEFT adapter directory)")
    cfg_file, weights = path / PEFT_CONFIG_FILE, path / PEFT_WEIGHTS_FILE
    if not cfg_file.is_file():
        raise HFFormatError(f"{cfg_file}: missing (not a PEFT adapter directory)")
    config = read_json(cfg_file, HFFormatError)
    if not weights.is_file():
        hint = " (adapter_model.bin: re-save it with save_pretrained(safe_serialization=True))"
        raise HFFormatError(f"{weights}: missing{hint if (path / 'adapter_model.bin').is_file() else ''}")
    _, peft_tensors = read_safetensors(weights, HFFormatError)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in peft_tensors.items():
        try:
            tensors[from_peft_name(key)] = t
        except KeyError as e:
            raise HFFormatError(f"{weights}: {e.args[0]}") from None
    return config, tensors
