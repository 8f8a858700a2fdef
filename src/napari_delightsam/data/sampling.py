"""Modality-balanced sampling, seeded per epoch and sharded across DDP ranks.

Rule (recorded in the run's config as ``SAMPLING_RULE``): every modality present is equally
likely; within a modality every dataset is equally likely; within a dataset every image is
equally likely. So a sample's weight is ``1 / (M · D_m · N_d)`` and DRIVE's 40 images are drawn
as often, in total, as BUSI's 500. Draws are with replacement.

The stream of an epoch is a pure function of (seed, epoch): ``world_size`` ranks each take a
disjoint shard ``stream[rank::world_size]`` of the same stream (the DistributedSampler
contract), and each element carries its own augmentation seed, so the samples a model sees do
not depend on the number of DataLoader workers or on resuming.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from .records import SampleRecord

__all__ = ["SAMPLING_RULE", "BalancedSampler", "balanced_weights"]

SAMPLING_RULE = (
    "modality-balanced: each modality equally likely, each dataset equally likely within its modality, "
    "each image equally likely within its dataset; with replacement; stream seeded by (seed, epoch), "
    "rank r takes stream[r::world_size]"
)


def balanced_weights(records: Sequence[SampleRecord]) -> np.ndarray:
    """(N,) float64 probabilities summing to 1 (see the module docstring)."""
    if not records:
        raise ValueError("no records to sample from")
    per_dataset: dict[str, int] = {}
    datasets_of: dict[str, set[str]] = {}
    for r in records:
        per_dataset[r.key] = per_dataset.get(r.key, 0) + 1
        datasets_of.setdefault(r.modality, set()).add(r.key)
    m = len(datasets_of)
    w = np.array(
        [1.0 / (m * len(datasets_of[r.modality]) * per_dataset[r.key]) for r in records], dtype=np.float64
    )
    return w / w.sum()


class BalancedSampler(Sampler[tuple[int, int]]):
    """Yields ``(record index, augmentation seed)`` for this rank's shard of one epoch.

    ``samples_per_rank`` elements per epoch; call ``set_epoch(e)`` before each epoch.
    ``balanced=False`` draws uniformly over images instead (still seeded and sharded).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        samples_per_rank: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        balanced: bool = True,
    ) -> None:
        if samples_per_rank < 1:
            raise ValueError(f"samples_per_rank must be >= 1, got {samples_per_rank}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        n = len(records)
        self.weights = balanced_weights(records) if balanced else np.full(n, 1.0 / n)
        self.samples_per_rank = samples_per_rank
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_stream(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, augmentation seeds) of the whole epoch, all ranks together."""
        total = self.samples_per_rank * self.world_size
        rng = np.random.default_rng([self.seed, self.epoch, 0x5A3])
        idx = rng.choice(len(self.weights), size=total, replace=True, p=self.weights)
        aug = rng.integers(0, 2**31 - 1, size=total)
        return idx, aug

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx, aug = self.global_stream()
        for i, s in zip(idx[self.rank :: self.world_size], aug[self.rank :: self.world_size], strict=True):
            yield int(i), int(s)

    def __len__(self) -> int:
        return self.samples_per_rank


def sample_counts(records: Sequence[SampleRecord], sampler: BalancedSampler) -> dict[str, int]:
    """How many draws of the current epoch's global stream fall on each modality (for tests/logs)."""
    idx, _ = sampler.global_stream()
    counts: dict[str, int] = {}
    for i in idx:
        counts[records[int(i)].modality] = counts.get(records[int(i)].modality, 0) + 1
    return counts
