"""Optimizer parameter groups and learning-rate schedules.

Weight decay is applied to the matrices of the linear layers only. Norm gains and the input embedding
get none by default: decaying a gain pulls it toward zero rather than regularising, and decaying
embedding rows of rare tokens shrinks them every step they are not seen (the convention of GPT-NeoX,
Megatron-LM's ``--no-weight-decay-cond`` default and llm-jp's recipes). The output head is a linear map
and is decayed. Both exceptions are configurable.

Schedules (``lr_at``), with ``step`` counted in optimizer steps from 0:

* ``cosine``: linear warmup to ``lr`` over ``warmup_steps``, then half a cosine down to ``min_lr`` at
  ``max_steps`` (Loshchilov & Hutter 2017; llm-jp-3 decays to 0.1 x peak).
* ``wsd``: warmup, a stable phase at ``lr``, then a decay to ``min_lr`` over the last
  ``decay_fraction`` of the steps (warmup-stable-decay, Hu et al. 2024 "MiniCPM"; Hägele et al. 2024),
  with a ``linear``, ``cosine`` or ``sqrt`` (1 - sqrt) decay shape.
* ``constant``: warmup, then ``lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class Schedule:
    """Learning-rate schedule; see the module docstring."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.1
    decay_shape: Literal["linear", "cosine", "sqrt"] = "sqrt"


def lr_at(step: int, s: Schedule) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if s.warmup_steps > 0 and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return s.lr
    if s.kind == "cosine":
        span = max(1, s.max_steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / span)
        return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(s.decay_fraction * s.max_steps))
    decay_start = s.max_steps - decay_steps
    if step < decay_start:
        return s.lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    if s.decay_shape == "linear":
        factor = 1.0 - progress
    elif s.decay_shape == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # 1 - sqrt, the shape Hägele et al. found best
        factor = 1.0 - math.sqrt(progress)
    return s.min_lr + (s.lr - s.min_lr) * factor


def is_no_decay(name: str, param: nn.Parameter, decay_embeddings: bool = False, decay_norms: bool = False) -> bool:
    """Whether parameter ``name`` is excluded from weight decay."""
    # A ZeRO-3 parameter partitioned as it was built (deepspeed.zero.Init) is a flat 1-D shard; its
    # shape is ``ds_shape``.
    if len(getattr(param, "ds_shape", param.shape)) < 2:  # norm gains (and any bias)
        return not decay_norms
    if name == "embed.weight" or name.endswith(".embed.weight"):
        return not decay_embeddings
    return False


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    *,
    decay_embeddings: bool = False,
    decay_norms: bool = False,
) -> list[dict]:
    """Two AdamW parameter groups, with and without weight decay; frozen parameters are left out.

    Each group carries a ``names`` list next to ``params`` for logging and tests.
    """
    decay, no_decay = {"params": [], "names": [], "weight_decay": weight_decay}, {
        "params": [],
        "names": [],
        "weight_decay": 0.0,
    }
    for name, p in named_params:
        if not p.requires_grad:
            continue
        group = no_decay if is_no_decay(name, p, decay_embeddings, decay_norms) else decay
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    *,
    decay_embeddings: bool = False,
    decay_norms: bool = False,
    optimizer_class: type[torch.optim.AdamW] = torch.optim.AdamW,
) -> torch.optim.AdamW:
    """``optimizer_class`` (AdamW or a subclass) over :func:`param_groups` of ``model``.

    The engine (:func:`tanuki.parallel.zero.build_engine`) builds its
    :class:`~tanuki.parallel.zero.GuardedAdamW` here, which DeepSpeed then wraps for ZeRO.
    """
    groups = param_groups(
        model.named_parameters(), weight_decay, decay_embeddings=decay_embeddings, decay_norms=decay_norms
    )
    for g in groups:
        g.pop("names")
    return optimizer_class(groups, lr=lr, betas=betas, eps=eps)
