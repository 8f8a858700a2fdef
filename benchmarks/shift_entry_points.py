"""Where does an appearance shift break the network? Dice with the shift fed to each part alone.

The network sees the image in three places: the encoder (stem, stage 0, the ViT stages and their
controllers), the decoder's stride-2 stage (its image skip) and, for fundus and microscopy, the
modality's refiner (a small U-Net over the image). For each image of a split this feeds the
shifted image (channels in BGR order, greyscale, or JPEG quality 25) to

* ``none``: no part (the image as stored), ``all``: every part (what a user gets);
* ``encoder``: the encoder only (the decoder's branches see the image as stored);
* ``decoder``: the decoder's image branches only (stride-2 stage and refiner);
* ``stride2`` / ``refiner``: one of those two only,

with the modality given, at the network's input size (512² resized, the training pipeline's
resize), and reports the mean Dice of each. For the colour shifts (BGR, greyscale) colour images
only (a grey image has no channel order and no colour to lose). The appearance head's colour correction is not applied: this measures the
segmentation network. A part that alone loses most of ``all``'s drop is where training under the
shift pays.

    python benchmarks/shift_entry_points.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --split val --modality microscopy \\
        --shift bgr --checkpoint MODEL --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

PARTS = ("none", "all", "encoder", "decoder", "stride2", "refiner")
SHIFT_NAMES = ("bgr", "grey", "jpeg", "gamma1.6", "gamma0.6")
#: shifts that change nothing on a grey image (those images are left out for them)
COLOUR_SHIFTS = ("bgr", "grey")


def shifted(images: Any, shift: str) -> Any:
    """(B,3,S,S) float [0,255] -> the same images with ``shift`` applied ("bgr", "grey", "jpeg":
    quality 25, "gamma1.6" / "gamma0.6")."""
    if shift == "bgr":
        return images[:, [2, 1, 0]]
    if shift == "grey":
        y = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).round()
        return y[:, None].repeat(1, 3, 1, 1)
    if shift.startswith("gamma"):
        return 255.0 * (images / 255.0) ** float(shift[len("gamma"):])
    if shift == "jpeg":  # JPEG quality 25 at the network's input size
        import torch

        from napari_delightsam.data.augment import _jpeg

        arrays = images.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
        out = [torch.from_numpy(_jpeg(np.ascontiguousarray(a), 25)) for a in arrays]
        return torch.stack(out).permute(0, 3, 1, 2).to(images.dtype)
    raise ValueError(f"shift must be one of {', '.join(SHIFT_NAMES)}, got {shift!r}")


def logits_with_shift_in(model: Any, stored: Any, shift_img: Any, modality: int, part: str) -> Any:
    """Mask logits (B,1,h,w) with ``shift_img`` (normalised) fed to ``part`` and ``stored`` elsewhere."""
    import torch

    mod = torch.full((stored.shape[0],), modality, dtype=torch.long)
    enc = shift_img if part in ("all", "encoder") else stored
    fine = shift_img if part in ("all", "decoder", "stride2") else stored
    ref_img = shift_img if part in ("all", "decoder", "refiner") else stored
    refiner = None
    index = getattr(model.decoder, "_refiner_index", {})
    if modality in index:
        refiner = model.decoder.refiners[index[modality]]
    original = refiner.forward if refiner is not None else None
    try:
        if refiner is not None:  # an instance attribute over the class's method, removed after
            refiner.forward = lambda image, up, logits: original(ref_img, up, logits)
        feats = model.encoder.forward_conv(enc)
        h = model.encoder.forward_vit(feats, mod)
        _, dense = model.prompt_generator(h)
        return model.decoder(h + dense, mod, stage0=feats, image=fine)
    finally:
        if refiner is not None:
            del refiner.forward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--modality", required=True)
    p.add_argument("--shift", choices=SHIFT_NAMES, default="bgr")
    p.add_argument("--max-per-dataset", type=int, default=30)
    p.add_argument("--checkpoint", default=None, help="default: the bundled model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write per-image and mean Dice here")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from appearance_shift import choose_records

    from napari_delightsam.checkpoint import bundled_checkpoint_path, load_checkpoint
    from napari_delightsam.data import normalise
    from napari_delightsam.data.loader import _load_resized

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or str(bundled_checkpoint_path())
    model = load_checkpoint(checkpoint).eval()
    if args.modality not in model.config.modalities:
        p.error(f"the model has no modality {args.modality!r}: {', '.join(model.config.modalities)}")
    modality = model.config.modalities.index(args.modality)
    size = model.config.img_size
    rows = []
    for rec in choose_records(args.data, args.splits, args.split, args.max_per_dataset, [args.modality]):
        image, mask = _load_resized(rec, size)
        if args.shift in COLOUR_SHIFTS and np.abs(image[..., 0].astype(np.int16) - image[..., 2]).mean() < 10:
            continue  # grey or nearly so: the shift changes little
        raw = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        stored, shift_img = normalise(raw), normalise(shifted(raw, args.shift))
        truth = torch.from_numpy(mask > 127)
        row: dict[str, Any] = {"key": f"{rec.dataset}/{rec.sample_id}"}
        with torch.inference_mode():
            for part in PARTS:
                lg = logits_with_shift_in(model, stored, shift_img, modality, part)
                pred = F.interpolate(lg.float(), size=(size, size), mode="bilinear")[0, 0] > 0
                denom = int(pred.sum()) + int(truth.sum())
                row[part] = 2.0 * int((pred & truth).sum()) / denom if denom else 1.0
        rows.append(row)
        print(row["key"], " ".join(f"{k} {row[k]:.2f}" for k in PARTS), flush=True)
    if not rows:
        p.error("no images of that modality in the split that the shift changes")
    means = {k: float(np.mean([r[k] for r in rows])) for k in PARTS}
    print(f"mean over {len(rows)} images, shift {args.shift}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in means.items()))
    if args.json:
        import hashlib

        from napari_delightsam.atomic_files import atomic_write

        result = {"checkpoint": args.checkpoint or "the bundled model",
                  "checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:12],
                  "split": args.split, "modality": args.modality, "shift": args.shift,
                  "n_images": len(rows), "mean_dice": means, "images": rows,
                  "command": " ".join(["python", "benchmarks/shift_entry_points.py", *(argv if argv is not None else sys.argv[1:])])}
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1), encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
