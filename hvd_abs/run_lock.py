"""One run at a time in an --out folder: an advisory lock on OUT/.lock, held while a run (or a
launcher, for its whole elastic job) writes there.

Two runs started into one folder both passed the "holds no run" check, since a run marks its
folder (metrics.jsonl) only after its first epoch; they then wrote every epoch twice and each
other's checkpoints and summary. flock is released by the kernel when the holder exits however
it exits, so a crashed run never leaves the folder locked; the file goes when the run ends.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from hvd_abs.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold OUT/.lock (creating OUT) while inside; UserError at once if another process holds it."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"--out {path} cannot be used ({exc.strerror}): pass a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"--out {path} is in use by another run (process {holder}): wait for it to end, or "
                            f"pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # Gone with the run, so that a refused job leaves the folder as it found it. (A
            # holder killed outright leaves the file, but no lock: the next run takes it.)
            (path / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)  # (releases the lock)
