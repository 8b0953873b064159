"""Megatron-style tensor (and sequence) parallelism applied to a built :class:`tanuki.model.Transformer`.

The model file has no distributed code. :func:`apply_tensor_parallel` rewrites a built model in place
from :data:`TP_PLAN`, keyed by parameter name:

* ``attn.wq/wk/wv``, ``mlp.w_gate/w_up``: column-parallel (output rows split; attention by heads, the
  kv heads split too, so grouped-query attention stays grouped on every rank);
* ``attn.wo``, ``mlp.w_down``: row-parallel (input columns split; the outputs are partial sums);
* ``embed``: vocab-parallel (each rank looks up its own rows, the partial embeddings are summed);
* ``head``: vocab-parallel output (each rank computes its vocabulary slice of the logits, which the
  loss consumes without gathering: :mod:`tanuki.parallel.cross_entropy`);
* norm gains: replicated;
* q/k/v biases (Qwen2): split with their projection's rows;
* per-head q/k norms: a gain shared by the heads (Qwen3, ``attn.q_norm``) is replicated, and since each
  rank applies it to its own heads, its gradient is a partial sum that is all-reduced over the TP group;
  a gain per head (Command R+, ``attn.q_head_norm``, (heads, head_dim)) is split with the heads;
* a tied embedding and head (``tie_embeddings``) is one vocab-parallel parameter, sharded once.

Cohere's parallel block (``y = norm(x); x + attn(y) + mlp(y)``) is one TP region around
``Block.parallel_branches``: its input passes through f once and the sum ``attn(y) + mlp(y)`` of partial
outputs through g once, one all-reduce (or one all-gather / reduce-scatter pair with SP) per block,
where the sequential block has two.

Attention, the MLP and the head become TP regions through forward hooks: their input passes through f
(:func:`~tanuki.parallel.comm.copy_to_tp`, or the sequence all-gather with SP), their output through g
(all-reduce, or reduce-scatter to sequence shards with SP). Hooks keep parameter names, so checkpoints
and the Hugging Face mapping are unchanged, and they compose with the Triton module swap.

With sequence parallelism, everything outside the TP regions (norms, residual adds) runs on ``T / tp``
positions per rank, and the replicated norm gains see only their rank's positions: their gradients are
all-reduced over the TP group by a gradient hook.

Weights are sharded from the full tensors, so initialising the full model from one seed and then
applying TP gives every TP size the same model (the parity tests rely on it).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tanuki.losses import VocabParallel
from tanuki.parallel.comm import (
    copy_to_tp,
    gather_from_sequence,
    reduce_from_tp,
    reduce_scatter_to_sequence,
)
from tanuki.parallel.groups import ProcessGroups

COLUMN, ROW = 0, 1

#: parameter-name suffix -> the dimension it is split on across TP ranks (absent: replicated)
TP_PLAN: dict[str, int] = {
    "embed.weight": COLUMN,  # vocabulary rows
    "attn.wq.weight": COLUMN,
    "attn.wk.weight": COLUMN,
    "attn.wv.weight": COLUMN,
    "attn.wq.bias": COLUMN,
    "attn.wk.bias": COLUMN,
    "attn.wv.bias": COLUMN,
    "attn.q_head_norm.weight": COLUMN,  # (heads, head_dim): split by heads
    "attn.k_head_norm.weight": COLUMN,
    "attn.wo.weight": ROW,
    "mlp.w_gate.weight": COLUMN,
    "mlp.w_up.weight": COLUMN,
    "mlp.w_down.weight": ROW,
    "head.weight": COLUMN,  # vocabulary rows
}


#: replicated parameters used inside a TP region on each rank's heads only: their gradients are partial
#: sums over the heads, all-reduced over the TP group with or without sequence parallelism
HEAD_SHARED = ("attn.q_norm.weight", "attn.k_norm.weight")


def split_dim(name: str) -> int | None:
    """The dimension parameter ``name`` is split on under TP, or None if it is replicated."""
    for suffix, dim in TP_PLAN.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def shard_tensor(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    dim = split_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of {tuple(full.shape)} does not split over tp={tp}")
    return full.chunk(tp, dim=dim)[rank]


def shard_state_dict(state_dict: dict[str, torch.Tensor], tp: int, rank: int) -> dict[str, torch.Tensor]:
    """TP rank ``rank``'s slice of a full state dict."""
    return {k: shard_tensor(k, v, tp, rank).clone() for k, v in state_dict.items()}


