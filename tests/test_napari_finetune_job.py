"""Fine-tune plumbing without Qt: dataset folder from layer pairs, command line, child process I/O."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_delightsam.widgets import finetune_job as fj


def _pair(name="lesion", modality="dermoscopy", rgb=True, stack=False):
    rng = np.random.default_rng(1)
    shape = (3, 24, 32) if stack else (24, 32)
    image = rng.integers(0, 255, (*shape, 3) if rgb else shape, dtype=np.uint8)
    labels = np.zeros(shape, dtype=np.int32)
    if stack:
        labels[1, 4:10, 5:20] = 2  # only slice 1 annotated
    else:
        labels[4:10, 5:20] = 1
    return fj.TrainingPair(image=image, labels=labels, modality=modality, name=name, rgb=rgb)


def test_write_dataset_layout_and_values(tmp_path):
    pairs = [_pair("lesion 1"), _pair("cells", "microscopy", rgb=False, stack=True),
             fj.TrainingPair(np.linspace(0, 4000, 24 * 32).reshape(24, 32).astype(np.uint16),
                             np.ones((24, 32), np.uint8), "xray", "cxr")]
    counts = fj.write_dataset(pairs, tmp_path)
    assert counts == {"dermoscopy": 1, "microscopy": 1, "xray": 1}
    img = tmp_path / "dermoscopy" / "user" / "images" / "p00_lesion-1.png"
    mask = tmp_path / "dermoscopy" / "user" / "masks" / "p00_lesion-1.png"
    np.testing.assert_array_equal(np.asarray(Image.open(img)), pairs[0].image)
    m = np.asarray(Image.open(mask))
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    np.testing.assert_array_equal(m > 0, pairs[0].labels > 0)
    # a stack gives its annotated slices only
    names = sorted(p.name for p in (tmp_path / "microscopy" / "user" / "images").iterdir())
    assert names == ["p01_cells_z0001.png"]
    # non-uint8 images keep their values in a TIFF
    import tifffile

    tif = tmp_path / "xray" / "user" / "images" / "p02_cxr.tif"
    np.testing.assert_array_equal(tifffile.imread(tif), pairs[2].image)


def test_a_large_microscopy_layer_trains_on_its_inference_tiles(tmp_path):
    """With the training size given, a 1024² H&E layer is written as the 256² tiles a 256-input
    model will segment it in (scale 1.25: 1280² working, 7 x 7 tiles overlapping by >= 64 px), not
    resized whole; a
    polyp frame of the same size stays one image."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    labels = (image[..., 0] > 128).astype(np.uint16)
    pairs = [fj.TrainingPair(image, labels, "microscopy", "field", rgb=True),
             fj.TrainingPair(image, labels, "colonoscopy", "frame", rgb=True)]
    counts = fj.write_dataset(pairs, tmp_path, tile_size=256)
    assert counts == {"microscopy": 49, "colonoscopy": 1}
    tiles = sorted((tmp_path / "microscopy" / "user" / "images").iterdir())
    assert tiles[0].name == "p00_field_t000.png" and tiles[-1].name == "p00_field_t048.png"
    for path in tiles[:3]:
        img = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(tmp_path / "microscopy" / "user" / "masks" / path.name)) > 0
        assert img.shape == (256, 256, 3) and mask.shape == (256, 256)
        red = img[..., 0].astype(int)
        assert mask[red > 160].mean() > 0.95 and mask[red < 96].mean() < 0.05
    assert np.asarray(Image.open(tmp_path / "colonoscopy" / "user" / "images" / "p01_frame.png")).shape == image.shape
    # without a training size (the trainer decides), every layer is written whole, as before
    assert fj.write_dataset(pairs, tmp_path / "whole") == {"microscopy": 1, "colonoscopy": 1}


