"""LISA: layerwise importance-sampled AdamW (Pan et al. 2024, arXiv 2403.17919).

Every ``interval_steps`` optimizer steps a new period starts: all decoder layers are frozen, then
``active_layers`` of them, drawn uniformly without replacement from a generator seeded by
``(seed, period)``, are unfrozen. The embedding, the final norm and the output head always train.

Done so that the known faults of the widely used implementation cannot happen:

* every layer is in the optimizer from the start (the optimizer is built before the first freeze), so a
  layer unfrozen later is updated;
* a frozen parameter has ``grad = None`` (not zero), so AdamW applies neither momentum nor weight decay
  to it: it does not change at all during a period it sits out;
* **optimizer-state policy**: when a layer is frozen its AdamW state (moments and step count) is
  dropped, and it restarts from zero with bias correction when the layer is drawn again — the memory
  of the optimizer stays that of the active layers, as in the paper's runs;
* the period is counted in optimizer steps (after gradient accumulation) and the draw is a pure
  function of ``(seed, period)``, so a resumed run activates the same layers.

DeepSpeed's ZeRO stages flatten and partition the trainable parameters once, when the engine is built;
freezing layers and dropping their state per period cannot be expressed on those flat partitions. LISA
therefore runs with ``parallel.zero_stage=0`` (DeepSpeed as data parallelism, AdamW holding each
parameter's state), with fp32 master weights; bf16 compute is done with autocast. Its memory saving
comes from the optimizer state of the inactive layers, which does not exist.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from tanuki.config import ConfigError


@dataclass(frozen=True)
class LisaConfig:
    """``lisa``: how many decoder layers train at a time, and for how long."""

    #: layers trained in each period (Swallow-MoE-4x7B: 8)
    active_layers: int = 2
    #: optimizer steps per period (Swallow-MoE-4x7B: 13)
    interval_steps: int = 20
    #: seed of the layer draw
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.active_layers < 1:
            raise ConfigError("lisa.active_layers", f"must be >= 1, got {self.active_layers}")
        if self.interval_steps < 1:
            raise ConfigError("lisa.interval_steps", f"must be >= 1, got {self.interval_steps}")


def layers_for_period(period: int, n_layers: int, cfg: LisaConfig) -> list[int]:
    """The decoder layers that train in ``period`` (sorted)."""
    if cfg.active_layers > n_layers:
        raise ConfigError("lisa.active_layers", f"{cfg.active_layers} is more than the model's {n_layers} layers")
    rng = random.Random(cfg.seed * 1_000_003 + period)
    return sorted(rng.sample(range(n_layers), cfg.active_layers))


class LisaScheduler:
    """Freezes and unfreezes ``layers`` period by period; call :meth:`on_step_start` before each
    optimizer step with the 0-based step index."""

    def __init__(self, layers: nn.ModuleList, cfg: LisaConfig, optimizer: torch.optim.Optimizer):
        self.layers, self.cfg, self.optimizer = layers, cfg, optimizer
        layers_for_period(0, len(layers), cfg)  # validates active_layers against the model
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [i for i, layer in enumerate(layers) for p in layer.parameters() if id(p) not in known]
        if missing:
            raise ValueError(f"layers {sorted(set(missing))} are not in the optimizer: build it before freezing")
        self.period: int | None = None
        self.active: list[int] = []

    def on_step_start(self, step: int) -> None:
        period = step // self.cfg.interval_steps
        if period != self.period:
            self.activate(layers_for_period(period, len(self.layers), self.cfg))
            self.period = period

    def activate(self, active: list[int]) -> None:
        for i, layer in enumerate(self.layers):
            on = i in active
            for p in layer.parameters():
                if not on:
                    p.grad = None
                    self.optimizer.state.pop(p, None)  # the state policy: restart when drawn again
                p.requires_grad_(on)
        self.active = list(active)
