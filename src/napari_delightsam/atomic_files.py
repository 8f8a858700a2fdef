"""Small file helpers shared by every writer: atomic writes and content hashes.

``atomic_write`` never leaves a half-written file where the user expects a complete one: the
content goes to a temporary file in the destination folder (same file system, so the final
``os.replace`` is atomic), is flushed and fsynced, then renamed over the target. Any exception
leaves the previous file byte-identical and removes the temporary file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "sha256_file"]


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write_fn(tmp_path)`` writes the content to a temporary path.

    The temporary file lives in the same folder as ``path`` and has the same suffix (some
    writers pick the format from it). After ``write_fn`` returns, the file is fsynced and
    renamed over ``path``. On any exception the old file (if any) is untouched, the temporary
    file is removed and the exception propagates. Returns the final path.
    """
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {target}: folder {folder} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a folder")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f"{target.suffix}.tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        if not tmp.is_file():
            raise OSError(f"writer did not create the temporary file for {target}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if target.exists():
            # keep the user's permission bits; mkstemp creates 0600 files
            try:
                os.chmod(tmp, target.stat().st_mode & 0o7777)
            except OSError:
                pass
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return target


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
