"""The process groups of a run: tensor parallel (TP) inside a node, data parallel (DP) across.

Ranks are laid out TP-innermost: global rank ``r`` has ``tp_rank = r % tp`` and ``dp_rank = r // tp``,
so the ranks of one TP group are consecutive and, with ``tp`` dividing the GPUs per node, sit on one
node where the per-layer all-reduces run over NVLink. One :class:`ProcessGroups` object is built per
run and passed explicitly to whatever communicates (no module-level state); it also answers the
``mpu`` interface DeepSpeed asks for, so ZeRO shards over the DP group only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ProcessGroups:
    world_size: int
    rank: int
    tp: int
    #: torch process groups; ``None`` only in a world of one process without a process group
    tp_group: object
    dp_group: object
    #: global ranks of this rank's TP group, and of its DP group
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_src(self) -> int:
        """Global rank of TP rank 0 of this group (the one that reads data and broadcasts it)."""
        return self.tp_ranks[0]

    # -- DeepSpeed's ``mpu`` interface (also Megatron's names) ---------------------------------------
    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    # DeepSpeed >= 0.15 asks for these when it builds its own groups; no pipeline stages here.
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def build_process_groups(tp: int) -> ProcessGroups:
    """Split the default process group into TP and DP groups (every rank calls this, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the world size {world}")
    dp = world // tp
    tp_group = dp_group = None
    tp_ranks = dp_ranks = ()
    # new_group must be called by every rank for every group, in the same order.
    for d in range(dp):
        ranks = tuple(range(d * tp, (d + 1) * tp))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            tp_group, tp_ranks = group, ranks
    for t in range(tp):
        ranks = tuple(range(t, world, tp))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            dp_group, dp_ranks = group, ranks
    return ProcessGroups(world, rank, tp, tp_group, dp_group, tp_ranks, dp_ranks)
