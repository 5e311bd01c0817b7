"""Warm joins: a pre-started, pre-imported worker that a joining slot hands its identity to.

A cold join makes every survivor wait while the new process starts Python, imports torch and
Horovod and loads the data (seconds). Here that work happens *before* the slot is advertised:

1. The launcher keeps `standby` processes ready on the hosts the next slots go to
   (standby_pool.py): each imports torch, Horovod and the trainer, preloads the data set,
   listens on a Unix socket (mode 0600, in a folder on its own host: only the job's user can
   reach it), publishes `<pid>.ready` and says so on its stdout.
2. Discovery advertises a new slot only where a ready standby will fill it (discovery.py).
3. For the new slot horovodrun runs `python -m hvd_abs.launch.warm_exec -- <worker argv>` on that
   host (standard library only: starts in tens of milliseconds). It claims a standby there by
   renaming its ready file (atomic: one claimant wins), sends its argv, environment and working
   directory, and passes its stdin/stdout/stderr over the socket (SCM_RIGHTS). With no standby
   it execs the cold argv.
4. The standby takes that identity (environment, fds, cwd) and runs the worker in-process; its
   exit code goes back to warm_exec, which exits with it. A signal to warm_exec (horovodrun
   stopping a worker) is forwarded to the standby.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hvd_abs.atomic import write_text_atomic

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20


def standby_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "elastic" / "standby"


# What a standby says on its stdout (to the launcher's standby pool, through ssh for a remote one).
READY_WORD, CLAIMED_WORD = "hvd_abs-standby: ready", "hvd_abs-standby: claimed"


def _alive(ready: Path) -> bool:
    try:
        os.kill(int(ready.name.split(".")[0]), 0)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False


def send_message(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    header = struct.pack("!I", len(data))
    if fds:
        socket.send_fds(sock, [header + data], fds)
    else:
        sock.sendall(header + data)


def recv_message(sock: socket.socket, max_fds: int = 0) -> tuple[Any, list[int]]:
    """One length-prefixed JSON message (and up to `max_fds` passed descriptors)."""
    fds: list[int] = []
    if max_fds:
        chunk, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE + 4, max_fds)
    else:
        chunk = sock.recv(MAX_MESSAGE + 4)
    if len(chunk) < 4:
        raise ConnectionError("peer closed the connection")
    (length,) = struct.unpack("!I", chunk[:4])
    if length > MAX_MESSAGE:
        raise ConnectionError(f"message of {length} bytes is over the {MAX_MESSAGE} limit")
    body = chunk[4:]
    while len(body) < length:
        more = sock.recv(length - len(body))
        if not more:
            raise ConnectionError("peer closed the connection mid-message")
        body += more
    return json.loads(body), fds


def serve(directory: str | os.PathLike, run_worker: Callable[[list[str]], int], idle_timeout: float = 3600.0,
          announce: Callable[[str], None] = lambda word: None) -> int:
    """Publish this (already warm) process as a standby in `directory`, wait for one claimant,
    become it, and return the worker's exit code. Returns 0 without running anything when no
    claimant comes within `idle_timeout` seconds or the directory disappears (job over).
    announce: called with READY_WORD once published, CLAIMED_WORD once claimed."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    sock_path, ready = d / f"{pid}.sock", d / f"{pid}.ready"
    old_umask = os.umask(0o077)  # the socket file is created 0600: only this user can connect
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(sock_path))
    finally:
        os.umask(old_umask)
    server.listen(1)
    server.settimeout(1.0)
    write_text_atomic(ready, str(sock_path))
    announce(READY_WORD)
    deadline = time.monotonic() + idle_timeout
    try:
        while True:
            try:
                conn, _ = server.accept()
                break
            except socket.timeout:
                if time.monotonic() > deadline or not d.is_dir() or not (ready.exists() or _claimed(d, pid)):
                    return 0
        conn.settimeout(None)
        announce(CLAIMED_WORD)  # (before this process's stdout becomes the claimant's)
        # Claimed: the path is no longer needed (the connection is). Removed now, not at exit,
        # so nothing of the standby is left once the claimant has its exit code.
        server.close()
        for p in (sock_path, ready):
            p.unlink(missing_ok=True)
        request, fds = recv_message(conn, max_fds=3)
        _die_with_claimant(conn)
        if len(fds) != 3:
            raise ConnectionError(f"expected stdin/stdout/stderr, got {len(fds)} descriptors")
        # Become the claimant: its stdio, environment and working directory.
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        code = 1
        try:
            code = run_worker(list(request["argv"]))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                send_message(conn, {"exit": code})
            except OSError:
                pass
        return code
    finally:
        server.close()
        for p in (sock_path, ready):
            p.unlink(missing_ok=True)


def _die_with_claimant(conn: socket.socket) -> None:
    """If the claimant (warm_exec, horovodrun's child) dies, e.g. SIGKILLed when horovodrun
    stops a slot, this worker must die too, as the cold worker in its place would have."""
    import threading

    def watch() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="hvd_abs-claimant-watch").start()


def _claimed(d: Path, pid: int) -> bool:
    return any(p.name.startswith(f"{pid}.claimed.") for p in d.iterdir())


