"""Small helpers every De-LightSAM dock widget uses: notifications, Qt liveness, labels, devices.

Importing this module imports neither Qt nor napari (``notify`` imports napari when called).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["alive", "checkpoint_label", "device_choices", "notify"]


def notify(kind: str, message: str, actions: tuple = ()) -> None:
    """A napari notification prefixed "De-LightSAM: ".

    ``kind`` is ``"info"``, ``"warning"`` or anything else for an error; ``actions`` are
    ``(label, callback)`` buttons, e.g. ``(("Retry on CPU", retry),)``.
    """
    from napari.utils.notifications import Notification, NotificationSeverity, notification_manager

    severity = {"info": NotificationSeverity.INFO, "warning": NotificationSeverity.WARNING}.get(
        kind, NotificationSeverity.ERROR
    )
    notification_manager.dispatch(Notification(f"De-LightSAM: {message}", severity=severity, actions=actions))


def alive(obj: Any) -> bool:
    """False once the C++ side of a Qt object is deleted (a late worker signal must not touch it)."""
    try:
        obj.objectName()
    except RuntimeError:
        return False
    return True


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
