"""Communication around the tensor-parallel regions, as autograd functions (Megatron-LM's f and g).

Entering a TP region (the input of attention, the MLP and the output head):

* without sequence parallelism, every TP rank holds the full activation; the forward is the identity
  and the backward all-reduces the input gradient (each rank computed the part of it that flows
  through its own heads / columns): :func:`copy_to_tp`.
* with sequence parallelism, each rank holds ``T / tp`` positions; the forward all-gathers them along
  the sequence and the backward reduce-scatters the gradient: :func:`gather_from_sequence`.

Leaving a TP region (after the row-parallel projection or the vocab-parallel embedding, whose outputs
are partial sums over the ranks):

* without SP, all-reduce forward, identity backward: :func:`reduce_from_tp`;
* with SP, reduce-scatter along the sequence forward, all-gather backward: :func:`reduce_scatter_to_sequence`.

(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", figure 5.)
The sequence is dimension 1 of ``(batch, seq, hidden)`` activations.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

SEQ_DIM = 1


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world, rank = _world(group), dist.get_rank(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {world} tensor-parallel ranks")
    if dist.get_backend(group) == "nccl":
        chunks = [c.contiguous() for c in x.chunk(world, dim=dim)]
        out = torch.empty_like(chunks[rank])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    # gloo has no reduce-scatter: all-reduce and keep this rank's chunk (same result, more traffic).
    return _all_reduce(x, group).chunk(world, dim=dim)[rank].contiguous()


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world, rank = _world(group), dist.get_rank(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {world} tensor-parallel ranks")
    return x.chunk(world, dim=dim)[rank].contiguous()


def _region_function(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """The autograd function (class ``name``) computing ``forward(x, group)``, whose input gradient is
    ``backward(grad, group)`` (the group gets none)."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# The collectives are looked up when called (benchmarks/tp_comm_bench.py replaces _reduce_scatter to count it).
_CopyToTP = _region_function("_CopyToTP", lambda x, g: x.view_as(x), lambda grad, g: _all_reduce(grad, g))
_ReduceFromTP = _region_function("_ReduceFromTP", lambda x, g: _all_reduce(x, g), lambda grad, g: grad)
_GatherFromSequence = _region_function(
    "_GatherFromSequence", lambda x, g: _all_gather(x, g, SEQ_DIM), lambda grad, g: _reduce_scatter(grad, g, SEQ_DIM)
)
_ReduceScatterToSequence = _region_function(
    "_ReduceScatterToSequence", lambda x, g: _reduce_scatter(x, g, SEQ_DIM), lambda grad, g: _all_gather(grad, g, SEQ_DIM)
)
_ScatterToSequence = _region_function(
    "_ScatterToSequence", lambda x, g: _split(x, g, SEQ_DIM), lambda grad, g: _all_gather(grad, g, SEQ_DIM)
)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """f: identity forward, all-reduce backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """g: all-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """SP's f: all-gather along the sequence forward, reduce-scatter backward."""
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """SP's g: reduce-scatter along the sequence forward, all-gather backward."""
    return _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's sequence chunk forward, all-gather backward (for replicated inputs)."""
    return _ScatterToSequence.apply(x, group)
