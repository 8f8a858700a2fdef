"""``benchmarks/appearance_shift.py`` end to end on a tiny model and synthetic images: rows per
image and shift, the summary's arithmetic, the report, --resummarise and --compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, load_script, tiny_appearance_setup) -> dict[str, object]:
    data, splits, ckpt = (tiny_appearance_setup[k] for k in ("data", "splits", "ckpt"))
    bench = load_script("benchmarks/appearance_shift.py")
    root = tmp_path_factory.mktemp("appearance_shift")
    out = root / "out"
    rc = bench.main(["--data", str(data), "--splits", str(splits), "--split", "test", "--max-per-dataset", "2",
                     "--shifts", "BGR channel order", "half resolution", "greyscale", "--checkpoint", str(ckpt),
                     "--out", str(out), "--threads", "1", "--quiet"])
    assert rc == 0
    return {"bench": bench, "out": out, "data": data, "splits": splits, "ckpt": ckpt}


def test_rows_cover_each_image_and_applicable_shift(run):
    data = json.loads((run["out"] / "appearance-shift.json").read_text())
    rows = data["rows"]
    keys = {r["key"] for r in rows}
    assert len(keys) >= 2
    for key in keys:
        shifts = {r["shift"] for r in rows if r["key"] == key}
        modality = next(r["modality"] for r in rows if r["key"] == key)
        want = {"as stored", "BGR channel order", "half resolution"} | ({"greyscale"} if modality == "dermoscopy" else set())
        assert shifts == want
    for r in rows:
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["auto_dice"] <= 1.0
        assert 0.0 <= r["auto_confidence"] <= 1.0 and isinstance(r["auto_asks"], bool)


def test_summary_is_the_mean_over_modalities_of_per_modality_means(run):
    data = json.loads((run["out"] / "appearance-shift.json").read_text())
    rows, summary = data["rows"], data["summary"]["test"]
    for shift, entry in summary["shifts"].items():
        per = {}
        for m in entry["modalities"]:
            per[m] = np.mean([r["dice"] for r in rows if r["shift"] == shift and r["modality"] == m])
        assert entry["mean_dice"] == pytest.approx(np.mean(list(per.values())))
        base = np.mean([np.mean([r["dice"] for r in rows if r["shift"] == "as stored" and r["modality"] == m])
                        for m in entry["modalities"]])
        assert entry["drop"] == pytest.approx(entry["mean_dice"] - base)
        right = [r["auto_modality"] == r["modality"] for r in rows if r["shift"] == shift and r["modality"] in per]
        assert entry["auto_right"] == pytest.approx(np.mean(right))
    assert summary["shifts"]["greyscale"]["modalities"] == ["dermoscopy"]  # colour modalities only
    report = (run["out"] / "appearance-shift.md").read_text()
    assert "| greyscale |" in report and "Command: `python benchmarks/appearance_shift.py" in report


def test_resummarise_and_compare(run, capsys, tmp_path):
    import shutil

    bench, out = run["bench"], run["out"]
    before = (out / "appearance-shift.md").read_text()
    assert bench.main(["--resummarise", str(out / "appearance-shift.json")]) == 0
    assert (out / "appearance-shift.md").read_text() == before
    renamed = tmp_path / "appearance-shift-v9.json"  # a renamed results file is rewritten in place
    shutil.copy(out / "appearance-shift.json", renamed)
    assert bench.main(["--resummarise", str(renamed)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appearance-shift-v9.json", "appearance-shift-v9.md"]
    assert renamed.with_suffix(".md").read_text() == before
    capsys.readouterr()
    assert bench.main(["--compare", f"a={out / 'appearance-shift.json'}", f"b={out / 'appearance-shift.json'}"]) == 0
    table = capsys.readouterr().out
    assert "### test" in table and table.count("| BGR channel order |") == 1 and "a: Dice" in table


def test_refuses_a_used_out_folder(run):
    with pytest.raises(SystemExit):
        run["bench"].main(["--data", str(run["data"]), "--splits", str(run["splits"]), "--out", str(run["out"])])
    assert Path(run["out"] / "appearance-shift.json").is_file()


def test_a_shift_scoped_to_a_modality_is_left_out_elsewhere_even_in_older_results(run):
    """The H&E stain jitter means something on stained tissue only: it is not run on other
    modalities, and rows of it on other modalities (results written before) are not summarised."""
    from napari_delightsam.data.appearance import SHIFTS

    stain = SHIFTS["H&E stain jitter"]
    assert stain.applies_to("microscopy") and not stain.applies_to("fundus") and not stain.applies_to("xray")
    assert SHIFTS["greyscale"].applies_to("dermoscopy") and not SHIFTS["greyscale"].applies_to("xray")
    data = json.loads((run["out"] / "appearance-shift.json").read_text())
    derm = [r for r in data["rows"] if r["shift"] == "BGR channel order" and r["modality"] == "dermoscopy"]
    older = data["rows"] + [{**r, "shift": "H&E stain jitter", "dice": 0.0} for r in derm]
    summary = run["bench"].summarise(older)["test"]
    assert "H&E stain jitter" not in summary["shifts"]
    assert summary["mean_drop_over_shifts"] == pytest.approx(data["summary"]["test"]["mean_drop_over_shifts"])


def test_modalities_keeps_only_the_named_ones(run, tmp_path):
    data = json.loads((run["out"] / "appearance-shift.json").read_text())
    every = {r["modality"] for r in data["rows"]}
    assert len(every) >= 2
    keep = sorted(every)[0]
    out = tmp_path / "one"
    assert run["bench"].main(["--data", str(run["data"]), "--splits", str(run["splits"]), "--split", "test",
                              "--max-per-dataset", "2", "--shifts", "BGR channel order", "--modalities", keep,
                              "--checkpoint", str(run["ckpt"]), "--out", str(out), "--threads", "1", "--quiet"]) == 0
    rows = json.loads((out / "appearance-shift.json").read_text())["rows"]
    assert rows and {r["modality"] for r in rows} == {keep}
    assert {r["key"] for r in rows} == {r["key"] for r in data["rows"] if r["modality"] == keep}


def test_shift_label_bound_is_near_one_for_blobs_and_low_for_thin_lines(load_script, tiny_appearance_setup, tmp_path):
    bound = load_script("benchmarks/shift_label_bound.py")
    from napari_delightsam.data.appearance import SHIFTS

    blob = np.zeros((120, 160), bool)
    blob[30:90, 40:120] = True
    lines = np.zeros((120, 160), bool)
    lines[:, ::7] = True  # 1-pixel vessels: the resampled labels keep about half, a smooth resize none
    image = np.zeros((120, 160, 3), np.uint8)
    half = SHIFTS["half resolution"]
    assert bound.perfect_dice(blob, half.apply(image, blob, 0)[1]) > 0.97
    assert bound.perfect_dice(lines, half.apply(image, lines, 0)[1]) < 0.5
    data, splits = tiny_appearance_setup["data"], tiny_appearance_setup["splits"]
    out = tmp_path / "bound.json"
    assert bound.main(["--data", str(data), "--splits", str(splits), "--split", "test", "--max-per-dataset", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["shift"] for r in result["rows"]} == set(bound.RESAMPLING_SHIFTS)
    assert all(0.0 <= r["dice"] <= 1.0 for r in result["rows"])
    assert result["means"]["test"]
