"""Remembered widget choices (last model, recent checkpoints) in a small JSON file.

The file is ``settings.json`` in ``$DELIGHTSAM_CONFIG_DIR`` or the platform's user config folder
(``~/.config/napari-delightsam`` on Linux). A missing or corrupt file means defaults; a failed
write is ignored (settings are a convenience, never a reason for an error dialog).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

MAX_RECENT = 8
#: Model choices that are not files.
BUNDLED = "bundled"
UNTRAINED = "untrained"


def config_dir() -> Path:
    env = os.environ.get("DELIGHTSAM_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "napari-delightsam"


def settings_file() -> Path:
    return config_dir() / "settings.json"


def load_settings() -> dict[str, Any]:
    try:
        data = json.loads(settings_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(values: dict[str, Any]) -> bool:
    """Merge ``values`` into the settings file (atomic write); False when it could not be written."""
    from ..atomic_files import atomic_write

    merged = {**load_settings(), **values}
    text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    try:
        folder = config_dir()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "settings.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError:
        return False
    return True


def last_model() -> str | None:
    value = load_settings().get("last_model")
    return value if isinstance(value, str) and value else None


def recent_checkpoints() -> list[str]:
    """Remembered checkpoint files that still exist, newest first."""
    items = load_settings().get("recent_checkpoints", [])
    if not isinstance(items, list):
        return []
    return [p for p in items if isinstance(p, str) and Path(p).is_file()][:MAX_RECENT]


def remember_model(choice: str) -> bool:
    """Store the model choice (``bundled``/``untrained``/a file path); files join the recent list."""
    values: dict[str, Any] = {"last_model": choice}
    if choice not in (BUNDLED, UNTRAINED):
        choice = str(Path(choice).expanduser().resolve())
        values["last_model"] = choice
        recent = [choice, *[p for p in recent_checkpoints() if p != choice]]
        values["recent_checkpoints"] = recent[:MAX_RECENT]
    return save_settings(values)


#: folders whose modality is remembered (the most recently used ones are kept)
MAX_FOLDERS = 64


def _folder_key(folder: str | os.PathLike[str]) -> str:
    return str(Path(folder).expanduser().resolve())


def _folder_table() -> list[tuple[str, str]]:
    """[(folder, modality)], newest first (a list: the settings file sorts its keys)."""
    items = load_settings().get("modality_by_folder", [])
    if not isinstance(items, list):
        return []
    return [(k, v) for k, v in (pair for pair in items if isinstance(pair, list) and len(pair) == 2)
            if isinstance(k, str) and isinstance(v, str) and v]


def remembered_modality(folder: str | os.PathLike[str]) -> str | None:
    """The modality last chosen for images of ``folder`` (None when none was)."""
    key = _folder_key(folder)
    return next((v for k, v in _folder_table() if k == key), None)


def remember_modality(folder: str | os.PathLike[str], modality: str) -> bool:
    """Store ``modality`` as the choice for images of ``folder`` (newest first, at most MAX_FOLDERS)."""
    key = _folder_key(folder)
    table = [(key, modality), *[(k, v) for k, v in _folder_table() if k != key]]
    return save_settings({"modality_by_folder": [list(pair) for pair in table[:MAX_FOLDERS]]})
