"""The "De-LightSAM refine" dock widget: correct a mask by drawing a box around an object.

Image + mask (Labels) pickers (magicgui's layer-typed combo boxes), a write mode and a device.
**Box** adds (or reuses) a Shapes layer ``<image>_delightsam_boxes`` with the rectangle tool
active and starts computing the image's LiteMedSAM embedding in the background. Every rectangle
drawn there becomes a job for a napari ``thread_worker``: ``refine.BoxRefiner.segment_box`` on
the rectangle's slice (a stack: the slice it was drawn on), then, back on the GUI thread, the
object is written into the mask with ``refine.merge_object``:

* binary: the object replaces the mask in its region (its pixels 1; the rest of the foreground
  components it touches inside the box 0, except objects earlier boxes wrote);
* instances: the object's pixels get a new id.

**Refine all** redraws every object the mask already holds on the image's slice (the
prompt-free pass's objects, painted ones too) with LiteMedSAM, each object's bounding box as its
prompt (``refine.refine_objects``: binary mode per connected component, instances mode per id),
in the worker, from a copy of the mask taken when the button is pressed; pixels the user changes
while it runs are left as the user made them. An object LiteMedSAM scores below **Drop below**
(its predicted IoU) is removed instead: for polyps, skin and breast lesions such objects are
mostly stray regions (a fold, a reflection, a shadow). It defaults to
``refine.default_min_score`` (the refiner decoder's own threshold, ``refine.MIN_SCORE_BY_DECODER``)
for a mask the segment widget made for one of ``refine.LESION_MODALITIES`` and to 0 (off)
otherwise (vessel trees, nuclei, lungs, painted masks). On a vessel, nuclei or lung mask
(``refine.REFINE_ALL_LOWERS``, where Refine all measured worse than the prompt-free mask) it asks
first.

**Clicks** adds (or reuses) a Points layer ``<image>_delightsam_clicks`` in add mode: each click
(positive, or negative after T / the "negative clicks" box) redraws the current object from all
its clicks, plus the last box drawn if any (``refine.BoxRefiner.segment_clicks``, one decoder
call), written over the mask as it was before the object's first click (pixels the user changed
since are kept); N / **New object** starts another. A negative click alone (no positive click,
no box) removes the mask region under it.

Only pixels whose centres lie inside a box change (an object drawn from clicks alone is written
whole: ``refine.click_object_region``). Each refinement (one box, or one Refine all)
is one ``Labels.data_setitem`` inside ``Labels.block_history()``: one step of napari's Labels undo.
The boxes used are appended to the mask layer's provenance (``metadata['delightsam']['boxes']``,
written to the export sidecar). Jobs run one at a time in drawing order; the GUI thread never
waits for the model. Bad boxes, unusable images and device errors become notifications
(device errors with **Retry on CPU**).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, PushButton, create_widget

from ..refine import (
    MIN_SCORE_BY_DECODER,
    box_pixels,
    check_box,
    click_object_region,
    default_decoder,
    default_min_score,
    mask_inside_box,
    merge_object,
    negative_regions,
    next_click_boxes,
    refine_all_suits,
    unclaimed_object,
)
from ._llvm import avoid_triton_llvm_clash
from .core import (
    METADATA_KEY,
    InputError,
    device_error_kind,
    fingerprint,
    guard_worker,
    output_names,
    prepare_layer,
    utc_now,
)
from .gc_policy import freeze_long_lived
from .model_cache import ModelCache
from .notify import alive, notify

if TYPE_CHECKING:
    import napari

BOXES_SUFFIX = "_delightsam_boxes"
CLICKS_SUFFIX = "_delightsam_clicks"
#: on the clicks layer: toggle the sign of the next clicks / start a new object
TOGGLE_SIGN_KEY = "t"
NEW_OBJECT_KEY = "n"
POSITIVE_COLOUR, NEGATIVE_COLOUR = "lime", "magenta"
REFINER_SPEC = "litemedsam"
MODES = (("binary: replace the object's region", "binary"), ("instances: add a new id", "instances"))


def _load_refiner(spec: str, device: str) -> Any:
    from ..refine import load_refiner

    avoid_triton_llvm_clash()
    return load_refiner(device)


#: one LiteMedSAM per device for every refine widget of the process
REFINER_CACHE = ModelCache(max_entries=1, loader=_load_refiner)


@dataclass
class RefineJob:
    """One unit of work for the worker: embed a slice (``box`` None) or refine one box."""

    image: weakref.ref
    labels: weakref.ref | None
    prepared: Any  # core.PreparedInput of the image layer
    z: int | None
    box: np.ndarray | None
    device: str
    mode: str = "binary"
    image_name: str = ""
    drawn: dict[str, Any] = field(default_factory=dict)
    #: Refine all: the mask's slice as it was when the button was pressed (else None)
    snapshot: np.ndarray | None = None
    protected: np.ndarray | None = None
    min_score: float | None = None
    #: clicks: (N, 2) (x, y) pixel edges, their labels (1/0), and the box they go with (or None)
    clicks: np.ndarray | None = None
    click_labels: np.ndarray | None = None
    click_box: np.ndarray | None = None
    #: a first click: the mask before it (bool), which its candidates must not swallow (nor, in a field of objects, outgrow)
    click_existing: np.ndarray | None = None

    @property
    def refine_all(self) -> bool:
        return self.snapshot is not None


class RefineWidget(Container):
    """Dock widget: LiteMedSAM box refinement of a De-LightSAM (or any) mask."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, refiner_cache: ModelCache | None = None) -> None:
        import napari.layers

        super().__init__(labels=True)
        avoid_triton_llvm_clash()  # before anything imports the model (see _llvm.py)
        # napari hands plugins a PublicOnlyProxy; keep the real viewer (layer identity, weakrefs)
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.refiner_cache = refiner_cache or REFINER_CACHE
        self.native.setObjectName("DeLightSAMRefineWidget")
        self.image_picker = create_widget(annotation=napari.layers.Image, label="Image")
        self.image_picker.tooltip = "Image the boxes are drawn on (2D grey or RGB, or a stack: the current slice)"
        self.labels_picker = create_widget(annotation=napari.layers.Labels, label="Mask")
        self.labels_picker.tooltip = "Labels layer the refined objects are written into"
        self.mode_combo = ComboBox(label="Write", choices=MODES, value="binary")
        self.mode_combo.tooltip = (
            "binary: the object replaces the mask in its region (inside the box only); "
            "instances: the object gets a new label id"
        )
        self.device_combo = ComboBox(label="Device", choices=_device_choices(), value="auto")
        self.box_button = PushButton(text="Box")
        self.box_button.tooltip = "Add a boxes layer with the rectangle tool; each rectangle refines one object"
        self.clicks_button = PushButton(text="Clicks")
        self.clicks_button.tooltip = (
            "Add a clicks layer: each click (positive: in the object; negative: not in it) redraws the object "
            "from all its clicks, and from the last box drawn if there is one; T toggles the sign, N starts a "
            "new object"
        )
        self.negative_check = CheckBox(text="negative clicks (T)", value=False)
        self.new_object_button = PushButton(text="New object (N)")
        self.score_spin = FloatSpinBox(label="Drop below", min=0.0, max=1.0, step=0.05, value=0.0)
        self.score_spin.tooltip = (
            "Refine all removes an object whose LiteMedSAM score (predicted IoU) is below this; 0 keeps every "
            "object. Defaults, for masks the segment widget made: "
            + ", ".join(f"{m} {v:g}" for m, v in MIN_SCORE_BY_DECODER["tuned"].items())
            + " with the tuned decoder ("
            + ", ".join(f"{m} {v:g}" for m, v in MIN_SCORE_BY_DECODER["litemedsam"].items())
            + " with LiteMedSAM's own); 0 otherwise"
        )
        self.all_button = PushButton(text="Refine all")
        self.all_button.tooltip = (
            "Redraw every object already in the mask (this slice) with LiteMedSAM, its bounding box as the "
            "prompt; one undo step"
        )
        self.status = Label(value="Pick the image and its mask, press Box, draw a rectangle around an object.")
        self.extend([self.image_picker, self.labels_picker, self.mode_combo, self.device_combo,
                     self.box_button, self.clicks_button, self.negative_check, self.new_object_button,
                     self.score_spin, self.all_button, self.status])
        self.status.native.setWordWrap(True)

        self._queue: deque[RefineJob] = deque()
        self._worker: Any = None
        self._job: RefineJob | None = None
        self._progress: Any = None
        self._sessions: dict[int, tuple[weakref.ref, weakref.ref, weakref.ref]] = {}
        self._seen: dict[int, int] = {}
        self._protected: dict[int, tuple[weakref.ref, np.ndarray, Any]] = {}
        self.refinements = 0  # refinements written (for tests and the status line)
        self._job_started_status = ""

        self.box_button.changed.connect(self.start_boxes)
        self.clicks_button.changed.connect(self.start_clicks)
        self.negative_check.changed.connect(self._on_sign_changed)
        self.new_object_button.changed.connect(self.new_object)
        #: per clicks layer: the object being clicked (see _click_state)
        self._click_objects: dict[int, dict[str, Any]] = {}
        #: the last box drawn (image layer, its data then -- both weakly --, box, slice): clicks that
        #: follow are added to it while the layer shows the same data
        self._last_box: tuple[weakref.ref, Any, np.ndarray, int | None] | None = None
        self.click_seconds: list[float] = []  # worker time per click (for the benchmark line and tests)
        self.all_button.changed.connect(self.refine_all)
        self.image_picker.changed.connect(self._on_image_changed)
        self.labels_picker.changed.connect(self._on_labels_changed)
        for name in ("inserted", "removed", "moved", "reordered"):
            emitter = getattr(self.viewer.layers.events, name, None)
            if emitter is not None:
                emitter.connect(self.reset_choices)
        state: dict[str, Any] = {"worker": None}
        self._worker_box = state
        # stop the worker when the dock goes away; the closure must not hold `self`
        self.native.destroyed.connect(lambda *_: _quit(state))
        #: compute the picked image's embedding in the background as soon as it is picked (the
        #: widget opens, or another image is chosen), so the first box or click does not wait for it
        self.prefetch = True
        self.reset_choices()
        self._on_image_changed(self.image_picker.value)  # the pickers may be filled already
        self._on_labels_changed(self.labels_picker.value)

    # -- pickers ---------------------------------------------------------------------------------

    def reset_choices(self, *_: Any) -> None:
        if not alive(self):
            return
        super().reset_choices()
        image = self.image_picker.value
        if image is not None and image.metadata.get(METADATA_KEY, {}).get("kind") in ("heatmap", "probability"):
            # our own heatmap/probability maps are listed too; prefer a real image
            for choice in self.image_picker.choices:
                if choice.metadata.get(METADATA_KEY, {}).get("kind") not in ("heatmap", "probability"):
                    self.image_picker.value = choice
                    break

    def _on_image_changed(self, image: Any) -> None:
        """Suggest the image's De-LightSAM mask (the newest ``<image>_delightsam_mask[ [k]]``)."""
        if image is None:
            return
        base = output_names(image.name)["mask"]
        candidates = [c for c in self.labels_picker.choices if c.name == base or c.name.startswith(base + " [")]
        if candidates:
            self.labels_picker.value = candidates[-1]
        self.prefetch_embedding(image)

    def prefetch_embedding(self, image: Any = None) -> RefineJob | None:
        """Queue the embedding of ``image`` (default: the picked one; a stack: its current slice)
        in the worker, with the decoder's per-image tensors (``BoxRefiner.prepare_prompts``), unless
        ``prefetch`` is off, the image cannot be used, or the same embedding is already queued."""
        image = self.image_picker.value if image is None else image
        if not self.prefetch or image is None or not alive(self):
            return None
        try:
            prepared = prepare_layer(image)
        except InputError:
            return None  # the Box / Clicks buttons say why
        z = self._current_slice(image) if prepared.stack else None
        device = self.device_combo.value
        for job in [*self._queue, *([self._job] if self._job is not None else [])]:
            if (job.box is None and job.clicks is None and not job.refine_all and job.image() is image
                    and job.z == z and job.device == device):
                return None
        job = RefineJob(weakref.ref(image), None, prepared, z, None, device, image_name=image.name,
                        drawn={"prefetch": True})
        self._submit(job)
        return job

    def _on_labels_changed(self, labels: Any) -> None:
        record = (labels.metadata.get(METADATA_KEY, {}) or {}) if labels is not None else {}
        if record.get("instances"):
            self.mode_combo.value = "instances"
        self.score_spin.value = default_min_score(record.get("modality_used"), default_decoder())

    def _set_status(self, text: str) -> None:
        if alive(self):
            self.status.value = text

    # -- Box: the shapes layer -------------------------------------------------------------------

    def _check_pair(self) -> tuple[Any, Any, Any] | None:
        image, labels = self.image_picker.value, self.labels_picker.value
        if image is None:
            notify("warning", "no image layer: open an image first")
            return None
        if labels is None:
            notify("warning", "no mask (Labels) layer: run De-LightSAM segment first or add a Labels layer")
            return None
        try:
            prepared = prepare_layer(image)
        except InputError as exc:
            notify("error", str(exc))
            return None
        if tuple(labels.data.shape) != tuple(prepared.output_shape):
            notify("error", f"mask '{labels.name}' has shape {tuple(labels.data.shape)} but image '{image.name}' "
                            f"is {tuple(prepared.output_shape)}; choose the image's own mask")
            return None
        return image, labels, prepared

    def start_boxes(self, *_: Any) -> Any:
        """The Box button: the image's boxes layer with the rectangle tool, embedding started."""
        checked = self._check_pair()
        if checked is None:
            return None
        image, labels, prepared = checked
        shapes = self._boxes_layer(image, prepared)
        self._sessions[id(shapes)] = (weakref.ref(shapes), weakref.ref(image), weakref.ref(labels))
        self.viewer.layers.selection.active = shapes
        shapes.mode = "add_rectangle"
        z = self._current_slice(image) if prepared.stack else None
        self._submit(RefineJob(weakref.ref(image), None, prepared, z, None, self.device_combo.value,
                               image_name=image.name))
        self._set_status(f"Draw a rectangle around an object in '{image.name}'; it is written into '{labels.name}'.")
        return shapes

    def refine_all(self, *_: Any) -> RefineJob | None:
        """The Refine all button: every object of the mask's current slice, redrawn in the worker."""
        checked = self._check_pair()
        if checked is None:
            return None
        image, labels, prepared = checked
        z = self._current_slice(image) if prepared.stack else None
        lead = () if z is None else (z,)
        snapshot = np.array(labels.data[lead] if lead else labels.data)  # a private copy
        if not snapshot.any():
            notify("warning", f"'{labels.name}' has no objects here to refine: segment first, or draw boxes")
            return None
        modality = (labels.metadata.get(METADATA_KEY, {}) or {}).get("modality_used")
        if not refine_all_suits(modality) and not self._confirm_refine_all(labels.name, modality):
            self._set_status(f"Refine all not run on '{labels.name}' ({modality}).")
            return None
        protected = np.array(self._protected_for(labels)[lead] if lead else self._protected_for(labels))
        job = RefineJob(weakref.ref(image), weakref.ref(labels), prepared, z, None, self.device_combo.value,
                        mode=self.mode_combo.value, image_name=image.name, drawn={"refine_all": True, "slice": z},
                        snapshot=snapshot, protected=protected, min_score=float(self.score_spin.value) or None)
        self._submit(job)
        return job

    def _confirm_refine_all(self, name: str, modality: str) -> bool:
        """Ask before Refine all on a mask of a modality where it measured worse (vessels,
        nuclei, lungs: ``refine.REFINE_ALL_LOWERS``); No is the default."""
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self.native, "Refine all?",
            f"'{name}' is a {modality} mask. Refine all redraws each object from its bounding box, and on "
            f"{modality} masks that lowered Dice on the validation split: the prompt-free model draws vessels, "
            "nuclei and lungs better than LiteMedSAM does from their boxes (see the model card).\n\n"
            "Refine all the same? (It is one undo step of the mask layer: Ctrl+Z.)",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _boxes_layer(self, image: Any, prepared: Any) -> Any:
        from napari.layers import Shapes

        name = f"{image.name}{BOXES_SUFFIX}"
        for layer in self.viewer.layers:
            if isinstance(layer, Shapes) and layer.name == name and layer.ndim == image.ndim:
                break
        else:
            layer = self.viewer.add_shapes(
                ndim=image.ndim, name=name, scale=image.scale, translate=image.translate,
                edge_color="yellow", face_color="transparent", edge_width=_box_edge_width(prepared.plane_shape),
                metadata={METADATA_KEY: {"kind": "boxes", "image": image.name}},
            )
        if id(layer) not in self._seen:
            self._seen[id(layer)] = len(layer.data)
            ref = weakref.ref(layer)
            layer.events.data.connect(lambda event: self._on_shapes_data(ref, event))
        return layer

    def _current_slice(self, image: Any) -> int:
        point = image.world_to_data(self.viewer.dims.point[-image.ndim:] if image.ndim else ())
        return int(np.clip(round(float(point[0])), 0, image.data.shape[0] - 1))

    def _on_shapes_data(self, ref: weakref.ref, event: Any) -> None:
        shapes = ref()
        if shapes is None or not alive(self):
            return
        action = str(getattr(event, "action", "added"))
        if action not in ("added", "removed"):
            return
        seen = self._seen.get(id(shapes), 0)
        count = len(shapes.data)
        self._seen[id(shapes)] = count
        if action == "removed" or count <= seen:
            return
        for index in range(seen, count):
            self._on_rectangle(shapes, index)

    def _on_rectangle(self, shapes: Any, index: int) -> None:
        session = self._sessions.get(id(shapes))
        refs = [r() for r in session] if session else [None, None, None]
        _, image, labels = refs
        if image is None or labels is None or image not in self.viewer.layers or labels not in self.viewer.layers:
            notify("warning", "the image or mask of this boxes layer is gone; press Box again")
            return
        if shapes.shape_type[index] != "rectangle":
            notify("warning", f"only rectangles refine objects; the {shapes.shape_type[index]} was ignored")
            return
        try:
            prepared = prepare_layer(image)
            box, z = rectangle_to_box(shapes, index, image, prepared)
        except (InputError, ValueError) as exc:
            notify("warning", f"box ignored: {exc}")
            return
        drawn = {"box": [round(float(v), 2) for v in box], "slice": z, "shape_index": index}
        # clicks from now on are added to this box -- on this image: the layer and its data (the
        # annotate panel shows the next image in the same layer)
        self._last_box = (weakref.ref(image), _weak_data(image.data), box, z)
        self._reset_click_objects()
        self._submit(RefineJob(weakref.ref(image), weakref.ref(labels), prepared, z, box, self.device_combo.value,
                               mode=self.mode_combo.value, image_name=image.name, drawn=drawn))

    # -- Clicks: the points layer -----------------------------------------------------------------

    def start_clicks(self, *_: Any) -> Any:
        """The Clicks button: the image's clicks layer in add mode, embedding started."""
        checked = self._check_pair()
        if checked is None:
            return None
        image, labels, prepared = checked
        points = self._clicks_layer(image)
        self._sessions[id(points)] = (weakref.ref(points), weakref.ref(image), weakref.ref(labels))
        self.viewer.layers.selection.active = points
        points.mode = "add"
        self._on_sign_changed(self.negative_check.value)
        z = self._current_slice(image) if prepared.stack else None
        self._submit(RefineJob(weakref.ref(image), None, prepared, z, None, self.device_combo.value,
                               image_name=image.name))
        self._set_status(f"Click in an object of '{image.name}' (T: negative clicks, N: new object); it is written "
                         f"into '{labels.name}'.")
        return points

    def _clicks_layer(self, image: Any) -> Any:
        from napari.layers import Points

        name = f"{image.name}{CLICKS_SUFFIX}"
        for layer in self.viewer.layers:
            if isinstance(layer, Points) and layer.name == name and layer.ndim == image.ndim:
                break
        else:
            layer = self.viewer.add_points(
                np.zeros((0, image.ndim)), ndim=image.ndim, name=name, scale=image.scale, translate=image.translate,
                features={"positive": np.zeros(0, dtype=bool)}, face_color=POSITIVE_COLOUR, border_color="black",
                size=_click_size(_plane_shape(image)),
                metadata={METADATA_KEY: {"kind": "clicks", "image": image.name}},
            )
            ref = weakref.ref(self)
            layer.bind_key(TOGGLE_SIGN_KEY, partial(_call, ref, "toggle_sign"), overwrite=True)
            layer.bind_key(NEW_OBJECT_KEY, partial(_call, ref, "new_object"), overwrite=True)
        if id(layer) not in self._seen:
            self._seen[id(layer)] = len(layer.data)
            ref_layer = weakref.ref(layer)
            layer.events.data.connect(lambda event: self._on_points_data(ref_layer, event))
        return layer

    def toggle_sign(self) -> None:
        """T on the clicks layer: the next clicks are negative (or positive again)."""
        if alive(self):
            self.negative_check.value = not self.negative_check.value

    def _on_sign_changed(self, negative: bool) -> None:
        from napari.layers import Points

        for layer in self.viewer.layers:
            if isinstance(layer, Points) and (layer.metadata.get(METADATA_KEY, {}) or {}).get("kind") == "clicks":
                layer.feature_defaults = {"positive": not negative}
                layer.current_face_color = NEGATIVE_COLOUR if negative else POSITIVE_COLOUR
        self._set_status(f"Next clicks are {'negative (not in the object)' if negative else 'positive (in the object)'}.")

    def _reset_click_objects(self) -> None:
        self._click_objects.clear()

    def new_object(self, *_: Any) -> None:
        """N on the clicks layer (or the button): the next clicks describe a new object, without a box."""
        from napari.layers import Points

        self._click_objects.clear()
        self._last_box = None
        for layer in self.viewer.layers:
            if isinstance(layer, Points) and (layer.metadata.get(METADATA_KEY, {}) or {}).get("kind") == "clicks":
                self._seen[id(layer)] = 0
                layer.data = np.zeros((0, layer.ndim))
                self._seen[id(layer)] = 0
        self._set_status("New object: click in it (the clicks of the previous one stay in the mask).")

    def _on_points_data(self, ref: weakref.ref, event: Any) -> None:
        points = ref()
        if points is None or not alive(self):
            return
        count = len(points.data)
        seen = self._seen.get(id(points), 0)
        self._seen[id(points)] = count
        if str(getattr(event, "action", "added")) != "added" or count <= seen:
            return
        self._on_click(points, count - 1)

    def _on_click(self, points: Any, index: int) -> None:
        session = self._sessions.get(id(points))
        refs = [r() for r in session] if session else [None, None, None]
        _, image, labels = refs
        if image is None or labels is None or image not in self.viewer.layers or labels not in self.viewer.layers:
            notify("warning", "the image or mask of this clicks layer is gone; press Clicks again")
            return
        try:
            prepared = prepare_layer(image)
        except InputError as exc:
            notify("warning", f"click ignored: {exc}")
            return
        positive = not bool(self.negative_check.value)
        features = points.features
        if "positive" in features and len(features) == len(points.data):
            features.loc[features.index[index], "positive"] = positive
            points.features = features
        colours = np.asarray(points.face_color).copy()
        if len(colours) == len(points.data):
            from napari.utils.colormaps.standardize_color import transform_color

            colours[index] = transform_color(POSITIVE_COLOUR if positive else NEGATIVE_COLOUR)[0]
            points.face_color = colours
        world = points.data_to_world(np.asarray(points.data[index], dtype=np.float64))
        data = np.asarray(image.world_to_data(world), dtype=np.float64)
        row, col = data[-2], data[-1]
        z = int(round(float(data[0]))) if prepared.stack else None
        h, w = prepared.plane_shape
        if not (-0.5 <= row < h - 0.5 and -0.5 <= col < w - 0.5) or (z is not None and not 0 <= z < prepared.n_slices):
            notify("warning", "click ignored: it lies outside the image")
            return
        state = self._click_state(points, labels, z)
        state["clicks"].append((col + 0.5, row + 0.5))
        state["labels"].append(1 if positive else 0)
        clicks = np.asarray(state["clicks"], dtype=np.float64)
        click_labels = np.asarray(state["labels"], dtype=np.int64)
        if state["box"] is None and not click_labels.any():
            self._erase_under(labels, state, col + 0.5, row + 0.5)
            return
        # the clicks move the box they go with -- the box drawn before them, else the one the last
        # click used -- tried beside the extent of the object's last mask (refine.next_click_boxes;
        # after a drawn box, before its first click, the mask the box wrote inside it)
        if state["box"] is not None:
            last = state["object"] if state["object"] is not None else mask_inside_box(state["snapshot"] != 0, state["box"])
            box = next_click_boxes(state["box"], last, clicks, click_labels, largest_region_without_positive=True)
        else:
            box = next_click_boxes(state["chosen"], state["object"], clicks, click_labels)
        drawn = {"clicks": [[round(float(x), 2), round(float(y), 2), int(s)] for (x, y), s in zip(clicks, click_labels,
                                                                                               strict=True)],
                 "slice": z, "box": None if state["box"] is None else [round(float(v), 2) for v in state["box"]]}
        self._submit(RefineJob(weakref.ref(image), weakref.ref(labels), prepared, z, None, self.device_combo.value,
                               mode=self.mode_combo.value, image_name=image.name, drawn=drawn, clicks=clicks,
                               click_labels=click_labels, click_box=None if box is None else np.asarray(box),
                               click_existing=state["snapshot"] != 0 if box is None else None))

    def _click_state(self, points: Any, labels: Any, z: int | None) -> dict[str, Any]:
        """The object the clicks of ``points`` describe: its clicks, the mask slice before its first
        click (``snapshot``), what the clicks last wrote (``last``), its box (the last box drawn on
        this image and slice, else None), the box its last click used (``chosen``) and the object's
        mask from its last click (``object``)."""
        state = self._click_objects.get(id(points))
        if (state is not None and state["labels_layer"]() is labels and state["z"] == z
                and state["data"]() is labels.data):
            return state
        lead = () if z is None else (z,)
        plane = np.array(labels.data[lead] if lead else labels.data)
        box = None
        if self._last_box is not None:
            image_ref, data_ref, last, last_z = self._last_box
            session = self._sessions.get(id(points))
            image = session[1]() if session is not None else None
            if image is not None and image_ref() is image and data_ref() is image.data and last_z == z:
                box = np.asarray(last, dtype=np.float64)
        value = int(np.asarray(labels.data).max()) + 1 if self.mode_combo.value == "instances" else 1
        state = {"labels_layer": weakref.ref(labels), "data": _weak_data(labels.data), "z": z, "snapshot": plane, "last": plane.copy(), "box": box,
                 "chosen": None, "object": None, "clicks": [], "labels": [], "value": value}
        self._click_objects[id(points)] = state
        return state

    def _erase_under(self, labels: Any, state: dict[str, Any], x: float, y: float) -> None:
        """A negative click with no positive click and no box: the mask's region under it goes
        (binary: its connected component; instances: its id), as one undo step."""
        from skimage.measure import label as connected

        lead = () if state["z"] is None else (state["z"],)
        current = np.asarray(labels.data[lead] if lead else labels.data)
        r, c = min(int(y), current.shape[0] - 1), min(int(x), current.shape[1] - 1)
        if current[r, c] == 0:
            self._set_status("Negative click on background: nothing to remove (click positive in an object first).")
            return
        if self.mode_combo.value == "instances":
            region = current == current[r, c]
        else:
            comps = connected(current != 0, connectivity=2)
            region = comps == comps[r, c]
        rr, cc = np.nonzero(region)
        index = (*(np.full(len(rr), v) for v in lead), rr, cc)
        with labels.block_history():
            labels.data_setitem(index, 0)
        state["snapshot"] = np.array(labels.data[lead] if lead else labels.data)
        state["last"] = state["snapshot"].copy()
        state["clicks"].clear()
        state["labels"].clear()
        self.refinements += 1
        self._set_status(f"Removed the region under the negative click ({len(rr)} pixels); Ctrl+Z undoes it.")

    def write_clicks(self, labels: Any, job: RefineJob, result: dict[str, Any]) -> int:
        """Write the object the clicks gave (``result['clicked']``: mask, score, box used) into
        ``labels`` as one undo step: the mask as it was before the object's first click, with the
        object merged inside the box used (``merge_object``); pixels the user changed since are
        kept. Returns the number of pixels changed."""
        obj, score, used = result["clicked"]
        state = next((s for s in self._click_objects.values() if s["labels_layer"]() is labels and s["z"] == job.z
                      and s["data"]() is labels.data), None)
        if state is None:  # the object was closed (New object) while this click ran
            return 0
        if state["box"] is None:
            state["chosen"] = np.asarray(used, dtype=np.float64)
            state["object"] = np.asarray(obj, dtype=bool)
        lead: tuple[int, ...] = () if job.z is None else (int(job.z),)
        snapshot = state["snapshot"]
        if tuple(labels.data.shape[len(lead):]) != snapshot.shape or tuple(obj.shape) != snapshot.shape:
            notify("error", f"'{labels.name}' no longer matches the image; the click was not applied")
            return 0
        # the object's region: the box the clicks used and, when they follow a drawn box, that box
        # (what the box wrote may lie outside the box the clicks moved); with no box drawn, all of
        # the decoder's mask (it reaches beyond the candidate square the clicks used)
        region = np.asarray(used, dtype=np.float64)
        if state["box"] is None:
            region = click_object_region(used, obj)
        else:
            drawn = np.asarray(state["box"], dtype=np.float64)
            region = np.concatenate([np.minimum(region[:2], drawn[:2]), np.maximum(region[2:], drawn[2:])])
        rows, cols = box_pixels(region, snapshot.shape)
        if state["box"] is not None:  # what the clicks wrote: the next click's mask extent
            state["object"] = np.zeros(snapshot.shape, dtype=bool)
            state["object"][rows, cols] = obj[rows, cols]
        target = snapshot.copy()
        target[rows, cols] = merge_object(snapshot[rows, cols], obj[rows, cols], mode=job.mode, value=state["value"])
        # a negative click takes away the region of the mask under it (that holds no positive click)
        inside = np.zeros(snapshot.shape, dtype=bool)
        inside[rows, cols] = (target[rows, cols] != 0) if job.mode == "binary" else (target[rows, cols] == state["value"])
        # ... but not the object itself when no positive click lies on it (refine.unclaimed_object)
        keep = unclaimed_object(np.where(inside, obj, False), job.clicks, job.click_labels)
        target[negative_regions(inside, job.clicks, job.click_labels, keep)] = 0
        current = np.asarray(labels.data[lead] if lead else labels.data)
        ours = current == state["last"]  # pixels the user did not change since the last click
        changed = (target != current) & ours
        n = int(np.count_nonzero(changed))
        if n:
            r, c = np.nonzero(changed)
            index = (*(np.full(n, v) for v in lead), r, c)
            with labels.block_history():  # one undo step per click
                labels.data_setitem(index, target[changed])
            self.refinements += 1
        state["last"] = np.where(ours, target, current)
        self._record(labels, RefineJob(job.image, job.labels, job.prepared, job.z, None, job.device, mode=job.mode,
                                       image_name=job.image_name,
                                       drawn={**job.drawn, "score": round(float(score), 4),
                                              "box_used": [round(float(v), 2) for v in used]}),
                     state["value"], n, result["model"])
        return n

    # -- the worker ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._worker is not None

    @property
    def pending(self) -> int:
        return len(self._queue) + (1 if self._worker is not None else 0)

    def _submit(self, job: RefineJob) -> None:
        self._queue.append(job)
        self._pump()

    def _pump(self) -> None:
        if self._worker is not None or not self._queue or not alive(self):
            return
        from napari.qt.threading import create_worker

        job = self._queue.popleft()
        self._job = job
        # errors are ours to report (notifications), not tracebacks re-raised in the GUI thread
        worker = create_worker(_guarded_job, self.refiner_cache, job.prepared, job.z, job.box, job.device,
                               job.snapshot, job.mode, job.protected, job.min_score, job.clicks,
                               job.click_labels, job.click_box, job.click_existing, _start_thread=False,
                               _ignore_errors=True)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(lambda result, job=job: self._on_returned(job, result))
        worker.errored.connect(lambda exc, job=job: self._on_errored(job, exc))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._worker_box["worker"] = worker
        self._job_started_status = self.status.value
        if job.box is not None:
            self._set_status(f"Refining the box {job.drawn.get('box')}…")
        elif job.refine_all:
            self._set_status(f"Refining every object of the mask of '{job.image_name}'…")
        freeze_long_lived(self.viewer)
        worker.start()

    def _on_yielded(self, item: tuple) -> None:
        if not alive(self) or self._job is None:
            return
        if self._job.drawn.get("prefetch") and self.status.value != self._job_started_status:
            return  # a background embedding never overwrites a newer message
        if item[0] == "loading":
            self._set_status(f"Loading LiteMedSAM on {item[1]}…")
            self._job_started_status = self.status.value
        elif item[0] == "embedding":
            what = f"slice {self._job.z} of '{self._job.image_name}'" if self._job.z is not None else f"'{self._job.image_name}'"
            self._set_status(f"Computing the LiteMedSAM image embedding of {what} (once per image; "
                             "later boxes reuse it)…")
            self._job_started_status = self.status.value  # our own message (see _on_returned)
            from napari.utils import progress

            self._close_progress()
            self._progress = progress(total=0, desc=f"De-LightSAM refine: embedding {what}")

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _on_finished(self) -> None:
        self._worker = None
        self._worker_box["worker"] = None
        self._job = None
        self._close_progress()
        if alive(self):
            self._pump()

    def _on_errored(self, job: RefineJob, exc: BaseException) -> None:
        if not alive(self):
            return
        original = getattr(exc, "original", exc)
        kind = device_error_kind(original)
        if kind is not None and job.device != "cpu":
            self._set_status(f"{kind} on {job.device}; you can retry on the CPU.")
            notify("error", f"{kind} on device '{job.device}' ({original}). Retry on the CPU?",
                   actions=(("Retry on CPU", lambda *_, job=job: self.retry_on_cpu(job)),))
            return
        self._set_status(f"Failed: {original}")
        notify("error", f"box refinement of '{job.image_name}' failed: {original}")

    def retry_on_cpu(self, job: RefineJob) -> None:
        """The device-error fallback: the same job (and later ones) on the CPU."""
        if not alive(self):
            return
        self.device_combo.value = "cpu"
        job.device = "cpu"
        for queued in self._queue:
            queued.device = "cpu"
        self._queue.appendleft(job)
        self._pump()

    def _on_returned(self, job: RefineJob, result: dict[str, Any]) -> None:
        if not alive(self):
            return
        if job.clicks is not None:
            self.click_seconds.append(float(result["seconds"]))
            labels = job.labels() if job.labels is not None else None
            if labels is None or labels not in self.viewer.layers:
                notify("warning", "the mask layer was removed while refining; the click was not applied")
                return
            changed = self.write_clicks(labels, job, result)
            took = f"{result['seconds']:.2f} s" + (" incl. the image embedding" if result["embedded"] else "")
            self._set_status(f"Clicks: {changed} pixels of '{labels.name}' changed ({took}); next click "
                             f"{'negative' if self.negative_check.value else 'positive'} (T toggles, N: new object).")
            return
        if job.box is None and not job.refine_all:
            if job.drawn.get("prefetch") and self._job_started_status != self.status.value:
                return  # computed in the background; the status line says something newer
            self._set_status(f"Ready: boxes on '{job.image_name}' now reuse its embedding "
                             f"({result['seconds']:.2f} s).")
            return
        labels = job.labels() if job.labels is not None else None
        if labels is None or labels not in self.viewer.layers:
            notify("warning", "the mask layer was removed while refining; the box was not applied")
            return
        took = f"{result['seconds']:.2f} s" + (" incl. the image embedding" if result["embedded"] else "")
        if job.refine_all:
            changed = self.write_refined(labels, result["refined"], job, result["model"])
            refined = result["refined"]
            dropped = sum(refined.removed)
            what = f"{len(refined.boxes) - dropped} object(s) refined" + (
                f", {dropped} removed (score < {job.min_score:g})" if dropped else ""
            )
            self._set_status(f"{what}: {changed} pixels of '{labels.name}' changed ({took}); Ctrl+Z in the "
                             "mask layer undoes it.")
            return
        changed = self.write_object(labels, result["mask"], job, result["model"])
        if changed == 0:
            self._set_status(f"No change: LiteMedSAM found no new object pixels in the box ({took}).")
            notify("info", "the box found no object pixels to add or replace; the mask is unchanged")
        else:
            self._set_status(f"Refined: {changed} pixels of '{labels.name}' changed ({took}); Ctrl+Z in the "
                             "mask layer undoes it.")

    # -- writing into the mask -------------------------------------------------------------------

    def write_object(self, labels: Any, obj: np.ndarray, job: RefineJob, model: dict[str, Any]) -> int:
        """Merge ``obj`` (the slice's (H,W) bool object) into ``labels`` as one undo step;
        returns the number of pixels changed."""
        assert job.box is not None
        lead: tuple[int, ...] = () if job.z is None else (int(job.z),)
        plane_shape = tuple(labels.data.shape[len(lead):])
        if tuple(obj.shape) != plane_shape or (lead and not 0 <= lead[0] < labels.data.shape[0]):
            notify("error", f"'{labels.name}' no longer matches the image (shape {tuple(labels.data.shape)}); "
                            "the box was not applied")
            return 0
        rows, cols = box_pixels(job.box, plane_shape)
        current = np.asarray(labels.data[(*lead, rows, cols)])
        crop = np.asarray(obj[rows, cols], dtype=bool)
        if not crop.any():
            return 0
        protected_full = self._protected_for(labels)
        protected = protected_full[(*lead, rows, cols)]
        if job.mode == "instances":
            value = int(np.asarray(labels.data).max()) + 1
        else:
            value = 1
        dtype = np.asarray(current).dtype
        if dtype.kind in "ui" and value > np.iinfo(dtype).max:
            notify("error", f"'{labels.name}' ({dtype}) has no free label id above {value - 1}; "
                            "the box was not applied")
            return 0
        new = merge_object(current, crop, mode=job.mode, value=value, protected=protected)
        changed = new != current
        n = int(np.count_nonzero(changed))
        if n:
            r, c = np.nonzero(changed)
            index = (*(np.full(n, v) for v in lead), r + rows.start, c + cols.start)
            with labels.block_history():  # one undo step
                labels.data_setitem(index, new[changed])
            protected_full[(*lead, rows, cols)] |= crop
            self.refinements += 1
        self._record(labels, job, value, n, model)
        return n

    def write_refined(self, labels: Any, refined: Any, job: RefineJob, model: dict[str, Any]) -> int:
        """Write a Refine all result (``refine.RefinedObjects`` of the slice) into ``labels`` as one
        undo step, except pixels the user changed since the snapshot; returns pixels changed."""
        assert job.snapshot is not None
        lead: tuple[int, ...] = () if job.z is None else (int(job.z),)
        if tuple(labels.data.shape[len(lead):]) != tuple(job.snapshot.shape) or (
            lead and not 0 <= lead[0] < labels.data.shape[0]
        ):
            notify("error", f"'{labels.name}' no longer matches the image (shape {tuple(labels.data.shape)}); "
                            "the refinement was not applied")
            return 0
        current = np.asarray(labels.data[lead] if lead else labels.data)
        untouched = current == job.snapshot  # the user's edits made meanwhile win
        changed = (refined.labels != job.snapshot) & untouched
        n = int(np.count_nonzero(changed))
        if n:
            r, c = np.nonzero(changed)
            index = (*(np.full(n, v) for v in lead), r, c)
            with labels.block_history():  # one undo step
                labels.data_setitem(index, refined.labels[changed])
            protected_full = self._protected_for(labels)
            (protected_full[lead] if lead else protected_full)[refined.written & untouched] = True
            self.refinements += 1
        meta = dict(labels.metadata or {})
        record = dict(meta.get(METADATA_KEY, {}) or {})
        record["boxes"] = [*list(record.get("boxes", []) or []), {
            "refine_all": True,
            "slice": job.z,
            "object_boxes": [[round(float(v), 2) for v in b] for b in refined.boxes],
            "mode": job.mode,
            "labels": list(refined.values),
            "scores": [round(float(q), 4) for q in refined.scores],
            "min_score": job.min_score,
            "removed": [i for i, r in enumerate(refined.removed) if r],
            "pixels_changed": n,
            "image_layer": job.image_name,
            "time": utc_now(),
        }]
        record["box_model"] = model
        meta[METADATA_KEY] = record
        labels.metadata = meta
        return n

    def _protected_for(self, labels: Any) -> np.ndarray:
        """Pixels refinements wrote into ``labels``; forgotten when the layer's data is replaced
        (``layer.data = ...``: another image's mask, e.g. the annotate widget's next image)."""
        ref, arr, data = self._protected.get(id(labels), (None, None, None))
        if (ref is None or ref() is not labels or arr is None or arr.shape != tuple(labels.data.shape)
                or data is None or data() is not labels.data):
            arr = np.zeros(labels.data.shape, dtype=bool)
            self._protected[id(labels)] = (weakref.ref(labels), arr, _weak_data(labels.data))
        return arr

    def _record(self, labels: Any, job: RefineJob, value: int, changed: int, model: dict[str, Any]) -> None:
        meta = dict(labels.metadata or {})
        record = dict(meta.get(METADATA_KEY, {}) or {})
        boxes = list(record.get("boxes", []) or [])
        boxes.append({
            **job.drawn,
            "mode": job.mode,
            "label": value,
            "pixels_changed": changed,
            "image_layer": job.image_name,
            "time": utc_now(),
        })
        record["boxes"] = boxes
        record["box_model"] = model
        meta[METADATA_KEY] = record
        labels.metadata = meta


