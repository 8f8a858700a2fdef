"""CUDA paths: inference on the GPU agrees with the CPU, bf16 training and a recipe (embedding cache,
heads, end-to-end stage, time budget) run there and their files load on the CPU.

Marker ``gpu``; skipped without a CUDA device (CI has none). They run on the lent GPU machine
through ``scripts/device/run_recipe.sh`` (``pytest -m gpu tests/test_gpu.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_delightsam.config import tiny_config
from napari_delightsam.data.synthetic import make_synthetic_dataset, synthetic_pair
from napari_delightsam.inference import load_model
from napari_delightsam.training import TrainConfig, train
from napari_delightsam.training.stages.recipe import Recipe, run_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("single_process_env"),
]


def _image(seed: int, size: tuple[int, int] = (300, 420)) -> np.ndarray:
    image, _ = synthetic_pair(np.random.default_rng(seed), size)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _untrained(device: str, **kw):
    return load_model("untrained", device, config=tiny_config(), seed=3, **kw)


def test_cuda_fp32_probabilities_match_the_cpu():
    image = _image(0)
    cpu = _untrained("cpu", fast=False, precision="fp32").segment(image, "fundus")
    gpu_seg = _untrained("cuda", fast=False, precision="fp32")
    assert gpu_seg.device.type == "cuda"
    gpu = gpu_seg.segment(image, "fundus")
    assert gpu.probability.shape == image.shape[:2] and gpu.mask.dtype == bool
    # cuDNN may use TF32 for convolutions: close, not bit-equal
    assert np.abs(gpu.probability - cpu.probability).max() < 1e-2
    assert np.abs(gpu.patch_heatmap - cpu.patch_heatmap).max() < 1e-2


def test_cuda_fast_path_agrees_with_cuda_fp32():
    images = [_image(s) for s in range(3)]
    fp32 = _untrained("cuda", fast=False, precision="fp32")
    fast = _untrained("cuda")
    for image in images:
        a = fp32.segment(image, "colonoscopy").probability
        b = fast.segment(image, "colonoscopy").probability
        assert np.abs(a - b).max() < 0.05, fast.precision


def test_bf16_training_on_cuda_writes_checkpoints_the_cpu_loads(tmp_path: Path):
    rng = np.random.default_rng(0)
    items = [(*synthetic_pair(rng, (64, 64)), "dermoscopy") for _ in range(4)]
    items = [(img, mask > 0, mod) for img, mask, mod in items]
    cfg = TrainConfig(
        epochs=2, img_size=64, batch_size=2, steps_per_epoch=3, model_preset="tiny", num_workers=0,
        device="cuda", amp=True, log_every=1, val_at_start=False, lr=2e-3,
    )
    result = train(cfg, tmp_path / "run", items=items, show_progress=False)
    assert not result.stopped and result.epochs_completed == 2
    losses = [r["loss"] for r in result.history if r["type"] == "step"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert next(result.model.parameters()).device.type == "cuda"
    seg = load_model(result.best_checkpoint, "cpu")
    assert seg.segment(items[0][0], "dermoscopy").mask.shape == items[0][0].shape[:2]


def test_a_recipe_with_time_budgets_runs_on_cuda(tmp_path: Path):
    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=8, size=(40, 52))
    common = {"model_preset": "tiny", "init": "none", "batch_size": 4, "num_workers": 2, "log_every": 0,
              "val_at_start": False}
    recipe = Recipe.from_dict({
        "name": "tiny-gpu", "description": "test", "img_size": 64, "holdout": "none", "seed": 0, "views": [0],
        "common": common,
        "stages": [
            {"name": "heads", "kind": "heads",
             "config": {"epochs": 50, "steps_per_epoch": 2, "lr": 2e-3, "time_budget_s": 0.01, "num_workers": 0}},
            {"name": "controllers", "kind": "train",
             "config": {"init": "previous", "epochs": 50, "steps_per_epoch": 2, "freeze": ["backbone"],
                        "time_budget_s": 0.01}},
        ],
    })
    events: list[dict] = []
    exported = run_recipe(recipe, root, tmp_path / "run", device="cuda", progress=events.append, show_progress=False)
    budget_ends = [e for e in events if e.get("event") == "budget"]
    assert [e["epoch"] for e in budget_ends] == [0, 0]  # each stage ended after its first epoch
    seg = load_model(exported, "cpu")
    image = _image(1, (40, 52))
    assert seg.segment(image, "xray").mask.shape == (40, 52)
