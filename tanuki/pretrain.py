"""Pretraining: next-token prediction on packed windows of the tokenized corpus.

:func:`prepare` checks everything that can be checked from the config and the files (the tokenizer,
the data prefixes, the batch geometry against the number of ranks, an ``init`` model) before any
process group starts; :func:`run` then builds the model and the engine in the order the architecture
fixes (build -> kernels -> activation checkpointing -> ZeRO -> resume) and calls the shared loop.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tanuki.config import ConfigError, PretrainConfig, to_dict
from tanuki.parallel.env import DistEnv

#: checkpoint settings a resumed run must share with the run that wrote the checkpoint
#: (a different parallel.tp or number of ranks is resharded on load: tanuki.parallel.reshard)
RESUME_KEYS = ("model", "parallel.zero_stage", "train.seq_len")


@dataclass
class Prepared:
    cfg: PretrainConfig
    #: tokens in the tokenizer (<= model.vocab_size, which is padded)
    tokenizer_vocab: int
    grad_accumulation: int


def tokenizer_vocab_size(path: str) -> int:
    """Number of ids of a tokenizer directory (its ``tokenizer.json``, as written by build_tokenizer)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_dir():
        raise ConfigError("tokenizer.path", f"no tokenizer directory at '{path}'")
    tj = p / "tokenizer.json"
    if not tj.is_file():
        raise ConfigError("tokenizer.path", f"'{path}' has no tokenizer.json (build one with launch/build_tokenizer.py)")
    try:
        return Tokenizer.from_file(str(tj)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises a plain Exception on bad JSON
        raise ConfigError("tokenizer.path", f"{tj}: unreadable ({e})") from None


def prepare(cfg: PretrainConfig, env: DistEnv) -> Prepared:
    """Checks that need files or the world size; raise ConfigError naming the key. No process group."""
    from tanuki.parallel.zero import grad_accumulation_steps

    if cfg.init:
        from tanuki.hf import HFFormatError, model_config_from_hf, read_hf_config

        try:
            model = model_config_from_hf(read_hf_config(cfg.init), source=f"{cfg.init}/config.json")
        except (FileNotFoundError, HFFormatError) as e:
            raise ConfigError("init", str(e)) from None
        # The architecture comes from the checkpoint; the kernel choice stays the user's.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, kernels=cfg.model.kernels))
    if not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path", "is required: the tokenizer directory the data was encoded with")
    vocab = tokenizer_vocab_size(cfg.tokenizer.path)
    if vocab > cfg.model.vocab_size:
        from tanuki.config import pad_vocab_size

        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} rows cannot hold the {vocab} tokens of {cfg.tokenizer.path}; "
            f"set model.vocab_size={pad_vocab_size(vocab, tp=cfg.parallel.tp)}",
        )
    if not cfg.data.prefixes:
        raise ConfigError("data.prefixes", "is required: data.prefixes=[PREFIX,...] (from launch/preprocess.py)")
    from tanuki.data.blend import open_prefix

    for i, prefix in enumerate(cfg.data.prefixes):
        open_prefix(prefix, f"data.prefixes[{i}]")
    if env.world_size % cfg.parallel.tp:
        raise ConfigError("parallel.tp", f"tp={cfg.parallel.tp} does not divide the {env.world_size} ranks of this job")
    dp = env.world_size // cfg.parallel.tp
    gas = grad_accumulation_steps(cfg.train, dp)
    return Prepared(cfg, vocab, gas)


def lm_step(model, batch: dict[str, torch.Tensor], *, z_loss: float, vocab_limit: int | None = None,
            vocab_parallel=None):
    """One micro-batch of next-token prediction: input ``tokens[:, :-1]``, labels ``tokens[:, 1:]``.

    ``vocab_limit`` (the tokenizer's size) keeps the padding rows of the embedding out of the softmax;
    ``vocab_parallel`` says which vocabulary slice this rank's logits are under tensor parallelism.
    """
    from tanuki.losses import causal_lm_loss
    from tanuki.model import moe_losses
    from tanuki.train import StepOutput

    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    out = causal_lm_loss(logits, tokens[:, 1:], z_loss=z_loss, vocab_limit=vocab_limit, vocab_parallel=vocab_parallel)
    stats = {"loss": out.ce}
    if z_loss > 0:
        stats["z_loss"] = out.z
    router_loss, router_stats = moe_losses(model)  # (0, {}) for a dense model
    stats.update(router_stats)
    return StepOutput(loss=out.loss + router_loss, stats=stats)


def precision_is_bf16(precision: str) -> bool:
    if precision == "auto":
        return torch.cuda.is_available()
    return precision == "bf16"


def builds_partitioned(cfg: PretrainConfig, groups=None) -> bool:
    """Whether the model is built partitioned over the ranks (``deepspeed.zero.Init``) rather than whole
    on every rank: ZeRO-3 without TP, from ``seed``. With TP > 1 the TP rewrite needs whole modules to
    slice, and ``init`` loads whole Hugging Face tensors, so both keep building the full fp32 model
    (DeepSpeed partitions it in ``deepspeed.initialize``)."""
    return cfg.parallel.zero_stage == 3 and (groups is None or groups.tp == 1) and not cfg.init


