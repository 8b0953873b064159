"""Supervised fine-tuning data: conversations from JSONL, rendered with a chat template, tokenized with
assistant-only labels, packed into rows of ``seq_len`` tokens, and served to data-parallel ranks.

Read in the order of the data flow:

1. :func:`read_conversations`: JSONL records, each either ``{"messages": [{"role", "content"}, ...]}``
   (roles ``system`` / ``user`` / ``assistant``, multi-turn, the system message optional and first) or
   Alpaca style ``{"instruction", "input" (optional), "output"}``, converted by
   :func:`alpaca_to_messages`. A bad record (invalid JSON, unknown role, no assistant turn, empty
   content, ...) is an :class:`SFTDataError` naming ``file:line``, or with ``on_error="skip"`` is
   counted by reason and left out.
2. :func:`tokenize_conversations`: render with a :class:`~tanuki.tokenizer.templates.ChatTemplate`,
   tokenize the rendered text once with ``add_special_tokens=False`` (the template writes BOS itself;
   the ``<s>`` / ``</s>`` text it writes is matched as the special tokens, exactly as
   ``apply_chat_template(tokenize=True)`` does), and mark as targets the tokens whose characters lie
   in an assistant content + EOS span of the rendering (``return_offsets_mapping``). The masks come
   from the rendering, never from searching the ids for a response marker.
3. :func:`fit_to_length`: the truncation policy for samples longer than ``seq_len`` (``drop``, or
   ``truncate``: keep the head, drop it if no target is left), counted in :class:`SFTStats`.
4. :func:`pack_plan` / :func:`pack` and :class:`SFTDataset`: first-fit packing of samples into rows of
   ``seq_len`` positions (or one sample per padded row), with positions restarting at 0 in each sample
   and a distinct segment id per sample, so that the model's block-diagonal causal mask
   (:func:`tanuki.model.segment_mask`) keeps samples apart.
5. :class:`SFTDataLoader`: the micro-batches of one data-parallel rank, with the contract of
   :class:`tanuki.data.loader.DataLoader` (the position of a run is ``consumed_samples``).

Row layout. A sample of ``L`` token ids occupies ``L - 1`` positions of a row: ``tokens = ids[:-1]``
and ``labels[t] = ids[t + 1]`` where ``ids[t + 1]`` is a target, else :data:`~tanuki.losses.IGNORE_INDEX`
(the labels are pre-aligned, as :func:`tanuki.losses.causal_lm_loss` expects). The last id (the final
EOS) is never an input: nothing is learned from what follows it. Padding has token ``pad_id``, label
-100, position 0 and segment id -1.

Loss normalisation. Every label that is not -100 is one loss token; :func:`count_loss_tokens` counts
them in a batch and :meth:`SFTDataLoader.global_loss_tokens` counts them in the coming global batch
(all ranks, all accumulation micro-steps) from the dataset alone, so each rank knows the normaliser
of ``sum of token losses / loss tokens in the global batch`` without communication.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from tanuki.config import ConfigError
from tanuki.data.gpt_dataset import split_documents
from tanuki.data.loader import DataLoader
from tanuki.losses import IGNORE_INDEX
from tanuki.tokenizer.templates import (
    JAPANESE_ALPACA_INPUT_HEADER,
    JAPANESE_ALPACA_INPUT_SYSTEM,
    JAPANESE_ALPACA_SYSTEM,
    ROLES,
    ChatTemplate,
    get_template,
)

#: the keys of a row / micro-batch, each int64 ``(seq_len,)`` / ``(micro_batch_size, seq_len)``
BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids")
#: segment id of padding positions
PAD_SEGMENT = -1

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


@dataclass(frozen=True)
class SFTDataConfig:
    """``data`` of an SFT run: which JSONL files, how to split, pack and truncate them."""

    #: JSONL files: a path, a glob, a comma-separated list, or a list of those
    path: Union[str, tuple[str, ...]] = ()
    #: separate validation files (instead of valid_fraction)
    valid_path: Union[str, tuple[str, ...]] = ()
    #: fraction of the conversations held out for validation (0: no split)
    valid_fraction: float = 0.0
    #: seed of the train/validation split; separate from ``seed`` so that changing the shuffle never
    #: moves a conversation between the splits
    split_seed: int = 0
    #: seed of the sample shuffle and of the packing (a different order every epoch)
    seed: int = 1234
    #: several samples per row (first-fit) instead of one padded sample per row
    packing: bool = True
    #: samples longer than train.seq_len: ``truncate`` keeps the head (and drops a sample left with
    #: no assistant token), ``drop`` leaves them out; either way counted and reported
    truncation: Literal["drop", "truncate"] = "truncate"
    #: bad records: ``fail`` (stop, naming file:line) or ``skip`` (count by reason)
    on_error: Literal["fail", "skip"] = "fail"

    def __post_init__(self) -> None:
        _require(0.0 <= self.valid_fraction < 1.0, "data.valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        _require(
            not (self.valid_fraction > 0 and _as_list(self.valid_path)),
            "data.valid_path",
            "give either data.valid_fraction or data.valid_path, not both",
        )

    @property
    def paths(self) -> list[str]:
        return _as_list(self.path)

    @property
    def valid_paths(self) -> list[str]:
        return _as_list(self.valid_path)


def _as_list(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        out += [s.strip() for s in os.fspath(p).split(",") if s.strip()]
    return out


def expand_paths(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], key: str = "data.path") -> list[str]:
    """Files named by ``paths`` (paths, globs, comma-separated lists), in the order given."""
    files: list[str] = []
    for p in _as_list(paths):
        if any(c in p for c in "*?["):
            matched = sorted(glob.glob(p, recursive=True))
            if not matched:
                raise ConfigError(key, f"'{p}' matches no file")
            files += matched
        elif not os.path.isfile(p):
            raise ConfigError(key, f"'{p}' is not a file")
        else:
            files.append(p)
    if not files:
        raise ConfigError(key, "no input files given")
    return files


# --------------------------------------------------------------------------------------------------
# Records -> conversations
# --------------------------------------------------------------------------------------------------


class SFTDataError(ValueError):
    """A bad SFT record; the message starts with ``file:line``. ``reason`` is the key it is counted
    under when bad records are skipped."""

    def __init__(self, source: str, reason: str, message: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {message}" if source else message)


@dataclass(frozen=True)
class Conversation:
    """Validated messages (``{"role", "content"}`` dicts) and where they came from (``file:line``)."""

    messages: tuple[dict[str, str], ...]
    source: str = ""


def alpaca_to_messages(instruction: str, input: str = "", output: Optional[str] = None) -> list[dict[str, str]]:
    """An Alpaca record as messages.

    A system message carrying the Japanese Alpaca system sentence comes first, so that ``alpaca_ja``
    renders the instruction exactly as llm-jp-3 instruct was prompted. With a non-empty ``input`` the
    sentence is the "文脈のある入力" variant and the user turn is ``instruction + "\\n\\n### 入力:\\n" +
    input``, which ``alpaca_ja`` renders exactly as the evaluation harnesses' input variant. (Other
    templates render the system sentence as an ordinary system prompt.) ``output``, if given, is the
    assistant turn.
    """
    if input:
        messages = [
            {"role": "system", "content": JAPANESE_ALPACA_INPUT_SYSTEM},
            {"role": "user", "content": instruction + JAPANESE_ALPACA_INPUT_HEADER + input},
        ]
    else:
        messages = [{"role": "system", "content": JAPANESE_ALPACA_SYSTEM}, {"role": "user", "content": instruction}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


def _text_field(record: Mapping, key: str, source: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise SFTDataError(source, "bad_record", f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise SFTDataError(source, "empty_content", f"'{key}' is empty")
    return value


def validate_messages(messages: Any, source: str = "", *, need_assistant: bool = True) -> tuple[dict[str, str], ...]:
    """Check a ``messages`` list; returns it as a tuple of plain ``{"role", "content"}`` dicts.

    Errors (:class:`SFTDataError`, reason in brackets): not a non-empty list of objects [bad_record],
    a role other than system/user/assistant [unknown_role], empty or non-string content
    [empty_content], a system message that is not the first [system_not_first], no assistant turn
    [no_assistant] (unless ``need_assistant=False``).
    """
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(source, "bad_record", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise SFTDataError(source, "bad_record", f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise SFTDataError(source, "unknown_role", f"messages[{i}]: unknown role {role!r}; use {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise SFTDataError(source, "empty_content", f"messages[{i}] ({role}): content must be a string")
        if not content.strip():
            raise SFTDataError(source, "empty_content", f"messages[{i}] ({role}): empty content")
        if role == "system" and i != 0:
            raise SFTDataError(source, "system_not_first", f"messages[{i}]: a system message must come first")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise SFTDataError(source, "no_assistant", "the conversation has no assistant turn")
    return tuple(out)


def conversation_from_record(record: Any, source: str = "") -> Conversation:
    """A :class:`Conversation` from one JSON record (``messages`` or Alpaca style)."""
    if not isinstance(record, Mapping):
        raise SFTDataError(source, "bad_record", f"expected a JSON object, got {type(record).__name__}")
    has_messages = "messages" in record
    has_alpaca = "instruction" in record or "output" in record
    if has_messages and has_alpaca:
        raise SFTDataError(source, "bad_record", "give either 'messages' or 'instruction'/'output', not both")
    if has_messages:
        return Conversation(validate_messages(record["messages"], source), source)
    if has_alpaca:
        if "output" not in record:
            raise SFTDataError(source, "no_assistant", "an Alpaca record needs 'output'")
        instruction = _text_field(record, "instruction", source)
        input_ = _text_field(record, "input", source, required=False)
        if not input_.strip():
            input_ = ""  # a blank input is no input
        output = _text_field(record, "output", source)
        return Conversation(tuple(alpaca_to_messages(instruction, input_, output)), source)
    raise SFTDataError(source, "bad_record", "a record needs 'messages' or 'instruction' and 'output'")


def _json_lines(path: str) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed object or the JSON error) for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{n}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as e:
                yield source, SFTDataError(source, "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")


def read_conversations(
    paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    on_error: Literal["fail", "skip"] = "fail",
    stats: Optional["SFTStats"] = None,
    key: str = "data.path",
) -> list[Conversation]:
    """Every valid conversation of the JSONL files ``paths``, in file and line order.

    With ``on_error="fail"`` the first bad record raises :class:`SFTDataError` (``file:line: ...``);
    with ``"skip"`` it is counted in ``stats.skipped[reason]`` and left out. ``key`` is the config key
    named when a path does not exist.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else SFTStats()
    out = []
    for path in expand_paths(paths, key):
        for source, record in _json_lines(path):
            stats.records += 1
            try:
                if isinstance(record, SFTDataError):
                    raise record
                out.append(conversation_from_record(record, source))
            except SFTDataError as e:
                if on_error == "fail":
                    raise
                stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
    stats.conversations += len(out)
    return out


