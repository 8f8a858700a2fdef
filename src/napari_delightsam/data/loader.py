"""Fast training data: decode + resize once to the training size, keep it in RAM, augment per draw.

``SegmentationDataset`` indexes ``(record index, augmentation seed)`` pairs (what
``BalancedSampler`` yields) and returns a dict of tensors:

    image     (3,S,S) uint8   (``normalise`` it on the device: float, PIXEL_MEAN/PIXEL_STD)
    mask      (1,S,S) uint8 {0,1}
    modality  () long   index into the model's modalities
    index     () long   record index

The data of this project is small (≤ 512 px, a few thousand images), so by default every pair
is decoded once, resized to S×S (plain resize as the paper, antialiased) and kept as uint8 in
one shared array; DataLoader workers read it through fork's copy-on-write pages. Pairs that
cannot be used are dropped during that pass with a ``DataWarning`` naming the file. Without
the cache, a pair that fails at load time is replaced by the next usable one (with a warning),
so a bad file never crashes a batch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..config import PIXEL_MEAN, PIXEL_STD
from .augment import AugmentPolicy, augment_hwc, policy_for
from .records import BadSampleError, DataWarning, SampleRecord, load_image_only, load_pair

__all__ = [
    "SegmentationDataset",
    "measure_loader",
    "normalise",
    "resize_pair",
]


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(H,W,3) float [0,255] + (H,W) bool -> (S,S,3) uint8 image + (S,S) uint8 soft mask (0..255).

    Image and mask are stacked as one (H,W,4) uint8 array and resized together (bilinear,
    antialiased when shrinking; torch's uint8 channels-last kernel). The mask keeps its soft
    edge so later scaling and the final threshold stay accurate.
    """
    h, w = image.shape[:2]
    stacked = np.empty((h, w, 4), dtype=np.uint8)
    stacked[..., :3] = np.clip(np.rint(image), 0, 255)
    stacked[..., 3] = np.where(mask, 255, 0)
    if (h, w) != (size, size):
        t = torch.from_numpy(stacked).permute(2, 0, 1)[None]  # channels-last view
        shrink = size < h or size < w
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        stacked = t[0].permute(1, 2, 0).contiguous().numpy()
    return stacked[..., :3], stacked[..., 3]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) [0,255] -> SAM-normalised float (the model's input)."""
    mean = torch.tensor(PIXEL_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def _load_resized(
    record: SampleRecord, size: int, notes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    if record.mask_path is None and record.mask is None:  # image-only (distillation)
        image = load_image_only(record)
        return resize_pair(image, np.zeros(image.shape[:2], dtype=bool), size)
    image, mask = load_pair(record, notes)
    return resize_pair(image, mask, size)


class SegmentationDataset(Dataset):
    """Records resized to ``img_size``; optional RAM cache; per-draw seeded augmentation.

    ``modalities`` maps a record's modality name to the model's index (-1 for a name outside
    it, allowed only with ``any_modality=True``, e.g. natural images for distillation). Records
    without a mask get an empty mask. ``policies`` replaces the augmentation policy of the
    modalities it names (``data.augment.policies_with``). Unusable records are dropped while caching (see
    ``self.skipped``); ``self.records`` is what remains.
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        img_size: int,
        modalities: Sequence[str],
        *,
        augment: bool = True,
        cache: bool = True,
        cache_max_bytes: int | None = None,
        threads: int = 4,
        any_modality: bool = False,
        policies: Mapping[str, AugmentPolicy] | None = None,
    ) -> None:
        if not records:
            raise ValueError("no samples to load")
        self.img_size = int(img_size)
        self.modalities = tuple(modalities)
        self.augment = augment
        #: augmentation policy per modality where it is not ``policy_for``'s
        self.policies: dict[str, AugmentPolicy] = dict(policies or {})
        self.skipped: list[str] = []
        records = list(records)
        unknown = sorted({r.modality for r in records} - set(self.modalities))
        if unknown and not any_modality:
            raise ValueError(
                f"modality {', '.join(unknown)} is not one of the model's: {', '.join(self.modalities)}"
            )
        need = len(records) * self.img_size * self.img_size * 4
        if cache and cache_max_bytes is not None and need > cache_max_bytes:
            warnings.warn(
                f"RAM cache of {need / 2**30:.1f} GiB exceeds the limit {cache_max_bytes / 2**30:.1f} GiB; "
                "decoding on the fly instead",
                DataWarning,
                stacklevel=2,
            )
            cache = False
        self.cached = cache
        #: (N,S,S,4) uint8: RGB + soft mask (0..255) per record, one block of shared memory
        self._cache: np.ndarray | None = None
        if cache:
            records = self._fill_cache(records, threads)
        self.records = records

    def _fill_cache(self, records: list[SampleRecord], threads: int) -> list[SampleRecord]:
        s = self.img_size
        cache = np.empty((len(records), s, s, 4), dtype=np.uint8)

        def work(i: int) -> tuple[int, str | None, list[str]]:
            notes: list[str] = []  # warnings are issued from this thread below (not thread-safe)
            try:
                cache[i, ..., :3], cache[i, ..., 3] = _load_resized(records[i], s, notes)
                err = None
            except BadSampleError as exc:
                err = str(exc)
            return i, err, notes

        keep = []
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for i, err, notes in pool.map(work, range(len(records))):
                for note in notes:  # re-issued here so they reach the caller's warning filters
                    warnings.warn(note, DataWarning, stacklevel=4)
                if err is None:
                    keep.append(i)
                else:
                    self.skipped.append(err)
                    warnings.warn(f"skipped: {err}", DataWarning, stacklevel=4)
        if not keep:
            raise ValueError(
                f"none of the {len(records)} samples could be loaded; first problem: {self.skipped[0]}"
            )
        if len(keep) < len(records):
            cache = cache[keep]
        self._cache = cache
        return [records[i] for i in keep]

    def __len__(self) -> int:
        return len(self.records)

    def _arrays(self, index: int) -> tuple[int, np.ndarray]:
        """(record index actually used, (S,S,4) uint8 RGB + soft mask)."""
        if self._cache is not None:
            return index, self._cache[index]
        n = len(self.records)
        for step in range(n):  # on-the-fly decoding: fall back to the next usable record
            j = (index + step) % n
            try:
                img, msk = _load_resized(self.records[j], self.img_size)
                return j, np.concatenate([img, msk[..., None]], axis=-1)
            except BadSampleError as exc:
                warnings.warn(f"skipped: {exc}", DataWarning, stacklevel=3)
        raise ValueError("none of the samples could be loaded")

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = (item, None) if isinstance(item, (int, np.integer)) else item
        index, x = self._arrays(int(index))  # (S,S,4) uint8: geometry moves image and mask together
        record = self.records[index]
        if self.augment and seed is not None:
            x = augment_hwc(x, int(seed), self.policies.get(record.modality) or policy_for(record.modality))
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
        return {
            "image": t[:3],
            "mask": (t[3:] > 127).to(torch.uint8),
            "modality": torch.tensor(
                self.modalities.index(record.modality) if record.modality in self.modalities else -1,
                dtype=torch.long,
            ),
            "index": torch.tensor(index, dtype=torch.long),
        }


def measure_loader(loader: DataLoader, max_batches: int = 50, warmup: int = 2) -> dict[str, float]:
    """Samples per second of a DataLoader alone (no model): iterate ``max_batches`` batches."""
    it = iter(loader)
    for _ in range(warmup):
        try:
            next(it)
        except StopIteration:
            break
    n = 0
    batches = 0
    t0 = time.perf_counter()
    for batch in it:
        n += int(batch["image"].shape[0])
        batches += 1
        if batches >= max_batches:
            break
    dt = time.perf_counter() - t0
    return {"samples": float(n), "seconds": dt, "samples_per_s": n / dt if dt > 0 else float("nan")}
