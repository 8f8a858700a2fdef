"""What the appearance head says about given image files, as stored and with the channels in BGR
order: the channel-order probabilities (RGB ... BGR), the predicted hue rotation, the two most
likely modalities after the correction, and the correction applied.

    python benchmarks/appearance_head_probe.py [--checkpoint FILE] [--wide-field] IMAGE [IMAGE ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def probe(seg: Any, image: np.ndarray) -> dict[str, Any]:
    """The head's raw answers for ``image`` and the Segmenter's decision and correction."""
    import torch

    from napari_delightsam.data.appearance import CHANNEL_ORDERS

    head = seg.model.modality_head
    with torch.inference_mode():
        x = seg.prepare(image).tensor.contiguous(memory_format=seg.memory_format)
        out = head(seg.model.encoder.forward_conv(x))
        _, _, _, mats = seg.model.stage0(x)
    order_p = torch.softmax(out.order_logits.float()[0], 0).tolist()
    decision = seg.decide_modality([image])
    matrix = None if mats is None else mats[0].float().cpu().numpy()
    return {
        "order_p": {"".join("RGB"[i] for i in order): round(p, 4) for order, p in zip(CHANNEL_ORDERS, order_p, strict=True)},
        "hue_degrees": round(float(out.hue_degrees[0]), 2),
        "modality": decision.modality, "confidence": round(decision.confidence, 4),
        "runner_up": decision.runner_up, "asks": decision.asks,
        "colour_changed": matrix is not None and not np.allclose(matrix, np.eye(3), atol=1e-3),
    }


#: the ``--wide-field`` view: the central 72 % of the rows on a 1.5x wider black canvas (IDRiD's frame)
WIDE_FIELD_KEEP, WIDE_FIELD_ASPECT = 0.72, 1.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--checkpoint", default=None, help="model file (default: the bundled model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--wide-field", action="store_true",
                   help="also a wide-field camera's layout of each image: its central 72 %% of rows on a 1.5x wider black canvas")
    args = p.parse_args(argv)

    from napari_delightsam.data.appearance import wide_field_layout
    from napari_delightsam.image_files import read_image
    from napari_delightsam.inference import load_model, set_threads
    from napari_delightsam.model.appearance_head import AppearanceHead

    set_threads(args.threads)
    seg = load_model(args.checkpoint, device="cpu")
    if not isinstance(seg.model.modality_head, AppearanceHead):
        p.error("this model has no appearance head")
    rows = []
    for path in args.images:
        image = read_image(path)
        image = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
        views = [("as stored", image), ("BGR", np.ascontiguousarray(image[..., ::-1]))]
        if args.wide_field:
            views.append(("wide field", wide_field_layout(image, keep=WIDE_FIELD_KEEP, aspect=WIDE_FIELD_ASPECT)))
        for view, img in views:
            row = {"image": path.name, "view": view, **probe(seg, img)}
            rows.append(row)
            top = max(row["order_p"], key=row["order_p"].get)
            print(f"{path.name} [{view}] order {top} p={row['order_p'][top]:.2f} (BGR {row['order_p']['BGR']:.2f}), "
                  f"hue {row['hue_degrees']:+.1f}°, {row['modality']} p={row['confidence']:.2f} "
                  f"(runner-up {row['runner_up']}{', asks' if row['asks'] else ''})"
                  f"{', colours changed' if row['colour_changed'] else ''}")
    if args.json is not None:
        command = " ".join(["python", "benchmarks/appearance_head_probe.py", *(argv if argv is not None else sys.argv[1:])])
        args.json.write_text(json.dumps({"command": command, "checkpoint": args.checkpoint or "bundled", "rows": rows},
                                        indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
