"""Training samples: where they come from (files or in-memory arrays) and how they are checked.

Folder layout (the layout of ``../shared/data``)::

    ROOT/<modality>/<dataset>/images/<id>.<png|jpg|jpeg|tif|tiff>
    ROOT/<modality>/<dataset>/masks/<id>.png        (0 = background, 255 = target)

``discover`` turns a root into ``SampleRecord`` objects (cheap: no pixels decoded);
``records_from_items`` wraps the ``(image, mask, modality)`` arrays the napari widget passes.
``load_pair`` decodes one record into an image (H,W,3 float32 in [0,255]) and a binary mask
(H,W bool); every problem raises ``BadSampleError`` naming the file, so a caller can skip the
sample with a warning instead of crashing deep inside a batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import MODALITIES

__all__ = [
    "IMAGE_SUFFIXES",
    "BadSampleError",
    "DataWarning",
    "SampleRecord",
    "binarise_mask",
    "discover",
    "discover_images",
    "load_image_only",
    "load_pair",
    "records_from_items",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: dataset name given to in-memory items (the napari widget's layers)
ITEMS_DATASET = "user"


class BadSampleError(ValueError):
    """One sample cannot be used (unreadable, size mismatch...). The message names the file."""


class DataWarning(UserWarning):
    """A sample was skipped or repaired (binarised mask, missing mask...)."""


@dataclass(frozen=True)
class SampleRecord:
    """One (image, mask) pair. Either ``image_path``/``mask_path`` or in-memory arrays are set.

    ``key`` is ``"<modality>/<dataset>"``; ``sample_id`` is unique within the dataset (the file
    stem, or ``item_0007`` for in-memory items).
    """

    modality: str
    dataset: str
    sample_id: str
    image_path: Path | None = None
    mask_path: Path | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.modality}/{self.dataset}"

    @property
    def name(self) -> str:
        """What to call this sample in a message: the image file, or the item id."""
        if self.image_path is not None:
            return str(self.image_path)
        return f"{self.key}/{self.sample_id}"


def _normalise_modality(name: str, modalities: Sequence[str]) -> str:
    from ..config import ModelConfig

    cfg = ModelConfig(modalities=tuple(modalities))
    return cfg.modalities[cfg.modality_index(name)]


def discover(
    root: str | Path,
    modalities: Iterable[str] | None = None,
    *,
    known_modalities: Sequence[str] = MODALITIES,
) -> list[SampleRecord]:
    """All (image, mask) pairs under ``root``, sorted by (modality, dataset, id).

    Modality folders that are not in ``known_modalities`` are skipped with a warning; images
    without a mask are skipped with a warning naming them. Raises ``FileNotFoundError`` for a
    missing root and ``ValueError`` when nothing usable is found (an empty folder) or when a
    requested modality has no data.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    wanted = None
    if modalities is not None:
        wanted = {_normalise_modality(m, known_modalities) for m in modalities}
    records: list[SampleRecord] = []
    for mod_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if mod_dir.name not in known_modalities:
            warnings.warn(
                f"{mod_dir}: not a modality folder (expected one of {', '.join(known_modalities)}); skipped",
                DataWarning,
                stacklevel=2,
            )
            continue
        if wanted is not None and mod_dir.name not in wanted:
            continue
        for ds_dir in sorted(p for p in mod_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            records.extend(_discover_dataset(ds_dir, mod_dir.name))
    if not records:
        what = f" for modalities {', '.join(sorted(wanted))}" if wanted else ""
        raise ValueError(
            f"no image/mask pairs found under {root}{what}; expected "
            "<modality>/<dataset>/images/<id>.png|jpg|tif and <modality>/<dataset>/masks/<id>.png"
        )
    if wanted is not None:
        missing = wanted - {r.modality for r in records}
        if missing:
            raise ValueError(f"no data under {root} for modality {', '.join(sorted(missing))}")
    return records


def _discover_dataset(ds_dir: Path, modality: str) -> list[SampleRecord]:
    img_dir, mask_dir = ds_dir / "images", ds_dir / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        warnings.warn(f"{ds_dir}: no images/ and masks/ folders; skipped", DataWarning, stacklevel=3)
        return []
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{img_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    out: list[SampleRecord] = []
    seen: set[str] = set()
    for img in images:
        if img.stem in seen:
            warnings.warn(
                f"{img}: another image has the same id {img.stem!r}; skipped", DataWarning, stacklevel=3
            )
            continue
        seen.add(img.stem)
        mask = masks.get(img.stem)
        if mask is None:
            warnings.warn(
                f"{img}: no mask {mask_dir / (img.stem + '.png')}; skipped", DataWarning, stacklevel=3
            )
            continue
        out.append(SampleRecord(modality, ds_dir.name, img.stem, image_path=img, mask_path=mask))
    if not out:
        raise ValueError(f"{ds_dir}: no image has a matching mask in {mask_dir}")
    return out


def discover_images(folder: str | Path, *, modality: str = "natural") -> list[SampleRecord]:
    """Every image under ``folder`` (recursive), as mask-less records (for distillation).

    ``sample_id`` is the path relative to ``folder``; ``dataset`` is the folder's name. Files
    inside a ``masks`` folder are left out (so a dataset root in the project layout works too).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in (*IMAGE_SUFFIXES, ".bmp")
        and "masks" not in p.relative_to(folder).parts[:-1]
    )
    if not paths:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}, .bmp)")
    return [SampleRecord(modality, folder.name, str(p.relative_to(folder)), image_path=p) for p in paths]


def load_image_only(record: SampleRecord) -> np.ndarray:
    """Decode a record's image to (H,W,3) float32 in [0,255]; ``BadSampleError`` names the file."""
    from ..preprocess import prepare_image

    if record.image is not None:
        raw = record.image
    else:
        from ..image_files import read_image

        assert record.image_path is not None
        try:
            raw = read_image(record.image_path)
        except Exception as exc:
            raise BadSampleError(_named(record.image_path, "unreadable image", exc)) from exc
    try:
        image, _ = prepare_image(raw, read_false_colour=False)  # training data as stored
    except Exception as exc:
        raise BadSampleError(f"{record.name}: cannot use image ({exc})") from exc
    return image


def records_from_items(
    items: Sequence[tuple[np.ndarray, np.ndarray, str]],
    *,
    dataset: str = ITEMS_DATASET,
    known_modalities: Sequence[str] = MODALITIES,
) -> list[SampleRecord]:
    """In-memory ``(image, mask, modality)`` tuples (napari layer data) as records.

    Masks are napari Labels: any non-zero value is foreground. Shapes are checked here so a
    wrong pair is refused with its position before training starts.
    """
    if len(items) == 0:
        raise ValueError("no training items given")
    records = []
    for i, item in enumerate(items):
        try:
            image, mask, modality = item
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"item {i}: expected (image, mask, modality), got {type(item).__name__}"
            ) from exc
        image = np.asarray(image)
        mask = np.asarray(mask)
        mod = _normalise_modality(modality, known_modalities)
        if mask.ndim != 2:
            raise ValueError(f"item {i}: mask must be 2D (H,W), got shape {mask.shape}")
        if image.shape[:2] != mask.shape and image.shape[-2:] != mask.shape:
            raise ValueError(f"item {i}: image shape {image.shape} does not match mask shape {mask.shape}")
        records.append(SampleRecord(mod, dataset, f"item_{i:04d}", image=image, mask=mask))
    return records


def binarise_mask(
    mask: np.ndarray, name: str, *, from_file: bool = True, notes: list[str] | None = None
) -> np.ndarray:
    """(H,W[,C]) -> (H,W) bool.

    Files follow the 0/255 convention: values {0,255} or {0,1} are taken as they are; any other
    values are binarised at >127 with a ``DataWarning`` naming the file. In-memory masks
    (napari Labels) use non-zero = foreground. With ``notes`` the warning text is appended
    there instead of being issued (for worker threads: ``warnings`` is not thread-safe).
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=-1)  # RGB(A) masks: any channel marks the target
    if mask.ndim != 2:
        raise BadSampleError(f"{name}: mask must be 2D, got shape {mask.shape}")
    if not from_file or mask.dtype == bool:
        return mask != 0
    values = np.unique(mask)
    if np.all(np.isin(values, (0, 255))):
        return mask == 255
    if np.all(np.isin(values, (0, 1))):
        return mask == 1
    message = f"{name}: mask is not binary ({len(values)} distinct values); binarised at > 127"
    if notes is not None:
        notes.append(message)
    else:
        warnings.warn(message, DataWarning, stacklevel=2)
    return mask > 127


def _named(path: Path, what: str, exc: Exception) -> str:
    text = str(exc)
    return f"{what}: {text}" if str(path) in text else f"{path}: {what} ({text})"


def load_pair(record: SampleRecord, notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one record: image (H,W,3) float32 in [0,255] and mask (H,W) bool of the same size.

    Raises ``BadSampleError`` naming the file for an unreadable image or mask and for a size
    mismatch; non-binary masks are binarised with a warning (see ``binarise_mask``).
    """
    from ..preprocess import prepare_image

    if record.image is not None:
        raw_image, raw_mask, from_file = record.image, record.mask, False
    else:
        from ..image_files import read_image

        assert record.image_path is not None and record.mask_path is not None
        try:
            raw_image = read_image(record.image_path)
        except Exception as exc:  # any decoder error: report the file, let the caller skip it
            raise BadSampleError(_named(record.image_path, "unreadable image", exc)) from exc
        try:
            raw_mask = read_image(record.mask_path)
        except Exception as exc:
            raise BadSampleError(_named(record.mask_path, "unreadable mask", exc)) from exc
        from_file = True
    try:
        image, _info = prepare_image(raw_image, read_false_colour=False)  # as stored: augmentation varies colour
    except Exception as exc:
        raise BadSampleError(f"{record.name}: cannot use image ({exc})") from exc
    mask = binarise_mask(raw_mask, str(record.mask_path or record.name), from_file=from_file, notes=notes)
    if mask.shape != image.shape[:2]:
        raise BadSampleError(
            f"{record.name}: mask size {mask.shape[1]}x{mask.shape[0]} does not match image size "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    return np.ascontiguousarray(image, dtype=np.float32), mask