def test_annotate_rounds_hold_out_every_tile_of_a_held_out_image(tmp_path):
    from napari_delightsam.annotate_learning import _write_round_data
    from napari_delightsam.data.splits import load_splits

    rng = np.random.default_rng(2)

    def field(name):
        image = rng.integers(0, 255, (600, 600, 3), dtype=np.uint8)
        return fj.TrainingPair(image, (image[..., 1] > 128).astype(np.uint8), "microscopy", name, rgb=True)

    path = _write_round_data([field("a"), field("b")], [field("c")], tmp_path / "data", tmp_path / "splits.json", 256)
    parts = load_splits(path).assignments["microscopy/user"]
    assert len(parts["train"]) == 2 * len(parts["val"]) == 2 * 16  # 750² working: 4 x 4 tiles each
    assert all(name.startswith("p02_c_t") for name in parts["val"])


def test_the_trainers_loader_reads_what_the_widget_writes(tmp_path):
    from napari_delightsam.data import discover

    fj.write_dataset([_pair("a"), _pair("b")], tmp_path)
    records = discover(tmp_path)
    assert [(r.modality, r.dataset, r.sample_id) for r in records] == [
        ("dermoscopy", "user", "p00_a"), ("dermoscopy", "user", "p01_b")]


@pytest.mark.parametrize(
    ("pair", "words"),
    [
        (fj.TrainingPair(np.zeros((10, 10)), np.zeros((10, 11)), "xray", "x"), "does not match"),
        (fj.TrainingPair(np.zeros((10, 10)), np.zeros((10, 10)), "mri", "x"), "unknown modality"),
        (fj.TrainingPair(np.zeros((10, 10), np.complex64), np.zeros((10, 10)), "xray", "x"), "complex64"),
        (fj.TrainingPair(np.zeros((2, 10, 10)), np.zeros((2, 10, 10)), "xray", "x"), "no slice"),
    ],
)
def test_bad_pairs_are_refused_with_the_pair_named(pair, words):
    with pytest.raises(ValueError, match=words):
        fj.pair_samples(pair)


def test_link_folder_dataset(tmp_path):
    src = tmp_path / "mydata"
    fj.write_dataset([_pair("a")], src)
    (src / "notes").mkdir()
    root = tmp_path / "root"
    counts = fj.link_folder_dataset(src, root)
    assert counts == {"dermoscopy": 1}
    # the folder's own "user" dataset does not collide with the layer pairs' one
    assert (root / "dermoscopy" / "user-folder" / "images" / "p00_a.png").is_file()
    with pytest.raises(ValueError, match="dataset layout"):
        fj.link_folder_dataset(tmp_path / "root" / "dermoscopy", tmp_path / "other")


def test_build_train_command_and_parse_lines(tmp_path):
    s = fj.FinetuneSettings(epochs=3, steps_per_epoch=7, img_size=256, lr=2e-4, batch_size=2, device="cpu",
                            init=str(tmp_path / "m.safetensors"))
    cmd = fj.build_train_command(s, tmp_path / "data", tmp_path / "out")
    assert cmd[:4] == [sys.executable, "-m", "napari_delightsam.cli", "train"]
    args = dict(zip(cmd[4::1], cmd[5::1], strict=False))
    assert args["--data"] == str(tmp_path / "data") and args["--out"] == str(tmp_path / "out")
    assert args["--epochs"] == "3" and args["--steps-per-epoch"] == "7" and args["--img-size"] == "256"
    assert float(args["--lr"]) == 2e-4 and args["--init"] == str(tmp_path / "m.safetensors")
    assert "--progress-jsonl" in cmd
    # the CLI accepts exactly these options
    import argparse

    from napari_delightsam.commands import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(cmd[3:])
    assert parsed.command == "train" and parsed.progress_jsonl and parsed.epochs == 3
    # bf16 training exactly where the CPU has native bf16
    assert train.build_config(parsed).amp_cpu == fj.cpu_supports_bf16()
    # the shared backbone and the mask decoder stay fixed by default when fine-tuning a model; on
    # request the decoder, then the backbone train too
    assert train.build_config(parsed).freeze == ("backbone", "decoder", "fine_upscale", "refiners")
    heads = fj.build_train_command(
        fj.FinetuneSettings(init=str(tmp_path / "m.safetensors"), freeze_decoder=False), tmp_path / "d", tmp_path / "o"
    )
    assert train.build_config(parser.parse_args(heads[3:])).freeze == ("backbone",)
    everything = fj.build_train_command(
        fj.FinetuneSettings(init=str(tmp_path / "m.safetensors"), freeze_backbone=False), tmp_path / "d", tmp_path / "o"
    )
    assert train.build_config(parser.parse_args(everything[3:])).freeze == ()
    scratch = fj.build_train_command(fj.FinetuneSettings(init=None), tmp_path / "d", tmp_path / "o")
    assert "--freeze" not in scratch  # a random backbone is never kept fixed