def build_partitioned_model(cfg: PretrainConfig, groups=None):
    """``build_model(cfg.model, seed=cfg.seed)``'s values, but each parameter partitioned over the ranks as
    it is created, so no rank ever holds the whole fp32 model."""
    import deepspeed
    import torch.distributed as dist

    from tanuki.model import Transformer
    from tanuki.parallel.zero import deepspeed_config

    dp_size = groups.dp if groups is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    ds_config = deepspeed_config(cfg.train, cfg.parallel, dp_size=dp_size, bf16=precision_is_bf16(cfg.train.precision))
    # As deepspeed.initialize does later: DeepSpeed's comm wraps the process group tanuki made, so the
    # config zero.Init parses sees the real world size.
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)
    # dtype=None: the parameters take the dtype the engine would cast them to (bf16 or fp32, from the
    # config), as the old path's values do; the init is drawn in fp32 and rounded on copy, like that cast.
    # (An explicit dtype=torch.float32 is turned into bf16 on accelerators without fp16, e.g. DeepSpeed's
    # CPU accelerator, and a bf16 engine does not cast zero.Init parameters.)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None):
        model = Transformer(cfg.model)
    model.init_weights(cfg.seed, gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    return model


def build_pretrain_model(cfg: PretrainConfig, device: torch.device, groups=None):
    """The model of a run, in the order the architecture fixes: the full model from ``init`` (a Hugging
    Face directory) or from ``seed``; the kernel swap; tensor parallelism (``groups``, when tp > 1);
    activation checkpointing. Still fp32; DeepSpeed casts and shards it over the DP ranks. Under ZeRO-3
    without TP or ``init`` it is built already partitioned (:func:`build_partitioned_model`)."""
    from tanuki.fused import apply_kernels
    from tanuki.model import build_model

    if cfg.init:
        from tanuki.hf import import_hf

        model = import_hf(cfg.init, device=device, dtype=torch.float32)
    elif builds_partitioned(cfg, groups):
        model = build_partitioned_model(cfg, groups)
    else:
        model = build_model(cfg.model, device=device, seed=cfg.seed)
    model = apply_kernels(model, cfg.model.kernels, device=device)
    if groups is not None and groups.tp > 1:
        from tanuki.parallel.tensor_parallel import apply_tensor_parallel

        model = apply_tensor_parallel(model, groups, cfg.parallel.sp)
    from tanuki.parallel.tensor_parallel import universal_checkpoint_info

    # Saved by DeepSpeed into every checkpoint: how to join TP shards when resharding on load.
    model.universal_checkpoint_info = universal_checkpoint_info(name for name, _ in model.named_parameters())
    if cfg.train.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        model.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
    return model


def run(prep: Prepared, env: DistEnv, run_dir: Path, print_fn: Callable[[str], None] = print):
    """Train on the prepared config inside an initialised process group; returns the TrainResult."""

    from tanuki.data import DataLoader, build_pretrain_datasets
    from tanuki.info import flops_per_token
    from tanuki.metrics import MetricsLogger
    from tanuki.parallel.groups import build_process_groups
    from tanuki.parallel.reshard import needs_reshard
    from tanuki.parallel.zero import build_engine
    from tanuki.train import (
        RunSettings,
        Stage,
        check_resumable,
        find_resume_checkpoint,
        train_and_close,
        write_run_files,
    )

    cfg = prep.cfg
    tc = cfg.train
    # A checkpoint to resume from is checked before anything is built; one written on another TP/DP
    # shape needs an engine that loads DeepSpeed's universal checkpoint format.
    resume_from = find_resume_checkpoint(cfg.resume, run_dir / "checkpoints")
    load_universal = False
    if resume_from is not None:
        state = check_resumable(resume_from, to_dict(cfg), RESUME_KEYS, env, cfg.parallel)
        load_universal = needs_reshard(state, tp=cfg.parallel.tp, world_size=env.world_size)
    groups = build_process_groups(cfg.parallel.tp)
    dp_size, dp_rank = groups.dp, groups.dp_rank
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The Llama recipe has no dropout; any other randomness is seeded per data-parallel rank, so the
    # ranks of one TP group draw the same numbers.
    torch.manual_seed(cfg.seed + dp_rank)

    total_steps = tc.total_steps()
    valid_samples = tc.eval_iters * tc.micro_batch_size * dp_size
    data = build_pretrain_datasets(
        cfg.data, seq_len=tc.seq_len, train_samples=total_steps * tc.global_batch_size, valid_samples=valid_samples
    )
    loader = DataLoader(data.train, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                        pin_memory=device.type == "cuda")
    valid_batches = None
    if data.valid is not None and tc.eval_iters > 0:
        def valid_batches():
            return tp_broadcast(DataLoader(data.valid, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank,
                                           dp_size=dp_size))

    def tp_broadcast(inner):
        if groups.tp == 1:
            return inner
        from tanuki.parallel.tensor_parallel import TPBroadcastLoader

        return TPBroadcastLoader(inner, groups)

    loader = tp_broadcast(loader)
    from tanuki.fused import kernel_summary
    from tanuki.model import param_counts_formula

    counts = param_counts_formula(cfg.model)
    model = build_pretrain_model(cfg, device, groups)
    kernels = kernel_summary(model)
    bf16 = precision_is_bf16(tc.precision)
    engine, optimizer = build_engine(model, tc, cfg.parallel, dp_size=dp_size, bf16=bf16,
                                     mpu=groups if groups.tp > 1 else None, load_universal=load_universal)

    config = to_dict(cfg)
    logger = None
    if env.is_main:
        write_run_files(config, cfg.tokenizer.path, run_dir)
        logger = MetricsLogger(run_dir, wandb=cfg.logging.wandb, config=config, print_fn=print_fn)
        n = counts
        print_fn(
            f"pretraining {n.total:,} parameters ({n.non_embedding:,} non-embedding) on {env.world_size} rank(s) "
            f"[{env.launcher}] = tp {groups.tp}{' (sequence parallel)' if cfg.parallel.sp else ''} x dp {dp_size}, "
            f"ZeRO-{cfg.parallel.zero_stage}, {'bf16' if bf16 else 'fp32'}, {device.type}; "
            f"global batch {tc.global_batch_size} = {tc.micro_batch_size} x {dp_size} ranks x {prep.grad_accumulation} "
            f"accumulation; {total_steps} steps = {total_steps * tc.global_batch_size * tc.seq_len:,} tokens; "
            f"kernels {kernels}{'; built partitioned (zero.Init)' if builds_partitioned(cfg, groups) else ''}; "
            f"run dir {run_dir}"
        )
        if valid_batches is None:
            print_fn("no validation data (set data.valid_fraction or data.valid_prefixes to track validation loss)")

    on_finish = None
    if cfg.export.hf:
        out_dir = Path(cfg.export.dir) if cfg.export.dir else run_dir / "hf"

        def on_finish(checkpoint: Path) -> None:
            written = export_checkpoint(checkpoint, out_dir, dtype=cfg.export.dtype, tokenizer=str(run_dir / "tokenizer"))
            print_fn(f"exported the final checkpoint to {written}")

    stage = Stage(
        name="pretrain",
        model=model,
        step_fn=functools.partial(lm_step, z_loss=tc.z_loss, vocab_limit=prep.tokenizer_vocab,
                                  vocab_parallel=getattr(model, "vocab_parallel", None)),
        train_loader=loader,
        valid_batches=valid_batches,
        tokens_per_step=tc.global_batch_size * tc.seq_len,
        flops_per_token=flops_per_token(cfg.model, tc.seq_len),
        config=config,
        resume_keys=RESUME_KEYS,
        on_finish=on_finish,
    )
    return train_and_close(stage, RunSettings.from_config(cfg), env, run_dir, engine=engine, optimizer=optimizer,
                           logger=logger, print_fn=print_fn)


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, dtype: str = "bfloat16",
                      tokenizer: str | None = None, max_shard_size: str = "5GB", overwrite: bool = True) -> Path:
    """Consolidate a checkpoint's ZeRO shards on CPU and write a Hugging Face directory."""
    from tanuki.checkpoint import consolidate_checkpoint, resolve_checkpoint
    from tanuki.hf import export_hf

    ckpt = resolve_checkpoint(checkpoint)
    model_cfg, sd = consolidate_checkpoint(ckpt)
    if tokenizer is None:
        run_tok = ckpt.parent.parent / "tokenizer"
        tokenizer = str(run_tok) if run_tok.is_dir() else None
    return export_hf(sd, model_cfg, output, dtype=getattr(torch, dtype), max_shard_size=max_shard_size,
                     tokenizer_dir=tokenizer, overwrite=overwrite)


def stdout_and_log(run_dir: Path) -> Callable[[str], None]:
    """A print function that also appends to ``<run dir>/train.log`` (rank 0's progress log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the run)

    def emit(line: str, **_) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    emit.file = log  # type: ignore[attr-defined]
    return emit


def main(argv_cfg: PretrainConfig, env: DistEnv) -> int:
    """The body of ``launch/pretrain.py`` after Hydra: prepare, start the process group, train."""
    from tanuki.parallel.env import init_distributed, resolve_run_dir

    prep = prepare(argv_cfg, env)  # config and file errors surface here, before any process group
    init_distributed(env, "nccl" if torch.cuda.is_available() else "gloo")
    run_dir = resolve_run_dir(prep.cfg.run.dir, "pretrain", env).resolve()
    print_fn = stdout_and_log(run_dir) if env.is_main else (lambda *a, **k: None)
    result = run(prep, env, run_dir, print_fn=print_fn)
    if env.is_main:
        print_fn(f"done: step {result.step}, last checkpoint {result.last_checkpoint}")
    sys.stdout.flush()
    return 0