# --------------------------------------------------------------------------------------------------
# Conversations -> token ids with targets
# --------------------------------------------------------------------------------------------------


@dataclass
class SFTStats:
    """What happened to the records of one split (reported at start-up and in the run's metrics)."""

    #: non-blank JSONL lines read
    records: int = 0
    #: valid conversations
    conversations: int = 0
    #: bad records left out (``on_error=skip``), by reason
    skipped: dict[str, int] = field(default_factory=dict)
    #: samples longer than seq_len
    too_long: int = 0
    #: ... of which kept with their head (``truncation=truncate``)
    truncated: int = 0
    #: ... of which dropped (``truncation=drop``, or no assistant token left after truncating)
    dropped: int = 0
    #: samples kept, their positions (tokens - 1 each) and loss tokens
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    #: target tokens whose characters are partly outside the assistant span (0 for the bundled
    #: templates and tanuki tokenizers; reported in case another tokenizer merges across a boundary)
    boundary_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return (
            (f"{self.records} records, " if self.records else "")
            + f"{self.conversations} conversations"
            + (f", {skipped} skipped ({reasons})" if skipped else "")
            + f"; {self.samples} samples, {self.tokens} tokens, {self.loss_tokens} loss tokens"
            + (f"; {self.too_long} too long: {self.truncated} truncated, {self.dropped} dropped" if self.too_long else "")
        )


