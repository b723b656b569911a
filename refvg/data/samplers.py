"""The training shuffle, made resumable at any step.

A fresh permutation per epoch, drawn from a generator that belongs to the sampler alone (not the
DataLoader's, which also seeds workers, and is drawn from differently when workers persist). So the
data order is a function of (seed, epoch) only, and the pair (generator state at the start of the
epoch, indices already consumed) is an exact position: restored, the run sees the very batches it
would have seen uninterrupted.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffle(Sampler[int]):
    """Under data parallelism (`world` > 1) every rank draws the same permutation, cut to a multiple
    of `world` (all ranks must take the same number of steps), and takes every `world`-th index from
    `rank`."""

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.num_samples, self.rank, self.world = num_samples, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_start = self.generator.get_state()
        self._skip = 0

    @property
    def epoch_share(self) -> range:
        """Positions in the epoch's permutation this rank reads."""
        return range(self.rank, self.num_samples - self.num_samples % self.world, self.world)

    def __iter__(self) -> Iterator[int]:
        self._epoch_start = self.generator.get_state()
        order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        skip, self._skip = self._skip, 0  # only the first epoch after a resume starts part-way
        yield from (order[i] for i in self.epoch_share[skip:])

    def __len__(self) -> int:
        return len(self.epoch_share) - self._skip

    def position(self, consumed: int) -> dict:
        """The state to checkpoint after `consumed` indices of the current epoch (0: at an epoch
        boundary, where the generator already holds the next epoch's start)."""
        start = self._epoch_start if consumed else self.generator.get_state()
        return {"generator": start.clone(), "consumed": consumed}

    def restore(self, position: dict) -> None:
        if not 0 <= position["consumed"] <= len(self.epoch_share):
            raise ValueError(
                f"checkpointed position {position['consumed']} is outside an epoch of "
                f"{len(self.epoch_share)} samples"
            )
        self.generator.set_state(position["generator"])
        self._skip = position["consumed"]
