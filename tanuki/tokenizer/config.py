"""Typed configs of the tokenizer builder (``conf/build_tokenizer.yaml``) and of the tokenizer report
(``conf/tokenizer_report.yaml``), converted from Hydra with :func:`tanuki.config.from_dict`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from omegaconf import OmegaConf

from tanuki.config import ConfigError, require

#: the 256 byte pieces ``<0x00>`` .. ``<0xFF>`` that follow the special tokens
NUM_BYTE_PIECES = 256


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens and their ids.

    Ids, in this order: ``unk`` = 0, ``bos`` = 1, ``eos`` = 2, ``pad`` = 3, then ``user_defined`` from
    4 on, then the 256 byte pieces, then the learned pieces. User-defined tokens (chat-role markers,
    say) are always one token, both in SentencePiece and in Hugging Face.
    """

    unk: str = "<unk>"
    #: beginning of sequence: written by the chat template and by ``tokenizer(text)``
    bos: str = "<s>"
    #: end of sequence: ends every document in pretraining data and every assistant turn
    eos: str = "</s>"
    pad: str = "<pad>"
    #: extra tokens kept whole, e.g. ``["<|user|>", "<|assistant|>"]``
    user_defined: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = {"unk": self.unk, "bos": self.bos, "eos": self.eos, "pad": self.pad}
        for i, tok in enumerate(self.user_defined):
            names[f"user_defined[{i}]"] = tok
        seen: dict[str, str] = {}
        for key, tok in names.items():
            full = f"special_tokens.{key}"
            require(bool(tok), full, "must not be empty")
            # Whitespace would be escaped to U+2581 before SentencePiece matches pieces, so such a
            # token could never be produced from text; the fast encoder also relies on no piece
            # containing a newline.
            require(not any(ch.isspace() for ch in tok), full, f"{tok!r} must not contain whitespace")
            require(tok != "\u2581" and "\u2581" not in tok, full, "must not contain U+2581, the space marker")
            require(
                not (tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6),
                full,
                f"{tok!r} has the form of a byte piece <0xNN>",
            )
            require(tok not in seen, full, f"{tok!r} is already used by special_tokens.{seen.get(tok)}")
            seen[tok] = key

    @property
    def ordered(self) -> list[str]:
        """All special tokens in id order."""
        return [self.unk, self.bos, self.eos, self.pad, *self.user_defined]


