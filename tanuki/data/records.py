"""Chat records from JSONL: the files, the lines, the messages, and what happened to them.

Shared by the SFT (:mod:`tanuki.data.sft`) and preference (:mod:`tanuki.data.preference`) data:

* :class:`ChatDataConfig`: the ``data`` keys both share (the JSONL files and the validation split);
  :func:`path_list` / :func:`expand_paths` turn a path spec (paths, globs, comma-separated lists)
  into files.
* :func:`json_lines` / :func:`read_records`: the records of JSONL files, each with its ``file:line``;
  a bad record is a :class:`SFTDataError` naming it, or with ``on_error="skip"`` is counted by
  reason in a :class:`RecordStats`.
* :func:`validate_messages`, :func:`conversation_from_record` (``{"messages": [...]}`` or Alpaca
  style, converted by :func:`alpaca_to_messages`) and :func:`split_conversations`.
* :func:`read_eval_prompts` / :func:`exact_match`: held-out prompts with exact answers.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, TypeVar, Union

from tanuki.config import ConfigError, require
from tanuki.data.gpt_dataset import split_documents
from tanuki.tokenizer.templates import (
    JAPANESE_ALPACA_INPUT_HEADER,
    JAPANESE_ALPACA_INPUT_SYSTEM,
    JAPANESE_ALPACA_SYSTEM,
    ROLES,
)

T = TypeVar("T")

#: a path spec: a path, a glob, a comma-separated list, or a sequence of those
PathSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def path_list(paths: PathSpec) -> list[str]:
    """The items of a path spec, in order: comma-separated lists split, blanks dropped (globs and
    paths are not resolved; see :func:`expand_paths`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        out += [s.strip() for s in os.fspath(p).split(",") if s.strip()]
    return out


def expand_paths(paths: PathSpec, key: str = "data.path") -> list[str]:
    """Files named by ``paths`` (paths, globs, comma-separated lists), in the order given."""
    files: list[str] = []
    for p in path_list(paths):
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


@dataclass(frozen=True)
class ChatDataConfig:
    """The keys the ``data`` of an SFT and of a DPO run share: which JSONL files, how to split them
    (the stages' configs, :class:`~tanuki.data.sft.SFTDataConfig` and
    :class:`~tanuki.data.preference.PreferenceDataConfig`, add their own after these)."""

    #: JSONL files: a path, a glob, a comma-separated list, or a list of those
    path: Union[str, tuple[str, ...]] = ()
    #: separate validation files (instead of valid_fraction)
    valid_path: Union[str, tuple[str, ...]] = ()
    #: fraction of the records (conversations, pairs) held out for validation (0: no split)
    valid_fraction: float = 0.0
    #: seed of the train/validation split; separate from ``seed`` so that changing the shuffle never
    #: moves a record between the splits
    split_seed: int = 0
    #: seed of the shuffle (a different order every epoch)
    seed: int = 1234

    def __post_init__(self) -> None:
        require(0.0 <= self.valid_fraction < 1.0, "data.valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        require(
            not (self.valid_fraction > 0 and path_list(self.valid_path)),
            "data.valid_path",
            "give either data.valid_fraction or data.valid_path, not both",
        )

    @property
    def paths(self) -> list[str]:
        return path_list(self.path)

    @property
    def valid_paths(self) -> list[str]:
        return path_list(self.valid_path)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


class SFTDataError(ValueError):
    """A bad SFT record; the message starts with ``file:line``. ``reason`` is the key it is counted
    under when bad records are skipped."""

    def __init__(self, source: str, reason: str, message: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {message}" if source else message)


class RecordStats:
    """The counting shared by the stats dataclasses of a split (:class:`~tanuki.data.sft.SFTStats`,
    :class:`~tanuki.data.preference.PreferenceStats`), which declare ``records`` (non-blank JSONL
    lines read) and ``skipped`` (bad records left out, by reason) among their fields."""

    records: int
    skipped: dict[str, int]

    def skip(self, reason: str) -> None:
        """Count a record left out for ``reason``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def skip_or_raise(self, error: SFTDataError, on_error: Literal["fail", "skip"]) -> None:
        """Raise ``error`` with ``on_error="fail"``; count it under its reason with ``"skip"``."""
        if on_error == "fail":
            raise error
        self.skip(error.reason)

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def read_summary(self, kept: str) -> str:
        """The start of a summary: ``"R records, "`` (when any were read), then ``kept`` (such as
        ``"12 conversations"``) and the skipped records by reason."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return (
            (f"{self.records} records, " if self.records else "")
            + kept
            + (f", {skipped} skipped ({reasons})" if skipped else "")
        )


def check_on_error(on_error: str, key: str = "on_error") -> None:
    """``ValueError`` unless ``on_error`` (or the setting ``key``) is ``fail`` or ``skip``."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"{key} must be 'fail' or 'skip', got {on_error!r}")


def json_lines(path: str, error: type[SFTDataError] = SFTDataError) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed object) for each non-blank line of a JSONL file; a line that is not
    JSON comes as (``file:line``, an ``error`` [invalid_json]) instead of the object."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{n}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as e:
                yield source, error(source, "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")


def read_records(
    paths: PathSpec,
    parse: Callable[[Any, str], T],
    *,
    on_error: Literal["fail", "skip"],
    stats: RecordStats,
    key: str = "data.path",
    error: type[SFTDataError] = SFTDataError,
) -> Iterator[T]:
    """``parse(record, "file:line")`` of every record of the JSONL files ``paths``, in file and line
    order, counted in ``stats.records``.

    A bad record (invalid JSON, or ``parse`` raising ``error``) raises with ``on_error="fail"``; with
    ``"skip"`` it is counted in ``stats.skipped[reason]`` and left out. ``on_error`` is checked at the
    call, the files (``key``: the config key named when one does not exist) when iterating.
    """
    check_on_error(on_error)
    return _parsed_records(paths, parse, on_error, stats, key, error)


def _parsed_records(paths, parse, on_error, stats, key, error):
    for path in expand_paths(paths, key):
        for source, record in json_lines(path, error):
            stats.records += 1
            try:
                if isinstance(record, SFTDataError):
                    raise record
                item = parse(record, source)
            except error as e:
                stats.skip_or_raise(e, on_error)
                continue
            yield item


def split_conversations(records: Sequence[T], valid_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, valid) by a seeded random choice of ``round(valid_fraction * n)`` records (at least
    one when the fraction is positive), as the pretraining data splits documents. Conversations or
    any other records: only the sequence is indexed."""
    try:
        train, valid = split_documents(len(records), valid_fraction, seed)
    except ValueError as e:
        raise ConfigError("data.valid_fraction", str(e)) from None
    return [records[i] for i in train], [records[i] for i in valid]


# --------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------


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
    [no_assistant] (unless ``need_assistant=False``); turns out of order [role_order]: after the
    system message the turns alternate user, assistant, user, ... starting with a user turn, and a
    conversation to train on (``need_assistant=True``) ends with an assistant turn (a chat template
    renders each turn as a reply to the one before, and the loss is on assistant turns).
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
    turns = [(i, m["role"]) for i, m in enumerate(out) if m["role"] != "system"]
    if not turns:
        raise SFTDataError(source, "role_order", "the conversation has only a system message")
    if turns[0][1] != "user":
        raise SFTDataError(source, "role_order", f"messages[{turns[0][0]}]: the first turn must be a user turn, "
                           f"got {turns[0][1]}")
    for (_, prev), (i, role) in zip(turns, turns[1:]):
        if role == prev:
            raise SFTDataError(source, "role_order", f"messages[{i}]: two {role} turns in a row (turns must "
                               "alternate user, assistant)")
    if need_assistant and turns[-1][1] != "assistant":
        raise SFTDataError(source, "role_order", f"messages[{turns[-1][0]}]: the conversation ends with a user "
                           "turn (nothing to learn from it); end it with the assistant's reply")
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
    for source, record in json_lines(os.fspath(path)):
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
