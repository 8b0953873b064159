"""Supervised fine-tuning data: conversations from JSONL, rendered with a chat template, tokenized with
assistant-only labels, packed into rows of ``seq_len`` tokens, and served to data-parallel ranks.

Read in the order of the data flow:

1. :func:`read_conversations`: JSONL records, each either ``{"messages": [{"role", "content"}, ...]}``
   (roles ``system`` / ``user`` / ``assistant``, multi-turn, the system message optional and first) or
   Alpaca style ``{"instruction", "input" (optional), "output"}``, converted by
   :func:`~tanuki.data.records.alpaca_to_messages`. A bad record (invalid JSON, unknown role, no
   assistant turn, empty content, ...) is an :class:`~tanuki.data.records.SFTDataError` naming
   ``file:line``, or with ``on_error="skip"`` is counted by reason and left out (the records and
   their checks are in :mod:`tanuki.data.records`).
2. :func:`tokenize_conversations`: render with a :class:`~tanuki.tokenizer.templates.ChatTemplate`,
   tokenize the rendered text once with ``add_special_tokens=False`` (the template writes BOS itself;
   the ``<s>`` / ``</s>`` text it writes is matched as the special tokens, exactly as
   ``apply_chat_template(tokenize=True)`` does), and mark as targets the tokens whose characters lie
   in an assistant content + EOS span of the rendering (``return_offsets_mapping``; the masks of
   :mod:`tanuki.data.chat_tokens`). A template read from the model (``template=auto``,
   :mod:`tanuki.tokenizer.jinja_template`) ends each span with its own end-of-turn token instead
   (``<|im_end|>``, ``<|eot_id|>``, ...). The masks come from the rendering, never from searching the ids
   for a response marker.
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
of ``sum of token losses / loss tokens in the global batch`` without communication. A loader given
``grad_accumulation`` hands it to the step with every micro-batch (``loss_normalizer``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import torch

from tanuki.config import ConfigError
from tanuki.data.chat_tokens import (
    TokenizerInfo,
    as_template,
    assistant_targets,
    check_targets,
    id_dtype,
    pad_token_id,
)
from tanuki.data.loader import DataLoader
from tanuki.data.records import (
    ChatDataConfig,
    Conversation,
    PathSpec,
    RecordStats,
    SFTDataError,
    conversation_from_record,
    exact_match,
    read_eval_prompts,
    read_records,
    split_conversations,
)
from tanuki.losses import IGNORE_INDEX
from tanuki.tokenizer.jinja_template import TemplateRefused
from tanuki.tokenizer.templates import ChatTemplate, Rendered

__all__ = [  # with the names the SFT stage imports from here, though they live in tanuki.data.records
    "BATCH_KEYS",
    "PAD_SEGMENT",
    "SFTDataConfig",
    "SFTDataLoader",
    "SFTDataset",
    "SFTDatasets",
    "SFTSample",
    "SFTStats",
    "build_sft_datasets",
    "count_loss_tokens",
    "exact_match",
    "first_fit",
    "fit_to_length",
    "load_samples",
    "make_row",
    "pack",
    "pack_plan",
    "read_conversations",
    "read_eval_prompts",
    "tokenize_conversations",
]

#: the keys of a row / micro-batch, each int64 ``(seq_len,)`` / ``(micro_batch_size, seq_len)``
BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids")
#: segment id of padding positions
PAD_SEGMENT = -1

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTDataConfig(ChatDataConfig):
    """``data`` of an SFT run: which JSONL files, how to split them (the keys of
    :class:`~tanuki.data.records.ChatDataConfig`; ``seed`` seeds the sample shuffle and the packing),
    how to pack and truncate them."""

    #: several samples per row (first-fit) instead of one padded sample per row
    packing: bool = True
    #: samples longer than train.seq_len: ``truncate`` keeps the head (and drops a sample left with
    #: no assistant token), ``drop`` leaves them out; either way counted and reported
    truncation: Literal["drop", "truncate"] = "truncate"
    #: bad records: ``fail`` (stop, naming file:line) or ``skip`` (count by reason)
    on_error: Literal["fail", "skip"] = "fail"


# --------------------------------------------------------------------------------------------------
# Records -> conversations
# --------------------------------------------------------------------------------------------------


@dataclass
class SFTStats(RecordStats):
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

    def summary(self) -> str:
        return (
            self.read_summary(f"{self.conversations} conversations")
            + f"; {self.samples} samples, {self.tokens} tokens, {self.loss_tokens} loss tokens"
            + (f"; {self.too_long} too long: {self.truncated} truncated, {self.dropped} dropped" if self.too_long else "")
        )


def read_conversations(
    paths: PathSpec,
    *,
    on_error: Literal["fail", "skip"] = "fail",
    stats: Optional[SFTStats] = None,
    key: str = "data.path",
) -> list[Conversation]:
    """Every valid conversation of the JSONL files ``paths``, in file and line order.

    With ``on_error="fail"`` the first bad record raises :class:`SFTDataError` (``file:line: ...``);
    with ``"skip"`` it is counted in ``stats.skipped[reason]`` and left out. ``key`` is the config key
    named when a path does not exist.
    """
    stats = stats if stats is not None else SFTStats()
    out = list(read_records(paths, conversation_from_record, on_error=on_error, stats=stats, key=key))
    stats.conversations += len(out)
    return out


# --------------------------------------------------------------------------------------------------
# Conversations -> token ids with targets
# --------------------------------------------------------------------------------------------------


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
    template = as_template(template)
    stats = stats if stats is not None else SFTStats()
    info = TokenizerInfo(tokenizer, template)
    out: list[SFTSample] = []
    for lo in range(0, len(conversations), batch_size):
        batch = []
        for conv in conversations[lo : lo + batch_size]:
            try:
                for m in conv.messages:
                    bad = info.special_text_in(m["content"])
                    if bad is not None:
                        raise SFTDataError(conv.source, "special_token_text",
                                           f"a {m['role']} message contains the special token text {bad!r}")
                try:
                    rendered = template.render(conv.messages, bos_token=info.bos or "", eos_token=info.eos)
                except TemplateRefused as e:
                    raise SFTDataError(conv.source, "template_refused", str(e)) from None
            except SFTDataError as e:
                stats.skip_or_raise(e, on_error)
                continue
            batch.append((conv, rendered))
        if not batch:
            continue
        enc = tokenizer([r.text for _, r in batch], add_special_tokens=False, return_offsets_mapping=True)
        for (conv, rendered), ids, offs in zip(batch, enc["input_ids"], enc["offset_mapping"]):
            out.append(_sample(conv, rendered, np.asarray(ids, dtype=np.int64), np.asarray(offs, dtype=np.int64).reshape(-1, 2), info, stats))
    return out


def _sample(conv: Conversation, rendered: Rendered, ids: np.ndarray, offsets: np.ndarray, info: TokenizerInfo,
            stats: SFTStats) -> SFTSample:
    target, boundary_tokens = assistant_targets(rendered, ids, offsets, info)
    stats.boundary_tokens += boundary_tokens
    check_targets(rendered, ids, target, info, conv.source)
    return SFTSample(ids.astype(id_dtype(ids)), target, conv.source)


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

    With ``grad_accumulation`` (the micro-steps of an optimizer step; None for a validation loader)
    every micro-batch also carries ``loss_normalizer``, the float :meth:`loss_normalizer` of its
    optimizer step. The steps are counted from the position the loader starts at (``consumed_samples``
    or :meth:`load_state_dict`, a step boundary).
    """

    dataset: SFTDataset

    def __init__(self, dataset: SFTDataset, *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, pin_memory: bool = False, grad_accumulation: Optional[int] = None):
        super().__init__(dataset, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=consumed_samples, pin_memory=pin_memory)
        if grad_accumulation is not None and grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be positive, got {grad_accumulation}")
        self.grad_accumulation = grad_accumulation
        #: where the optimizer steps are counted from
        self._first_step = self.consumed_samples

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self._first_step = self.consumed_samples

    def _read(self, indices: range) -> dict:
        rows = [self.dataset.sample(i) for i in indices]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in BATCH_KEYS}
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        if self.grad_accumulation is not None:
            batch["loss_normalizer"] = self.loss_normalizer()
        return batch

    def global_loss_tokens(self, micro_steps: int = 1) -> int:
        """Loss tokens in the next ``micro_steps`` micro-steps of all ranks together, from the current
        position: the normaliser of an optimizer step over ``micro_steps`` accumulation steps. The
        same number on every rank, with no communication."""
        return self._loss_tokens_from(self.consumed_samples, micro_steps)

    def loss_normalizer(self) -> float:
        """What the summed token losses of a micro-batch of the current optimizer step are divided by:
        ``max(loss tokens of the step, 1) / (grad_accumulation * dp_size)``. DeepSpeed divides each
        micro-batch loss by the accumulation steps and averages the gradients over the data-parallel
        ranks; this undoes both, so that the step's gradient is that of the mean over every loss token
        of its global batch."""
        gas = self.grad_accumulation
        if gas is None:
            raise ValueError("the loss normaliser needs the loader's grad_accumulation")
        per_step = gas * self.samples_per_micro_step
        step_start = self.consumed_samples - (self.consumed_samples - self._first_step) % per_step
        return max(self._loss_tokens_from(step_start, gas), 1) / (gas * self.dp_size)

    def _loss_tokens_from(self, start: int, micro_steps: int) -> int:
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
    template = as_template(template)
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
    pad_id = pad_token_id(tokenizer)
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
