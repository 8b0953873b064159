"""The one place that builds a training model, for every stage and for the DPO reference.

The order is fixed and written once, in :func:`build_training_model`:

    import ``init`` (a Hugging Face directory) or build from ``seed``  (ZeRO-3 without TP: partitioned
    as it is created, inside ``deepspeed.zero.Init``)
      -> kernel swap (Triton modules where their op matches)
      -> LoRA adapters (before sharding: adapters of a TP model are not supported)
      -> tensor parallelism (shard by parameter name, TP regions, vocabulary-parallel embedding)
      -> the chunked output head (``train.loss_chunk_size``: the loss without the full logits)
      -> frozen (the DPO reference) or activation checkpointing
      -> the facts DeepSpeed reads from the module (``universal_checkpoint_info``)

The model stays fp32 here; DeepSpeed casts it and shards it over the data-parallel ranks when the
engine is built. What the stages need besides the module comes back in a :class:`TrainingModel`, not
as attributes on the module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tanuki.chunked_loss import use_chunked_head
from tanuki.config import ModelConfig, ParallelConfig, TrainConfig
from tanuki.fused import apply_kernels
from tanuki.hf import import_hf
from tanuki.lora import LoraConfig, apply_lora
from tanuki.model import Transformer, build_model
from tanuki.losses import VocabParallel
from tanuki.parallel.groups import ProcessGroups
from tanuki.parallel.tensor_parallel import apply_tensor_parallel, universal_checkpoint_info, vocab_parallel_slice
from tanuki.parallel.zero import deepspeed_config, safe_checkpoint_engine


@dataclass
class TrainingModel:
    """A built model and what the stage needs to train it."""

    module: nn.Module
    #: this rank's vocabulary slice of the logits under tensor parallelism (for the loss); None at tp=1
    vocab_parallel: Optional[VocabParallel]
    #: built partitioned over the ranks by ``deepspeed.zero.Init`` (no rank ever held it whole)
    partitioned: bool
    #: layers recompute their activations in backward (``train.activation_checkpointing``)
    checkpointing: bool


def builds_partitioned(parallel: ParallelConfig, init: Optional[str]) -> bool:
    """Whether the model is built partitioned over the ranks (``deepspeed.zero.Init``) rather than whole
    on every rank: ZeRO-3 without TP, from ``seed``. With TP > 1 the TP rewrite needs whole modules to
    slice, and ``init`` loads whole Hugging Face tensors, so both keep building the full fp32 model
    (DeepSpeed partitions it in ``deepspeed.initialize``)."""
    return parallel.zero_stage == 3 and parallel.tp == 1 and not init


def build_partitioned_model(model_cfg: ModelConfig, *, seed: int, train: TrainConfig, parallel: ParallelConfig,
                            dp_size: int, bf16: bool) -> Transformer:
    """``build_model(model_cfg, seed=seed)``'s values, but each parameter partitioned over the ranks as it
    is created, so no rank ever holds the whole fp32 model."""
    # deepspeed is imported here only: it takes seconds to import and only this path needs it.
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ds_config = deepspeed_config(train, parallel, dp_size=dp_size, bf16=bf16)
    # As deepspeed.initialize does later: DeepSpeed's comm wraps the process group tanuki made, so the
    # config zero.Init parses sees the real world size.
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)
    # dtype=None: the parameters take the dtype the engine would cast them to (bf16 or fp32, from the
    # config), as the whole-model path's values do; the init is drawn in fp32 and rounded on copy, like
    # that cast. (An explicit dtype=torch.float32 is turned into bf16 on accelerators without fp16, e.g.
    # DeepSpeed's CPU accelerator, and a bf16 engine does not cast zero.Init parameters.)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None):
        model = Transformer(model_cfg)
    model.init_weights(seed, gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    return model


def build_training_model(
    model_cfg: ModelConfig,
    *,
    init: Optional[str],
    seed: int,
    kernels: str,
    train: TrainConfig,
    parallel: ParallelConfig,
    groups: ProcessGroups,
    device: torch.device,
    bf16: bool,
    lora: Optional[LoraConfig] = None,
    frozen: bool = False,
) -> TrainingModel:
    """The model of a run in the order of the module docstring.

    ``init``: a Hugging Face directory to load (its architecture is ``model_cfg``), else the model is
    initialised from ``seed``. ``lora``: add adapters (initialised from ``seed``) and freeze the rest.
    ``frozen``: no parameter trains (the DPO reference) and no activation checkpointing.
    """
    partitioned = builds_partitioned(parallel, init) and groups.tp == 1
    if init:
        # the rows model_cfg pads a trimmed export to (zero, masked by the stage's vocab_limit)
        module = import_hf(init, device=device, dtype=torch.float32, vocab_size=model_cfg.vocab_size)
    elif partitioned:
        module = build_partitioned_model(model_cfg, seed=seed, train=train, parallel=parallel, dp_size=groups.dp,
                                         bf16=bf16)
    else:
        module = build_model(model_cfg, device=device, seed=seed)
    module = apply_kernels(module, kernels, device=device)
    if lora is not None:
        module = apply_lora(module, lora, seed=seed)
    if groups.tp > 1:
        module = apply_tensor_parallel(module, groups, parallel.sp)
    if train.loss_chunk_size > 0:
        # the head computes the loss a chunk of tokens at a time when given labels (after TP: its hooks stay)
        use_chunked_head(module.head, train.loss_chunk_size)
    checkpointing = train.activation_checkpointing and not frozen
    if frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    elif checkpointing:
        module.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
    # Saved by DeepSpeed into every checkpoint: how to join TP shards when resharding on load.
    module.universal_checkpoint_info = universal_checkpoint_info(name for name, _ in module.named_parameters())
    return TrainingModel(module=module, vocab_parallel=vocab_parallel_slice(module, groups), partitioned=partitioned,
                         checkpointing=checkpointing)


def build_frozen_engine(model: TrainingModel, train: TrainConfig, parallel: ParallelConfig, groups: ProcessGroups,
                        bf16: bool):
    """A frozen model (``build_training_model(..., frozen=True)``) wrapped by DeepSpeed with the stage's ZeRO
    stage, so that under ZeRO-3 it is sharded like the policy; in eval mode."""
    import deepspeed  # heavy; see build_partitioned_model

    config = deepspeed_config(train, parallel, dp_size=groups.dp, bf16=bf16)
    config.pop("gradient_clipping", None)
    engine, *_ = deepspeed.initialize(model=model.module, config=config, mpu=groups if groups.tp > 1 else None,
                                      dist_init_required=False)
    safe_checkpoint_engine(engine)
    engine.eval()
    return engine
