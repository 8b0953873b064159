"""SentencePiece Unigram model -> Hugging Face fast tokenizer that gives the same ids.

The stock conversion paths in transformers give different ids than SentencePiece for this kind of
model (a BPE model through the Llama class, collapsed spaces or a lost dummy prefix through the
generic converter). What matches (measured in ``../shared/reference/tokenizer.md``, and tested in
``tests/test_tokenizer.py``) is a ``tokenizer.json`` built directly from the trained pieces:

* model: ``Unigram`` with the pieces and scores in SentencePiece's id order, ``byte_fallback=True``;
* normalizer: NFKC if trained with it (SentencePiece's own compiled table, see
  :func:`build_normalizer`), then prepend ``▁`` (the dummy prefix), then every space -> ``▁``;
* no pre-tokenizer: Metaspace would split runs of spaces apart and break indented code;
* decoder: byte fallback, ``▁`` -> space, fuse, strip the one leading space of the dummy prefix;
* special tokens matched in the *normalized* text (``normalized=True``), see below.

Special tokens in text. The Hugging Face tokenizer splits the text at special tokens and runs the
normalizer on each part. With the special tokens matched in the raw text (``normalized=False``) every
part after a special token got a dummy prefix of its own, so ``decode(encode("a <s> b"))`` gave
``"a <s>  b"`` (one space too many after each special token) and a chat template's ``<s>### ...``
encoded as ``<s> ▁###``. Matched in the normalized text instead, the whole text is normalized once,
so the one dummy prefix is the only ``▁`` added, and the decoder's strip removes exactly it. When the
text *starts* with a special token (a chat template's ``<s>``), the dummy prefix would become a lone
``▁`` token before it; the last normalizer step drops a ``▁`` at the very start that a special token
follows, and the decoder then has no leading space to strip (its strip only removes a space). Both
directions are exact for every text (identity normalization; with NFKC for NFKC-stable text).
Literal special-token text read as text (``split_special_tokens=True``, the data path) is unchanged,
except a text that starts with such a literal, which gets no dummy prefix (FastEncoder then encodes
it with the tokenizers library, see :mod:`tanuki.tokenizer.encode`).

Two differences between the two Viterbi implementations are removed here:

1. SentencePiece never matches control or byte pieces against text, but the Hugging Face Unigram
   lattice contains every piece. Byte, control and unknown pieces are therefore scored far below
   every normal piece, and the characters that spell them (``<``, ``0``-``9``, ``A``-``F``, ...) are
   required characters at training time (see :func:`required_chars`), so that a path of ordinary
   pieces always exists and wins over the literal ``<0x41>`` or ``</s>``.
2. SentencePiece sums piece scores in float32, Hugging Face in float64, so segmentations of equal
   score (``ww|w`` vs ``w|ww``) were broken differently by rounding on about 1% of code lines. The
   normal scores are rounded to multiples of 1/64 (:func:`quantize_scores`), in ``tokenizer.model``
   too: then both sums are exact up to 2**18 in magnitude (float32 has a 24-bit significand), so
   both pick the same path by the same tie rule. The change of any score is below 0.008 nats.
"""

from __future__ import annotations

import json
import os
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from tanuki.tokenizer.config import NUM_BYTE_PIECES, SpecialTokens

#: SentencePiece's space marker (U+2581)
SPACE_MARKER = "\u2581"
#: normal piece scores are multiples of 1 / SCORE_QUANTUM (see the module docstring)
SCORE_QUANTUM = 64
#: how far below the lowest normal piece the byte / control / unknown pieces are scored
SPECIAL_SCORE_GAP = 1000.0

# SentencePiece ModelProto.SentencePiece.Type values (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def byte_piece(b: int) -> str:
    """The name of the byte piece for byte value ``b``: ``<0x0A>``."""
    return f"<0x{b:02X}>"


def required_chars(specials: SpecialTokens) -> str:
    """Characters that must be pieces so that no literal text is read as a byte or control piece.

    Hugging Face's Unigram lattice matches every piece of the vocabulary against the text, the byte
    pieces ``<0x00>``.. and ``<s>``, ``</s>``, ``<unk>``, ``<pad>`` included (SentencePiece keeps
    them out of its trie). If every character of those names is itself a piece, the literal text is
    covered by ordinary pieces, whose path outscores the far lower byte or control piece.
    """
    names = [byte_piece(b) for b in range(NUM_BYTE_PIECES)] + [specials.unk, specials.bos, specials.eos, specials.pad]
    return "".join(sorted(set("".join(names))))


def quantize_scores(proto) -> None:
    """Round the scores of normal pieces to multiples of ``1 / SCORE_QUANTUM``, in place."""
    for piece in proto.pieces:
        if piece.type == NORMAL:
            piece.score = round(piece.score * SCORE_QUANTUM) / SCORE_QUANTUM