def test_train_cli_amp_cpu_defaults_to_native_bf16_and_can_be_forced(monkeypatch):
    import argparse

    from napari_delightsam import devices
    from napari_delightsam.commands import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="command"))
    for native in (True, False):
        monkeypatch.setattr(devices, "cpu_supports_bf16", lambda native=native: native)
        for flags, want in (([], native), (["--amp-cpu"], True), (["--no-amp-cpu"], False)):
            args = parser.parse_args(["train", "--data", "d", "--out", "o", *flags])
            assert train.build_config(args).amp_cpu is want, (native, flags)


def test_fine_tune_uses_bf16_only_on_a_cpu_with_native_bf16(tmp_path, monkeypatch):
    s = fj.FinetuneSettings(device="cpu")
    monkeypatch.setattr(fj, "cpu_supports_bf16", lambda: True)
    assert "--amp-cpu" in fj.build_train_command(s, tmp_path / "d", tmp_path / "o")
    monkeypatch.setattr(fj, "cpu_supports_bf16", lambda: False)
    assert "--amp-cpu" not in fj.build_train_command(s, tmp_path / "d", tmp_path / "o")
    monkeypatch.setattr(fj, "cpu_supports_bf16", lambda: True)
    gpu = fj.FinetuneSettings(device="cuda")
    assert "--amp-cpu" not in fj.build_train_command(gpu, tmp_path / "d", tmp_path / "o")

    assert fj.parse_progress_line('{"event": "step", "loss": 0.5}\n') == {"event": "step", "loss": 0.5}
    assert fj.parse_progress_line("epoch 1/3: 100%|####|") is None
    assert fj.parse_progress_line("{broken") is None
    assert fj.parse_progress_line("[1, 2]") is None


FAKE_TRAINER = textwrap.dedent(
    """
    import json, signal, sys, time
    stop = False
    def handler(*_):
        global stop
        stop = True
    signal.signal(signal.SIGINT, handler)
    print(json.dumps({"event": "start", "epochs": 100, "steps_per_epoch": 1}), flush=True)
    print("a progress bar line that is not JSON", flush=True)
    print("some warning", file=sys.stderr, flush=True)
    for step in range(1, 1000):
        if stop:
            print(json.dumps({"event": "end", "status": "stopped", "best_checkpoint": "BEST"}), flush=True)
            sys.exit(0)
        print(json.dumps({"event": "step", "global_step": step, "loss": 1.0 / step}), flush=True)
        time.sleep(0.05)
    """
)


