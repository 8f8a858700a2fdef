"""Small helpers the De-LightSAM dock widgets share: model labels and the device menu.

(Notifications and Qt liveness are in ``notify``.) Importing this module imports neither Qt
nor napari.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["checkpoint_label", "device_choices"]


def checkpoint_label(path: str | Path) -> str:
    """A checkpoint as a menu shows it: ``<folder>/<file>`` (``run-3/best.safetensors``)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def device_choices() -> list[str]:
    """A device menu's entries: ``auto`` and the devices found here; ``auto, cpu`` if probing fails."""
    try:
        from ..devices import device_choices as probe

        return probe()
    except Exception:  # noqa: BLE001 -- torch probing failed: CPU still works
        return ["auto", "cpu"]
