"""The batches a training loop consumes: a seeded, modality-balanced sample stream per epoch.

``EpochBatches(dataset, ...)`` is the loop's ``batches``: ``batches(epoch)`` iterates that
epoch's micro-batches. The stream (``data.BalancedSampler``) depends only on the seed and the
epoch — a resumed run sees the samples a straight run would — and is cut into one shard per
DDP rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.utils.data import DataLoader, Dataset

from ...data import BalancedSampler
from .runfolder import RunLog

__all__ = ["EpochBatches", "cache_cap", "relayed_warnings", "steps_per_epoch"]


def cache_cap() -> int | None:
    """Bytes an image RAM cache may take: half the memory available now (None: unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.5)
    except Exception:  # pragma: no cover - psutil missing
        return None


@contextmanager
def relayed_warnings(log: RunLog) -> Iterator[None]:
    """Collect the UserWarnings raised inside (skipped files, split notes) and pass each on as a
    Python warning and a ``warning`` progress event (main rank)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, UserWarning):
            log.warn(str(w.message), w.category)


def steps_per_epoch(n_samples: int, samples_per_step: int, fixed: int | None = None) -> int:
    """``fixed``, or one pass over ``n_samples`` (at least one step)."""
    return fixed or max(1, math.ceil(n_samples / samples_per_step))


class EpochBatches:
    """``batches(epoch)``: the micro-batches of one epoch, ``steps × grad_accum`` of them.

    ``dataset`` must have ``records`` (``data.SampleRecord``s: what the sampler balances).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        steps: int,
        grad_accum: int = 1,
        seed: int = 0,
        balanced: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sampler = BalancedSampler(
            dataset.records,  # type: ignore[attr-defined]
            samples_per_rank=steps * batch_size * grad_accum,
            seed=seed,
            rank=rank,
            world_size=world_size,
            balanced=balanced,
        )
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            drop_last=False,
        )

    def __call__(self, epoch: int) -> Iterator[Any]:
        self.sampler.set_epoch(epoch)
        return iter(self.loader)
