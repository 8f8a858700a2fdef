"""Ablation R: one modality's ``MaskRefiner`` trained alone on its recorded inputs, from any checkpoint.

    python benchmarks/refiner_feature_cache.py --data ../shared/data \\
        --splits benchmarks/protocol/splits-unseen-v1.json --modality fundus --out runs/refiner-r \\
        [--checkpoint FILE] [--width 16] [--levels 3] [--steps 1200] [--eval-every 150] [--lr 3e-3]

The recipe's ``"refiner"`` stage (``training.stages.refiner_stage.train_refiner``: the decoder fixed, its
inputs to the refiner recorded once, BCE + soft Dice at the input size, rot90 / flip and colour
jitter, AdamW one-cycle) outside a recipe: on ``--checkpoint`` (default: the bundled model; R1 /
R2 of the model card used v1.2, ``git show 8d374c8:weights/delightsam_default.safetensors``),
with a refiner for ``--modality`` added (``--width`` / ``--levels``) or, where the checkpoint has
one, started afresh. ``--steps`` in epochs of ``--eval-every`` steps; after each it prints one JSON
line: the Dice of the val and unseen images at their original size, per dataset (as
``delightsam evaluate``). ``--out`` is the stage's run folder (``best.safetensors`` by the mean of
val and unseen); an existing one is continued.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from napari_delightsam.checkpoint import bundled_checkpoint_path, read_checkpoint_info
    from napari_delightsam.inference import set_threads
    from napari_delightsam.training import TrainConfig
    from napari_delightsam.training.stages.refiner_stage import train_refiner
    from napari_delightsam.training.stages.trainer import LAST

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--modality", default="fundus")
    p.add_argument("--out", type=Path, required=True, help="the stage's run folder")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled model")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.steps % a.eval_every:
        p.error(f"--steps ({a.steps}) must be a multiple of --eval-every ({a.eval_every})")
    checkpoint = a.checkpoint or bundled_checkpoint_path()
    if checkpoint is None:
        p.error("no bundled model is installed: pass --checkpoint")
    set_threads(a.threads)
    stored, _ = read_checkpoint_info(checkpoint)
    refined = sorted({*stored.refiner_modalities, a.modality})
    cfg = TrainConfig(
        init=str(checkpoint),
        img_size=stored.img_size,
        model={"mask_stride": 2, "refiner_modalities": refined, "refiner_width": a.width, "refiner_levels": a.levels},
        modalities=(a.modality,),
        epochs=a.steps // a.eval_every,
        steps_per_epoch=a.eval_every,
        batch_size=a.batch,
        lr=a.lr,
        weight_decay=1e-4,
        balanced=False,
        seed=a.seed,
        splits_file=str(a.splits),
        select_on="val+unseen",
        device="cpu",
        num_workers=0,
        log_every=0,
    )
    result = train_refiner(cfg, a.out, data_root=a.data, resume=(a.out / LAST).is_file(), show_progress=False)
    keep = ("val_dice", "val_dice_per_dataset", "unseen_dice", "unseen_dice_per_dataset", "select_dice")
    for row in result.history:
        if row.get("type") in ("initial", "epoch"):
            step = (row["epoch"] + 1) * a.eval_every
            print(json.dumps({"step": step, **{k: row.get(k) for k in keep}}), flush=True)
    print(json.dumps({"best_epoch": result.best_epoch, "best_select_dice": result.best_val_dice,
                      "best": str(result.best_checkpoint)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
