"""The data pipeline: Megatron indexed datasets, preprocessing, packed GPT samples, blending, loading.

Read in the order of the data flow:

* :mod:`tanuki.data.indexed`: the ``.bin``/``.idx`` format, a memory-mapped reader and a writer.
* :mod:`tanuki.data.preprocess`: raw text to indexed datasets with several encoding processes.
* :mod:`tanuki.data.gpt_dataset`: windows of ``seq_len + 1`` tokens packed across documents.
* :mod:`tanuki.data.blend`: weighted interleaving of datasets; train/validation blends from a config.
* :mod:`tanuki.data.loader`: one data-parallel rank's micro-batches; the state is consumed samples.
* :mod:`tanuki.data.info`: the report of ``launch/data_info.py``.

The chat data of fine-tuning, from JSONL (imported from their modules, not from this package):

* :mod:`tanuki.data.records`: JSONL records with ``file:line`` in errors, messages, Alpaca records,
  the train/validation split, the keys shared by the stages' ``data`` configs, eval prompts.
* :mod:`tanuki.data.chat_tokens`: rendering with a chat template and tokenizing to ids and loss masks.
* :mod:`tanuki.data.sft`: SFT samples, truncation, packing, the dataset and loader.
* :mod:`tanuki.data.preference`: preference pairs for DPO, truncation, batches, the dataset and loader.
"""

from tanuki.data.blend import (
    BlendedDataset,
    PretrainDatasets,
    build_blend_index,
    build_pretrain_datasets,
)
from tanuki.data.config import DataConfig, DataInfoConfig, PreprocessConfig
from tanuki.data.gpt_dataset import GPTDataset
from tanuki.data.indexed import IndexedDataset, IndexedDatasetWriter, IndexedFormatError

__all__ = [
    "BlendedDataset",
    "DataConfig",
    "DataInfoConfig",
    "DataLoader",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "IndexedFormatError",
    "PreprocessConfig",
    "PretrainDatasets",
    "build_blend_index",
    "build_pretrain_datasets",
]


def __getattr__(name: str):
    # The loader needs torch; importing it lazily spares `launch/preprocess.py` and
    # `launch/data_info.py` (and every preprocessing worker) torch's import time.
    if name == "DataLoader":
        from tanuki.data.loader import DataLoader

        return DataLoader
    raise AttributeError(f"module 'tanuki.data' has no attribute {name!r}")
