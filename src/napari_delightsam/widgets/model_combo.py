"""The model menu the segment and annotate widgets share: the bundled model, untrained weights (for
testing), the checkpoints used lately, and "choose checkpoint file…"; the choice is remembered
(``settings``) for the next widget and session."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QWidget

from . import settings
from .common import checkpoint_label
from .notify import alive, notify

__all__ = ["CHOOSE_FILE", "MODEL_LABELS", "ModelCombo", "bundled_path"]

CHOOSE_FILE = "__choose__"
MODEL_LABELS = {
    settings.BUNDLED: "bundled model",
    settings.UNTRAINED: "untrained (random weights, for testing)",
}


def bundled_path() -> Path | None:
    """The bundled checkpoint, or None where it is not installed."""
    try:
        from ..checkpoint import bundled_checkpoint_path

        return bundled_checkpoint_path()
    except Exception:  # noqa: BLE001
        return None


class ModelCombo(QComboBox):
    """A combo box of models; ``current_model()`` is ``"bundled"``, ``"untrained"`` or a path."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._previous_index = 0
        self.setToolTip("Bundled model, a checkpoint file (.safetensors), or untrained weights")
        self.activated.connect(self.on_activated)
        self.populate()

    def populate(self) -> None:
        """Fill the menu and select the model chosen last (the bundled one where that is gone)."""
        self.blockSignals(True)
        self.clear()
        bundled = bundled_path()
        if bundled is not None:
            self.addItem(f"{MODEL_LABELS[settings.BUNDLED]} ({Path(bundled).name})", settings.BUNDLED)
        else:
            self.addItem(f"{MODEL_LABELS[settings.BUNDLED]} (not installed)", settings.BUNDLED)
            item = self.model().item(0)
            if item is not None:
                item.setEnabled(False)
        self.addItem(MODEL_LABELS[settings.UNTRAINED], settings.UNTRAINED)
        for path in settings.recent_checkpoints():
            self.addItem(checkpoint_label(path), path)
            self.setItemData(self.count() - 1, path, Qt.ItemDataRole.ToolTipRole)
        self.addItem("choose checkpoint file…", CHOOSE_FILE)
        last = settings.last_model()
        index = self.findData(last) if last else -1
        if index < 0 or (last == settings.BUNDLED and bundled is None):
            index = 0 if bundled is not None else self.findData(settings.UNTRAINED)
        self.setCurrentIndex(index)
        self._previous_index = index
        self.blockSignals(False)

    def current_model(self) -> str:
        """``"bundled"``, ``"untrained"`` or a checkpoint path."""
        return str(self.currentData())

    def on_activated(self, index: int) -> None:
        """The user picked entry ``index``: remember it, or ask for a file ("choose checkpoint
        file…"; cancelled or refused: the previous entry comes back)."""
        if self.itemData(index) == CHOOSE_FILE:
            path = self.ask_checkpoint_file()
            if not (path and self.use_checkpoint(path)):
                self.setCurrentIndex(self._previous_index)
            return
        self._previous_index = index
        settings.remember_model(self.current_model())

    def ask_checkpoint_file(self) -> str | None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a De-LightSAM checkpoint", str(Path.home()), "Checkpoints (*.safetensors);;All files (*)"
        )
        return path or None

    def use_checkpoint(self, path: str | Path, select: bool = True) -> bool:
        """Offer a checkpoint file in the menu (and select and remember it); False, with a
        message, if it is not a readable checkpoint (the selection stays). Entries added earlier
        stay selectable."""
        path = str(Path(path).expanduser().resolve())
        try:
            from ..checkpoint import read_checkpoint_info

            read_checkpoint_info(path)
        except Exception as exc:  # noqa: BLE001 -- any unreadable file -> one message
            notify("error", f"cannot use checkpoint {path}: {exc}")
            if alive(self):
                self.setCurrentIndex(self._previous_index)
            return False
        if not alive(self):
            return False
        index = self.findData(path)
        if index < 0:
            index = self.count() - 1  # before "choose checkpoint file…"
            self.insertItem(index, checkpoint_label(path), path)
            self.setItemData(index, path, Qt.ItemDataRole.ToolTipRole)
        if select:
            self.setCurrentIndex(index)
            self._previous_index = index
            settings.remember_model(path)
        return True