def hf_vocab(proto) -> list[tuple[str, float]]:
    """(piece, score) in id order for the Hugging Face Unigram model.

    Normal pieces keep their (quantized) score. User-defined pieces get the score SentencePiece's
    Viterbi gives them, ``length_in_bytes * max_normal_score - 0.1`` (``unigram_model.cc``,
    ``EncodeOptimized``), which makes them win wherever they occur. Byte, control and unknown pieces
    are put ``SPECIAL_SCORE_GAP`` below the lowest normal piece.
    """
    normal = [p.score for p in proto.pieces if p.type == NORMAL]
    if not normal:
        raise ValueError("the SentencePiece model has no normal pieces")
    lowest, highest = min(normal), max(normal)
    low = float(round((lowest - SPECIAL_SCORE_GAP) * SCORE_QUANTUM) / SCORE_QUANTUM)
    vocab = []
    for p in proto.pieces:
        if p.type == NORMAL:
            score = float(p.score)
        elif p.type == USER_DEFINED:
            score = len(p.piece.encode("utf-8")) * highest - 0.1
        else:
            score = low
        vocab.append((p.piece, score))
    return vocab


def build_normalizer(proto, normalization: str, specials: tuple[str, ...] = ()):
    """Hugging Face normalizer equivalent to SentencePiece's for ``normalization``.

    NFKC uses SentencePiece's compiled NFKC table (``Precompiled``), the one the model was trained
    and is encoded with. Hugging Face's own ``NFKC`` follows an older Unicode version: on random
    Unicode text it gave different ids for 14 in 3,000 strings against 1 for the compiled table.
    """
    steps = []
    if normalization == "nfkc":
        charsmap = proto.normalizer_spec.precompiled_charsmap
        if not charsmap:
            raise ValueError("the SentencePiece model was not trained with NFKC: it has no compiled table")
        steps.append(normalizers.Precompiled(charsmap))
    elif normalization != "identity":
        raise ValueError(f"unknown normalization {normalization!r}: use identity or nfkc")
    steps += [normalizers.Prepend(SPACE_MARKER), normalizers.Replace(" ", SPACE_MARKER)]
    if specials:
        # no dummy prefix in front of a special token at the very start (module docstring)
        steps.append(normalizers.Replace(Regex(leading_special_pattern(specials)), ""))
    return normalizers.Sequence(steps)


def leading_special_pattern(specials: tuple[str, ...]) -> str:
    """The (Oniguruma) regex of a dummy prefix directly followed by one of ``specials``, at the start."""
    alternatives = "|".join(re.escape(t.replace(" ", SPACE_MARKER)) for t in sorted(specials, key=len, reverse=True))
    return f"\\A{SPACE_MARKER}(?={alternatives})"


def build_hf_tokenizer(proto, specials: SpecialTokens, normalization: str):
    """A ``tokenizers.Tokenizer`` that encodes like the SentencePiece model ``proto``."""
    vocab = hf_vocab(proto)
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    for tok in specials.ordered:
        if tok not in ids:
            raise ValueError(f"special token {tok!r} is not in the SentencePiece model")
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=ids[specials.unk], byte_fallback=True))
    tokenizer.normalizer = build_normalizer(proto, normalization, tuple(specials.ordered))
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Replace(SPACE_MARKER, " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # `tokenizer(text)` adds BOS (as Llama and llm-jp-3 do); chat templates write BOS themselves and
    # are tokenized with add_special_tokens=False.
    bos = specials.bos
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
    )
    # The special tokens are matched in text so that chat templates can write them; encode with
    # split_special_tokens=True (as FastEncoder does) to treat such literals in data as plain text.
    # normalized=True: matched in the normalized text, so the text around them keeps exactly its
    # spaces (module docstring, "Special tokens in text").
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in specials.ordered])
    return tokenizer


def tokenizer_config(specials: SpecialTokens, chat_template: str) -> dict:
    """Contents of ``tokenizer_config.json``: the generic fast tokenizer class, no custom code."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "unk_token": specials.unk,
        "pad_token": specials.pad,
        "additional_special_tokens": list(specials.user_defined),
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


def special_tokens_map(specials: SpecialTokens) -> dict:
    return {
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "unk_token": specials.unk,
        "pad_token": specials.pad,
        "additional_special_tokens": list(specials.user_defined),
    }


def write_tokenizer_files(
    out_dir: str, proto, specials: SpecialTokens, normalization: str, chat_template: str
) -> None:
    """Write ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into ``out_dir`` (which must exist)."""
    tokenizer = build_hf_tokenizer(proto, specials, normalization)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(specials, chat_template))
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special_tokens_map(specials))


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def rewrite_tokenizer_json(tokenizer_dir: str) -> None:
    """Write ``tokenizer.json`` again from the ``tokenizer.model`` and ``report.json`` of a directory
    built by tanuki, with this module's conversion: for a tokenizer built before special tokens were
    matched in the normalized text (ids of ordinary text and ``tokenizer.model`` do not change; the
    text after a special token no longer gets a dummy prefix of its own). Atomic (temp file + rename)."""
    from sentencepiece import sentencepiece_model_pb2

    with open(os.path.join(tokenizer_dir, "tokenizer.model"), "rb") as f:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(f.read())
    with open(os.path.join(tokenizer_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    s = report["special_tokens"]
    specials = SpecialTokens(unk=s["unk"]["token"], bos=s["bos"]["token"], eos=s["eos"]["token"],
                             pad=s["pad"]["token"], user_defined=tuple(t["token"] for t in s["user_defined"]))
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    build_hf_tokenizer(proto, specials, report["normalization"]).save(path + ".tmp")
    os.replace(path + ".tmp", path)
