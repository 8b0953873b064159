"""Shared test set-up: CPU-friendly threading, the Triton interpreter, config composition helpers."""

import os
from pathlib import Path

# The Triton interpreter must be chosen before any kernel module is imported; on a machine without a
# GPU every Triton test runs through it.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def pytest_configure(config):
    # pytest-xdist runs two workers on two cores: one intra-op thread each avoids oversubscription.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose(config_name: str, overrides=()):
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides, as Hydra would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))