@dataclass(frozen=True)
class BuildTokenizerConfig:
    """``conf/build_tokenizer.yaml``: train a SentencePiece Unigram tokenizer and write a Hugging Face one."""

    #: training text: a file, a glob, a comma-separated list, or a list (.txt / .jsonl, optionally .gz / .zst)
    input: Union[str, tuple[str, ...]]
    #: output directory (must not exist or be empty unless overwrite=true)
    output: str
    #: number of pieces including the special tokens and the 256 byte pieces (the tokenizer is not padded)
    vocab_size: int
    #: JSONL field that holds the text
    text_key: str = "text"
    #: JSONL field with a language label (ja, en, code, ...) used by the report; detected when absent
    lang_key: str = "lang"
    #: .txt files: one document per line ("line") or blank-line separated paragraphs ("paragraph")
    txt_mode: Literal["line", "paragraph"] = "line"
    #: bad input lines (invalid UTF-8 or JSON, missing text_key): stop ("fail") or count and skip ("skip")
    on_error: Literal["fail", "skip"] = "fail"
    #: text normalization applied before tokenizing: none ("identity") or Unicode NFKC ("nfkc")
    normalization: Literal["identity", "nfkc"] = "identity"
    #: split numbers into single digits
    split_digits: bool = True
    #: share of characters covered by character pieces; the rarest rest is encoded as UTF-8 bytes
    character_coverage: float = 0.9995
    #: longest training line in UTF-8 bytes (SentencePiece's limit); longer lines are counted and
    #: reported, then skipped or split according to long_lines
    max_sentence_length: int = 4192
    #: what to do with training lines longer than max_sentence_length: "skip" them or "split" them
    long_lines: Literal["skip", "split"] = "skip"
    #: train on a seeded uniform sample of this many lines (0: all lines); the corpus is streamed
    #: once, so a corpus larger than memory trains with sampling
    sample_sentences: int = 0
    #: seed of the line sample and the report sample
    seed: int = 1234
    #: longest piece in characters (whitespace runs included)
    max_piece_length: int = 16
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    #: the model's embedding rows: vocab_size rounded up to a multiple of this (recorded in report.json)
    pad_to_multiple_of: int = 128
    #: SentencePiece training threads (0: all CPU cores)
    threads: int = 0
    #: documents, sampled from the input with the seed, on which report.json measures compression
    report_documents: int = 2000
    #: replace an existing non-empty output directory
    overwrite: bool = False
    #: show progress bars on stderr
    progress: bool = True

    def __post_init__(self) -> None:
        specials = len(self.special_tokens.ordered)
        smallest = specials + NUM_BYTE_PIECES + 1
        require(
            self.vocab_size >= smallest,
            "vocab_size",
            f"{self.vocab_size} leaves no room for learned pieces: {specials} special tokens and "
            f"{NUM_BYTE_PIECES} byte pieces come first, so use at least {smallest} (a few thousand in practice)",
        )
        require(bool(self.output), "output", "is required: the directory to write the tokenizer to")
        inputs = (self.input,) if isinstance(self.input, str) else self.input
        require(any(s.strip() for s in inputs), "input", "is required: a file, glob or list of files")
        require(bool(self.text_key), "text_key", "must not be empty")
        require(
            0.0 < self.character_coverage <= 1.0,
            "character_coverage",
            f"must be in (0, 1], got {self.character_coverage}",
        )
        require(self.max_sentence_length > 0, "max_sentence_length", "must be positive")
        require(self.sample_sentences >= 0, "sample_sentences", "must be >= 0 (0: use all lines)")
        require(1 <= self.max_piece_length <= 16, "max_piece_length", "must be in [1, 16] (SentencePiece's limit)")
        require(self.pad_to_multiple_of >= 1, "pad_to_multiple_of", "must be >= 1")
        require(self.threads >= 0, "threads", "must be >= 0 (0: all cores)")
        require(self.report_documents >= 1, "report_documents", "must be >= 1")

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


@dataclass(frozen=True)
class TokenizerReportConfig:
    """``conf/tokenizer_report.yaml``: measure any Hugging Face tokenizer directory on some text."""

    #: tokenizer directory (anything ``AutoTokenizer.from_pretrained`` loads without remote code)
    tokenizer: str
    #: text to measure on: file, glob, comma-separated list or list (.txt / .jsonl, optionally compressed)
    input: Union[str, tuple[str, ...]]
    text_key: str = "text"
    #: JSONL field with a language label; detected when absent
    lang_key: str = "lang"
    txt_mode: Literal["line", "paragraph"] = "line"
    on_error: Literal["fail", "skip"] = "fail"
    #: measure only the first this many documents (0: all)
    max_documents: int = 0
    #: also write the report as JSON to this path
    output: Optional[str] = None
    #: padding of the model's vocabulary reported next to the tokenizer's size
    pad_to_multiple_of: int = 128
    progress: bool = True

    def __post_init__(self) -> None:
        require(bool(self.tokenizer), "tokenizer", "is required: a tokenizer directory")
        inputs = (self.input,) if isinstance(self.input, str) else self.input
        require(any(s.strip() for s in inputs), "input", "is required: a file, glob or list of files")
        require(self.max_documents >= 0, "max_documents", "must be >= 0 (0: all)")
        require(self.pad_to_multiple_of >= 1, "pad_to_multiple_of", "must be >= 1")

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


def check_required(cfg, keys: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` for a mandatory Hydra value (``???``) left unset on the command line."""
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k)]
    if missing:
        k = missing[0]
        raise ConfigError(k, f"is required: add {k}=... to the command line")
