"""The training data loader: one data-parallel rank's micro-batches of a global sample stream.

The dataset defines a single global order of samples. Each micro-step consumes the next
``micro_batch_size * dp_size`` samples of that order, and rank ``r`` takes the ``r``-th contiguous
slice of ``micro_batch_size`` (as Megatron-LM's ``MegatronPretrainingSampler`` does). So across the
ranks no sample is repeated or skipped, and the whole position of the run is one number, the global
count of consumed samples: resuming from it continues with exactly the next sample, and resuming with
a different number of ranks keeps the global order (only the slicing changes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch


class SampleSource(Protocol):
    """What the loader reads: a :class:`~tanuki.data.blend.BlendedDataset` or a GPT dataset."""

    seq_len: int

    def __len__(self) -> int: ...

    def sample(self, i: int, out: np.ndarray | None = None) -> np.ndarray: ...


class DataLoader:
    """Micro-batches ``{"tokens": LongTensor (micro_batch_size, seq_len + 1)}`` for one DP rank.

    The training step uses ``tokens[:, :-1]`` as input and ``tokens[:, 1:]`` as labels. Iteration
    starts at :attr:`consumed_samples` and stops when the next micro-step would run past the end of
    the dataset. Save :meth:`state_dict` with a checkpoint and pass it back with
    :meth:`load_state_dict` (or ``consumed_samples=``) to resume.
    """

    def __init__(
        self,
        dataset: SampleSource,
        *,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        pin_memory: bool = False,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.pin_memory = pin_memory
        #: samples of the global stream consumed by all ranks together
        self.consumed_samples = consumed_samples

    @property
    def samples_per_micro_step(self) -> int:
        """Global samples one micro-step consumes (all ranks together)."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro-batches left until the end of the dataset."""
        return max(0, (len(self.dataset) - self.consumed_samples) // self.samples_per_micro_step)

    def indices(self, consumed: int) -> range:
        """Global sample indices of this rank in the micro-step that starts at ``consumed``."""
        start = consumed + self.dp_rank * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.consumed_samples + self.samples_per_micro_step <= len(self.dataset):
            batch = self._read(self.indices(self.consumed_samples))
            # Count the samples as consumed when handed out, so a checkpoint saved after the step
            # that used this batch resumes with the batch after it.
            self.consumed_samples += self.samples_per_micro_step
            yield batch

    def _read(self, indices: range) -> dict[str, torch.Tensor]:
        tokens = torch.empty((len(indices), self.dataset.seq_len + 1), dtype=torch.int64, pin_memory=self.pin_memory)
        rows = tokens.numpy()
        for row, i in zip(rows, indices):
            self.dataset.sample(i, row)
        return {"tokens": tokens}

    def state_dict(self) -> dict[str, int]:
        """The loader's position: global samples consumed."""
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` (saved with any number of data-parallel ranks)."""
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self.consumed_samples = consumed
