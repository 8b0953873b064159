"""tanuki's own weight files and checkpoint reading.

A *model file* is a safetensors file with tanuki parameter names whose metadata carries the model
config (``tanuki.model_config``, JSON), so that it can be exported or reloaded without the run's config.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from tanuki.config import ModelConfig, from_dict, to_dict

MODEL_CONFIG_KEY = "tanuki.model_config"


def save_model_file(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike) -> Path:
    """Write ``state_dict`` and ``cfg`` to one safetensors file, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if not k.endswith("inv_freq")}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", MODEL_CONFIG_KEY: json.dumps(to_dict(cfg))})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model_file(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_model_file`: its model config and state dict."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if MODEL_CONFIG_KEY not in meta:
        raise ValueError(f"{path}: safetensors file without '{MODEL_CONFIG_KEY}' metadata (not written by tanuki)")
    cfg = from_dict(ModelConfig, json.loads(meta[MODEL_CONFIG_KEY]), prefix="model")
    return cfg, sd
