"""Losses.

``causal_lm_loss`` is the next-token cross entropy used by pretraining and SFT, with the optional
z-loss of PaLM (Chowdhery et al. 2022, section 5: ``1e-4 * log(Z)^2`` keeps the softmax normaliser near
1; llm-jp-3 trained with 1e-4).

Labels are already aligned with the logits (``labels[t]`` is the token that should follow position
``t``); the data pipeline shifts once. Positions whose label is ``ignore_index`` do not count.

The DPO family (``sequence_logps``, ``dpo_loss``, ``dpo_metrics``, ``chosen_nll``) are pure functions
of log-probabilities; the formulas, with TRL's semantics, are in ``dpo_loss``'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tanuki.parallel.cross_entropy import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VocabParallel:
    """Where this rank's logits sit in the vocabulary under tensor parallelism."""

    group: object
    #: global index of this rank's first column
    start: int


@dataclass
class LossOutput:
    """``loss`` is what to backpropagate; ``ce`` and ``z`` are its parts (detached), per token."""

    loss: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor
    tokens: torch.Tensor  # number of tokens that counted


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss: float = 0.0,
    vocab_limit: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    normalizer: Optional[float | torch.Tensor] = None,
    vocab_parallel: Optional[VocabParallel] = None,
) -> LossOutput:
    """Mean next-token cross entropy (+ z-loss) over the tokens whose label is not ignored.

    Args:
        logits: ``(..., V)`` in any dtype; the softmax is computed in fp32.
        labels: ``(...)`` int64 target ids, ``ignore_index`` where no loss is wanted.
        z_loss: coefficient of ``logsumexp(logits)^2``.
        vocab_limit: number of real vocabulary entries; columns at or beyond it (Megatron-style padding
            of the embedding to a multiple of 128) are kept out of the softmax.
        normalizer: divide the summed loss by this instead of the local token count. Gradient
            accumulation passes the token count of the whole global batch so that every token weighs
            the same however the batch is split.
        vocab_parallel: the logits are this tensor-parallel rank's vocabulary slice (see
            :mod:`tanuki.parallel.cross_entropy`); ``vocab_limit`` stays a global column index.
    """
    if vocab_parallel is not None:
        ce_tok, lse = vocab_parallel_cross_entropy(
            logits, labels, start=vocab_parallel.start, group=vocab_parallel.group, vocab_limit=vocab_limit,
            ignore_index=ignore_index,
        )
        valid = labels != ignore_index
        count = valid.sum()
        denom = count.clamp(min=1) if normalizer is None else normalizer
        ce = ce_tok.sum() / denom
        loss, z = ce, torch.zeros((), device=logits.device)
        if z_loss > 0:
            z = (lse.pow(2) * valid).sum() / denom
            loss = loss + z_loss * z
        return LossOutput(loss=loss, ce=ce.detach(), z=z.detach(), tokens=count)
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[..., :vocab_limit]
    flat = logits.reshape(-1, logits.shape[-1])
    target = labels.reshape(-1)
    valid = target != ignore_index
    ce_sum = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    count = valid.sum()
    denom = count.clamp(min=1) if normalizer is None else normalizer
    loss = ce_sum / denom
    z = torch.zeros((), device=logits.device)
    if z_loss > 0:
        lse = torch.logsumexp(flat, dim=-1)
        z = (lse.pow(2) * valid).sum() / denom
        loss = loss + z_loss * z
    return LossOutput(loss=loss, ce=(ce_sum / denom).detach(), z=z.detach(), tokens=count)


# -- DPO family --------------------------------------------------------------------------------------

#: the ``loss_type`` values of :func:`dpo_loss` (TRL's names)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# Rows of the flattened logits handled at once when the softmax is computed: bounds the fp32 temporaries
# to about this many elements (64 MiB) whatever the batch, sequence length or vocabulary.
_CHUNK_ELEMENTS = 1 << 24


