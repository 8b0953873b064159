"""The output head and its loss, a chunk of tokens at a time: the ``(tokens, vocab)`` logits never exist.

With activation checkpointing the head and the loss dominate a step's memory: ``model.head(h)`` and
:func:`tanuki.losses.causal_lm_loss` keep bf16 logits, their fp32 copy and the fp32 softmax and
gradients of every token over the whole vocabulary (the planner counts 10 bytes per logit, 15 GiB at
16,384 tokens x 99,584 entries; measured on CPU it peaks at about 19, see
``benchmarks/results/loss_memory.md``). Here the head's matmul and the loss are fused and run over
``chunk_size`` tokens at a time (the idea of Liger-Kernel's fused linear cross entropy, Hsu et al. 2024,
and of "Cut Your Losses in Large-Vocabulary Language Models", Wijmans et al. 2024), so only one chunk's
logits are alive. For token ``i`` with logits ``z = W h_i`` (computed in the input dtype, then fp32, exactly as
``causal_lm_loss(model.head(h).float())`` sees them), target ``t`` and ``p = softmax(z)``:

    lse_i   = log sum_v exp(z_v)                        (over the real vocabulary only)
    ce_i    = lse_i - z_t
    zl_i    = lse_i^2                                   (PaLM z-loss, coefficient ``z_loss``)
    d ce_i / d z_v = p_v - [v = t]
    d zl_i / d z_v = 2 lse_i p_v
    d loss / d h_i = g_i W,   d loss / d W = sum_i g_i^T h_i,   g_i = d loss / d z (a row of V values)

Two strategies (``strategy=``), measured in ``benchmarks/results/loss_memory.md``:

* ``"stored"``: the forward also computes ``d loss_sum / d h`` (N x D) and ``d loss_sum / d W``
  (V x D), accumulated chunk by chunk in fp32, and backward only scales them by the incoming gradient
  (a scalar: the loss is a sum divided by a constant). Three matmuls in all, like the full-logits path;
  memory ``O(N D + V D)`` besides one chunk. Gradients are only computed for inputs that require them,
  so a no-grad forward (evaluation, the DPO reference model) is one matmul.
* ``"recompute"``: the forward keeps only the per-token ``lse``; backward recomputes each chunk's
  logits. Four matmuls; needed where the incoming gradient is per token (DPO's per-sequence log-probs,
  :func:`chunked_sequence_logps`, always recomputes).

Padded vocabulary rows (at or beyond ``vocab_limit``) are simply not multiplied: they get no probability
and a zero gradient, as the ``-inf`` mask of the full path gives. Ignored labels take no part at all:
their rows are dropped before chunking (zero loss, zero gradient, no compute: SFT prompts cost nothing).

Tensor parallelism: ``W`` is this rank's vocabulary slice starting at ``vocab_parallel.start``; ``h``
is the full-sequence input of the head (what the head's TP entry hook gives: ``copy_to_tp`` or, with
sequence parallelism, ``gather_from_sequence``). Per chunk each rank computes its local max ``m_r``,
``s_r = sum exp(z - m_r)`` and target logit (0 when it does not own the target), and one all-gather of
these three ``(n,)`` vectors replaces the three all-reduces of
:func:`tanuki.parallel.cross_entropy.vocab_parallel_cross_entropy`:
``lse = M + log sum_r s_r exp(m_r - M)`` with ``M = max_r m_r``. The gradient for ``h`` is this rank's
partial ``g_local W_local``, exactly what ``model.head``'s matmul gives; the entry hook's backward sums
it over the TP group. Use :class:`ChunkedLMHead` so that the hooks (TP entry, DeepSpeed ZeRO-3's
parameter gathering) run as they do for the logits path.

References next to the fused versions: :func:`causal_lm_loss_ref` and :func:`sequence_logps_ref` are
the full-logits path (``tanuki.losses`` on ``F.linear(h, W)``), the oracle of the tests.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tanuki.losses import IGNORE_INDEX, LossOutput, VocabParallel, causal_lm_loss, sequence_logps

#: tokens per chunk (``train.loss_chunk_size``). In benchmarks/results/loss_memory.md the smallest chunk
#: whose time stays within 1.1x of the full-logits path (256 is 1.25x on CPU); its fp32 chunk logits are
#: 0.4 GiB at 99,584 entries, and the whole head + loss peaks at 1.8 GiB instead of 7.6 (4,096 tokens).
DEFAULT_CHUNK_SIZE = 1024

STRATEGIES = ("stored", "recompute")

#: vocabulary rows per block of a low-precision ``g^T h`` product (4096 x 4096 bf16 = 32 MiB)
_GRAD_W_BLOCK = 4096


# -- references: the full-logits path ---------------------------------------------------------------


def causal_lm_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs) -> LossOutput:
    """``causal_lm_loss(model.head(hidden), labels, **kwargs)``: the full logits, the oracle."""
    return causal_lm_loss(F.linear(hidden, weight), labels, **kwargs)


def sequence_logps_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs):
    """``sequence_logps(model.head(hidden), labels, **kwargs)``: the full logits, the oracle."""
    return sequence_logps(F.linear(hidden, weight), labels, **kwargs)


# -- the per-chunk pieces ---------------------------------------------------------------------------


def _real_columns(local: int, vocab_limit: Optional[int], start: int) -> int:
    """How many of this slice's ``local`` columns (from global column ``start``) are real vocabulary."""
    if vocab_limit is None:
        return local
    return max(0, min(local, vocab_limit - start))


