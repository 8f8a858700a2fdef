"""Two CPU processes under torchrun (gloo): both ranks must end with identical weights."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_delightsam.data.synthetic import make_synthetic_dataset

WORKER = textwrap.dedent(
    """
    import hashlib, os, sys
    import torch
    from napari_delightsam.training import TrainConfig, train

    root, out, hashes = sys.argv[1:4]
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, img_size=64, batch_size=2, model_preset="tiny",
                      num_workers=0, device="cpu", val_at_start=False)
    result = train(cfg, out, data_root=root, show_progress=False)
    h = hashlib.sha256()
    for key, value in sorted(result.model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    with open(os.path.join(hashes, f"rank{os.environ['RANK']}.txt"), "w") as fh:
        fh.write(h.hexdigest())
    """
)


def state_hash(path: Path) -> str:
    from napari_delightsam.checkpoint import load_checkpoint

    h = hashlib.sha256()
    for key, value in sorted(load_checkpoint(path).state_dict().items()):
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_end_with_identical_weights(tmp_path: Path):
    root = make_synthetic_dataset(tmp_path / "data", n_per_dataset=6, size=(40, 52))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    hashes = tmp_path / "hashes"
    hashes.mkdir()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(root),
            str(out),
            str(hashes),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = (hashes / "rank0.txt").read_text()
    rank1 = (hashes / "rank1.txt").read_text()
    assert rank0 == rank1
    # rank 0 alone wrote the run folder, and its checkpoint holds the same weights
    assert state_hash(out / "last.safetensors") == rank0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "best.safetensors",
        "curves.png",
        "last.safetensors",
        "last_state.safetensors",
        "metrics.jsonl",
        "run.json",
        "splits.json",
    ]
    assert '"world_size": 2' in (out / "run.json").read_text()
