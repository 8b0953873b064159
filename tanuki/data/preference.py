"""Preference data for DPO and its relatives: (prompt, chosen, rejected) records from JSONL, rendered
with a chat template, tokenized with the prompt checked to be a token prefix of both completions,
truncated, and served as micro-batches that run chosen and rejected in one forward.

Read in the order of the data flow:

1. :func:`read_preference_pairs`: JSONL records ``{"prompt", "chosen", "rejected"}`` (and an
   optional ``"system"``). ``prompt`` is a string (one user turn) or a ``messages`` list ending with a
   user turn; ``chosen`` / ``rejected`` are strings, or an assistant message
   ``{"role": "assistant", "content": ...}`` (alone or as a one-element list). Bad records are
   :class:`PreferenceDataError` naming ``file:line``, or with ``on_error="skip"`` counted by reason
   (the helpers of :mod:`tanuki.data.records` check the messages); other fields (an id, a task name) are
   ignored. A pair whose chosen equals its rejected teaches nothing (the DPO margin is 0 whatever the
   policy): ``identical="skip"`` counts and drops it, ``identical="fail"`` stops.
2. :func:`render_pair`: the prompt is the rendering of the prompt messages *with* the generation
   prompt; a completion is the text the template writes for the assistant turn after it, i.e. the
   assistant content + EOS (the template's own EOS, or its end-of-turn token such as ``<|im_end|>``:
   never a second one). The text of prompt + completion equals the rendering of the whole
   conversation up to that token (checked for every pair; what a template writes after it, such as
   ChatML's newline, is not scored).
3. :func:`tokenize_pairs`: the prompt text and the two full texts are tokenized with
   ``add_special_tokens=False`` (the template writes BOS), so the prompt ids equal
   ``apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)`` and the full ids equal
   ``apply_chat_template(prompt + [assistant], tokenize=True)``. The completion ids are the full ids
   after the prompt's, and the pair is accepted only if the prompt ids *are* a prefix of both full
   sequences: a tokenizer can merge characters across the boundary (``"\\n" + "東"`` into one piece),
   and then the completion tokens would differ from what the model is asked to score after the
   prompt. Such a pair is a :class:`PreferenceDataError` [not_prefix]. (We tokenize the whole text
   rather than concatenating separately tokenized prompt and completion ids: the ids we train on are
   exactly those the tokenizer gives the rendered conversation, as in SFT; the tokenizer is checked
   by :class:`tanuki.data.chat_tokens.TokenizerInfo`.)
4. :func:`truncate_pairs`: the truncation policy, counted in :class:`PreferenceStats`: a prompt
   longer than ``max_prompt_length`` keeps its *last* tokens (the question's end and the generation
   prompt; BOS, when the template writes one, stays first), then a completion that does not fit
   ``max_length`` (prompt + completion tokens) keeps its *first* tokens (and loses its EOS).
5. :class:`PreferenceDataset` / :class:`PreferenceDataLoader`: a seeded shuffle of the pairs per epoch;
   a micro-batch of ``B`` pairs is ``2B`` rows, chosen rows first, ``[c_0 .. c_{B-1}, r_0 .. r_{B-1}]``,
   padded to the longest row of the micro-batch (or to ``max_length - 1``), with the contract of
   :class:`tanuki.data.loader.DataLoader` (``micro_batch_size`` counts pairs; the state is
   ``consumed_samples``, in pairs).

Row layout (as :meth:`tanuki.data.sft.SFTSample.row`). A sequence of ``L = P + C`` ids (``P`` prompt,
``C`` completion) occupies ``L - 1`` positions: ``tokens = ids[:-1]`` and ``labels[t] = ids[t + 1]``
when ``t + 1 >= P`` (a completion token), else -100; exactly ``C`` labels are not -100, and the sum of
the log-probs at those labels is the sequence log-prob of DPO (``tanuki.losses`` takes labels
pre-aligned like this). Padding: token ``pad_id``, label -100, position 0.

Batch keys (:data:`PREFERENCE_BATCH_KEYS`): ``tokens``, ``labels``, ``positions`` int64 ``(2B, T)``;
``pair_index`` int64 ``(B,)``, the index of each pair in :attr:`PreferenceDataset.pairs` (the same in
every epoch: the key of precomputed reference log-probs); ``pair_mask`` int64 ``(B,)``, 1 for a real
pair and 0 for a filler repeated to complete the last micro-step of a ``drop_last=False`` pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from tanuki.config import ConfigError, require
from tanuki.data.chat_tokens import TokenizerInfo, as_template, id_dtype, pad_token_id
from tanuki.data.loader import DataLoader
from tanuki.data.records import (
    ChatDataConfig,
    PathSpec,
    RecordStats,
    SFTDataError,
    check_on_error,
    read_records,
    split_conversations,
    validate_messages,
)
from tanuki.losses import IGNORE_INDEX
from tanuki.tokenizer.jinja_template import TemplateRefused
from tanuki.tokenizer.templates import ChatTemplate

#: the keys of a preference micro-batch (see the module docstring)
PREFERENCE_BATCH_KEYS = ("tokens", "labels", "positions", "pair_index", "pair_mask")
#: the keys of the rows of a micro-batch, each int64 ``(2 * pairs, T)``
ROW_KEYS = ("tokens", "labels", "positions")
#: the two completions of a pair, in the order of the rows of a micro-batch
COMPLETIONS = ("chosen", "rejected")

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceDataConfig(ChatDataConfig):
    """``data`` of a DPO run: which JSONL files of ``{"prompt", "chosen", "rejected"}``, how to split
    them (the keys of :class:`~tanuki.data.records.ChatDataConfig`; ``seed`` seeds the pair order),
    how to truncate them."""

    #: prompt tokens kept (the last ones; BOS stays); null: half of max_length
    max_prompt_length: Optional[int] = None
    #: prompt + completion tokens kept (the completion's first ones); null: train.seq_len + 1, a
    #: sequence of L tokens filling L - 1 positions
    max_length: Optional[int] = None
    #: bad records: ``fail`` (stop, naming file:line) or ``skip`` (count by reason)
    on_error: Literal["fail", "skip"] = "fail"
    #: pairs whose chosen equals rejected: ``skip`` (count and leave out) or ``fail``
    identical: Literal["fail", "skip"] = "skip"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length is not None:
            require(self.max_length >= 3, "data.max_length", f"must be at least 3, got {self.max_length}")
        if self.max_prompt_length is not None:
            require(self.max_prompt_length >= 2, "data.max_prompt_length",
                    f"must be at least 2, got {self.max_prompt_length}")
            if self.max_length is not None:
                require(self.max_prompt_length < self.max_length, "data.max_prompt_length",
                        f"{self.max_prompt_length} leaves no completion token in data.max_length={self.max_length}")

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """``(max_prompt_length, max_length)`` for a run of ``seq_len`` positions, defaults resolved:
        ``max_length`` ``seq_len + 1`` (its sequences fill ``max_length - 1`` positions, which must
        fit ``seq_len``), ``max_prompt_length`` half of it."""
        max_length = seq_len + 1 if self.max_length is None else self.max_length
        require(max_length - 1 <= seq_len, "data.max_length",
                f"{max_length} tokens need {max_length - 1} positions, more than train.seq_len={seq_len}")
        require(max_length >= 3, "data.max_length", f"must be at least 3, got {max_length}")
        max_prompt = max_length // 2 if self.max_prompt_length is None else self.max_prompt_length
        require(max_prompt < max_length, "data.max_prompt_length",
                f"{max_prompt} leaves no completion token in data.max_length={max_length}")
        return max_prompt, max_length


# --------------------------------------------------------------------------------------------------
# Records -> pairs
# --------------------------------------------------------------------------------------------------


class PreferenceDataError(SFTDataError):
    """A bad preference record; the message starts with ``file:line``; ``reason`` is the key it is
    counted under when bad records are skipped."""


@dataclass(frozen=True)
class PreferencePair:
    """A validated record: the prompt messages (ending with a user turn) and the two assistant
    contents, and where it came from (``file:line``)."""

    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    source: str = ""


@dataclass
class PreferenceStats(RecordStats):
    """What happened to the records of one split (reported at start-up and in the run's metrics)."""

    #: non-blank JSONL lines read
    records: int = 0
    #: valid pairs
    pairs: int = 0
    #: bad records left out (``on_error=skip``), by reason
    skipped: dict[str, int] = field(default_factory=dict)
    #: pairs whose chosen equals rejected, left out (``identical=skip``)
    identical: int = 0
    #: pairs whose prompt lost its first tokens (``max_prompt_length``)
    prompt_truncated: int = 0
    #: completions that lost their last tokens (``max_length``)
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    #: pairs left out because chosen and rejected became the same ids by truncation
    identical_after_truncation: int = 0
    #: pairs kept, their positions (both rows) and label tokens of each completion
    samples: int = 0
    tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0

    def summary(self) -> str:
        truncated = [f"{n} {what}" for n, what in ((self.prompt_truncated, "prompts"), (self.chosen_truncated, "chosen"),
                                                    (self.rejected_truncated, "rejected")) if n]
        return (
            self.read_summary(f"{self.pairs} pairs")
            + (f", {self.identical} identical chosen/rejected skipped" if self.identical else "")
            + f"; {self.samples} kept, {self.tokens} tokens, {self.chosen_tokens} chosen / "
            f"{self.rejected_tokens} rejected label tokens"
            + (f"; truncated: {', '.join(truncated)}" if truncated else "")
            + (f"; {self.identical_after_truncation} identical after truncation dropped"
               if self.identical_after_truncation else "")
        )


def _prompt_messages(record: Mapping, source: str) -> tuple[dict[str, str], ...]:
    if "prompt" not in record:
        raise PreferenceDataError(source, "missing_field", "a preference record needs 'prompt'")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        messages: Any = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = prompt
    else:
        raise PreferenceDataError(source, "bad_record",
                                  f"'prompt' must be a string or a messages list, got {type(prompt).__name__}")
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise PreferenceDataError(source, "bad_record", f"'system' must be a string, got {type(system).__name__}")
        if any(isinstance(m, Mapping) and m.get("role") == "system" for m in messages):
            raise PreferenceDataError(source, "bad_record", "give the system prompt either as 'system' or in 'prompt', not both")
        messages = [{"role": "system", "content": system}, *messages]
    try:
        out = validate_messages(messages, "", need_assistant=False)
    except SFTDataError as e:  # raised without a source: add ours
        raise PreferenceDataError(source, e.reason, f"prompt: {e}") from None
    if out[-1]["role"] != "user":
        raise PreferenceDataError(source, "bad_prompt",
                                  f"the prompt must end with a user turn, not a {out[-1]['role']} turn")
    return out


def _completion(record: Mapping, key: str, source: str) -> str:
    if key not in record:
        raise PreferenceDataError(source, "missing_field", f"a preference record needs '{key}'")
    value = record[key]
    if isinstance(value, list):
        if len(value) != 1:
            raise PreferenceDataError(source, "bad_record", f"'{key}' as a list must hold exactly one assistant message")
        value = value[0]
    if isinstance(value, Mapping):
        if value.get("role") != "assistant":
            raise PreferenceDataError(source, "bad_record",
                                      f"'{key}' must be an assistant message, got role {value.get('role')!r}")
        value = value.get("content")
    if not isinstance(value, str):
        raise PreferenceDataError(source, "bad_record",
                                  f"'{key}' must be a string or an assistant message, got {type(value).__name__}")
    if not value.strip():
        raise PreferenceDataError(source, "empty_content", f"'{key}' is empty")
    return value


def pair_from_record(record: Any, source: str = "") -> PreferencePair:
    """A :class:`PreferencePair` from one JSON record (see the module docstring for the format)."""
    if not isinstance(record, Mapping):
        raise PreferenceDataError(source, "bad_record", f"expected a JSON object, got {type(record).__name__}")
    prompt = _prompt_messages(record, source)
    return PreferencePair(prompt, _completion(record, "chosen", source), _completion(record, "rejected", source), source)


def read_preference_pairs(
    paths: PathSpec,
    *,
    on_error: Literal["fail", "skip"] = "fail",
    identical: Literal["fail", "skip"] = "skip",
    stats: Optional[PreferenceStats] = None,
    key: str = "data.path",
) -> list[PreferencePair]:
    """Every valid pair of the JSONL files ``paths``, in file and line order.

    With ``on_error="fail"`` the first bad record raises :class:`PreferenceDataError` (``file:line:
    ...``); with ``"skip"`` it is counted in ``stats.skipped[reason]`` and left out. A pair whose
    chosen equals its rejected is counted in ``stats.identical`` and left out (``identical="skip"``) or
    raises [identical] (``"fail"``), whatever ``on_error``. ``key``: the config key named when a path
    does not exist.
    """
    stats = stats if stats is not None else PreferenceStats()
    records = read_records(paths, pair_from_record, on_error=on_error, stats=stats, key=key, error=PreferenceDataError)
    check_on_error(identical, "identical")
    out = []
    for pair in records:
        if pair.chosen == pair.rejected:
            stats.identical += 1
            if identical == "fail":
                raise PreferenceDataError(pair.source, "identical", "chosen and rejected are identical")
            continue
        out.append(pair)
    stats.pairs += len(out)
    return out


def split_pairs(pairs: Sequence[PreferencePair], valid_fraction: float, seed: int = 0
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, valid): a seeded choice of ``round(valid_fraction * n)`` pairs (at least one when the
    fraction is positive), as :func:`tanuki.data.records.split_conversations` splits conversations."""
    return split_conversations(pairs, valid_fraction, seed)  # only indexes the sequence


# --------------------------------------------------------------------------------------------------
# Pairs -> token ids
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPair:
    """The texts of a pair: prompt (with the generation prompt), and each completion (assistant
    content + EOS, exactly as the template writes the assistant turn after the prompt)."""

    prompt: str
    chosen: str
    rejected: str


def render_pair(pair: PreferencePair, template: Union[ChatTemplate, str], *, bos_token: str, eos_token: str) -> RenderedPair:
    """Render a pair; ``prompt + chosen`` is the rendering of the conversation prompt + chosen turn.

    Raises ``ValueError`` if the template does not render the assistant turn after the prompt as
    generation prompt + content + EOS (a template unfit for DPO; the bundled ones all are).
    """
    template = as_template(template)
    prompt = template.render(pair.prompt, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True).text
    completions = []
    for content in (pair.chosen, pair.rejected):
        full = template.render([*pair.prompt, {"role": "assistant", "content": content}],
                               bos_token=bos_token, eos_token=eos_token)
        # What the template writes after the end-of-turn token (ChatML's newline) is not scored.
        a, b = full.assistant_spans[-1]
        if not full.text.startswith(prompt) or a != len(prompt) or full.text[b:].strip():
            raise ValueError(f"{pair.source}: template {template.name!r} does not render an assistant turn as the "
                             "generation prompt followed by content + EOS; it cannot be used for preference data")
        completions.append(full.text[a:b])
    return RenderedPair(prompt, *completions)


@dataclass(frozen=True)
class TokenizedPair:
    """The ids of a pair: the prompt's (with the generation prompt) and each completion's (content +
    EOS, possibly truncated); ``prompt_ids + chosen_ids`` is the chosen sequence."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    source: str = ""

    def completion_ids(self, which: str) -> np.ndarray:
        if which not in COMPLETIONS:
            raise ValueError(f"which must be 'chosen' or 'rejected', got {which!r}")
        return self.chosen_ids if which == "chosen" else self.rejected_ids

    def length(self, which: str) -> int:
        """Positions the ``which`` sequence occupies in a row (its ids - 1)."""
        return len(self.prompt_ids) + len(self.completion_ids(which)) - 1

    def row(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, labels)`` of the ``which`` sequence, ``length(which)`` each, int64: the inputs and
        the pre-aligned labels (the completion ids, -100 before them)."""
        completion = self.completion_ids(which)
        ids = np.concatenate([self.prompt_ids, completion]).astype(np.int64)
        labels = ids[1:].copy()
        labels[: len(self.prompt_ids) - 1] = IGNORE_INDEX
        return ids[:-1], labels


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    template: Union[ChatTemplate, str],
    *,
    on_error: Literal["fail", "skip"] = "fail",
    stats: Optional[PreferenceStats] = None,
    batch_size: int = 512,
) -> list[TokenizedPair]:
    """Render and tokenize pairs (see the module docstring).

    Errors (:class:`PreferenceDataError`, or counted with ``on_error="skip"``): a content containing a
    special token's text [special_token_text] (it would become a control token; this is also what
    keeps the completion to one EOS), a prompt whose ids are not a prefix of a full sequence's
    [not_prefix], a completion whose ids do not end with the EOS [bad_tokenization].
    """
    template = as_template(template)
    stats = stats if stats is not None else PreferenceStats()
    info = TokenizerInfo(tokenizer, template)
    out: list[TokenizedPair] = []
    for lo in range(0, len(pairs), batch_size):
        batch: list[tuple[PreferencePair, RenderedPair]] = []
        for pair in pairs[lo : lo + batch_size]:
            try:
                _check_special_texts(pair, info)
                try:
                    rendered = render_pair(pair, template, bos_token=info.bos or "", eos_token=info.eos)
                except TemplateRefused as e:
                    raise PreferenceDataError(pair.source, "template_refused", str(e)) from None
            except PreferenceDataError as e:
                stats.skip_or_raise(e, on_error)
                continue
            batch.append((pair, rendered))
        if not batch:
            continue
        texts = [t for _, r in batch for t in (r.prompt, r.prompt + r.chosen, r.prompt + r.rejected)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for k, (pair, _) in enumerate(batch):
            prompt, chosen, rejected = (np.asarray(x, dtype=np.int64) for x in ids[3 * k : 3 * k + 3])
            try:
                out.append(_split(pair, prompt, chosen, rejected, info.turn_end_id))
            except PreferenceDataError as e:
                stats.skip_or_raise(e, on_error)
    return out


def _check_special_texts(pair: PreferencePair, info: TokenizerInfo) -> None:
    parts = [(m["role"], m["content"]) for m in pair.prompt] + [("chosen", pair.chosen), ("rejected", pair.rejected)]
    for what, text in parts:
        bad = info.special_text_in(text)
        if bad is not None:
            raise PreferenceDataError(pair.source, "special_token_text", f"the {what} text contains the special token text {bad!r}")


def _split(pair: PreferencePair, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, eos_id: int) -> TokenizedPair:
    n = len(prompt)
    completions = []
    for which, full in (("chosen", chosen), ("rejected", rejected)):
        if len(full) <= n or not np.array_equal(full[:n], prompt):
            at = next((i for i in range(min(n, len(full))) if full[i] != prompt[i]), min(n, len(full)))
            raise PreferenceDataError(
                pair.source, "not_prefix",
                f"the prompt's tokens are not a prefix of the {which} sequence's (they differ at token {at} of {n}): "
                "the tokenizer merges text across the prompt/completion boundary")
        completion = full[n:]
        if completion[-1] != eos_id:
            raise PreferenceDataError(pair.source, "bad_tokenization", f"the {which} completion does not end with EOS")
        completions.append(completion)
    dtype = id_dtype(prompt, *completions)
    return TokenizedPair(prompt.astype(dtype), completions[0].astype(dtype), completions[1].astype(dtype), pair.source)


def truncate_pairs(
    samples: Sequence[TokenizedPair],
    max_length: int,
    max_prompt_length: int,
    *,
    bos_id: Optional[int] = None,
    stats: Optional[PreferenceStats] = None,
) -> list[TokenizedPair]:
    """Apply the truncation policy; fill ``stats`` (also with the kept pairs' token counts).

    A prompt of more than ``max_prompt_length`` ids keeps its last ones; when it starts with
    ``bos_id`` that BOS stays first (``[BOS] + last max_prompt_length - 1``). Then each completion
    keeps its first ``max_length - len(prompt)`` ids. A pair whose completions became the same ids is
    left out (it has no margin to learn from), counted in ``identical_after_truncation``.
    """
    if not 2 <= max_prompt_length < max_length:
        raise ValueError(f"need 2 <= max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    stats = stats if stats is not None else PreferenceStats()
    out = []
    for s in samples:
        prompt, chosen, rejected = s.prompt_ids, s.chosen_ids, s.rejected_ids
        if len(prompt) > max_prompt_length:
            stats.prompt_truncated += 1
            if bos_id is not None and prompt[0] == bos_id:
                prompt = np.concatenate([prompt[:1], prompt[len(prompt) - (max_prompt_length - 1):]])
            else:
                prompt = prompt[len(prompt) - max_prompt_length:]
        room = max_length - len(prompt)
        if len(chosen) > room:
            stats.chosen_truncated += 1
            chosen = chosen[:room]
        if len(rejected) > room:
            stats.rejected_truncated += 1
            rejected = rejected[:room]
        if np.array_equal(chosen, rejected):
            stats.identical_after_truncation += 1
            continue
        s = TokenizedPair(prompt, chosen, rejected, s.source)
        out.append(s)
        stats.samples += 1
        stats.tokens += s.length("chosen") + s.length("rejected")
        stats.chosen_tokens += len(chosen)
        stats.rejected_tokens += len(rejected)
    return out


def load_tokenized_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    template: Union[ChatTemplate, str],
    max_length: int,
    max_prompt_length: int,
    *,
    on_error: Literal["fail", "skip"] = "fail",
    stats: Optional[PreferenceStats] = None,
) -> list[TokenizedPair]:
    """:func:`tokenize_pairs` then :func:`truncate_pairs` (BOS kept when the template writes it)."""
    template = as_template(template)
    stats = stats if stats is not None else PreferenceStats()
    samples = tokenize_pairs(pairs, tokenizer, template, on_error=on_error, stats=stats)
    bos_id = tokenizer.bos_token_id if template.writes_bos else None
    return truncate_pairs(samples, max_length, max_prompt_length, bos_id=bos_id, stats=stats)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def collate_pairs(
    samples: Sequence[TokenizedPair],
    pair_index: Sequence[int],
    *,
    pad_id: int = 0,
    length: Optional[int] = None,
    pair_mask: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """A micro-batch of ``B = len(samples)`` pairs: ``2B`` rows, chosen rows first then rejected rows
    (row ``i`` and row ``B + i`` are the pair ``i``), right-padded to ``length`` positions (default:
    the longest row). Keys :data:`PREFERENCE_BATCH_KEYS`, all int64."""
    rows = [s.row(which) for which in COMPLETIONS for s in samples]
    longest = max((len(t) for t, _ in rows), default=0)
    T = longest if length is None else length
    if longest > T:
        raise ValueError(f"a sequence of {longest} positions does not fit length={T}")
    B = len(samples)
    tokens = np.full((2 * B, T), pad_id, dtype=np.int64)
    labels = np.full((2 * B, T), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((2 * B, T), dtype=np.int64)
    for r, (t, lab) in enumerate(rows):
        n = len(t)
        tokens[r, :n] = t
        labels[r, :n] = lab
        positions[r, :n] = np.arange(n)
    mask = np.ones(B, dtype=np.int64) if pair_mask is None else np.asarray(pair_mask, dtype=np.int64)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "positions": torch.from_numpy(positions),
        "pair_index": torch.as_tensor(np.asarray(pair_index, dtype=np.int64)),
        "pair_mask": torch.from_numpy(mask),
    }


class PreferenceDataset:
    """The tokenized pairs in a fixed global order, epoch after epoch.

    Epoch ``e`` visits the pairs in a permutation seeded by ``(seed, e)`` (in order with
    ``shuffle=False``). There are ``max(num_epochs, the fewest epochs giving min_pairs pairs)`` epochs;
    ``len()`` is their total. ``dataset[i]`` is the pair at stream position ``i`` as a one-pair batch.
    """

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        *,
        seed: int = 1234,
        shuffle: bool = True,
        num_epochs: int = 1,
        min_pairs: int = 0,
        pad_id: int = 0,
        max_length: Optional[int] = None,
    ):
        if not pairs:
            raise ValueError("no preference pairs")
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        self.pairs = list(pairs)
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        longest = max(max(p.length("chosen"), p.length("rejected")) for p in self.pairs)
        #: the padded length of a micro-batch with ``pad_to_max`` (``max_length - 1`` positions; by
        #: default the longest sequence)
        self.seq_len = longest if max_length is None else max_length - 1
        if longest > self.seq_len:
            raise ValueError(f"a sequence of {longest + 1} tokens is longer than max_length={max_length}; "
                             "apply truncate_pairs first")
        n = len(self.pairs)
        orders = []
        epoch = 0
        while epoch < num_epochs or epoch * n < min_pairs:
            rng = np.random.default_rng([seed, epoch])
            orders.append(rng.permutation(n) if shuffle else np.arange(n))
            epoch += 1
        self.num_epochs = epoch
        self._order = np.concatenate(orders).astype(np.int64)

    def __len__(self) -> int:
        return len(self._order)

    def pair_index(self, i: int) -> int:
        """Index into :attr:`pairs` of the pair at stream position ``i``."""
        return int(self._order[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.pair_index(i)
        return collate_pairs([self.pairs[j]], [j], pad_id=self.pad_id)

    def in_order(self) -> "PreferenceDataset":
        """The same pairs once, in order (stream position = pair index): the pass that precomputes
        reference log-probs, or an evaluation."""
        return PreferenceDataset(self.pairs, shuffle=False, pad_id=self.pad_id, max_length=self.seq_len + 1)


class PreferenceDataLoader(DataLoader):
    """Micro-batches of one data-parallel rank: ``micro_batch_size`` pairs as ``2 * micro_batch_size``
    rows (keys :data:`PREFERENCE_BATCH_KEYS`; chosen rows first).

    The contract of :class:`tanuki.data.loader.DataLoader`, counted in pairs: a micro-step takes the
    next ``micro_batch_size * dp_size`` pairs of the global order and rank ``r`` the ``r``-th slice; the
    state is ``consumed_samples``. Rows are padded to the longest of the micro-batch, or to
    ``dataset.seq_len`` with ``pad_to_max``. With ``drop_last=False`` a last partial micro-step is
    completed with pairs from the start of the stream, marked ``pair_mask == 0`` (every rank runs the
    same number of forwards, which ZeRO-3 needs; their ``pair_index`` is real, so writing results by
    pair index is harmless).
    """

    dataset: PreferenceDataset

    def __init__(self, dataset: PreferenceDataset, *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, pin_memory: bool = False, pad_to_max: bool = False, drop_last: bool = True):
        super().__init__(dataset, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=consumed_samples, pin_memory=pin_memory)
        self.pad_to_max = pad_to_max
        self.drop_last = drop_last

    def __len__(self) -> int:
        left = max(0, len(self.dataset) - self.consumed_samples)
        step = self.samples_per_micro_step
        return left // step if self.drop_last else -(-left // step)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.samples_per_micro_step
        end = len(self.dataset)
        while self.consumed_samples + (step if self.drop_last else 1) <= end:
            batch = self._read(self.indices(self.consumed_samples))
            self.consumed_samples += step
            yield batch

    def _read(self, indices: range) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        pair_index = [self.dataset.pair_index(i % n) for i in indices]
        batch = collate_pairs([self.dataset.pairs[j] for j in pair_index], pair_index, pad_id=self.dataset.pad_id,
                              length=self.dataset.seq_len if self.pad_to_max else None,
                              pair_mask=[int(i < n) for i in indices])
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch


# --------------------------------------------------------------------------------------------------
# Everything from a config
# --------------------------------------------------------------------------------------------------


@dataclass
class PreferenceDatasets:
    """The train and validation datasets of a run and what happened to their records."""

    train: PreferenceDataset
    valid: Optional[PreferenceDataset]
    train_stats: PreferenceStats
    valid_stats: Optional[PreferenceStats]
    #: the resolved limits (``PreferenceDataConfig.lengths``)
    max_prompt_length: int
    max_length: int

    def summary(self) -> str:
        lines = [f"train: {self.train_stats.summary()}; {len(self.train)} pairs in {self.train.num_epochs} epochs"]
        if self.valid is not None and self.valid_stats is not None:
            lines.append(f"valid: {self.valid_stats.summary()}")
        return "\n".join(lines)


def build_preference_datasets(
    cfg: PreferenceDataConfig,
    tokenizer,
    template: Union[ChatTemplate, str],
    seq_len: int,
    *,
    num_epochs: int = 1,
    min_pairs: int = 0,
) -> PreferenceDatasets:
    """Read, split, tokenize and truncate the data of ``cfg`` for a run of ``seq_len`` positions.

    ``min_pairs``: make the training stream at least this long (whole epochs), e.g. the run's
    ``steps * global_batch_size``. The validation pairs are in order, one epoch.
    """
    template = as_template(template)
    max_prompt_length, max_length = cfg.lengths(seq_len)
    train_stats = PreferenceStats()
    pairs = read_preference_pairs(cfg.paths, on_error=cfg.on_error, identical=cfg.identical, stats=train_stats)
    valid_stats: Optional[PreferenceStats] = None
    valid_pairs: list[PreferencePair] = []
    if cfg.valid_paths:
        valid_stats = PreferenceStats()
        valid_pairs = read_preference_pairs(cfg.valid_paths, on_error=cfg.on_error, identical=cfg.identical,
                                            stats=valid_stats, key="data.valid_path")
    elif cfg.valid_fraction > 0:
        pairs, valid_pairs = split_pairs(pairs, cfg.valid_fraction, cfg.split_seed)
        valid_stats = PreferenceStats(pairs=len(valid_pairs))
        train_stats.pairs -= len(valid_pairs)
    if not pairs:
        raise ConfigError("data.path", f"no valid training pairs ({train_stats.summary()})")
    pad_id = pad_token_id(tokenizer)
    common = dict(on_error=cfg.on_error)
    train_samples = load_tokenized_pairs(pairs, tokenizer, template, max_length, max_prompt_length,
                                         stats=train_stats, **common)
    if not train_samples:
        raise ConfigError("data.path", f"no training pair left ({train_stats.summary()})")
    train = PreferenceDataset(train_samples, seed=cfg.seed, num_epochs=num_epochs, min_pairs=min_pairs, pad_id=pad_id,
                              max_length=max_length)
    valid = None
    if valid_pairs and valid_stats is not None:
        valid_samples = load_tokenized_pairs(valid_pairs, tokenizer, template, max_length, max_prompt_length,
                                             stats=valid_stats, **common)
        if valid_samples:
            valid = PreferenceDataset(valid_samples, shuffle=False, pad_id=pad_id, max_length=max_length)
    return PreferenceDatasets(train, valid, train_stats, valid_stats, max_prompt_length, max_length)