def _chunk_logits(h_c: torch.Tensor, w: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    # In the compute dtype (bf16 under autocast or with bf16 weights), then fp32: the rounding of
    # ``model.head(h).float()``.
    return (h_c.to(compute) @ w.T).float()


def _softmax_stats(z: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, group):
    """``(lse, z_target, e, to_p)`` of fp32 logits ``z`` (n, V_real), ``z`` overwritten by ``e``.

    ``e = exp(z - m)`` with this rank's row max ``m``, and the softmax over this rank's columns is
    ``p = e * to_p[:, None]`` (left to the gradient, which folds its own row weights into the same
    multiply). ``lse`` and ``z_target`` are global under TP: one all-gather of ``(m, sum e, z_t)``.
    """
    n = z.shape[0]
    if z.shape[1] == 0:  # a TP rank whose slice is all padding
        m = z.new_full((n,), float("-inf"))
        s, zt = z.new_zeros((n,)), z.new_zeros((n,))
    else:
        zt = torch.where(owned, z.gather(1, idx[:, None]).squeeze(1), z.new_zeros(()))
        m = z.amax(dim=1)
        s = z.sub_(m[:, None]).exp_().sum(dim=1)
    if group is None:
        return m + s.log(), zt, z, s.reciprocal()
    import torch.distributed as dist

    mine = torch.stack([m, s, zt])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    every = torch.stack(parts)  # (tp, 3, n)
    big = every[:, 0].amax(dim=0)
    lse = big + (every[:, 1] * torch.exp(every[:, 0] - big)).sum(dim=0).log()
    return lse, every[:, 2].sum(dim=0), z, torch.exp(m - lse)


def _logit_grad(e: torch.Tensor, to_p, idx, owned, w_ce: torch.Tensor, w_lse: torch.Tensor) -> torch.Tensor:
    """``d / d z`` of ``sum_i w_ce_i ce_i + w_lse_i lse_i`` where ``p = e * to_p``:
    ``(w_ce + w_lse) p - w_ce onehot``, in place on ``e``."""
    g = e.mul_((to_p * (w_ce + w_lse))[:, None])
    if g.shape[1]:  # a slice of padding only owns no target
        rows = torch.arange(g.shape[0], device=g.device)
        g.index_put_((rows, idx), -(w_ce * owned), accumulate=True)
    return g


def _accumulate_grads(g: torch.Tensor, h_c, w, compute, grad_h, s, grad_w):
    """Write one chunk's ``g W`` into ``grad_h[s:]`` and add ``g^T h`` to ``grad_w`` (fp32, real rows)."""
    gc = g.to(compute)
    if grad_h is not None:
        grad_h[s:s + g.shape[0]] = gc @ w
    if grad_w is None:
        return
    h_c = h_c.to(compute)
    if compute == torch.float32:
        grad_w[:w.shape[0]].addmm_(gc.T, h_c)  # in place: no V x D temporary
        return
    # torch has no bf16 x bf16 -> fp32 matmul on CPU: take the product in vocabulary blocks, each added
    # to the fp32 sum, so the temporary is one block (not V x D) and the sum over chunks stays fp32.
    for v in range(0, w.shape[0], _GRAD_W_BLOCK):
        block = gc[:, v:v + _GRAD_W_BLOCK]
        grad_w[v:v + block.shape[1]] += block.T @ h_c


def _local_targets(w: torch.Tensor, target: torch.Tensor, limit: int, start: int, compute: torch.dtype):
    """This rank's real head rows in the compute dtype, which targets it owns, and their local column
    (0 where not owned, so gathers stay in range)."""
    local_t = target - start
    owned = (local_t >= 0) & (local_t < limit)
    return w[:limit].to(compute), owned, torch.where(owned, local_t, torch.zeros_like(local_t))


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


class _ChunkedLMLoss(torch.autograd.Function):
    """``(loss_sum, ce_sum, z_sum)`` over already-compacted tokens (every label counts); only
    ``loss_sum = ce_sum + z_loss * z_sum`` is differentiable."""

    @staticmethod
    def forward(ctx, h, w, target, z_loss, limit, start, group, chunk, compute, strategy, need_h, need_w):
        with _no_autocast(h.device):
            n = h.shape[0]
            wr, owned, idx = _local_targets(w, target, limit, start, compute)
            stored = strategy == "stored"
            grad_h = h.new_zeros((n, h.shape[1]), dtype=torch.float32) if stored and need_h else None
            grad_w = w.new_zeros(w.shape, dtype=torch.float32) if stored and need_w else None
            lse = h.new_empty((n,), dtype=torch.float32)
            ce = h.new_empty((n,), dtype=torch.float32)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h_c = h[s:e]
                p = _chunk_logits(h_c, wr, compute)
                lse_c, zt, p, to_p = _softmax_stats(p, idx[s:e], owned[s:e], group)
                lse[s:e], ce[s:e] = lse_c, lse_c - zt
                if grad_h is not None or grad_w is not None:
                    ones = torch.ones_like(lse_c)
                    g = _logit_grad(p, to_p, idx[s:e], owned[s:e], ones, 2 * z_loss * lse_c)
                    _accumulate_grads(g, h_c, wr, compute, grad_h, s, grad_w)
                del p
            ce_sum = ce.sum()
            z_sum = lse.pow(2).sum()
            loss_sum = ce_sum + z_loss * z_sum if z_loss > 0 else ce_sum.clone()
        ctx.mark_non_differentiable(ce_sum, z_sum)
        ctx.dtypes = (h.dtype, w.dtype)
        ctx.strategy = strategy
        if stored:
            ctx.save_for_backward(grad_h, grad_w)
        else:
            ctx.save_for_backward(h, w, idx, owned, lse)
            ctx.args = (z_loss, limit, chunk, compute, need_h, need_w)
        return loss_sum, ce_sum, z_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_ce, _g_z):
        h_dtype, w_dtype = ctx.dtypes
        if ctx.strategy == "stored":
            # The stored gradients are scaled in place (no second V x D buffer), so they serve once.
            if getattr(ctx, "used", False):
                raise RuntimeError("chunked loss with strategy='stored' cannot be backpropagated twice "
                                   "(retain_graph); use strategy='recompute'")
            ctx.used = True
            grad_h, grad_w = ctx.saved_tensors
        else:
            h, w, idx, owned, lse = ctx.saved_tensors
            z_loss, limit, chunk, compute, need_h, need_w = ctx.args
            with _no_autocast(h.device):
                grad_h = h.new_zeros((h.shape[0], h.shape[1]), dtype=torch.float32) if need_h else None
                grad_w = w.new_zeros(w.shape, dtype=torch.float32) if need_w else None
                wr = w[:limit].to(compute)
                for s in range(0, h.shape[0], chunk):
                    e = min(s + chunk, h.shape[0])
                    h_c = h[s:e]
                    p = _chunk_logits(h_c, wr, compute).sub_(lse[s:e, None]).exp_()
                    ones = torch.ones_like(lse[s:e])
                    g = _logit_grad(p, ones, idx[s:e], owned[s:e], ones, 2 * z_loss * lse[s:e])
                    _accumulate_grads(g, h_c, wr, compute, grad_h, s, grad_w)
                    del p, g
        return _finish(grad_h, grad_w, g_loss, h_dtype, w_dtype) + (None,) * 10