def universal_checkpoint_info(param_names) -> dict:
    """How the TP shards of each parameter join, in the form DeepSpeed's universal checkpoint
    conversion reads from ``model.universal_checkpoint_info`` (saved into every checkpoint).

    ``ds_to_universal`` concatenates the TP slices of a parameter along dim 0 unless a pattern says
    otherwise: row-parallel weights along dim 1, replicated ones (norm gains) taken from TP rank 0.
    Patterns are anchored regular expressions with the layer index generalised, one per kind of
    parameter present (DeepSpeed's strict mode rejects patterns that match nothing).
    See ``deepspeed/checkpoint/ds_to_universal.py`` (``merge_tp_slices``) and ``constants.py``.
    """
    # deepspeed stays lazy: it is slow to import, and this module serves runs and tools without it
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    def pattern(name: str) -> str:
        return re.sub(r"\\.\d+\\.", r"\\.\\d+\\.", re.escape(name)) + "$"

    row, replicated = set(), set()
    for name in param_names:
        dim = split_dim(name)
        if dim is None:
            replicated.add(pattern(name))
        elif dim == ROW:
            row.add(pattern(name))
    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: sorted(replicated),
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: sorted(row),
    }


def merge_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full state dict from every TP rank's state dict, in TP-rank order."""
    merged = {}
    for name in shards[0]:
        dim = split_dim(name)
        if dim is None:
            merged[name] = shards[0][name]
        else:
            merged[name] = torch.cat([s[name] for s in shards], dim=dim)
    return merged


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding rows ``[vocab_start, vocab_start + num_embeddings)`` of the vocabulary."""

    vocab_start: int
    groups: ProcessGroups
    sequence_parallel: bool

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.groups.tp_group)
        return reduce_from_tp(out, self.groups.tp_group)


def _enter_hook(group, sp: bool):
    def hook(module, args):
        x = gather_from_sequence(args[0], group) if sp else copy_to_tp(args[0], group)
        return (x, *args[1:])

    return hook


def _exit_hook(group, sp: bool):
    def hook(module, args, out):
        return reduce_scatter_to_sequence(out, group) if sp else reduce_from_tp(out, group)

    return hook


def _parallel_region(branches, group, sp: bool):
    """``branches`` (a parallel block's ``attn(y) + mlp(y)``) as one TP region: f on the way in, g on
    the sum of the two partial outputs."""

    def region(y, *args, **kwargs):
        y = gather_from_sequence(y, group) if sp else copy_to_tp(y, group)
        out = branches(y, *args, **kwargs)
        return reduce_scatter_to_sequence(out, group) if sp else reduce_from_tp(out, group)

    return region


def _all_reduce_grad_hook(group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def apply_tensor_parallel(model: nn.Module, groups: ProcessGroups, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (a full :class:`~tanuki.model.Transformer`) for this rank's TP group, in place.

    Call it after building (and initialising or loading) the full model and after the kernel swap,
    before activation checkpointing and DeepSpeed (:func:`tanuki.build.build_training_model` does). The
    loss needs this rank's vocabulary slice: :func:`vocab_parallel_slice`. Sharded parameters get
    ``tensor_model_parallel = True`` and ``partition_dim``, the attributes DeepSpeed's gradient-norm
    computation uses to count each shard once.
    """
    tp, rank, group = groups.tp, groups.tp_rank, groups.tp_group
    cfg = model.cfg
    if getattr(cfg, "n_experts", 0) and tp > 1:
        raise ValueError("tensor parallelism of MoE layers is not supported (model.n_experts > 0): use tp=1")
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        if getattr(cfg, key) % tp:
            raise ValueError(f"model.{key}={getattr(cfg, key)} is not divisible by tp={tp}")
    if tp == 1:
        return model

    shards: dict[int, nn.Parameter] = {}  # a parameter shared by two modules (tied head) is sharded once
    hooked: set[int] = set()
    for name, module in list(model.named_modules()):
        for pname, param in list(module.named_parameters(recurse=False)):
            full_name = f"{name}.{pname}" if name else pname
            dim = split_dim(full_name)
            if dim is None:
                partial = full_name.endswith(HEAD_SHARED)
                if (sequence_parallel or partial) and id(param) not in hooked:
                    hooked.add(id(param))
                    param.register_hook(_all_reduce_grad_hook(group))
                    param.sequence_parallel = True
                continue
            if id(param) not in shards:
                shard = nn.Parameter(shard_tensor(full_name, param.detach(), tp, rank).clone(),
                                     requires_grad=param.requires_grad)
                shard.tensor_model_parallel = True
                shard.partition_dim = dim
                shard.partition_stride = 1
                shards[id(param)] = shard
            setattr(module, pname, shards[id(param)])
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape

    # The vocabulary-parallel embedding.
    embed = model.embed
    local_rows = embed.weight.shape[0]
    new = VocabParallelEmbedding.__new__(VocabParallelEmbedding)
    new.__dict__.update(embed.__dict__)
    new.__dict__["_parameters"] = dict(embed._parameters)
    new.num_embeddings = local_rows
    new.vocab_start = rank * local_rows
    new.groups = groups
    new.sequence_parallel = sequence_parallel
    model.embed = new

    # TP regions: attention and MLP of every block, and the output head.
    for block in model.layers:
        if getattr(block, "parallel", False):
            block.parallel_branches = _parallel_region(block.parallel_branches, group, sequence_parallel)
            continue
        for region in (block.attn, block.mlp):
            region.register_forward_pre_hook(_enter_hook(group, sequence_parallel))
            region.register_forward_hook(_exit_hook(group, sequence_parallel))
    model.head.register_forward_pre_hook(_enter_hook(group, sequence_parallel))
    return model


def vocab_parallel_slice(model: nn.Module, groups: ProcessGroups) -> VocabParallel | None:
    """The vocabulary slice of this rank's logits of a model sharded by :func:`apply_tensor_parallel`
    (what the vocabulary-parallel loss needs); None without tensor parallelism."""
    if groups.tp == 1:
        return None
    return VocabParallel(group=groups.tp_group, start=groups.tp_rank * model.head.weight.shape[0])


class TPBroadcastLoader:
    """The micro-batches of a TP group, read once by its TP rank 0 and broadcast to the others.

    Every TP rank of a data-parallel rank needs the same tokens. The inner loader of each rank is
    created with the same DP rank, so all of them agree on the position (``consumed_samples``) that
    checkpoints store, but only TP rank 0 reads from disk.
    """

    def __init__(self, inner, groups: ProcessGroups):
        self.inner, self.groups = inner, groups

    def __iter__(self):
        inner = self.inner
        shape = (inner.micro_batch_size, inner.dataset.seq_len + 1)
        source = iter(inner) if self.groups.tp_rank == 0 else None
        while inner.consumed_samples + inner.samples_per_micro_step <= len(inner.dataset):
            if source is not None:
                tokens = next(source)["tokens"]
            else:
                tokens = torch.empty(shape, dtype=torch.int64)
                inner.consumed_samples += inner.samples_per_micro_step
            dist.broadcast(tokens, src=self.groups.tp_src, group=self.groups.tp_group)
            yield {"tokens": tokens}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