@dataclass(frozen=True)
class SFTSample:
    """One tokenized conversation: the ids of its rendering and which of them are trained on."""

    #: token ids of the rendered conversation, BOS (if the template writes one) to the last EOS
    input_ids: np.ndarray
    #: ``target[i]``: ``input_ids[i]`` is part of an assistant content or its EOS
    target: np.ndarray
    source: str = ""

    @property
    def length(self) -> int:
        """Positions the sample occupies in a row (``len(input_ids) - 1``)."""
        return len(self.input_ids) - 1

    @property
    def loss_tokens(self) -> int:
        return int(self.target[1:].sum())

    def row(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, labels)`` of the sample alone: inputs and pre-aligned labels, ``length`` each."""
        ids = self.input_ids.astype(np.int64)
        return ids[:-1], np.where(self.target[1:], ids[1:], IGNORE_INDEX)


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class _TokenizerInfo:
    """What tokenization needs to know about a Hugging Face tokenizer, computed once."""

    def __init__(self, tokenizer, template: ChatTemplate):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token
        self.eos = tokenizer.eos_token
        self.eos_id = tokenizer.eos_token_id
        if self.eos is None or self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; every assistant turn ends with one")
        if template.writes_bos and (self.bos is None or tokenizer.bos_token_id is None):
            raise ValueError(f"template {template.name!r} writes BOS but the tokenizer has none")
        # The rendered text carries BOS/EOS as text: they must come out as the special ids, as in
        # apply_chat_template(tokenize=True). A tokenizer that does not match them in text would train
        # on the characters '<', '/', 's', '>' instead.
        probe = (self.bos if template.writes_bos else "") + "x" + self.eos
        ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if ids[-1] != self.eos_id or (template.writes_bos and ids[0] != tokenizer.bos_token_id):
            raise ValueError(
                f"the tokenizer does not read the text {self.bos!r} / {self.eos!r} as its BOS / EOS tokens; "
                "chat templates write them as text (add them as special tokens of the tokenizer)"
            )
        vocab = tokenizer.get_vocab()
        self.is_byte = np.zeros(max(vocab.values()) + 1, dtype=bool)
        for piece, i in vocab.items():
            if _BYTE_PIECE.fullmatch(piece):
                self.is_byte[i] = True
        #: special-token texts that must not occur inside message contents
        self.special_texts = tuple(t for t in getattr(tokenizer, "all_special_tokens", []) if t)


def _refine_byte_offsets(ids: np.ndarray, offsets: np.ndarray, text: str, is_byte: np.ndarray) -> None:
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


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer,
    template: Union[ChatTemplate, str],
    *,
    on_error: Literal["fail", "skip"] = "fail",
    stats: Optional[SFTStats] = None,
    batch_size: int = 512,
) -> list[SFTSample]:
    """Render and tokenize conversations; targets are the tokens inside assistant content + EOS spans.

    The ids equal ``tokenizer.apply_chat_template(messages, chat_template=template.jinja)`` (the
    rendered text tokenized with ``add_special_tokens=False``). A message content that contains a
    special token's text (``</s>``, ...) is an :class:`SFTDataError` [special_token_text]: it would
    turn into a control token, both here and in ``apply_chat_template``.
    """
    template = get_template(template) if isinstance(template, str) else template
    stats = stats if stats is not None else SFTStats()
    info = _TokenizerInfo(tokenizer, template)
    out: list[SFTSample] = []
    for lo in range(0, len(conversations), batch_size):
        batch = []
        for conv in conversations[lo : lo + batch_size]:
            try:
                for m in conv.messages:
                    bad = next((t for t in info.special_texts if t in m["content"]), None)
                    if bad is not None:
                        raise SFTDataError(conv.source, "special_token_text",
                                           f"a {m['role']} message contains the special token text {bad!r}")
            except SFTDataError as e:
                if on_error == "fail":
                    raise
                stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
                continue
            batch.append((conv, template.render(conv.messages, bos_token=info.bos or "", eos_token=info.eos)))
        if not batch:
            continue
        enc = tokenizer([r.text for _, r in batch], add_special_tokens=False, return_offsets_mapping=True)
        for (conv, rendered), ids, offs in zip(batch, enc["input_ids"], enc["offset_mapping"]):
            out.append(_sample(conv, rendered, np.asarray(ids, dtype=np.int64), np.asarray(offs, dtype=np.int64).reshape(-1, 2), info, stats))
    return out


def _sample(conv: Conversation, rendered, ids: np.ndarray, offsets: np.ndarray, info: _TokenizerInfo,
            stats: SFTStats) -> SFTSample:
    text = rendered.text
    _refine_byte_offsets(ids, offsets, text, info.is_byte)
    inside = np.zeros(len(text) + 1, dtype=np.int64)
    for a, b in rendered.assistant_spans:
        inside[a:b] = 1
    covered_before = np.concatenate([[0], np.cumsum(inside)])
    s, e = offsets[:, 0], offsets[:, 1]
    covered = covered_before[e] - covered_before[s]
    zero_width = e == s
    target = np.where(zero_width, inside[np.minimum(s, len(text))] > 0, covered > 0)
    stats.boundary_tokens += int(np.sum(target & ~zero_width & (covered < e - s)))
    # Every run of targets ends with the EOS the template wrote after the content.
    run_ends = np.flatnonzero(target & ~np.append(target[1:], False))
    if len(run_ends) != len(rendered.assistant_spans) or np.any(ids[run_ends] != info.eos_id):
        raise SFTDataError(conv.source, "bad_tokenization",
                           "the assistant turns did not tokenize to content + EOS (a tokenizer problem)")
    dtype = np.int32 if ids.size == 0 or ids.max() < 2**31 else np.int64
    return SFTSample(ids.astype(dtype), target, conv.source)


def fit_to_length(
    samples: Sequence[SFTSample],
    seq_len: int,
    truncation: Literal["drop", "truncate"] = "truncate",
    stats: Optional[SFTStats] = None,
) -> list[SFTSample]:
    """Apply the truncation policy to samples longer than ``seq_len`` positions; fill ``stats``.

    ``truncate`` keeps the first ``seq_len + 1`` ids (``seq_len`` positions) and drops a sample left
    without a target; ``drop`` leaves every long sample out. Samples without any target are dropped.
    """
    if truncation not in ("drop", "truncate"):
        raise ValueError(f"truncation must be 'drop' or 'truncate', got {truncation!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stats = stats if stats is not None else SFTStats()
    out = []
    for s in samples:
        if s.length > seq_len:
            stats.too_long += 1
            if truncation == "drop":
                stats.dropped += 1
                continue
            s = SFTSample(s.input_ids[: seq_len + 1], s.target[: seq_len + 1], s.source)
            if s.loss_tokens == 0:
                stats.dropped += 1
                continue
            stats.truncated += 1
        elif s.loss_tokens == 0:
            stats.dropped += 1
            continue
        out.append(s)
        stats.samples += 1
        stats.tokens += s.length
        stats.loss_tokens += s.loss_tokens
    return out


def split_conversations(
    conversations: Sequence[Conversation], valid_fraction: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, valid) by a seeded random choice of ``round(valid_fraction * n)`` conversations (at
    least one when the fraction is positive), as the pretraining data splits documents."""
    try:
        train, valid = split_documents(len(conversations), valid_fraction, seed)
    except ValueError as e:
        raise ConfigError("data.valid_fraction", str(e)) from None
    return [conversations[i] for i in train], [conversations[i] for i in valid]


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing: each item, in order, goes into the first row with room for it.

    A max segment tree over the rows' free space finds that row in O(log n), so packing a million
    samples is a matter of seconds. Returns the item indices of each row, rows in order of opening.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [capacity] * (2 * size)  # unopened rows have the full capacity
    rows: list[list[int]] = []
    for i, length in enumerate(lengths):
        if length > capacity or length < 1:
            raise ValueError(f"item {i} has length {length}, outside [1, {capacity}]")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack_plan(
    lengths: Sequence[int], seq_len: int, *, packing: bool = True, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> list[np.ndarray]:
    """Which samples make up each row, for one epoch.

    With ``shuffle``, the samples are visited in a permutation seeded by ``(seed, epoch)``, packed
    first-fit (or one per row), and the rows are shuffled by the same generator; without it, samples
    are taken in order and the rows stay in order. The plan depends only on the lengths and seeds.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if packing:
        rows = [order[r] for r in first_fit(lengths[order].tolist(), seq_len)]
        if shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
    else:
        if len(lengths) and lengths.max() > seq_len:
            raise ValueError(f"a sample of {lengths.max()} positions does not fit seq_len={seq_len}")
        rows = [order[i : i + 1] for i in range(len(order))]
    return [np.asarray(r, dtype=np.int64) for r in rows]


def make_row(samples: Sequence[SFTSample], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One row of ``seq_len`` positions holding ``samples`` one after another, then padding.

    ``tokens`` the inputs, ``labels`` the pre-aligned targets (-100 off the assistant turns and on
    padding), ``positions`` restarting at 0 in every sample, ``segment_ids`` 0, 1, ... per sample and
    -1 on padding. All int64.
    """
    row = {
        "tokens": np.full(seq_len, pad_id, dtype=np.int64),
        "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
        "positions": np.zeros(seq_len, dtype=np.int64),
        "segment_ids": np.full(seq_len, PAD_SEGMENT, dtype=np.int64),
    }
    pos = 0
    for k, s in enumerate(samples):
        n = s.length
        if pos + n > seq_len:
            raise ValueError(f"samples of {sum(x.length for x in samples)} positions do not fit seq_len={seq_len}")
        tokens, labels = s.row()
        row["tokens"][pos : pos + n] = tokens
        row["labels"][pos : pos + n] = labels
        row["positions"][pos : pos + n] = np.arange(n)
        row["segment_ids"][pos : pos + n] = k
        pos += n
    return row


def pack(
    samples: Sequence[SFTSample],
    seq_len: int,
    *,
    packing: bool = True,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    pad_id: int = 0,
) -> list[dict[str, np.ndarray]]:
    """All rows of one epoch (see :func:`pack_plan` and :func:`make_row`)."""
    plan = pack_plan([s.length for s in samples], seq_len, packing=packing, seed=seed, epoch=epoch, shuffle=shuffle)
    return [make_row([samples[i] for i in r], seq_len, pad_id) for r in plan]


class SFTDataset:
    """Rows of packed (or padded) SFT samples, epoch after epoch, in a fixed global order.

    Epoch ``e`` is :func:`pack_plan` with ``(seed, e)``: a new sample order and packing every epoch.
    There are ``max(num_epochs, the fewest epochs giving min_rows rows)`` epochs; ``len()`` is their
    total row count. :meth:`sample` gives numpy rows, ``dataset[i]`` torch tensors.
    """

    def __init__(
        self,
        samples: Sequence[SFTSample],
        seq_len: int,
        *,
        packing: bool = True,
        seed: int = 1234,
        shuffle: bool = True,
        num_epochs: int = 1,
        min_rows: int = 0,
        pad_id: int = 0,
    ):
        if not samples:
            raise ValueError("no SFT samples")
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        too_long = [s.source for s in samples if s.length > seq_len]
        if too_long:
            raise ValueError(f"{len(too_long)} samples are longer than seq_len={seq_len} (first: {too_long[0]}); "
                             "apply fit_to_length first")
        self.samples = list(samples)
        self.seq_len = seq_len
        self.packing = packing
        self.pad_id = pad_id
        lengths = [s.length for s in self.samples]
        sample_loss = np.array([s.loss_tokens for s in self.samples], dtype=np.int64)
        self._rows: list[np.ndarray] = []
        #: index of the first row of each epoch
        self.epoch_starts: list[int] = []
        epoch = 0
        while epoch < num_epochs or len(self._rows) < min_rows:
            self.epoch_starts.append(len(self._rows))
            self._rows += pack_plan(lengths, seq_len, packing=packing, seed=seed, epoch=epoch, shuffle=shuffle)
            epoch += 1
        self.num_epochs = epoch
        self._loss_tokens = np.array([sample_loss[r].sum() for r in self._rows], dtype=np.int64)
        self._used = np.array([sum(lengths[i] for i in r) for r in self._rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def row_samples(self, i: int) -> np.ndarray:
        """Indices into :attr:`samples` of the samples in row ``i``."""
        return self._rows[i]

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` as int64 numpy arrays of ``seq_len`` (keys :data:`BATCH_KEYS`)."""
        return make_row([self.samples[j] for j in self._rows[i]], self.seq_len, self.pad_id)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.sample(i).items()}

    def loss_tokens(self, i: int) -> int:
        """Loss tokens (labels != -100) of row ``i``, without building it."""
        return int(self._loss_tokens[i])

    def loss_tokens_between(self, start: int, stop: int) -> int:
        """Loss tokens of rows ``start .. stop - 1``."""
        return int(self._loss_tokens[start:stop].sum())

    @property
    def fill(self) -> float:
        """Fraction of the row positions that hold sample tokens (1 - padding fraction)."""
        return float(self._used.sum()) / (len(self._rows) * self.seq_len)


def count_loss_tokens(batch: Union[torch.Tensor, Mapping[str, torch.Tensor]]) -> int:
    """Loss tokens (labels != -100) in a batch or a labels tensor: the per-token normaliser's count."""
    labels = batch["labels"] if isinstance(batch, Mapping) else batch
    return int((labels != IGNORE_INDEX).sum())


class SFTDataLoader(DataLoader):
    """Micro-batches of one data-parallel rank: dicts of int64 ``(micro_batch_size, seq_len)`` tensors
    with keys ``tokens``, ``labels``, ``positions``, ``segment_ids``.

    The contract of :class:`tanuki.data.loader.DataLoader`: one global order of rows; a micro-step
    takes the next ``micro_batch_size * dp_size`` rows and rank ``r`` the ``r``-th slice; the state is
    ``consumed_samples`` (rows), so resuming continues with exactly the next row, with any number of
    ranks.
    """

    dataset: SFTDataset

    def _read(self, indices: range) -> dict[str, torch.Tensor]:
        rows = [self.dataset.sample(i) for i in indices]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in BATCH_KEYS}
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def global_loss_tokens(self, micro_steps: int = 1) -> int:
        """Loss tokens in the next ``micro_steps`` micro-steps of all ranks together, from the current
        position: the normaliser of an optimizer step over ``micro_steps`` accumulation steps. The
        same number on every rank, with no communication."""
        start = self.consumed_samples
        return self.dataset.loss_tokens_between(start, start + micro_steps * self.samples_per_micro_step)


# --------------------------------------------------------------------------------------------------
# Everything from a config
# --------------------------------------------------------------------------------------------------


@dataclass
class SFTDatasets:
    """The train and validation datasets of a run and what happened to their records."""

    train: SFTDataset
    valid: Optional[SFTDataset]
    train_stats: SFTStats
    valid_stats: Optional[SFTStats]

    def summary(self) -> str:
        lines = [f"train: {self.train_stats.summary()}; {len(self.train)} rows ({self.train.num_epochs} epochs), "
                 f"{self.train.fill:.1%} filled"]
        if self.valid is not None and self.valid_stats is not None:
            lines.append(f"valid: {self.valid_stats.summary()}; {len(self.valid)} rows, {self.valid.fill:.1%} filled")
        return "\n".join(lines)


def load_samples(
    conversations: Sequence[Conversation],
    tokenizer,
    template: Union[ChatTemplate, str],
    seq_len: int,
    *,
    truncation: Literal["drop", "truncate"] = "truncate",
    on_error: Literal["fail", "skip"] = "fail",
    stats: Optional[SFTStats] = None,
) -> list[SFTSample]:
    """:func:`tokenize_conversations` then :func:`fit_to_length`."""
    stats = stats if stats is not None else SFTStats()
    samples = tokenize_conversations(conversations, tokenizer, template, on_error=on_error, stats=stats)
    return fit_to_length(samples, seq_len, truncation, stats)


def build_sft_datasets(
    cfg: SFTDataConfig,
    tokenizer,
    template: Union[ChatTemplate, str],
    seq_len: int,
    *,
    num_epochs: int = 1,
    min_rows: int = 0,
) -> SFTDatasets:
    """Read, split, tokenize, truncate and pack the data of ``cfg``.

    ``min_rows``: make the training dataset at least this long (whole epochs), e.g. the run's
    ``steps * global_batch_size``. Validation rows are packed the same way, in order, one epoch.
    """
    template = get_template(template) if isinstance(template, str) else template
    train_stats = SFTStats()
    conversations = read_conversations(cfg.paths, on_error=cfg.on_error, stats=train_stats)
    valid_stats: Optional[SFTStats] = None
    valid_convs: list[Conversation] = []
    if cfg.valid_paths:
        valid_stats = SFTStats()
        valid_convs = read_conversations(cfg.valid_paths, on_error=cfg.on_error, stats=valid_stats, key="data.valid_path")
    elif cfg.valid_fraction > 0:
        conversations, valid_convs = split_conversations(conversations, cfg.valid_fraction, cfg.split_seed)
        valid_stats = SFTStats(conversations=len(valid_convs))
        train_stats.conversations -= len(valid_convs)
    if not conversations:
        raise ConfigError("data.path", "no valid training conversations")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    common = dict(truncation=cfg.truncation, on_error=cfg.on_error)
    train_samples = load_samples(conversations, tokenizer, template, seq_len, stats=train_stats, **common)
    if not train_samples:
        raise ConfigError("data.path", f"no training sample left ({train_stats.summary()})")
    train = SFTDataset(train_samples, seq_len, packing=cfg.packing, seed=cfg.seed, num_epochs=num_epochs,
                       min_rows=min_rows, pad_id=pad_id)
    valid = None
    if valid_convs and valid_stats is not None:
        valid_samples = load_samples(valid_convs, tokenizer, template, seq_len, stats=valid_stats, **common)
        if valid_samples:
            valid = SFTDataset(valid_samples, seq_len, packing=cfg.packing, seed=cfg.seed, shuffle=False, pad_id=pad_id)
    return SFTDatasets(train, valid, train_stats, valid_stats)


# --------------------------------------------------------------------------------------------------
# Held-out prompts with exact answers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt (messages ending with a user turn) and the exact expected answer."""

    messages: tuple[dict[str, str], ...]
    answer: str
    task: str = ""
    source: str = ""


def read_eval_prompts(path: Union[str, os.PathLike]) -> list[EvalPrompt]:
    """The records ``{"messages": [...], "answer": str, "task": str}`` of an eval JSONL file (such as
    the bundled ``sft_eval.jsonl``); the messages must end with a user turn."""
    out = []
    for source, record in _json_lines(os.fspath(path)):
        if isinstance(record, SFTDataError):
            raise record
        if not isinstance(record, Mapping):
            raise SFTDataError(source, "bad_record", "expected a JSON object")
        messages = validate_messages(record.get("messages"), source, need_assistant=False)
        if messages[-1]["role"] != "user":
            raise SFTDataError(source, "bad_record", "the prompt's last message must be a user turn")
        answer = _text_field(record, "answer", source)
        out.append(EvalPrompt(messages, answer, str(record.get("task", "")), source))
    return out


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a generated answer is the expected one (surrounding whitespace ignored)."""
    return prediction.strip() == answer.strip()
