"""The "De-LightSAM fine-tune" dock widget: train on (image, corrected labels) pairs from the viewer.

Training runs in a child process (``delightsam train --progress-jsonl``, see ``finetune_job``);
a napari generator worker streams its events to this widget (progress, loss, validation Dice,
a live plot). Stop ends the child cleanly (it validates and keeps the best checkpoint). When
the run ends, the segment widget of the same viewer switches to the new best checkpoint; the
previous model stays in its combo.

While training runs, a 50 ms ``QTimer`` on the GUI thread measures responsiveness: the
largest gap between ticks is shown at the end (``tick_stats``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..config import MODALITIES
from . import registry, settings
from ._llvm import avoid_triton_llvm_clash
from .common import checkpoint_label, device_choices
from .core import METADATA_KEY, check_output_dir, default_run_dir, guard_worker, output_names
from .finetune_job import FinetuneSettings, TrainingPair, run_finetune
from .gc_policy import freeze_long_lived, release
from .notify import alive, notify

if TYPE_CHECKING:
    import napari

TICK_MS = 50



#: the "What trains" choices
TRAINS_CONTROLLERS_PROMPTS = "controllers + prompt generator (backbone and mask decoder fixed)"
TRAINS_CONTROLLERS = "controllers + heads (backbone fixed)"
TRAINS_ALL = "everything"

class FinetuneWidget(QWidget):
    """Dock widget: fine-tune De-LightSAM on the user's annotations, in a child process."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        avoid_triton_llvm_clash()  # before anything imports the model (see _llvm.py)
        # napari hands plugins a PublicOnlyProxy; keep the real viewer so layer identity and
        # weak references behave (proxies are re-created on every attribute access)
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.setObjectName("DeLightSAMFinetuneWidget")
        self.pairs: list[dict[str, str]] = []
        self._worker: Any = None
        self._holder: dict[str, Any] = {}
        self._started_at = 0.0
        self._last_tick = 0.0
        self.tick_gaps: list[float] = []
        self.last_summary: dict[str, Any] | None = None
        self.best_checkpoint: str | None = None
        #: validation Dice of the starting model (the trainer's "initial" event)
        self.initial_dice: float | None = None
        self._steps_total = 0
        self._build_ui()
        self.reset_choices()
        self._timer = QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._tick)
        holder = self._holder
        self.destroyed.connect(lambda *_: _stop_holder(holder))

    # -- UI ------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        from magicgui.widgets import create_widget
        from napari.layers import Image, Labels

        layout = QVBoxLayout(self)

        pairs_box = QGroupBox("Training pairs (image layer + corrected labels layer)")
        pv = QVBoxLayout(pairs_box)
        self.pairs_table = QTableWidget(0, 3)
        self.pairs_table.setHorizontalHeaderLabels(["Image", "Labels", "Modality"])
        self.pairs_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.pairs_table.verticalHeader().setVisible(False)
        self.pairs_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.pairs_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.pairs_table.setMinimumHeight(90)
        self.pairs_table.setMaximumHeight(150)
        pv.addWidget(self.pairs_table)
        add_row = QHBoxLayout()
        # magicgui's layer-typed combo boxes; napari calls reset_choices (below) on layer changes
        self.image_combo = create_widget(
            annotation=Image, options={"choices": self._image_choices, "tooltip": "Image layer"}
        )
        self.image_combo.changed.connect(lambda layer: self._suggest_labels(layer.name if layer is not None else ""))
        self.labels_combo = create_widget(
            annotation=Labels,
            options={"choices": self._labels_choices,
                     "tooltip": "Labels layer with the corrected mask (any label > 0 = target)"},
        )
        self.pair_modality_combo = QComboBox()
        self.pair_modality_combo.addItems(list(MODALITIES))
        self.pair_modality_combo.setToolTip("Modality of this pair")
        for w in (self.image_combo.native, self.labels_combo.native, self.pair_modality_combo):
            w.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            w.setMinimumContentsLength(6)
            add_row.addWidget(w, 1)
        pv.addLayout(add_row)
        buttons = QHBoxLayout()
        self.add_pair_button = QPushButton("Add pair")
        self.add_pair_button.clicked.connect(self.add_pair_from_combos)
        self.remove_pair_button = QPushButton("Remove selected")
        self.remove_pair_button.clicked.connect(self.remove_selected_pairs)
        buttons.addWidget(self.add_pair_button)
        buttons.addWidget(self.remove_pair_button)
        pv.addLayout(buttons)
        folder_row = QHBoxLayout()
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("optional: folder in <modality>/<dataset>/{images,masks} layout")
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.clicked.connect(lambda: self._browse_into(self.folder_edit, "Training data folder"))
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(browse)
        pv.addLayout(folder_row)
        layout.addWidget(pairs_box)

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 10000)
        self.epochs_spin.setValue(5)
        form.addRow("Epochs", self.epochs_spin)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 100000)
        self.steps_spin.setValue(10)
        self.steps_spin.setSpecialValueText("one pass over the images")
        form.addRow("Steps per epoch", self.steps_spin)
        self.img_size_combo = QComboBox()
        self.img_size_combo.addItems(["128", "256", "512", "1024"])
        self._img_size_chosen = False  # once the user picks a size, device changes keep it
        self.img_size_combo.activated.connect(lambda *_: setattr(self, "_img_size_chosen", True))
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(2)
        form.addRow("Image size", self.img_size_combo)
        form.addRow("Batch size", self.batch_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(1e-4)
        form.addRow("Learning rate", self.lr_spin)
        self.trains_combo = QComboBox()
        self.trains_combo.addItems([TRAINS_CONTROLLERS_PROMPTS, TRAINS_CONTROLLERS, TRAINS_ALL])
        self.trains_combo.setToolTip(
            "Controllers + prompt generator (the default): the shared backbone and the mask decoder keep "
            "what they learned from many images; on a few annotated images this lost the least on other "
            "images (weights/MODEL_CARD.md). Controllers + heads: the mask decoder adapts too. "
            "Everything: the backbone adapts as well."
        )
        form.addRow("What trains", self.trains_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(device_choices())
        self.device_combo.currentTextChanged.connect(self._default_img_size)
        form.addRow("Device", self.device_combo)
        self._default_img_size(self.device_combo.currentText())
        self.init_label = QLabel()
        self.init_label.setWordWrap(True)
        self.init_label.setToolTip("Fine-tuning starts from the model selected in the segment widget")
        form.addRow("Start from", self.init_label)
        out_row = QHBoxLayout()
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("default: next to the image file, else ~/delightsam-runs/<time>")
        out_browse = QPushButton("…")
        out_browse.setFixedWidth(28)
        out_browse.clicked.connect(lambda: self._browse_into(self.out_edit, "Output folder"))
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(out_browse)
        form.addRow("Output", out_row)
        layout.addLayout(form)

        run_row = QHBoxLayout()
        self.start_button = QPushButton("Start fine-tuning")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        run_row.addWidget(self.start_button)
        run_row.addWidget(self.stop_button)
        layout.addLayout(run_row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("Add pairs, then Start.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        self.plot = _make_plot()
        layout.addWidget(self.plot)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(500)
        self.log.setMinimumHeight(80)
        self.log.setMaximumHeight(140)
        layout.addWidget(self.log)
        layout.addStretch(1)
        self._update_init_label()

    def _default_img_size(self, device: str) -> None:
        # the starting model's own training size (its scale of objects); on a CPU at most 512 to keep
        # a fine-tune to minutes; from scratch 1024 (the paper's size) on a GPU, 256 on a CPU
        if self._img_size_chosen:
            return
        gpu = device.startswith("cuda") or (device == "auto" and any(d.startswith("cuda") for d in device_choices()))
        native = self._init_img_size()
        if native is None:
            size = 1024 if gpu else 256
        else:
            size = native if gpu else min(native, 512)
        if self.img_size_combo.findText(str(size)) < 0:
            self.img_size_combo.addItem(str(size))
        self.img_size_combo.setCurrentText(str(size))

    def _init_img_size(self) -> int | None:
        """The image size stored in the starting checkpoint (header only), or None."""
        path, _ = self._init_checkpoint()
        if path is None:
            return None
        try:
            from ..checkpoint import read_checkpoint_info

            return int(read_checkpoint_info(path)[0].img_size)
        except Exception:  # noqa: BLE001 - a bad file is reported when training starts
            return None

    def _browse_into(self, edit: QLineEdit, title: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, title, edit.text() or str(Path.home()))
        if folder:
            edit.setText(folder)

    def _log(self, text: str) -> None:
        if alive(self):
            self.log.appendPlainText(text)

    def _set_status(self, text: str) -> None:
        if alive(self):
            self.status_label.setText(text)

    # -- layers and pairs ----------------------------------------------------------------------

    def _image_choices(self, _combo: Any = None) -> list[Any]:
        """The viewer's Image layers, without the segment widget's heatmap and probability outputs."""
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)
                and layer.metadata.get(METADATA_KEY, {}).get("kind") not in ("heatmap", "probability")]

    def _labels_choices(self, _combo: Any = None) -> list[Any]:
        from napari.layers import Labels

        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)]

    def reset_choices(self, *_: Any) -> None:
        """Refill the layer combos (napari calls this on every layer-list change), keeping the
        chosen layers, then suggest the labels and modality of the chosen image."""
        if not alive(self):
            return
        for combo in (self.image_combo, self.labels_combo):
            previous = combo.value
            with combo.changed.blocked():
                combo.reset_choices()
                if previous is not None and any(layer is previous for layer in combo.choices):
                    combo.value = previous
        image = self.image_combo.value
        self._suggest_labels(image.name if image is not None else "")
        self._update_init_label()

    def _suggest_labels(self, image_name: str) -> None:
        """Pre-select the labels layer and modality that belong to ``image_name``."""
        if not image_name:
            return
        by_name = {layer.name: layer for layer in self.labels_combo.choices}
        names = list(by_name)
        # the newest De-LightSAM result of this image (the user corrects it), else any labels
        # layer named after the image (e.g. a sample's reference mask)
        ours = [n for n in names if n.startswith(output_names(image_name)["mask"])]
        others = [n for n in names if n.startswith(image_name) and n not in ours]
        choice = ours[-1] if ours else (others[0] if others else None)
        if choice:
            self.labels_combo.value = by_name[choice]
        modality = self._guess_modality(image_name, choice)
        if modality:
            self.pair_modality_combo.setCurrentText(modality)

    def _guess_modality(self, image_name: str, labels_name: str | None) -> str | None:
        layers = {layer.name: layer for layer in self.viewer.layers}
        if labels_name in layers:
            used = layers[labels_name].metadata.get(METADATA_KEY, {}).get("modality_used")
            if used in MODALITIES:
                return used
        image = layers.get(image_name)
        if image is not None:
            sample = image.metadata.get("delightsam_sample", {}).get("modality")
            if sample in MODALITIES:
                return sample
        seg = registry.segment_widget_for(self.viewer)
        if seg is not None and seg.modality_combo.currentText() in MODALITIES:
            return seg.modality_combo.currentText()
        return None

    def add_pair(self, image_name: str, labels_name: str, modality: str) -> bool:
        """Add a training pair by layer names; False (with a notification) when it cannot be used."""
        layers = {layer.name: layer for layer in self.viewer.layers}
        image, labels = layers.get(image_name), layers.get(labels_name)
        if image is None or labels is None:
            notify("warning", "choose an image layer and a labels layer for the pair")
            return False
        if modality not in MODALITIES:
            notify("warning", f"choose the modality of '{image_name}'")
            return False
        spatial = image.data.shape[:-1] if getattr(image, "rgb", False) else image.data.shape
        if tuple(labels.data.shape) != tuple(spatial):
            notify("error", f"'{labels_name}' has shape {labels.data.shape} but '{image_name}' is {tuple(spatial)}; "
                             "a pair needs labels of the image's size")
            return False
        if any(p["image"] == image_name and p["labels"] == labels_name for p in self.pairs):
            return False
        self.pairs.append({"image": image_name, "labels": labels_name, "modality": modality})
        row = self.pairs_table.rowCount()
        self.pairs_table.insertRow(row)
        for col, text in enumerate((image_name, labels_name, modality)):
            self.pairs_table.setItem(row, col, QTableWidgetItem(text))
        return True

    def add_pair_from_combos(self) -> bool:
        image, labels = self.image_combo.value, self.labels_combo.value
        return self.add_pair(image.name if image is not None else "", labels.name if labels is not None else "",
                             self.pair_modality_combo.currentText())

    def remove_selected_pairs(self) -> None:
        rows = sorted({i.row() for i in self.pairs_table.selectedIndexes()}, reverse=True)
        for row in rows:
            self.pairs_table.removeRow(row)
            del self.pairs[row]

    # -- model to start from ---------------------------------------------------------------------

    def _init_checkpoint(self) -> tuple[str | None, str]:
        """(checkpoint path or None for "from scratch", description)."""
        seg = registry.segment_widget_for(self.viewer)
        spec = seg.current_model() if seg is not None else settings.last_model() or settings.BUNDLED
        if spec not in (settings.BUNDLED, settings.UNTRAINED) and Path(spec).is_file():
            return spec, checkpoint_label(spec)
        if spec == settings.UNTRAINED:
            return None, "random weights (the segment widget's untrained model)"
        try:
            from ..checkpoint import bundled_checkpoint_path

            bundled = bundled_checkpoint_path()
        except Exception:  # noqa: BLE001
            bundled = None
        if bundled is not None:
            return str(bundled), f"bundled model ({Path(bundled).name})"
        return None, "random weights (no bundled model installed)"

    def _update_init_label(self) -> None:
        if alive(self):
            self.init_label.setText(self._init_checkpoint()[1])
            self._default_img_size(self.device_combo.currentText())

    # -- running ---------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def current_settings(self) -> FinetuneSettings:
        init, _ = self._init_checkpoint()
        return FinetuneSettings(
            epochs=self.epochs_spin.value(),
            steps_per_epoch=self.steps_spin.value() or None,
            img_size=int(self.img_size_combo.currentText()),
            lr=float(self.lr_spin.value()),
            batch_size=self.batch_spin.value(),
            device=self.device_combo.currentText() or "auto",
            init=init,
            freeze_backbone=self.trains_combo.currentText() != TRAINS_ALL,
            freeze_decoder=self.trains_combo.currentText() == TRAINS_CONTROLLERS_PROMPTS,
        )

    def _collect_pairs(self) -> list[TrainingPair] | None:
        layers = {layer.name: layer for layer in self.viewer.layers}
        out = []
        for p in self.pairs:
            image, labels = layers.get(p["image"]), layers.get(p["labels"])
            if image is None or labels is None:
                notify("error", f"layer '{p['image'] if image is None else p['labels']}' of a training pair is gone; "
                                 "remove that pair")
                return None
            data = image.data[0] if getattr(image, "multiscale", False) else image.data
            # copies: the user may keep painting while the data is written out
            out.append(TrainingPair(image=data.copy() if hasattr(data, "copy") else data,
                                    labels=labels.data.copy(), modality=p["modality"], name=p["image"],
                                    rgb=bool(getattr(image, "rgb", False))))
        return out

    def _output_dir(self) -> Path:
        text = self.out_edit.text().strip()
        if text:
            out = check_output_dir(text)
            if out.is_dir() and any(out.iterdir()):
                # never mix with an earlier run: a fresh sub-folder
                from .core import timestamp

                out = out / f"run-{timestamp()}"
            return out
        source = None
        layers = {layer.name: layer for layer in self.viewer.layers}
        for p in self.pairs:
            layer = layers.get(p["image"])
            source = getattr(getattr(layer, "source", None), "path", None) if layer is not None else None
            if source:
                break
        return check_output_dir(default_run_dir(source))

    def start(self) -> Any:
        """Write the pairs, start ``delightsam train`` as a child process; returns the worker."""
        if self.busy:
            notify("info", "a fine-tune is already running; press Stop to end it")
            return None
        folder = self.folder_edit.text().strip() or None
        if not self.pairs and not folder:
            notify("warning", "add at least one (image, labels) pair or choose a training folder")
            return None
        pairs = self._collect_pairs()
        if pairs is None:
            return None
        try:
            out_dir = self._output_dir()
        except ValueError as exc:
            notify("error", str(exc))
            return None
        cfg = self.current_settings()
        return self._start_worker(pairs, folder, cfg, out_dir)

    def _start_worker(self, pairs: list[TrainingPair], folder: str | None, cfg: FinetuneSettings,
                      out_dir: Path) -> Any:
        from napari.qt.threading import create_worker

        self._holder.clear()
        self.last_summary = None
        self.best_checkpoint = None
        self.initial_dice = None
        self.plot.clear()
        self.log.clear()
        self._steps_total = cfg.epochs * (cfg.steps_per_epoch or 0)
        self.progress_bar.setRange(0, max(self._steps_total, 0))
        self.progress_bar.setValue(0)
        self._log(f"output folder: {out_dir}")
        self._log(f"start from: {cfg.init or 'random weights'} · {cfg.epochs} epochs × "
                  f"{cfg.steps_per_epoch or 'all'} steps · {cfg.img_size}px · lr {cfg.lr:g} · {cfg.device}")
        worker = create_worker(guard_worker, run_finetune(pairs, folder, cfg, out_dir, self._holder), _ignore_errors=True)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._holder["worker"] = worker
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self._set_status("Preparing the training data…")
        self.tick_gaps = []
        self._last_tick = time.perf_counter()
        self._started_at = self._last_tick
        self._timer.start()
        freeze_long_lived(self.viewer)
        worker.start()
        return worker

    def stop(self) -> None:
        """Stop the child cleanly (SIGINT: it validates and keeps the best checkpoint)."""
        job = self._holder.get("job")
        self._holder["stop"] = True
        if job is not None:
            job.stop()
        self._set_status("Stopping: the trainer validates the current weights and keeps the best checkpoint…")
        if alive(self):
            self.stop_button.setEnabled(False)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.tick_gaps.append((now - self._last_tick) * 1000.0)
        self._last_tick = now

    @property
    def tick_stats(self) -> dict[str, float]:
        """GUI responsiveness while training: gaps between 50 ms timer ticks, in ms."""
        gaps = self.tick_gaps
        if not gaps:
            return {"ticks": 0, "max_gap_ms": math.nan, "mean_gap_ms": math.nan}
        return {"ticks": len(gaps), "max_gap_ms": max(gaps), "mean_gap_ms": sum(gaps) / len(gaps)}

    def _on_event(self, event: dict[str, Any] | None) -> None:
        if event is None or not alive(self):
            return
        kind = event.get("event")
        if kind == "status":
            self._set_status(str(event.get("message", "")))
        elif kind == "data":
            counts = ", ".join(f"{n} {m}" for m, n in sorted(event["counts"].items()))
            tiled = event.get("tiled") or []
            if tiled:  # large microscopy / fundus layers: their tiles, at the scale of tiled inference
                it = "it" if len(tiled) == 1 else "them"
                counts += f" ({', '.join(repr(name) for name in tiled)} as the tiles the new model will segment {it} in)"
            self._log(f"training images: {counts}")
        elif kind == "start":
            steps = int(event.get("steps_per_epoch") or 0)
            epochs = int(event.get("epochs") or 0)
            self._steps_total = steps * epochs
            self.progress_bar.setRange(0, max(self._steps_total, 1))
            self._log(f"training on {event.get('device')}: {event.get('n_train')} train / {event.get('n_val')} "
                      f"validation images, {epochs} epochs × {steps} steps")
            self._set_status("Training…")
        elif kind == "initial":
            dice = event.get("val_dice")
            if dice is not None:
                self.initial_dice = float(dice)
                self.plot.add_dice(0, float(dice))
                self._log(f"before training: val Dice {float(dice):.4f}")
        elif kind == "step":
            gs = int(event.get("global_step", 0))
            self.progress_bar.setValue(min(gs, self.progress_bar.maximum()))
            self.plot.add_loss(gs, float(event.get("loss", float("nan"))))
            self._set_status(f"epoch {int(event.get('epoch', 0)) + 1} · step {event.get('step')}/{event.get('steps')} · "
                             f"loss {float(event.get('loss', float('nan'))):.4f}")
        elif kind == "epoch":
            dice = event.get("val_dice")
            best = event.get("best_val_dice")
            gs = int(event.get("global_step", 0))
            if dice is not None:
                self.plot.add_dice(gs, float(dice))
            loss = event.get("train_loss")
            self._log(f"epoch {int(event.get('epoch', 0)) + 1}: loss {loss if loss is None else f'{loss:.4f}'} · "
                      f"val Dice {dice if dice is None else f'{dice:.4f}'} · best {best if best is None else f'{best:.4f}'}"
                      + (" (new best)" if event.get("improved") else ""))
        elif kind == "warning":
            self._log(f"warning: {event.get('message')}")
        elif kind == "error":
            self._log(f"error: {event.get('message')}")
        elif kind == "end":
            best = event.get("best_val_dice")
            best_text = f"{best:.4f}" if isinstance(best, (int, float)) else "n/a"
            epoch = event.get("best_epoch")
            self._log(f"{event.get('status')}: best val Dice {best_text}"
                      + (f" (epoch {int(epoch) + 1})" if isinstance(epoch, int) else ""))

    def _on_returned(self, summary: dict[str, Any]) -> None:
        self.last_summary = summary
        if not alive(self):
            return
        end = summary.get("end") or {}
        best = end.get("best_checkpoint")
        if not best:
            candidate = Path(summary.get("out_dir", "")) / "best.safetensors"
            best = str(candidate) if candidate.is_file() else None
        stats = self.tick_stats
        self._log(f"GUI responsiveness: max gap between {TICK_MS} ms ticks {stats['max_gap_ms']:.0f} ms "
                  f"(mean {stats['mean_gap_ms']:.0f} ms, {stats['ticks']} ticks)")
        stopped = bool(summary.get("stopped")) or end.get("status") == "stopped"
        failed = summary.get("returncode") not in (0, None) and not stopped
        if failed:
            lines = (summary.get("error") or summary.get("stderr") or "").strip().splitlines()
            reason = lines[-1] if lines else f"exit code {summary.get('returncode')}"
            if "out of memory" in reason.lower():
                reason += " (try a smaller image size or batch size, or the CPU)"
            self._set_status(f"Training failed: {reason}")
            notify("error", f"fine-tuning failed: {reason}")
            if best:
                self._log(f"the best checkpoint so far is kept: {best}")
                self._adopt(best, announce=False)
            return
        if not best:
            self._set_status("Training ended without a checkpoint (stopped before the first validation).")
            notify("warning", "fine-tuning ended without a checkpoint (stopped before the first validation)")
            return
        self._adopt(best)
        dice = end.get("best_val_dice")
        self._set_status(f"Fine-tuning {'stopped' if stopped else 'finished'}. Best checkpoint: {best}"
                         + (f" (val Dice {dice:.3f})" if isinstance(dice, (int, float)) else ""))
        if isinstance(dice, (int, float)) and self.initial_dice is not None and dice < self.initial_dice:
            # say so: the new model is selected, but the validation images got worse
            message = (f"validation Dice fell from {self.initial_dice:.3f} (before) to {dice:.3f}; "
                       "the previous model is still in the segment widget's model list "
                       "(try more epochs, a lower learning rate or more pairs)")
            self._log(f"warning: {message}")
            notify("warning", f"fine-tuning did not improve: {message}")

    def _adopt(self, best: str, announce: bool = True) -> None:
        """Hand the new checkpoint to the segment widget (or remember it for the next one)."""
        self.best_checkpoint = best
        seg = registry.segment_widget_for(self.viewer)
        if seg is not None and seg.use_checkpoint(best):
            where = "the segment widget now uses it (the previous model stays in its list)"
        else:
            settings.remember_model(best)
            where = "open 'De-LightSAM segment' to use it"
        self._log(f"new checkpoint: {best}; {where}")
        if announce:
            notify("info", f"fine-tuned model saved to {best}; {where}")

    def _on_errored(self, exc: BaseException) -> None:
        if alive(self):
            self._set_status(f"Fine-tuning failed: {exc}")
        notify("error", f"fine-tuning failed: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        self._holder.pop("worker", None)
        if alive(self):
            self._timer.stop()
            self.start_button.setEnabled(True)
            self.stop_button.setEnabled(False)

    def closeEvent(self, event: Any) -> None:  # noqa: N802
        _stop_holder(self._holder)
        release()
        super().closeEvent(event)


def _stop_holder(holder: dict[str, Any]) -> None:
    """Stop the child process and the worker (the widget or its viewer is going away)."""
    holder["stop"] = True
    job = holder.get("job")
    if job is not None:
        job.stop(grace_s=20.0)
    worker = holder.get("worker")
    if worker is not None:
        try:
            worker.quit()
        except RuntimeError:
            pass


def _make_plot() -> QWidget:
    from ._plot import LossPlot

    return LossPlot()

