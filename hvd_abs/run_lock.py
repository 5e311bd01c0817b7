"""One run at a time in an --out folder: an advisory lock on OUT/.lock, held while a run (or a
launcher, for its whole elastic job) writes there.

Two runs started into one folder both passed the "holds no run" check, since a run marks its
folder (metrics.jsonl) only after its first epoch; they then wrote every epoch twice and each
other's checkpoints and summary. flock is released by the kernel when the holder exits however
it exits, so a crashed run never leaves the folder locked; the file goes when the run ends.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

from hvd_abs.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold OUT/.lock (creating OUT) while inside; UserError at once if another process holds it.
    On a file system without flock (some NFS, SMB, FUSE or Lustre mounts) the run goes on unlocked,
    with a warning, as it did before there was a lock."""
    path = Path(out).expanduser()
    lock_path = path / LOCK_FILE
    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"--out {path} cannot be used ({exc.strerror}): pass a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"--out {path} is in use by another run (process {holder}): wait for it to end, or "
                            f"pass another --out") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            os.close(fd)
            lock_path.unlink(missing_ok=True)
            log.warning("%s: this file system has no flock (%s): running without the one-run-per-folder lock",
                        path, exc.strerror)
            yield
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder had just removed (ending): take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # Gone with the run, so that a refused job leaves the folder as it found it. (A
            # holder killed outright leaves the file, but no lock: the next run takes it.)
            lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # (releases the lock)
