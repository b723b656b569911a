"""The training shuffle, made resumable at any step.

A fresh permutation per epoch, drawn from a generator that belongs to the sampler alone (not the DataLoader's,
which also seeds workers, and is drawn from differently when workers persist). So the data order is a function
of (seed, epoch) only, and the pair (generator state at the start of the epoch, indices already consumed) is
an exact position: restored, the run sees the very batches it would have seen uninterrupted.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffle(Sampler[int]):
    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_start = self.generator.get_state()
        self._skip = 0

    def __iter__(self) -> Iterator[int]:
        self._epoch_start = self.generator.get_state()
        order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        skip, self._skip = self._skip, 0  # only the first epoch after a resume starts part-way
        yield from order[skip:]

    def __len__(self) -> int:
        return self.num_samples - self._skip

    def position(self, consumed: int) -> dict:
        """The state to checkpoint after `consumed` indices of the current epoch (0: at an epoch boundary,
        where the generator already holds the next epoch's start)."""
        start = self._epoch_start if consumed else self.generator.get_state()
        return {"generator": start.clone(), "consumed": consumed}

    def restore(self, position: dict) -> None:
        if not 0 <= position["consumed"] <= self.num_samples:
            raise ValueError(f"checkpointed position {position['consumed']} is outside an epoch of {self.num_samples}")
        self.generator.set_state(position["generator"])
        self._skip = position["consumed"]
