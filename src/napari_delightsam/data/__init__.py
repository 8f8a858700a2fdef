"""Training data: dataset layout, splits, modality-balanced sampling, paired augmentation.

records.py   folder discovery / in-memory items, bad-data checks, decoding
splits.py    deterministic seeded 8:1:1 split per dataset (grouped), splits.json
sampling.py  modality-balanced sampler, seeded per epoch, sharded across DDP ranks
augment.py   geometry on image+mask together, intensity on the image only
loader.py    resize-once RAM cache, Dataset returning tensors, loader throughput
"""

from .augment import AugmentPolicy, augment, policy_for
from .loader import SegmentationDataset, measure_loader, normalise, resize_pair
from .records import (
    BadSampleError,
    DataWarning,
    SampleRecord,
    binarise_mask,
    discover,
    discover_images,
    load_image_only,
    load_pair,
    records_from_items,
)
from .sampling import SAMPLING_RULE, BalancedSampler, balanced_weights
from .splits import Splits, default_group, load_splits, make_splits, save_splits, select

__all__ = [
    "SAMPLING_RULE",
    "AugmentPolicy",
    "BadSampleError",
    "BalancedSampler",
    "DataWarning",
    "SampleRecord",
    "SegmentationDataset",
    "Splits",
    "augment",
    "balanced_weights",
    "binarise_mask",
    "default_group",
    "discover",
    "discover_images",
    "load_image_only",
    "load_pair",
    "load_splits",
    "make_splits",
    "measure_loader",
    "normalise",
    "policy_for",
    "records_from_items",
    "resize_pair",
    "save_splits",
    "select",
]
