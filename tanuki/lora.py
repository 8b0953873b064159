"""LoRA for tanuki's model, saved and loaded as PEFT adapters.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a linear layer's
weight ``W`` (out, in) and trains a low-rank update beside it::

    y = W x + B (A dropout(x)) * scale,   A: (r, in), B: (out, r)
    scale = alpha / r                      (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

``A`` starts kaiming-uniform (a = sqrt 5, i.e. U(-1/sqrt(in), 1/sqrt(in))) and ``B`` at zero, so the
adapted model starts exactly equal to the base model. This is PEFT's definition (``peft.tuners.lora``),
computed in the same order, so an adapter trained here gives the same logits under
``peft.PeftModel.from_pretrained`` (the tests check it against transformers and PEFT).

The swap (:func:`apply_lora`) follows ``tanuki.fused``: each targeted ``nn.Linear`` becomes a
:class:`LoraLinear`, a subclass holding the *same* ``weight`` Parameter object, plus two children
``lora_A`` / ``lora_B`` whose ``weight`` is the factor. Parameter names therefore read::

    layers.0.attn.wq.weight           the frozen base weight, name unchanged
    layers.0.attn.wq.lora_A.weight    -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    layers.0.attn.wq.lora_B.weight    -> base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight

which is PEFT's own layout with tanuki's module path, so :mod:`tanuki.hf` maps them by renaming the
module path only (``to_peft_name`` / ``from_peft_name``). The factors are :class:`LoraFactor` modules, not
``nn.Linear``, on purpose: ``Transformer.init_weights`` and tensor parallelism find and re-initialise or
shard the model's ``nn.Linear`` layers, and must not touch (nor count, for the order of their random
draws) the adapters.

Order of construction (the architecture's order, with LoRA after the swaps that keep parameters)::

    model = import_hf(init)                     # or build_model(...)
    model = apply_kernels(model, mode)          # either order with apply_lora works
    model = apply_lora(model, cfg.lora, seed)   # swaps, initialises A/B, freezes the rest
    model.checkpoint_fn = ...                   # activation checkpointing
    engine = deepspeed.initialize(model, [p for p in model.parameters() if p.requires_grad], ...)

Tensor parallelism: not supported with LoRA. :func:`apply_lora` raises on a model already sharded by
:func:`tanuki.parallel.tensor_parallel.apply_tensor_parallel` (and a model adapted first and sharded afterwards fails at its first forward,
because the factors would keep their full shapes). Supporting it would mean sharding ``B`` by rows for
the column-parallel projections and ``A`` by columns for the row-parallel ones, with the other factor
replicated and its gradient all-reduced over the TP group, plus a per-rank dropout RNG for the
sequence-sharded inputs. LoRA's point is that the frozen base fits one GPU's memory without optimizer
state, so data parallelism with ZeRO is the supported way to scale it.

ZeRO: the adapters are ordinary parameters created before the engine, so every stage partitions them
like the rest. Under ZeRO-3 the live parameters are shards: save the adapter from a gathered state dict
(``engine._zero3_consolidated_16bit_state_dict()`` or ``deepspeed.zero.GatheredParameters``);
:func:`save_peft_adapter` and :func:`merge_lora_state_dict` accept a state dict for that reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tanuki.config import ConfigError, require
from tanuki.hf import (
    HF_MODULE_NAMES,
    HFFormatError,
    hf_module_path,
    read_peft_adapter,
    write_peft_adapter,
)

#: HF module name (PEFT ``target_modules``) -> tanuki module path inside a decoder layer
TARGET_PATHS: dict[str, str] = {hf: path for path, hf in HF_MODULE_NAMES.items()}
DEFAULT_TARGET_MODULES: tuple[str, ...] = tuple(HF_MODULE_NAMES.values())
#: PEFT ``modules_to_save`` names of the input embedding and the output head
EMBED_MODULE = hf_module_path("embed").rsplit(".", 1)[-1]
HEAD_MODULE = hf_module_path("head").rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LoraConfig:
    """``lora``: low-rank adapters on the linear layers named by ``target_modules``."""

    #: rank of the update B A
    r: int = 16
    #: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    alpha: float = 32.0
    #: dropout on the adapter's input (not on the base layer's), as PEFT's lora_dropout
    dropout: float = 0.05
    #: Hugging Face module names (PEFT's target_modules) of the linear layers to adapt
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    #: rank-stabilised LoRA (Kalajdzievski 2023): scale by alpha / sqrt(r)
    use_rslora: bool = False
    #: also train the whole input embedding / output head (saved as PEFT modules_to_save)
    train_embeddings: bool = False
    train_head: bool = False

    def __post_init__(self) -> None:
        require(
            not isinstance(self.r, bool) and isinstance(self.r, int) and self.r >= 1,
            "lora.r", f"must be an integer >= 1, got {self.r!r}",
        )
        require(self.alpha > 0 and math.isfinite(self.alpha), "lora.alpha", f"must be positive, got {self.alpha}")
        require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        require(
            isinstance(targets, (list, tuple)), "lora.target_modules",
            f"must be a list of module names ({', '.join(DEFAULT_TARGET_MODULES)}), got {targets!r}",
        )
        require(len(targets) > 0, "lora.target_modules", "must name at least one module")
        seen: set[str] = set()
        for i, name in enumerate(targets):
            key = f"lora.target_modules[{i}]"
            if name not in TARGET_PATHS:
                raise ConfigError(
                    key, f"{name!r} is not a linear layer of tanuki's model; valid: {', '.join(DEFAULT_TARGET_MODULES)}"
                )
            require(name not in seen, key, f"{name!r} is listed twice")
            seen.add(name)
        object.__setattr__(self, "target_modules", tuple(targets))

    @property
    def scale(self) -> float:
        """The factor applied to B A x: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's ``scaling``)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        """HF names of the modules trained whole (PEFT ``modules_to_save``)."""
        return tuple(m for m, on in ((EMBED_MODULE, self.train_embeddings), (HEAD_MODULE, self.train_head)) if on)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class LoraFactor(nn.Module):
    """One factor of a LoRA update: a bias-free projection by ``weight``.

    Deliberately not an ``nn.Linear`` (see the module docstring): code that finds the model's linear
    layers to initialise or shard them leaves the adapters alone.
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in_features={inp}, out_features={out}"


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update: ``base(x) + lora_B(lora_A(dropout(x))) * scale``.

    Built from an existing layer by :meth:`from_linear`, sharing its ``weight`` (and ``bias``) Parameter
    objects, so the base parameter keeps its name and identity.
    """

    r: int
    scale: float
    dropout: float
    lora_A: LoraFactor
    lora_B: LoraFactor

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, scale: float, dropout: float) -> "LoraLinear":
        """Wrap ``linear`` (unchanged) with factors of rank ``r``; A and B are left uninitialised."""
        new = cls.__new__(cls)
        # Same state as ``linear`` (parameters, hooks, flags), with its own containers so that the
        # factors registered below do not appear on the old module.
        new.__dict__.update({k: v.copy() if isinstance(v, (dict, set)) else v for k, v in linear.__dict__.items()})
        w = linear.weight
        new.r, new.scale, new.dropout = r, float(scale), float(dropout)
        new.lora_A = LoraFactor(nn.Parameter(torch.empty(r, w.shape[1], device=w.device, dtype=w.dtype)))
        new.lora_B = LoraFactor(nn.Parameter(torch.empty(w.shape[0], r, device=w.device, dtype=w.dtype)))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT's order (peft/tuners/lora/layer.py, Linear.forward): the base result first, then the
        # update added, so the two implementations round alike. The adapter runs in its own dtype (fp32
        # factors beside a bf16 base work); the sum is returned in the base's.
        result = F.linear(x, self.weight, self.bias)
        if getattr(self, "adapters_disabled", False):
            return result
        h = x.to(self.lora_A.weight.dtype)
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return (result + self.lora_B(self.lora_A(h)) * self.scale).to(result.dtype)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """A ~ kaiming-uniform(a = sqrt 5) drawn in fp32 on the CPU (device-independent), B = 0."""
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scale`` in fp32, the (out, in) update this layer adds to ``weight``."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scale)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's (unmerged) base parameters; the factors are dropped."""
        new = nn.Linear.__new__(nn.Linear)
        state = {k: v.copy() if isinstance(v, (dict, set)) else v for k, v in self.__dict__.items()}
        for key in ("r", "scale", "dropout"):
            state.pop(key, None)
        state["_modules"] = {k: m for k, m in state["_modules"].items() if k not in ("lora_A", "lora_B")}
        new.__dict__.update(state)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}"


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update ``B @ A * scale`` of a LoRA pair, in fp32 (PEFT's ``get_delta_weight``)."""
    return (B.float() @ A.float()) * scale


# --------------------------------------------------------------------------------------------------
# Applying, freezing, merging
# --------------------------------------------------------------------------------------------------


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's adapted layers by module path (empty when LoRA is not applied)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> nn.Module:
    """Add LoRA adapters to ``model`` (a :class:`tanuki.model.Transformer`) in place and return it.

    Every decoder layer's linear named by ``cfg.target_modules`` becomes a :class:`LoraLinear`; A and B
    are initialised from ``seed`` (skipped on the meta device: call :func:`reset_lora_parameters` after
    materialising). All other parameters are frozen (``requires_grad = False``) except the input
    embedding / output head when ``cfg.train_embeddings`` / ``cfg.train_head``. Sets ``model.lora_config``.

    Call it after the kernel swap (and on a model without tensor parallelism), before activation
    checkpointing and the ZeRO engine; refuses (``ValueError``) a model sharded by tensor parallelism
    (its parameters carry ``tensor_model_parallel``, the attribute DeepSpeed reads).
    """
    if any(getattr(p, "tensor_model_parallel", False) for p in model.parameters()):
        raise ValueError(
            "LoRA with tensor parallelism (a model sharded over parallel.tp > 1 ranks) is not supported: the adapters would need "
            "sharding too. Train LoRA with parallel.tp=1 (data parallel with ZeRO); the frozen base needs no "
            "optimizer state, which is why LoRA fits where full fine-tuning needs TP."
        )
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (apply_lora was called twice?)")

    suffixes = {"." + TARGET_PATHS[t]: t for t in cfg.target_modules}
    found = {t: 0 for t in cfg.target_modules}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            target = next((t for s, t in suffixes.items() if ("." + path).endswith(s)), None)
            if target is None:
                continue
            if type(child) is not nn.Linear:
                raise TypeError(f"{path}: expected an nn.Linear to adapt, found {type(child).__name__}")
            setattr(parent, child_name, LoraLinear.from_linear(child, cfg.r, cfg.scale, cfg.dropout))
            found[target] += 1
    absent = [t for t, n in found.items() if n == 0]
    if absent:
        raise ValueError(f"the model has no {', '.join(absent)} layers to adapt (is it a tanuki Transformer?)")

    trained = {id(p) for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    if cfg.train_embeddings:
        trained.add(id(model.embed.weight))
    if cfg.train_head:
        trained.add(id(model.head.weight))
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)

    if not any(p.is_meta for p in model.parameters()):
        reset_lora_parameters(model, seed)
    model.lora_config = cfg
    return model


def reset_lora_parameters(model: nn.Module, seed: int = 0) -> None:
    """Initialise every adapter from ``seed``: A kaiming-uniform, B zero (the adapted model = the base).

    One CPU generator is drawn in module order, so the values depend on neither device nor dtype.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for module in lora_modules(model).values():
        module.reset_lora_parameters(gen)


def count_trainable_parameters(model: nn.Module) -> int:
    """Elements of the parameters with ``requires_grad`` (LoRA: r * (in + out) per adapted layer,
    plus the embedding / head when trained)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W + B @ A * scale``, summed in fp32) and put plain
    ``nn.Linear`` layers back, in place; returns ``model``, whose ``state_dict()`` then has the base
    model's names and goes straight to :func:`tanuki.hf.export_hf`. ``requires_grad`` flags are kept."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                w = child.weight
                w.copy_((w.float() + child.delta_weight()).to(w.dtype))
                setattr(parent, name, child.to_linear())
    if "lora_config" in model.__dict__:
        del model.lora_config
    return model


