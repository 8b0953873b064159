"""Cross entropy over logits split by vocabulary across the tensor-parallel ranks.

Each rank holds the logits of its vocabulary slice ``[start, start + V_local)``. The full logits are
never gathered; three all-reduces over the TP group give what the softmax needs (Megatron-LM's
``vocab_parallel_cross_entropy``; Shoeybi et al. 2019, section 3):

    M      = max_v z_v                       (all-reduce MAX; subtracted for stability)
    S      = sum_v exp(z_v - M)              (all-reduce SUM)
    z_t    = the target's logit               (all-reduce SUM; zero on ranks that do not own it)
    ce     = log S + M - z_t,   lse = log S + M

Gradients: d ce / d z_v = softmax_v - [v = t] and d lse / d z_v = softmax_v, each computed on the local
slice. Columns at or beyond ``vocab_limit`` (the padding of the embedding to a multiple of 128 x TP)
are set to -inf, so they take no probability mass on any TP size; ignored labels give zero loss and
zero gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, vocab_limit, ignore_index, group):
        z = logits.float()
        local = z.shape[-1]
        if vocab_limit is not None and start + local > vocab_limit:
            z = z.clone()
            z[..., max(0, vocab_limit - start):] = float("-inf")
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = z - m.unsqueeze(-1)
        exp = shifted.exp()
        s = exp.sum(dim=-1)
        dist.all_reduce(s, group=group)

        valid = target != ignore_index
        t_local = target - start
        owned = valid & (t_local >= 0) & (t_local < local)
        idx = torch.where(owned, t_local, torch.zeros_like(t_local))
        zt = torch.where(owned, torch.gather(shifted, -1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(m))
        dist.all_reduce(zt, group=group)

        log_s = s.log()
        ce = torch.where(valid, log_s - zt, torch.zeros_like(log_s))
        lse = log_s + m
        softmax = exp / s.unsqueeze(-1)
        ctx.save_for_backward(softmax, idx, owned, valid)
        ctx.in_dtype = logits.dtype
        return ce, lse

    @staticmethod
    def backward(ctx, grad_ce, grad_lse):
        softmax, idx, owned, valid = ctx.saved_tensors
        g_ce = grad_ce * valid
        grad = softmax * (g_ce + grad_lse).unsqueeze(-1)
        grad.scatter_add_(-1, idx.unsqueeze(-1), -(g_ce * owned).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    start: int,
    group,
    vocab_limit: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(cross entropy, log-sum-exp)`` of ``target`` under logits split by vocabulary.

    ``logits`` is this rank's ``(..., V_local)`` slice starting at global column ``start``; ``target``
    holds global ids. Cross entropy is 0 where ``target == ignore_index``.
    """
    return _VocabParallelCE.apply(logits, target, start, vocab_limit, ignore_index, group)