def rectangle_to_box(shapes: Any, index: int, image: Any, prepared: Any) -> tuple[np.ndarray, int | None]:
    """(box in the image's pixel-edge coordinates, slice index or None) of ``shapes.data[index]``.

    napari puts pixel centres on integer data coordinates, so an edge is a coordinate + 0.5.
    ``ValueError`` for a box refine cannot use (``refine.check_box``) or a slice outside the stack.
    """
    vertices = np.asarray(shapes.data[index], dtype=np.float64)
    world = np.array([shapes.data_to_world(v) for v in vertices])
    data = np.array([image.world_to_data(w) for w in world])
    rows, cols = data[:, -2], data[:, -1]
    box = np.array([cols.min() + 0.5, rows.min() + 0.5, cols.max() + 0.5, rows.max() + 0.5])
    z = None
    if prepared.stack:
        zs = np.round(data[:, 0]).astype(int)
        z = int(zs[0])
        if not 0 <= z < prepared.n_slices:
            raise ValueError(f"the rectangle is on slice {z}, outside the {prepared.n_slices}-slice stack")
    check_box(box, prepared.plane_shape)  # the one-line ValueError for a bad box
    return box, z


def _refine_job(
    cache: ModelCache,
    prepared: Any,
    z: int | None,
    box: np.ndarray | None,
    device: str,
    snapshot: np.ndarray | None = None,
    mode: str = "binary",
    protected: np.ndarray | None = None,
    min_score: float | None = None,
    clicks: np.ndarray | None = None,
    click_labels: np.ndarray | None = None,
    click_box: np.ndarray | None = None,
    click_existing: np.ndarray | None = None,
):
    """Worker body (off the GUI thread): load/reuse LiteMedSAM, embed the slice if it is new,
    segment the box, or every object of ``snapshot`` (Refine all). Returns {"mask", "refined",
    "embedded", "seconds", "model"}."""
    import time

    from ..refine import refine_objects

    start = time.perf_counter()
    if not cache.is_loaded(REFINER_SPEC, device):
        yield ("loading", device)
    refiner = cache.get(REFINER_SPEC, device)
    plane = np.array(prepared.plane(z if z is not None else 0))  # a private copy of the slice
    key = fingerprint(plane)
    with refiner.lock:  # one refiner may serve several widgets
        embedded = refiner.image_id != key
        if embedded:
            yield ("embedding",)
            refiner.set_image(plane, image_id=key)
        if box is None and clicks is None and snapshot is None and hasattr(refiner, "prepare_prompts"):
            refiner.prepare_prompts()  # an embedding job: the decoder's per-image tensors too (cached)
        mask = refiner.segment_box(box) if box is not None else None
        clicked = (refiner.segment_clicks(clicks, click_labels, click_box, existing=click_existing)
                   if clicks is not None else None)
        refined = (
            refine_objects(refiner, snapshot, mode=mode, protected=protected, min_score=min_score)
            if snapshot is not None
            else None
        )
    model = {
        **{k: v for k, v in getattr(refiner, "weights", {}).items() if k != "conv_bn_fused"},
        "device": str(getattr(refiner, "device", device)),
        "precision": getattr(refiner, "precision", None),
    }
    return {"mask": mask, "refined": refined, "embedded": embedded, "seconds": time.perf_counter() - start,
            "model": model, "clicked": clicked}


