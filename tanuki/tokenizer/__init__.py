"""Tokenizer: build (train SentencePiece Unigram + convert + report) and load.

* :func:`build_tokenizer` with a :class:`BuildTokenizerConfig` (``launch/build_tokenizer.py``)
* :func:`load` -> Hugging Face ``PreTrainedTokenizerFast`` for the rest of the stack
* :class:`FastEncoder` -> identical ids, several times faster, for preprocessing workers
* :func:`report_for_directory` (``launch/tokenizer_report.py``) measures any tokenizer directory
* :func:`sample_data_path` -> the bundled bilingual sample corpus
"""

from __future__ import annotations

import importlib.resources
import pathlib

from tanuki.tokenizer.build import TokenizerBuildError, build_tokenizer
from tanuki.tokenizer.config import (
    BuildTokenizerConfig,
    SpecialTokens,
    TokenizerReportConfig,
)
from tanuki.tokenizer.encode import FastEncoder, load
from tanuki.tokenizer.report import (
    detect_language,
    format_summary,
    report_for_directory,
)
from tanuki.tokenizer.templates import DEFAULT_CHAT_TEMPLATE, JAPANESE_ALPACA_TEMPLATE


def sample_data_path(name: str = "corpus.jsonl") -> pathlib.Path:
    """Path of a file of the bundled sample data (``tanuki/sample_data/``), e.g. ``corpus.jsonl``."""
    path = pathlib.Path(str(importlib.resources.files("tanuki").joinpath("sample_data", name)))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled sample file {name!r} in {path.parent}")
    return path


__all__ = [
    "BuildTokenizerConfig",
    "DEFAULT_CHAT_TEMPLATE",
    "FastEncoder",
    "JAPANESE_ALPACA_TEMPLATE",
    "SpecialTokens",
    "TokenizerBuildError",
    "TokenizerReportConfig",
    "build_tokenizer",
    "detect_language",
    "format_summary",
    "load",
    "report_for_directory",
    "sample_data_path",
]
