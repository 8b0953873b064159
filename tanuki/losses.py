"""Losses.

``causal_lm_loss`` is the next-token cross entropy used by pretraining and SFT, with the optional
z-loss of PaLM (Chowdhery et al. 2022, section 5: ``1e-4 * log(Z)^2`` keeps the softmax normaliser near
1; llm-jp-3 trained with 1e-4).

Labels are already aligned with the logits (``labels[t]`` is the token that should follow position
``t``); the data pipeline shifts once. Positions whose label is ``ignore_index`` do not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

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
        from tanuki.parallel.cross_entropy import vocab_parallel_cross_entropy

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
