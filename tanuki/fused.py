"""Kernel selection: swap the model's RMSNorm, Rotary and MLP modules for fused Triton ones, or back.

``model.kernels`` in the config chooses:

- ``auto``: Triton when the model lives on a CUDA device (and triton is installed), PyTorch otherwise;
- ``triton``: always Triton; on CPU this only runs under Triton's interpreter (``TRITON_INTERPRET=1``),
  which is how the kernels are tested without a GPU;
- ``torch``: the plain PyTorch modules of :mod:`tanuki.model`.

The selection is a module swap: every :class:`tanuki.model.RMSNorm` becomes a :class:`TritonRMSNorm`
(a subclass sharing the same ``weight`` Parameter object), every :class:`tanuki.model.Rotary` a
:class:`TritonRotary` (sharing ``inv_freq``) and every :class:`tanuki.model.MLP` a :class:`TritonMLP`
(sharing its three ``nn.Linear`` children; only the activation between them is fused). Parameters keep
their identity, so the state dict, the optimizer's parameter list and any tensor-parallel sharding are
unchanged, and ``isinstance`` checks on the base classes still hold. Nothing in another library is
patched.

The kernels apply only where their op is the model's: RMSNorm with a gain over the last dimension (the
block norms, and Qwen3's q/k norms over head_dim), the half-split rotary (with any rope scaling, which
is folded into ``inv_freq``, except yarn's cos/sin scale) and SwiGLU. Cohere's :class:`~tanuki.model.LayerNorm`, its
:class:`~tanuki.model.InterleavedRotary` and a per-head RMSNorm gain ((heads, head_dim)) stay on the
PyTorch path, as does a yarn-scaled rotary; :func:`kernel_summary` counts each by class name, so a log shows which ran where.

Call it once on the built model, before activation checkpointing and the ZeRO engine wrap it. The fused
ops are ``torch.library`` custom ops, so they compose with ``torch.compile`` without graph breaks, with
activation checkpointing (their forward is deterministic and recomputable) and with tensor/sequence
parallelism (they act on each token or row independently).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Literal, Optional

import torch
from torch import nn

from tanuki.model import MLP, LayerNorm, RMSNorm, Rotary

KernelMode = Literal["auto", "triton", "torch"]

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
if TRITON_INSTALLED:
    from tanuki_kernels import interpreter_enabled
    from tanuki_kernels.rms_norm import rms_norm as _fused_rms_norm
    from tanuki_kernels.rotary import apply_rotary as _fused_rotary
    from tanuki_kernels.swiglu import swiglu as _fused_swiglu


class TritonRMSNorm(RMSNorm):
    """:class:`tanuki.model.RMSNorm` computed by the fused Triton kernel (same parameters, same results)."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return _fused_rms_norm(x, self.weight, self.eps, residual)


class TritonRotary(Rotary):
    """:class:`tanuki.model.Rotary` computed by the fused Triton kernel (q and k in one launch)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return _fused_rotary(q, k, positions, self.inv_freq)


class TritonMLP(MLP):
    """:class:`tanuki.model.MLP` with the fused SwiGLU activation between its (unchanged) projections."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(_fused_swiglu(self.w_gate(x), self.w_up(x)))


# Exact types only: a further subclass may change what forward means.
_TO_TRITON = {RMSNorm: TritonRMSNorm, Rotary: TritonRotary, MLP: TritonMLP}
_TO_TORCH = {triton_cls: torch_cls for torch_cls, triton_cls in _TO_TRITON.items()}


def resolve_kernels(mode: KernelMode, device: torch.device) -> Literal["triton", "torch"]:
    """Turn ``mode`` into the implementation used for a model on ``device``; raise if it cannot run there."""
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be one of auto, triton, torch; got {mode!r}")
    if mode == "torch":
        return "torch"
    if mode == "auto":
        return "triton" if device.type == "cuda" and TRITON_INSTALLED else "torch"
    if not TRITON_INSTALLED:
        raise RuntimeError("model.kernels=triton needs the triton package (pip install triton)")
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"model.kernels=triton on a model on {device}: Triton kernels need a CUDA GPU. Without one they "
            "run only through Triton's interpreter (set TRITON_INTERPRET=1; slow, meant for tests); or use "
            "model.kernels=auto or torch."
        )
    return "triton"


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    device = torch.device("cpu") if tensor is None else tensor.device
    if device.type == "meta":
        # Built on the meta device and not materialised yet: it will land on the GPU if there is one.
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return device


def _rebuilt_as(module: nn.Module, cls: type) -> nn.Module:
    # A new instance of ``cls`` holding the same state: parameters, buffers, children, hooks and plain
    # attributes. Containers are copied so that later registrations on one module do not show on the
    # other; the tensors in them are shared.
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    return new


def apply_kernels(
    model: nn.Module, mode: KernelMode = "auto", device: Optional[torch.device | str] = None
) -> nn.Module:
    """Swap ``model``'s RMSNorm, Rotary and MLP modules for the implementation ``mode`` selects; return ``model``.

    ``device`` defaults to the device of the model's parameters (for a model still on the meta device:
    CUDA if available). Swapping is idempotent and reversible (``mode="torch"`` restores the PyTorch
    modules); a module shared by several parents is replaced by one shared module.
    """
    choice = resolve_kernels(mode, torch.device(device) if device is not None else _model_device(model))
    table = _TO_TRITON if choice == "triton" else _TO_TORCH
    replaced: dict[int, nn.Module] = {}
    # Children before their parents, so that a rebuilt parent already holds its rebuilt children.
    for parent in reversed(list(model.modules())):
        for name, child in list(parent.named_children()):
            target = table.get(type(child))
            if target is None or (isinstance(child, RMSNorm) and child.weight.dim() != 1):
                continue  # (the fused RMSNorm takes one gain over the last dimension)
            if isinstance(child, Rotary) and getattr(child, "attention_scaling", 1.0) != 1.0:
                continue  # (yarn scales cos/sin; the fused rotary does not)
            if id(child) not in replaced:
                replaced[id(child)] = _rebuilt_as(child, target)
            setattr(parent, name, replaced[id(child)])
    target = table.get(type(model))
    return _rebuilt_as(model, target) if target is not None else model


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """Count the model's norm, rotary and MLP modules by class name (for logs: which kernels are in use):
    ``Triton*`` run fused; ``RMSNorm``, ``Rotary``, ``MLP``, and always ``LayerNorm`` and
    ``InterleavedRotary`` (no kernel), run in PyTorch."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (RMSNorm, LayerNorm, Rotary, MLP)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts
