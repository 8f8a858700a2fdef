"""Frozen-encoder embeddings, computed once, for training the heads fast.

While the DC-Encoder is frozen, every training step would recompute the same image embedding.
Computing it once per (image, augmented view) and training the SP-Generator, QM-Decoder and
modality head on the stored tensors trains these parts about 25× more per CPU-hour than
end-to-end steps (the embedding is ~90 % of a forward pass and all of the backward pass's
encoder part).

``compute_embeddings`` runs the encoder (modality controller of each sample on, as the full
model runs it) over ``views`` augmented copies of every record — view 0 is the image itself,
views 1.. use the training augmentation (geometry, intensity, appearance) with seeded draws —
and keeps, per view:

    embedding   (C, g, g) float16     h, the encoder output (g = S/16)
    mask        (1, m, m) uint8       the augmented mask, area-resized to the decoder's m = S/4
                                      (S/2 with ``mask_stride = 2``),
                                      0..255 (a soft target at object edges)
    head_input  (2·C0,) float32       mean and std of the stage-0 features (the modality head's
                                      pooled input)
    modality    () long

and, with ``keep_skip=True``, what a decoder with skip connections reads besides h:

    stage0      (C0, 2g, 2g) float16  the stage-0 features (stride 8)
    image       (3, S, S) uint8       the (augmented) image itself

``EmbeddingDataset`` serves them with a random dihedral flip of embedding and mask together (the
flips each modality's augmentation policy allows), and ``heads_loss`` is the paper's loss on the
heads' outputs. A set is saved as one safetensors file (no pickle) whose metadata names the
encoder weights (SHA-256), the image size and the records, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...data import SampleRecord, SegmentationDataset, normalise
from ...data.augment import policy_for
from ...model import DeLightSAM
from ...model.losses import LossTerms, dice_loss, focal_loss, patch_targets

__all__ = [
    "EmbeddingDataset",
    "EmbeddingSet",
    "cached_mask_size",
    "compute_embeddings",
    "encoder_fingerprint",
    "heads_loss",
    "heads_forward",
    "load_embeddings",
    "save_embeddings",
]

FORMAT = "napari-delightsam-embeddings-v1"


@dataclass
class EmbeddingSet:
    """Stored encoder outputs of ``len(self)`` (record, view) pairs; see the module docstring."""

    embedding: torch.Tensor  # (N, C, g, g) float16
    mask: torch.Tensor  # (N, 1, m, m) uint8 0..255
    head_input: torch.Tensor  # (N, 2*C0) float32
    modality: torch.Tensor  # (N,) long
    record: torch.Tensor  # (N,) long: index into ``keys``
    view: torch.Tensor  # (N,) long: 0 = the image itself
    keys: list[str]  # "<modality>/<dataset>/<sample id>" per record
    modalities: tuple[str, ...]
    meta: dict[str, str]
    stage0: torch.Tensor | None = None  # (N, C0, 2g, 2g) float16
    image: torch.Tensor | None = None  # (N, 3, S, S) uint8

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    def subset(self, rows: Sequence[int] | torch.Tensor) -> EmbeddingSet:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return EmbeddingSet(
            self.embedding[idx],
            self.mask[idx],
            self.head_input[idx],
            self.modality[idx],
            self.record[idx],
            self.view[idx],
            self.keys,
            self.modalities,
            dict(self.meta),
            self.stage0[idx] if self.stage0 is not None else None,
            self.image[idx] if self.image is not None else None,
        )

    def dataset_keys(self) -> list[str]:
        """``<modality>/<dataset>`` of every row (for balanced sampling)."""
        return ["/".join(self.keys[int(r)].split("/")[:2]) for r in self.record]


def encoder_fingerprint(model: DeLightSAM) -> str:
    """SHA-256 of the encoder's and modality head's tensors (what the cache depends on)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(("encoder.", "modality_head.")):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def _record_key(r: SampleRecord) -> str:
    return f"{r.key}/{r.sample_id}"


@torch.no_grad()
def compute_embeddings(
    model: DeLightSAM,
    records: Sequence[SampleRecord],
    *,
    views: int | Sequence[int] = 1,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    keep_skip: bool = False,
    keep_stage0: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EmbeddingSet:
    """Encoder outputs of ``views`` copies of each record at the model's ``img_size``.

    ``views``: a count (views 0..n-1) or the view numbers to compute (e.g. ``[2]`` adds a third
    view to a set computed with ``views=2``). The model is used as it is (eval mode, no
    gradients); its own modality controller is applied per sample. View v of record i uses
    augmentation seed ``hash(seed, i, v)``. ``keep_skip`` keeps the (augmented) image and, unless
    ``keep_stage0=False``, the stage-0 features (1 MiB per view at 512²: the larger part).
    """
    view_ids = list(range(views)) if isinstance(views, int) else [int(v) for v in views]
    if not view_ids or min(view_ids) < 0 or len(set(view_ids)) != len(view_ids):
        raise ValueError(f"views must be >= 1 or distinct view numbers >= 0, got {views!r}")
    keep_stage0 = keep_skip if keep_stage0 is None else (keep_stage0 and keep_skip)
    device = torch.device(device)
    cfg = model.config
    size = cfg.img_size
    mask_size = cfg.mask_size
    ds = SegmentationDataset(records, size, cfg.modalities, augment=True)
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    items = [(i, v) for i in range(len(ds)) for v in view_ids]
    emb, masks, head_in, mods, recs, vws, stage0, images = [], [], [], [], [], [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        samples = [ds[i] if v == 0 else ds[(i, _view_seed(seed, i, v))] for i, v in chunk]
        raw = torch.stack([s["image"] for s in samples])
        if keep_skip:
            images.append(raw.clone())
        x = normalise(raw.to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        modality = torch.stack([s["modality"] for s in samples]).to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx:
            feats = model.encoder.forward_conv(x)
            h = model.encoder.forward_vit(feats, modality)
        flat = feats.float().flatten(2)
        head_in.append(torch.cat([flat.mean(-1), flat.std(-1)], dim=1).cpu())
        emb.append(h.to(torch.float16).cpu())
        if keep_stage0:
            stage0.append(feats.to(torch.float16).cpu().contiguous())
        m = torch.stack([s["mask"] for s in samples]).float()
        masks.append((F.interpolate(m, size=(mask_size, mask_size), mode="area") * 255).round().to(torch.uint8))
        mods.append(modality.cpu())
        recs.append(torch.tensor([i for i, _ in chunk]))
        vws.append(torch.tensor([v for _, v in chunk]))
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    return EmbeddingSet(
        torch.cat(emb),
        torch.cat(masks),
        torch.cat(head_in),
        torch.cat(mods),
        torch.cat(recs),
        torch.cat(vws),
        [_record_key(r) for r in ds.records],
        tuple(cfg.modalities),
        {
            "format": FORMAT,
            "encoder_sha256": encoder_fingerprint(model),
            "img_size": str(size),
            "mask_size": str(mask_size),
            "views": json.dumps(view_ids),
            "seed": str(seed),
            "autocast": str(autocast_dtype),
            "skipped": json.dumps(ds.skipped),
        },
        torch.cat(stage0) if keep_stage0 else None,
        torch.cat(images) if keep_skip else None,
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _view_seed(seed: int, index: int, view: int) -> int:
    return int(np.random.SeedSequence([seed, index, view]).generate_state(1)[0])


def save_embeddings(path: str | Path, data: EmbeddingSet) -> Path:
    """Write ``data`` as one safetensors file (atomically)."""
    from safetensors.torch import save_file

    from ...atomic_files import atomic_write

    tensors = {
        "embedding": data.embedding.contiguous(),
        "mask": data.mask.contiguous(),
        "head_input": data.head_input.contiguous(),
        "modality": data.modality.contiguous(),
        "record": data.record.contiguous(),
        "view": data.view.contiguous(),
    }
    if data.stage0 is not None:
        tensors["stage0"] = data.stage0.contiguous()
    if data.image is not None:
        tensors["image"] = data.image.contiguous()
    meta = {**data.meta, "keys": json.dumps(data.keys), "modalities": json.dumps(list(data.modalities))}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_embeddings(path: str | Path) -> EmbeddingSet:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = dict(fh.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{Path(path).name} is not an embedding cache ({meta.get('format')!r})")
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    keys = json.loads(meta.pop("keys"))
    modalities = tuple(json.loads(meta.pop("modalities")))
    return EmbeddingSet(
        t["embedding"],
        t["mask"],
        t["head_input"],
        t["modality"],
        t["record"],
        t["view"],
        keys,
        modalities,
        meta,
        t.get("stage0"),
        t.get("image"),
    )


class EmbeddingDataset(Dataset):
    """Rows of an ``EmbeddingSet`` as training samples, indexed like ``SegmentationDataset``
    (``(row, seed)`` from ``BalancedSampler``, or a plain row).

    Returns ``embedding`` (C,g,g) float32, ``mask`` (1,m,m) float32 in [0,1], ``head_input``,
    ``modality``; with ``flips`` and a seed, a random flip/rotation that the modality's
    augmentation policy allows moves embedding and mask together.
    """

    def __init__(self, data: EmbeddingSet, flips: bool = True) -> None:
        self.data = data
        self.flips = flips
        self.records = [_RowRecord(k) for k in data.dataset_keys()]  # for BalancedSampler

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        row, seed = (item, None) if isinstance(item, (int, np.integer)) else item
        row = int(row)
        d = self.data
        out = {
            "embedding": d.embedding[row].float(),
            "mask": d.mask[row].float() / 255.0,
        }
        if d.stage0 is not None:
            out["stage0"] = d.stage0[row].float()
        if d.image is not None:
            out["image"] = d.image[row]
        modality = d.modality[row]
        if self.flips and seed is not None:
            policy = policy_for(d.modalities[int(modality)])
            rng = np.random.default_rng(int(seed))
            hflip, vflip, k = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(0, 4))
            dims: list[int] = []
            if policy.hflip and hflip:
                dims.append(-1)
            if policy.vflip and vflip:
                dims.append(-2)
            for name, t in out.items():
                if dims:
                    t = t.flip(dims)
                if policy.rot90 and k:
                    t = torch.rot90(t, k, (-2, -1))
                out[name] = t
        out = {name: t.contiguous() for name, t in out.items()}
        out["head_input"] = d.head_input[row]
        out["modality"] = modality
        return out


@dataclass(frozen=True)
class _RowRecord:
    """What ``BalancedSampler`` reads from a record: its modality and dataset key."""

    key: str

    @property
    def modality(self) -> str:
        return self.key.split("/")[0]


def heads_forward(model: DeLightSAM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SP-Generator + QM-Decoder on a batch of stored embeddings (B,C,g,g) -> (mask logits
    (B,1,m,m), patch logits); the decoder's detail skips and fine stage read the stored stage-0
    features and image when the model has them."""
    embedding = batch["embedding"]
    patch_logits, dense = model.prompt_generator(embedding)
    skips = {}
    if "stage0" in model.config.decoder_skips:
        skips["stage0"] = batch["stage0"]
    if model.decoder.needs_image:
        skips["image"] = normalise(batch["image"])
    return model.decoder(embedding + dense, batch["modality"], **skips), patch_logits


def heads_loss(
    model: DeLightSAM,
    batch: dict[str, torch.Tensor],
    *,
    patch_weight: float = 0.7,
    modality_weight: float = 0.1,
    train_modality_head: bool = True,
) -> LossTerms:
    """The paper's loss on the heads' outputs for a batch of stored embeddings: focal + Dice
    against the soft (area-resized) mask at the decoder's resolution — a thin vessel keeps its
    partial coverage instead of vanishing at a 0.5 threshold — and λ·BCE against the patch map
    of any foreground; plus the modality cross-entropy on the stored head input."""
    modality = batch["modality"]
    target = batch["mask"]
    mask_logits, patch_logits = heads_forward(model, batch)
    focal = focal_loss(mask_logits, target)
    dice = dice_loss(mask_logits, target)
    patch = F.binary_cross_entropy_with_logits(
        patch_logits.float(), patch_targets((target > 0).float(), patch_logits.shape[-1])
    )
    total = focal + dice + patch_weight * patch
    mod = torch.zeros((), device=total.device)
    if train_modality_head and model.modality_head is not None:
        mod = F.cross_entropy(model.modality_head.mlp(batch["head_input"]).float(), modality)
        total = total + modality_weight * mod
    return LossTerms(total, focal, dice, patch, mod)


def cache_file_name(split: str, dataset_key: str, views: Sequence[int]) -> str:
    """``<split>__<modality>__<dataset>__v<views>.safetensors`` (one file per dataset and split)."""
    tag = "-".join(str(v) for v in views)
    return f"{split}__{dataset_key.replace('/', '__')}__v{tag}.safetensors"


def build_cache_folder(
    model: DeLightSAM,
    records: Sequence[SampleRecord],
    folder: str | Path,
    split: str,
    *,
    views: Sequence[int] = (0,),
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    keep_skip: bool = False,
    keep_stage0: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Path]:
    """Embedding sets of ``records`` (one ``split``), one file per dataset in ``folder``.

    Resumable: a file that exists and was made from the same encoder weights is kept (computing
    a cache is the expensive part: one encoder pass per view). Returns the files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = encoder_fingerprint(model)
    by_key: dict[str, list[SampleRecord]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(r)
    out: list[Path] = []
    for key in sorted(by_key):
        path = folder / cache_file_name(split, key, views)
        if path.exists() and _cached_fingerprint(path) == (fingerprint, str(model.config.mask_size)):
            out.append(path)
            continue
        data = compute_embeddings(
            model,
            by_key[key],
            views=list(views),
            seed=seed,
            batch_size=batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            keep_skip=keep_skip,
            keep_stage0=keep_stage0,
            progress=(lambda done, total, k=key: progress(k, done, total)) if progress else None,
        )
        data.meta["split"] = split
        out.append(save_embeddings(path, data))
    return out


def cached_mask_size(meta: dict[str, str]) -> int:
    """Side of the masks a cache holds, from its metadata (caches made before ``mask_size`` was
    stored hold them at S/4)."""
    return int(meta.get("mask_size", int(meta.get("img_size", 0)) // 4))


def _cached_fingerprint(path: Path) -> tuple[str | None, str] | None:
    """(encoder SHA-256, mask size) a cache file was made with (None if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            return meta.get("encoder_sha256"), str(cached_mask_size(meta))
    except Exception:  # noqa: BLE001 - an unreadable (e.g. truncated) file is recomputed
        return None


def concatenate(sets: Sequence[EmbeddingSet]) -> EmbeddingSet:
    """One set of several (e.g. the per-dataset files of a split); record indices are renumbered."""
    if not sets:
        raise ValueError("no embedding sets to concatenate")
    keys: list[str] = []
    records = []
    for s in sets:
        if s.modalities != sets[0].modalities:
            raise ValueError("embedding sets of different modality lists cannot be joined")
        records.append(s.record + len(keys))
        keys.extend(s.keys)

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(s, name) for s in sets]
        if any(p is None for p in parts):
            return None
        return torch.cat(parts)

    return EmbeddingSet(
        torch.cat([s.embedding for s in sets]),
        torch.cat([s.mask for s in sets]),
        torch.cat([s.head_input for s in sets]),
        torch.cat([s.modality for s in sets]),
        torch.cat(records),
        torch.cat([s.view for s in sets]),
        keys,
        sets[0].modalities,
        dict(sets[0].meta),
        cat("stage0"),
        cat("image"),
    )