def _finish(grad_h, grad_w, scale, h_dtype, w_dtype):
    """Scale the fp32 accumulators and cast them once to the inputs' dtypes (padded rows of W stay 0)."""
    unit = isinstance(scale, float) and scale == 1.0
    out_h = None if grad_h is None else (grad_h if unit else grad_h.mul_(scale)).to(h_dtype)
    out_w = None if grad_w is None else (grad_w if unit else grad_w.mul_(scale)).to(w_dtype)
    return out_h, out_w


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """``log p(target)`` (n,) over already-compacted tokens; backward recomputes the chunks' logits
    (the incoming gradient is per token): ``d logp_i / d z_v = [v = t] - p_v``."""

    @staticmethod
    def forward(ctx, h, w, target, limit, start, group, chunk, compute, need_h, need_w):
        with _no_autocast(h.device):
            n = h.shape[0]
            wr, owned, idx = _local_targets(w, target, limit, start, compute)
            lse = h.new_empty((n,), dtype=torch.float32)
            logp = h.new_empty((n,), dtype=torch.float32)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                p = _chunk_logits(h[s:e], wr, compute)
                lse_c, zt, p, _ = _softmax_stats(p, idx[s:e], owned[s:e], group)
                lse[s:e], logp[s:e] = lse_c, zt - lse_c
                del p
        ctx.save_for_backward(h, w, idx, owned, lse)
        ctx.args = (limit, chunk, compute, need_h, need_w, h.dtype, w.dtype)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, w, idx, owned, lse = ctx.saved_tensors
        limit, chunk, compute, need_h, need_w, h_dtype, w_dtype = ctx.args
        with _no_autocast(h.device):
            grad_h = h.new_zeros((h.shape[0], h.shape[1]), dtype=torch.float32) if need_h else None
            grad_w = w.new_zeros(w.shape, dtype=torch.float32) if need_w else None
            wr = w[:limit].to(compute)
            grad = grad.float()
            for s in range(0, h.shape[0], chunk):
                e = min(s + chunk, h.shape[0])
                p = _chunk_logits(h[s:e], wr, compute).sub_(lse[s:e, None]).exp_()
                # logp = z_t - lse: w_ce = -grad (ce = -logp), no lse term
                ones = torch.ones_like(lse[s:e])
                g = _logit_grad(p, ones, idx[s:e], owned[s:e], -grad[s:e], torch.zeros_like(ones))
                _accumulate_grads(g, h[s:e], wr, compute, grad_h, s, grad_w)
                del p, g
        return _finish(grad_h, grad_w, 1.0, h_dtype, w_dtype) + (None,) * 8


