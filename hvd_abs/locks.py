"""Advisory file locks (flock): one run at a time in an --out folder, one decoder per data cache.

flock is released by the kernel when its holder exits however it exits, so a crashed process
never leaves a folder or a cache locked. Some file systems (some NFS, SMB, FUSE or Lustre mounts)
have no flock: there the work goes on unlocked.
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
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class NoFlock(OSError):
    """The file system has no flock."""


def lock_fd(fd: int, wait: bool = False) -> bool:
    """An exclusive flock on `fd`: True once held, False when another process holds it (only
    with wait=False). NoFlock where the file system has none; other OSErrors propagate."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            raise NoFlock(exc.errno, exc.strerror) from None
        raise


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold OUT/.lock (creating OUT) while inside; UserError at once if another process holds it.
    Two runs in one folder would write every epoch twice and each other's checkpoints: a run
    marks its folder (metrics.jsonl) only after its first epoch, so the out-dir check alone
    lets both in. Without flock the run goes on unlocked, with a warning."""
    path = Path(out).expanduser()
    lock_path = path / LOCK_FILE
    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"--out {path} cannot be used ({exc.strerror}): pass a writable --out") from None
        try:
            held = lock_fd(fd)
        except NoFlock as exc:
            os.close(fd)
            lock_path.unlink(missing_ok=True)
            log.warning("%s: this file system has no flock (%s): running without the one-run-per-folder lock",
                        path, exc.strerror)
            yield
            return
        except OSError:
            os.close(fd)
            raise
        if not held:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"--out {path} is in use by another run (process {holder}): wait for it to end, or "
                            f"pass another --out")
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


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on <path>.lock while one process checks or builds the file at `path`:
    ranks of one job on one machine then decode once, the others wait and read the file. Where
    no lock can be had (a read-only folder, no flock) it is skipped: the atomic write still
    keeps the file whole, at the cost of duplicate work."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.debug("no lock at %s (%s)", lock_path, exc)
        yield
        return
    try:
        try:
            if not lock_fd(fd):
                log.info("waiting for another process building %s", path)
                lock_fd(fd, wait=True)
        except OSError as exc:
            log.debug("flock on %s failed (%s)", lock_path, exc)
        yield
    finally:
        os.close(fd)  # releases the flock
