"""Chat tokenization shared by the SFT and preference data: rendered conversations to token ids and
their loss masks.

A conversation is rendered with a :class:`~tanuki.tokenizer.templates.ChatTemplate` (the template
writes BOS and EOS as text) and the text is tokenized once with ``add_special_tokens=False``: the
``<s>`` / ``</s>`` text is matched as the special tokens, exactly as
``apply_chat_template(tokenize=True)`` does, which :class:`TokenizerInfo` checks once per tokenizer.
:func:`assistant_targets` marks as targets the tokens whose characters lie in an assistant content +
EOS span of the rendering (``return_offsets_mapping``, with the byte-fallback offsets repaired by
:func:`refine_byte_offsets`), and :func:`check_targets` that each such run ends with the EOS: the masks
come from the rendering, never from searching the ids for a response marker.
"""

from __future__ import annotations

import re
from typing import Optional, Union

import numpy as np

from tanuki.data.records import SFTDataError
from tanuki.tokenizer.templates import AUTO, ChatTemplate, Rendered, get_template

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def as_template(template: Union[ChatTemplate, str]) -> ChatTemplate:
    """The template called ``template``, or ``template`` itself when it is one. (``auto`` needs the
    tokenizer: resolve it with :func:`tanuki.tokenizer.jinja_template.resolve_template`.)"""
    if template == AUTO:
        raise ValueError("template 'auto' is resolved against a tokenizer directory first "
                         "(tanuki.tokenizer.jinja_template.resolve_template)")
    return get_template(template) if isinstance(template, str) else template


def pad_token_id(tokenizer) -> int:
    """The id padding rows are filled with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def id_dtype(*ids: np.ndarray) -> type:
    """The dtype token ids are kept in: int32 when every id of ``ids`` fits it, else int64."""
    return np.int32 if all(a.size == 0 or int(a.max()) < 2**31 for a in ids) else np.int64


class TokenizerInfo:
    """What chat tokenization needs to know about a Hugging Face tokenizer, computed once: its BOS and
    EOS (checked to be read back as the special ids from the text a ``template`` writes), which ids
    are byte-fallback pieces, and the special-token texts a message content must not contain."""

    def __init__(self, tokenizer, template: ChatTemplate):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token
        self.eos = tokenizer.eos_token
        self.eos_id = tokenizer.eos_token_id
        if self.eos is None or self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; every assistant turn ends with one")
        if template.writes_bos and (self.bos is None or tokenizer.bos_token_id is None):
            raise ValueError(f"template {template.name!r} writes BOS but the tokenizer has none")
        #: the token that ends each assistant turn (the last target of a turn): the template's
        #: end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...), by default the EOS
        self.turn_end = template.end_of_turn or self.eos
        self.turn_end_id = self.eos_id if template.end_of_turn is None else tokenizer.convert_tokens_to_ids(self.turn_end)
        # The rendered text carries BOS/EOS as text: they must come out as the special ids, as in
        # apply_chat_template(tokenize=True). A tokenizer that does not match them in text would train
        # on the characters '<', '/', 's', '>' instead.
        probe = (self.bos if template.writes_bos else "") + "x" + self.turn_end
        ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if ids[-1] != self.turn_end_id or (template.writes_bos and ids[0] != tokenizer.bos_token_id):
            raise ValueError(
                f"the tokenizer does not read the text {self.bos!r} / {self.turn_end!r} as its BOS / end-of-turn tokens; "
                "chat templates write them as text (add them as special tokens of the tokenizer)"
            )
        vocab = tokenizer.get_vocab()
        self.is_byte = np.zeros(max(vocab.values()) + 1, dtype=bool)
        for piece, i in vocab.items():
            if _BYTE_PIECE.fullmatch(piece):
                self.is_byte[i] = True
        #: special-token texts that must not occur inside message contents
        self.special_texts = tuple(t for t in getattr(tokenizer, "all_special_tokens", []) if t)

    def special_text_in(self, text: str) -> Optional[str]:
        """The first special-token text found in ``text`` (it would turn into a control token, both
        here and in ``apply_chat_template``), or None."""
        return next((t for t in self.special_texts if t in text), None)


def refine_byte_offsets(ids: np.ndarray, offsets: np.ndarray, text: str, is_byte: np.ndarray) -> None:
    """Give each byte-fallback token the character its byte belongs to (in place).

    Hugging Face reports one offset range for a whole run of byte-fallback tokens (the bytes of
    "応答" both get the range of the two characters), which would blur the boundary between a
    header's last newline and a content's first character. When the run's text re-encodes to exactly
    as many UTF-8 bytes as there are tokens, the bytes are handed out character by character.
    """
    byte_pos = np.flatnonzero(is_byte[ids])
    if byte_pos.size == 0:
        return
    starts = np.ones(byte_pos.size, dtype=bool)
    prev, cur = byte_pos[:-1], byte_pos[1:]
    starts[1:] = (cur - prev != 1) | np.any(offsets[cur] != offsets[prev], axis=1)
    bounds = np.append(np.flatnonzero(starts), byte_pos.size)
    for a, b in zip(bounds[:-1], bounds[1:]):
        first = byte_pos[a]
        s, e = offsets[first]
        chunk = text[s:e]
        n = b - a
        if len(chunk) <= 1 or len(chunk.encode("utf-8")) != n:
            continue
        k = first
        for j, ch in enumerate(chunk):
            for _ in range(len(ch.encode("utf-8"))):
                offsets[k] = (s + j, s + j + 1)
                k += 1


def assistant_targets(rendered: Rendered, ids: np.ndarray, offsets: np.ndarray,
                      info: TokenizerInfo) -> tuple[np.ndarray, int]:
    """Which of the ids of ``rendered.text`` are targets: ``(target, boundary_tokens)``.

    ``offsets`` are the ``(start, end)`` characters of each token (``return_offsets_mapping``; the
    byte-fallback ones are repaired in place). A token is a target when any of its characters lies in
    an assistant content + EOS span (a zero-width token: when its position does); ``boundary_tokens``
    counts the targets with characters partly outside the spans (0 for the bundled templates and
    tanuki tokenizers). Check the result with :func:`check_targets`.
    """
    text = rendered.text
    refine_byte_offsets(ids, offsets, text, info.is_byte)
    inside = np.zeros(len(text) + 1, dtype=np.int64)
    for a, b in rendered.assistant_spans:
        inside[a:b] = 1
    covered_before = np.concatenate([[0], np.cumsum(inside)])
    s, e = offsets[:, 0], offsets[:, 1]
    covered = covered_before[e] - covered_before[s]
    zero_width = e == s
    target = np.where(zero_width, inside[np.minimum(s, len(text))] > 0, covered > 0)
    return target, int(np.sum(target & ~zero_width & (covered < e - s)))


def check_targets(rendered: Rendered, ids: np.ndarray, target: np.ndarray, info: TokenizerInfo, source: str = "") -> None:
    """:class:`SFTDataError` [bad_tokenization] naming ``source`` unless every run of targets ends
    with the EOS (or end-of-turn token) the template wrote after an assistant content, one run per
    assistant turn."""
    run_ends = np.flatnonzero(target & ~np.append(target[1:], False))
    if len(run_ends) != len(rendered.assistant_spans) or np.any(ids[run_ends] != info.turn_end_id):
        raise SFTDataError(source, "bad_tokenization",
                           "the assistant turns did not tokenize to content + EOS (a tokenizer problem)")