# -- the public functions ---------------------------------------------------------------------------


def _prepare(hidden, weight, labels, vocab_limit, vocab_parallel, ignore_index, chunk_size):
    """Flatten, drop ignored tokens, and work out the compute dtype and the real columns."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden (..., D) and labels (...) disagree: {tuple(hidden.shape)} and {tuple(labels.shape)}")
    dev = hidden.device
    # What autocast would do to the head's matmul: run it in the autocast dtype.
    if torch.is_autocast_enabled(dev.type):
        compute = torch.get_autocast_dtype(dev.type)
    else:
        compute = torch.promote_types(hidden.dtype, weight.dtype)
    start = 0 if vocab_parallel is None else vocab_parallel.start
    group = None if vocab_parallel is None else vocab_parallel.group
    limit = _real_columns(weight.shape[0], vocab_limit, start)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    target = labels.reshape(-1)
    valid = target != ignore_index
    keep = valid.nonzero().squeeze(1)  # one host sync: the chunk loop needs the count anyway
    if keep.numel() == target.numel():
        keep = None
    else:
        flat_h, target = flat_h.index_select(0, keep), target.index_select(0, keep)
    return flat_h, target, valid, keep, compute, limit, start, group


def _scatter_rows(values: torch.Tensor, keep: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Put the kept tokens' values back among ``n`` (zeros where ignored), differentiably."""
    if keep is None:
        return values
    return values.new_zeros((n,) + values.shape[1:]).index_add(0, keep, values)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss: float = 0.0,
    vocab_limit: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    normalizer: Optional[float | torch.Tensor] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    strategy: str = "stored",
) -> LossOutput:
    """``causal_lm_loss(F.linear(hidden, weight), labels, ...)`` without the full logits.

    Args:
        hidden: ``(..., D)`` final-norm hidden states, the head's input (full sequence under TP).
        weight: ``(V_local, D)`` head weight (this rank's vocabulary rows under TP).
        labels: ``(...)`` target ids (< ``vocab_limit``), ``ignore_index`` where no loss is wanted.
        z_loss, vocab_limit, normalizer, vocab_parallel: as for :func:`tanuki.losses.causal_lm_loss`.
        chunk_size: tokens whose logits are alive at once.
        strategy: ``"stored"`` (gradients computed in the forward) or ``"recompute"`` (in the backward).

    Returns the same :class:`~tanuki.losses.LossOutput`: ``loss`` to backpropagate, ``ce`` and ``z``
    (detached, divided by the token count or ``normalizer``), ``tokens`` counted.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    flat_h, target, valid, _, compute, limit, start, group = _prepare(
        hidden, weight, labels, vocab_limit, vocab_parallel, ignore_index, chunk_size)
    count = valid.sum()
    denom = count.clamp(min=1) if normalizer is None else normalizer
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if target.numel() == 0:  # every rank of a TP group sees the same labels: all skip together
        zero = (hidden.sum() + weight.sum()) * 0.0  # keeps the graph (zero gradients) for backward
        return LossOutput(loss=zero.float(), ce=zero.detach().float(), z=zero.detach().float(), tokens=count)
    loss_sum, ce_sum, z_sum = _ChunkedLMLoss.apply(
        flat_h, weight, target, float(z_loss), limit, start, group, chunk_size, compute, strategy, need_h, need_w)
    loss = loss_sum / denom
    z = z_sum / denom if z_loss > 0 else torch.zeros((), device=hidden.device)
    return LossOutput(loss=loss, ce=(ce_sum / denom).detach(), z=z.detach(), tokens=count)


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_limit: Optional[int] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token ``log softmax(W h)[label]`` (fp32, shape of ``labels``, 0 where ignored), differentiable."""
    flat_h, target, valid, keep, compute, limit, start, group = _prepare(
        hidden, weight, labels, vocab_limit, vocab_parallel, ignore_index, chunk_size)
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if target.numel() == 0:
        return ((hidden.sum() + weight.sum()) * 0.0).float().expand(labels.shape)
    logp = _ChunkedTokenLogProbs.apply(flat_h, weight, target, limit, start, group, chunk_size, compute,
                                       need_h, need_w)
    return _scatter_rows(logp, keep, valid.numel()).view(labels.shape)


