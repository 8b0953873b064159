"""Direct preference optimisation (Rafailov et al. 2023) and its relatives on the shared loop.

A micro-batch holds ``b`` preference pairs as ``2b`` rows, chosen first, so one forward scores both.
The step function sums the log-probabilities of each completion (IPO: averages them per token), gets the
reference model's log-probabilities, and applies the loss of :func:`tanuki.losses.dpo_loss`.

The reference is the initial model, in one of two forms (``reference=``):

* ``model``: a frozen copy of ``init`` evaluated with the policy, wrapped by DeepSpeed with the same
  ZeRO stage (so under ZeRO-3 it is sharded like the policy); with LoRA it is the policy itself with its
  adapters switched off (no second copy);
* ``precompute``: before the first step, the policy — still equal to the reference — scores every
  training pair once; the log-probabilities are kept (and saved in the run directory for resumes), so
  no reference model is held during training: half the weights in memory.

Both give the same training run (tested).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerFast

from tanuki import stage as plumbing
from tanuki.build import build_frozen_engine, build_training_model
from tanuki.checkpoint import plan_resume
from tanuki.config import ConfigError, TrainConfig, to_dict
from tanuki.data.preference import PreferenceDataConfig, PreferenceDataLoader, build_preference_datasets
from tanuki.hf import import_hf
from tanuki.info import flops_per_token
from tanuki.lora import adapters_disabled, count_trainable_parameters
from tanuki.chunked_loss import has_chunked_head
from tanuki.losses import chosen_nll, dpo_loss, dpo_metrics, sequence_logps
from tanuki.parallel.env import DistEnv
from tanuki.parallel.zero import build_engine
from tanuki.sft import FineTuningConfig, PreparedFineTuning, export_hook, fine_tuning_train_config
from tanuki.tokenizer.jinja_template import resolve_template, template_label
from tanuki.tokenizer.templates import AUTO
from tanuki.train import Stage, StepOutput, train_and_close

RESUME_KEYS = ("init", "method", "lora", "template", "loss", "reference", "parallel.tp", "parallel.zero_stage")
REFERENCE_FILE = "reference_logps.pt"


@dataclass(frozen=True)
class LossConfig:
    """``loss``: which member of the DPO family, and its coefficients."""

    #: sigmoid (DPO) | ipo | hinge | robust
    type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    #: strength of the KL constraint to the reference
    beta: float = 0.1
    #: conservative DPO / robust DPO noise rate (sigmoid and robust only)
    label_smoothing: float = 0.0
    #: weight of an SFT term added to the loss (RPO): the mean NLL per chosen token of each micro-batch,
    #: as TRL computes it; 0 = off
    rpo_alpha: float = 0.0

    def __post_init__(self) -> None:
        if not (self.beta > 0):
            raise ConfigError("loss.beta", f"must be > 0, got {self.beta}")
        if not (0.0 <= self.label_smoothing < 0.5):
            raise ConfigError("loss.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.type in ("ipo", "hinge"):
            raise ConfigError("loss.label_smoothing", f"is not used by loss.type={self.type}; leave it 0")
        if self.rpo_alpha < 0:
            raise ConfigError("loss.rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")


@dataclass(frozen=True)
class DPOConfig(FineTuningConfig):
    """``conf/dpo.yaml``. ``init`` is the model to optimise (usually an SFT export) and also the reference."""

    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    #: model: a frozen copy of init (or the LoRA base) scored live | precompute: scored once before training
    reference: Literal["model", "precompute"] = "model"
    method: Literal["full", "lora"] = "full"
    train: TrainConfig = field(default_factory=lambda: fine_tuning_train_config(5e-7, 5e-8), kw_only=True)


def prepare(cfg: DPOConfig, env: DistEnv) -> PreparedFineTuning:
    """Checks needing files or the world size (before any process group)."""
    model, tok, grad_accumulation = plumbing.prepare_fine_tuning(cfg, env, "<pairs.jsonl>")
    return PreparedFineTuning(cfg, model, tok, grad_accumulation, resolve_template(cfg.template, tok))


def pair_logps(model, batch: dict[str, torch.Tensor], *, average: bool, vocab_limit, vocab_parallel):
    """Summed (or per-token averaged) completion log-probs of the ``2b`` rows, and their token counts."""
    kw = dict(average=average, vocab_limit=vocab_limit, vocab_parallel=vocab_parallel)
    if has_chunked_head(model):  # the head computes the log-probs a chunk at a time: no full logits
        return model(batch["tokens"], positions=batch["positions"], labels=batch["labels"],
                     head_kwargs=dict(logps=True, **kw))
    return sequence_logps(model(batch["tokens"], positions=batch["positions"]), batch["labels"], **kw)


def dpo_step(model, batch: dict[str, torch.Tensor], *, loss: LossConfig, reference: Callable, vocab_limit,
             vocab_parallel=None):
    """One micro-batch of pairs: policy log-probs, reference log-probs, the DPO loss and TRL's metrics."""
    average = loss.type == "ipo"
    ref = reference(batch)  # first: a LoRA reference runs the policy module itself, before its graph exists
    logps, n_tokens = pair_logps(model, batch, average=average, vocab_limit=vocab_limit, vocab_parallel=vocab_parallel)
    b = logps.shape[0] // 2
    ref = ref.to(logps)
    losses, _, _ = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=loss.beta, loss_type=loss.type,
                            label_smoothing=loss.label_smoothing)
    total = losses.mean()
    # IPO's loss takes per-token averages; the metrics under TRL's names are of summed log-probs (TRL
    # logs those for every loss type), so the averages are multiplied back by the completion lengths.
    sums, ref_sums = (logps * n_tokens, ref * n_tokens) if average else (logps, ref)
    if loss.rpo_alpha > 0:
        total = total + loss.rpo_alpha * chosen_nll(sums[:b], n_tokens[:b])
    stats = dpo_metrics(losses, sums[:b], sums[b:], ref_sums[:b], ref_sums[b:], beta=loss.beta)
    stats["loss"] = total.detach()
    return StepOutput(loss=total, stats=stats)


