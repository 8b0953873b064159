"""Typed, frozen configuration.

Hydra composes a ``DictConfig`` from ``conf/`` and the command line; :func:`from_dict` turns it, once,
into the frozen dataclasses below. Unknown keys, wrong types and impossible combinations fail here, at
start-up, with a message that names the full dotted key, before any process group or GPU memory is
touched. Each component then receives only its own sub-config.

Every stage (pretraining, SFT, DPO, the tokenizer builder, preprocessing, ...) declares its config as a
dataclass and converts with :func:`from_dict`; cross-field checks live in ``__post_init__`` and raise
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key it concerns."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


# --------------------------------------------------------------------------------------------------
# DictConfig / dict  ->  frozen dataclass
# --------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Resolve an OmegaConf container (interpolations included) into plain Python objects."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            raise ConfigError(str(e.full_key), "is required (give it on the command line as key=value)") from None
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, "must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(key, f"{value!r} does not match {_type_name(tp)}")
    if value is None:
        raise ConfigError(key, f"must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(key, f"{value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "3e-4" as a string; accept numeric strings for floats.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported config type {tp!r}")  # a bug in a dataclass definition


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a DictConfig or a plain mapping.

    Unknown keys and type mismatches raise :class:`ConfigError` naming the dotted key (``prefix`` is
    prepended). Missing keys take the dataclass defaults; a field without a default is required.
    """
    data = _plain(data)
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = [n for n in fields if n.startswith(str(k)[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        valid = ", ".join(sorted(fields))
        raise ConfigError(_join(prefix, str(k)), f"unknown key{hint}; valid keys here: {valid}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix):
            raise ConfigError(_join(prefix, e.key), str(e).split(": ", 1)[-1]) from None
        raise


def to_dict(cfg: Any) -> Any:
    """The plain-Python (JSON/YAML-serialisable) form of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder (see conf/size/*.yaml for the named sizes)."""

    n_layers: int = 4
    dim: int = 256
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 704
    #: rows of the embedding and the output head: the tokenizer's vocabulary padded to a multiple of
    #: 128 (x tensor-parallel size), as Megatron does. The padded rows never win the softmax in tanuki's
    #: loss and generation.
    vocab_size: int = 4096
    #: per-head dimension; null means dim // n_heads
    head_dim: Optional[int] = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    #: standard deviation of the normal init of every linear and embedding weight; the attention and
    #: MLP output projections use init_std / sqrt(2 * n_layers) (GPT-2 / Megatron scaled init).
    init_std: float = 0.02
    #: RMSNorm and rotary implementation: auto = Triton on CUDA, PyTorch elsewhere
    kernels: Literal["auto", "triton", "torch"] = "auto"

    def __post_init__(self) -> None:
        for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            _require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})",
        )
        if self.head_dim is None:
            _require(
                self.dim % self.n_heads == 0,
                "model.n_heads",
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set model.head_dim",
            )
        else:
            _require(self.head_dim > 0, "model.head_dim", "must be positive")
        _require(self.attn_head_dim % 2 == 0, "model.head_dim", f"must be even for rotary, got {self.attn_head_dim}")
        _require(self.rope_theta > 0, "model.rope_theta", "must be positive")
        _require(0 < self.norm_eps < 1, "model.norm_eps", f"must be in (0, 1), got {self.norm_eps}")
        _require(self.init_std > 0 and math.isfinite(self.init_std), "model.init_std", "must be positive")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads


def pad_vocab_size(n: int, multiple: int = 128, tp: int = 1) -> int:
    """Megatron's vocabulary padding: round up to a multiple of ``multiple * tp``."""
    m = multiple * tp
    return ((n + m - 1) // m) * m


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Batch geometry of a training run (the full loop settings arrive with the pretraining stage)."""

    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 16
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        _require(self.seq_len > 0, "train.seq_len", "must be positive")
        _require(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        _require(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not divisible by train.micro_batch_size ({self.micro_batch_size})",
        )


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout: tensor parallel size inside a node, ZeRO stage over the data-parallel ranks."""

    tp: int = 1
    sp: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 3

    def __post_init__(self) -> None:
        _require(self.tp >= 1, "parallel.tp", "must be >= 1")
        _require(not self.sp or self.tp > 1, "parallel.sp", "sequence parallelism needs parallel.tp > 1")


@dataclass(frozen=True)
class PlanConfig:
    """Cluster used by ``launch/model_info.py`` for its memory plan."""

    gpus: int = 8
    gpu_memory_gib: float = 80.0
    #: dense bf16 peak of one GPU, for the time estimate (H100 SXM: 989 TFLOP/s)
    peak_tflops: float = 989.0
    #: assumed model FLOPs utilisation for the time estimate
    mfu: float = 0.4
    #: tokens to train on, for the time estimate (0: skip it)
    train_tokens: float = 0.0

    def __post_init__(self) -> None:
        _require(self.gpus >= 1, "plan.gpus", "must be >= 1")
        _require(self.gpu_memory_gib > 0, "plan.gpu_memory_gib", "must be positive")
        _require(0 < self.mfu <= 1, "plan.mfu", "must be in (0, 1]")


def _check_model_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    tp = parallel.tp
    if tp == 1:
        return
    for name, value in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads), ("ffn_dim", model.ffn_dim)):
        _require(value % tp == 0, "parallel.tp", f"tp={tp} must divide model.{name} ({value})")
    _require(
        model.vocab_size % tp == 0,
        "parallel.tp",
        f"tp={tp} must divide the padded vocabulary model.vocab_size ({model.vocab_size})",
    )


@dataclass(frozen=True)
class PretrainConfig:
    """``conf/pretrain.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234

    def __post_init__(self) -> None:
        _check_model_parallel(self.model, self.parallel)
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            f"{self.train.seq_len} exceeds the model's context model.max_seq_len ({self.model.max_seq_len})",
        )


@dataclass(frozen=True)
class ModelInfoConfig(PretrainConfig):
    """``conf/model_info.yaml``: the pretraining config plus the cluster to plan for."""

    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass(frozen=True)
class ExportHFConfig:
    """``conf/export_hf.yaml``: write a tanuki model as a Hugging Face directory."""

    #: a tanuki model file (safetensors with the model config in its metadata)
    checkpoint: str
    #: the Hugging Face directory to write
    output: str
    #: tokenizer directory to copy into the export (its special-token ids go into the configs)
    tokenizer: Optional[str] = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: shard the safetensors above this size (with model.safetensors.index.json)
    max_shard_size: str = "5GB"
    #: replace a non-empty output directory
    overwrite: bool = False
