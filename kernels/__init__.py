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

Imported under any other name, the folder steps aside: see :func:`_step_aside`.
"""

from __future__ import annotations

import sys


def _step_aside(name: str) -> None:
    """Give the module name ``name`` (this folder imported as ``kernels``) to what it really means.

    With the repository root on ``sys.path`` (``python -m pytest``, a script run from the root), the
    folder ``kernels/`` is found under the name of the PyPI package ``kernels`` (Hugging Face's kernel
    hub), which transformers probes for: ``importlib.util.find_spec("kernels")``, then the installed
    version, and, without one, ``import kernels``, counting a module with neither ``__version__`` nor
    ``__file__`` as a stray namespace package, i.e. absent (transformers 5,
    ``utils/import_utils.py:_is_package_available``). Raising ImportError here would not read as
    "absent": the probe does not catch it, and ``import transformers.modeling_utils`` would fail.

    So: if the PyPI package is installed further down ``sys.path``, it gets the name. Otherwise the name
    gets an empty module (no ``__file__``, no ``__version__``, no ``__path__``), which the probe counts
    as absent and on which ``from kernels import X`` fails with ImportError. Neither triton nor the op
    modules are imported under this name: they register custom ops, which must happen once, as
    ``tanuki_kernels``.
    """
    import importlib.machinery
    import importlib.util
    import os
    import types

    def real(entry) -> str:
        return os.path.realpath(os.fspath(entry) or os.curdir)

    # Look for the name everywhere on sys.path except the folder that holds kernels/.
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    others = [
        p for p in sys.path if isinstance(p, (str, os.PathLike)) and real(p) != here
    ]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is not None and spec.loader is not None:
        # The import system returns whatever sys.modules holds for the name once this file has run.
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return
    doc = f"Not the PyPI package {name!r}: tanuki's kernels/ folder (tanuki_kernels) shadowed it."
    stand_in = types.ModuleType(name, doc)
    # importlib.util.find_spec(name) reads the __spec__ of a module already in sys.modules.
    stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = stand_in


if __name__ != "tanuki_kernels":
    _step_aside(__name__)
else:
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
            raise ValueError(
                f"tanuki_kernels: all tensors must be on one device, got {sorted(map(str, devices))}"
            )
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

    @functools.cache
    def num_sms(device_index: int) -> int:
        """Number of streaming multiprocessors of CUDA device ``device_index`` (sizes persistent grids)."""
        return torch.cuda.get_device_properties(device_index).multi_processor_count

    # The functions keep their module paths (``tanuki_kernels.rms_norm.rms_norm``): re-exporting a function
    # named like its module would shadow the module attribute.
    from tanuki_kernels.rms_norm import RMSNorm, rms_norm_ref
    from tanuki_kernels.rotary import Rotary, apply_rotary, rotary_ref
    from tanuki_kernels.swiglu import SwiGLU, swiglu_ref

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
