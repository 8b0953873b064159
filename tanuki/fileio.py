"""The files of model directories: readers whose errors name the file, and atomic directory writes.

* :func:`read_json`: a JSON file; ``<file>: invalid JSON at line N: <reason>`` when it is not valid JSON.
* :func:`open_safetensors` (lazily, tensor by tensor) and :func:`read_safetensors` (all of it): a
  safetensors file; ``<file>: not a readable safetensors file (<reason>)`` when safetensors cannot read it.
* :func:`replacing_dir`: a directory assembled under a temporary name beside its destination and renamed
  into place only when complete.

The readers raise the caller's error class (:class:`~tanuki.hf.HFFormatError` for a Hugging Face
directory, ``ValueError`` for a tanuki model file), so each module keeps its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The contents of the JSON file ``path``; ``error`` naming the file and the line if it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def open_safetensors(path: str | os.PathLike, error: type[Exception] = ValueError):
    """``safe_open(path, framework="pt")``, its tensors read on demand (memory-mapped); ``error`` naming
    the file and safetensors' reason if it cannot be read."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from None


def read_safetensors(
    path: str | os.PathLike, error: type[Exception] = ValueError
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and every tensor (CPU) of the safetensors file ``path``; ``error`` naming the file and
    safetensors' reason if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from None


@contextlib.contextmanager
def replacing_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A new temporary directory beside ``output_dir`` for the block to write into. When the block
    completes it replaces ``output_dir`` (removed first if it exists); when the block raises it is
    removed and ``output_dir`` is left as it was."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield tmp
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
