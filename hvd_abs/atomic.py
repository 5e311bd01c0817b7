"""Whole-or-nothing file writes: a reader (or a crash) sees the old file or the new one, never half.

Results and figures are written to a temp file in the same folder, flushed to disk, then renamed
over the target (`os.replace` is atomic within a file system).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], mode: int = 0o644,
                 sync_dir: bool = False) -> Path:
    """Call write(fh) on a temp file beside `path`, then rename it to `path`. Returns `path`.

    On any error the temp file is removed and `path` is left as it was. mode: the file's
    permissions (results are for everyone to read; mkstemp alone makes 0600). sync_dir: also
    fsync the folder, so that the rename itself survives a crash (checkpoints).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")), mode=mode)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder (best effort: not every file system lets a folder be opened)."""
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


def savefig_atomic(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """matplotlib `fig.savefig` to `path` atomically, in the format its suffix names (e.g. .png)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return write_atomic(path, lambda fh: fig.savefig(fh, format=fmt, **kwargs))


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a file could not be written at `path`, or None if it can: checked before a long job, so
    that a bad --out fails at once, not after the work. Missing folders count as writable when the
    nearest existing one is (they are made when the file is written)."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a file path"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not can_create_in(parent):
        return f"{parent} is not a writable directory"
    return None


def can_create_in(folder: Path) -> bool:
    """Whether a new entry can be made in `folder`, leaving no trace.

    os.access says yes to root everywhere (/proc included), so a yes is confirmed by making and
    removing an empty folder in it. The folder's atime/mtime are then put back: the probe must not
    look like a change to anyone watching it (best effort: only its owner or root may set them).
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    st = folder.stat()
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=folder))
    except OSError:
        return False
    try:
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError:
        pass
    return True