def test_training_process_streams_events_and_stops_cleanly(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    job = fj.TrainingProcess([sys.executable, str(script)], log_path=tmp_path / "train.log").start()
    events = []
    t0 = time.monotonic()
    for event in job.events(poll_s=0.05):
        if event is None:
            continue
        events.append(event)
        if event.get("event") == "step" and event["global_step"] == 3:
            job.stop(grace_s=10)
    assert time.monotonic() - t0 < 20
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert events[-1]["status"] == "stopped"
    assert job.returncode == 0 and job.stop_requested
    assert "some warning" in job.stderr_tail()
    assert "some warning" in (tmp_path / "train.log").read_text()


def test_training_process_that_ignores_sigint_is_terminated(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('{}', flush=True)\n"
                      "time.sleep(120)\n")
    job = fj.TrainingProcess([sys.executable, str(script)]).start()
    time.sleep(0.5)
    t0 = time.monotonic()
    job.stop(grace_s=1.0, wait=True)
    assert not job.running
    assert time.monotonic() - t0 < 15
    assert list(e for e in job.events(poll_s=0.05) if e is not None) in ([], [{}])


@pytest.mark.skipif(not hasattr(__import__("os"), "getpriority"), reason="POSIX scheduling priorities")
def test_training_child_runs_at_lower_priority(tmp_path):
    import os

    script = tmp_path / "nice.py"
    # the parent lowers the priority right after the child starts; report it a moment later
    script.write_text("import json, os, time\ntime.sleep(1.0)\n"
                      "print(json.dumps({'event': 'nice', 'value': os.nice(0)}), flush=True)\n")
    job = fj.TrainingProcess([sys.executable, str(script)], nice=5).start()
    events = [e for e in job.events(poll_s=0.05) if e is not None]
    parent = os.getpriority(os.PRIO_PROCESS, 0)
    assert events == [{"event": "nice", "value": min(19, parent + 5)}]


def test_run_finetune_feeds_pairs_and_folder_and_cleans_up_without_touching_user_data(tmp_path, monkeypatch):
    user = tmp_path / "my data"
    fj.write_dataset([_pair("a"), _pair("b", "xray", rgb=False)], user)
    before = sorted(str(p.relative_to(user)) for p in user.rglob("*"))
    seen = {}
    script = tmp_path / "list_data.py"
    # the child lists what the trainer's own loader finds there
    script.write_text(
        "import json, sys\n"
        "from napari_delightsam.data import discover\n"
        "files = [f'{r.modality}/{r.dataset}/{r.sample_id}' for r in discover(sys.argv[1])]\n"
        "print(json.dumps({'event': 'files', 'files': files}), flush=True)\n"
        "print(json.dumps({'event': 'end', 'status': 'finished', 'best_checkpoint': None}), flush=True)\n"
    )

    def command(settings, data_root, out_dir):
        seen["root"] = Path(data_root)
        return [sys.executable, str(script), str(data_root)]

    monkeypatch.setattr(fj, "build_train_command", command)
    holder: dict = {}
    gen = fj.run_finetune([_pair("layer")], user, fj.FinetuneSettings(), tmp_path / "out", holder)
    events = []
    with pytest.raises(StopIteration) as stop:
        while True:
            event = next(gen)
            if event is not None:
                events.append(event)
    summary = stop.value.value
    files = next(e["files"] for e in events if e["event"] == "files")
    assert sorted(files) == ["dermoscopy/user-folder/p00_a", "dermoscopy/user/p00_layer",  # pair + folder
                             "xray/user-folder/p01_b"]
    assert summary["counts"] == {"dermoscopy": 2, "xray": 1}
    assert summary["returncode"] == 0 and summary["end"]["status"] == "finished"
    assert not seen["root"].exists()  # the temporary dataset is gone ...
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*")) == before  # ... the user's data is not


def test_run_finetune_without_data_is_an_error(tmp_path):
    gen = fj.run_finetune([], None, fj.FinetuneSettings(), tmp_path / "out", {})
    assert next(gen)["event"] == "status"
    with pytest.raises(ValueError, match="no training data"):
        next(gen)


def test_run_finetune_names_the_layers_it_trains_as_tiles(tmp_path, monkeypatch):
    script = tmp_path / "end.py"
    script.write_text("import json\nprint(json.dumps({'event': 'end', 'status': 'finished', 'best_checkpoint': None}))\n")
    monkeypatch.setattr(fj, "build_train_command", lambda s, d, o: [sys.executable, str(script)])
    rng = np.random.default_rng(3)
    field = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    pairs = [_pair("frame"), fj.TrainingPair(field, (field[..., 0] > 128).astype(np.uint8), "microscopy", "field", rgb=True)]
    events = [e for e in fj.run_finetune(pairs, None, fj.FinetuneSettings(img_size=256), tmp_path / "out", {}) if e]
    data = next(e for e in events if e["event"] == "data")
    assert data["tiled"] == ["field"] and data["counts"] == {"dermoscopy": 1, "microscopy": 49}
    assert fj.tiled_layers(pairs, None) == [] and fj.tiled_layers(pairs, 1024) == []  # whole at 1024: no tiles
