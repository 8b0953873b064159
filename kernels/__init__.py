"""Fused Triton kernels of tanuki, importable as ``tanuki_kernels``.

One op per module, each holding its Triton kernel(s), the launcher, the ``torch.library`` custom op with
its autograd formula and fake (meta) implementation, an ``nn.Module``, and the PyTorch reference
``*_ref`` that the tests compare against:

- :mod:`tanuki_kernels.rms_norm`: RMSNorm, optionally fused with the residual add in front of it.
- :mod:`tanuki_kernels.rotary`: rotary position embedding of q and k in one launch.
- :mod:`tanuki_kernels.swiglu`: the SwiGLU activation ``silu(gate) * up`` of the MLP.

The model switches to these modules with :func:`tanuki.fused.apply_kernels`.

Without a GPU the kernels run on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1``
(slow, for tests). Triton fixes compiled-or-interpreted when *triton itself* is imported: its own
library functions (``tl.sum``, ``tl.cdiv``, ...) are decorated with ``@triton.jit`` at that moment, and a
kernel of the other kind cannot call them. So the variable must be set before anything imports triton
(``tests/conftest.py`` does it for the test suite); :func:`check_launchable` turns a late setting into a
clear error instead of a failure deep inside Triton.

The small launch helpers below live here, before the op modules are imported, because every op uses
them.
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# How triton was imported: its standard library is interpreted exactly when TRITON_INTERPRET was set.
_TRITON_INTERPRETED = isinstance(tl.cdiv, InterpretedFunction)


def interpreter_enabled() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return _TRITON_INTERPRETED


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error unless ``kernel`` can run now on ``tensors``.

    CUDA tensors always can; CPU tensors only under the interpreter. All must share one device, and the
    kernel must have been decorated in the mode triton was imported in.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"tanuki_kernels: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type != "cuda" and not (device.type == "cpu" and _TRITON_INTERPRETED):
        raise RuntimeError(
            f"tanuki_kernels: Triton kernels need CUDA tensors, got tensors on {device}. On a machine without "
            "a GPU, set TRITON_INTERPRET=1 before triton is imported to run them through Triton's interpreter "
            "(slow, for tests), or use the PyTorch modules (model.kernels=torch)."
        )
    if isinstance(kernel, InterpretedFunction) != _TRITON_INTERPRETED:
        raise RuntimeError(
            "tanuki_kernels: TRITON_INTERPRET changed between importing triton and importing tanuki_kernels; "
            "set it before anything imports triton (the test suite does so in tests/conftest.py)."
        )


def on_gpu(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a GPU and the kernels are compiled (not interpreted): the autotuning case."""
    return t.device.type == "cuda" and not interpreter_enabled()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Number of streaming multiprocessors of CUDA device ``device_index`` (sizes persistent grids)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The functions keep their module paths (``tanuki_kernels.rms_norm.rms_norm``): re-exporting a function
# named like its module would shadow the module attribute.
from tanuki_kernels.rms_norm import RMSNorm, rms_norm_ref  # noqa: E402
from tanuki_kernels.rotary import Rotary, apply_rotary, rotary_ref  # noqa: E402
from tanuki_kernels.swiglu import SwiGLU, swiglu_ref  # noqa: E402

__all__ = [
    "RMSNorm",
    "Rotary",
    "SwiGLU",
    "apply_rotary",
    "check_launchable",
    "interpreter_enabled",
    "rms_norm_ref",
    "rotary_ref",
    "swiglu_ref",
]
