"""``benchmarks/auto_accuracy.py`` on a tiny model with a trained-flagged appearance head and
synthetic images: one decision per image and applicable view, the summary's arithmetic, the
decision equal to the Segmenter's own, and BGR put back exactly when the head's matrix says so."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, load_script, tiny_appearance_setup) -> dict[str, object]:
    data, splits, ckpt = (tiny_appearance_setup[k] for k in ("data", "splits", "ckpt"))
    bench = load_script("benchmarks/auto_accuracy.py")
    root = tmp_path_factory.mktemp("auto_accuracy")
    out = root / "out" / "auto.json"
    rc = bench.main(["--data", str(data), "--splits", str(splits), "--split", "test", "--checkpoint", str(ckpt),
                     "--views", "as stored", "BGR channel order", "greyscale", "--out", str(out), "--threads", "1"])
    assert rc == 0
    return {"bench": bench, "out": out, "data": data, "splits": splits, "ckpt": ckpt}


def test_one_decision_per_image_and_applicable_view(run):
    data = json.loads(run["out"].read_text())
    rows = data["rows"]
    ids = {(r["key"], r["id"]) for r in rows}
    assert len(ids) >= 2
    for key, sid in ids:
        views = {r["view"] for r in rows if (r["key"], r["id"]) == (key, sid)}
        colour = key.startswith("dermoscopy")
        assert views == {"as stored", "BGR channel order"} | ({"greyscale"} if colour else set())
    for r in rows:
        assert 0.0 <= r["confidence"] <= 1.0 and isinstance(r["asks"], bool)
        assert r["asks"] == (r["confidence"] < data["threshold"])
    assert run["out"].with_suffix(".md").is_file()


def test_summary_arithmetic(run):
    data = json.loads(run["out"].read_text())
    rows, summary = data["rows"], data["summary"]["test"]
    for view, e in summary.items():
        cells = [r for r in rows if r["view"] == view]
        assert e["n_images"] == len(cells)
        assert e["right"] == pytest.approx(np.mean([r["modality_picked"] == r["modality"] for r in cells]))
        assert e["asks"] == pytest.approx(np.mean([r["asks"] for r in cells]))
        assert e["colour_changed"] == pytest.approx(np.mean([r["colour_changed"] for r in cells]))
    for r in rows:
        assert not (r["bgr_fixed"] and not r["colour_changed"])  # putting BGR back is a change
    assert summary["BGR channel order"]["bgr_put_back"] == pytest.approx(
        np.mean([r["bgr_fixed"] for r in rows if r["view"] == "BGR channel order"]))
    assert "greyscale" in summary and "| right % by dataset |" in run["out"].with_suffix(".md").read_text()


def test_the_decision_is_the_segmenters(run):
    from napari_delightsam.inference import load_model

    seg = load_model(run["ckpt"], device="cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
    row = run["bench"].decide(seg, image)
    result = seg.segment(image, modality="auto")
    assert row["modality_picked"] == result.modality
    assert row["confidence"] == pytest.approx(seg.auto_decision(result).confidence, abs=1e-4)
    assert run["bench"]._is_reorder_to_rgb(np.eye(3)[::-1]) and not run["bench"]._is_reorder_to_rgb(np.eye(3))


def test_refuses_unknown_views_and_an_existing_out(run):
    with pytest.raises(SystemExit):
        run["bench"].main(["--data", str(run["data"]), "--splits", str(run["splits"]), "--views", "sepia",
                           "--out", str(run["out"].parent / "x.json")])
    with pytest.raises(SystemExit):
        run["bench"].main(["--data", str(run["data"]), "--splits", str(run["splits"]), "--out", str(run["out"])])
