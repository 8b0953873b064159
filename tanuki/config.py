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


def require(cond: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeScaling:
    """Rescaled rotary frequencies for a longer context (transformers' ``rope_parameters`` /
    ``rope_scaling``; formulas in ``transformers.modeling_rope_utils``).

    * ``linear``: every inverse frequency divided by ``factor`` (position interpolation, Chen et al. 2023);
    * ``llama3``: Llama 3.1's band rescaling: wavelengths above ``original_max_position_embeddings /
      low_freq_factor`` divided by ``factor``, those below ``original_max_position_embeddings /
      high_freq_factor`` kept, a smooth interpolation between;
    * ``yarn`` (Peng et al. 2023; Qwen2.5/Qwen3 long context): interpolated and extrapolated frequencies
      blended by a linear ramp between the dimensions that rotate ``beta_fast`` and ``beta_slow`` times
      over the original context, and cos/sin scaled by ``attention_factor`` (default
      ``0.1 ln(factor) + 1``, or the ``mscale`` / ``mscale_all_dim`` ratio).
    """

    rope_type: Literal["linear", "llama3", "yarn"] = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    #: yarn only
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None

    def __post_init__(self) -> None:
        require(self.factor > 0, "model.rope_scaling.factor", f"must be positive, got {self.factor}")
        if self.rope_type == "llama3":
            require(
                self.high_freq_factor > self.low_freq_factor > 0,
                "model.rope_scaling.high_freq_factor",
                f"must exceed low_freq_factor > 0 (got {self.high_freq_factor}, {self.low_freq_factor})",
            )
        require(self.original_max_position_embeddings > 0, "model.rope_scaling.original_max_position_embeddings",
                "must be positive")


#: model families: the Hugging Face ``model_type`` a dense model is imported from and exported as
#: (an MoE model, ``n_experts`` > 0, is always Mixtral)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "cohere")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder, dense or Mixtral-style MoE (see conf/size/*.yaml for the named sizes).

    The fields after ``router_z_loss_coef`` describe the other families as configuration (litgpt-style);
    their defaults are tanuki's Llama. Cohere (Command-R): ``norm=layernorm``, ``parallel_block``,
    ``rope_interleaved``, ``tie_embeddings``, ``logit_scale``, optionally ``qk_norm=per_head``. Qwen2:
    ``qkv_bias``. Qwen3: ``qk_norm=shared``. Llama 3.1+: ``rope_scaling``. Mistral: ``sliding_window``.
    """

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
    #: mixture of experts (Mixtral-style sparse MLP in every layer): the number of experts, each a
    #: SwiGLU MLP of ffn_dim; 0 = dense (one MLP per layer)
    n_experts: int = 0
    #: experts each token is routed to (used when n_experts > 0)
    top_k: int = 2
    #: weight of the load-balancing loss (Switch Transformer / Mixtral; Tanuki-8x8B: 0.001) added to the
    #: LM loss by the training step (tanuki.model.moe_losses)
    router_aux_loss_coef: float = 0.001
    #: weight of the router z-loss (ST-MoE: mean squared logsumexp of the router logits); 0 = off
    router_z_loss_coef: float = 0.0
    #: the Hugging Face ``model_type`` this model exports as (and was imported from): llama, mistral,
    #: qwen2, qwen3 or cohere; an MoE exports as mixtral whatever this says
    family: Literal["llama", "mistral", "qwen2", "qwen3", "cohere"] = "llama"
    #: rmsnorm (Llama, Qwen, Mistral) or layernorm (Cohere: mean-subtracted, weight only, no bias)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    #: Cohere's parallel block: one input norm feeds attention and the MLP, both added to the residual
    parallel_block: bool = False
    #: rotary pairs (x[2i], x[2i+1]) (Cohere, GPT-J) instead of the half split (x[i], x[i + D/2]) of Llama
    rope_interleaved: bool = False
    #: rescaled rotary frequencies (Llama 3.1 ``llama3``, ``linear``); null = plain rotary
    rope_scaling: Optional[RopeScaling] = None
    #: biases on the q, k and v projections (Qwen2)
    qkv_bias: bool = False
    #: norm of q and k per head before rotary, of the model's ``norm`` kind: shared = one gain of
    #: head_dim for all heads (Qwen3), per_head = a gain per head, (heads, head_dim) (Command R+)
    qk_norm: Literal["none", "shared", "per_head"] = "none"
    #: the output head is the input embedding (one parameter)
    tie_embeddings: bool = False
    #: logits are multiplied by this (Cohere's ``logit_scale``)
    logit_scale: float = 1.0
    #: Mistral's sliding attention window, kept for the export; tanuki attends to the full context, which
    #: is the same while a sequence fits the window, so stages refuse a train.seq_len above it and the
    #: model refuses longer inputs. null = no window
    sliding_window: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        require(
            self.n_experts == 0 or self.n_experts >= 2,
            "model.n_experts",
            f"must be 0 (dense) or at least 2, got {self.n_experts}",
        )
        if self.n_experts:
            require(
                1 <= self.top_k <= self.n_experts,
                "model.top_k",
                f"must be between 1 and model.n_experts ({self.n_experts}), got {self.top_k}",
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), f"model.{name}", f"must be >= 0, got {value}")
        require(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})",
        )
        if self.head_dim is None:
            require(
                self.dim % self.n_heads == 0,
                "model.n_heads",
                f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set model.head_dim",
            )
        else:
            require(self.head_dim > 0, "model.head_dim", "must be positive")
        require(self.attn_head_dim % 2 == 0, "model.head_dim", f"must be even for rotary, got {self.attn_head_dim}")
        require(self.rope_theta > 0, "model.rope_theta", "must be positive")
        require(0 < self.norm_eps < 1, "model.norm_eps", f"must be in (0, 1), got {self.norm_eps}")
        require(self.init_std > 0 and math.isfinite(self.init_std), "model.init_std", "must be positive")
        require(self.logit_scale > 0 and math.isfinite(self.logit_scale), "model.logit_scale", "must be positive")
        require(self.sliding_window is None or self.sliding_window > 0, "model.sliding_window", "must be positive")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads


def check_sliding_window(seq_len: int, model: ModelConfig, source: str = "") -> None:
    """tanuki attends to the full context: a sliding window smaller than the training sequence would
    change what the model computes, so it is refused (``model.sliding_window``)."""
    window = model.sliding_window
    require(
        window is None or seq_len <= window,
        "model.sliding_window",
        f"{window}{' of ' + source if source else ''} is smaller than train.seq_len={seq_len}; tanuki attends to the "
        "full context, which equals the windowed attention only while a sequence fits the window: "
        f"use train.seq_len <= {window}",
    )


def pad_vocab_size(n: int, multiple: int = 128, tp: int = 1) -> int:
    """Megatron's vocabulary padding: round up to a multiple of ``multiple * tp``."""
    m = multiple * tp
    return ((n + m - 1) // m) * m


# --------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """``train``: batch geometry, length of the run, optimizer, schedule and loss options."""

    seq_len: int = 256
    micro_batch_size: int = 8
    #: samples per optimizer step over all data-parallel ranks; gradient accumulation steps =
    #: global_batch_size / (micro_batch_size x data-parallel size)
    global_batch_size: int = 16
    activation_checkpointing: bool = False
    #: optimizer steps to train for (ignored when max_tokens > 0)
    max_steps: int = 100
    #: train for this many tokens instead (rounded up to whole steps); 0 = use max_steps
    max_tokens: float = 0.0
    lr: float = 3e-4
    #: floor of the decay (llm-jp-3: 0.1 x lr)
    min_lr: float = 3e-5
    warmup_steps: int = 10
    #: cosine | wsd (warmup-stable-decay) | constant; see tanuki/optim.py
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    #: wsd: fraction of the steps spent decaying, and the decay shape
    decay_fraction: float = 0.1
    decay_shape: Literal["linear", "cosine", "sqrt"] = "sqrt"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    #: also decay the input embedding / the norm gains (off by default; see tanuki/optim.py)
    decay_embeddings: bool = False
    decay_norms: bool = False
    #: clip the global gradient norm to this (0: no clipping)
    grad_clip: float = 1.0
    #: PaLM z-loss coefficient (llm-jp-3: 1e-4); 0 = off
    z_loss: float = 0.0
    #: tokens per chunk of the output head + loss (tanuki/chunked_loss.py): the (tokens, vocabulary)
    #: logits are never materialised; 0 = full logits (the plain path, kept for comparison)
    loss_chunk_size: int = 1024
    #: auto = bf16 on GPU, fp32 on CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    #: validation every this many steps and at the end (0: only at the end; needs validation data)
    eval_every: int = 50
    #: micro-batches per rank in each validation (the same samples every time)
    eval_iters: int = 4
    #: stop after this many consecutive steps skipped for a non-finite loss or gradient
    max_skipped_steps: int = 5

    def __post_init__(self) -> None:
        require(self.seq_len > 0, "train.seq_len", "must be positive")
        require(self.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
        require(self.global_batch_size > 0, "train.global_batch_size", "must be positive")
        require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not divisible by train.micro_batch_size ({self.micro_batch_size})",
        )
        require(self.max_steps > 0 or self.max_tokens > 0, "train.max_steps", "must be positive (or set train.max_tokens)")
        require(self.max_tokens >= 0, "train.max_tokens", "must be >= 0")
        require(self.lr > 0, "train.lr", "must be positive")
        require(0 <= self.min_lr <= self.lr, "train.min_lr", f"must be in [0, train.lr={self.lr}]")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(0 < self.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(all(0 <= b < 1 for b in self.betas), "train.betas", "each beta must be in [0, 1)")
        require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        require(self.z_loss >= 0, "train.z_loss", "must be >= 0")
        require(self.loss_chunk_size >= 0, "train.loss_chunk_size", "must be >= 0 (0: full logits)")
        require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        require(self.eval_iters >= 0, "train.eval_iters", "must be >= 0")
        require(self.max_skipped_steps >= 1, "train.max_skipped_steps", "must be >= 1")

    def total_steps(self) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``max_tokens`` rounded up to whole steps."""
        if self.max_tokens > 0:
            return max(1, math.ceil(self.max_tokens / (self.global_batch_size * self.seq_len)))
        return self.max_steps


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout: tensor parallel size inside a node, ZeRO stage over the data-parallel ranks."""

    tp: int = 1
    sp: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 3
    #: seconds a collective may wait for the other ranks before the process group gives up (a rank
    #: that died or hangs): every rank then ends with an error instead of waiting forever. Must cover
    #: the longest wait of a healthy run (rank 0 converting a checkpoint for a reshard, a slow save).
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        require(self.tp >= 1, "parallel.tp", "must be >= 1")
        require(self.timeout_s > 0, "parallel.timeout_s", f"must be positive, got {self.timeout_s}")
        require(not self.sp or self.tp > 1, "parallel.sp", "sequence parallelism needs parallel.tp > 1")


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
        require(self.gpus >= 1, "plan.gpus", "must be >= 1")
        require(self.gpu_memory_gib > 0, "plan.gpu_memory_gib", "must be positive")
        require(0 < self.mfu <= 1, "plan.mfu", "must be in (0, 1]")


def _check_model_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    tp = parallel.tp
    if tp == 1:
        return
    require(
        model.n_experts == 0,
        "parallel.tp",
        "tensor parallelism of MoE layers is not supported: use parallel.tp=1 (ZeRO shards the experts)",
    )
    for name, value in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads), ("ffn_dim", model.ffn_dim)):
        require(value % tp == 0, "parallel.tp", f"tp={tp} must divide model.{name} ({value})")
    require(
        model.vocab_size % tp == 0,
        "parallel.tp",
        f"tp={tp} must divide the padded vocabulary model.vocab_size ({model.vocab_size})",
    )


@dataclass(frozen=True)
class RunConfig:
    """``run``: where a run keeps everything it writes."""

    #: run directory shared by all ranks (config, log, metrics.jsonl, checkpoints/, wandb/); null =
    #: $TANUKI_RUN_DIR, else runs/slurm-<job id> inside a SLURM job (so a requeued job finds its
    #: checkpoints), else runs/<stage>-<time> chosen once by rank 0
    dir: Optional[str] = None


@dataclass(frozen=True)
class TokenizerRef:
    """``tokenizer``: the tokenizer the data was encoded with (copied into the run and the export)."""

    path: Optional[str] = None


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint``: cadence and retention of resumable checkpoints (always saved at the end too)."""

    every: int = 1000
    #: complete checkpoints kept; older ones are deleted after a newer one is complete (0: keep all)
    keep_last: int = 2

    def __post_init__(self) -> None:
        require(self.every >= 1, "checkpoint.every", "must be >= 1")
        require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")


@dataclass(frozen=True)
class WandbConfig:
    """``logging.wandb``: offline by default, so no API key is ever needed (``wandb sync`` later)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "tanuki"
    name: Optional[str] = None
    group: Optional[str] = None
    tags: tuple[str, ...] = ()
    entity: Optional[str] = None


@dataclass(frozen=True)
class LoggingConfig:
    """``logging``: the progress line, metrics.jsonl and W&B."""

    #: log every this many optimizer steps
    every: int = 10
    #: dense bf16 peak of one accelerator in TFLOP/s, for MFU (H100 SXM 989, A100 312, H200 989)
    peak_tflops: float = 989.0
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        require(self.every >= 1, "logging.every", "must be >= 1")
        require(self.peak_tflops > 0, "logging.peak_tflops", "must be positive")


@dataclass(frozen=True)
class ExportConfig:
    """``export``: write a Hugging Face directory at the end of training."""

    hf: bool = False
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: default: <run dir>/hf
    dir: Optional[str] = None
    #: the embedding and head rows written: trim = the tokenizer's ids only (the export scores text as
    #: tanuki does); padded = the model's padded rows, those beyond the tokenizer zeroed (for engines that
    #: mask logits by the tokenizer's size; see tanuki/hf.py, "Vocabulary rows")
    vocab: Literal["trim", "padded"] = "trim"


# The benchmark config lives with the evaluation; imported here, after the configs it uses exist, because
# tanuki.evaluate imports them from this module.
from tanuki.evaluate import EvalConfig  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """The sections every training stage has (pretraining, SFT, DPO): what the shared loop and the
    stage plumbing (:mod:`tanuki.stage`) read. A stage config adds its own model, data and export
    sections; ``train`` defaults are the stage's own (fine-tuning uses other learning rates)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: benchmarks (lm-evaluation-harness) on saved checkpoints during training; off by default
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: auto = continue from the latest complete checkpoint of run.dir if there is one; never = start
    #: fresh (fails if run.dir already has checkpoints); or a checkpoint directory to start from
    resume: str = "auto"
    seed: int = 1234


# The data config lives with the data pipeline; imported here, after ConfigError exists, because
# tanuki.data.config imports it from this module.
from tanuki.data.config import DataConfig  # noqa: E402


@dataclass(frozen=True)
class PretrainConfig(StageConfig):
    """``conf/pretrain.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    export: ExportConfig = field(default_factory=ExportConfig)
    #: a Hugging Face directory to continue pretraining from (its config replaces ``model``)
    init: Optional[str] = None

    def __post_init__(self) -> None:
        _check_model_parallel(self.model, self.parallel)
        require(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq_len",
            f"{self.train.seq_len} exceeds the model's context model.max_seq_len ({self.model.max_seq_len})",
        )
        check_sliding_window(self.train.seq_len, self.model)
        require(
            not self.parallel.sp or self.train.seq_len % self.parallel.tp == 0,
            "parallel.sp",
            f"sequence parallelism splits train.seq_len={self.train.seq_len} over tp={self.parallel.tp} ranks: "
            "tp must divide it",
        )


@dataclass(frozen=True)
class ExportHFConfig:
    """``conf/export_hf.yaml``: write a tanuki model or checkpoint as a Hugging Face directory."""

    #: a run directory (its latest checkpoint), a checkpoint directory (``.../checkpoints/step_N``),
    #: or a tanuki model file (safetensors with the model config in its metadata)
    checkpoint: str
    #: the Hugging Face directory to write
    output: str
    #: tokenizer directory to copy into the export (its special-token ids go into the configs);
    #: default for a run or checkpoint: the tokenizer saved with the run
    tokenizer: Optional[str] = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    #: shard the safetensors above this size (with model.safetensors.index.json)
    max_shard_size: str = "5GB"
    #: replace a non-empty output directory
    overwrite: bool = False
    #: the embedding and head rows written: trim = the tokenizer's ids only (the export scores text as
    #: tanuki does); padded = the model's padded rows, those beyond the tokenizer zeroed (for engines that
    #: mask logits by the tokenizer's size; see tanuki/hf.py, "Vocabulary rows")
    vocab: Literal["trim", "padded"] = "trim"
