"""napari notifications for the De-LightSAM widgets (one helper, public, for every widget).

``notify("error", "...", actions=(("Retry on CPU", callback),))`` puts a message prefixed with
"De-LightSAM:" in napari's notification area; ``kind`` is "info", "warning" or anything else for
an error. ``alive(widget)`` says whether a Qt widget still exists (callbacks of workers may arrive
after a dock was closed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["alive", "notify"]


def notify(kind: str, message: str, actions: Sequence[tuple[str, Callable[..., Any]]] = ()) -> None:
    """A napari notification (info / warning / error), optionally with action buttons."""
    from napari.utils.notifications import Notification, NotificationSeverity, notification_manager

    severity = {"info": NotificationSeverity.INFO, "warning": NotificationSeverity.WARNING}.get(
        kind, NotificationSeverity.ERROR
    )
    notification_manager.dispatch(
        Notification(f"De-LightSAM: {message}", severity=severity, actions=tuple(actions))
    )


def alive(widget: Any) -> bool:
    """False once the Qt object behind ``widget`` (a QWidget, or a magicgui widget's ``native``)
    has been deleted."""
    try:
        # on a deleted PyQt wrapper even the attribute lookup raises RuntimeError
        native = getattr(widget, "native", widget)
        native.objectName()
    except RuntimeError:
        return False
    return True
