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


# Fixtures of the kernel tests (test_kernels_*.py; their other helpers are in kernel_helpers.py).


@pytest.fixture
def seeded():
    """Seed torch's global generator, so that cotangents drawn with it do not depend on test order."""
    torch.manual_seed(0)


@pytest.fixture
def poisoned_empty():
    """Make torch.empty return NaN-filled memory, so that any output element a kernel leaves unwritten shows."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    device = "cuda" if _HAS_CUDA else "cpu"
    assert torch.isnan(torch.empty(4, device=device)).all()
    yield
    torch.use_deterministic_algorithms(previous)


# Training fixtures (test_train*.py, test_pretrain*.py, test_slurm.py).


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A 1280-piece tokenizer and a tokenized prefix of the bundled sample corpus (about 40k tokens)."""
    import io

    from tanuki.data.config import PreprocessConfig
    from tanuki.data.preprocess import preprocess
    from tanuki.tokenizer import BuildTokenizerConfig, build_tokenizer, sample_data_path

    tmp = tmp_path_factory.mktemp("tiny_corpus")
    lines = sample_data_path().read_text(encoding="utf-8").splitlines()[:500]
    (tmp / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_tokenizer(
        BuildTokenizerConfig(input=str(tmp / "corpus.jsonl"), output=str(tmp / "tok"), vocab_size=1280,
                             progress=False, threads=1, report_documents=20),
        log=io.StringIO(),
    )
    preprocess(PreprocessConfig(input=str(tmp / "corpus.jsonl"), tokenizer=str(tmp / "tok"),
                                output_prefix=str(tmp / "data" / "sample"), progress=False))
    return {"tokenizer": str(tmp / "tok"), "prefix": str(tmp / "data" / "sample"), "dir": tmp}


#: the smallest model that still has every part (GQA, two layers) and trains in a second per step
TINY_TRAIN = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.vocab_size=1280", "model.max_seq_len=128", "train.seq_len=32", "train.micro_batch_size=2",
    "train.global_batch_size=8", "train.max_steps=6", "train.warmup_steps=2", "train.lr=3e-3",
    "train.min_lr=3e-4", "train.eval_every=0", "logging.every=1", "logging.wandb.mode=disabled",
    "checkpoint.every=2", "checkpoint.keep_last=0", "train.precision=fp32",
]


def tiny_train_overrides(corpus: dict, run_dir, *extra: str) -> list[str]:
    return [f"data.prefixes=[{corpus['prefix']}]", f"tokenizer.path={corpus['tokenizer']}", f"run.dir={run_dir}",
            *TINY_TRAIN, *extra]


@pytest.fixture(scope="session")
def single_process_group():
    """A one-rank gloo process group for the in-process training tests, kept for the whole session:
    DeepSpeed caches its process groups in module globals, so a group destroyed and created again in
    the same process would leave it holding stale ones."""
    import torch.distributed as dist

    from tanuki.parallel.env import DistEnv, init_distributed

    init_distributed(DistEnv(0, 1, 0, "single"), "gloo")
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
