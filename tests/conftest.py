"""Shared test fixtures (owned by core-io; keep small and stable).

- ``tiny_model``: a ``DeLightSAM(tiny_config())`` built with a fixed seed, in eval mode.
- ``tiny_cfg``: the tiny ``ModelConfig`` itself.
- ``one_thread``: torch at one intra-op thread for the test (tiny models gain nothing from
  threads; on a shared CPU they only add contention); files opt in with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``.
- ``single_process_env``: no torchrun variables (WORLD_SIZE / RANK / LOCAL_RANK) in the
  environment, so in-process CLI runs never try to join a process group.
- ``load_script``: ``load_script("benchmarks/x.py")`` imports a repository script as a module
  (scripts are not part of the package).
- ``_nothing_frozen`` (autouse): the widgets freeze the garbage collector's objects when they
  start work (``widgets.gc_policy``); every test ends unfrozen, so no test keeps another's
  objects alive.
- ``shared_data_dir``: the real data folder (``$DELIGHTSAM_DATA`` or ``../shared/data`` beside the
  repository checkout); the test is skipped when it is absent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from napari_delightsam.config import ModelConfig, tiny_config

SEED = 0


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _nothing_frozen():
    yield
    import gc

    gc.unfreeze()


@pytest.fixture
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _data_dir() -> Path | None:
    env = os.environ.get("DELIGHTSAM_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture
def tiny_model():
    """A fresh tiny De-LightSAM (seeded, eval mode, CPU). Each test gets its own copy."""
    from napari_delightsam.model import DeLightSAM

    torch.manual_seed(SEED)
    model = DeLightSAM(tiny_config())
    model.eval()
    return model


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Root of the real data (``<modality>/<dataset>/{images,masks}``); skips when missing."""
    path = _data_dir()
    if path is None:
        pytest.skip("real data folder ../shared/data (or $DELIGHTSAM_DATA) not available")
    return path


@pytest.fixture(scope="session")
def load_script():
    """``load_script(relative_path)`` -> the repository script at that path, imported as a module
    named after its file (registered in ``sys.modules`` so dataclasses and pickling work)."""
    root = Path(__file__).resolve().parents[1]

    def load(relative: str):
        path = root / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_appearance_setup(tmp_path_factory) -> dict[str, Path]:
    """Synthetic data (dermoscopy + X-ray, 10 images each), its splits and a tiny model whose
    appearance head is flagged as trained (``auto`` available): for the appearance benchmarks."""
    from napari_delightsam.checkpoint import save_checkpoint
    from napari_delightsam.config import tiny_config
    from napari_delightsam.data import discover, make_splits, save_splits
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.inference import MODALITY_HEAD_TRAINED_KEY
    from napari_delightsam.model import DeLightSAM

    root = tmp_path_factory.mktemp("appearance-setup")
    data = make_synthetic_dataset(root / "data", {"dermoscopy": ["derm_a"], "xray": ["xr_a"]}, n_per_dataset=10)
    splits = root / "splits.json"
    save_splits(splits, make_splits(discover(data), seed=0))
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "tiny.safetensors", DeLightSAM(tiny_config(modality_head_kind="appearance")).eval(),
                           {MODALITY_HEAD_TRAINED_KEY: "true"})
    return {"data": data, "splits": splits, "ckpt": ckpt}
