"""napari-independent logic of the widgets: input checks, re-threshold, naming, edits, folders."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_delightsam.widgets import core, settings
from napari_delightsam.widgets.core import InputError, prepare_input, threshold_mask
from napari_delightsam.widgets.model_cache import ModelCache

# -- prepare_input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "rgb", "stack", "n", "plane"),
    [
        ((40, 50), False, False, 1, (40, 50)),
        ((40, 50, 3), True, False, 1, (40, 50)),
        ((40, 50, 4), True, False, 1, (40, 50)),
        ((7, 40, 50), False, True, 7, (40, 50)),
        ((3, 40, 50), False, True, 3, (40, 50)),  # napari reads this as a 3-slice stack, not RGB
        ((5, 40, 50, 3), True, True, 5, (40, 50)),
        ((1, 1), False, False, 1, (1, 1)),
    ],
)
def test_prepare_input_accepts_2d_rgb_and_stacks(shape, rgb, stack, n, plane):
    data = np.zeros(shape, dtype=np.uint8)
    prepared = prepare_input(data, rgb, "img")
    assert prepared.stack is stack
    assert prepared.n_slices == n
    assert prepared.plane_shape == plane
    assert prepared.output_shape == ((n, *plane) if stack else plane)
    first = prepared.plane(0)
    assert first.shape == (plane + ((shape[-1],) if rgb else ()))


@pytest.mark.parametrize(
    ("data", "rgb", "words"),
    [
        (np.zeros((2, 3, 20, 20)), False, "4 image dimensions"),  # z + channels, not RGB
        (np.zeros((2, 3, 20, 20, 3)), True, "4 RGB image dimensions"),
        (np.zeros((0, 20)), False, "empty"),
        (np.zeros((20, 0, 3)), True, "empty"),
        (np.zeros((20, 20), dtype=np.complex64), False, "complex64"),
        (np.array([["a", "b"], ["c", "d"]]), False, "<U1"),
        (np.zeros((20, 20), dtype=object), False, "object"),
        (np.zeros((20, 20, 2)), True, "3 or 4"),
        (np.zeros(20), False, "2D image is needed"),
    ],
)
def test_prepare_input_refuses_with_a_message_naming_the_problem(data, rgb, words):
    with pytest.raises(InputError) as info:
        prepare_input(data, rgb, "my layer")
    assert "my layer" in str(info.value)
    assert words in str(info.value)


def test_prepare_input_multiscale_uses_full_resolution_and_bool_becomes_uint8():
    levels = [np.ones((64, 64), dtype=bool), np.ones((32, 32), dtype=bool)]
    prepared = prepare_input(levels, False, "ms", multiscale=True)
    assert prepared.plane_shape == (64, 64)
    plane = prepared.plane(0)
    assert plane.dtype == np.uint8 and plane.max() == 255


# -- threshold_mask ------------------------------------------------------------------------------


def test_threshold_mask_binary_matches_rule_and_does_not_touch_input():
    rng = np.random.default_rng(0)
    prob = rng.random((30, 40)).astype(np.float32)
    before = prob.copy()
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        mask = threshold_mask(prob, t)
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, (prob > t).astype(np.uint8))
    np.testing.assert_array_equal(prob, before)
    with pytest.raises(ValueError, match="threshold"):
        threshold_mask(prob, 1.5)


def test_threshold_mask_instances_are_connected_components_unique_across_a_stack():
    prob = np.zeros((2, 20, 20), dtype=np.float32)
    prob[0, 2:5, 2:5] = 0.9
    prob[0, 10:14, 10:14] = 0.9
    prob[1, 1:3, 1:3] = 0.9
    labels = threshold_mask(prob, 0.5, instances=True)
    assert labels.dtype == np.int32
    assert set(np.unique(labels[0])) == {0, 1, 2}
    assert set(np.unique(labels[1])) == {0, 3}
    np.testing.assert_array_equal(labels > 0, prob > 0.5)
    # 2D
    assert threshold_mask(prob[0], 0.5, instances=True).max() == 2


# -- naming, edits --------------------------------------------------------------------------------


def test_output_names_and_unique_name():
    names = core.output_names("scan 1")
    assert names == {
        "mask": "scan 1_delightsam_mask",
        "heatmap": "scan 1_delightsam_heatmap",
        "probability": "scan 1_delightsam_probability",
    }
    assert core.unique_name("a", []) == "a"
    assert core.unique_name("a", ["a"]) == "a [2]"
    assert core.unique_name("a", ["a", "a [2]", "a [3]"]) == "a [4]"


def test_edit_detection_by_fingerprint():
    mask = np.zeros((10, 10), dtype=np.uint8)
    meta = {core.METADATA_KEY: {"fingerprint": core.fingerprint(mask)}}
    assert not core.was_edited(mask, meta)
    painted = mask.copy()
    painted[3, 3] = 1
    assert core.was_edited(painted, meta)
    # same bytes, different dtype or shape -> different data
    assert core.was_edited(mask.astype(np.int32), meta)
    assert core.was_edited(mask.reshape(5, 20), meta)
    # a layer we did not write is treated as the user's
    assert core.was_edited(mask, {})
    assert core.was_edited(mask, None)


def test_device_error_kind():
    assert core.device_error_kind(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "out of memory"
    assert core.device_error_kind(MemoryError("out of memory")) == "out of memory"
    assert core.device_error_kind(ValueError("device 'cuda' requested but CUDA is not available here")) == (
        "device unavailable"
    )
    assert core.device_error_kind(ValueError("image contains 3 NaN values")) is None


def test_iterate_segmentation_yields_progress_and_stacks_outputs():
    calls = []

    class Fake:
        def segment(self, image, modality="auto", threshold=0.5):
            calls.append((image.shape, modality, threshold))
            p = np.full(image.shape[:2], 0.25 * len(calls), dtype=np.float32)
            return SimpleNamespace(probability=p, patch_heatmap=p / 2, modality="microscopy",
                                   modality_probabilities=None, timings={"total": 0.0})

    prepared = prepare_input(np.zeros((3, 8, 9), dtype=np.uint16), False, "s")
    gen = core.iterate_segmentation(Fake(), prepared, "microscopy", 0.4)
    progress = []
    with pytest.raises(StopIteration) as stop:
        while True:
            progress.append(next(gen))
    run = stop.value.value
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert calls == [((8, 9), "microscopy", 0.4)] * 3
    assert run.probability.shape == (3, 8, 9) and run.heatmap.shape == (3, 8, 9)
    np.testing.assert_allclose(run.probability[:, 0, 0], [0.25, 0.5, 0.75])
    assert run.modality_summary == "microscopy"


# -- output folders ---------------------------------------------------------------------------


def test_default_run_dir_next_to_source_else_home(tmp_path):
    src = tmp_path / "data" / "img.png"
    src.parent.mkdir()
    src.write_bytes(b"x")
    out = core.default_run_dir(src)
    assert out.parent == src.parent / "delightsam-runs"
    home = tmp_path / "home"
    assert core.default_run_dir(None, home=home).parent == home / "delightsam-runs"


def test_output_dir_never_inside_package_or_bundled_weights(tmp_path):
    pkg = core.package_dir()
    with pytest.raises(ValueError, match="installed package"):
        core.check_output_dir(pkg / "weights")
    with pytest.raises(ValueError, match="installed package"):
        core.check_output_dir(pkg)
    # a source file inside the package never makes the package the default output folder
    inside = core.default_run_dir(pkg / "sample_data" / "synthetic_dermoscopy.png", home=tmp_path)
    assert inside.parent == tmp_path / "delightsam-runs"
    repo_weights = pkg.parents[1] / "weights"
    if repo_weights.is_dir():
        with pytest.raises(ValueError):
            core.check_output_dir(repo_weights / "run1")
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        core.check_output_dir(a_file)
    assert core.check_output_dir(tmp_path / "new") == (tmp_path / "new").resolve()


# -- settings ------------------------------------------------------------------------------------


def test_settings_remember_model_and_recent_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIGHTSAM_CONFIG_DIR", str(tmp_path / "cfg"))
    assert settings.last_model() is None
    assert settings.remember_model("untrained")
    assert settings.last_model() == "untrained"
    ckpts = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        p.write_bytes(b"0")
        ckpts.append(p)
        settings.remember_model(str(p))
    assert settings.last_model() == str(ckpts[-1].resolve())
    assert settings.recent_checkpoints() == [str(p.resolve()) for p in reversed(ckpts)]
    ckpts[0].unlink()  # vanished files drop out of the list
    assert str(ckpts[0].resolve()) not in settings.recent_checkpoints()
    # a corrupt file means defaults, not an exception
    settings.settings_file().write_text("{not json")
    assert settings.load_settings() == {}
    assert settings.last_model() is None


# -- model cache -------------------------------------------------------------------------------


def test_model_cache_loads_once_per_checkpoint_version_and_device(tmp_path):
    loaded = []
    cache = ModelCache(max_entries=2, loader=lambda spec, dev: loaded.append((spec, dev)) or object())
    ck = tmp_path / "a.safetensors"
    ck.write_bytes(b"1")
    first = cache.get(str(ck), "cpu")
    assert cache.get(str(ck), "cpu") is first
    assert cache.is_loaded(str(ck), "cpu")
    cache.get("untrained", "cpu")
    assert cache.loads == 2
    # the same path rewritten (e.g. a fine-tune's best checkpoint) is a new model
    ck.write_bytes(b"22")
    os.utime(ck, ns=(1, 1))
    assert not cache.is_loaded(str(ck), "cpu")
    assert cache.get(str(ck), "cpu") is not first
    assert cache.loads == 3
    # LRU bound
    assert len(cache._items) == 2
    assert Path(loaded[0][0]) == ck


def test_guard_worker_turns_runtime_errors_into_worker_errors():
    def body():
        yield 1
        raise RuntimeError("CUDA out of memory")

    gen = core.guard_worker(body())
    assert next(gen) == 1
    with pytest.raises(core.WorkerError) as info:
        next(gen)
    assert isinstance(info.value.original, RuntimeError)
    assert core.device_error_kind(info.value) == "out of memory"

    def fine():
        yield 1
        return "done"

    gen = core.guard_worker(fine())
    next(gen)
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == "done"
    # other exceptions pass unchanged
    def bad():
        raise ValueError("x")
        yield

    with pytest.raises(ValueError):
        next(core.guard_worker(bad()))


def test_iterate_segmentation_reports_tiles_of_a_tiled_plane():
    from napari_delightsam.config import tiny_config
    from napari_delightsam.inference import load_model

    seg = load_model("untrained", "cpu", config=tiny_config())
    prepared = prepare_input(np.zeros((300, 200), dtype=np.uint8), False, "big")
    items = list(_drain(core.iterate_segmentation(seg, prepared, "microscopy", 0.5, tiling="on")))
    tiles = [i for i in items if len(i) == 4]
    assert tiles and tiles[-1][2] == tiles[-1][3] > 1 and all(i[:2] == (0, 1) for i in tiles)
    assert items[-1] == (1, 1)
    off = list(_drain(core.iterate_segmentation(seg, prepared, "microscopy", 0.5, tiling="off")))
    assert off == [(1, 1)]


def test_prepare_input_picks_a_pyramid_level_and_refuses_missing_ones():
    levels = [np.zeros((64, 64), np.uint8), np.zeros((32, 32), np.uint8)]
    assert prepare_input(levels, False, "ms", multiscale=True, level=1).plane_shape == (32, 32)
    with pytest.raises(InputError, match="pyramid levels"):
        prepare_input(levels, False, "ms", multiscale=True, level=2)
    with pytest.raises(InputError, match="not multiscale"):
        prepare_input(levels[0], False, "flat", level=1)
    layer = SimpleNamespace(data=levels, multiscale=True, scale=(2.0, 3.0))
    assert core.pyramid_levels(layer) == 2 and core.level_scale(layer, 1) == (4.0, 6.0)


def _drain(gen):
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return