def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """The plain (base-model) state dict of an adapted model's state dict: each ``X.weight`` with an
    ``X.lora_A.weight`` / ``X.lora_B.weight`` pair becomes ``W + B @ A * cfg.scale`` (in fp32, cast back
    to W's dtype) and the factors are dropped. The input is not modified; the result suits ``export_hf``."""
    out = {k: v for k, v in state_dict.items() if not _is_factor(k)}
    pairs = _factor_modules(state_dict)
    for module in pairs:
        w = out[f"{module}.weight"]
        A, B = state_dict[f"{module}.lora_A.weight"], state_dict[f"{module}.lora_B.weight"]
        out[f"{module}.weight"] = (w.float() + lora_delta(A, B, cfg.scale).to(w.device)).to(w.dtype)
    return out


def _is_factor(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def _factor_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths with both factors in ``state`` (raises if one of a pair is missing)."""
    a = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    b = {k.removesuffix(".lora_B.weight") for k in state if k.endswith(".lora_B.weight")}
    if a != b:
        odd = sorted(a ^ b)
        raise KeyError(f"LoRA factors without their pair: {odd[:3]}")
    return sorted(a)


# --------------------------------------------------------------------------------------------------
# PEFT adapter files
# --------------------------------------------------------------------------------------------------


def lora_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor], cfg: Optional[LoraConfig] = None
                    ) -> dict[str, torch.Tensor]:
    """What an adapter holds, in tanuki names: every LoRA factor, plus ``embed.weight`` / ``head.weight``
    when ``cfg`` trains them (``cfg`` defaults to the model's ``lora_config``). Tensors are not copied."""
    if isinstance(model_or_state, nn.Module):
        cfg = cfg if cfg is not None else getattr(model_or_state, "lora_config", None)
        state = model_or_state.state_dict(keep_vars=False)
    else:
        state = model_or_state
    out = {k: v for k, v in state.items() if _is_factor(k)}
    if cfg is not None:
        for name, on in (("embed.weight", cfg.train_embeddings), ("head.weight", cfg.train_head)):
            if on:
                if name not in state:
                    raise KeyError(f"the config trains {name} but the state dict has no '{name}'")
                out[name] = state[name]
    return out


def peft_adapter_config(cfg: LoraConfig, base_model_name_or_path: Optional[str | os.PathLike] = None) -> dict:
    """``adapter_config.json`` of ``cfg``: only keys PEFT's ``LoraConfig`` knows (reference/formats.md)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "fan_in_fan_out": False,
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "inference_mode": True,
    }


def save_peft_adapter(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    cfg: LoraConfig,
    base_model_name_or_path: Optional[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapter of an adapted model (or of its full, gathered state dict) as a PEFT adapter
    directory that ``peft.PeftModel.from_pretrained(base, out_dir)`` loads; atomically (temp dir +
    rename). ``dtype`` casts floating tensors (default: as they are). Returns ``out_dir``."""
    tensors = lora_state_dict(model_or_state, cfg)
    modules = _factor_modules(tensors)
    if not modules:
        raise ValueError("no LoRA factors to save (was apply_lora called on this model?)")
    targets = {m.rsplit(".", 1)[-1] for m in (hf_module_path(p) for p in modules)}
    if targets != set(cfg.target_modules):
        raise ValueError(f"the adapters are on {sorted(targets)} but the config targets {sorted(cfg.target_modules)}")
    for m in modules:
        shape = tuple(tensors[f"{m}.lora_A.weight"].shape)
        if shape[0] != cfg.r:
            raise ValueError(f"{m}.lora_A.weight has shape {shape}, not rank lora.r={cfg.r}")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return write_peft_adapter(tensors, peft_adapter_config(cfg, base_model_name_or_path), out_dir, overwrite=overwrite)


def lora_config_from_peft(config: Mapping, source: str = "adapter_config.json") -> LoraConfig:
    """tanuki's :class:`LoraConfig` for a PEFT ``adapter_config.json``, rejecting what tanuki cannot run."""
    if config.get("peft_type") != "LORA":
        raise HFFormatError(f"{source}: peft_type={config.get('peft_type')!r}; tanuki loads LORA adapters")
    unsupported = {
        "use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None, "trainable_token_indices": None, "target_parameters": None,
        "layer_replication": None,
    }
    for key, plain in unsupported.items():
        value = config.get(key, plain)
        if value != plain and not (plain in ({}, None) and not value):
            raise HFFormatError(f"{source}: {key}={value!r} is not supported (tanuki's LoRA has {plain!r})")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise HFFormatError(f"{source}: target_modules={targets!r}: tanuki needs a list of module names")
    if all(t in TARGET_PATHS for t in targets):  # (an unknown name is reported at its index in the file)
        # PEFT saves target_modules from a set: put them in the model's order.
        targets = sorted(targets, key=DEFAULT_TARGET_MODULES.index)
    to_save = config.get("modules_to_save") or []
    odd = [m for m in to_save if m not in (EMBED_MODULE, HEAD_MODULE)]
    if odd:
        raise HFFormatError(f"{source}: modules_to_save {odd} is not supported (only {EMBED_MODULE}, {HEAD_MODULE})")
    try:
        return LoraConfig(
            r=config.get("r", 8),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=tuple(targets),
            use_rslora=bool(config.get("use_rslora", False)),
            train_embeddings=EMBED_MODULE in to_save,
            train_head=HEAD_MODULE in to_save,
        )
    except ConfigError as e:
        raise HFFormatError(f"{source}: {e}") from None


def _same_adapter(a: LoraConfig, b: LoraConfig) -> bool:
    return dataclasses.replace(a, target_modules=tuple(sorted(a.target_modules))) == dataclasses.replace(
        b, target_modules=tuple(sorted(b.target_modules))
    )


@torch.no_grad()
def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (in place; returned) to resume or inspect it.

    A model without adapters gets them first (:func:`apply_lora` with the adapter's config, so the
    same parameters are trainable); an adapted model must have the same configuration. Every tensor of
    the adapter must match one of the model's, and vice versa (e.g. an adapter written by PEFT itself).
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = read_peft_adapter(adapter_dir)
    source = str(adapter_dir / "adapter_config.json")
    cfg = lora_config_from_peft(config, source)
    if not lora_modules(model):
        apply_lora(model, cfg)
    elif not _same_adapter(model.lora_config, cfg):
        raise ValueError(f"{source}: the adapter's config {cfg} differs from the model's {model.lora_config}")
    expected = lora_state_dict(model, cfg)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise HFFormatError(f"{adapter_dir}: adapter tensors do not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise HFFormatError(
                f"{adapter_dir}: '{name}' has shape {tuple(t.shape)}, the model expects {tuple(expected[name].shape)}"
            )
        expected[name].copy_(t)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base model inside the block (every LoRA update skipped): DPO's reference
    for a LoRA policy, with no second copy of the weights."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.adapters_disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.adapters_disabled = False
