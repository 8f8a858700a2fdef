"""The built wheel carries what an offline user needs: the default model, its manifest, the manifest of the plugin."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_the_bundled_model_and_the_napari_manifest(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("napari_delightsam-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "napari_delightsam/napari.yaml" in names
        sums = zf.read("napari_delightsam/weights/SHA256SUMS").decode()
        expected = dict(reversed(line.split()) for line in sums.splitlines() if line.strip())
        assert "delightsam_default.safetensors" in expected
        assert "box_refiner_decoder.safetensors" in expected  # the tuned box refiner's decoder
        for name, want in expected.items():  # every bundled weights file, byte for byte
            assert hashlib.sha256(zf.read(f"napari_delightsam/weights/{name}")).hexdigest() == want, name
        assert "napari_delightsam/weights/MODEL_CARD.md" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "napari_delightsam:napari.yaml" in zf.read(entry_points).decode()
