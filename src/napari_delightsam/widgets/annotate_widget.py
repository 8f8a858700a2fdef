"""The "De-LightSAM annotate" dock widget: annotate a folder of images, one key per image.

Choose an input folder (its PNG/JPEG/TIFF/BMP files, sorted by name), an output folder, the
modality (or ``auto``), the device and the model (the segment widget's choices), then
**Start / resume**. For each image the widget

* opens it as an image layer (named after the file) and segments it prompt-free in a napari
  worker thread (``core.iterate_segmentation``, the segment widget's path; the model comes from
  the shared ``model_cache``): the mask (Labels ``<name>_delightsam_mask``, with the segment
  widget's provenance record) and the SP-Generator's heatmap appear;
* lets the user correct the mask (napari's brushes, or "De-LightSAM refine": Box, clicks,
  Refine all -- it picks up the image and its mask by their names);
* **Save & next** (button, or Shift+S in the viewer) writes the mask + its provenance sidecar
  into the output folder (``annotate.AnnotationSession.save``: atomic, PNG or TIFF) and opens
  the next image that has no mask yet -- segmented in the background while the user corrected the
  previous one, so its mask appears at once.

Previous / Next step through the images (those already done are skipped unless "show done
images" is ticked; a done image opens with its saved mask, which Save then replaces). A
double-click in the list jumps to any image. The label says "n of N done"; files that cannot be
read are listed with the reason and skipped. Unsaved corrections are kept as a draft in the output
folder (a second after each edit, and when the image changes or the widget closes), so a crash or
a closed window loses nothing: **Start / resume** on the same folders continues on the image it
stopped at, with the draft. With ``auto``, an image whose modality the model is unsure of shows
the segment widget's question (the two likeliest modalities as buttons); the answer becomes the
modality of the whole session.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..config import MODALITIES
from . import settings
from ._llvm import avoid_triton_llvm_clash
from .common import device_choices
from .core import (
    METADATA_KEY,
    InputError,
    fingerprint,
    guard_worker,
    iterate_segmentation,
    output_names,
    prepare_input,
    threshold_mask,
    utc_now,
    was_edited,
)
from .gc_policy import freeze_long_lived, release
from .layer_warmup import start_layer_warmup
from .model_cache import MODEL_CACHE, ModelCache
from .model_combo import ModelCombo
from .notify import alive, notify
from .refine_widget import reuse_prompt_layer

if TYPE_CHECKING:
    import napari

    from ..annotate import AnnotationSession
    from ..annotate_learning import Learner

#: the viewer shortcut of Save & next
SAVE_NEXT_KEY = "Shift-S"
#: a draft of the mask on screen is written this long after the last edit
DRAFT_DELAY_MS = 1000
THRESHOLD = 0.5


class AnnotateWidget(QWidget):
    """Dock widget: a folder of images, segmented one by one, corrected, saved (see module doc)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None,
                 model_cache: ModelCache | None = None) -> None:
        super().__init__(parent)
        avoid_triton_llvm_clash()  # before anything imports the model (see _llvm.py)
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.model_cache = model_cache or MODEL_CACHE
        self.session: AnnotationSession | None = None
        self.setObjectName("DeLightSAMAnnotateWidget")
        self._worker: Any = None
        self._token = 0
        #: the next image, segmented in the background (key, index, worker, result, waiting, failed)
        self._prefetch: dict[str, Any] = {}
        self.prefetch_hits = 0
        self._shown: dict[str, Any] = {}  # index, layers (weakrefs), provenance of the image on screen
        #: fine-tune rounds of the session (annotate_learning.Learner) and the running one
        self.learner: Learner | None = None
        self._learn_holder: dict[str, Any] = {}
        self.last_round: Any = None
        state: dict[str, Any] = {"worker": None, "learn": self._learn_holder}
        self._worker_box = state
        self._draft_timer = QTimer(self)
        self._draft_timer.setSingleShot(True)
        self._draft_timer.setInterval(DRAFT_DELAY_MS)
        self._draft_timer.timeout.connect(self.save_draft)
        self._build_ui()
        self._bind_keys()
        self.destroyed.connect(lambda *_: _quit(state))

    # -- UI ------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.input_edit, row = self._folder_row("Folder of images to annotate")
        form.addRow("Images", row)
        self.output_edit, row = self._folder_row("Folder the masks (+ JSON provenance) are written to")
        form.addRow("Masks to", row)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(["auto", *MODALITIES])
        self.modality_combo.setToolTip("The images' modality; 'auto' asks when the model is unsure, then keeps "
                                       "your answer for the whole folder")
        self.modality_combo.currentTextChanged.connect(self._on_modality_changed)
        form.addRow("Modality", self.modality_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(device_choices())
        form.addRow("Device", self.device_combo)
        self.model_combo = ModelCombo()
        form.addRow("Model", self.model_combo)
        self.format_combo = QComboBox()
        self.format_combo.addItems(["png", "tiff"])
        self.format_combo.setToolTip("png: binary masks as 0/255, label ids up to 255; tiff: any label ids")
        form.addRow("Mask format", self.format_combo)
        layout.addLayout(form)
        self._build_learning(layout)

        self.start_button = QPushButton("Start / resume")
        self.start_button.setToolTip("List the images, then open the first one without a mask (or the one you "
                                     "stopped at)")
        self.start_button.clicked.connect(lambda *_: self.start())
        layout.addWidget(self.start_button)

        self.progress_label = QLabel("Choose the folders, then Start.")
        self.progress_label.setWordWrap(True)
        layout.addWidget(self.progress_label)

        nav = QHBoxLayout()
        self.previous_button = QPushButton("◀ Previous")
        self.previous_button.clicked.connect(lambda *_: self.previous())
        self.next_button = QPushButton("Next ▶")
        self.next_button.clicked.connect(lambda *_: self.next())
        self.save_button = QPushButton("Save && next (Shift+S)")
        self.save_button.setToolTip("Write the mask and its provenance JSON, then open the next image without a mask")
        self.save_button.clicked.connect(lambda *_: self.save_and_next())
        for button in (self.previous_button, self.next_button, self.save_button):
            nav.addWidget(button)
        layout.addLayout(nav)
        self.show_done_check = QCheckBox("show done images (Previous/Next reopen their masks)")
        layout.addWidget(self.show_done_check)

        self.image_list = QListWidget()
        self.image_list.setToolTip("Double-click an image to jump to it (✓ = has a mask)")
        self.image_list.itemDoubleClicked.connect(lambda item: self.jump(item.data(Qt.ItemDataRole.UserRole)))
        layout.addWidget(self.image_list, 1)
        self.unreadable_label = QLabel("")
        self.unreadable_label.setWordWrap(True)
        self.unreadable_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.unreadable_label)

        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status_label)

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
        self._set_navigation(False)

    def _build_learning(self, layout: QVBoxLayout) -> None:
        box = QGroupBox("Learn as you go")
        form = QFormLayout(box)
        self.every_spin = QSpinBox()
        self.every_spin.setRange(0, 1000)
        self.every_spin.setValue(0)
        self.every_spin.setSpecialValueText("off")
        self.every_spin.setToolTip(
            "Fine-tune on the masks saved so far after every K saved images, in the background. Every "
            "4th saved image is kept out of training; the next images use the new model only if it "
            "segments those better than the current one."
        )
        self.every_spin.valueChanged.connect(self._on_every_changed)
        form.addRow("Fine-tune every", self.every_spin)
        self.finetune_button = QPushButton("Fine-tune now")
        self.finetune_button.setToolTip("Fine-tune on the images saved so far (in the background)")
        self.finetune_button.clicked.connect(lambda *_: self.finetune_now())
        self.finetune_button.setEnabled(False)
        form.addRow(self.finetune_button)
        self.learn_label = QLabel("")
        self.learn_label.setWordWrap(True)
        form.addRow(self.learn_label)
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        self.model_label.setToolTip("The model that made the mask on screen")
        layout.addWidget(box)
        layout.addWidget(self.model_label)

    def _folder_row(self, tooltip: str) -> tuple[QLineEdit, QWidget]:
        edit = QLineEdit()
        edit.setToolTip(tooltip)
        button = QToolButton()
        button.setText("…")
        button.clicked.connect(lambda *_: self._browse(edit))
        row = QWidget()
        box = QHBoxLayout(row)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(edit, 1)
        box.addWidget(button)
        return edit, row

    def _browse(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text() or str(Path.home()))
        if folder:
            edit.setText(folder)

    def _on_modality_changed(self, text: str) -> None:
        """A modality chosen in the menu during a session is the session's from the next image on."""
        if self.session is not None and self.session.settings.get("modality") != (text if text in MODALITIES else None):
            self.session.set_setting("modality", text if text in MODALITIES else None)

    def _set_status(self, text: str) -> None:
        if alive(self):
            self.status_label.setText(text)

    def _set_navigation(self, enabled: bool) -> None:
        for button in (self.previous_button, self.next_button, self.save_button):
            button.setEnabled(enabled)

    # -- model choice (the segment widget's menu, model_combo.ModelCombo) --------------------------

    def current_model(self) -> str:
        return self.model_combo.current_model()

    def use_checkpoint(self, path: str | Path) -> bool:
        """Offer a checkpoint file in the model list and select it; False if it is not valid."""
        return self.model_combo.use_checkpoint(path)

    # -- learning as you go (annotate_learning) -------------------------------------------------

    def _start_learner(self, session: AnnotationSession) -> None:
        from ..annotate_learning import LearnConfig, Learner

        _quit({"learn": self._learn_holder})
        every = session.settings.get("finetune_every")
        if isinstance(every, int) and every >= 0:
            self.every_spin.setValue(every)  # a resumed session keeps its K
        elif self.every_spin.value():
            session.set_setting("finetune_every", self.every_spin.value())
        self.learner = Learner(session, LearnConfig(every=self.every_spin.value(),
                                                    device=self.device_combo.currentText() or "auto"))
        self.finetune_button.setEnabled(True)
        adopted = self.learner.current_path
        if adopted is not None and self.current_model() != str(adopted) and self.use_checkpoint(adopted):
            self.learn_label.setText(f"Resumed with {self.learner.describe(str(adopted))}.")
        elif self.learner.rounds:
            self.learn_label.setText(f"Last round: {self.learner.rounds[-1].get('message', '')}")
        else:
            self.learn_label.setText("")

    def _on_every_changed(self, value: int) -> None:
        if self.learner is not None:
            self.learner.config.every = int(value)
        if self.session is not None and self.session.settings.get("finetune_every") != int(value):
            self.session.set_setting("finetune_every", int(value))  # kept when the session resumes

    @property
    def learning(self) -> bool:
        """Whether a fine-tune round runs in the background."""
        return self._learn_holder.get("worker") is not None

    def finetune_now(self) -> Any:
        """Start a fine-tune round on the images saved so far (a worker that only streams the
        child processes' events); returns the worker, None when one runs or nothing can start."""
        from napari.qt.threading import create_worker

        if self.learner is None or self.session is None:
            notify("warning", "start a session first; fine-tuning uses the masks it saved")
            return None
        if self.learning:
            self.learn_label.setText("A fine-tune round is running already; the next starts after it.")
            return None
        self.learner.config.device = self.device_combo.currentText() or "auto"
        holder = self._learn_holder
        holder.clear()
        base = self.current_model()
        worker = create_worker(guard_worker, self.learner.run_round(base, holder=holder, exact=True), _ignore_errors=True)
        holder["worker"] = worker
        worker.yielded.connect(self._on_learn_event)
        worker.returned.connect(self._on_round)
        worker.errored.connect(lambda exc: self._on_round_failed(exc))
        worker.finished.connect(lambda holder=holder, worker=worker: _release(holder, worker))
        self.finetune_button.setEnabled(False)
        self.learn_label.setText("Fine-tuning: preparing the saved images…")
        freeze_long_lived(self.viewer)
        worker.start()
        return worker

    def _on_learn_event(self, event: dict[str, Any] | None) -> None:
        if event is None or not alive(self):
            return
        kind = event.get("event")
        if kind == "round":
            phase = event.get("phase")
            text = {"data": f"Round {event.get('round')}: {event.get('train')} images to train on, "
                            f"{event.get('holdout')} held out…",
                    "training": f"Round {event.get('round')}: training in the background…",
                    "evaluating": f"Round {event.get('round')}: scoring the new model on the held-out images…"}
            self.learn_label.setText(text.get(str(phase), ""))
        elif kind == "step":
            self.learn_label.setText(f"Fine-tuning: step {event.get('global_step')} · loss "
                                     f"{float(event.get('loss', float('nan'))):.3f}")

    def _on_round(self, result: Any) -> None:
        self.last_round = result
        if not alive(self):
            return
        self.finetune_button.setEnabled(True)
        self.learn_label.setText(f"Round {result.round}: {result.message}")
        if result.accepted and self.learner is not None and self.learner.current_path is not None:
            # the next images (not the one on screen) are segmented with the new model
            self.use_checkpoint(self.learner.current_path)
            notify("info", f"fine-tune round {result.round}: {result.message}; the next images use it")

    def _on_round_failed(self, exc: BaseException) -> None:
        if alive(self):
            self.finetune_button.setEnabled(True)
            self.learn_label.setText(f"Fine-tuning failed: {getattr(exc, 'original', exc)}")

    def model_name(self, spec: str | None) -> str:
        """How the widget names a model: a fine-tune round of this session, bundled, or a file."""
        if spec is None:
            return "unknown model"
        if self.learner is not None:
            return self.learner.describe(spec)
        return spec if spec in (settings.BUNDLED, settings.UNTRAINED) else Path(spec).name

    # -- keys ------------------------------------------------------------------------------------

    def _bind_keys(self) -> None:
        ref = weakref.ref(self)

        def save_next(_viewer: Any = None) -> None:
            widget = ref()
            if widget is not None and alive(widget):
                widget.save_and_next()

        self.viewer.bind_key(SAVE_NEXT_KEY, save_next, overwrite=True)
        self._key_callback = save_next

    def _unbind_keys(self) -> None:
        try:
            self.viewer.bind_key(SAVE_NEXT_KEY, None)
        except (KeyError, ValueError, TypeError, AttributeError):
            pass

    # -- the session ---------------------------------------------------------------------------------

    def start(self, images: str | Path | None = None, output: str | Path | None = None) -> Any:
        """List the images and open the first one to do (or the one a previous session stopped at);
        returns the session (None when the folders cannot be used)."""
        from ..annotate import AnnotationSession

        if images is not None:
            self.input_edit.setText(str(images))
        if output is not None:
            self.output_edit.setText(str(output))
        src, out = self.input_edit.text().strip(), self.output_edit.text().strip()
        if not src or not out:
            notify("warning", "choose the folder of images and the folder for masks first")
            return None
        self.save_draft()
        try:
            session = AnnotationSession(src, out, mask_format=self.format_combo.currentText())
        except (OSError, ValueError) as exc:
            notify("error", f"cannot annotate: {exc}")
            self._set_status(f"Cannot start: {exc}")
            return None
        self.session = session
        self._start_learner(session)
        chosen = session.settings.get("modality")
        if chosen in MODALITIES:
            self.modality_combo.setCurrentText(chosen)  # a resumed session keeps its modality
        elif self.modality_combo.currentText() != "auto":
            session.set_setting("modality", self.modality_combo.currentText())
        self._refresh()
        if session.index is None:
            self._set_status("Every image of the folder has a mask already; tick 'show done images' and use "
                             "Next or the list to reopen one." if session.readable_count else
                             "No readable image in this folder.")
            self._set_navigation(bool(session.readable_count))
            return session
        self._set_navigation(True)
        self.open_index(session.index)
        return session

    def _refresh(self) -> None:
        s = self.session
        if s is None or not alive(self):
            return
        where = f" · image {s.index + 1} of {s.total}: {s.name(s.index)}" if s.index is not None else ""
        self.progress_label.setText(f"{s.summary()}{where}")
        self.image_list.clear()
        for i, entry in enumerate(s.entries):
            mark = "✗" if s.is_unreadable(i) else "✓" if s.is_done(i) else "·"
            item = QListWidgetItem(f"{mark} {entry.name}")
            item.setData(Qt.ItemDataRole.UserRole, i)
            if s.is_unreadable(i):
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEnabled)
                item.setToolTip(s.unreadable[entry.name])
            self.image_list.addItem(item)
            if i == s.index:
                self.image_list.setCurrentItem(item)
        if s.unreadable:
            self.unreadable_label.setText("Could not read (skipped):\n" + "\n".join(
                f"{name}: {reason}" for name, reason in s.unreadable.items()))
        else:
            self.unreadable_label.setText("")

    # -- navigation -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def next(self) -> Any:
        return self._step(1)

    def previous(self) -> Any:
        return self._step(-1)

    def _step(self, direction: int) -> Any:
        if self.session is None:
            return None
        target = self.session.step(direction, skip_done=not self.show_done_check.isChecked())
        if target is None:
            self._set_status("No further image that way" + (
                "" if self.show_done_check.isChecked() else " without a mask (tick 'show done images' to reopen "
                "saved ones)") + ".")
            return None
        return self.open_index(target)

    def jump(self, index: int) -> Any:
        """Open image ``index`` (a done image opens with its saved mask)."""
        if self.session is None or index is None or self.session.is_unreadable(int(index)):
            return None
        return self.open_index(int(index))

    def open_index(self, index: int) -> Any:
        """Show image ``index``: its saved mask, else its draft, else a new segmentation (in a
        worker). Work on the image shown before is kept as a draft. Returns the worker."""
        from napari.qt.threading import create_worker

        s = self.session
        if s is None:
            return None
        self.save_draft()
        if self._worker is not None and self._worker is not self._prefetch.get("worker"):
            _quit({"worker": self._worker})
        s.go(index)
        self._refresh()
        self.ask_box.setVisible(False)
        self._token += 1
        token = self._token
        entry = s.entries[index]
        existing = s.existing_mask(index)
        draft = s.draft_path(index)
        job = self._job_for(index)
        modality = job["modality"]
        pre = self._prefetch
        if pre.get("key") == job["key"] and existing is None and not draft.is_file() and not pre.get("failed"):
            # segmented in the background while the previous image was corrected
            self._prefetch = {}
            if pre.get("result") is not None:
                self.prefetch_hits += 1
                self._on_opened(token, job, pre["result"])
                return None
            if pre.get("worker") is not None:
                self.prefetch_hits += 1
                pre["waiting"] = (token, job)
                self._prefetch = pre
                self._worker = pre["worker"]
                self._worker_box["worker"] = pre["worker"]
                self._set_status(f"Opening {entry.name} (segmenting in the background)…")
                return pre["worker"]
        worker = create_worker(
            guard_worker,
            _open_job(self.model_cache, entry.path, existing, draft, job["spec"], job["device"], modality,
                      s.draft_provenance(index)),
            _ignore_errors=True,
        )
        worker.yielded.connect(lambda item, token=token: self._on_yielded(token, item))
        worker.returned.connect(lambda result, token=token, job=job: self._on_opened(token, job, result))
        worker.errored.connect(lambda exc, token=token, job=job: self._on_errored(token, job, exc))
        worker.finished.connect(lambda token=token: self._on_finished(token))
        self._worker = worker
        self._worker_box["worker"] = worker
        self._set_status(f"Opening {entry.name}…")
        freeze_long_lived(self.viewer)
        worker.start()
        return worker

    def _job_for(self, index: int) -> dict[str, Any]:
        s = self.session
        assert s is not None
        modality = s.settings.get("modality") or self.modality_combo.currentText()
        spec, device = self.current_model(), self.device_combo.currentText() or "auto"
        return {"index": index, "name": s.entries[index].mask_stem, "spec": spec, "device": device,
                "modality": modality, "key": (index, spec, device, modality, str(s.output))}

    def _start_prefetch(self) -> None:
        """Segment the next image without a mask in the background, so that Save & next shows
        its mask at once."""
        from napari.qt.threading import create_worker

        s = self.session
        if s is None or self._shown.get("index") is None or not alive(self):
            return
        target = s.next_todo(self._shown["index"])
        if target is None or target == self._shown["index"] or s.draft_path(target).is_file():
            return
        job = self._job_for(target)
        if self._prefetch.get("key") == job["key"]:
            return
        _quit({"worker": self._prefetch.get("worker")})
        entry = {"key": job["key"], "index": target, "result": None, "waiting": None, "failed": False}
        worker = create_worker(
            guard_worker,
            _open_job(self.model_cache, s.entries[target].path, None, None, job["spec"], job["device"],
                      job["modality"]),
            _ignore_errors=True,
        )
        entry["worker"] = worker
        self._worker_box["prefetch"] = worker  # stopped with the dock
        worker.returned.connect(lambda result, entry=entry: self._on_prefetched(entry, result))
        worker.errored.connect(lambda exc, entry=entry: self._on_prefetch_failed(entry))
        self._prefetch = entry
        freeze_long_lived(self.viewer)
        worker.start()

    def _on_prefetched(self, entry: dict[str, Any], result: dict[str, Any]) -> None:
        entry["worker"] = None
        entry["result"] = result
        waiting = entry.get("waiting")
        if waiting is not None and alive(self) and waiting[0] == self._token:
            self._prefetch = {}
            self._worker = None
            self._worker_box["worker"] = None
            self._on_opened(waiting[0], waiting[1], result)

    def _on_prefetch_failed(self, entry: dict[str, Any]) -> None:
        entry["worker"] = None
        entry["failed"] = True
        waiting = entry.get("waiting")
        if waiting is not None and alive(self) and waiting[0] == self._token:
            self._prefetch = {}
            self._worker = None
            self._worker_box["worker"] = None
            self.open_index(waiting[1]["index"])  # again in the foreground: its error is reported

    def _on_yielded(self, token: int, item: tuple) -> None:
        if token != self._token or not alive(self):
            return
        if item[0] == "segmenting":
            self._set_status(f"Segmenting {item[1]} ({item[2]})…")

    def _on_finished(self, token: int) -> None:
        if token == self._token:
            self._worker = None
            self._worker_box["worker"] = None

    def _on_errored(self, token: int, job: dict[str, Any], exc: BaseException) -> None:
        if token != self._token or not alive(self):
            return
        original = getattr(exc, "original", exc)
        self._set_status(f"Failed to open or segment image {job['index'] + 1}: {original}")
        notify("error", f"annotating {self.session.name(job['index']) if self.session else '?'} failed: {original}")

    def _on_opened(self, token: int, job: dict[str, Any], result: dict[str, Any]) -> None:
        if token != self._token or not alive(self) or self.session is None:
            return
        s = self.session
        index = job["index"]
        if result.get("error"):
            s.mark_unreadable(index, result["error"])
            notify("warning", f"{s.name(index)} cannot be read and is skipped: {s.unreadable[s.name(index)]}")
            self._refresh()
            target = s.next_todo(index)
            if target is not None:
                self.open_index(target)
            return
        self.save_draft()  # edits made to the previous image while this one opened
        image = result["image"]
        name = job["name"]
        names = output_names(name)
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
        run = result.get("run")
        model_info = result.get("model") or {}
        if run is not None:
            mask = threshold_mask(run.probability, THRESHOLD)
            provenance = self._provenance(job, run, model_info, image)
            source = "segmented"
        else:
            mask = np.asarray(result["labels"])
            provenance = dict(result.get("provenance") or {})
            source = result["source"]
            if s.is_done(index):
                s.load_mask(index)  # the user opened it (or a draft of it): Save may replace it
        tag = str(s.output)
        # a draft holds the user's corrections: no fingerprint, so it counts as edited
        record = {**provenance, "kind": "mask", "annotate": tag,
                  "fingerprint": "" if source == "draft" else fingerprint(mask)}
        layers = self._show(name, names, image, rgb, None if run is None else run.heatmap, mask, record, tag)
        labels = layers["labels"]
        self.viewer.layers.selection.active = labels
        self._shown = {"index": index, "layers": {k: weakref.ref(v) for k, v in layers.items()},
                       "labels": weakref.ref(labels), "name": name}
        made_by = (self.model_name(job["spec"]) if source == "segmented"
                   else provenance.get("model_name") or self.model_name(provenance.get("model_file")))
        self.model_label.setText(f"Mask on screen made by: {made_by}")
        what = {"segmented": "segmented", "mask": "its saved mask (Save replaces it)",
                "draft": "your unsaved corrections (draft)"}[source]
        text = f"{s.name(index)}: {what}"
        if run is not None:
            text += f" by {made_by} in {run.seconds:.2f} s, modality {run.modality_summary}"
            decision = run.auto_decision
            if job["modality"] == "auto" and decision is not None:
                text += f" (auto, p={decision.confidence:.2f})"
                if decision.asks:
                    self._ask(decision)
                    notify("warning", f"{s.name(index)}: the model is unsure of the modality ({decision.describe()}; {decision.why()}); "
                                      "choose it in the De-LightSAM annotate panel")
        self._set_status(text + ". Correct it, then Save & next (Shift+S).")
        self._start_prefetch()

    def _provenance(self, job: dict[str, Any], run: Any, model_info: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
        from .. import __version__

        decision = run.auto_decision
        return {
            "model_file": model_info.get("checkpoint_path"),
            "model_sha256": model_info.get("checkpoint_sha256"),
            "model": job["spec"] if job["spec"] in (settings.BUNDLED, settings.UNTRAINED) else "file",
            "model_name": self.model_name(job["spec"]),
            "modality": job["modality"],
            "modality_used": run.modality_summary,
            "modality_probabilities": run.modality_probabilities[0] if run.modality_probabilities else None,
            "modality_unsure": bool(decision.asks) if decision is not None else None,
            "threshold": THRESHOLD,
            "instances": False,
            "input_layer": job["name"],
            "input_shape": list(image.shape),
            "time": utc_now(),
            "device": model_info.get("device"),
            "seconds": round(run.seconds, 3),
            "package_version": __version__,
        }

    def _show(self, name: str, names: dict[str, str], image: np.ndarray, rgb: bool, heatmap: np.ndarray | None,
              mask: np.ndarray, record: dict[str, Any], tag: str) -> dict[str, Any]:
        """Put the image, its heatmap and its mask on screen. The previous image's layers are
        reused (new data, new names), the refine widget's boxes and clicks layers too (emptied):
        removing and adding layers costs napari far more (a full garbage collection per removed
        layer) than Save & next may take."""
        old = {k: ref() for k, ref in (self._shown.get("layers") or {}).items()}
        old = {k: v for k, v in old.items() if v is not None and v in self.viewer.layers}
        previous_name = self._shown.get("name")
        prompts = []  # the refine widget's boxes/clicks layers of the previous image
        if previous_name:
            prompts = [layer for layer in self.viewer.layers
                       if (layer.metadata.get(METADATA_KEY, {}) or {}).get("image") == previous_name]
        doomed = []
        reusable = old.get("image") is not None and bool(old["image"].rgb) == rgb and "labels" in old
        if not reusable:
            doomed += list(old.values()) + prompts
            old, prompts = {}, []
        kept = set(map(id, old.values()))
        for layer in list(self.viewer.layers):  # left by a closed annotate panel of this session
            if id(layer) not in kept and (layer.metadata.get(METADATA_KEY, {}) or {}).get("annotate") == tag:
                doomed.append(layer)
        for layer in doomed:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._shown = {}
        image_meta = {METADATA_KEY: {"kind": "annotate-image", "annotate": tag}}
        heat_meta = {METADATA_KEY: {"kind": "heatmap", "annotate": tag}}
        if old:
            image_layer = old["image"]
            image_layer.data = image
            image_layer.metadata = image_meta
            image_layer.name = name
            image_layer.reset_contrast_limits()
        else:
            image_layer = self.viewer.add_image(image, name=name, rgb=rgb, metadata=image_meta)
        for layer in prompts:
            if not reuse_prompt_layer(layer, image_layer):
                self.viewer.layers.remove(layer)
        out: dict[str, Any] = {"image": image_layer}
        heat = old.get("heatmap")
        if heatmap is not None:
            if heat is not None:
                hidden = heat.metadata.get(METADATA_KEY, {}).get("hidden_while_empty")
                heat.data = heatmap
                heat.name = names["heatmap"]
                heat.metadata = heat_meta
                if hidden is not None:
                    heat.visible = hidden  # as the user had it before an image without a heatmap
            else:
                heat = self.viewer.add_image(heatmap, name=names["heatmap"], colormap="inferno", opacity=0.5,
                                             blending="translucent", contrast_limits=(0.0, 1.0), metadata=heat_meta)
            out["heatmap"] = heat
        elif heat is not None:
            # this image has none (a saved mask, a draft): the layer is kept for the next image,
            # emptied and hidden -- removing it would cost napari a full garbage collection
            was = heat.metadata.get(METADATA_KEY, {}).get("hidden_while_empty", heat.visible)
            heat.data = np.zeros(image.shape[:2], dtype=np.float32)
            heat.name = f"{names['heatmap']} (none)"
            heat.metadata = {METADATA_KEY: {**heat_meta[METADATA_KEY], "hidden_while_empty": was}}
            heat.visible = False
            out["heatmap"] = heat
        labels = old.get("labels")
        if labels is not None:
            labels.data = mask
            labels.metadata = {METADATA_KEY: record}
            labels.name = names["mask"]
            reset = getattr(labels, "_reset_history", None)
            if reset is not None:
                reset()  # undo must not reach into the previous image
        else:
            labels = self.viewer.add_labels(mask, name=names["mask"], opacity=0.6, metadata={METADATA_KEY: record})
            labels.events.paint.connect(self._schedule_draft)
            labels.events.data.connect(self._schedule_draft)
        # the mask on top of the heatmap, the heatmap on top of the image
        order = [layer for layer in (image_layer, out.get("heatmap"), labels) if layer is not None]
        indices = [self.viewer.layers.index(layer) for layer in order]
        if indices != sorted(indices):
            for layer in order:
                self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
        out["labels"] = labels
        return out

    # -- auto modality ---------------------------------------------------------------------------

    def _ask(self, decision: Any) -> None:
        self.ask_label.setText(
            f"Not sure which modality these images are ({decision.why()}). The mask shown is for "
            f"{decision.modality}. Which is it? (Kept for the whole folder.)"
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
        """The answer to the ``auto`` question: the session's modality from now on; the image on
        screen is segmented again when the answer differs and its mask is not edited yet."""
        self.ask_box.setVisible(False)
        if self.session is None or modality not in MODALITIES:
            return None
        self.session.set_setting("modality", modality)
        self.modality_combo.setCurrentText(modality)
        labels = self._labels()
        record = (labels.metadata.get(METADATA_KEY, {}) or {}) if labels is not None else {}
        if labels is None or record.get("modality_used") == modality:
            self._set_status(f"Modality {modality} for this folder.")
            return None
        if was_edited(labels.data, labels.metadata):
            self._set_status(f"Modality {modality} for the next images; your corrected mask here is kept.")
            return None
        return self.open_index(self._shown["index"])

    # -- saving -------------------------------------------------------------------------------------

    def _labels(self) -> Any | None:
        ref = self._shown.get("labels")
        layer = ref() if ref is not None else None
        return layer if layer is not None and layer in self.viewer.layers else None

    def save_and_next(self) -> list[Path]:
        """Save the mask on screen (+ sidecar), then open the next image without a mask."""
        from ..annotate import MaskExistsError
        from .export import ExportError, provenance_from_metadata

        s = self.session
        labels = self._labels()
        if self.busy:  # the next image is still opening: the mask on screen was saved already
            self._set_status("Still opening the image; Save & next when its mask is on screen.")
            return []
        if s is None or labels is None or self._shown.get("index") is None:
            notify("warning", "nothing to save: start a session and wait for the image to open")
            return []
        index = self._shown["index"]
        data = np.asarray(labels.data)
        provenance = provenance_from_metadata(labels.metadata, data)
        try:
            try:
                written = s.save(index, data, provenance=provenance, layer_name=labels.name)
            except MaskExistsError:
                if not self._confirm_overwrite(s.mask_path(index)):
                    self._set_status("Not saved: the existing mask was kept.")
                    return []
                written = s.save(index, data, provenance=provenance, layer_name=labels.name, overwrite=True)
        except (ExportError, OSError) as exc:
            notify("error", f"saving the mask of {s.name(index)} failed: {exc}")
            self._set_status(f"Not saved: {exc}")
            return []
        self._draft_timer.stop()
        labels.metadata = {METADATA_KEY: {**(labels.metadata.get(METADATA_KEY, {}) or {}),
                                          "fingerprint": fingerprint(data)}}
        self._refresh()
        if self.learner is not None and self.learner.due() and not self.learning:
            self.finetune_now()
        target = s.next_todo(index)
        if target is None:
            self._set_status(f"Saved {written[0].name}. All {s.readable_count} images are done.")
            notify("info", f"all {s.readable_count} images of the folder have a mask")
            return written
        self.open_index(target)
        self._set_status(f"Saved {written[0].name}; opening {s.name(target)}…")
        return written

    def _confirm_overwrite(self, path: Path) -> bool:
        answer = QMessageBox.question(
            self, "Replace the mask?", f"{path} exists already and was not opened here.\n\nReplace it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _schedule_draft(self, *_: Any) -> None:
        if alive(self):
            self._draft_timer.start()

    def save_draft(self) -> Path | None:
        """Keep the corrections on screen as a draft (only when the mask was edited and not saved)."""
        s, labels = self.session, self._labels()
        if s is None or labels is None or self._shown.get("index") is None:
            return None
        if not was_edited(labels.data, labels.metadata):
            return None
        record = {k: v for k, v in (labels.metadata.get(METADATA_KEY, {}) or {}).items()
                  if k not in ("fingerprint", "kind", "annotate")}
        record["edited_after_segmentation"] = True  # a draft exists only for an edited mask
        try:
            return s.save_draft(self._shown["index"], np.asarray(labels.data), provenance=record)
        except OSError as exc:
            notify("warning", f"could not keep a draft of the mask: {exc}")
            return None

    # -- teardown -------------------------------------------------------------------------------

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.save_draft()
        self._draft_timer.stop()
        _quit(self._worker_box)
        self._unbind_keys()
        release()
        super().closeEvent(event)


def _open_job(cache: ModelCache, path: Path, existing: Path | None, draft: Path | None, spec: str, device: str,
              modality: str, draft_provenance: dict[str, Any] | None = None):
    """Worker body: read the image; its saved mask, else its draft, else segment it."""
    start_layer_warmup()  # napari's first-layer imports, off the GUI thread
    from ..image_files import ImageReadError, read_image
    from .export import read_labels

    try:
        image = read_image(path)
        prepared = prepare_input(image, image.ndim == 3 and image.shape[-1] in (3, 4), path.stem)
    except (ImageReadError, InputError) as exc:
        return {"error": str(exc)}
    if prepared.stack:
        return {"error": f"holds {prepared.n_slices} planes; the annotator takes 2D images (grey or RGB)"}
    if draft is not None and draft.is_file():  # unsaved corrections: newer than any saved mask
        import tifffile

        try:
            labels = tifffile.imread(draft)
            if labels.shape == prepared.plane_shape:
                provenance = draft_provenance or (_sidecar_provenance(existing) if existing is not None else {})
                return {"image": image, "labels": labels, "source": "draft", "provenance": provenance}
        except Exception:  # noqa: BLE001 -- a damaged draft: the saved mask, or segment again
            pass
    if existing is not None:
        return {"image": image, "labels": read_labels(existing), "source": "mask",
                "provenance": _sidecar_provenance(existing)}
    yield ("segmenting", path.name, f"loading the model on {device}" if not cache.is_loaded(spec, device) else modality)
    segmenter = cache.get(spec, device)
    info = {
        "checkpoint_path": str(segmenter.checkpoint_path) if getattr(segmenter, "checkpoint_path", None) else None,
        "checkpoint_sha256": getattr(segmenter, "checkpoint_sha256", None),
        "device": str(getattr(segmenter, "device", device)),
    }
    gen = iterate_segmentation(segmenter, prepared, modality, THRESHOLD)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return {"image": image, "run": stop.value, "model": info, "source": "segmented"}


def _release(holder: dict[str, Any], worker: Any) -> None:
    if holder.get("worker") is worker:
        holder.pop("worker", None)
        holder.pop("job", None)


def _sidecar_provenance(mask: Path) -> dict[str, Any]:
    """What the saved mask's sidecar says about how it was made (kept when it is saved again)."""
    import json

    from .export import sidecar_path

    try:
        record = json.loads(sidecar_path(mask).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = ("model_file", "model_sha256", "model_name", "modality", "modality_used", "threshold", "boxes", "box_model")
    return {k: record.get(k) for k in keys if record.get(k) is not None}


def _quit(state: dict[str, Any]) -> None:
    """Ask the workers in ``state`` ("worker", and "prefetch" when given) to stop, and the
    fine-tune round in ``state["learn"]`` (its child process gets SIGINT; nothing is adopted)."""
    learn = state.get("learn")
    if learn:
        learn["stop"] = True
        job = learn.get("job")
        if job is not None:
            job.stop(grace_s=10.0)
        worker = learn.get("worker")
        if worker is not None:
            try:
                worker.quit()
            except RuntimeError:
                pass
    for key in ("worker", "prefetch"):
        worker = state.get(key)
        if worker is not None:
            try:
                worker.quit()
            except RuntimeError:
                pass


__all__ = ["AnnotateWidget", "SAVE_NEXT_KEY"]
