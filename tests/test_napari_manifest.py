"""The npe2 manifest: one file, every command importable, contributions napari sees; sample data."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
from pathlib import Path

import numpy as np
import pytest
from npe2 import PluginManifest

from napari_delightsam import sample_data

REPO = Path(__file__).resolve().parents[1]
PACKAGED = importlib.resources.files("napari_delightsam").joinpath("napari.yaml")


def test_top_level_manifest_is_the_packaged_one():
    top = REPO / "napari.yaml"
    assert top.read_bytes() == PACKAGED.read_bytes()
    # the packaged file is what the entry point names
    eps = [ep for ep in importlib.metadata.entry_points(group="napari.manifest") if ep.name == "napari-delightsam"]
    assert [ep.value for ep in eps] == ["napari_delightsam:napari.yaml"]


def test_every_manifest_command_imports():
    manifest = PluginManifest.from_file(str(PACKAGED))
    assert manifest.name == "napari-delightsam"
    commands = manifest.contributions.commands
    assert len(commands) >= 7
    for command in commands:
        module, _, attr = command.python_name.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), command.id


def test_manifest_contributions():
    manifest = PluginManifest.from_file(str(PACKAGED))
    contrib = manifest.contributions
    assert {w.display_name for w in contrib.widgets} == {
        "De-LightSAM segment",
        "De-LightSAM fine-tune",
        "De-LightSAM refine",
        "De-LightSAM annotate",
    }
    writers = {tuple(w.filename_extensions): w.layer_types for w in contrib.writers}
    assert writers == {(".png",): ["labels"], (".tif", ".tiff"): ["labels"]}
    assert {s.key for s in contrib.sample_data} == set(sample_data.SAMPLES)


def test_npe2_discovers_the_installed_plugin():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover()
    assert "napari-delightsam" in pm._manifests
    found = pm.get_manifest("napari-delightsam")
    assert Path(str(found._yaml_path if hasattr(found, "_yaml_path") else PACKAGED)).name == "napari.yaml"
    assert {c.id for c in found.contributions.commands} == {
        c.id for c in PluginManifest.from_file(str(PACKAGED)).contributions.commands
    }


# -- sample data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(sample_data.SAMPLES))
def test_samples_open_as_image_plus_reference_mask(key):
    sample = sample_data.SAMPLES[key]
    assert sample.image_file.is_file() and sample.mask_file.is_file()
    for f in (sample.image_file, sample.mask_file):
        assert f.stat().st_size <= 100_000, f
    func = {"synthetic_dermoscopy": sample_data.dermoscopy_sample, "synthetic_microscopy": sample_data.microscopy_sample,
            "synthetic_ultrasound": sample_data.ultrasound_sample, "nuclei_dsb2018": sample_data.nuclei_dsb2018_sample,
            "breast_ultrasound_busi": sample_data.breast_ultrasound_busi_sample}[key]
    (image, image_kw, image_type), (mask, mask_kw, mask_type) = func()
    assert (image_type, mask_type) == ("image", "labels")
    side = 256 if sample.synthetic else sample.source.max_side
    assert image.dtype == np.uint8 and max(image.shape[:2]) == side
    assert image_kw["metadata"]["delightsam_sample"]["synthetic"] == sample.synthetic
    assert image_kw["rgb"] == (image.ndim == 3)
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 1}
    assert 0.01 < mask.mean() < 0.6
    assert image_kw["metadata"]["delightsam_sample"]["modality"] == sample.modality
    # the lesion/nuclei really differ from their surroundings (a usable segmentation target)
    grey = image.mean(axis=-1) if image.ndim == 3 else image.astype(float)
    assert abs(grey[mask > 0].mean() - grey[mask == 0].mean()) > 15


def test_shipped_samples_are_what_the_generator_makes(tmp_path):
    """The PNGs are generated (no real data): regenerating gives the same pictures."""
    sample_data.regenerate(tmp_path)
    for key, sample in sample_data.SAMPLES.items():
        if not sample.synthetic:
            continue
        from PIL import Image

        shipped = np.asarray(Image.open(sample.image_file)).astype(float)
        fresh = np.asarray(Image.open(tmp_path / f"{key}.png")).astype(float)
        assert shipped.shape == fresh.shape
        assert np.abs(shipped - fresh).mean() < 1.0, key
        shipped_m = np.asarray(Image.open(sample.mask_file))
        fresh_m = np.asarray(Image.open(tmp_path / f"{key}_mask.png"))
        assert (shipped_m != fresh_m).mean() < 0.001, key


def test_sample_license_is_stated():
    text = (Path(sample_data.__file__).parent / "sample_data" / "README.md").read_text()
    assert "synthetic" in text.lower() and "Apache-2.0" in text
    real = [s for s in sample_data.SAMPLES.values() if not s.synthetic]
    assert real, "at least one real sample"
    for sample in real:  # each real image: its file, dataset image, licence and attribution named
        row = next(line for line in text.splitlines() if line.startswith(f"| `{sample.key}.png`"))
        cells = [c.strip() for c in row.split("|")]
        assert sample.source.image_id in cells[2] and cells[3] == sample.source.licence
        assert len(cells[4]) > 30  # the attribution: authors, title, where published


def test_real_samples_are_their_dataset_images_downscaled(tmp_path):
    """The shipped real PNGs are what ``--import-real`` makes from the dataset layout."""
    data = REPO.parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip("../shared/data is not on this machine")
    from PIL import Image

    written = sample_data.import_real(data, tmp_path)
    assert written
    for path in written:
        shipped = np.asarray(Image.open(Path(sample_data.SAMPLE_DIR) / path.name))
        fresh = np.asarray(Image.open(path))
        assert np.array_equal(shipped, fresh), path.name


# -- widgets through napari's plugin manager -----------------------------------------------------


@pytest.mark.gui
@pytest.mark.parametrize("name", ["De-LightSAM segment", "De-LightSAM fine-tune"])
def test_widgets_open_through_napari(make_napari_viewer, name, tmp_path, monkeypatch):
    monkeypatch.setenv("DELIGHTSAM_CONFIG_DIR", str(tmp_path))
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", name)
    assert dock is not None and widget is not None
    cls = "SegmentWidget" if name.endswith("segment") else "FinetuneWidget"
    assert type(widget).__name__ == cls
    assert widget.viewer is viewer


@pytest.mark.gui
@pytest.mark.parametrize("key", ["synthetic_dermoscopy", "breast_ultrasound_busi"])
def test_sample_data_opens_in_napari(make_napari_viewer, key):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-delightsam", key)
    assert [layer.name for layer in viewer.layers] == [key, f"{key}_reference_mask"]
    assert viewer.layers[key].rgb == (key == "synthetic_dermoscopy")


@pytest.mark.gui
def test_labels_save_through_the_writer_contribution(make_napari_viewer, tmp_path):
    from napari_delightsam.widgets.export import read_labels

    viewer = make_napari_viewer()
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[4:9, 5:25] = 1
    viewer.add_labels(mask, name="m")
    for ext in (".png", ".tif"):
        out = viewer.layers.save(str(tmp_path / f"m{ext}"), selected=False, plugin="napari-delightsam")
        assert str(tmp_path / f"m{ext}") in out
        np.testing.assert_array_equal(read_labels(tmp_path / f"m{ext}"), mask)
        assert (tmp_path / f"m{ext}.json").is_file()
