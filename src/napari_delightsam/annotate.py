"""Annotate a whole folder: the napari-independent session behind "De-LightSAM annotate".

An :class:`AnnotationSession` holds a list of images (a folder's readable files, sorted by name,
or an explicit list) and an output folder. It knows

* which images are **done**: a mask file for them exists in the output folder
  (``<stem>.png``, ``<stem>.tif`` or ``<stem>.tiff``; two images with the same stem, ``a.png``
  and ``a.jpg``, get ``a.png.png`` and ``a.jpg.png``);
* which could **not be read** (a file that is not an image, empty, truncated...), each with the
  reader's one-line reason: listed, never fatal, skipped by the navigation;
* the **current** image, ``next``/``previous``/``go`` (done images skipped unless asked for),
  and "n of N done".

:meth:`AnnotationSession.save` writes the mask and its provenance sidecar with
``widgets.export.export_labels`` (atomic: a temporary file renamed over the target), PNG by
default or TIFF. A mask that existed before and that this session did not open
(:meth:`AnnotationSession.load_mask`) is never replaced unless ``overwrite=True``: it raises
:class:`MaskExistsError` instead, so a caller can ask.

The session's state (current image, chosen modality, model, masks saved, unreadable files) is
``delightsam-annotate.json`` in the output folder, rewritten atomically after every change; a
new session on the same folders (after a crash, or a closed window) resumes at the image it
stopped on. Work on the image on screen is kept as a *draft* (``.delightsam-drafts/<mask
name>.tif``, :meth:`AnnotationSession.save_draft`), given back by :meth:`load_draft` and removed
when the mask is saved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .image_files import IMAGE_EXTENSIONS, ImageReadError, read_image

__all__ = [
    "DRAFTS_DIR",
    "MASK_FORMATS",
    "STATE_FILE",
    "AnnotationSession",
    "ImageEntry",
    "MaskExistsError",
    "list_images",
]

STATE_FILE = "delightsam-annotate.json"
STATE_FORMAT = "napari-delightsam annotate session v1"
DRAFTS_DIR = ".delightsam-drafts"
#: mask format -> file extension
MASK_FORMATS = {"png": ".png", "tiff": ".tif"}
_MASK_EXTENSIONS = (".png", ".tif", ".tiff")


class MaskExistsError(FileExistsError):
    """Saving would replace a mask this session did not open; pass ``overwrite=True`` to replace it."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of the session: its file and the mask file name stem in the output folder."""

    path: Path
    mask_stem: str

    @property
    def name(self) -> str:
        return self.path.name


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files of ``folder`` (not its sub-folders, not hidden files), sorted by name;
    extensions ``image_files.IMAGE_EXTENSIONS``, any case."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist or is not a folder")
    found = [p for p in root.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def _mask_stems(paths: Sequence[Path]) -> list[str]:
    """``a.png`` -> ``a``; when two images share a stem, each keeps its extension (``a.png``)."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    return [p.stem if counts[p.stem] == 1 else p.name for p in paths]


def _utc_now() -> str:
    from .widgets.core import utc_now

    return utc_now()


class AnnotationSession:
    """A folder (or a list) of images annotated into an output folder; see the module doc.

    ``images``: a folder or a sequence of image files. ``output``: the folder masks go to
    (created when missing; it must not be the input folder). ``mask_format``: "png" (default;
    binary masks as 0/255, label ids up to 255) or "tiff" (any ids), for masks that do not exist
    yet -- an existing mask keeps its own file and format.
    """

    def __init__(
        self,
        images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        output: str | os.PathLike[str],
        *,
        mask_format: str = "png",
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {tuple(MASK_FORMATS)}, got {mask_format!r}")
        self.mask_format = mask_format
        if isinstance(images, (str, os.PathLike)):
            self.input: str | list[str] = str(Path(images).expanduser().resolve())
            paths = list_images(self.input)  # absolute: a later change of directory loses nothing
            input_dirs = {Path(self.input)}
        else:
            paths = [Path(p).expanduser().resolve() for p in images]
            self.input = [str(p) for p in paths]
            input_dirs = {p.parent for p in paths}
        self.output = Path(output).expanduser().resolve()
        if self.output in {d.resolve() for d in input_dirs}:
            raise ValueError(f"the output folder {self.output} is an input folder: choose a separate folder for masks")
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"output folder {self.output} exists and is a file")
        self.output.mkdir(parents=True, exist_ok=True)
        self.entries = [ImageEntry(p, s) for p, s in zip(paths, _mask_stems(paths), strict=True)]
        self._by_name = {e.name: i for i, e in enumerate(self.entries)}
        #: image name -> why it cannot be read
        self.unreadable: dict[str, str] = {}
        #: indices whose existing mask this session opened (may be replaced)
        self._opened: set[int] = set()
        #: masks saved so far (image name -> {"mask": file name, "time": ...}), across sessions
        self.saved: dict[str, dict[str, Any]] = {}
        #: session-wide choices kept in the state file (modality, model...)
        self.settings: dict[str, Any] = {}
        self.index: int | None = None
        for entry in self.entries:
            reason = _probe(entry.path)
            if reason:
                self.unreadable[entry.name] = reason
        self._load_state()
        if self.index is None or not self._usable(self.index) or self.is_done(self.index):
            self.index = self.next_todo(-1)
        self.write_state()

    # -- what there is ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def total(self) -> int:
        return len(self.entries)

    @property
    def state_path(self) -> Path:
        return self.output / STATE_FILE

    def name(self, index: int) -> str:
        return self.entries[index].name

    def index_of(self, name: str) -> int:
        return self._by_name[name]

    def existing_mask(self, index: int) -> Path | None:
        """The image's mask file in the output folder (PNG first), or None."""
        stem = self.entries[index].mask_stem
        for ext in _MASK_EXTENSIONS:
            candidate = self.output / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
        return None

    def mask_path(self, index: int) -> Path:
        """Where :meth:`save` writes: the existing mask's file, else ``<stem>`` + the session's format."""
        return self.existing_mask(index) or self.output / f"{self.entries[index].mask_stem}{MASK_FORMATS[self.mask_format]}"

    def is_done(self, index: int) -> bool:
        return self.existing_mask(index) is not None

    def is_unreadable(self, index: int) -> bool:
        return self.entries[index].name in self.unreadable

    def _usable(self, index: int) -> bool:
        return 0 <= index < len(self.entries) and not self.is_unreadable(index)

    @property
    def done_count(self) -> int:
        return sum(self.is_done(i) for i in range(len(self.entries)))

    @property
    def readable_count(self) -> int:
        return len(self.entries) - len(self.unreadable)

    def summary(self) -> str:
        """"n of N done" (N counts the readable images), and how many could not be read."""
        text = f"{self.done_count} of {self.readable_count} done"
        if self.unreadable:
            text += f" ({len(self.unreadable)} unreadable)"
        return text

    # -- navigation -----------------------------------------------------------------------------

    def next_todo(self, after: int | None = None) -> int | None:
        """The first readable image without a mask after ``after`` (default: the current one),
        wrapping around to the start; None when every readable image is done."""
        start = self.index if after is None else after
        start = -1 if start is None else start
        n = len(self.entries)
        for k in range(1, n + 1):
            i = (start + k) % n
            if self._usable(i) and not self.is_done(i):
                return i
        return None

    def step(self, direction: int, *, skip_done: bool = True) -> int | None:
        """The next (``direction`` 1) or previous (-1) readable image from the current one, done
        ones skipped unless ``skip_done`` is False; no wrap-around. None at the end."""
        i = -1 if self.index is None and direction > 0 else len(self.entries) if self.index is None else self.index
        while True:
            i += 1 if direction > 0 else -1
            if not 0 <= i < len(self.entries):
                return None
            if self._usable(i) and not (skip_done and self.is_done(i)):
                return i

    def go(self, index: int) -> int:
        """Make ``index`` the current image (done images too: reopen on request); returns it."""
        if not 0 <= int(index) < len(self.entries):
            raise IndexError(f"image {index} does not exist ({len(self.entries)} images)")
        if self.is_unreadable(int(index)):
            raise ValueError(f"{self.name(int(index))} cannot be read: {self.unreadable[self.name(int(index))]}")
        self.index = int(index)
        self.write_state()
        return self.index

    # -- pixels ---------------------------------------------------------------------------------

    def load_image(self, index: int) -> np.ndarray | None:
        """The image's pixels, or None when it cannot be decoded (then listed in ``unreadable``
        with the reason, and the state file says so)."""
        entry = self.entries[index]
        try:
            return read_image(entry.path)
        except ImageReadError as exc:
            self.mark_unreadable(index, str(exc))
            return None

    def mark_unreadable(self, index: int, reason: str) -> None:
        self.unreadable[self.entries[index].name] = _one_line(reason, self.entries[index].path)
        self.write_state()

    def load_mask(self, index: int) -> np.ndarray | None:
        """The existing mask of a done image as the label array it was saved as (binary masks
        {0, 1}), or None; the session may then replace it (the user opened it)."""
        from .widgets.export import read_labels

        path = self.existing_mask(index)
        if path is None:
            return None
        labels = read_labels(path)
        self._opened.add(int(index))
        return labels

    def opened(self, index: int) -> bool:
        """True when saving ``index`` may replace its existing mask (none exists, or it was opened)."""
        return not self.is_done(index) or int(index) in self._opened

    # -- saving ---------------------------------------------------------------------------------

    def save(
        self,
        index: int,
        labels: Any,
        *,
        provenance: dict[str, Any] | None = None,
        layer_name: str | None = None,
        overwrite: bool = False,
    ) -> list[Path]:
        """Write the image's mask + ``<mask>.json`` (atomically), update the state file and drop
        the draft; returns both paths.

        Raises :class:`MaskExistsError` when a mask exists that this session did not open and
        ``overwrite`` is False; ``widgets.export.ExportError`` for labels the format cannot hold
        (ids above 255 in a PNG: choose TIFF).
        """
        from .widgets.export import export_labels, sidecar_path

        index = int(index)
        entry = self.entries[index]
        target = self.mask_path(index)
        exists = target.exists() or sidecar_path(target).exists()
        if exists and not overwrite and index not in self._opened:
            raise MaskExistsError(
                f"{target} already exists and was not opened in this session; open it first, or pass overwrite=True"
            )
        prov = dict(provenance or {})
        prov.setdefault("input_layer", layer_name or entry.path.stem)
        prov["image_file"] = str(entry.path)
        prov["annotation_session"] = {"output": str(self.output), "index": index, "images": len(self.entries)}
        written = export_labels(target, labels, layer_name=layer_name or entry.path.stem, provenance=prov,
                                overwrite=True if exists else False)
        self._opened.add(index)
        self.saved[entry.name] = {"mask": target.name, "time": _utc_now()}
        self.discard_draft(index)
        self.write_state()
        return written

    # -- drafts ---------------------------------------------------------------------------------

    def draft_path(self, index: int) -> Path:
        return self.output / DRAFTS_DIR / f"{self.entries[index].mask_stem}.tif"

    def save_draft(self, index: int, labels: Any, provenance: dict[str, Any] | None = None) -> Path:
        """Keep unsaved work on an image (any label ids; TIFF, atomic) and how the mask was made
        (``provenance``, beside it as JSON); :meth:`save` removes both."""
        from .atomic_files import atomic_write
        from .image_files import write_tiff

        path = self.draft_path(index)
        path.parent.mkdir(exist_ok=True)
        write_tiff(path, np.asarray(labels), overwrite=True)
        text = json.dumps(provenance or {}, indent=2, default=str) + "\n"
        atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path

    def draft_provenance(self, index: int) -> dict[str, Any]:
        """The provenance kept with the image's draft ({} when none)."""
        try:
            record = json.loads(self.draft_path(index).with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def load_draft(self, index: int) -> np.ndarray | None:
        path = self.draft_path(index)
        if not path.is_file():
            return None
        import tifffile

        try:
            return tifffile.imread(path)
        except Exception:  # noqa: BLE001 -- a damaged draft is no reason to stop; the mask is redone
            return None

    def discard_draft(self, index: int) -> None:
        self.draft_path(index).unlink(missing_ok=True)
        self.draft_path(index).with_suffix(".json").unlink(missing_ok=True)

    # -- state file -----------------------------------------------------------------------------

    def write_state(self) -> Path:
        from .atomic_files import atomic_write

        record = {
            "format": STATE_FORMAT,
            "input": self.input,
            "output": str(self.output),
            "mask_format": self.mask_format,
            "current": None if self.index is None else self.entries[self.index].name,
            "settings": self.settings,
            "saved": self.saved,
            "unreadable": self.unreadable,
            "done": self.done_count,
            "images": len(self.entries),
            "updated": _utc_now(),
        }
        text = json.dumps(record, indent=2) + "\n"
        return atomic_write(self.state_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _load_state(self) -> None:
        try:
            record = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            return
        saved = record.get("saved")
        if isinstance(saved, dict):
            self.saved = {k: v for k, v in saved.items() if isinstance(v, dict)}
        settings = record.get("settings")
        if isinstance(settings, dict):
            self.settings = settings
        unreadable = record.get("unreadable")
        if isinstance(unreadable, dict):  # decoding failures found when an image was opened
            for name, reason in unreadable.items():
                if name in self._by_name and isinstance(reason, str):
                    self.unreadable.setdefault(name, reason)
        current = record.get("current")
        if isinstance(current, str) and current in self._by_name:
            self.index = self._by_name[current]

    def set_setting(self, key: str, value: Any) -> None:
        """Remember a session-wide choice (e.g. the modality) in the state file."""
        self.settings[key] = value
        self.write_state()


def _one_line(reason: str, path: Path) -> str:
    text = " ".join(str(reason).split())
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _probe(path: Path) -> str | None:
    """Why ``path`` cannot be an image (from its header, no decoding), or None.

    Cheap enough for a folder of hundreds of files; a file whose pixels are damaged past its
    header is found when it is opened (:meth:`AnnotationSession.load_image`)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot access the file ({exc.strerror or exc})"
    if size == 0:
        return "file is empty (0 bytes)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"cannot open the file ({exc.strerror or exc})"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None  # TIFF: tifffile reads the header when the image is opened
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 -- the header parsed
    except UnidentifiedImageError:
        return "not a recognised image file (PNG, JPEG, TIFF or BMP expected)"
    except Exception as exc:  # noqa: BLE001 -- any header failure is a reason, not a crash
        return f"corrupt image header ({exc})"
    return None
