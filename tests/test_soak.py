"""Long sessions: many calls in one process do not grow memory, threads or open files.

RSS is read with psutil after ``gc.collect()``: at the start, after a warm-up (allocator
pools, torch's kernel caches and thread pools settle in the first calls) and every 50 calls.
The bound is on growth after the warm-up. The numbers are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import psutil
import pytest

from napari_delightsam.inference import Segmenter

_MIB = 2**20
#: allowed RSS growth after the warm-up
_GROWTH_BOUND_MIB = 50

pytestmark = pytest.mark.usefixtures("one_thread")


def _rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / _MIB


def _trend_mib_per_100(samples: list[tuple[int, float]]) -> float:
    x = np.array([s[0] for s in samples], dtype=np.float64)
    y = np.array([s[1] for s in samples], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0] * 100)


def _report(name: str, samples: list[tuple[int, float]], warm: float) -> None:
    start, end = samples[0][1], samples[-1][1]
    trend = _trend_mib_per_100(samples[1:])
    print(
        f"\n{name}: RSS start {start:.1f} MiB, after warm-up {warm:.1f} MiB, end {end:.1f} MiB "
        f"(growth after warm-up {end - warm:+.1f} MiB, max {max(s[1] for s in samples[1:]) - warm:+.1f} MiB, "
        f"trend {trend:+.2f} MiB per 100 calls); samples: " + ", ".join(f"{i}:{v:.0f}" for i, v in samples)
    )


@pytest.mark.slow
def test_300_segment_calls_without_memory_growth(tiny_model):
    seg = Segmenter.from_model(tiny_model, device="cpu")
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8),
        rng.integers(0, 65535, size=(512, 512)).astype(np.uint16),
        rng.random((3, 512, 512), dtype=np.float32),
    ]
    modalities = ["dermoscopy", "xray", "microscopy", 3]
    threads_before = threading.active_count()
    samples = [(0, _rss_mib())]
    warm_up = 50
    warm = samples[0][1]
    for i in range(1, 301):
        r = seg.segment(images[i % 3], modalities[i % 4], threshold=0.5)
        assert r.mask.shape == (512, 512)
        del r
        if i == warm_up:
            warm = _rss_mib()
        if i % 50 == 0:
            samples.append((i, _rss_mib()))
    _report("300 x segment(512x512)", samples, warm)
    after = [v for i, v in samples if i >= warm_up]
    assert max(after) - warm < _GROWTH_BOUND_MIB
    assert _trend_mib_per_100([s for s in samples if s[0] >= warm_up]) < 5.0
    assert threading.active_count() == threads_before


@pytest.mark.slow
def test_50_segment_batch_calls_without_memory_growth(tiny_model):
    seg = Segmenter.from_model(tiny_model, device="cpu")
    rng = np.random.default_rng(1)
    batch = [rng.integers(0, 256, size=(256 + 16 * i, 320 - 16 * i, 3), dtype=np.uint8) for i in range(8)]
    samples = [(0, _rss_mib())]
    warm_up = 10
    warm = samples[0][1]
    for i in range(1, 51):
        results = seg.segment_batch(batch, "colonoscopy", batch_size=4)
        assert [r.mask.shape for r in results] == [b.shape[:2] for b in batch]
        del results
        if i == warm_up:
            warm = _rss_mib()
        if i % 10 == 0:
            samples.append((i, _rss_mib()))
    _report("50 x segment_batch(8 images, 256-368 px)", samples, warm)
    assert max(v for i, v in samples if i >= warm_up) - warm < _GROWTH_BOUND_MIB


def test_reloading_checkpoints_does_not_accumulate(tmp_path, tiny_model):
    """Switching models in a session (the napari widget's model choice): 20 loads."""
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.inference import load_model

    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model)
    image = np.zeros((64, 64), np.uint8)
    samples = [(0, _rss_mib())]
    warm = samples[0][1]
    for i in range(1, 21):
        seg = load_model(path, device="cpu")
        seg.segment(image, "fundus")
        del seg
        if i == 4:
            warm = _rss_mib()
        if i % 4 == 0:
            samples.append((i, _rss_mib()))
    _report("20 x load_model + segment", samples, warm)
    assert max(v for i, v in samples if i >= 4) - warm < _GROWTH_BOUND_MIB


def test_read_and_write_cycles_do_not_leak_files(tmp_path):
    """300 reads (good and bad files) and atomic mask writes: no open file descriptor or
    temporary file is left behind."""
    from PIL import Image

    from napari_delightsam.image_files import ImageReadError, read_image, write_mask_png

    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    proc = psutil.Process()
    fds_before = proc.num_fds()
    for i in range(300):
        assert read_image(tmp_path / "good.png").shape == (32, 48, 3)
        for bad in ("bad.png", "bad.tif"):
            with pytest.raises(ImageReadError):
                read_image(tmp_path / bad)
        write_mask_png(tmp_path / "out.png", np.eye(32, 48, k=i % 16, dtype=bool), overwrite=True)
    gc.collect()
    assert proc.num_fds() == fds_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "bad.tif", "good.png", "out.png"]
