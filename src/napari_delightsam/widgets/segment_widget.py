"""The "De-LightSAM segment" dock widget.

Image layer + modality + device + model + threshold -> three layers named after the input and
carrying its scale/translate: ``<name>_delightsam_mask`` (Labels), ``<name>_delightsam_heatmap``
(the SP-Generator's patch prompt map) and ``<name>_delightsam_probability`` (hidden).

* The network runs in a napari ``thread_worker`` (a stack slice by slice, with progress and
  Cancel); the GUI thread only creates/updates layers.
* The Segmenter is loaded once per (checkpoint, device) and cached (``model_cache``).
* Moving the threshold or toggling instances re-derives the mask from the cached probability:
  no model call.
* A mask layer the user has painted on is never overwritten: the next result goes to a new
  layer ``<name>_delightsam_mask [2]``.
* Errors become napari notifications; device errors offer "Retry on CPU".
* The image picker is magicgui's layer-typed combo box; napari keeps it in step with the layer
  list by calling the widget's ``reset_choices`` (the rest of the form is plain Qt).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..config import MODALITIES
from . import registry, settings
from ._llvm import avoid_triton_llvm_clash
from .common import checkpoint_label, device_choices
from .core import (
    METADATA_KEY,
    InputError,
    SegmentationRun,
    device_error_kind,
    fingerprint,
    guard_worker,
    iterate_segmentation,
    level_scale,
    output_names,
    prepare_layer,
    pyramid_levels,
    threshold_mask,
    unique_name,
    utc_now,
    was_edited,
)
from .gc_policy import freeze_long_lived, release
from .layer_warmup import start_layer_warmup
from .model_cache import MODEL_CACHE, ModelCache
from .model_combo import CHOOSE_FILE, MODEL_LABELS, ModelCombo
from .notify import alive, notify

if TYPE_CHECKING:
    import napari

#: delay between adding two output layers: a real timer (a zero delay is a posted event, which
#: Qt may run right after the previous step), so input, paint and other timers run in between
LAYER_STEP_MS = 15


def _no_layer() -> None:
    """The reference of an output layer not added yet."""
    return None


@dataclass
class _LastRun:
    """What re-thresholding needs: the cached network output and the layer it feeds."""

    input_name: str
    run: SegmentationRun
    provenance: dict[str, Any]
    mask_layer: Callable[[], Any]  # weak references to the layers (``_no_layer`` until added)
    heatmap_layer: Callable[[], Any]
    probability_layer: Callable[[], Any]


class SegmentWidget(QWidget):
    """Dock widget: prompt-free De-LightSAM segmentation of an Image layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None,
                 model_cache: ModelCache | None = None) -> None:
        super().__init__(parent)
        avoid_triton_llvm_clash()  # before anything imports the model (see _llvm.py)
        # napari hands plugins a PublicOnlyProxy; keep the real viewer so layer identity and
        # weak references behave (proxies are re-created on every attribute access)
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.model_cache = model_cache or MODEL_CACHE
        self._worker: Any = None
        self._pbar: Any = None
        self._job: dict[str, Any] = {}
        self._last: _LastRun | None = None
        self._pending_layers: list[Callable[[], None]] = []
        self._closing = False
        self.setObjectName("DeLightSAMSegmentWidget")

        self._build_ui()
        self.reset_choices()
        registry.register_segment_widget(self.viewer, self)
        # stop a running worker when the dock (or the whole window) goes away; the closure
        # must not reference `self`, whose Qt side is already gone when `destroyed` fires
        state = {"worker": None}
        self._worker_box = state
        self.destroyed.connect(lambda *_: _quit_worker(state))

    # -- UI ------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        from magicgui.widgets import create_widget
        from napari.layers import Image
        from superqt import QLabeledDoubleSlider

        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)

        # magicgui's layer-typed combo box: its value is the Image layer itself, and napari calls
        # reset_choices (below) when layers are added, removed, reordered or renamed
        self.image_combo = create_widget(
            annotation=Image, options={"choices": self._image_choices,
                                       "tooltip": "Image layer to segment: 2D grey or RGB, or a stack (slice by slice)"},
        )
        form.addRow("Image", self.image_combo.native)

        self.modality_combo = QComboBox()
        self.modality_combo.addItems(["auto", *MODALITIES])
        self.modality_combo.setToolTip("Imaging modality; 'auto' lets the model's modality head choose")
        form.addRow("Modality", self.modality_combo)

        self.device_combo = QComboBox()
        self.device_combo.addItems(device_choices())
        self.device_combo.setToolTip("auto = CUDA, then Apple MPS, then CPU (only devices found here are listed)")
        form.addRow("Device", self.device_combo)

        self.model_combo = ModelCombo()
        form.addRow("Model", self.model_combo)

        self.threshold_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0.0, 1.0)
        self.threshold_slider.setSingleStep(0.01)
        self.threshold_slider.setDecimals(2)
        self.threshold_slider.setValue(0.5)
        self.threshold_slider.setToolTip("Foreground = probability > threshold; changes re-derive the mask, no rerun")
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)
        form.addRow("Threshold", self.threshold_slider)

        self.tiling_combo = QComboBox()
        self.tiling_combo.addItems(["auto", "on", "off"])
        self.tiling_combo.setToolTip(
            "Tiled inference for large images: auto = overlapping tiles for microscopy (at 1.25x) and fundus "
            "(the retina at 1.25x the network input) images longer than 1.5x the network input (measured rule), "
            "the whole image otherwise; "
            "on = always tiled; off = the whole image resized to the network input"
        )
        form.addRow("Tiling", self.tiling_combo)

        self.level_spin = QSpinBox()
        self.level_spin.setRange(0, 31)
        self.level_spin.setToolTip(
            "For a multiscale (pyramidal) layer: the level to segment (0 = full resolution); other layers use 0"
        )
        form.addRow("Pyramid level", self.level_spin)

        self.instances_check = QCheckBox("instances (connected components)")
        self.instances_check.setToolTip("One label id per connected region (e.g. nuclei) instead of a binary mask")
        self.instances_check.toggled.connect(self._on_threshold_changed)
        form.addRow("", self.instances_check)

        self.heatmap_check = QCheckBox("show patch-prompt heatmap")
        self.heatmap_check.setChecked(True)
        self.heatmap_check.toggled.connect(self._on_heatmap_toggled)
        form.addRow("", self.heatmap_check)
        layout.addLayout(form)

        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)

        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        layout.addWidget(self.progress_bar)

        self.export_button = QPushButton("Export mask…")
        self.export_button.setToolTip("Save the selected Labels layer as PNG or TIFF with a provenance JSON")
        self.export_button.clicked.connect(self.export)
        layout.addWidget(self.export_button)

        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status_label)

        # shown when "auto" is unsure: the two most likely modalities, one click each
        self.ask_box = QWidget()
        ask_layout = QVBoxLayout(self.ask_box)
        ask_layout.setContentsMargins(0, 0, 0, 0)
        self.ask_label = QLabel("")
        self.ask_label.setWordWrap(True)
        ask_layout.addWidget(self.ask_label)
        ask_row = QHBoxLayout()
        self.ask_buttons = (QPushButton(""), QPushButton(""))
        for button in self.ask_buttons:
            button.clicked.connect(lambda *_, b=button: self.choose_modality(b.property("modality")))
            ask_row.addWidget(button)
        ask_layout.addLayout(ask_row)
        self.ask_box.setVisible(False)
        layout.addWidget(self.ask_box)
        self.image_combo.changed.connect(self._on_image_changed)
        layout.addStretch(1)

    def _set_status(self, text: str) -> None:
        if alive(self):
            self.status_label.setText(text)

    # -- model combo ---------------------------------------------------------------------------

    def current_model(self) -> str:
        """``"bundled"``, ``"untrained"`` or a checkpoint path."""
        return self.model_combo.current_model()

    def use_checkpoint(self, path: str | Path, select: bool = True) -> bool:
        """Offer a checkpoint file in the model combo (and select it); False if it is not valid.
        Called by the fine-tune widget with its best checkpoint."""
        return self.model_combo.use_checkpoint(path, select)

    # -- image layer combo -------------------------------------------------------------------

    def _image_choices(self, _combo: Any = None) -> list[Any]:
        """The viewer's Image layers, without this widget's own heatmap and probability outputs."""
        from napari.layers import Image

        ours = {"heatmap", "probability"}
        return [
            layer for layer in self.viewer.layers
            if isinstance(layer, Image) and layer.metadata.get(METADATA_KEY, {}).get("kind") not in ours
        ]

    def reset_choices(self, *_: Any) -> None:
        """Refill the image combo from the viewer (napari calls this on every layer-list change).

        The chosen layer stays chosen, renamed or moved; when it is gone, the selected layer
        is taken if it is an image, else the first image.
        """
        if not alive(self):
            return
        combo = self.image_combo
        previous = combo.value
        combo.reset_choices()
        choices = combo.choices
        if previous is not None and any(layer is previous for layer in choices):
            combo.value = previous
            return
        active = self.viewer.layers.selection.active
        if active is not None and any(layer is active for layer in choices):
            combo.value = active

    # -- the modality: asking when auto is unsure, remembered per source folder --------------------

    @staticmethod
    def _source_folder(layer: Any) -> Path | None:
        path = getattr(getattr(layer, "source", None), "path", None)
        return Path(path).expanduser().parent if path else None

    def _on_image_changed(self, *_: Any) -> None:
        """A layer opened from a folder whose modality the user chose before gets that modality."""
        if not alive(self):
            return
        folder = self._source_folder(self.image_combo.value)
        remembered = settings.remembered_modality(folder) if folder is not None else None
        if remembered and self.modality_combo.findText(remembered) >= 0:
            self.modality_combo.setCurrentText(remembered)
            self._set_status(f"Modality {remembered}: your last choice for images of {folder.name or folder}.")

    def _remember_modality(self, modality: str) -> None:
        job = self._job
        layer = job.get("layer", lambda: None)() if job else None
        folder = self._source_folder(layer) if layer is not None else None
        if folder is not None and modality in MODALITIES:
            settings.remember_modality(folder, modality)

    def _ask(self, decision: Any) -> None:
        """Show the two most likely modalities as buttons (``decision``: an ``AutoDecision``)."""
        self.ask_label.setText(
            f"Not sure which modality this is ({decision.why()}). The mask shown is for "
            f"{decision.modality}. Which is it?"
        )
        for button, (name, p) in zip(
            self.ask_buttons,
            ((decision.modality, decision.confidence), (decision.runner_up, decision.runner_up_confidence)),
            strict=True,
        ):
            button.setText(f"{name} ({p:.2f})")
            button.setProperty("modality", name)
        self.ask_box.setVisible(True)

    def choose_modality(self, modality: str) -> Any:
        """The user's answer to an ``auto`` question: keep the mask (the shown modality) or segment
        again with the other one; either way the choice is set and remembered for the folder."""
        self.ask_box.setVisible(False)
        if modality not in MODALITIES:
            return None
        self.modality_combo.setCurrentText(modality)
        self._remember_modality(modality)
        shown = self._last.run.modalities if self._last is not None else []
        if shown and all(m == modality for m in shown):
            self._set_status(f"Modality {modality} confirmed.")
            return None
        return self.run()

    def _layer_by_name(self, name: str) -> Any | None:
        for layer in self.viewer.layers:
            if layer.name == name:
                return layer
        return None

    # -- running ---------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A run is in progress: its worker, or its output layers still being added."""
        return self._worker is not None or bool(self._pending_layers)

    def run(self, device: str | None = None) -> Any:
        """Start segmenting the chosen image layer; returns the worker (None when nothing started)."""
        if self.busy:
            notify("info", "a segmentation is already running; press Cancel to stop it")
            return None
        layer = self.image_combo.value
        if layer is None:
            notify("warning", "no image layer to segment; open an image first")
            return None
        level = min(int(self.level_spin.value()), pyramid_levels(layer) - 1)
        try:
            prepared = prepare_layer(layer, level)
        except InputError as exc:
            notify("error", str(exc))
            return None
        if isinstance(prepared.data, np.ndarray):
            # a private copy: the user may edit or delete the layer while the worker reads it
            prepared = type(prepared)(**{**prepared.__dict__, "data": prepared.data.copy()})
        spec = self.current_model()
        if spec == CHOOSE_FILE:
            notify("warning", "choose a model first")
            return None
        device = device or self.device_combo.currentText() or "auto"
        modality = self.modality_combo.currentText()
        threshold = float(self.threshold_slider.value())
        tiling = self.tiling_combo.currentText()
        self._job = {
            "layer": weakref.ref(layer),
            "input_name": layer.name,
            "scale": level_scale(layer, level),
            "level": level,
            "tiling": tiling,
            "translate": tuple(layer.translate),
            "prepared": prepared,
            "spec": spec,
            "device": device,
            "modality": modality,
            "threshold": threshold,
            "input_shape": list(np.shape(layer.data) if not getattr(layer, "multiscale", False) else layer.data[level].shape),
        }
        return self._start_worker(prepared, spec, device, modality, threshold, tiling)

    def _start_worker(self, prepared: Any, spec: str, device: str, modality: str, threshold: float,
                      tiling: str = "auto") -> Any:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if not self.model_cache.is_loaded(spec, device):
            self._set_status(f"Loading {MODEL_LABELS.get(spec, checkpoint_label(spec))} on {device} (first use)…")
        else:
            self._set_status("Segmenting…")
        worker = create_worker(
            guard_worker, _segment_job(self.model_cache, prepared, spec, device, modality, threshold, tiling),
            _ignore_errors=True,
        )
        self._pbar = progress(total=prepared.n_slices, desc=f"De-LightSAM {prepared.name}")
        self.progress_bar.setRange(0, prepared.n_slices)
        self.progress_bar.setValue(0)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._worker_box["worker"] = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        freeze_long_lived(self.viewer)
        worker.start()
        return worker

    def cancel(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._set_status("Cancelling after the current slice or tile…")

    def _on_yielded(self, item: tuple) -> None:
        # a late progress item of a cancelled/finished run must not overwrite the status
        if not alive(self) or self._worker is None or self._worker.abort_requested:
            return
        kind = item[0]
        if kind == "loaded":
            freeze_long_lived()  # the model just loaded is long-lived too: later passes skip it
            self._set_status(f"Segmenting with {item[1]}…")
        elif kind == "progress":
            done, total = item[1], item[2]
            self.progress_bar.setRange(0, total)  # a tiled single image counted tiles until now
            self.progress_bar.setValue(done)
            if self._pbar is not None:
                self._pbar.update(1)
            if total > 1:
                self._set_status(f"Segmenting slice {done}/{total}…")
        elif kind == "tiles":
            plane, planes, done, total = item[1:]
            if planes == 1:  # one image: the bar counts its tiles
                self.progress_bar.setRange(0, total)
                self.progress_bar.setValue(done)
            where = f" of slice {plane + 1}/{planes}" if planes > 1 else ""
            self._set_status(f"Segmenting tile {done}/{total}{where}…")

    def _on_aborted(self) -> None:
        if alive(self):
            self._set_status("Cancelled; no layer was changed.")

    def _on_finished(self) -> None:
        self._worker = None
        self._worker_box["worker"] = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if alive(self):
            self.run_button.setEnabled(True)
            self.cancel_button.setEnabled(False)

    def _on_errored(self, exc: BaseException) -> None:
        if not alive(self):
            return
        job = self._job
        device = job.get("device", "auto")
        kind = device_error_kind(exc)
        if kind is not None and device != "cpu":
            self._set_status(f"{kind} on {device}; you can retry on the CPU.")
            notify("error", f"{kind} on device '{device}' ({exc}). Retry on the CPU?",
                    actions=(("Retry on CPU", lambda *_: self.retry_on_cpu()),))
            return
        self._set_status(f"Failed: {exc}")
        notify("error", f"segmentation of '{job.get('input_name', '?')}' failed: {exc}")

    def retry_on_cpu(self) -> Any:
        """The device-error fallback: switch the device to CPU and run again."""
        if not alive(self):
            return None
        index = self.device_combo.findText("cpu")
        if index >= 0:
            self.device_combo.setCurrentIndex(index)
        return self.run(device="cpu")

    def _on_returned(self, payload: tuple[SegmentationRun, dict[str, Any]]) -> None:
        if not alive(self) or self._closing:
            return
        run, model_info = payload
        job = self._job
        layer = job["layer"]()
        if layer is None or layer not in self.viewer.layers:
            self._set_status("The input layer was removed during the run; results discarded.")
            notify("warning", f"layer '{job['input_name']}' was removed during the run; results discarded")
            return
        threshold = float(self.threshold_slider.value())
        instances = self.instances_check.isChecked()
        provenance = {
            "model_file": model_info.get("checkpoint_path"),
            "model_sha256": model_info.get("checkpoint_sha256"),
            "model": job["spec"] if job["spec"] in (settings.BUNDLED, settings.UNTRAINED) else "file",
            "modality": job["modality"],
            "modality_used": run.modality_summary,
            "modality_probabilities": run.modality_probabilities[0] if len(run.modalities) == 1 else None,
            "modality_unsure": bool(run.auto_decision.asks) if run.auto_decision is not None else None,
            "colour_correction": sorted({c for c in run.colour_corrections if c}) or None,
            "refiner": sorted({r for r in run.refiners if r}) or None,
            "threshold": threshold,
            "instances": instances,
            "input_layer": job["input_name"],
            "input_shape": job["input_shape"],
            "tiling": job.get("tiling", "auto"),
            "tiles": run.tilings[0] if len(run.tilings) == 1 else None,
            "pyramid_level": job.get("level", 0),
            "time": utc_now(),
            "device": model_info.get("device"),
            "seconds": round(run.seconds, 3),
            "package_version": _version(),
        }
        run.provenance = provenance
        mask = threshold_mask(run.probability, threshold, instances)
        self._write_layers(job, run, mask, provenance)
        mod = run.modality_summary
        decision = run.auto_decision
        if job["modality"] == "auto" and decision is not None:
            mod = f"{mod} (auto, p={decision.confidence:.2f}{', unsure: choose below' if decision.asks else ''})"
        elif job["modality"] == "auto" and len(run.modalities) == 1 and run.modality_probabilities[0]:
            p = run.modality_probabilities[0].get(mod)
            mod = f"{mod} (auto, p={p:.2f})" if p is not None else f"{mod} (auto)"
        if job["modality"] != "auto":
            self._remember_modality(job["modality"])
        if decision is not None and decision.asks:
            self._ask(decision)
            notify("warning", f"'{job['input_name']}': the model is unsure of the modality ({decision.describe()}; {decision.why()}); "
                              "choose it in the De-LightSAM segment panel")
        else:
            self.ask_box.setVisible(False)
        corrections = sorted({c for c in run.colour_corrections if c})
        if corrections:
            mod += f" · {'; '.join(corrections)} before segmenting"
        self._set_status(
            f"Done in {run.seconds:.2f} s · modality {mod} · model {checkpoint_label(str(provenance['model_file'])) if provenance['model_file'] else job['spec']}"
            f" on {model_info.get('device')}"
        )

    # -- output layers ---------------------------------------------------------------------------

    def _write_layers(self, job: dict[str, Any], run: SegmentationRun, mask: np.ndarray,
                      provenance: dict[str, Any]) -> None:
        """The mask now; the heatmap, then the probability map, each in a later turn of the event
        loop and placed under the mask. A new napari layer costs 100-250 ms of GUI thread on a
        two-core CPU: three in one turn froze the window for most of a second."""
        names = output_names(job["input_name"])
        geom = {"scale": job["scale"], "translate": job["translate"]}
        mask_layer = self._upsert_mask(names["mask"], mask, provenance, geom, job["input_name"])
        last = _LastRun(job["input_name"], run, provenance, weakref.ref(mask_layer), _no_layer, _no_layer)
        self._last = last

        def heatmap() -> None:
            layer = self._upsert_image(names["heatmap"], run.heatmap, "heatmap", geom, below=mask_layer,
                                       colormap="inferno", opacity=0.5, visible=self.heatmap_check.isChecked())
            last.heatmap_layer = weakref.ref(layer)

        def probability() -> None:
            heat = last.heatmap_layer()
            below = heat if heat is not None else mask_layer
            layer = self._upsert_image(names["probability"], run.probability, "probability", geom, below=below,
                                       colormap="viridis", opacity=1.0, visible=False)
            last.probability_layer = weakref.ref(layer)

        self._pending_layers += [heatmap, probability]
        QTimer.singleShot(LAYER_STEP_MS, self._add_pending_layer)

    def _add_pending_layer(self) -> None:
        """Add the next queued output layer; the rest wait for the next turn of the event loop."""
        if not self._pending_layers:
            return
        step = self._pending_layers.pop(0)
        try:
            if alive(self) and not self._closing:
                step()
            else:
                self._pending_layers.clear()
        finally:  # a step that fails (napari shows the error) must not leave the widget busy
            if self._pending_layers:
                QTimer.singleShot(LAYER_STEP_MS, self._add_pending_layer)

    def _upsert_image(self, name: str, data: np.ndarray, kind: str, geom: dict[str, Any], below: Any = None,
                      **style: Any) -> Any:
        """Update this widget's ``kind`` layer named ``name`` in place, or add a new one (under
        ``below`` when that layer is in the viewer)."""
        from napari.layers import Image

        layer = self._layer_by_name(name)
        meta = {METADATA_KEY: {"kind": kind}}
        if isinstance(layer, Image) and layer.metadata.get(METADATA_KEY, {}).get("kind") == kind:
            layer.data = data
            layer.scale, layer.translate = geom["scale"], geom["translate"]
            layer.contrast_limits = (0.0, 1.0)
            return layer
        name = unique_name(name, [lay.name for lay in self.viewer.layers])
        layer = Image(data, name=name, contrast_limits=(0.0, 1.0), metadata=meta, blending="translucent",
                      **geom, **style)
        index = self.viewer.layers.index(below) if below is not None and below in self.viewer.layers else None
        active = self.viewer.layers.selection.active  # napari selects what it inserts: keep the user's (the mask)
        if index is None:
            self.viewer.layers.append(layer)
        else:
            self.viewer.layers.insert(index, layer)
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        return layer

    def _mask_metadata(self, mask: np.ndarray, provenance: dict[str, Any]) -> dict[str, Any]:
        return {METADATA_KEY: {**provenance, "kind": "mask", "fingerprint": fingerprint(mask)}}

    def _upsert_mask(self, name: str, mask: np.ndarray, provenance: dict[str, Any], geom: dict[str, Any],
                     input_name: str) -> Any:
        from napari.layers import Labels

        candidates = []
        if self._last is not None and self._last.input_name == input_name:
            previous = self._last.mask_layer()
            if previous is not None and previous in self.viewer.layers:
                candidates.append(previous)
        named = self._layer_by_name(name)
        if named is not None and named not in candidates:
            candidates.append(named)
        kept = []
        for layer in candidates:
            if isinstance(layer, Labels) and not was_edited(layer.data, layer.metadata):
                layer.data = mask
                layer.metadata = self._mask_metadata(mask, provenance)
                layer.scale, layer.translate = geom["scale"], geom["translate"]
                return layer
            kept.append(layer.name)
        new_name = unique_name(name, [lay.name for lay in self.viewer.layers])
        layer = self.viewer.add_labels(mask, name=new_name, opacity=0.6,
                                       metadata=self._mask_metadata(mask, provenance), **geom)
        if kept:
            notify("info", f"kept your edited layer '{kept[0]}'; the new result is in '{new_name}'")
        return layer

    def _on_threshold_changed(self, *_: Any) -> None:
        """Re-derive the mask from the cached probability map (no network call)."""
        if not alive(self) or self._last is None:
            return
        last = self._last
        layer = last.mask_layer()
        if layer is None or layer not in self.viewer.layers:
            return
        threshold = float(self.threshold_slider.value())
        instances = self.instances_check.isChecked()
        mask = threshold_mask(last.run.probability, threshold, instances)
        provenance = {**last.provenance, "threshold": threshold, "instances": instances, "time": utc_now()}
        last.provenance = provenance
        if was_edited(layer.data, layer.metadata):
            # never repaint over corrections: continue in a new layer
            from napari.layers import Labels

            new_name = unique_name(output_names(last.input_name)["mask"], [lay.name for lay in self.viewer.layers])
            new = self.viewer.add_labels(mask, name=new_name, opacity=layer.opacity, scale=layer.scale,
                                         translate=layer.translate, metadata=self._mask_metadata(mask, provenance))
            assert isinstance(new, Labels)
            last.mask_layer = weakref.ref(new)
            notify("info", f"kept your edited layer '{layer.name}'; the re-thresholded mask is in '{new_name}'")
            return
        layer.data = mask
        layer.metadata = self._mask_metadata(mask, provenance)
        self._set_status(f"Threshold {threshold:.2f}: mask re-derived from the cached probability (no rerun).")

    def _on_heatmap_toggled(self, checked: bool) -> None:
        if self._last is None:
            return
        layer = self._last.heatmap_layer()
        if layer is not None and layer in self.viewer.layers:
            layer.visible = bool(checked)

    # -- export ------------------------------------------------------------------------------------

    def _export_target(self) -> Any | None:
        from napari.layers import Labels

        active = self.viewer.layers.selection.active
        if isinstance(active, Labels):
            return active
        if self._last is not None:
            layer = self._last.mask_layer()
            if layer is not None and layer in self.viewer.layers:
                return layer
        labels = [layer for layer in self.viewer.layers if isinstance(layer, Labels)]
        return labels[-1] if labels else None

    def _ask_save_path(self, suggested: Path) -> str | None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export labels", str(suggested), "PNG mask (*.png);;TIFF labels (*.tif *.tiff)",
            options=QFileDialog.Option.DontConfirmOverwrite,
        )
        return path or None

    def _confirm_overwrite(self, paths: list[Path]) -> bool:
        answer = QMessageBox.question(
            self, "Replace files?", "These files exist already:\n" + "\n".join(str(p) for p in paths)
            + "\n\nReplace them?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def export(self, path: str | Path | None = None) -> list[Path]:
        """Export a Labels layer (selected, else the last result) to PNG/TIFF + JSON sidecar."""
        from .export import ExportError, export_labels, provenance_from_metadata, sidecar_path

        layer = self._export_target()
        if layer is None:
            notify("warning", "no Labels layer to export; run a segmentation or select a Labels layer")
            return []
        if path is None:
            source = getattr(getattr(layer, "source", None), "path", None)
            folder = Path(source).parent if source else Path(settings.load_settings().get("export_dir", Path.home()))
            path = self._ask_save_path(folder / f"{layer.name}.png")
            if not path:
                return []
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".png")
        provenance = provenance_from_metadata(layer.metadata, layer.data)
        try:
            try:
                written = export_labels(path, layer.data, layer_name=layer.name, provenance=provenance)
            except FileExistsError:
                existing = [p for p in (path, sidecar_path(path)) if p.exists()]
                if not self._confirm_overwrite(existing):
                    self._set_status("Export cancelled; nothing was overwritten.")
                    return []
                written = export_labels(path, layer.data, layer_name=layer.name, provenance=provenance, overwrite=True)
        except (ExportError, OSError) as exc:
            notify("error", f"export of '{layer.name}' failed: {exc}")
            return []
        settings.save_settings({"export_dir": str(path.parent)})
        self._set_status(f"Exported '{layer.name}' to {written[0]} (+ {written[1].name}).")
        notify("info", f"saved {written[0]} and {written[1].name}")
        return written

    # -- teardown ------------------------------------------------------------------------------

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self._closing = True
        _quit_worker(self._worker_box)
        release()
        super().closeEvent(event)


def _quit_worker(state: dict[str, Any]) -> None:
    worker = state.get("worker")
    if worker is not None:
        try:
            worker.quit()
        except RuntimeError:
            pass


def _segment_job(cache: ModelCache, prepared: Any, spec: str, device: str, modality: str, threshold: float,
                 tiling: str = "auto"):
    """Worker body (runs off the GUI thread): load/reuse the model, segment every slice (a large
    one tile by tile: progress and Cancel between batches of tiles)."""
    start_layer_warmup()  # napari's first-layer imports, beside the network, not in the result handler
    segmenter = cache.get(spec, device)
    info = {
        "checkpoint_path": str(segmenter.checkpoint_path) if getattr(segmenter, "checkpoint_path", None) else None,
        "checkpoint_sha256": getattr(segmenter, "checkpoint_sha256", None),
        "device": str(getattr(segmenter, "device", device)),
    }
    yield ("loaded", f"{info['checkpoint_path'] and Path(info['checkpoint_path']).name or spec} on {info['device']}")
    gen = iterate_segmentation(segmenter, prepared, modality, threshold, tiling)
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value, info
        yield ("progress", *item) if len(item) == 2 else ("tiles", *item)


def _version() -> str:
    from .. import __version__

    return __version__
