"""Loading a tokenizer directory, and the fast batch encoder used by preprocessing."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer

from tanuki.tokenizer.convert import SPACE_MARKER

#: report.json key that marks a directory written by tanuki's builder, whose tokenizer.model encodes
#: exactly like its tokenizer.json
BUILDER_MARK = "tanuki.tokenizer"


def load(path: str | os.PathLike):
    """The Hugging Face tokenizer in ``path`` (a ``PreTrainedTokenizerFast``; no remote code)."""
    # lazy: transformers is slow to import, and preprocessing workers load this module for FastEncoder
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{path}: no tokenizer.json; build one with launch/build_tokenizer.py")
    return PreTrainedTokenizerFast.from_pretrained(path)


def built_by_tanuki(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a tokenizer written by :func:`tanuki.tokenizer.build_tokenizer`."""
    report = os.path.join(os.fspath(path), "report.json")
    if not os.path.isfile(report) or not os.path.isfile(os.path.join(os.fspath(path), "tokenizer.model")):
        return False
    try:
        with open(report, encoding="utf-8") as f:
            return json.load(f).get("builder") == BUILDER_MARK
    except (OSError, ValueError):
        return False


class FastEncoder:
    """Batch encoder giving the same ids as the Hugging Face tokenizer, without special tokens added.

    ``encode_batch(texts)`` equals ``[tok(t, add_special_tokens=False, split_special_tokens=True).input_ids
    for t in texts]`` for ``tok = load(path)``: no BOS/EOS is added, and special-token literals such as
    ``<s>`` inside the text are encoded as text, never as control tokens (training data must not be
    able to smuggle them in). For text without such literals this is the same as plain
    ``tok(t, add_special_tokens=False)``.

    For a directory built by tanuki it runs SentencePiece, several times faster per core than Hugging
    Face's ``encode_batch``; for any other directory it falls back to the ``tokenizers`` library.
    Construction is cheap (it loads one model file) and instances pickle by path, so a
    multiprocessing pool can create or receive one per worker.
    """

    def __init__(self, path: str | os.PathLike, backend: Optional[str] = None):
        self.path = os.fspath(path)
        if backend is None:
            backend = "sentencepiece" if built_by_tanuki(self.path) else "tokenizers"
        if backend not in ("sentencepiece", "tokenizers"):
            raise ValueError(f"backend must be 'sentencepiece' or 'tokenizers', got {backend!r}")
        self.backend = backend
        if backend == "sentencepiece":
            self._load_sentencepiece()
        else:
            self._load_tokenizers()

    # -- loading ------------------------------------------------------------------------------------

    def _load_sentencepiece(self) -> None:
        with open(os.path.join(self.path, "tokenizer.model"), "rb") as f:
            data = f.read()
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
        # Documents are encoded line by line (see encode_batch), so lines after the first need a
        # processor without the dummy-prefix space.
        self._sp_first = spm.SentencePieceProcessor(model_proto=data)
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_rest = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        sp = self._sp_first
        self.vocab_size = sp.get_piece_size()
        self.unk_id = sp.unk_id()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        self.pad_id = sp.pad_id()
        self._newline_id = sp.piece_to_id("<0x0A>")
        # Splitting at newlines is exact only if no piece contains one; the builder never trains on
        # text with newlines, but check rather than assume.
        self._split_lines = self._newline_id != self.unk_id and not any(
            "\n" in p.piece for p in proto.pieces if p.type != 6  # 6: byte piece
        )
        # SentencePiece sums scores in float32. With scores on a 1/64 grid (tanuki.tokenizer.convert)
        # every sum below 2**18 in magnitude is exact, so it breaks ties exactly as Hugging Face's
        # float64 does. A path never costs more per character than the unknown-character score
        # (lowest normal score - 10) or a user-defined piece (up to 4 bytes * highest score - 0.1),
        # which bounds the length of text encoded in one piece safely.
        normal = [p.score for p in proto.pieces if p.type == 1]
        per_char = max(abs(min(normal)) + 10.0, 4 * abs(max(normal)) + 0.1)
        self._exact_chars = int(2**18 / per_char) - 2
        # The Hugging Face normalizer gives a text that starts with a special-token literal no dummy
        # prefix (tanuki.tokenizer.convert, "Special tokens in text"); such texts are encoded by the
        # processor without one. Its normalized start tells (a tokenizer.json from before that rule
        # always starts with the prefix, and so encodes every text with it, as it did then).
        tok_file = os.path.join(self.path, "tokenizer.json")
        self._normalizer = Tokenizer.from_file(tok_file).normalizer if os.path.isfile(tok_file) else None
        specials = [p.piece for p in proto.pieces if p.type in (2, 3, 4)]  # unknown, control, user-defined
        self._probe_chars = 4 * max(map(len, specials), default=0) + 8

    def _load_tokenizers(self) -> None:
        tok_file = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{self.path}: no tokenizer.json")
        self._tok = Tokenizer.from_file(tok_file)
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = _special_tokens(self.path)
        self.unk_id = self._token_id(specials.get("unk_token"))
        self.bos_id = self._token_id(specials.get("bos_token"))
        self.eos_id = self._token_id(specials.get("eos_token"))
        self.pad_id = self._token_id(specials.get("pad_token"))

    def _token_id(self, token) -> int:
        if isinstance(token, dict):
            token = token.get("content")
        if not token:
            return -1
        i = self._tok.token_to_id(token)
        return -1 if i is None else i

    # -- pickling: by path, so that workers load their own copy -------------------------------------

    def __getstate__(self) -> dict:
        return {"path": self.path, "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], backend=state["backend"])

    def __repr__(self) -> str:
        return f"FastEncoder({self.path!r}, backend={self.backend!r}, vocab_size={self.vocab_size})"

    # -- encoding -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, no special tokens added. Runs on the calling thread only."""
        texts = list(texts)
        if self.backend == "tokenizers":
            return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]
        limit = self._exact_chars
        lead = [self._starts_with_special(t) for t in texts]
        if not any(lead) and (not self._split_lines or not texts or max(map(len, texts)) <= limit):
            return self._sp_first.encode(texts, out_type=int, num_threads=1)
        simple = [len(t) <= limit or not self._split_lines for t in texts]
        out = self._sp_first.encode([t if ok and not sp else "" for t, ok, sp in zip(texts, simple, lead)],
                                    out_type=int, num_threads=1)
        for i, text in enumerate(texts):
            if not simple[i]:
                out[i] = self._encode_by_lines(text, dummy_prefix=not lead[i])
            elif lead[i]:
                out[i] = self._sp_rest.encode(text, out_type=int)
        return out

    def _starts_with_special(self, text: str) -> bool:
        """Whether Hugging Face's normalizer gives ``text`` no dummy prefix (it starts with a special-token
        literal)."""
        if self._normalizer is None or not text:
            return False
        return not self._normalizer.normalize_str(text[:self._probe_chars]).startswith(SPACE_MARKER)

    def _encode_by_lines(self, text: str, dummy_prefix: bool = True) -> list[int]:
        """A long document line by line, so that SentencePiece's float32 sums stay exact.

        No piece contains a newline, so every segmentation passes through each newline (a byte
        piece) and the best path of the whole text is the best paths of its lines joined by it.
        Only a single line longer than the exact range can still differ from Hugging Face, and
        then only where two segmentations have exactly equal scores.
        """
        lines = text.split("\n")
        # The dummy-prefix space belongs before the first line even when that line is empty.
        if not dummy_prefix:
            ids = self._sp_rest.encode(lines[0], out_type=int)
        else:
            ids = self._sp_first.encode(lines[0], out_type=int) if lines[0] else self._sp_rest.encode(" ", out_type=int)
        rest = self._sp_rest.encode(lines[1:], out_type=int, num_threads=1)
        for line_ids in rest:
            ids.append(self._newline_id)
            ids.extend(line_ids)
        return ids


def _special_tokens(path: str) -> dict:
    found: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            for key in ("unk_token", "bos_token", "eos_token", "pad_token"):
                if key in data and key not in found:
                    found[key] = data[key]
    return found