class LiveReference:
    """Reference log-probs from a frozen model (or from the LoRA policy with its adapters off)."""

    def __init__(self, model, *, average: bool, vocab_limit, vocab_parallel, lora_policy=None):
        self.model, self.average, self.vocab_limit, self.vocab_parallel = model, average, vocab_limit, vocab_parallel
        self.lora_policy = lora_policy

    @torch.no_grad()
    def __call__(self, batch):
        if self.lora_policy is not None:
            with adapters_disabled(self.lora_policy.module):
                logps, _ = pair_logps(self.lora_policy, batch, average=self.average, vocab_limit=self.vocab_limit,
                                      vocab_parallel=self.vocab_parallel)
            return logps
        logps, _ = pair_logps(self.model, batch, average=self.average, vocab_limit=self.vocab_limit,
                              vocab_parallel=self.vocab_parallel)
        return logps


class PrecomputedReference:
    """Reference log-probs looked up by pair index: ``table[pair, 0]`` chosen, ``table[pair, 1]`` rejected."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, batch):
        idx = batch["pair_index"].cpu()
        return torch.cat([self.table[idx, 0], self.table[idx, 1]]).to(batch["tokens"].device)


@torch.no_grad()
def precompute_reference(engine, dataset, *, micro_batch_size: int, dp_rank: int, dp_size: int, average: bool,
                         vocab_limit, vocab_parallel) -> torch.Tensor:
    """Score every pair of ``dataset`` once with ``engine`` (the untrained policy): ``(num_pairs, 2)``.

    Every rank runs the same number of forwards (the last partial step is filled and masked, which
    ZeRO-3's collective parameter gathers need); each pair is scored by one data-parallel rank and the
    slices are summed over the ranks (TP ranks of a group hold equal values and count once).
    """
    ordered = dataset.in_order()
    n = len(ordered.pairs)
    table = torch.zeros(n, 2, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.float64)
    engine.eval()
    loader = PreferenceDataLoader(ordered, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                  drop_last=False)
    for batch in loader:
        mask = batch["pair_mask"].bool()
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logps, _ = pair_logps(engine, batch, average=average, vocab_limit=vocab_limit, vocab_parallel=vocab_parallel)
        b = logps.shape[0] // 2
        idx = batch["pair_index"].cpu()[mask]
        table[idx, 0] = logps[:b].double().cpu()[mask]
        table[idx, 1] = logps[b:].double().cpu()[mask]
        seen[idx] = 1.0
    engine.train()
    if dist.is_initialized() and dist.get_world_size() > 1:
        stacked = torch.cat([table.flatten(), seen]).to(engine.device)
        dist.all_reduce(stacked)
        stacked = (stacked / (dist.get_world_size() // dp_size)).cpu()
        table, seen = stacked[: 2 * n].view(n, 2), stacked[2 * n:]
    if not bool((seen > 0).all()):
        raise RuntimeError(f"{int((seen == 0).sum())} pairs were not scored while precomputing the reference")
    return table.float()


def run(prep: PreparedFineTuning, env: DistEnv, run_dir: Path, print_fn: Callable[[str], None] = print):
    """Optimise preferences inside an initialised process group; returns the TrainResult."""
    cfg, tc = prep.cfg, prep.cfg.train
    config = {**to_dict(cfg), "model": to_dict(prep.model), "template": prep.template.name}
    resume = plan_resume(cfg.resume, run_dir, config, RESUME_KEYS, env, cfg.parallel)
    setup = plumbing.start_stage(cfg, env)
    groups, dp_size, dp_rank = setup.groups, setup.dp_size, setup.dp_rank

    tokenizer = PreTrainedTokenizerFast.from_pretrained(prep.tokenizer_dir)
    total_steps = tc.total_steps()
    data = build_preference_datasets(cfg.data, tokenizer, prep.template, tc.seq_len,
                                     min_pairs=total_steps * tc.global_batch_size)
    loader = PreferenceDataLoader(data.train, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    valid_batches = None
    if data.valid is not None and tc.eval_iters > 0:
        def valid_batches():
            return itertools.islice(PreferenceDataLoader(data.valid, micro_batch_size=tc.micro_batch_size,
                                                         dp_rank=dp_rank, dp_size=dp_size), tc.eval_iters)

    def build(frozen: bool):
        return build_training_model(prep.model, init=cfg.init, seed=cfg.seed, kernels=cfg.kernels, train=tc,
                                    parallel=cfg.parallel, groups=groups, device=setup.device, bf16=setup.bf16,
                                    lora=cfg.lora if cfg.method == "lora" and not frozen else None, frozen=frozen)

    model = build(frozen=False)
    trainable = count_trainable_parameters(model.module)
    engine, optimizer = build_engine(model.module, tc, cfg.parallel, dp_size=dp_size, bf16=setup.bf16, mpu=setup.mpu,
                                     load_universal=resume is not None and resume.universal)
    vocab = len(tokenizer)
    vp = model.vocab_parallel
    average = cfg.loss.type == "ipo"

    if cfg.reference == "precompute":
        ref_file = run_dir / REFERENCE_FILE
        if ref_file.is_file():
            table = torch.load(ref_file, weights_only=True)
        else:
            table = precompute_reference(engine, data.train, micro_batch_size=tc.micro_batch_size, dp_rank=dp_rank,
                                         dp_size=dp_size, average=average, vocab_limit=vocab, vocab_parallel=vp)
            if env.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                tmp = ref_file.with_name(ref_file.name + ".tmp")
                torch.save(table, tmp)
                tmp.replace(ref_file)
        reference = PrecomputedReference(table)
        if data.valid is not None:
            # validation pairs are scored live, by the policy still equal to the reference at this point
            valid_table = precompute_reference(engine, data.valid, micro_batch_size=tc.micro_batch_size,
                                               dp_rank=dp_rank, dp_size=dp_size, average=average, vocab_limit=vocab,
                                               vocab_parallel=vp)
            train_ref, valid_ref = reference, PrecomputedReference(valid_table)
            reference = _SplitReference(train_ref, valid_ref, engine)
    elif cfg.method == "lora":
        reference = LiveReference(None, average=average, vocab_limit=vocab, vocab_parallel=vp, lora_policy=engine)
    else:
        ref_engine = build_frozen_engine(build(frozen=True), tc, cfg.parallel, groups, setup.bf16)
        reference = LiveReference(ref_engine, average=average, vocab_limit=vocab, vocab_parallel=vp)

    logger = plumbing.open_run(
        cfg, env, config, prep.tokenizer_dir, run_dir, print_fn=print_fn,
        summary=f"DPO ({cfg.loss.type}, beta {cfg.loss.beta}, {cfg.method}, reference {cfg.reference}) of {cfg.init}: "
        f"{trainable:,} trainable parameters on {plumbing.describe_layout(setup, env, cfg)}; template "
        f"{template_label(prep.template)}; data: {data.summary()}; {total_steps} steps; run dir {run_dir}",
    )

    stage = Stage(
        name="dpo",
        step_fn=functools.partial(dpo_step, loss=cfg.loss, reference=reference, vocab_limit=vocab, vocab_parallel=vp),
        train_loader=loader,
        valid_batches=valid_batches,
        tokens_per_step=tc.global_batch_size * 2 * tc.seq_len,
        flops_per_token=flops_per_token(prep.model, tc.seq_len),
        config=config,
        on_finish=export_hook(cfg, prep.template, run_dir, print_fn),
        perplexity=False,
    )
    return train_and_close(stage, cfg, env, run_dir, engine=engine, optimizer=optimizer, logger=logger,
                           resume=resume, print_fn=print_fn)


class _SplitReference:
    """Precomputed reference log-probs for training pairs (``engine.training``) and validation pairs."""

    def __init__(self, train_ref, valid_ref, engine):
        self.train_ref, self.valid_ref, self.engine = train_ref, valid_ref, engine

    def __call__(self, batch):
        return (self.train_ref if self.engine.training else self.valid_ref)(batch)


def main(cfg: DPOConfig, env: DistEnv) -> int:
    """The body of ``launch/dpo.py`` after Hydra."""
    return plumbing.main(cfg, env, name="dpo", prepare=prepare, run=run)


@torch.no_grad()
def preference_accuracy(model_dir: str | Path, pairs_path: str | Path, *, template: str | None = None,
                        seq_len: int = 256, max_prompt_length: int | None = None, micro_batch_size: int = 8) -> dict:
    """How often a Hugging Face model gives its chosen completion a higher log-probability than the
    rejected one, over the pairs of a JSONL file (no reference involved): ``{"accuracy", "pairs"}``."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    name = resolve_template(template or AUTO, str(model_dir), tokenizer)
    data = build_preference_datasets(PreferenceDataConfig(path=str(pairs_path), max_prompt_length=max_prompt_length),
                                     tokenizer, name, seq_len)
    model = import_hf(model_dir).eval()
    wins = total = 0
    for batch in PreferenceDataLoader(data.train.in_order(), micro_batch_size=micro_batch_size, drop_last=False):
        logps, _ = pair_logps(model, batch, average=False, vocab_limit=len(tokenizer), vocab_parallel=None)
        b = logps.shape[0] // 2
        mask = batch["pair_mask"].bool()
        wins += int(((logps[:b] > logps[b:]) & mask).sum())
        total += int(mask.sum())
    return {"accuracy": wins / max(total, 1), "pairs": total}