def chunked_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    vocab_limit: Optional[int] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps(F.linear(hidden, weight), labels, ...)`` without the full logits.

    ``hidden`` is ``(B, T, D)``, ``labels`` ``(B, T)``; returns ``(log p(completion), n_tokens)``, each
    ``(B,)``: ``sum_t log p(labels[b, t])`` over the counted positions, divided by their number when
    ``average`` (IPO; 0 for a row without tokens). Differentiable with respect to ``hidden`` and
    ``weight``; the backward recomputes each chunk's logits.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_sequence_logps expects hidden (B, T, D) and labels (B, T); got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    token_logps = chunked_token_logps(hidden, weight, labels, vocab_limit=vocab_limit,
                                      vocab_parallel=vocab_parallel, ignore_index=ignore_index,
                                      chunk_size=chunk_size)
    n_tokens = (labels != ignore_index).sum(-1)
    logps = token_logps.sum(-1)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


# -- the head module --------------------------------------------------------------------------------


class ChunkedLMHead(nn.Linear):
    """The output head that, given labels, returns the chunked loss instead of logits.

    ``head(h)`` is the plain linear layer (logits for generation, evaluation, Hugging Face parity).
    ``head(h, labels, **kw)`` is :func:`chunked_causal_lm_loss` as a tuple ``(loss, ce, z, tokens)``
    (``LossOutput(*...)`` rebuilds it), and ``head(h, labels, logps=True, average=..., **kw)``
    :func:`chunked_sequence_logps`. Because the loss is computed inside the head's call, every hook on
    the head runs as for the logits: the TP entry (``copy_to_tp``, or the sequence all-gather with SP)
    on the input, and DeepSpeed ZeRO-3's gathering of the weight before forward and backward. Outputs
    are plain tuples because ZeRO-3 attaches its pre-backward hook only to tensors in tuples, lists and
    dicts, not to dataclasses.
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    strategy: str = "stored"

    def forward(self, x, labels=None, *, logps: bool = False, **kwargs):
        if labels is None:
            return super().forward(x)
        if logps:
            return chunked_sequence_logps(x, self.weight, labels, chunk_size=self.chunk_size, **kwargs)
        out = chunked_causal_lm_loss(x, self.weight, labels, chunk_size=self.chunk_size, strategy=self.strategy,
                                     **kwargs)
        return out.loss, out.ce, out.z, out.tokens


def use_chunked_head(head: nn.Linear, chunk_size: int = DEFAULT_CHUNK_SIZE, strategy: str = "stored") -> ChunkedLMHead:
    """Turn ``head`` (an ``nn.Linear``, possibly TP-sharded, with its hooks) into a :class:`ChunkedLMHead`
    in place: same parameter, same hooks, same state-dict names."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if type(head) is not nn.Linear and not isinstance(head, ChunkedLMHead):
        raise TypeError(f"expected the nn.Linear output head, got {type(head).__name__}")
    head.__class__ = ChunkedLMHead
    head.chunk_size, head.strategy = chunk_size, strategy
    return head


def has_chunked_head(model: nn.Module) -> bool:
    """Whether ``model`` (a Transformer, or a DeepSpeed engine around one) computes its loss in the head:
    then the step functions pass labels to the model instead of taking its logits."""
    module = getattr(model, "module", model)
    return isinstance(getattr(module, "head", None), ChunkedLMHead)
