"""Hugging Face interop: the one place that knows Hugging Face weight names.

* :func:`export_hf` writes a tanuki state dict as a ``LlamaForCausalLM`` directory (a dense model) or a
  ``MixtralForCausalLM`` one (``n_experts`` > 0): ``config.json``, ``generation_config.json``,
  safetensors, sharded above ``max_shard_size`` with an index file, and the tokenizer files when given;
  ``AutoModelForCausalLM.from_pretrained`` loads it with no custom code.
* :func:`load_hf` / :func:`import_hf` read a Hugging Face Llama or Mixtral directory (GQA included) back
  into a tanuki :class:`~tanuki.config.ModelConfig` and state dict, for continued pretraining or
  fine-tuning.

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

Both directions are exact renames: tanuki's rotary uses the same half-split layout as HF Llama, so no
q/k permutation is needed (Meta's original interleaved checkpoints are converted by transformers' own
script before they reach this module).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import safetensors.torch  # save_file is looked up when called: tests replace it to interrupt a write
import torch
from huggingface_hub import split_torch_state_dict_into_shards

from tanuki.config import ModelConfig
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
    _TOP_NAMES, _LAYER_RE, "model.layers.", _LAYER_NAMES, _EXPERT_RE, "block_sparse_moe.experts", _EXPERT_NAMES
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


def hf_config_dict(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
) -> dict:
    """``config.json`` contents of a ``LlamaForCausalLM`` (or, for an MoE, ``MixtralForCausalLM``) with
    tanuki's shape."""
    # lazy: transformers is slow to import (~1.5 s for these), and every stage imports this module
    from transformers import LlamaConfig, MixtralConfig

    shape = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,  # of each expert in an MoE
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.attn_head_dim,
        max_position_embeddings=cfg.max_seq_len,
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
        arch, hf = "LlamaForCausalLM", LlamaConfig(**shape, attention_bias=False, mlp_bias=False)
    d = hf.to_dict()
    d["architectures"] = [arch]
    d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    # transformers >= 5 stores the base in ``rope_parameters``; older readers (transformers 4, vLLM
    # builds pinned to it) look for ``rope_theta``. Write both, they agree.
    d["rope_theta"] = float(cfg.rope_theta)
    return d


def model_config_from_hf(hf: Mapping, source: str = "config.json") -> ModelConfig:
    """tanuki's :class:`ModelConfig` for a HF Llama or Mixtral ``config.json`` (rejecting what tanuki
    cannot run). Mixtral's ``router_jitter_noise`` (a training-time input perturbation) is not kept."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mixtral"):
        archs = hf.get("architectures")
        raise HFFormatError(
            f"{source}: not a Llama or Mixtral model (model_type={model_type!r}, architectures={archs}); "
            "tanuki imports LlamaForCausalLM and MixtralForCausalLM checkpoints"
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
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim == hf["hidden_size"] // n_heads and hf["hidden_size"] % n_heads == 0:
        head_dim = None
    return ModelConfig(
        n_layers=hf["num_hidden_layers"],
        dim=hf["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        head_dim=head_dim,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta if theta is not None else 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
        **moe,
    )


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> dict:
    """Rename (and optionally cast) a tanuki state dict to HF names. Non-parameter entries are dropped."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith("inv_freq"):
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
) -> Path:
    """Write ``state_dict`` (tanuki names) as a Hugging Face ``LlamaForCausalLM`` directory, or
    ``MixtralForCausalLM`` for an MoE ``cfg`` (experts in the on-disk naming, see the module docstring).

    The directory is assembled under a temporary name beside ``output_dir`` and renamed into place
    only when every file is written, so an interrupted export never leaves a loadable-looking
    directory. ``overwrite`` replaces an earlier export only: any other non-empty directory is refused
    (:func:`~tanuki.fileio.is_model_dir`). Special-token ids default to the tokenizer's when
    ``tokenizer_dir`` is given.
    """
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

    hf_sd = to_hf_state_dict(state_dict, dtype)
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
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}


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
        shapes[p + "attn.wo.weight"] = (d, cfg.n_heads * hd)
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


def load_hf(path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> tuple[ModelConfig, dict]:
    """Read a HF Llama or Mixtral directory: its tanuki :class:`ModelConfig` and state dict (tanuki names,
    CPU)."""
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
                    kind = "Mixtral" if cfg.n_experts else "Llama"
                    raise HFFormatError(f"{f}: unexpected tensor '{hf_name}' for a {kind} model") from None
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


def import_hf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build a tanuki :class:`~tanuki.model.Transformer` with the weights of a HF Llama or Mixtral directory."""
    cfg, sd = load_hf(path, dtype=dtype)
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