def _plane_shape(image: Any) -> tuple[int, ...]:
    """(H, W) of an image layer's planes (its last two axes, before the colour axis when RGB)."""
    return tuple(image.data.shape[-3:-1] if image.rgb else image.data.shape[-2:])


def _box_edge_width(plane: Sequence[int]) -> float:
    """The boxes layer's line width for a plane of this size: visible, not hiding the object."""
    return max(1.0, max(plane) / 300)


def _click_size(plane: Sequence[int]) -> float:
    """The clicks layer's point size for a plane of this size."""
    return max(3.0, max(plane) / 80)


def reuse_prompt_layer(layer: Any, image: Any) -> bool:
    """Empty a boxes or clicks layer of this widget and make it ``image``'s (renamed, its
    metadata and geometry following ``image``): the annotate panel shows the next image in the same
    image layer, and removing a layer costs napari a full garbage collection (0.4-0.7 s of frozen
    window on a two-core CPU). False (and nothing changed) for any other layer."""
    from napari.layers import Points, Shapes

    record = (layer.metadata.get(METADATA_KEY, {}) or {})
    kind = record.get("kind")
    if not (kind == "boxes" and isinstance(layer, Shapes) or kind == "clicks" and isinstance(layer, Points)):
        return False
    plane = _plane_shape(image)
    if kind == "boxes":
        if layer.nshapes:  # the widget counts the rectangles by its "removed" events
            layer.selected_data = set(range(layer.nshapes))
            layer.remove_selected()
        layer.current_edge_width = _box_edge_width(plane)
        suffix = BOXES_SUFFIX
    else:
        layer.data = np.zeros((0, layer.ndim))
        layer.current_size = _click_size(plane)
        suffix = CLICKS_SUFFIX
    layer.scale, layer.translate = image.scale, image.translate
    layer.metadata = {**layer.metadata, METADATA_KEY: {**record, "image": image.name}}
    layer.name = f"{image.name}{suffix}"
    return True


def _weak_data(data: Any) -> Any:
    """A weak reference to a layer's data array (a strong one for types without weakrefs)."""
    try:
        return weakref.ref(data)
    except TypeError:
        return lambda: data


def _call(ref: weakref.ref, method: str, _layer: Any = None) -> None:
    """A key binding's callback that holds the widget weakly (layers outlive docks)."""
    widget = ref()
    if widget is not None and alive(widget):
        getattr(widget, method)()


def _guarded_job(*args: Any):
    return (yield from guard_worker(_refine_job(*args)))


def _quit(state: dict[str, Any]) -> None:
    worker = state.get("worker")
    if worker is not None:
        try:
            worker.quit()
        except RuntimeError:
            pass


def _device_choices() -> list[str]:
    try:
        from ..devices import device_choices

        return device_choices()
    except Exception:  # noqa: BLE001 -- torch probing failed: CPU still works
        return ["auto", "cpu"]


__all__ = ["REFINER_CACHE", "RefineJob", "RefineWidget", "rectangle_to_box"]