def claim(directory: str | os.PathLike) -> tuple[int, Path] | None:
    """Atomically claim one ready standby: (its pid, its socket path), or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    for ready in sorted(d.glob("*.ready")):
        if not _alive(ready):
            continue
        pid = int(ready.name.split(".")[0])
        try:
            os.rename(ready, d / f"{pid}.claimed.{os.getpid()}")
        except FileNotFoundError:
            continue  # another claimant won this one
        return pid, d / f"{pid}.sock"
    return None


def hand_off(pid: int, sock_path: Path, argv: list[str]) -> int:
    """Send this process's identity to the claimed standby; wait for and return its exit code.
    Signals that would stop this process are forwarded to the standby."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(sock_path))

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    send_message(sock, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}, fds=[0, 1, 2])
    try:
        reply, _ = recv_message(sock)
        return int(reply.get("exit", 1))
    except (ConnectionError, OSError, ValueError):
        return 1  # the standby died: horovodrun sees a failed worker, as with a cold one


def get_warm(train_args: list[str] | None) -> None:
    """The cold part of a join, done before the slot is advertised: imports, the data set of
    TRAIN_ARGS (None: no data, a --script loads its own) and, streamed, its loader processes,
    and torch's lazy first-use work (the
    first optimizer imports torch._dynamo: ~1.5 s here). Shared by horovodrun standbys and the
    Ray executor's warm actors."""
    import horovod.torch  # noqa: F401
    import torch

    import hvd_abs.comm  # noqa: F401
    import hvd_abs.elastic.job  # noqa: F401
    import hvd_abs.second_order  # noqa: F401
    from hvd_abs.training.config import TrainConfig
    from hvd_abs.training.inputs import warm_loader
    from hvd_abs.training.options import train_context
    from hvd_abs.training.run_data import preload, subset

    if train_args is not None:
        args = list(train_args[1:] if train_args[:1] == ["train"] else train_args)
        params = train_context(args, resilient=True).params
        defaults = TrainConfig()  # (resilient parsing leaves what was not given None)
        opt = lambda name: getattr(defaults, name) if params.get(name) is None else params[name]  # noqa: E731
        data = preload(opt("dataset"), opt("data_dir"), bool(opt("download")), opt("image_size"), opt("data_loading"))
        # A streamed run's loader processes, started on the data and options the run will ask for.
        # (Not on a GPU: the pinning thread would take GPU 0 before the claimant picks its own.)
        if opt("device") != "cuda":
            warm_loader(subset(data, opt("train_subset"), opt("test_subset")), opt("augment"),
                        int(opt("loader_workers")), False, int(opt("seed")))
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    (p * 2).sum().backward()
    opt.step()


def run_as_main(script: str, argv: list[str]) -> None:
    """Run SCRIPT as __main__ with sys.argv = [SCRIPT, *argv] and its folder first on sys.path,
    as `python SCRIPT ARGV` would (a --script worker in a standby or a Ray actor); both are
    restored after. Its SystemExit passes to the caller."""
    import runpy

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))  # its own modules import, as under `python SCRIPT`
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _exit_when_stdin_closes() -> None:
    """The launcher's pipe is this standby's stdin (through ssh on a remote host): when it
    closes, the launcher is gone or done, and so is this process, whatever it is doing."""
    import threading

    watched = os.dup(0)  # (fd 0 itself becomes the claimant's stdin)

    def watch() -> None:
        while os.read(watched, 4096):
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="hvd_abs-launcher-watch").start()


def _main(argv: list[str]) -> int:
    """`python -m hvd_abs.launch.standby --dir D [--until-stdin-closes] -- TRAIN_ARGS`: get warm
    (imports, the data set), then serve as `hvd-abs train`. `--dir D [...] --script --`: get warm
    (imports: a script loads its own data), then serve as the script the claimant names
    (`python SCRIPT ARGS`)."""
    flags = argv[2:argv.index("--")] if argv[:1] == ["--dir"] and "--" in argv else None
    if flags is None or len(argv) < 3 or not set(flags) <= {"--script", "--until-stdin-closes"}:
        print("usage: python -m hvd_abs.launch.standby --dir DIR [--until-stdin-closes] [--script] -- TRAIN_ARGS...",
              file=sys.stderr)
        return 2
    directory, train_args, script = argv[1], argv[argv.index("--") + 1:], "--script" in flags
    if "--until-stdin-closes" in flags:
        _exit_when_stdin_closes()
    get_warm(None if script else train_args)
    from hvd_abs.elastic.worker import run_train

    # Terminated while waiting (the job ended): leave through `finally`, removing our files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def run_worker(args: list[str]) -> int:
        if script:  # args: SCRIPT and its arguments (warm_exec's argv after the interpreter)
            run_as_main(args[0], args[1:])
            return 0
        if args[:1] != ["train"]:
            print(f"a standby runs `hvd-abs train`, not {args[:1]}", file=sys.stderr)
            return 2
        return run_train(args[1:])

    return serve(directory, run_worker, announce=lambda word: print(word, flush=True))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

