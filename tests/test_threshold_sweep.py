"""``benchmarks/threshold_sweep.py``: the summary picks each modality's threshold on the first file."""

from __future__ import annotations

import json
from pathlib import Path


def _write(path: Path, rows: list[tuple[str, dict[str, float]]]) -> Path:
    path.write_text("".join(json.dumps({"modality": m, "dice": d}) + "\n" for m, d in rows), encoding="utf-8")
    return path


def test_the_val_choice_is_read_on_the_second_file(tmp_path, load_script):
    ts = load_script("benchmarks/threshold_sweep.py")
    val = _write(tmp_path / "val.jsonl", [
        ("fundus", {"0.4": 0.70, "0.5": 0.60}), ("fundus", {"0.4": 0.72, "0.5": 0.64}),
        ("xray", {"0.4": 0.90, "0.5": 0.95}),
    ])
    unseen = _write(tmp_path / "unseen.jsonl", [("fundus", {"0.4": 0.50, "0.5": 0.55}), ("xray", {"0.4": 0.1, "0.5": 0.8})])
    text = ts.summarise([val, unseen])
    assert "| fundus | 0.4 | 62.00 → 71.00 | 55.00 → 50.00 |" in text
    assert "| xray | 0.5 | 95.00 → 95.00 | 80.00 → 80.00 |" in text
    assert "second file: 67.50 → 65.00" in text
