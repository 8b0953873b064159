"""The files of model directories: readers whose errors name the file, and atomic directory writes.

* :func:`read_json`: a JSON file; ``<file>: invalid JSON at line N: <reason>`` when it is not valid JSON.
* :func:`open_safetensors` (lazily, tensor by tensor) and :func:`read_safetensors` (all of it): a
  safetensors file; ``<file>: not a readable safetensors file: damaged, truncated ...`` when safetensors
  cannot read it.
* :func:`load_pt` (and :func:`safe_torch_loads` around DeepSpeed's own readers): a ``.pt`` file read with
  ``weights_only=True``, so that a crafted checkpoint cannot run code; ``<file>: refused ...`` when it
  holds other Python objects than tensors, plain data and :func:`torch_allowlist`, ``<file>: damaged or
  truncated ...`` when it cannot be read.
* :func:`replacing_dir`: a directory assembled under a temporary name beside its destination and renamed
  into place only when complete.

The readers raise the caller's error class (:class:`~tanuki.hf.HFFormatError` for a Hugging Face
directory, ``ValueError`` for a tanuki model file), so each module keeps its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The contents of the JSON file ``path``; ``error`` naming the file and the line if it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def torch_allowlist() -> list:
    """The only non-tensor, non-plain-data types the ``.pt`` files tanuki reads may hold: what DeepSpeed
    pickles into its checkpoints (found by loading the ``*_model_states.pt`` / ``*_optim_states.pt`` and
    universal files of ZeRO stages 0-3, fp32 and bf16, with ``weights_only=True`` until it passed), and
    NumPy's array/dtype types for the RNG files tanuki wrote before they became plain data."""
    import numpy as np

    allowed = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:  # NumPy < 2
        allowed.append(np.core.multiarray._reconstruct)
    try:  # deepspeed is not needed to read tanuki's own files
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # pragma: no cover
        return allowed
    return allowed + [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _allowlisted() -> Iterator[None]:
    # torch's safe_globals context removes its globals on exit even when an enclosing one had added
    # them (they live in one global set): add, and later remove, only those not there yet.
    present = set(map(id, torch.serialization.get_safe_globals()))
    missing = [g for g in torch_allowlist() if id(g) not in present]
    with torch.serialization.safe_globals(missing):
        yield


def _load_error(path, e: Exception, error: type[Exception]) -> Exception:
    if isinstance(e, pickle.UnpicklingError):
        reason = str(e)
        marker = "WeightsUnpickler error:"
        if marker in reason:
            reason = reason.split(marker, 1)[1].strip().splitlines()[0]
        return error(f"{path}: refused to load: it holds Python objects that are not tensors or plain data "
                     f"({reason}); tanuki reads .pt files with weights_only=True so that a file cannot run code. "
                     "It was not written by tanuki/DeepSpeed or has been tampered with")
    if isinstance(e, MemoryError):
        raise e
    return error(f"{path}: damaged or truncated, cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def load_pt(path: str | os.PathLike, error: type[Exception] = ValueError, *, map_location="cpu",
            mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` allowing :func:`torch_allowlist`; ``error`` naming the file
    when it holds anything else (nothing in it runs) or is damaged."""
    try:
        with _allowlisted():
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError, EOFError, UnpicklingError, ...)
        raise _load_error(path, e, error) from None


@contextlib.contextmanager
def safe_torch_loads() -> Iterator[None]:
    """Make every ``torch.load`` in the block ``weights_only=True`` with :func:`torch_allowlist`, including
    DeepSpeed's own calls (``zero_to_fp32``, the universal checkpoint readers), which pass
    ``weights_only=False`` explicitly: torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that argument.
    Callers check the files with :func:`load_pt` first, so that an error names the file."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        with _allowlisted():
            yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def open_safetensors(path: str | os.PathLike, error: type[Exception] = ValueError):
    """``safe_open(path, framework="pt")``, its tensors read on demand (memory-mapped); ``error`` naming
    the file and safetensors' reason if it cannot be read."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: not a readable safetensors file: damaged, truncated or another format ({e})") from None


def read_safetensors(
    path: str | os.PathLike, error: type[Exception] = ValueError
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and every tensor (CPU) of the safetensors file ``path``; ``error`` naming the file and
    safetensors' reason if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: not a readable safetensors file: damaged, truncated or another format ({e})") from None


class WriteError(OSError):
    """Writing an output failed (the disk is full, a read-only file system, no permission): the message
    names the output and the cause; nothing complete-looking was left behind."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]"
        return self.strerror or super().__str__()


_WRITE_CAUSES = {
    errno.ENOSPC: "the disk is full (ENOSPC)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
    errno.EROFS: "the file system is read-only (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "permission denied (EPERM)",
}


def write_error(what: str, e: OSError) -> WriteError:
    """A :class:`WriteError` for ``e`` raised while writing ``what`` (e.g. ``"the export hf/x"``)."""
    cause = _WRITE_CAUSES.get(e.errno, f"{e.strerror or e}")
    where = f" at {e.filename}" if e.filename else ""
    return WriteError(e.errno, f"writing {what} failed{where}: {cause}")


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the user's umask lets a new file have it (``tempfile`` makes 0600 files and 0700
    directories, which would keep an export from the user's group)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def is_model_dir(path: str | os.PathLike) -> bool:
    """A directory an export may replace: a Hugging Face model (``config.json`` and safetensors/bin
    weights) or a PEFT adapter (``adapter_config.json`` and its weights)."""
    p = Path(path)
    weights = any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")) or any(p.glob("pytorch_model*.bin"))
    return weights and ((p / "config.json").is_file() or (p / "adapter_config.json").is_file())


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool,
                     replaceable: Callable[[Path], bool] | None = is_model_dir) -> None:
    """``FileExistsError`` naming ``output_dir`` if writing there would destroy something: it is not empty
    and ``overwrite`` is off, or it is not empty and ``replaceable`` says it is not what the writer makes
    (``overwrite=true`` pointed at a dataset directory must not wipe it). Call it before long work."""
    output_dir = Path(output_dir)
    if not (output_dir.is_dir() and any(output_dir.iterdir())):
        if output_dir.exists() and not output_dir.is_dir():
            raise FileExistsError(f"{output_dir} exists and is not a directory")
        return
    if not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty (pass overwrite=True to replace it)")
    if replaceable is not None and not replaceable(output_dir):
        raise FileExistsError(
            f"{output_dir} is not empty and is not a model export (no config.json with weights): refusing to "
            "replace it even with overwrite; remove it yourself or choose another output directory")


@contextlib.contextmanager
def replacing_dir(output_dir: str | os.PathLike, replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A new temporary directory beside ``output_dir`` for the block to write into. When the block
    completes it replaces ``output_dir``; when the block raises it is removed and ``output_dir`` is left
    as it was. Its files and directories get the modes of the user's umask (not ``mkdtemp``'s 0700 or
    safetensors' 0600).

    ``replaceable``: a non-empty ``output_dir`` for which it returns False is refused
    (:func:`check_output_dir` with overwrite), before anything is written."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, True, replaceable)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    except OSError as e:
        raise write_error(str(output_dir), e) from None
    old = None
    try:
        yield tmp
        # mkdtemp makes 0700 and safetensors writes 0600: give everything the modes of the user's umask
        for sub, dirs, files in os.walk(tmp):
            for name in files:
                os.chmod(os.path.join(sub, name), umask_mode(0o666))
            for name in dirs:
                os.chmod(os.path.join(sub, name), umask_mode(0o777))
        os.chmod(tmp, umask_mode(0o777))
        if output_dir.exists():
            # Moved aside, not deleted first: a crash in between leaves the old directory, not none.
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
        os.replace(tmp, output_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / output_dir.name).exists() and not output_dir.exists():
            os.replace(old / output_dir.name, output_dir)
        if isinstance(e, OSError) and e.errno in _WRITE_CAUSES and not isinstance(e, WriteError):
            raise write_error(f"{output_dir} (nothing was left there)", e) from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
