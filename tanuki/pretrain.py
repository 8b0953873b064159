"""Pretraining: next-token prediction on packed windows of the tokenized corpus.

:func:`prepare` checks everything that can be checked from the config and the files (the tokenizer,
the data prefixes, the batch geometry against the number of ranks, an ``init`` model) before any
process group starts; :func:`run` then builds the model and the engine in the order the architecture
fixes (:func:`tanuki.build.build_training_model`, then the ZeRO engine) and calls the shared loop.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tanuki import stage as plumbing
from tanuki.build import build_training_model
from tanuki.checkpoint import consolidate_checkpoint, plan_resume, resolve_checkpoint
from tanuki.config import ConfigError, PretrainConfig, pad_vocab_size, to_dict
from tanuki.data import DataLoader, build_pretrain_datasets
from tanuki.data.blend import open_prefix
from tanuki.data.indexed import token_id_range
from tanuki.data.preprocess import check_bos_convention
from tanuki.fileio import check_output_dir
from tanuki.fused import kernel_summary
from tanuki.hf import export_hf, training_vocab_size
from tanuki.info import flops_per_token
from tanuki.chunked_loss import has_chunked_head
from tanuki.losses import LossOutput, causal_lm_loss
from tanuki.model import moe_losses, param_counts_formula
from tanuki.parallel.env import DistEnv
from tanuki.parallel.tensor_parallel import TPBroadcastLoader
from tanuki.parallel.zero import build_engine
from tanuki.train import Stage, StepOutput, train_and_close

#: checkpoint settings a resumed run must share with the run that wrote the checkpoint
#: (a different parallel.tp or number of ranks is resharded on load: tanuki.parallel.reshard)
RESUME_KEYS = ("model", "parallel.zero_stage", "train.seq_len")


@dataclass
class Prepared:
    cfg: PretrainConfig
    #: tokens in the tokenizer (<= model.vocab_size, which is padded)
    tokenizer_vocab: int
    grad_accumulation: int


def prepare(cfg: PretrainConfig, env: DistEnv) -> Prepared:
    """Checks that need files or the world size; raise ConfigError naming the key. No process group."""
    if cfg.init:
        # The architecture comes from the checkpoint; the kernel choice stays the user's. A trimmed export's
        # vocabulary is padded back to a multiple of 128 x tp (zero rows, kept out of the loss by vocab_limit).
        model = plumbing.model_config_from_init(cfg.init, cfg.model.kernels)
        cfg = dataclasses.replace(cfg, model=training_vocab_size(model, cfg.parallel.tp))
    if not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path", "is required: the tokenizer directory the data was encoded with")
    vocab = plumbing.tokenizer_vocab_size(cfg.tokenizer.path)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} rows cannot hold the {vocab} tokens of {cfg.tokenizer.path}; "
            f"set model.vocab_size={pad_vocab_size(vocab, tp=cfg.parallel.tp)}",
        )
    if not cfg.data.prefixes:
        raise ConfigError("data.prefixes", "is required: data.prefixes=[PREFIX,...] (from launch/preprocess.py)")
    for key, prefixes in (("data.prefixes", cfg.data.prefixes), ("data.valid_prefixes", cfg.data.valid_prefixes)):
        for i, prefix in enumerate(prefixes):
            open_prefix(prefix, f"{key}[{i}]")
            check_token_ids(prefix, f"{key}[{i}]", vocab, cfg.tokenizer.path)
    # the BOS convention of the datasets (their PREFIX.json), against each other and the tokenizer
    for message in check_bos_convention([*cfg.data.prefixes, *cfg.data.valid_prefixes], cfg.tokenizer.path):
        warnings.warn(message, stacklevel=2)
    return Prepared(cfg, vocab, plumbing.check_layout(cfg, env))


def check_token_ids(prefix: str, key: str, vocab: int, tokenizer: str) -> None:
    """Every token id of ``prefix`` is an id of the tokenizer (and so a row of the embedding): a dataset
    encoded with another tokenizer would otherwise fail at the first forward with a bare IndexError,
    or silently train on padding rows."""
    lo, hi = token_id_range(prefix)
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ConfigError(
            key,
            f"the dataset '{prefix}' holds token id {bad}, but the tokenizer {tokenizer} has {vocab} ids "
            f"(0..{vocab - 1}): it was encoded with another tokenizer; re-run launch/preprocess.py with "
            f"tokenizer={tokenizer}, or give the tokenizer it was made with",
        )


def lm_step(model, batch: dict[str, torch.Tensor], *, z_loss: float, vocab_limit: int | None = None,
            vocab_parallel=None):
    """One micro-batch of next-token prediction: input ``tokens[:, :-1]``, labels ``tokens[:, 1:]``.

    ``vocab_limit`` (the tokenizer's size) keeps the padding rows of the embedding out of the softmax;
    ``vocab_parallel`` says which vocabulary slice this rank's logits are under tensor parallelism.
    """
    tokens = batch["tokens"]
    kw = dict(z_loss=z_loss, vocab_limit=vocab_limit, vocab_parallel=vocab_parallel)
    if has_chunked_head(model):  # the head computes the loss a chunk at a time: no full logits
        out = LossOutput(*model(tokens[:, :-1], labels=tokens[:, 1:], head_kwargs=kw))
    else:
        out = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:], **kw)
    stats = {"loss": out.ce}
    if z_loss > 0:
        stats["z_loss"] = out.z
    router_loss, router_stats = moe_losses(model)  # (0, {}) for a dense model
    stats.update(router_stats)
    return StepOutput(loss=out.loss + router_loss, stats=stats)


def run(prep: Prepared, env: DistEnv, run_dir: Path, print_fn: Callable[[str], None] = print):
    """Train on the prepared config inside an initialised process group; returns the TrainResult."""
    cfg = prep.cfg
    tc = cfg.train
    config = to_dict(cfg)
    # Checked before anything is built: a checkpoint written on another TP/DP shape needs an engine
    # that loads DeepSpeed's universal checkpoint format.
    resume = plan_resume(cfg.resume, run_dir, config, RESUME_KEYS, env, cfg.parallel)
    setup = plumbing.start_stage(cfg, env)
    groups, dp_size, dp_rank = setup.groups, setup.dp_size, setup.dp_rank

    total_steps = tc.total_steps()
    valid_samples = tc.eval_iters * tc.micro_batch_size * dp_size
    data = build_pretrain_datasets(
        cfg.data, seq_len=tc.seq_len, train_samples=total_steps * tc.global_batch_size, valid_samples=valid_samples
    )

    def tp_broadcast(inner):
        return inner if groups.tp == 1 else TPBroadcastLoader(inner, groups)

    loader = tp_broadcast(DataLoader(data.train, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank,
                                     dp_size=dp_size, pin_memory=setup.device.type == "cuda"))
    valid_batches = None
    if data.valid is not None and tc.eval_iters > 0:
        def valid_batches():
            return tp_broadcast(DataLoader(data.valid, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank,
                                           dp_size=dp_size))

    counts = param_counts_formula(cfg.model)
    model = build_training_model(cfg.model, init=cfg.init, seed=cfg.seed, kernels=cfg.model.kernels, train=tc,
                                 parallel=cfg.parallel, groups=groups, device=setup.device, bf16=setup.bf16)
    engine, optimizer = build_engine(model.module, tc, cfg.parallel, dp_size=dp_size, bf16=setup.bf16, mpu=setup.mpu,
                                     load_universal=resume is not None and resume.universal)
    logger = plumbing.open_run(
        cfg, env, config, cfg.tokenizer.path, run_dir, print_fn=print_fn,
        summary=f"pretraining {counts.total:,} parameters ({counts.non_embedding:,} non-embedding) on "
        f"{plumbing.describe_layout(setup, env, cfg)}, {setup.device.type}; "
        f"global batch {tc.global_batch_size} = {tc.micro_batch_size} x {dp_size} ranks x {prep.grad_accumulation} "
        f"accumulation; {total_steps} steps = {total_steps * tc.global_batch_size * tc.seq_len:,} tokens; "
        f"kernels {kernel_summary(model.module)}{'; built partitioned (zero.Init)' if model.partitioned else ''}; "
        f"run dir {run_dir}",
    )
    if env.is_main and valid_batches is None:
        print_fn("no validation data (set data.valid_fraction or data.valid_prefixes to track validation loss)")

    on_finish = None
    if cfg.export.hf:
        out_dir = Path(cfg.export.dir) if cfg.export.dir else run_dir / "hf"
        try:  # checked now, not after training: the export replaces only an earlier export
            check_output_dir(out_dir, overwrite=True)
        except FileExistsError as e:
            raise ConfigError("export.dir", str(e)) from None

        def on_finish(checkpoint: Path) -> None:
            written = export_checkpoint(checkpoint, out_dir, dtype=cfg.export.dtype, tokenizer=str(run_dir / "tokenizer"),
                                        vocab=cfg.export.vocab)
            print_fn(f"exported the final checkpoint to {written}")

    stage = Stage(
        name="pretrain",
        step_fn=functools.partial(lm_step, z_loss=tc.z_loss, vocab_limit=prep.tokenizer_vocab,
                                  vocab_parallel=model.vocab_parallel),
        train_loader=loader,
        valid_batches=valid_batches,
        tokens_per_step=tc.global_batch_size * tc.seq_len,
        flops_per_token=flops_per_token(cfg.model, tc.seq_len),
        config=config,
        on_finish=on_finish,
    )
    return train_and_close(stage, cfg, env, run_dir, engine=engine, optimizer=optimizer, logger=logger,
                           resume=resume, print_fn=print_fn)


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, dtype: str = "bfloat16",
                      tokenizer: str | None = None, max_shard_size: str = "5GB", overwrite: bool = True,
                      vocab: str = "trim", log: Callable[[str], None] = print) -> Path:
    """Consolidate a checkpoint's ZeRO shards on CPU and write a Hugging Face directory (``vocab``: see
    :func:`tanuki.hf.export_hf`). ``log`` is told when a run's newest checkpoint directories were passed
    over as incomplete."""
    check_output_dir(output, overwrite)  # before the consolidation, which may take long
    ckpt = resolve_checkpoint(checkpoint, note=log)
    model_cfg, sd = consolidate_checkpoint(ckpt)
    if tokenizer is None:
        run_tok = ckpt.parent.parent / "tokenizer"
        tokenizer = str(run_tok) if run_tok.is_dir() else None
    return export_hf(sd, model_cfg, output, dtype=getattr(torch, dtype), max_shard_size=max_shard_size,
                     tokenizer_dir=tokenizer, overwrite=overwrite, vocab=vocab)


def main(cfg: PretrainConfig, env: DistEnv) -> int:
    """The body of ``launch/pretrain.py`` after Hydra: prepare, start the process group, train."""
    return plumbing.main(cfg, env, name="pretrain", prepare=prepare, run=run)