class _TokenLogProbs(torch.autograd.Function):
    """``log p(target)`` per token: ``z_t - logsumexp(z)`` over the real vocabulary, 0 where ignored.

    The softmax is computed in fp32 (fp64 stays fp64) chunk by chunk, and only the logits as given (any
    dtype) and the per-token log-sum-exp are kept for backward, where the softmax is recomputed:
    ``d logp_t / d z_v = [v = t] - softmax_v``. ``log_softmax`` + ``gather`` would keep a whole
    ``(..., V)`` fp32 copy alive between forward and backward instead.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_limit, ignore_index):
        V = logits.shape[-1]
        limit = V if vocab_limit is None else min(vocab_limit, V)
        compute = torch.promote_types(logits.dtype, torch.float32)
        flat = logits.reshape(-1, V)
        tgt = target.reshape(-1)
        valid = tgt != ignore_index
        idx = torch.where(valid, tgt, torch.zeros_like(tgt))
        rows = max(1, _CHUNK_ELEMENTS // limit)
        lse = torch.empty(flat.shape[0], dtype=compute, device=logits.device)
        for s in range(0, flat.shape[0], rows):
            lse[s:s + rows] = torch.logsumexp(flat[s:s + rows, :limit].to(compute), dim=-1)
        zt = flat.gather(-1, idx.unsqueeze(-1)).squeeze(-1).to(compute)
        logp = torch.where(valid, zt - lse, torch.zeros_like(lse))
        ctx.save_for_backward(logits, idx, valid, lse)
        ctx.limit, ctx.rows = limit, rows
        return logp.view(target.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, idx, valid, lse = ctx.saved_tensors
        limit, rows = ctx.limit, ctx.rows
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        g = torch.where(valid, grad.reshape(-1).to(lse.dtype), torch.zeros_like(lse))
        out = torch.zeros_like(flat)  # padded columns (>= limit) get no gradient
        for s in range(0, flat.shape[0], rows):
            e = s + rows
            gc = torch.exp(flat[s:e, :limit].to(lse.dtype) - lse[s:e, None]) * -g[s:e, None]
            gc.scatter_add_(-1, idx[s:e, None], g[s:e, None])
            out[s:e, :limit] = gc.to(out.dtype)
        return out.view_as(logits), None, None, None


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    vocab_limit: Optional[int] = None,
    vocab_parallel: Optional[VocabParallel] = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(log p(completion), number of completion tokens)``, each ``(B,)``.

    ``log p`` is ``sum_t log softmax(logits[b, t])[labels[b, t]]`` over the positions whose label is not
    ``ignore_index`` (labels pre-aligned, as in :func:`causal_lm_loss`), or that sum divided by the
    token count when ``average`` (IPO; a row without tokens gives 0). The softmax is in fp32 and
    differentiable with respect to ``logits``; the full ``(B, T, V)`` log-softmax is never kept.

    Args:
        logits: ``(B, T, V)`` in any dtype.
        labels: ``(B, T)`` target ids below ``vocab_limit``, ``ignore_index`` outside the completion.
        vocab_limit: number of real vocabulary entries; padded columns at or beyond it are excluded.
        vocab_parallel: the logits are this tensor-parallel rank's vocabulary slice; the per-token
            log-probs come from :func:`tanuki.parallel.cross_entropy.vocab_parallel_cross_entropy`
            (``log p = -ce``), so every rank gets the same values and no rank gathers the full logits.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"sequence_logps expects logits (B, T, V) and labels (B, T); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if vocab_parallel is not None:
        ce, _ = vocab_parallel_cross_entropy(
            logits, labels, start=vocab_parallel.start, group=vocab_parallel.group, vocab_limit=vocab_limit,
            ignore_index=ignore_index,
        )
        token_logps = -ce  # ce is 0 at ignored positions
    else:
        token_logps = _TokenLogProbs.apply(logits, labels, vocab_limit, ignore_index)
    n_tokens = (labels != ignore_index).sum(-1)
    logps = token_logps.sum(-1)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


def _check_dpo_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"DPO loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"DPO beta must be a finite number > 0; got {beta!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 0.5):
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5); got {label_smoothing!r}")
    if label_smoothing > 0 and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"DPO label_smoothing applies to the sigmoid and robust losses only, not to "
                         f"loss_type {loss_type!r}; set it to 0")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards, ``(losses, chosen_rewards, rejected_rewards)``.

    Inputs are ``(B,)`` sequence log-probs (:func:`sequence_logps`); the reference ones are constants
    (detached here). With ``x = (pi_c - pi_r) - (ref_c - ref_r)`` and ``eps = label_smoothing``, as TRL's
    ``DPOTrainer`` defines them:

    - ``sigmoid`` (DPO, Rafailov et al. 2023; with ``eps > 0`` conservative DPO):
      ``-(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x)``
    - ``ipo`` (Azar et al. 2023): ``(x - 1 / (2 beta))^2``; pass per-token averaged log-probs
      (``sequence_logps(..., average=True)``)
    - ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - beta x)``
    - ``robust`` (Chowdhury et al. 2024): ``(-(1 - eps) log sigmoid(beta x) + eps log sigmoid(-beta x))
      / (1 - 2 eps)``

    Rewards are ``beta (pi - ref)`` for chosen and rejected, detached. At ``pi == ref`` the sigmoid loss
    is ``log 2`` and the rewards are 0. The RPO-style SFT term on the chosen completion is separate:
    the stage adds ``rpo_alpha * chosen_nll(...)`` to the mean loss.

    Raises:
        ValueError: ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)`` or set for a loss that does
            not use it (``ipo``, ``hinge``), or an unknown ``loss_type``; the message names the option.
    """
    _check_dpo_options(beta, loss_type, label_smoothing)
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    x = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * x) - eps * F.logsigmoid(-beta * x)
    elif loss_type == "ipo":
        losses = (x - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * x)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * x) + eps * F.logsigmoid(-beta * x)) / (1 - 2 * eps)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen token over the batch (the SFT term of RPO).

    ``-sum_b logp_b / sum_b n_b`` from the *summed* chosen log-probs and token counts of
    :func:`sequence_logps`: a token mean, like TRL's ``rpo_alpha`` term (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization"), which the stage adds as ``loss + rpo_alpha * chosen_nll``.
    """
    return -policy_chosen_sum.sum() / n_tokens.sum().clamp(min=1)


def dpo_metrics(
    losses: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Batch means of the quantities TRL logs, under TRL's names, as detached 0-d tensors.

    The log-probs are *summed* over each completion, for every loss type (TRL's ``DPOTrainer``,
    ``_compute_loss``: IPO divides by the completion length inside its loss only, its metrics stay
    summed). ``rewards/chosen`` is the mean of ``beta * (policy_chosen - ref_chosen)`` (likewise
    rejected), ``rewards/accuracies`` the fraction of pairs whose chosen reward is strictly above the
    rejected one, ``rewards/margins`` the mean of ``chosen - rejected``, ``logps/*`` the means of the
    policy's summed log-probs. These are means over the local batch; averaging them across
    data-parallel ranks (and micro-batches) is the caller's.
    """
    pc, pr = policy_chosen.detach().float(), policy_rejected.detach().float()
    c = beta * (pc - ref_chosen.detach().float())
    r = beta * (pr - ref_rejected.detach().float())
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "rewards/margins": (c - r).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
        "loss": losses.detach().float().mean(),
    }
